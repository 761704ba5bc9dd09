"""The supervisor: the main loop that owns job states and the manifest, runs the children
(download workers, the updater, the web process), enforces timeouts and shuts down cleanly.

One loop, as in gunicorn's arbiter: signal handlers only queue the signal; each tick reads the
children's messages, reaps, restarts, kills stuck workers, dispatches jobs and polls the
manifest. Every step is safe to run again.
"""
from __future__ import annotations

import argparse
import collections
import http.client
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from ipc import VERSION, sdnotify
from ipc.config import EX_CONFIG, Config, ConfigError, ensure_jwt_secret, load_config
from ipc.control import ENV_ADDR, ENV_TOKEN, ControlError, ControlServer
from ipc.logsetup import child_log_handler, setup_supervisor_logging
from ipc.manifest import ManifestError, ManifestFile, entry_priority, validate_entry
from ipc.naming import part_filename
from ipc.states import ACTIVE_STATES, ChildState, JobState
from ipc.store import JobStore, public_job, utc_now_iso

REPO_DIR = Path(__file__).resolve().parent
log = logging.getLogger("supervisor")

TICK_S = 0.25
KILL_GRACE_S = 5.0
SHUTDOWN_BUDGET_S = 18.0  # under the 20 s the contract promises
CANCEL_GRACE_S = 2.0
ACK_DEADLINE_S = 30.0  # a job sent to a worker that never acknowledges it is taken back
BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 60.0
HEALTHY_RESET_S = 600.0
BOOT_FAILURE_LIMIT = 5
BOOT_FAILURE_WINDOW_S = 60.0
PROGRESS_STORE_INTERVAL_S = 1.0
# Manifest fields that describe one version's file: an update replaces them all together.
VERSION_FIELDS = ("modelVersionId", "fileId", "sha256", "url", "filename", "updatedAt")
BOOT_DEADLINE_S = 60.0  # a child that has not said it is ready by then is killed as a boot failure
READY_LINE = "@ready"  # what a fresh interpreter prints on stderr once it has booted
# Children that run as fresh interpreters (`python -m MODULE --config PATH`), never forked.
FRESH_INTERPRETERS = {"web": "web", "webhooks": "workers.webhooks"}
MANIFEST_POLL_S = 1.0
PRUNE_EVERY_S = 86400.0
KEEP_HISTORY_S = 30 * 86400  # finished jobs and delivered events are kept this long


class Fatal(Exception):
    """The daemon cannot go on; the message is the cause."""


@dataclass
class Child:
    name: str
    kind: str  # worker | updater | web
    state: ChildState = ChildState.STOPPED
    proc: object = None  # multiprocessing.Process or subprocess.Popen
    conn: object = None  # supervisor's end of the Pipe (not for web)
    pid: int | None = None
    started_mono: float = 0.0
    ready: bool = False
    since: str = ""
    job_id: int | None = None
    assigned_mono: float = 0.0
    acked_mono: float | None = None
    term_sent_mono: float | None = None
    kill_reason: str | None = None  # timeout | cancel | shutdown
    restarts: int = 0
    consecutive_failures: int = 0
    restart_at_mono: float = 0.0
    boot_failures: collections.deque = field(default_factory=lambda: collections.deque(maxlen=BOOT_FAILURE_LIMIT))
    last_error: str = ""
    stderr_tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=20))
    log_handler: object = None  # this child's own multiprocessing-logging queue (fork only)

    def public(self) -> dict:
        return {"name": self.name, "kind": self.kind, "pid": self.pid, "state": str(self.state),
                "job_id": self.job_id, "restarts": self.restarts, "since": self.since}


def _child_entry(target, name, conn, config_path, log_queue, inherited_fds=()):
    """Runs in the child: drop what fork copied of the supervisor's own pipes and sockets (a
    copy held here would hide a sibling's or the supervisor's death from the other end), then
    run, reporting a crash at boot through the pipe so the supervisor can name it."""
    for fd in inherited_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    try:
        target(name, conn, config_path, log_queue)
    except BaseException as exc:
        if isinstance(exc, SystemExit) and not exc.code:
            raise
        logging.getLogger(name).exception("%s crashed", name)
        try:
            conn.send({"type": "fatal", "error": f"{type(exc).__name__}: {exc}"})
        except Exception:
            pass
        raise


