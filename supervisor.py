"""The supervisor: the arbiter of the daemon. One loop that sleeps until something is due (a child's
message, a signal, a timer), then runs small idempotent steps: read messages, reap and restart
children, enforce deadlines, dispatch jobs, watch the manifest. The rules live elsewhere: jobs in
ipc/ledger.py, the manifest in ipc/keeper.py, children in ipc/children.py, control operations in
ipc/operations.py. This file starts and stops them, and keeps the database's trouble (locked,
disk full) from ever stopping the loop.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import secrets
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

import launch  # noqa: F401  (first: outside uv's environment, one line saying what to run)
from ipc import VERSION, notify, sdnotify, tlsconf
from ipc.children import RELEASE_GRACE_S, ChildPool, Exit, Fatal, ForkedChild, FreshChild
from ipc.config import EX_CONFIG, Config, ConfigError, config_changes, ensure_jwt_secret, load_config
from ipc.control import ENV_ADDR, ENV_TOKEN, ControlError, ControlServer
from ipc.files import PidLock, open_descriptors
from ipc.keeper import ManifestKeeper
from ipc.ledger import JobLedger, Outcome
from ipc.logsetup import child_log_handler, journal_prefix, setup_supervisor_logging
from ipc.manifest import ManifestError, ManifestFile, duplicate_entries
from ipc.messages import Msg
from ipc.naming import part_filename
from ipc.operations import ControlOps
from ipc.oslayer import OS
from ipc.previews import OwedPreviews
from ipc.retry import STORE_RETRY
from ipc.scanlink import LibraryScans
from ipc.speedcap import SpeedCap
from ipc.states import ChildKind, ChildState, KillReason
from ipc.store import JobStore, StoreOpenError, StoreUnavailable, utc_now_iso
from ipc.updaterlink import UpdaterLink
from workers.webhooks import EventAnnouncer

REPO_DIR = Path(__file__).resolve().parent
log = logging.getLogger("supervisor")

SHUTDOWN_BUDGET_S = 18.0  # under the 20 s the contract promises
STORE_BUSY_TIMEOUT_S = 0.5  # the loop never waits longer than this on a locked database
MANIFEST_POLL_S = 2.0  # how soon a person's save of manifest.json is noticed while work goes on
MANIFEST_POLL_IDLE_S = 5.0  # ... and while nothing does: an idle daemon wakes rarely
WEB_PROBE_S = 0.25
PROGRESS_STORE_INTERVAL_S = 1.0
PRUNE_EVERY_S = 86400.0
KEEP_HISTORY_S = 30 * 86400  # finished jobs and delivered events are kept this long
MAX_SLEEP_S = 30.0
# A forked child's death wakes the loop (its sentinel) and is reaped at once; the reap pass also
# runs this often while the loop is awake, for what has no sentinel (the web process).
REAP_POLL_S = 0.5
OWED_RETRY_S = 60.0  # the owed previews' list could not be read: read it again this often
FRESH_MODULES = {ChildKind.WEB: "web", ChildKind.WEBHOOKS: "workers.webhooks"}


class Supervisor:
    def __init__(self, cfg: Config, manifest: ManifestFile, clock=time.monotonic, wall=time.time):
        self.cfg = cfg
        self.clock = clock
        self.wall = wall
        self.store = JobStore(cfg.db_path, timeout_s=STORE_BUSY_TIMEOUT_S)
        self.ledger = JobLedger(self.store, max_attempts=cfg.max_attempts, clock=wall)
        self.keeper = ManifestKeeper(manifest, self.store, cfg.manifest_mode, cfg.download_path, clock=clock)
        self.ops = ControlOps(self)
        self.ctx = multiprocessing.get_context()
        self.fork = self.ctx.get_start_method() == "fork"
        self.log_queue = None if self.fork else self.ctx.Queue()
        self.pool = ChildPool(clock)
        self.signals: queue.SimpleQueue = queue.SimpleQueue()  # a handler must not take a lock we hold
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = multiprocessing.Pipe(duplex=False)
        self.control_token = secrets.token_hex(32)
        self.control: ControlServer | None = None
        self.webhook_announcer: EventAnnouncer | None = None  # wakes the webhook process per stored event
        self.stopping = False
        self.stop_deadline: float | None = None
        self.exit_code = 0
        self.started_wall = wall()
        self.started_iso = utc_now_iso()
        self.updates = UpdaterLink(self)  # the updater's entries, its clock, the updates it finds
        self.scans = LibraryScans(self)  # `import` through the daemon
        # Database trouble: what could not be stored waits here, in order, and is tried again.
        self.deferred: deque = deque()
        self._store_problem: str | None = None
        self._store_failures = 0
        self._store_retry_at = 0.0
        self._sync_due: str | None = None  # a manifest sync that could not run yet
        self._events: list = []
        self._after: list = []
        self._undo: list = []  # what puts memory changed inside the current transaction back if it fails
        self._batch: list = []  # this tick's messages from the workers: stored in one transaction
        self._txn_depth = 0
        self._progress_stored: dict[int, float] = {}
        self._progress_seen: dict[int, dict] = {}  # the last progress message of each running job
        # Who owes which preview (ipc/previews.py); loaded from the store when the first worker is ready.
        self._owed_previews = OwedPreviews()
        self._owed_retry_at: float | None = None  # the store's list could not be read: try again then
        self._next_manifest_poll = 0.0
        self._next_prune = 0.0
        self._ready_notified = False
        self._watchdog_s = sdnotify.watchdog_interval_s()
        self._next_watchdog = 0.0
        self._web_probe_running = False
        self._next_web_probe = 0.0
        self._next_reap = 0.0
        self.speed = SpeedCap(self)
        # How each kind of batch item is stored (_apply); looked up at call time, so a part
        # replaced later (a test's stand-in) is the one called.
        self._appliers: dict[str, Callable[..., None]] = {
            "progress": self._apply_progress,
            "emit": self._apply_emit,
            "lost": lambda ex: self._apply_exit(ex, lost=True),
            "restarted": lambda ex: self._apply_exit(ex, lost=False),
            "update": lambda update: self.updates.apply_update(update),
            Msg.PREVIEW_OWED: lambda path: self.store.owe_preview(path),
            Msg.PREVIEW_SETTLED: lambda path: self.store.preview_settled(path),
            "library_hashes": lambda hashes: self.scans.store_hashes(hashes),
            "library_answers": lambda answers: self.scans.store_answers(answers),
            "library_done": lambda result: self.scans.done(result),
        }
        self.updates.load()
        self._build_children()

    # --- the children ------------------------------------------------------------------------

    def _build_children(self) -> None:
        from workers.updater import updater_main
        from workers.worker import worker_main

        def args_for(child):
            return (str(self.cfg.config_path),)

        log_handler_for = (lambda child: child_log_handler(child.name)) if self.fork else (lambda child: self.log_queue)
        for i in range(self.cfg.workers):
            self.pool.add(ForkedChild(f"worker-{i + 1}", ChildKind.WORKER, worker_main, args_for, self.ctx,
                                      log_handler_for, self.supervisor_fds, on_change=self.on_child_change))
        self.pool.add(ForkedChild("updater", ChildKind.UPDATER, updater_main, args_for, self.ctx, log_handler_for,
                                  self.supervisor_fds, on_change=self.on_child_change))
        self.pool.add(self._fresh_child("web", ChildKind.WEB))
        if self.cfg.webhook_url or self.cfg.notify:
            self.pool.add(self._fresh_child("webhooks", ChildKind.WEBHOOKS))

    def _fresh_child(self, name: str, kind: ChildKind) -> FreshChild:
        def env_for(child):
            env = dict(os.environ)
            assert self.control is not None
            env[ENV_ADDR] = self.control.address
            env[ENV_TOKEN] = self.control_token
            env["PYTHONUNBUFFERED"] = "1"
            return env

        return FreshChild(name, kind, FRESH_MODULES[kind], lambda child: ["--config", str(self.cfg.config_path)],
                          env_for, on_ready=lambda child, pid: self.post("_child_ready", child=child.name, pid=pid),
                          on_gone=lambda child, pid: self.wake(), cwd=REPO_DIR, on_change=self.on_child_change)

    def supervisor_fds(self, for_child) -> list[int]:
        """File descriptors a forked child must not keep: every one this process has open but
        the standard three and the child's own log queue (its Pipe end is kept by ForkedChild).
        Kept by a child, a sibling's pipe or log queue hides that sibling's death, daemon.pid's
        lock outlives the supervisor for as long as an orphaned child lives, and each restarted
        child held a few more. The log file is closed in the child through its handler
        (ipc.childmain), never by number. Without /proc: the known pipes and sockets."""
        keep = {0, 1, 2}
        if hasattr(for_child.log_handler, "inherited_fds"):
            keep.update(for_child.log_handler.inherited_fds())
        listed = open_descriptors(skip_under=(self.cfg.data_dir / "logs",))
        if listed is not None:
            return [fd for fd in listed if fd not in keep]
        fds = [self._wake_r.fileno(), self._wake_w.fileno()]
        if self.control is not None:
            fds.append(self.control.fileno())
        for other in self.pool:
            if isinstance(other, ForkedChild):
                if other.conn is not None:
                    fds.append(other.conn.fileno())
                if other is not for_child and hasattr(other.log_handler, "inherited_fds"):
                    fds.extend(other.log_handler.inherited_fds())
            elif isinstance(other, FreshChild):
                fds.extend(other.pipe_fds())
        return [fd for fd in fds if fd not in keep]

    def on_child_change(self, child, old: ChildState, new: ChildState, why: str) -> None:
        if child.kind == ChildKind.WEBHOOKS:
            if self.webhook_announcer is not None:
                self.webhook_announcer.close()
                self.webhook_announcer = None
            if new == ChildState.STARTING and child.proc is not None:
                self.webhook_announcer = EventAnnouncer(child.proc.stdin)
        if new == ChildState.FATAL:
            self.emit_now("child_fatal", name=child.name, error=why)

    # --- events and transactions ----------------------------------------------------------

    @contextmanager
    def txn(self) -> Iterator[None]:
        """A unit of work on the database: job changes, manifest operations and the events they
        cause commit together, then the events are published. On failure nothing is kept, the
        in-memory copies are reloaded from the database, and StoreUnavailable is raised."""
        if self._txn_depth:
            yield
            return
        self._txn_depth = 1
        self._events = []
        self._after = []
        self._undo = []
        held_before = dict(self.ledger.held)
        try:
            with self.store.transaction():
                yield
                stored = [self.store.add_event(name, fields) for name, fields in self._events]
            after = self._after
        except BaseException as exc:
            for undo in reversed(self._undo):
                undo()
            self._resync(held_before)
            if isinstance(exc, StoreUnavailable):
                self._store_trouble(str(exc))
            raise
        finally:
            self._txn_depth = 0
            self._events = []
            self._after = []
            self._undo = []
        for action in after:  # what the committed change asks of memory and files
            action()
        self._store_fine()
        if stored and self.webhook_announcer is not None:
            self.webhook_announcer.announce()
        if self.control is not None:
            self.control.publish_many(stored)

    def note(self, outcome: Outcome) -> Outcome:
        """Queue an outcome's events for the current transaction."""
        self._events.extend(outcome.events)
        return outcome

    def after_commit(self, action) -> None:
        """Run `action` once the current transaction has committed (never if it fails)."""
        if self._txn_depth:
            self._after.append(action)
        else:
            action()

    def emit(self, event: str, /, **fields) -> None:
        self._events.append((event, fields))

    def emit_now(self, event: str, /, **fields) -> None:
        """An event outside any other work; kept for later if the database is busy."""
        try:
            with self.txn():
                self.emit(event, **fields)
        except StoreUnavailable:
            self.deferred.append(("emit", event, fields))

    def _resync(self, held: dict[int, str]) -> None:
        """After a failed transaction: the ledger's and keeper's copies back to what is stored,
        and which worker holds which job back to what it was before the transaction (an attempt
        taken in it was never sent; a job let go in it is still the worker's until that is
        stored)."""
        try:
            self.ledger.active.clear()
            for job in self.store.active_jobs():
                self.ledger._index(job)
            self.ledger.held = {j: w for j, w in held.items() if j in self.ledger.active}
            self.keeper.load()
        except Exception:
            log.exception("could not reload the job list after a failed write")

    def _store_trouble(self, problem: str) -> None:
        if self._store_problem is None:
            log.error("the job database cannot be written: %s; downloads pause until it can", problem)
        self._store_problem = problem
        self._store_failures += 1
        self._store_retry_at = self.clock() + STORE_RETRY.delay(self._store_failures)

    def _store_fine(self) -> None:
        if self._store_problem is not None and not self.deferred:
            log.info("the job database can be written again")
            self._store_problem = None
            self._store_failures = 0

    def degraded_reason(self) -> str | None:
        if self._store_problem:
            return f"the job database cannot be written: {self._store_problem}"
        return None

    # --- start and stop ---------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def handler(signum, frame):
            self.signals.put(signum)
            self.wake()

        for name in OS.stop_signals:
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), handler)

    def wake(self) -> None:
        try:
            self._wake_w.send_bytes(b"!")
        except OSError:
            pass

    def post(self, op: str, **args) -> None:
        """Hand something to the main loop from another thread."""
        self.inbox.put((op, args, None))
        self.wake()

    def run(self) -> int:
        self.install_signal_handlers()
        if OS.kill_children_with_me():
            log.info("the children are in a Job Object: they end with the supervisor")
        recovered = self.ledger.load()
        if recovered:
            log.info("recovered %d unfinished job(s) from the last run: %s", len(recovered),
                     ", ".join(str(j["id"]) for j in recovered))
        replayed = self.keeper.load()
        if replayed:
            log.info("manifest.json: %d change(s) of the last run were not written yet; writing them now", replayed)
        if not self.cfg.webhook_url:
            # Nothing is owed without a receiver: a webhook_url set later must not get the history.
            self.store.mark_all_delivered()
        notify.prepare_sinks(self.store, self.cfg.notify)  # each notify URL: this run's events, no history
        self.control = ControlServer(self.control_token, self.handle_control, avoid=self.cfg.active_port).start()
        self.announce_start()
        self.keeper.flush(force=True)
        self.speed.apply()
        self.pool.start_all()
        try:
            while True:
                self.tick()
                if self.stopping and self.pool.all_stopped():
                    break
                if self.stopping and self.stop_deadline is not None and self.clock() > self.stop_deadline:
                    log.warning("children did not stop in time; killing them")
                    self.pool.kill_all()
                    break
        except Fatal as exc:
            log.critical("stopping: %s", exc)
            print(f"{journal_prefix(logging.CRITICAL)}civitai-daemon: {exc}", file=sys.stderr)
            self.exit_code = 1
            self.begin_stop()
            deadline = self.clock() + 10
            while not self.pool.all_stopped() and self.clock() < deadline:
                self.tick(fatal_ok=True)
            self.pool.kill_all()
        finally:
            self.finish_stop()
        return self.exit_code

    def announce_start(self) -> None:
        """daemon_started, and the jobs the manifest asks for. If the database cannot be written
        now, both wait for it, in this order: no download starts before daemon_started is stored."""
        try:
            with self.txn():
                self.emit("daemon_started", version=VERSION)
                self.sync_manifest("start")
        except StoreUnavailable:
            self.deferred.append(("emit", "daemon_started", {"version": VERSION}))
            self._sync_due = "start"

    def begin_stop(self) -> None:
        """Stop taking jobs and tell every child to stop: nothing here may raise before that."""
        if self.stopping:
            return
        self.stopping = True
        self.stop_deadline = self.clock() + SHUTDOWN_BUDGET_S
        sdnotify.notify("STOPPING=1", "STATUS=draining")
        log.info("stopping: no new jobs; running downloads keep their partial files")
        try:  # first, so that the webhook process still sends it; never in the way of the stop
            self.emit_now("daemon_stopping", version=VERSION)
        except Exception:
            log.exception("could not record daemon_stopping")
        self.pool.stop_all()

    def finish_stop(self) -> None:
        """Best effort: a clean stop gives running jobs their attempt back and writes the
        manifest; whatever the database refuses now, the next start recovers."""
        self.pool.kill_all()
        try:
            with self.txn():
                for job in list(self.ledger.running()):
                    self.ledger.give_back(job["id"])
        except Exception as exc:
            log.warning("could not give the running jobs back (%s); the next start recovers them", exc)
        try:
            if not self.keeper.flush(force=True):
                log.warning("manifest.json could not be written now; the changes are kept and written at the next start")
        except Exception:
            log.exception("could not write manifest.json")
        if not self.cfg.webhook_url:
            try:
                self.store.mark_all_delivered()
            except Exception:
                pass
        if self.control:
            self.control.close()
        for child in self.pool:
            try:
                child.close()
            except Exception:
                pass
        log.info("stopped")

    # --- the loop ---------------------------------------------------------------------------

    def next_wait(self) -> float:
        """Seconds until the next thing is due: the loop sleeps that long unless woken."""
        now = self.clock()
        due = [self._next_manifest_poll]
        pool_due = self.pool.next_due(self.cfg.timeout, self.stop_deadline)
        if pool_due is not None:
            due.append(pool_due)
        keeper_due = self.keeper.next_due()
        if keeper_due is not None:
            due.append(keeper_due)
        updater_due = self.updates.next_due()
        if updater_due is not None:
            due.append(updater_due)
        if self.deferred or self._sync_due or self._store_problem:
            due.append(self._store_retry_at)
        if self._watchdog_s:
            due.append(self._next_watchdog)
        if self._owed_retry_at is not None and not self.stopping:  # retry_owed_previews runs only then
            due.append(self._owed_retry_at)
        due.append(self.speed.next_due())
        web = self.pool.get("web")
        if web is not None and web.state == ChildState.STARTING:
            due.append(self._next_web_probe)
        if any(isinstance(c, FreshChild) and c.live for c in self.pool):
            # A fresh interpreter's end wakes us through its stderr's EOF; this poll is the backstop.
            due.append(now + 30.0)
        if not self.stopping and self.pool.idle_workers() and not self._store_problem:
            if self.ledger.has_ready():
                due.append(now)
            else:
                nxt = self.ledger.next_due()
                if nxt is not None:
                    due.append(now + max(0.0, nxt - self.wall()))
        if self.stopping and self.stop_deadline is not None:
            due.append(min(self.stop_deadline, now + 0.5))
        return max(0.0, min(MAX_SLEEP_S, min(due) - now))

    def tick(self, fatal_ok: bool = False) -> None:
        waitables = [self._wake_r, *self.pool.waitables()]
        try:
            ready = multiprocessing.connection.wait(waitables, timeout=self.next_wait())
        except InterruptedError:
            ready = []
        if self._wake_r in ready:
            while self._wake_r.poll():
                self._wake_r.recv_bytes()
        self.handle_signals()
        self.handle_inbox()
        for child in self.pool:
            if isinstance(child, ForkedChild) and child.conn is not None and child.conn in ready:
                self.read_messages(child)
        self._step(self.retry_deferred)
        try:
            if self.stopping or self.clock() >= self._next_reap or self.pool.any_sentinel(ready):
                self._next_reap = self.clock() + REAP_POLL_S
                self.reap()
        except Fatal:
            if not fatal_ok:
                raise
        finally:
            self.flush_batch()
        if not self.stopping:
            self.pool.restart_due()
        for name, fields in self.pool.enforce(self.cfg.timeout, self.stop_deadline):
            self.emit_now(name, **fields)
        self.probe_web()
        if not self.stopping:
            self._step(self.dispatch)
            self._step(self.retry_owed_previews)
            self._step(self.poll_manifest)
            self._step(self.prune_store)
        self._step(self.flush_manifest)
        if self.clock() >= self.speed.next_due():
            self._step(self.speed.apply)
        self.heartbeat()

    def _step(self, step) -> None:
        """One of the loop's steps: a database that refuses it (locked, disk full) is trouble
        to report and retry, never the end of the loop."""
        try:
            step()
        except StoreUnavailable as exc:
            self._store_trouble(str(exc))

    def remember(self, key: str, value) -> None:
        """A kv value that is only shown (the updater's clock, the speed in force): not stored
        while the database is unavailable; it is sent again with the next change."""
        try:
            self.store.set_kv(key, value)
        except StoreUnavailable:
            pass

    def handle_signals(self) -> None:
        while True:
            try:
                signum = self.signals.get_nowait()
            except queue.Empty:
                return
            name = signal.Signals(signum).name
            log.info("received %s", name)
            if name == "SIGHUP":
                self.reload_config()
            else:
                self.begin_stop()

    def heartbeat(self) -> None:
        if self._watchdog_s and self.clock() >= self._next_watchdog:
            sdnotify.notify("WATCHDOG=1")
            self._next_watchdog = self.clock() + self._watchdog_s / 2

    def prune_store(self) -> None:
        if self.clock() < self._next_prune:
            return
        self._next_prune = self.clock() + PRUNE_EVERY_S
        try:
            jobs, events = self.store.prune(KEEP_HISTORY_S)
        except StoreUnavailable:
            self._next_prune = self.clock() + 600
            return
        if jobs or events:
            log.info("forgot %d finished job(s) and %d event(s) older than %d days", jobs, events,
                     KEEP_HISTORY_S // 86400)

    # --- children's lives -------------------------------------------------------------------

    def reap(self) -> None:
        for ex in self.pool.reap(self.stopping):
            if isinstance(ex.child, ForkedChild):
                for msg in ex.child.recv_all():  # what it said before it died comes first
                    self.on_message(ex.child, msg)
            ex.child.close()
            if ex.child.kind == ChildKind.LIBRARY:
                self.scans.child_gone(ex)
                continue
            if ex.job_id is not None:
                self.apply("lost", ex)
            elif ex.child.kind == ChildKind.WORKER and not ex.planned and ex.reason not in ("cancel", "reload"):
                self.apply("restarted", ex)

    def probe_web(self) -> None:
        web = self.pool.get("web")
        if web is None or web.state != ChildState.STARTING or self._web_probe_running:
            return
        if self.clock() < self._next_web_probe:
            return
        self._web_probe_running = True
        self._next_web_probe = self.clock() + WEB_PROBE_S

        def probe():
            try:
                # HTTPS trusting our own certificate when tls_cert is set; never through a proxy.
                conn = tlsconf.health_connection(self.cfg, timeout_s=1)
                try:
                    conn.request("GET", "/health")
                    ok = conn.getresponse().status == 200
                finally:
                    conn.close()
            except Exception:
                ok = False
            self._web_probe_running = False
            if ok:
                self.post("_web_ready")
            else:
                self.wake()

        threading.Thread(target=probe, name="web-health", daemon=True).start()

    def on_web_ready(self) -> None:
        web = self.pool.get("web")
        if web is None or web.state != ChildState.STARTING:
            return
        web.mark_ready()
        if not self._ready_notified:
            self._ready_notified = True
            self.announce_gui()
            sdnotify.notify("READY=1", f"STATUS=serving on {self.cfg.bind}:{self.cfg.active_port}")

    def announce_gui(self) -> None:
        from ipc.tokens import mint_token

        token = mint_token(ensure_jwt_secret(self.cfg), days=30)
        url = tlsconf.gui_url(self.cfg)
        log.info("GUI at %s", url)
        # The token rides in the fragment: browsers never send it to a server. Printed, not
        # logged: the log file must hold no secret.
        print(f"{journal_prefix(logging.INFO)}civitai-daemon: open {url}#token={token} (valid 30 days)",
              file=sys.stderr, flush=True)

    # --- messages from workers and the updater ------------------------------------------------

    def read_messages(self, child: ForkedChild) -> None:
        msgs = child.recv_all()
        # A small file's last progress comes in the same read as its `done`, which carries the
        # bytes itself: neither stored (flush_batch drops it) nor worth a live update first.
        done = {m.get("job_id") for m in msgs if isinstance(m, dict) and m.get("type") == Msg.DONE}
        for msg in msgs:
            try:
                if done and msg.get("type") == Msg.PROGRESS and msg.get("job_id") in done:
                    continue
                self.on_message(child, msg)
            except Exception:
                log.exception("bad message from %s: %r", child.name, msg)

    def on_message(self, child, msg: dict) -> None:
        kind = msg.get("type")
        if kind == Msg.READY:
            child.mark_ready()
            if child.kind == ChildKind.LIBRARY:
                self.scans.on_ready(child)
            if child.kind == ChildKind.UPDATER:
                self.updates.on_ready(child)
            if child.kind == ChildKind.WORKER:
                self.hand_owed_previews(child)
            return
        if kind == Msg.FATAL:
            child.last_error = str(msg.get("error", ""))
            return
        if child.kind == ChildKind.UPDATER:
            self.updates.on_message(msg)
            return
        if child.kind == ChildKind.LIBRARY:
            self.scans.on_message(msg)
            return
        if kind in (Msg.PREVIEW_OWED, Msg.PREVIEW_SETTLED) and isinstance(msg.get("path"), str):
            path, me = msg["path"], (child.name, child.started_mono)
            if kind == Msg.PREVIEW_OWED:
                self._owed_previews.owed(path, me)
            elif not self._owed_previews.settled(path, me, self._live_workers()):
                return  # a newer file at this path is another worker's to settle
            self.apply(kind, path)  # in the tick's transaction: an owed preview lands with its done
            return
        job_id = msg.get("job_id")
        if job_id is None or job_id not in (child.job_id, child.next_job_id):
            return  # a late message about a job taken back from this worker
        if kind == Msg.ERROR and child.kill_reason in ("timeout", "crash"):
            return  # the worker is being stopped for it; the ledger gives the real reason when it dies
        if kind == Msg.ACK:
            # The job sent ahead starts once the current one ends; both may be in one read.
            if job_id == child.job_id:
                child.acked_mono = self.clock()
            else:
                child.next_acked_mono = self.clock()
        elif kind == Msg.PROGRESS:
            self.on_progress(job_id, msg)
        elif kind in (Msg.RESOLVED, Msg.VERIFYING, Msg.DONE, Msg.ERROR, Msg.RETURNED):
            self.apply(kind, child.name, job_id, msg)

    def _live_workers(self) -> set[tuple[str, float]]:
        return {(w.name, w.started_mono) for w in self.pool.workers() if w.live and w.ready}

    def hand_owed_previews(self, child) -> None:
        """To a worker that is ready: every preview owed by no live worker, i.e. what the last
        run's workers had queued but not fetched when they stopped (at start), or what a worker
        that died owed (at its restart). They stay in the store until a worker settles them, so
        a worker that stops again first hands them on once more."""
        owed = self._owed_previews
        if not owed.loaded:
            try:
                owed.load(self.store.owed_previews())
            except StoreUnavailable as exc:  # a read: WAL lets it through another program's lock
                if self._owed_retry_at is None:
                    log.warning("the previews owed from the last run could not be read (they are kept; "
                                "tried again every %.0f s): %s", OWED_RETRY_S, exc)
                self._owed_retry_at = self.clock() + OWED_RETRY_S
            else:
                if self._owed_retry_at is not None:
                    log.info("the previews owed from the last run were read: %d", len(owed))
                self._owed_retry_at = None
        orphans, last_run = owed.hand_to((child.name, child.started_mono), self._live_workers())
        if not orphans:
            return
        log.info("%d preview(s) owed from the last run and %d by a worker that stopped: %s fetches them",
                 last_run, len(orphans) - last_run, child.name)
        child.send({"type": Msg.PREVIEWS, "paths": orphans})

    def retry_owed_previews(self) -> None:
        """The store's list of owed previews could not be read when the first worker was ready:
        read it now, and hand it to a worker that is ready."""
        if self._owed_retry_at is None or self.clock() < self._owed_retry_at:
            return
        ready = [w for w in self.pool.workers() if w.live and w.ready]
        if ready:
            self.hand_owed_previews(ready[0])
        else:  # none ready now: the next one's READY reads it
            self._owed_retry_at = None

    def latest_bytes(self, job_id: int) -> int | None:
        """The bytes a running job had at its last progress message (stored at most once a second)."""
        msg = self._progress_seen.get(job_id)
        return int(msg.get("bytes_done") or 0) if msg else None

    def on_progress(self, job_id: int, msg: dict) -> None:
        self._progress_seen[job_id] = msg
        if self.control:
            self.control.publish({"event": "download_progress", "ts": utc_now_iso(), "job_id": job_id,
                                  "bytes_done": msg.get("bytes_done"), "bytes_total": msg.get("bytes_total"),
                                  "speed_bps": msg.get("speed_bps")})
        now = self.clock()
        if self._store_problem or now - self._progress_stored.get(job_id, 0) < PROGRESS_STORE_INTERVAL_S:
            return
        self._progress_stored[job_id] = now
        self.apply("progress", job_id, msg)  # stored with the tick's other messages

    def apply(self, *item) -> None:
        """Store what a child said or what became of it, with everything else that came in this
        tick, in one transaction; kept in order and tried again later if the database cannot
        take it now (a job's last message is never dropped)."""
        self._batch.append(item)

    def flush_batch(self) -> None:
        batch, self._batch = self._batch, []
        if not batch:
            return
        ended = {item[2] for item in batch if item[0] == Msg.DONE}
        if ended:  # a small file's last progress and its `verifying` come with its `done`, which
            # stores the bytes and the state itself (downloading -> done is a transition like any)
            batch = [item for item in batch if not (item[0] == "progress" and item[1] in ended
                                                    or item[0] == Msg.VERIFYING and item[2] in ended)]
        if self.deferred:
            self.deferred.extend(batch)
            return
        try:
            with self.txn():
                for item in batch:
                    self._apply(item)
                # A worker this frees gets its next job in the same commit (one a small file, not two).
                takers = None if self._store_problem else self._takers()
                assigned = self._take_jobs(takers) if takers else []
        except StoreUnavailable:
            # Progress is only a view: never worth a retry.
            self.deferred.extend(item for item in batch if item[0] != "progress")
            return
        self._deliver(assigned)

    def retry_deferred(self) -> None:
        if self._sync_due and self.clock() >= self._store_retry_at and not self.deferred:
            why, self._sync_due = self._sync_due, None
            try:
                with self.txn():
                    self.sync_manifest(why)
            except StoreUnavailable:
                self._sync_due = why
                return
        if self.clock() < self._store_retry_at:
            return
        if self._store_problem and not self.deferred:
            try:  # nothing waits, but the trouble was seen: is the database writable again?
                with self.txn():
                    pass
            except StoreUnavailable:
                return
        while self.deferred and self.clock() >= self._store_retry_at:
            try:
                self._apply(self.deferred[0])
            except StoreUnavailable:
                return
            self.deferred.popleft()
        if not self.deferred:
            self._store_fine()

    def _apply(self, item: tuple) -> None:
        """Store one item of a tick's batch: what a child said, or what became of a child."""
        kind = item[0]
        handler = self._appliers.get(kind)
        if handler is not None:
            handler(*item[1:])
        else:  # a worker's word about a job: resolved, verifying, done, error, returned
            self._apply_job_message(*item[1:])

    def _apply_progress(self, job_id: int, msg: dict) -> None:
        self.ledger.on_progress(job_id, msg.get("bytes_done") or 0, msg.get("bytes_total"), msg.get("speed_bps") or 0)

    def _apply_emit(self, event: str, fields: dict) -> None:
        with self.txn():
            self.emit(event, **fields)

    def _apply_exit(self, ex: Exit, *, lost: bool) -> None:
        """A child is gone (`lost`: with the job it held) or was restarted."""
        with self.txn():
            if lost and ex.job_id is not None:
                outcome = self.note(self.ledger.job_lost(ex.job_id, ex.reason, ex.code, timeout_s=self.cfg.timeout,
                                                         stopping=self.stopping))
                self.after_commit(lambda: self.after_job_change(outcome))
            if ex.child.kind == ChildKind.WORKER and not ex.planned and ex.reason != "cancel":
                self.store.incr_kv("metrics.worker_restarts")
                self.emit("worker_restarted", worker=ex.child.name,
                          reason="timeout" if ex.reason == "timeout" else "crash", exitcode=ex.code)
            if lost and ex.next_job_id is not None:
                self.lost_ahead(ex)

    def _apply_job_message(self, child_name: str, job_id: int, msg: dict) -> None:
        typ = msg["type"]
        with self.txn():
            if typ == Msg.RESOLVED:
                self.ledger.on_resolved(job_id, msg)
                return
            if typ == Msg.VERIFYING:
                self.ledger.on_verifying(job_id)
                return
            if typ == Msg.DONE:
                outcome = self.note(self.ledger.on_done(job_id, msg, self._stat(msg["path"])))
                if outcome.finished and outcome.job is not None:
                    self.keeper.apply({"op": "record", "job": dict(outcome.job)})
                    log.info("job %s %s: %s (%s, %s, sha256 %s…, %s)", job_id,
                             "already present and verified" if msg.get("skipped") else "done",
                             _job_title(outcome.job), msg["path"], _size_text(int(msg.get("bytes") or 0)),
                             str(msg["sha256"])[:12], child_name)
            elif typ == Msg.RETURNED:
                outcome = self.note(self.ledger.returned(job_id))
            else:
                outcome = self.note(self.ledger.on_error(job_id, msg, stopping=self.stopping))
            self._free_worker(child_name, job_id)
            self.after_commit(lambda: self.after_job_change(outcome))

    def lost_ahead(self, ex: Exit) -> None:
        """A worker died holding a job sent ahead. Killed by us for its current job (timeout,
        cancel, shutdown), it never started the one ahead: given back. Dead of itself, it may
        have been running it (its end and the ack may not have reached us): counted as lost."""
        job_id = ex.next_job_id
        assert job_id is not None
        if ex.planned:  # a stop: as for the job it ran, the attempt is simply given back
            outcome = self.ledger.give_back(job_id)
        elif ex.reason in (KillReason.TIMEOUT, KillReason.CANCEL, KillReason.SHUTDOWN, KillReason.RELOAD):
            outcome = self.note(self.ledger.not_delivered(job_id))
        else:
            outcome = self.note(self.ledger.job_lost(job_id, ex.reason, ex.code, timeout_s=self.cfg.timeout,
                                                     stopping=self.stopping))
        self.after_commit(lambda: self.after_job_change(outcome))

    _LET_GO_FIELDS = ("job_id", "next_job_id", "assigned_mono", "acked_mono", "next_acked_mono", "release_job_by",
                      "last_job_s")

    def _free_worker(self, child_name: str, job_id: int) -> None:
        """A worker's last message about a job is being stored: the worker is free for another,
        at once, so that the same transaction can take its next job (put back as it was if the
        transaction fails: the message is then stored later, and frees it then)."""
        child = self.pool.get(child_name)
        if child is not None and job_id in (child.job_id, child.next_job_id):
            saved = {name: getattr(child, name) for name in self._LET_GO_FIELDS}

            def put_back() -> None:
                for name, value in saved.items():
                    setattr(child, name, value)

            self._undo.append(put_back)
        if child is not None and child.job_id == job_id:
            now = self.clock()
            child.last_job_s = now - child.assigned_mono
            # The job sent ahead (if any) becomes the current one: its deadlines count from now.
            child.job_id, child.next_job_id = child.next_job_id, None
            child.assigned_mono, child.acked_mono, child.next_acked_mono = now, child.next_acked_mono, None
            child.release_job_by = None
        elif child is not None and child.next_job_id == job_id:  # given back, or cancelled before it started
            child.next_job_id = child.next_acked_mono = None
            # Its current job is a slow one after all: no job goes ahead of it again (the same job
            # would come straight back, a started/retry pair a second) until it ends.
            child.last_job_s = None

        def forget_progress():
            self._progress_stored.pop(job_id, None)
            self._progress_seen.pop(job_id, None)

        self.after_commit(forget_progress)

    def _stat(self, rel: str) -> tuple[int, int] | None:
        try:
            st = os.stat(self.cfg.download_path / rel)
        except OSError:
            log.warning("finished file %s is not there any more", rel)
            return None
        return st.st_size, st.st_mtime_ns

    def after_job_change(self, outcome: Outcome) -> None:
        """File work a committed job change asks for (outside the transaction)."""
        if outcome.remove_partial and outcome.job is not None:
            self.remove_partial(outcome.job)

    def remove_partial(self, job: dict) -> None:
        if not job.get("model_type") or not job.get("filename"):
            return
        folder = self.cfg.download_path / job["model_type"]
        for name in (part_filename(job["filename"]), part_filename(job["filename"]) + ".json"):
            try:
                os.unlink(folder / name)
            except OSError:
                pass

    def tell_holder(self, job_id: int, why: str) -> None:
        """A cancel or a pause of a running job: its worker stops within RELEASE_GRACE_S or is stopped."""
        holder = self.pool.holder(job_id)
        if holder is not None:
            holder.send({"type": Msg.CANCEL, "job_id": job_id})
            if holder.job_id == job_id:  # a job sent ahead and not started is given back at once
                holder.release_job_by = self.clock() + RELEASE_GRACE_S

    # --- the manifest -----------------------------------------------------------------------------

    def poll_manifest(self) -> None:
        if self.clock() < self._next_manifest_poll:
            return
        busy = bool(self.ledger.active) or self.scans.running
        self._next_manifest_poll = self.clock() + (MANIFEST_POLL_S if busy else MANIFEST_POLL_IDLE_S)
        result = self.keeper.poll()
        if result == "invalid":
            log.error("manifest edit not taken: %s (the last good manifest stays in force)", self.keeper.error)
            self.emit_now("manifest_error", error=self.keeper.error)
        elif result == "changed":
            log.info("manifest.json changed: %d entries", len(self.keeper.entries))
            try:
                with self.txn():
                    self.sync_manifest("edit")
            except StoreUnavailable:
                self._sync_due = "edit"

    def sync_manifest(self, why: str) -> None:
        """Queue every entry whose file is missing (call inside a transaction)."""
        events, _ = self.keeper.sync(self.ledger, why)
        self._events.extend(events)

    def flush_manifest(self) -> None:
        if self.keeper.dirty:
            try:
                self.keeper.flush()
            except OSError as exc:
                log.warning("manifest.json could not be written (%s); trying again", exc)
            except StoreUnavailable as exc:
                # The file is written; only forgetting the pending changes must wait (applying
                # them again after a crash is harmless: each is idempotent).
                self._store_trouble(str(exc))
        self.updates.send_entries()

    # --- dispatch -------------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Jobs for the workers that can take one (idle, or quick enough for one ahead)."""
        takers = None if self._store_problem or self.deferred else self._takers()
        if takers is None:
            return  # nothing to do: no transaction
        try:
            with self.txn():
                assigned = self._take_jobs(takers)
        except StoreUnavailable:
            return
        self._deliver(assigned)

    def _takers(self) -> tuple[list, list] | None:
        """(idle workers, workers that get a job ahead), or None when no job can be taken now."""
        if self.stopping or not self.ledger.has_ready():
            return None
        idle = self.pool.idle_workers()
        ahead = [] if self.ledger.paused_all else self.pool.ahead_workers()
        return (idle, ahead) if idle or ahead else None

    def _take_jobs(self, takers: tuple[list, list]) -> list[tuple]:
        """Inside a transaction: the attempts of the jobs `takers` (from `_takers`) get, persisted
        before anything is sent. Returns (worker, job) pairs for `_deliver`."""
        idle, ahead = takers
        # Every idle worker first, then one job ahead for each worker that gets one (an idle one
        # may get its current job and the one ahead in this same take).
        by_name = {c.name: c for c in (*idle, *ahead)}
        assigned = self.ledger.take([c.name for c in idle] + [c.name for c in ahead])
        for _, _, outcome in assigned:
            self.note(outcome)
        return [(by_name[name], job) for name, job, _ in assigned]

    def _deliver(self, assigned: list[tuple]) -> None:
        """After the commit: each job to its worker."""
        now = self.clock()
        for worker, job in assigned:
            spec = {"job_id": job["id"], "model_id": job["model_id"], "version_id": job["version_id"],
                    "file_id": job["file_id"], "model_type": job["model_type"], "filename": job["filename"],
                    "sha256": job["sha256"], "attempt": job["attempts"], "file_type": job.get("file_type"),
                    "format": job.get("format"), "fp": job.get("fp")}
            sent_ahead = worker.job_id is not None
            if sent_ahead:
                worker.next_job_id, worker.next_acked_mono = job["id"], None
            else:
                worker.job_id, worker.assigned_mono, worker.acked_mono = job["id"], now, None
            if not worker.send({"type": Msg.JOB, "job": spec}):
                if sent_ahead:
                    worker.next_job_id = None
                else:
                    worker.job_id = None
                try:
                    with self.txn():
                        self.note(self.ledger.not_delivered(job["id"]))
                except StoreUnavailable:
                    pass  # recovered as a lost job when the worker is reaped, or at the next start
                continue
            log.debug("job %s -> %s (attempt %s/%s)", job["id"], worker.name, job["attempts"], job["max_attempts"])

    # --- control socket ---------------------------------------------------------------------------

    def handle_control(self, op: str, args: dict):
        """Runs on a control thread: hand the op to the main loop and wait for its answer."""
        future: Future = Future()
        self.inbox.put((op, args, future))
        self.wake()
        try:
            return future.result(timeout=3 if op == "health" else 10)
        except TimeoutError:
            raise ControlError(503, "the supervisor is busy; try again") from None

    def handle_inbox(self) -> None:
        while True:
            try:
                op, args, future = self.inbox.get_nowait()
            except queue.Empty:
                return
            if op == "_web_ready":
                self.on_web_ready()
                continue
            if op == "_child_ready":
                child = self.pool.get(args["child"])
                if child is not None and child.pid == args["pid"]:
                    child.mark_ready()
                continue
            try:
                result = self.ops.handle(op, args)
            except ControlError as exc:
                future.set_exception(exc)
            except Exception as exc:
                log.exception("control op %s failed", op)
                future.set_exception(exc)
            else:
                future.set_result(result)

    # --- SIGHUP -----------------------------------------------------------------------------------

    def reload_config(self) -> None:
        """Re-read config.json: what can change live changes; what needs a restart is named."""
        try:
            new, warnings = load_config(self.cfg.config_path)
        except ConfigError as exc:
            log.error("config.json not reloaded: %s (the running config stays)", exc)
            return
        for warning in warnings:
            log.warning("%s", warning)
        live, restart = config_changes(self.cfg, new)
        if restart:
            log.warning("config.json: %s only change(s) at the next start", ", ".join(restart))
            new = dataclasses.replace(new, **{k: getattr(self.cfg, k) for k in restart})
        if not live:
            log.info("config.json reloaded: nothing to change live")
            return
        if "notify" in live:
            try:  # a URL added now is sent what happens from now on (ipc/notify.py)
                notify.prepare_sinks(self.store, new.notify)
            except StoreUnavailable as exc:
                log.warning("notify: the new URLs start when the webhook process does (%s)", exc)
        old, self.cfg = self.cfg, new
        self.ledger.max_attempts = new.max_attempts
        self.keeper.mode = new.manifest_mode
        for child in self.pool:
            if child.kind in (ChildKind.WORKER, ChildKind.UPDATER):
                child.send({"type": Msg.CONFIG, "config": new})
        web_keys = {"allowed_hosts", "civitai_api_key", "jwt_secret", "layout", "folders"}
        for child in self.pool:
            if (child.kind == ChildKind.WEB and web_keys & set(live)) or (
                    child.kind == ChildKind.WEBHOOKS
                    and {"webhook_url", "webhook_secret", "notify", "notify_events"} & set(live)):
                child.terminate(KillReason.RELOAD, self.clock())  # restarted at once with the new config
        if (new.webhook_url or new.notify) and self.pool.get("webhooks") is None:
            self.pool.add(self._fresh_child("webhooks", ChildKind.WEBHOOKS)).spawn(self.clock())
        log.info("config.json reloaded: %s changed", ", ".join(live))
        if {"max_speed", "speed_schedule"} & set(live):
            self.speed.apply()
        del old


def _job_title(job: dict) -> str:
    """A model as people know it: "Zxq Ink Style v2", else its ids."""
    name = job.get("model_name") or f"model {job.get('model_id') or '?'}"
    version = job.get("version_name") or (f"version {job['version_id']}" if job.get("version_id") else "")
    return f"{name} {version}".strip()


def _size_text(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n} B"


# --- command line ---------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="supervisor.py", description="Civitai download daemon")
    parser.add_argument("--config", default="config.json", help="path to config.json (default: ./config.json)")
    parser.add_argument("--version", action="version", version=f"civitai-daemon {VERSION}")
    sub = parser.add_subparsers(dest="command")
    token = sub.add_parser("token", help="print a JWT for the API, signed with the configured secret")
    token.add_argument("--days", type=float, default=30, help="validity in days (default 30)")
    token.add_argument("--config", dest="sub_config", default=None)
    check = sub.add_parser("check", help="validate config.json and manifest.json; exit 0 or 78")
    check.add_argument("--config", dest="sub_config", default=None)
    add = sub.add_parser("add", help="queue a model in the running daemon, as the GUI's \"Add a model\" does")
    add.add_argument("model", help="a model id, v:<version id>, or a civitai.com / civitai.red link")
    add.add_argument("--folder", default=None, help="the folder under download_dir (default: the layout's)")
    add.add_argument("--priority", type=int, default=None, help="1 is the most urgent (default 10)")
    add.add_argument("--config", dest="sub_config", default=None)
    imp = sub.add_parser("import", help="adopt the model files already under download_dir (or FOLDER inside it)")
    imp.add_argument("folder", nargs="?", default=None, help="a folder inside download_dir (default: all of it)")
    imp.add_argument("--dry-run", action="store_true", help="show what would be added; change nothing")
    imp.add_argument("--config", dest="sub_config", default=None)
    status = sub.add_parser("status", help="what the running daemon is doing: children, jobs, speed, updater")
    status.add_argument("--config", dest="sub_config", default=None)
    notify_test = sub.add_parser("notify-test", help="send a test notification to every URL of 'notify'")
    notify_test.add_argument("--config", dest="sub_config", default=None)
    args = parser.parse_args(argv)
    if getattr(args, "sub_config", None):
        args.config = args.sub_config
    return args


def load_all(config_path: str) -> tuple[Config, list[str], ManifestFile]:
    cfg, warnings = load_config(config_path)
    manifest = ManifestFile(cfg.manifest_path, cfg.locks_dir / "manifest.lock")
    manifest.load()
    return cfg, warnings, manifest


def cmd_check(config_path: str) -> int:
    try:
        cfg, warnings, manifest = load_all(config_path)
    except (ConfigError, ManifestError) as exc:
        print(exc, file=sys.stderr)
        return EX_CONFIG
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for index, first in duplicate_entries(manifest.entries):
        print(f"note: {cfg.manifest_path}: entry {index} (modelId {manifest.entries[index]['modelId']}) names the "
              f"same file as entry {first}; they count as one", file=sys.stderr)
    print(f"{cfg.config_path}: ok; {cfg.manifest_path}: ok ({len(manifest.entries)} entries)")
    return 0


def cmd_token(config_path: str, days: float) -> int:
    from ipc.tokens import mint_token

    try:
        cfg, _ = load_config(config_path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EX_CONFIG
    if days <= 0:
        print("--days must be more than 0", file=sys.stderr)
        return 2
    print(mint_token(ensure_jwt_secret(cfg), days=days))
    return 0


def cmd_run(config_path: str) -> int:
    try:
        cfg, warnings, manifest = load_all(config_path)
    except (ConfigError, ManifestError) as exc:
        print(exc, file=sys.stderr)
        return EX_CONFIG
    lock = PidLock(cfg.data_dir / "daemon.pid")
    try:
        holder = lock.acquire()
    except OSError as exc:
        print(f"civitai-daemon: cannot use the data folder {cfg.data_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if holder is not None:
        print(f"civitai-daemon: another daemon (pid {holder if holder > 0 else 'unknown'}) is already running on "
              f"{cfg.data_dir} (or an import without a daemon); stop it first, or give this one its own folder "
              "(--config elsewhere)", file=sys.stderr)
        return 1
    if sys.platform != "win32" and os.environ.get("CIVITAI_DAEMON_START_METHOD", "fork") == "fork":
        # multiprocessing-logging needs fork; the web process is a fresh interpreter anyway.
        multiprocessing.set_start_method("fork", force=True)
    else:
        multiprocessing.set_start_method("spawn", force=True)
    setup_supervisor_logging(cfg.log_path, secrets=(cfg.civitai_api_key, cfg.jwt_secret, cfg.webhook_secret,
                                                    *cfg.notify))
    for warning in warnings:
        log.warning("%s", warning)
    ensure_jwt_secret(cfg)
    try:
        supervisor = Supervisor(cfg, manifest)
    except StoreOpenError as exc:
        log.critical("%s", exc)
        print(f"civitai-daemon: {exc}", file=sys.stderr)
        return 1
    except StoreUnavailable as exc:
        log.critical("%s", exc)
        print(f"civitai-daemon: {exc}; stop the other program or try again", file=sys.stderr)
        return 1
    listener = None
    if not supervisor.fork and supervisor.log_queue is not None:
        import logging.handlers

        listener = logging.handlers.QueueListener(supervisor.log_queue, *logging.getLogger().handlers,
                                                  respect_handler_level=True)
        listener.start()
    log.info("civitai-daemon %s starting: %d worker(s), downloads in %s", VERSION, cfg.workers, cfg.download_path)
    try:
        return supervisor.run()
    except Exception:
        log.exception("fatal error")
        return 1
    finally:
        if listener is not None:
            listener.stop()
        lock.release()


def cmd_client(args) -> int:
    """`add` and `status`: through the running daemon's API."""
    from ipc import cli

    try:
        cfg, _ = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EX_CONFIG
    try:
        if args.command == "add":
            return cli.cmd_add(cfg, args.model, args.folder, args.priority)
        return cli.cmd_status(cfg)
    except cli.CliError as exc:
        print(f"civitai-daemon: {exc}", file=sys.stderr)
        return 1


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "check":
        return cmd_check(args.config)
    if args.command == "token":
        return cmd_token(args.config, args.days)
    if args.command in ("add", "status"):
        return cmd_client(args)
    if args.command == "notify-test":  # Apprise right here: no daemon needed
        return notify.cmd_notify_test(args.config, sys.stdout, sys.stderr)
    if args.command == "import":
        from ipc.cli import cmd_import
        from workers.library import import_here

        return cmd_import(args.config, args.folder, args.dry_run, run_here=import_here)
    return cmd_run(args.config)


if __name__ == "__main__":
    sys.exit(main())
