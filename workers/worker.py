"""The download worker process: runs one job at a time from its channel (a second may wait behind it),
reports back.

The download itself is workers/download.py; this is only the process shell around it:
signals, the channel to the supervisor, cancellation and logging.
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

log = logging.getLogger("worker")


# An idle worker wakes this often, only to see whether the supervisor is alive. The supervisor's
# death shows at once as EOF on the pipe (a forked worker closes every other end it inherited);
# this is the backstop.
PARENT_CHECK_S = 60.0


# A download worker's messages that say nothing urgent: held up to LAZY_S and sent together with
# the next message of another type (a small file's ack, resolved, last progress and verifying go
# with its `done`), so the supervisor wakes once a small file instead of four or five times and
# stores its changes in one transaction. What it costs: the supervisor learns a job's file (and
# with it the dedupe by file, SPEC §4) up to LAZY_S later; a second job for the same file that
# starts in that window finds the partial file claimed and waits (reason "busy").
LAZY_TYPES = frozenset({"ack", "resolved", "progress", "verifying"})
LAZY_S = 0.05

# A job the supervisor sends ahead (ipc/children.py, PREFETCH_WITHIN_S) waits behind the current
# one; one that has not started after this long goes back, for the next free worker to take.
PREFETCH_HOLD_S = 1.0


class Channel:
    """The worker's end of its Pipe. Sends come from the job thread and the reader thread.

    A message whose type is in `lazy` may wait up to `lazy_s` for the next one; order is kept, a
    message of another type goes with what waits as one Pipe message (a list: ipc.messages.unpack),
    and a helper thread sends what is still waiting when `lazy_s` is up (it sleeps without a
    timeout while nothing waits)."""

    def __init__(self, conn, parent_check_s: float | None = None, lazy: frozenset[str] = frozenset(),
                 lazy_s: float = LAZY_S):
        self.conn = conn
        self._lock = threading.Lock()
        self._parent_pid = os.getppid()
        self._parent_check_s = PARENT_CHECK_S if parent_check_s is None else parent_check_s
        self._lazy, self._lazy_s = lazy, lazy_s
        self._held: list[dict] = []
        self._waiting = threading.Condition(self._lock)
        self._sender: threading.Thread | None = None

    def recv(self) -> dict:
        """The next message; EOFError once the supervisor is gone: EOF on the pipe, or (the
        backstop, every PARENT_CHECK_S while nothing arrives) this process was handed to another
        parent. A message wakes the poll at once, so the check costs no latency."""
        msg = self.recv_within(None)
        assert msg is not None
        return msg

    def recv_within(self, timeout: float | None) -> dict | None:
        """recv(), or None after `timeout` seconds without a message (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            check = None if os.name == "nt" else self._parent_check_s
            wait = check if left is None else left if check is None else min(check, left)
            if self.conn.poll(wait):
                return self.conn.recv()
            if os.getppid() != self._parent_pid:
                raise EOFError("the supervisor is gone")
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def send(self, msg: dict) -> None:
        with self._lock:
            if msg.get("type") in self._lazy:
                self._held.append(msg)
                if self._sender is None:
                    self._sender = threading.Thread(target=self._send_late, name="channel-sender", daemon=True)
                    self._sender.start()
                if len(self._held) == 1:
                    self._waiting.notify()
                return
            self._send_held(then=msg)

    def flush(self) -> None:
        """Send what waits now (before the worker exits)."""
        with self._lock:
            self._send_held()

    def _send_late(self) -> None:
        with self._lock:
            while True:
                while not self._held:
                    self._waiting.wait()
                deadline = time.monotonic() + self._lazy_s
                while self._held and (left := deadline - time.monotonic()) > 0:
                    self._waiting.wait(left)
                self._send_held()

    def _send_held(self, then: dict | None = None) -> None:
        """What waits, and `then`, as one Pipe message (a list when there are several)."""
        held, self._held = self._held, []
        if then is not None:
            held.append(then)
        if held:
            self._send(held[0] if len(held) == 1 else held)

    def _send(self, msg: dict | list[dict]) -> None:
        try:
            self.conn.send(msg)
        except (OSError, EOFError, BrokenPipeError):
            pass  # the supervisor is gone; we exit when our reader sees EOF


class AheadResolver:
    """Resolves a job sent ahead (`resolve(job)`: its metadata and signed link) on a kept thread
    while the job before it runs, mostly while that one waits on the disk; run_job then takes the
    result (a Future: the answers, or what asking raised) instead of asking again. A job given
    back is dropped, and not asked for if its turn has not come yet."""

    def __init__(self, resolve: Callable[[dict], object]):
        self._resolve = resolve
        self._todo: queue.SimpleQueue = queue.SimpleQueue()
        self._futures: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self, job: dict) -> None:
        future: Future = Future()
        with self._lock:
            self._futures[int(job["job_id"])] = future
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="resolve-ahead", daemon=True)
                self._thread.start()
        self._todo.put((job, future))

    def take(self, job_id: int) -> Future | None:
        with self._lock:
            return self._futures.pop(job_id, None)

    def drop(self, job_id: int) -> None:
        with self._lock:
            future = self._futures.pop(job_id, None)
        if future is not None:
            future.cancel()  # still waiting its turn: never asked for

    def _loop(self) -> None:
        while True:
            job, future = self._todo.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self._resolve(job))
            except BaseException as exc:  # handed to run_job, which raises it as its own resolve would
                future.set_exception(exc)