class Supervisor:
    def __init__(self, cfg: Config, manifest: ManifestFile, clock=time.monotonic):
        self.cfg = cfg
        self.manifest = manifest
        self.clock = clock
        self.store = JobStore(cfg.db_path)
        self.ctx = multiprocessing.get_context()
        self.fork = self.ctx.get_start_method() == "fork"
        self.log_queue = None if self.fork else self.ctx.Queue()
        self.children: dict[str, Child] = {}
        for i in range(cfg.workers):
            self.children[f"worker-{i + 1}"] = Child(f"worker-{i + 1}", "worker")
        self.children["updater"] = Child("updater", "updater")
        self.children["web"] = Child("web", "web")
        if cfg.webhook_url:
            self.children["webhooks"] = Child("webhooks", "webhooks")
        self.inbox: queue.Queue = queue.Queue()
        self._wake_r, self._wake_w = multiprocessing.Pipe(duplex=False)
        self._signals: queue.Queue = queue.Queue()
        self.stopping = False
        self.stop_deadline = 0.0
        self.exit_code = 0
        self.started_wall = time.time()
        self.started_iso = utc_now_iso()
        self.control_token = secrets.token_hex(32)
        self.control: ControlServer | None = None
        self._progress_stored: dict[int, float] = {}
        self.pending_updates: dict[int, dict] = {}  # model id -> update_found not yet in the manifest
        self._cancel_deadline: dict[int, float] = {}
        self._next_manifest_poll = 0.0
        self._next_prune = 0.0
        self._ready_notified = False
        self._watchdog_s = sdnotify.watchdog_interval_s()
        self._next_watchdog = 0.0
        self._health_checking = False
        self.updater_info = {"last_check": None, "last_success": None, "next_check": None, "running": False}
        self._load_updater_info()

    # --- events ---------------------------------------------------------------------------

    def emit(self, name: str, **fields) -> dict:
        event = self.store.add_event(name, fields)
        if self.control:
            self.control.publish(event)
        return event

    def publish_progress(self, job_id, bytes_done, bytes_total, speed_bps) -> None:
        if self.control:
            self.control.publish({"event": "download_progress", "ts": utc_now_iso(), "job_id": job_id,
                                  "bytes_done": bytes_done, "bytes_total": bytes_total, "speed_bps": speed_bps})

    # --- start and stop -------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def handler(signum, frame):
            self._signals.put(signum)
            self.wake()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        if hasattr(signal, "SIGBREAK"):  # Windows console Ctrl-Break
            signal.signal(signal.SIGBREAK, handler)

    def wake(self) -> None:
        try:
            self._wake_w.send_bytes(b"!")
        except OSError:
            pass

    def run(self) -> int:
        self.install_signal_handlers()
        recovered = self.store.recover_unfinished()
        if recovered:
            log.info("recovered %d unfinished job(s) from the last run: %s", len(recovered),
                     ", ".join(str(j["id"]) for j in recovered))
        if not self.cfg.webhook_url:
            # Nothing is owed without a receiver: a webhook_url set later must not get the history.
            self.store.mark_all_delivered()
        self.control = ControlServer(self.control_token, self.handle_control).start()
        self.emit("daemon_started", version=VERSION)
        self.sync_manifest("start")
        for child in self.children.values():
            self.spawn(child)
        try:
            while True:
                self.tick()
                if self.stopping and self.all_stopped():
                    break
                if self.stopping and self.clock() > self.stop_deadline:
                    log.warning("children did not stop in time; killing them")
                    for child in self.children.values():
                        self.kill_child(child)
                    break
        except Fatal as exc:
            log.critical("stopping: %s", exc)
            print(f"civitai-daemon: {exc}", file=sys.stderr)
            self.exit_code = 1
            self.begin_stop()
            deadline = self.clock() + 10
            while not self.all_stopped() and self.clock() < deadline:
                self.tick(raise_fatal=False)
            for child in self.children.values():
                self.kill_child(child)
        finally:
            self.finish_stop()
        return self.exit_code

    def begin_stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.stop_deadline = self.clock() + SHUTDOWN_BUDGET_S
        sdnotify.notify("STOPPING=1", "STATUS=draining")
        log.info("stopping: no new jobs; running downloads keep their partial files")
        self.emit("daemon_stopping", version=VERSION)
        for child in self.children.values():
            self.stop_child(child)

    def finish_stop(self) -> None:
        for job in self.store.active_jobs():
            if job["state"] != JobState.QUEUED:
                # A clean stop is not the job's fault: give the attempt back.
                self.store.update_job(job["id"], state=JobState.QUEUED, speed_bps=0,
                                      attempts=max(0, job["attempts"] - 1))
        if not self.cfg.webhook_url:
            self.store.mark_all_delivered()
        if self.control:
            self.control.close()
        log.info("stopped")

    def all_stopped(self) -> bool:
        return all(c.state in (ChildState.STOPPED, ChildState.FATAL) for c in self.children.values())

    # --- children -------------------------------------------------------------------------

    def spawn(self, child: Child) -> None:
        child.ready = False
        child.job_id = None
        child.acked_mono = None
        child.term_sent_mono = None
        child.kill_reason = None
        child.started_mono = self.clock()
        child.since = utc_now_iso()
        if child.kind in FRESH_INTERPRETERS:
            self._spawn_fresh(child)
        else:
            parent_conn, child_conn = self.ctx.Pipe(duplex=True)
            if child.kind == "worker":
                from workers.worker import worker_main as target
            else:
                from workers.updater import updater_main as target
            log_channel = self.log_queue
            if self.fork:
                self.close_log_handler(child)
                child.log_handler = log_channel = child_log_handler(child.name)
            proc = self.ctx.Process(
                target=_child_entry, name=child.name,
                args=(target, child.name, child_conn, str(self.cfg.config_path), log_channel,
                      self.supervisor_fds() if self.fork else ()),
                daemon=False,
            )
            proc.start()
            child_conn.close()
            child.proc, child.conn, child.pid = proc, parent_conn, proc.pid
        child.state = ChildState.STARTING
        log.info("started %s (pid %s)", child.name, child.pid)

    def supervisor_fds(self) -> list[int]:
        """File descriptors a forked child must not keep: other children's pipes, the web
        process's stdin/stderr pipes, the control socket and the wake pipe."""
        fds = [self._wake_r.fileno(), self._wake_w.fileno()]
        if self.control is not None:
            fds.append(self.control.fileno())
        for other in self.children.values():
            if other.conn is not None:
                fds.append(other.conn.fileno())
            if other.kind in FRESH_INTERPRETERS and other.proc is not None:
                for pipe in (other.proc.stdin, other.proc.stderr):
                    if pipe is not None:
                        fds.append(pipe.fileno())
        return fds

    def close_log_handler(self, child: Child) -> None:
        """Stop the thread that wrote a dead child's records (after it drained them)."""
        handler, child.log_handler = child.log_handler, None
        if handler is None:
            return
        try:
            # Our copy of the write end: without it, a record the child was killed in the middle
            # of writing ends in EOF for the reading thread instead of a wait for ever.
            handler.queue._writer.close()
        except (AttributeError, OSError):
            pass
        threading.Thread(target=handler.close, name=f"{child.name}-log-close", daemon=True).start()

    def _spawn_fresh(self, child: Child) -> None:
        """The web and webhook processes: fresh interpreters, never forked from us."""
        env = dict(os.environ)
        env[ENV_ADDR] = self.control.address
        env[ENV_TOKEN] = self.control_token
        env["PYTHONUNBUFFERED"] = "1"
        kwargs = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            # Its own process group: Ctrl-C in a terminal reaches only us, and we stop it in order.
            kwargs["start_new_session"] = True
        proc = subprocess.Popen(
            [sys.executable, "-m", FRESH_INTERPRETERS[child.kind], "--config", str(self.cfg.config_path)],
            cwd=str(REPO_DIR), env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, **kwargs,
        )
        child.proc, child.conn, child.pid = proc, None, proc.pid
        threading.Thread(target=self._relay_stderr, args=(child, proc), name=f"{child.name}-stderr",
                         daemon=True).start()

    def _relay_stderr(self, child: Child, proc) -> None:
        """A fresh interpreter's stderr into our log (the one writer of the log file)."""
        child_log = logging.getLogger(child.name)
        for raw in proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            if line == READY_LINE:
                self.inbox.put(("_child_ready", {"pid": proc.pid, "name": child.name}, None))
                self.wake()
            elif line:
                child.stderr_tail.append(line)
                child_log.info("%s", line)

    def child_alive(self, child: Child) -> bool:
        if child.proc is None:
            return False
        if child.kind in FRESH_INTERPRETERS:
            return child.proc.poll() is None
        return child.proc.is_alive()

    def child_exitcode(self, child: Child):
        if child.kind in FRESH_INTERPRETERS:
            return child.proc.poll()
        return child.proc.exitcode

    def stop_child(self, child: Child) -> None:
        """Polite: idle workers exit on the sentinel; never SIGKILL a worker waiting for work."""
        if child.state in (ChildState.STOPPED, ChildState.FATAL):
            return
        if child.state == ChildState.BACKOFF or child.proc is None:
            child.state = ChildState.STOPPED
            return
        child.state = ChildState.STOPPING
        if child.kind in FRESH_INTERPRETERS:
            self.terminate(child, "shutdown")
        else:
            self.send(child, {"type": "stop"})

    def terminate(self, child: Child, reason: str) -> None:
        if child.term_sent_mono is not None or child.proc is None:
            return
        child.kill_reason = child.kill_reason or reason
        child.term_sent_mono = self.clock()
        try:
            child.proc.terminate()
        except (OSError, ProcessLookupError):
            pass

    def kill_child(self, child: Child) -> None:
        if child.proc is not None and self.child_alive(child):
            try:
                child.proc.kill()
            except (OSError, ProcessLookupError):
                pass
        if child.proc is not None and child.kind not in FRESH_INTERPRETERS:
            child.proc.join(1)
        child.state = ChildState.STOPPED

    def send(self, child: Child, msg: dict) -> bool:
        if child.conn is None:
            return False
        try:
            child.conn.send(msg)
            return True
        except (OSError, EOFError, BrokenPipeError, ValueError):
            return False

    def reap(self, raise_fatal: bool = True) -> None:
        now = self.clock()
        for child in self.children.values():
            if child.proc is None or child.state in (ChildState.STOPPED, ChildState.FATAL, ChildState.BACKOFF):
                continue
            if self.child_alive(child):
                continue
            self.drain_messages(child)
            code = self.child_exitcode(child)
            if child.kind not in FRESH_INTERPRETERS:
                child.proc.join(0.1)
            if child.conn is not None:
                child.conn.close()
                child.conn = None
            was_state, reason = child.state, child.kill_reason
            self.job_lost(child, code)
            child.proc = None
            self.close_log_handler(child)
            child.pid = None
            if self.stopping or was_state == ChildState.STOPPING:
                child.state = ChildState.STOPPED
                continue
            reason = reason or "crash"
            child.restarts += 1
            if child.kind == "worker" and reason != "cancel":
                self.store.incr_kv("metrics.worker_restarts")
            if now - child.started_mono >= HEALTHY_RESET_S:
                child.consecutive_failures = 0
            if reason != "cancel":  # stopped for a user's cancel: not the child's failure
                child.consecutive_failures += 1
            if not child.ready and reason == "crash":
                child.boot_failures.append(now)
                if (len(child.boot_failures) == BOOT_FAILURE_LIMIT
                        and now - child.boot_failures[0] <= BOOT_FAILURE_WINDOW_S):
                    child.state = ChildState.FATAL
                    cause = child.last_error or (child.stderr_tail[-1] if child.stderr_tail else f"exit code {code}")
                    message = (f"{child.name} failed to start {BOOT_FAILURE_LIMIT} times in "
                               f"{int(BOOT_FAILURE_WINDOW_S)} s; last cause: {cause}")
                    if raise_fatal:
                        raise Fatal(message)
                    continue
            delay = 0.0 if reason in ("timeout", "cancel") else min(
                BACKOFF_MAX_S, BACKOFF_START_S * 2 ** (child.consecutive_failures - 1))
            child.state = ChildState.BACKOFF
            child.restart_at_mono = now + delay
            log.warning("%s exited (code %s, %s); restarting in %.0f s", child.name, code, reason, delay)
            if child.kind == "worker" and reason != "cancel":
                self.emit("worker_restarted", worker=child.name, reason=reason if reason == "timeout" else "crash",
                          exitcode=code)

    def restart_due(self) -> None:
        if self.stopping:
            return
        now = self.clock()
        for child in self.children.values():
            if child.state == ChildState.BACKOFF and now >= child.restart_at_mono:
                self.spawn(child)

    def job_lost(self, child: Child, exitcode) -> None:
        """The child died holding a job: put it back while attempts remain."""
        job_id, child.job_id = child.job_id, None
        if job_id is None:
            return
        job = self.store.get_job(job_id)
        if job is None or job["state"] not in (JobState.DOWNLOADING, JobState.VERIFYING):
            return
        if child.kill_reason == "timeout":
            error = (f"the download took longer than timeout = {self.cfg.timeout:g} s; "
                     "raise `timeout` in config.json for large files on slow lines")
            reason = "timeout"
        elif child.kill_reason == "shutdown" or self.stopping:
            self.store.update_job(job_id, state=JobState.QUEUED, speed_bps=0,
                                  attempts=max(0, job["attempts"] - 1))
            return
        else:
            error = f"the download worker died (exit code {exitcode})"
            reason = "crash"
        self.retry_or_fail(job, error, reason, retryable=True, retry_after_s=None)

    # --- the loop -------------------------------------------------------------------------

    def tick(self, raise_fatal: bool = True) -> None:
        waitables = [self._wake_r]
        for child in self.children.values():
            if child.conn is not None:
                waitables.append(child.conn)
            if child.proc is not None and child.kind not in FRESH_INTERPRETERS:
                waitables.append(child.proc.sentinel)
        timeout = TICK_S
        try:
            ready = multiprocessing.connection.wait(waitables, timeout=timeout)
        except InterruptedError:
            ready = []
        if self._wake_r in ready:
            while self._wake_r.poll():
                self._wake_r.recv_bytes()
        for child in list(self.children.values()):
            if child.conn is not None and child.conn in ready:
                self.drain_messages(child)
        self.handle_signals()
        self.handle_inbox()
        self.reap(raise_fatal)
        self.restart_due()
        self.enforce_timeouts()
        self.check_web_ready()
        if not self.stopping:
            self.dispatch()
            self.poll_manifest()
            self.prune_store()
        self.heartbeat()

    def prune_store(self) -> None:
        if self.clock() < self._next_prune:
            return
        self._next_prune = self.clock() + PRUNE_EVERY_S
        jobs, events = self.store.prune(KEEP_HISTORY_S)
        if jobs or events:
            log.info("forgot %d finished job(s) and %d event(s) older than %d days", jobs, events,
                     KEEP_HISTORY_S // 86400)

    def handle_signals(self) -> None:
        while True:
            try:
                signum = self._signals.get_nowait()
            except queue.Empty:
                return
            log.info("received %s", signal.Signals(signum).name)
            self.begin_stop()

    def heartbeat(self) -> None:
        if self._watchdog_s and self.clock() >= self._next_watchdog:
            sdnotify.notify("WATCHDOG=1")
            self._next_watchdog = self.clock() + self._watchdog_s / 2

    def check_web_ready(self) -> None:
        web = self.children["web"]
        if web.state != ChildState.STARTING or self._health_checking:
            return
        self._health_checking = True

        def probe():
            try:
                host = "127.0.0.1" if self.cfg.bind in ("0.0.0.0", "::", "localhost") else self.cfg.bind
                if ":" in host:
                    host = f"[{host}]"
                # http.client, not urllib: an http_proxy in the environment must not see this.
                conn = http.client.HTTPConnection(host.strip("[]"), self.cfg.active_port, timeout=1)
                try:
                    conn.request("GET", "/health")
                    ok = conn.getresponse().status == 200
                finally:
                    conn.close()
            except Exception:
                ok = False
            self._health_checking = False
            if ok:
                self.inbox.put(("_web_ready", {}, None))
                self.wake()

        threading.Thread(target=probe, name="web-health", daemon=True).start()

    def on_web_ready(self) -> None:
        web = self.children["web"]
        if web.state != ChildState.STARTING:
            return
        web.state, web.ready = ChildState.RUNNING, True
        if not self._ready_notified:
            self._ready_notified = True
            self.announce_gui()
            sdnotify.notify("READY=1", f"STATUS=serving on {self.cfg.bind}:{self.cfg.active_port}")

    def announce_gui(self) -> None:
        from ipc.tokens import mint_token

        secret = ensure_jwt_secret(self.cfg)
        token = mint_token(secret, days=30)
        host = "127.0.0.1" if self.cfg.bind in ("0.0.0.0", "::") else self.cfg.bind
        url = f"http://{host}:{self.cfg.active_port}/gui"
        log.info("GUI at %s", url)
        # The token rides in the fragment: browsers never send it to a server. Printed, not
        # logged: the log file must hold no secret.
        print(f"civitai-daemon: open {url}#token={token} (valid 30 days)", file=sys.stderr, flush=True)

    # --- messages from workers and the updater ------------------------------------------

    def drain_messages(self, child: Child) -> None:
        while child.conn is not None:
            try:
                if not child.conn.poll():
                    return
                msg = child.conn.recv()
            except (EOFError, OSError):
                child.conn.close()
                child.conn = None
                return
            try:
                self.on_message(child, msg)
            except Exception:
                log.exception("bad message from %s: %r", child.name, msg)

    def on_message(self, child: Child, msg: dict) -> None:
        kind = msg.get("type")
        if kind == "ready":
            child.ready = True
            if child.state == ChildState.STARTING:
                child.state = ChildState.RUNNING
            child.boot_failures.clear()
            if child.kind == "updater":
                self.updater_info["running"] = False  # a check cut short by its death is over
                # The updater must not open SQLite itself (forked while our threads use it: a
                # mutex inherited locked deadlocks it), so it gets the last check's time here.
                self.send(child, {"type": "manifest", "entries": self.manifest.entries,
                                  "last_success_ts": self.store.get_kv("updater.last_success_ts")})
            return
        if kind == "fatal":
            child.last_error = str(msg.get("error", ""))
            return
        if child.kind == "updater":
            self.on_updater_message(child, msg)
            return
        job_id = msg.get("job_id")
        if job_id is None or job_id != child.job_id:
            return  # late message about a job taken back from this worker
        if kind == "error" and child.kill_reason in ("timeout", "crash"):
            return  # the worker is being stopped for it; job_lost() gives the real reason
        if kind == "ack":
            child.acked_mono = self.clock()
        elif kind == "resolved":
            self.on_resolved(job_id, msg)
        elif kind == "progress":
            self.on_progress(job_id, msg)
        elif kind == "verifying":
            job = self.store.get_job(job_id)
            if job and job["state"] == JobState.DOWNLOADING:
                self.store.update_job(job_id, state=JobState.VERIFYING)
        elif kind == "done":
            child.job_id = None
            self.on_done(job_id, msg)
        elif kind == "error":
            child.job_id = None
            self.on_error(job_id, msg)

    def on_resolved(self, job_id: int, msg: dict) -> None:
        fields = {k: msg[k] for k in ("model_id", "version_id", "file_id", "model_type", "filename", "sha256",
                                      "bytes_total", "url") if msg.get(k) is not None}
        if msg.get("updatedAt"):
            fields["updated_at_civitai"] = msg["updatedAt"]
        if "sha256" in fields:
            fields["sha256"] = str(fields["sha256"]).lower()
        job = self.store.get_job(job_id)
        if job and job["model_type"]:
            fields.pop("model_type", None)  # the user's folder choice wins over the API's type
        if job and job["filename"]:
            fields.pop("filename", None)
        self.store.update_job(job_id, **fields)

    def on_progress(self, job_id: int, msg: dict) -> None:
        now = self.clock()
        self.publish_progress(job_id, msg.get("bytes_done"), msg.get("bytes_total"), msg.get("speed_bps"))
        if now - self._progress_stored.get(job_id, 0) >= PROGRESS_STORE_INTERVAL_S:
            self._progress_stored[job_id] = now
            fields = {"bytes_done": int(msg.get("bytes_done") or 0), "speed_bps": float(msg.get("speed_bps") or 0)}
            if msg.get("bytes_total"):
                fields["bytes_total"] = int(msg["bytes_total"])
            self.store.update_job(job_id, **fields)

    def on_done(self, job_id: int, msg: dict) -> None:
        self._progress_stored.pop(job_id, None)
        self._cancel_deadline.pop(job_id, None)
        job = self.store.get_job(job_id)
        if job is None or job["state"] not in (JobState.DOWNLOADING, JobState.VERIFYING):
            return
        rel = str(msg["path"])
        full = self.cfg.download_path / rel
        try:
            st = os.stat(full)
            self.store.record_file(rel, msg["sha256"], st.st_size, st.st_mtime_ns, job["version_id"])
        except OSError:
            log.warning("job %s: finished file %s is not there any more", job_id, rel)
        job = self.store.update_job(
            job_id, state=JobState.DONE, filename=msg["filename"], path=rel, sha256=str(msg["sha256"]).lower(),
            bytes_done=int(msg["bytes"]), bytes_total=int(msg["bytes"]), speed_bps=0, error=None, reason=None,
        )
        name = "download_skipped" if msg.get("skipped") else "download_completed"
        log.info("job %s %s: %s", job_id, "already present" if msg.get("skipped") else "done", rel)
        self.emit(name, job_id=job_id, model_id=job["model_id"], version_id=job["version_id"],
                  model_type=job["model_type"], filename=job["filename"], path=rel, sha256=job["sha256"],
                  bytes=job["bytes_total"])
        self.record_in_manifest(job)

    def on_error(self, job_id: int, msg: dict) -> None:
        self._progress_stored.pop(job_id, None)
        job = self.store.get_job(job_id)
        if job is None:
            return
        if job_id in self._cancel_deadline or job["state"] == JobState.CANCELLED:
            self._cancel_deadline.pop(job_id, None)
            self.remove_partial(job)
            return
        if job["state"] not in (JobState.DOWNLOADING, JobState.VERIFYING):
            return
        if msg.get("reason") == "cancelled" and self.stopping:
            self.store.update_job(job_id, state=JobState.QUEUED, speed_bps=0, attempts=max(0, job["attempts"] - 1))
            return
        self.retry_or_fail(job, str(msg.get("error") or "unknown error"), str(msg.get("reason") or "unknown"),
                           bool(msg.get("retryable")), msg.get("retry_after_s"))

    def retry_or_fail(self, job: dict, error: str, reason: str, retryable: bool, retry_after_s) -> None:
        job_id = job["id"]
        if reason == "busy":
            # The same file was on its way in another job: waiting for it is not a failed attempt.
            job = self.store.update_job(job_id, attempts=max(0, job["attempts"] - 1))
        if retryable and job["attempts"] < job["max_attempts"]:
            delay = float(retry_after_s) if retry_after_s else min(300.0, 2.0 * 2 ** max(0, job["attempts"] - 1))
            delay *= 1 + 0.2 * (secrets.randbelow(1000) / 1000)  # jitter: workers don't retry in lockstep
            self.store.update_job(job_id, state=JobState.QUEUED, error=error, reason=reason, speed_bps=0,
                                  not_before=time.time() + delay)
            log.warning("job %s attempt %s failed (%s); retrying in %.1f s", job_id, job["attempts"], error, delay)
            self.emit("download_retry", job_id=job_id, attempt=job["attempts"], error=error, delay_s=round(delay, 3))
        else:
            if retryable:
                error = f"{error} (gave up after {job['attempts']} attempts)"
            self.store.update_job(job_id, state=JobState.FAILED, error=error, reason=reason, speed_bps=0)
            log.error("job %s failed: %s", job_id, error)
            self.emit("download_failed", job_id=job_id, error=error)

    def remove_partial(self, job: dict) -> None:
        if not job.get("model_type") or not job.get("filename"):
            return
        folder = self.cfg.download_path / job["model_type"]
        for name in (part_filename(job["filename"]), part_filename(job["filename"]) + ".json"):
            try:
                os.unlink(folder / name)
            except OSError:
                pass

    # --- dispatch and timeouts ------------------------------------------------------------

    def dispatch(self) -> None:
        idle = [c for c in self.children.values()
                if c.kind == "worker" and c.state == ChildState.RUNNING and c.ready and c.job_id is None]
        if not idle:
            return
        held = {c.job_id for c in self.children.values() if c.job_id is not None}
        busy = [j for j in self.store.active_jobs() if j["state"] != JobState.QUEUED or j["id"] in held]
        running = {(j["version_id"], j["file_id"]) for j in busy if j["version_id"] is not None}
        # "The newest of model N" is not known until a worker resolves it: keep it apart from
        # any other job of that model, so one file is never fetched twice at once.
        models_unresolved = {j["model_id"] for j in busy if j["version_id"] is None}
        models_busy = {j["model_id"] for j in busy}
        for job in self.store.runnable_jobs(time.time(), limit=len(idle) + len(busy)):
            if job["id"] in held:
                continue  # a cancelled-then-retried job whose worker has not let go yet
            if job["version_id"] is not None and (job["version_id"], job["file_id"]) in running:
                continue
            if job["model_id"] is not None and (job["model_id"] in models_unresolved or (
                    job["version_id"] is None and job["model_id"] in models_busy)):
                continue
            running.add((job["version_id"], job["file_id"]))
            models_busy.add(job["model_id"])
            if job["version_id"] is None:
                models_unresolved.add(job["model_id"])
            worker = idle.pop(0)
            job = self.store.begin_attempt(job["id"])
            spec = {"job_id": job["id"], "model_id": job["model_id"], "version_id": job["version_id"],
                    "file_id": job["file_id"], "model_type": job["model_type"], "filename": job["filename"],
                    "sha256": job["sha256"], "attempt": job["attempts"]}
            worker.job_id, worker.assigned_mono, worker.acked_mono = job["id"], self.clock(), None
            if not self.send(worker, {"type": "job", "job": spec}):
                worker.job_id = None
                self.store.update_job(job["id"], state=JobState.QUEUED, attempts=max(0, job["attempts"] - 1))
                continue
            log.info("job %s -> %s (attempt %s/%s)", job["id"], worker.name, job["attempts"], job["max_attempts"])
            self.emit("download_started", job_id=job["id"], attempt=job["attempts"])
            if not idle:
                return

    def enforce_timeouts(self) -> None:
        now = self.clock()
        for child in self.children.values():
            if child.proc is None or child.state in (ChildState.STOPPED, ChildState.FATAL, ChildState.BACKOFF):
                continue
            if child.term_sent_mono is not None:
                if now - child.term_sent_mono >= KILL_GRACE_S and self.child_alive(child):
                    log.warning("%s ignored SIGTERM for %.0f s; killing it", child.name, KILL_GRACE_S)
                    try:
                        child.proc.kill()
                    except (OSError, ProcessLookupError):
                        pass
                continue
            if child.state == ChildState.STOPPING and self.stopping and child.kind not in FRESH_INTERPRETERS:
                # Let the sentinel work, but not past the budget.
                if now > self.stop_deadline - KILL_GRACE_S - 1:
                    self.terminate(child, "shutdown")
                continue
            if child.state == ChildState.STARTING and now - child.started_mono > BOOT_DEADLINE_S:
                log.warning("%s did not finish booting in %.0f s; restarting it", child.name, BOOT_DEADLINE_S)
                child.last_error = f"did not finish booting in {BOOT_DEADLINE_S:.0f} s"
                self.terminate(child, "crash")
                continue
            if child.kind != "worker" or child.job_id is None:
                continue
            if child.acked_mono is None:
                if now - child.assigned_mono > ACK_DEADLINE_S:
                    log.warning("%s never acknowledged job %s; restarting it", child.name, child.job_id)
                    self.terminate(child, "crash")
                continue
            if now - child.acked_mono > self.cfg.timeout:
                log.warning("job %s on %s ran past timeout = %g s; stopping the worker",
                            child.job_id, child.name, self.cfg.timeout)
                self.emit("download_timeout", job_id=child.job_id, timeout_s=self.cfg.timeout)
                self.terminate(child, "timeout")
        for job_id, deadline in list(self._cancel_deadline.items()):
            if now >= deadline:
                holder = next((c for c in self.children.values() if c.job_id == job_id), None)
                if holder is not None:
                    log.warning("job %s did not stop within %.0f s of its cancel; stopping %s",
                                job_id, CANCEL_GRACE_S, holder.name)
                    self.terminate(holder, "cancel")
                self._cancel_deadline.pop(job_id, None)

    # --- manifest -------------------------------------------------------------------------

    def poll_manifest(self) -> None:
        now = self.clock()
        if now < self._next_manifest_poll:
            return
        self._next_manifest_poll = now + MANIFEST_POLL_S
        result = self.manifest.poll()
        if result == "invalid":
            log.error("manifest edit not taken: %s (the last good manifest stays in force)", self.manifest.error)
            self.emit("manifest_error", error=self.manifest.error)
        elif result == "changed":
            log.info("manifest.json changed: %d entries", len(self.manifest.entries))
            self.sync_manifest("edit")
            self.send_manifest_to_updater()
            for msg in list(self.pending_updates.values()):
                self.apply_update(msg)

    def send_manifest_to_updater(self) -> None:
        self.send(self.children["updater"], {"type": "manifest", "entries": self.manifest.entries})

    def save_manifest(self, entries: list[dict]) -> bool:
        if self.manifest.save(entries):
            self.send_manifest_to_updater()
            return True
        log.warning("manifest.json was changed by someone else or is invalid; not overwriting it "
                    "(the change will be made again once it is valid)")
        return False

    def file_present(self, entry: dict) -> bool:
        """True when the entry's file is on disk and is what we verified (size, mtime, hash)."""
        name, sha = entry.get("filename"), entry.get("sha256")
        if not name:
            return False
        rel = f"{entry['model_type']}/{name}"
        try:
            st = os.lstat(self.cfg.download_path / rel)
        except OSError:
            return False
        record = self.store.get_file(rel)
        return bool(record and record["size"] == st.st_size and record["mtime_ns"] == st.st_mtime_ns
                    and (not sha or record["sha256"] == str(sha).lower()))

    def sync_manifest(self, why: str) -> int:
        """Queue every entry whose file is missing or differs. Returns the number queued."""
        queued = 0
        active = self.store.active_jobs()
        for entry in self.manifest.entries:
            model_id, version_id = entry["modelId"], entry.get("modelVersionId")
            if version_id is None:
                if any(j["model_id"] == model_id for j in active):
                    continue
            else:
                if self.file_present(entry):
                    continue
                if self.store.find_active(version_id=version_id, file_id=entry.get("fileId")):
                    continue
            job, created = self.queue_job(
                model_id=model_id, version_id=version_id, file_id=entry.get("fileId"),
                model_type=entry["model_type"], filename=entry.get("filename") or None,
                sha256=entry.get("sha256") or None, priority=entry_priority(entry), source="manifest",
                requeue_finished=True,
            )
            queued += int(created)
            active.append(job)
        if queued:
            log.info("manifest (%s): %d file(s) queued", why, queued)
        return queued

    def queue_job(self, *, model_id=None, version_id=None, file_id=None, model_type=None, filename=None,
                  sha256=None, priority=10, source="api", requeue_finished=False) -> tuple[dict, bool]:
        if version_id is not None:
            existing = self.store.find_active(version_id=version_id, file_id=file_id)
            if existing is None and model_id is not None:  # an unresolved "newest of model N" may be it
                existing = next((j for j in self.store.active_jobs()
                                 if j["model_id"] == model_id and j["version_id"] is None), None)
        else:  # "the newest of model N": any queued or running job of that model is it
            existing = next((j for j in self.store.active_jobs() if j["model_id"] == model_id), None)
        if existing:
            return existing, False
        if requeue_finished:
            previous = self.store.latest_finished(model_id=model_id, version_id=version_id, file_id=file_id,
                                                  source=source)
            if previous:
                job = self.store.update_job(
                    previous["id"], state=JobState.QUEUED, attempts=0, error=None, reason=None, not_before=0,
                    priority=priority, bytes_done=0, speed_bps=0,
                    **({"filename": filename} if filename else {}), **({"sha256": sha256.lower()} if sha256 else {}),
                )
                self.emit_queued(job)
                return job, True
        job = self.store.add_job(model_id=model_id, version_id=version_id, file_id=file_id, model_type=model_type,
                                 filename=filename, priority=priority, max_attempts=self.cfg.max_attempts,
                                 sha256=sha256, source=source)
        self.emit_queued(job)
        return job, True

    def emit_queued(self, job: dict) -> None:
        self.emit("download_queued", job_id=job["id"], model_id=job["model_id"], version_id=job["version_id"],
                  model_type=job["model_type"], filename=job["filename"], priority=job["priority"])

    def record_in_manifest(self, job: dict) -> None:
        """After a download: the entry records what was fetched and the name actually used."""
        entries = [dict(e) for e in self.manifest.entries]
        fields = {"modelId": job["model_id"], "modelVersionId": job["version_id"], "fileId": job["file_id"],
                  "model_type": job["model_type"], "sha256": (job["sha256"] or "").upper(),
                  "url": job["url"], "filename": job["filename"], "updatedAt": job["updated_at_civitai"]}
        fields = {k: v for k, v in fields.items() if v not in (None, "")}
        target = None
        for entry in entries:
            if entry["modelId"] != job["model_id"]:
                continue
            same_file = entry.get("modelVersionId") == job["version_id"] and entry.get("fileId") in (None, job["file_id"])
            if same_file or entry.get("modelVersionId") is None:
                target = entry
                break
        if target is None and job["source"] in ("api",):
            if self.cfg.manifest_mode == "replace":
                target = next((e for e in entries if e["modelId"] == job["model_id"]), None)
            if target is None:
                target = {}
                entries.append(target)
        if target is None:
            return
        before = dict(target)
        if "priority" not in target and job["source"] == "api" and job["priority"] != 10:
            fields["priority"] = job["priority"]
        if target.get("model_type"):
            fields.pop("model_type", None)  # the entry's folder choice stays
        target.update(fields)
        if target != before:
            self.save_manifest(entries)

    # --- updater --------------------------------------------------------------------------

    def _load_updater_info(self) -> None:
        for key in ("last_check", "last_success", "next_check"):
            self.updater_info[key] = self.store.get_kv(f"updater.{key}")

    def on_updater_message(self, child: Child, msg: dict) -> None:
        kind = msg.get("type")
        if kind == "check_started":
            self.updater_info["running"] = True
        elif kind == "schedule":
            self.updater_info["next_check"] = msg.get("next_check")
            self.store.set_kv("updater.next_check", msg.get("next_check"))
        elif kind == "check_done":
            self.updater_info["running"] = False
            self.updater_info["last_check"] = msg.get("ts")
            self.store.set_kv("updater.last_check", msg.get("ts"))
            if msg.get("ok"):
                self.updater_info["last_success"] = msg.get("ts")
                self.store.set_kv("updater.last_success", msg.get("ts"))
                self.store.set_kv("updater.last_success_ts", msg.get("unix_ts"))
            log.log(logging.INFO if msg.get("ok") else logging.WARNING,
                    "update check %s: %s model(s), %s update(s), %s error(s), %s request(s) in %.1f s%s",
                    "done" if msg.get("ok") else "failed", msg.get("models"), msg.get("updates"),
                    msg.get("errors"), msg.get("requests"), float(msg.get("duration_s") or 0),
                    f"; {msg['error']}" if msg.get("error") else "")
        elif kind == "update_found":
            self.apply_update(msg)
        elif kind == "update_error":
            log.warning("update check for model %s failed: %s", msg.get("model_id"), msg.get("error"))
            self.emit("model_update_error", model_id=msg.get("model_id"), error=msg.get("error"))

    def apply_update(self, msg: dict) -> None:
        """A newer version (or a file replaced in place): record it per manifest_mode and queue it."""
        model_id, new = msg["model_id"], dict(msg["entry"])
        previous_version_id = msg.get("previous_version_id")
        entries = [dict(e) for e in self.manifest.entries]
        old = next((e for e in entries if e["modelId"] == model_id
                    and e.get("modelVersionId") == previous_version_id), None)
        if old is None:
            old = next((e for e in entries if e["modelId"] == model_id), None)
        if old is None:
            return  # the model left the manifest while the check ran
        new["model_type"] = old["model_type"]
        if self.cfg.manifest_mode == "append" and old.get("modelVersionId") != new.get("modelVersionId"):
            added = {k: v for k, v in old.items() if k not in new and k not in VERSION_FIELDS}
            added.update(new)
            if any(e["modelId"] == model_id and e.get("modelVersionId") == new.get("modelVersionId")
                   and e.get("fileId") == new.get("fileId") for e in entries):
                return
            entries.append(added)
            entry = added
        else:
            # What described the old file goes; custom fields, priority and model_type stay.
            for key in VERSION_FIELDS:
                if key not in new:
                    old.pop(key, None)
            old.update(new)  # keys already there keep their place in the entry
            entry = old
        queue = dict(model_id=model_id, version_id=entry.get("modelVersionId"), file_id=entry.get("fileId"),
                     model_type=entry["model_type"], filename=entry.get("filename"), sha256=entry.get("sha256"),
                     priority=entry_priority(entry), source="update", requeue_finished=True)
        if not self.save_manifest(entries):
            # A person's save is pending or broken: fetch the file now, but record and announce
            # the update only once their manifest is valid again (applied anew after that poll).
            if model_id not in self.pending_updates:
                self.queue_job(**queue)
            self.pending_updates[model_id] = msg
            return
        self.pending_updates.pop(model_id, None)
        log.info("model %s: new version %s (was %s), file %s", model_id, new.get("modelVersionId"),
                 previous_version_id, new.get("filename"))
        self.emit("model_update", model_id=model_id, version_id=new.get("modelVersionId"),
                  previous_version_id=previous_version_id, sha256=new.get("sha256"),
                  updatedAt=new.get("updatedAt"), filename=new.get("filename"))
        self.queue_job(**queue)

    # --- control socket (web process) -----------------------------------------------------

    def handle_control(self, op: str, args: dict):
        """Runs on a control thread: hand the op to the main loop and wait for its answer."""
        future: Future = Future()
        self.inbox.put((op, args, future))
        self.wake()
        try:
            return future.result(timeout=10)
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
                child = self.children.get(args["name"])
                if child is not None and child.pid == args["pid"]:
                    self.on_message(child, {"type": "ready", "pid": args["pid"]})
                continue
            try:
                result = self.control_op(op, args)
            except ControlError as exc:
                future.set_exception(exc)
            except Exception as exc:
                log.exception("control op %s failed", op)
                future.set_exception(exc)
            else:
                future.set_result(result)

    def control_op(self, op: str, args: dict):
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            raise ControlError(400, f"unknown operation {op!r}")
        return handler(**args)

    def _job_or_404(self, job_id) -> dict:
        job = self.store.get_job(int(job_id))
        if job is None:
            raise ControlError(404, f"no job with id {job_id}")
        return job

    def op_status(self) -> dict:
        return {
            "version": VERSION, "started_at": self.started_iso, "uptime_s": round(time.time() - self.started_wall, 1),
            "children": [c.public() for c in self.children.values()], "queue": self.store.job_counts(),
            "updater": dict(self.updater_info), "stopping": self.stopping,
            "manifest_error": self.manifest.error,
        }

    def op_add_job(self, model_id=None, version_id=None, file_id=None, priority=None, model_type=None) -> dict:
        if model_id is None and version_id is None:
            raise ControlError(422, "give model_id or version_id")
        job, created = self.queue_job(model_id=model_id, version_id=version_id, file_id=file_id,
                                      model_type=model_type, priority=priority or 10, source="api")
        return {"job": public_job(job), "created": created}

    def op_set_priority(self, job_id, priority) -> dict:
        job = self._job_or_404(job_id)
        return {"job": public_job(self.store.update_job(job["id"], priority=int(priority)))}

    def op_cancel_job(self, job_id) -> dict:
        job = self._job_or_404(job_id)
        if job["state"] not in ACTIVE_STATES:
            raise ControlError(409, f"job {job_id} is {job['state']}; only queued or running jobs can be cancelled")
        holder = next((c for c in self.children.values() if c.job_id == job["id"]), None)
        job = self.store.update_job(job["id"], state=JobState.CANCELLED, speed_bps=0, error="cancelled by the user",
                                    reason="cancelled")
        if holder is not None:
            self.send(holder, {"type": "cancel", "job_id": job["id"]})
            self._cancel_deadline[job["id"]] = self.clock() + CANCEL_GRACE_S
        else:
            self.remove_partial(job)
        log.info("job %s cancelled", job["id"])
        self.emit("download_cancelled", job_id=job["id"])
        return {"job": public_job(job)}

    def op_retry_job(self, job_id) -> dict:
        job = self._job_or_404(job_id)
        if job["state"] not in (JobState.FAILED, JobState.CANCELLED):
            raise ControlError(409, f"job {job_id} is {job['state']}; only failed or cancelled jobs can be retried")
        job = self.store.update_job(job["id"], state=JobState.QUEUED, attempts=0, error=None, reason=None,
                                    not_before=0)
        self.emit_queued(job)
        return {"job": public_job(job)}

    def op_manifest(self) -> dict:
        return {"entries": self.manifest.entries, "error": self.manifest.error}

    def op_add_manifest_entry(self, entry) -> dict:
        try:
            validate_entry(entry, "entry")
        except ManifestError as exc:
            raise ControlError(422, str(exc)) from None
        if self.manifest.error is not None:
            raise ControlError(409, f"manifest.json has an invalid edit; fix it first: {self.manifest.error}")
        entries = [dict(e) for e in self.manifest.entries]
        duplicate = next((e for e in entries if e["modelId"] == entry["modelId"]
                          and e.get("modelVersionId") == entry.get("modelVersionId")), None)
        if duplicate is not None:
            raise ControlError(409, f"manifest.json already has an entry for model {entry['modelId']}"
                               + (f" version {entry['modelVersionId']}" if entry.get("modelVersionId") else ""))
        entries.append(entry)
        if not self.save_manifest(entries):
            raise ControlError(409, "manifest.json was just changed by someone else; try again")
        self.sync_manifest("api")
        job = (self.store.find_active(version_id=entry["modelVersionId"], file_id=entry.get("fileId"))
               if entry.get("modelVersionId") else self.store.find_active(model_id=entry["modelId"]))
        return {"entry": entry, "job": public_job(job) if job else None}

    def op_delete_manifest_model(self, model_id) -> dict:
        model_id = int(model_id)
        entries = [e for e in self.manifest.entries if e["modelId"] != model_id]
        removed = len(self.manifest.entries) - len(entries)
        if not removed:
            raise ControlError(404, f"manifest.json has no entry for model {model_id}")
        if not self.save_manifest(entries):
            raise ControlError(409, "manifest.json was just changed by someone else or is invalid; try again")
        return {"removed": removed}

    def op_check_updates(self) -> dict:
        updater = self.children["updater"]
        if updater.state != ChildState.RUNNING or not self.send(updater, {"type": "check_now"}):
            raise ControlError(503, f"the updater is {updater.state}; try again shortly")
        return {"started": True}


# --- command line ---------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="supervisor.py", description="Civitai download daemon")
    parser.add_argument("--config", default="config.json", help="path to config.json (default: ./config.json)")
    sub = parser.add_subparsers(dest="command")
    token = sub.add_parser("token", help="print a JWT for the API, signed with the configured secret")
    token.add_argument("--days", type=float, default=30, help="validity in days (default 30)")
    token.add_argument("--config", dest="sub_config", default=None)
    check = sub.add_parser("check", help="validate config.json and manifest.json; exit 0 or 78")
    check.add_argument("--config", dest="sub_config", default=None)
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
    if sys.platform != "win32":
        # multiprocessing-logging needs fork; the web process is a fresh interpreter anyway.
        multiprocessing.set_start_method("fork", force=True)
    setup_supervisor_logging(cfg.log_path, secrets=(cfg.civitai_api_key, cfg.jwt_secret, cfg.webhook_secret))
    for warning in warnings:
        log.warning("%s", warning)
    ensure_jwt_secret(cfg)
    supervisor = Supervisor(cfg, manifest)
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


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "check":
        return cmd_check(args.config)
    if args.command == "token":
        return cmd_token(args.config, args.days)
    return cmd_run(args.config)


if __name__ == "__main__":
    sys.exit(main())