def ignore_terminal_interrupt() -> None:
    """Ctrl-C reaches every process in the terminal's group; only the supervisor decides."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def worker_main(name: str, conn, config_path: str, log_queue=None) -> None:
    from ipc.config import load_config
    from ipc.logsetup import setup_child_logging
    from ipc.ratelimit import SharedRateLimit
    from ipc.throttle import Throttle
    from workers.civitai import CivitaiClient, CivitaiError
    from workers.download import JobContext, resolve_ahead, run_job

    ignore_terminal_interrupt()
    cfg, _ = load_config(config_path)
    setup_child_logging(log_queue, secrets=(cfg.civitai_api_key,))
    channel = Channel(conn, lazy=LAZY_TYPES)
    # SimpleQueue: put() is safe from the SIGTERM handler (it may interrupt a get() in progress),
    # and the main loop blocks on get() without a timeout: an idle worker does not wake up.
    jobs: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()
    cancelled: set[int] = set()
    current: dict[str, int | None] = {"job_id": None}
    # Jobs received and not started yet, with when each goes back unless started: a job sent
    # ahead waits here behind the current one. The job thread takes a job out as it starts it,
    # the reader gives one back when cancelled or held too long; the lock makes that one decision.
    ahead: dict[int, float] = {}
    ahead_lock = threading.Lock()

    def on_sigterm(signum, frame):
        # The supervisor's kill for a stuck job, or shutdown: stop at the next chunk, keep the part.
        # stop.set() is safe here: the main thread only reads `stop`, never holds its lock.
        stop.set()
        jobs.put(None)

    signal.signal(signal.SIGTERM, on_sigterm)

    def give_back(job_ids) -> None:
        for job_id in job_ids:
            resolver.drop(job_id)
            log.debug("job %s given back: it did not start within %.1f s, or was cancelled first", job_id,
                      PREFETCH_HOLD_S)
            channel.send({"type": "returned", "job_id": job_id})

    def read_channel():
        while True:
            with ahead_lock:
                due = min(ahead.values(), default=None)
            try:
                msg = channel.recv_within(None if due is None else max(0.0, due - time.monotonic()))
            except (EOFError, OSError):
                stop.set()
                jobs.put(None)
                return
            if msg is None:  # a job sent ahead may have waited its time
                now = time.monotonic()
                with ahead_lock:
                    late = [job_id for job_id, by in ahead.items() if by <= now]
                    for job_id in late:
                        del ahead[job_id]
                give_back(late)
                continue
            kind = msg.get("type") if isinstance(msg, dict) else None
            if kind == "job":
                assigned = int(msg["job"]["job_id"])
                cancelled.discard(assigned)  # a fresh assignment clears a stale cancel
                with ahead_lock:
                    ahead[assigned] = time.monotonic() + PREFETCH_HOLD_S
                    busy = current["job_id"] is not None
                if busy:  # sent ahead: its metadata is asked for while the current job runs
                    resolver.start(msg["job"])
                jobs.put(msg["job"])
            elif kind == "cancel":
                job_id = int(msg["job_id"])
                with ahead_lock:
                    unstarted = ahead.pop(job_id, None) is not None
                    if not unstarted and current["job_id"] == job_id:  # a late cancel must not hit a later retry
                        cancelled.add(job_id)
                if unstarted:
                    give_back([job_id])
            elif kind == "config":  # SIGHUP: the next job takes the live keys
                new = msg.get("config")
                if new is not None:
                    ctx.connections, ctx.layout, ctx.folders = new.connections, new.layout, dict(new.folders)
                    ctx.allow_unsafe = new.allow_unsafe
                    if client.throttle is not None:
                        client.throttle.interval_s = float(new.throttle)
                    settings["sidecars"], settings["preview_nsfw"] = new.sidecars, new.preview_nsfw
            elif kind == "previews":  # owed by no live worker (the last run, a dead worker): on the sidecar thread
                for path in msg.get("paths") or []:
                    sidecar_writer.top_up(Path(path))
            elif kind == "stop":
                stop.set()
                jobs.put(None)
                return

    client = CivitaiClient(
        cfg.civitai_url,
        api_key=cfg.civitai_api_key,
        throttle=Throttle(cfg.locks_dir / "civitai.throttle", cfg.throttle),
    )
    settings = {"sidecars": cfg.sidecars, "preview_nsfw": cfg.preview_nsfw}
    from workers.sidecars import SidecarWriter, write_sidecars

    def sidecars_of(res, path, *, fetch_preview: bool):
        return write_sidecars(res, path, client=client, throttle=client.throttle, preview_nsfw=settings["preview_nsfw"],
                              sidecars=settings["sidecars"], fetch_preview=fetch_preview, locks_dir=cfg.locks_dir)

    sidecar_writer = SidecarWriter(
        sidecars_of,
        on_owed=lambda path: channel.send({"type": "preview_owed", "path": path}),
        on_settled=lambda path: channel.send({"type": "preview_settled", "path": path}),
    ).start()
    resolver = AheadResolver(lambda job: resolve_ahead(client, job))
    ctx = JobContext(
        client=client,
        resolved_ahead=resolver.take,
        download_dir=cfg.download_path,
        locks_dir=cfg.locks_dir,
        allow_unsafe=cfg.allow_unsafe,
        layout=cfg.layout,
        folders=dict(cfg.folders),
        connections=cfg.connections,
        # The cap every connection of every worker shares; the supervisor writes its rate.
        rate_limit=SharedRateLimit(cfg.locks_dir / "speed.rate"),
        on_verified=sidecar_writer.after_verified,
    )
    threading.Thread(target=read_channel, name="channel-reader", daemon=True).start()
    channel.send({"type": "ready", "pid": os.getpid()})
    log.info("%s ready", name)
    while not stop.is_set():
        job = jobs.get()  # None: stop (SIGTERM, a stop message, or the supervisor gone)
        if job is None:
            break
        job_id = int(job["job_id"])
        with ahead_lock:
            if ahead.pop(job_id, None) is None:
                continue  # given back meanwhile
            current["job_id"] = job_id
        channel.send({"type": "ack", "job_id": job_id})

        def should_stop(job_id=job_id) -> bool:
            return stop.is_set() or job_id in cancelled

        try:
            result = run_job(job, ctx, channel.send, should_stop)
            channel.send(result)
        except CivitaiError as exc:
            if exc.wait:
                log.info("job %s waits: %s", job_id, exc)
            channel.send(exc.as_message(job_id))
        except Exception as exc:  # a bug: report it as a retryable failure, keep the worker alive
            log.error("job %s: unexpected error\n%s", job_id, traceback.format_exc())
            channel.send(CivitaiError(f"internal error in the download worker: {type(exc).__name__}: {exc}",
                                      reason="internal", retryable=True).as_message(job_id))
        finally:
            with ahead_lock:
                cancelled.discard(job_id)
                current["job_id"] = None
    channel.flush()
    log.info("%s stopping", name)
