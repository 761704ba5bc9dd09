"""The supervisor's children as objects: one state machine each (supervisord's states, one
`change_state` that checks the transition, logs and reports it), two ways to start one (forked
with a Pipe, or a fresh interpreter), and the pool that reaps, restarts and enforces deadlines.

The pool knows processes and deadlines; what a dead worker's job becomes is the ledger's
business: `reap` returns the exits and the caller hands each lost job to the ledger.
"""
from __future__ import annotations

import collections
import logging
import multiprocessing
import multiprocessing.connection
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ipc.logsetup import parse_relayed_line
from ipc.messages import unpack
from ipc.oslayer import OS
from ipc.retry import CHILD_RESTART, RetryPolicy
from ipc.states import ChildKind, ChildState, KillReason, check_child_transition

log = logging.getLogger("supervisor")

KILL_GRACE_S = 5.0  # SIGTERM, then SIGKILL this much later (SPEC §5)
ACK_DEADLINE_S = 30.0  # a job sent to a worker that never acknowledges it is taken back
RELEASE_GRACE_S = 2.0  # a cancelled or paused download stops within this, or its worker is stopped
# A second job goes ahead to a worker whose last job took less than this (dispatch to its end):
# a run of small files then costs no round trip between two of them. A slower job's worker gets
# one job at a time, so a big file never keeps a small one from a free worker.
PREFETCH_WITHIN_S = 0.5
BOOT_DEADLINE_S = 60.0  # a child that has not said it is ready by then is killed as a boot failure
BOOT_FAILURE_LIMIT = 5
BOOT_FAILURE_WINDOW_S = 60.0
QUICK_DEATH_S = 10.0  # dying this soon after the start is a crash loop: back off
READY_LINE = "@ready"  # what a fresh interpreter prints on stderr once it has booted


class Fatal(Exception):
    """The daemon cannot go on; the message is the cause."""


@dataclass
class Exit:
    """A child that died: what it was doing and why (a kill of ours, or its own crash)."""

    child: Child
    code: int | None
    reason: KillReason
    job_id: int | None
    planned: bool  # stopped on purpose (shutdown, or a stop message)
    next_job_id: int | None = None  # a job it held behind job_id (prefetch), maybe never started


@dataclass(eq=False)
class Child:
    name: str
    kind: ChildKind
    state: ChildState = ChildState.STOPPED
    pid: int | None = None
    started_mono: float = 0.0
    ready: bool = False
    since: float = 0.0  # wall clock of the last state change
    restarts: int = 0
    consecutive_failures: int = 0
    restart_at: float = 0.0
    boot_failures: collections.deque = field(default_factory=lambda: collections.deque(maxlen=BOOT_FAILURE_LIMIT))
    last_error: str = ""
    stderr_tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=20))
    term_sent_mono: float | None = None
    kill_reason: KillReason | None = None
    # A worker's current job (from dispatch to its last message or its death).
    job_id: int | None = None
    assigned_mono: float = 0.0
    acked_mono: float | None = None
    release_job_by: float | None = None  # a cancel or pause was sent: the job must let go by then
    # A job sent ahead, to start the moment the current one ends (PREFETCH_WITHIN_S below), and
    # when its ack was read if that came before the current job's end was stored.
    next_job_id: int | None = None
    next_acked_mono: float | None = None
    last_job_s: float | None = None  # dispatch to let-go of the last job: whether to send ahead
    last_death_job: int | None = None
    oneshot: bool = False  # does one piece of work and exits: never restarted
    on_change: Callable[[Child, ChildState, ChildState, str], None] | None = None

    # --- state -----------------------------------------------------------------------------

    def change_state(self, new: ChildState, why: str = "") -> None:
        old = self.state
        if old == new:
            return
        check_child_transition(old, new)
        self.state = new
        self.since = time.time()
        log.debug("%s: %s -> %s%s", self.name, old, new, f" ({why})" if why else "")
        if self.on_change is not None:
            self.on_change(self, old, new, why)

    def public(self) -> dict:
        from ipc.store import utc_now_iso

        return {"name": self.name, "kind": str(self.kind), "pid": self.pid, "state": str(self.state),
                "job_id": self.job_id, "restarts": self.restarts,
                "since": utc_now_iso(self.since) if self.since else None,
                "last_error": self.last_error or None}

    @property
    def live(self) -> bool:
        """Started and not yet reaped."""
        return self.state in (ChildState.STARTING, ChildState.RUNNING, ChildState.STOPPING)

    # --- the process (subclasses) -------------------------------------------------------------

    def spawn(self, now: float) -> None:
        self.ready = False
        self.job_id = None
        self.acked_mono = None
        self.next_job_id = None
        self.next_acked_mono = None
        self.last_job_s = None
        self.release_job_by = None
        self.term_sent_mono = None
        self.kill_reason = None
        self.started_mono = now
        self._start()
        self.change_state(ChildState.STARTING, f"pid {self.pid}")
        log.info("started %s (pid %s)", self.name, self.pid)

    def _start(self) -> None:
        raise NotImplementedError

    def alive(self) -> bool:
        raise NotImplementedError

    def exitcode(self) -> int | None:
        raise NotImplementedError

    def send(self, msg: dict) -> bool:
        return False

    def waitables(self) -> list:
        return []

    def close(self) -> None:
        """After its exit: let go of pipes and threads."""

    def terminate(self, reason: KillReason, now: float) -> None:
        """Ask it to stop (SIGTERM); the pool kills it KILL_GRACE_S later if it is still there."""
        if self.term_sent_mono is not None:
            return
        self.kill_reason = self.kill_reason or reason
        self.term_sent_mono = now
        self._signal(kill=False)

    def kill(self) -> None:
        self._signal(kill=True)

    def _signal(self, kill: bool) -> None:
        raise NotImplementedError

    def mark_ready(self) -> None:
        self.ready = True
        self.boot_failures.clear()
        if self.state == ChildState.STARTING:
            self.change_state(ChildState.RUNNING, "ready")


class ForkedChild(Child):
    """A worker or the updater: a multiprocessing.Process (fork on Linux, spawn on Windows) that
    talks over its own duplex Pipe, so a SIGKILLed child can never leave a shared lock held."""

    def __init__(self, name: str, kind: ChildKind, target: Callable, args_for: Callable[[Child], tuple],
                 ctx=None, log_handler_for: Callable[[Child], Any] | None = None,
                 close_fds: Callable[[Child], list[int]] | None = None, **kw):
        super().__init__(name=name, kind=kind, **kw)
        self.target = target
        self.args_for = args_for
        self.ctx = ctx or multiprocessing.get_context()
        self.log_handler_for = log_handler_for
        self.close_fds = close_fds
        self.proc: Any = None
        self.conn: Any = None
        self.log_handler: Any = None

    def _start(self) -> None:
        from ipc.childmain import child_entry

        parent_conn, child_conn = self.ctx.Pipe(duplex=True)
        log_channel = None
        if self.log_handler_for is not None:
            self.close_log_handler()
            self.log_handler = log_channel = self.log_handler_for(self)
        fork = self.ctx.get_start_method() == "fork"
        fds = self.close_fds(self) if (fork and self.close_fds) else []
        if fork:
            fds = [fd for fd in fds if fd != child_conn.fileno()]  # the child's own end
            if parent_conn.fileno() not in fds:
                fds.append(parent_conn.fileno())  # ours: the child keeping it would hide our death from it
        proc = self.ctx.Process(target=child_entry, name=self.name, daemon=False,
                                args=(self.target, self.name, child_conn, *self.args_for(self), log_channel, fds))
        proc.start()
        child_conn.close()
        self.proc, self.conn, self.pid = proc, parent_conn, proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    def exitcode(self) -> int | None:
        return None if self.proc is None else self.proc.exitcode

    def send(self, msg: dict) -> bool:
        if self.conn is None:
            return False
        try:
            self.conn.send(msg)
            return True
        except (OSError, EOFError, ValueError):
            return False

    def waitables(self) -> list:
        out = []
        if self.conn is not None:
            out.append(self.conn)
        if self.proc is not None:
            out.append(self.proc.sentinel)
        return out

    def recv_all(self) -> list[dict]:
        """Every message waiting on the pipe; EOF closes our end."""
        out = []
        while self.conn is not None:
            try:
                if not self.conn.poll():
                    break
                out.extend(unpack(self.conn.recv()))
            except (EOFError, OSError):
                self.conn.close()
                self.conn = None
        return out

    def _signal(self, kill: bool) -> None:
        if self.proc is None:
            return
        try:
            self.proc.kill() if kill else self.proc.terminate()
        except (OSError, AttributeError):
            pass

    def close(self) -> None:
        if self.proc is not None:
            self.proc.join(0.1)
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self.proc = None
        self.close_log_handler()

    def close_log_handler(self) -> None:
        """Stop the thread that wrote a dead child's records (after it drained them)."""
        handler, self.log_handler = self.log_handler, None
        if not isinstance(handler, logging.Handler):
            return  # nothing, or the queue all spawned children share (the supervisor's to close)
        closer = getattr(handler, "close_after_child", None)
        if closer is not None:
            closer()
            return
        try:
            handler.queue._writer.close()  # type: ignore[attr-defined]
        except (AttributeError, OSError):
            pass
        threading.Thread(target=handler.close, name=f"{self.name}-log-close", daemon=True).start()


class FreshChild(Child):
    """The web and webhook processes: `python -m MODULE --config PATH`, never forked from us (their
    HTTP, TLS and SQLite work can then never leave a lock held in a process forked afterwards).
    They see our death as EOF on stdin; their stderr carries their log records and `@ready`."""

    def __init__(self, name: str, kind: ChildKind, module: str, argv_for: Callable[[Child], list[str]],
                 env_for: Callable[[Child], dict], on_ready: Callable[[Child, int], None],
                 on_gone: Callable[[Child, int], None], cwd: Path, **kw):
        super().__init__(name=name, kind=kind, **kw)
        self.module = module
        self.argv_for = argv_for
        self.env_for = env_for
        self.on_ready = on_ready
        self.on_gone = on_gone  # its stderr ended: it exited (the loop is woken to reap it)
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None

    def _start(self) -> None:
        kwargs = OS.fresh_child_flags()  # its own process group: Ctrl-C reaches only us; we stop it in order
        proc = subprocess.Popen([sys.executable, "-m", self.module, *self.argv_for(self)], cwd=str(self.cwd),
                                env=self.env_for(self), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, **kwargs)
        self.proc, self.pid = proc, proc.pid
        threading.Thread(target=self._relay_stderr, args=(proc,), name=f"{self.name}-stderr", daemon=True).start()

    def _relay_stderr(self, proc: subprocess.Popen) -> None:
        """Its stderr into our log (the one writer of the log file), each record at its level."""
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            if line == READY_LINE:
                self.on_ready(self, proc.pid)
            elif line:
                level, name, message = parse_relayed_line(line)
                self.stderr_tail.append(message.splitlines()[-1] if message else line)
                logging.getLogger(name or self.name).log(level, "%s", message)
        self.on_gone(self, proc.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exitcode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def waitables(self) -> list:
        return []  # a subprocess has no sentinel on every OS: its end is seen by polling

    def _signal(self, kill: bool) -> None:
        if self.proc is None:
            return
        try:
            self.proc.kill() if kill else OS.polite_stop(self.proc)
        except OSError:
            pass

    def pipe_fds(self) -> list[int]:
        if self.proc is None:
            return []
        return [p.fileno() for p in (self.proc.stdin, self.proc.stderr) if p is not None]

    def close(self) -> None:
        if self.proc is not None and self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        self.proc = None


class ChildPool:
    """Every child, and the idempotent steps the loop runs on them: reap, restart, deadlines."""

    def __init__(self, clock: Callable[[], float], restart_policy: RetryPolicy = CHILD_RESTART):
        self.children: dict[str, Child] = {}
        self.clock = clock
        self.restart_policy = restart_policy

    def add(self, child: Child) -> Child:
        self.children[child.name] = child
        return child

    def __iter__(self):
        return iter(list(self.children.values()))

    def __getitem__(self, name: str) -> Child:
        return self.children[name]

    def get(self, name: str) -> Child | None:
        return self.children.get(name)

    def workers(self) -> list[Child]:
        return [c for c in self if c.kind == ChildKind.WORKER]

    def idle_workers(self) -> list[Child]:
        return [c for c in self.workers() if c.state == ChildState.RUNNING and c.ready and c.job_id is None]

    def ahead_workers(self) -> list[Child]:
        """Workers to send a job ahead to, behind the one they run or are about to get: their
        last job took under PREFETCH_WITHIN_S, so the current one likely ends soon too, and the
        next starts without a round trip to us. A worker gives back a job it held PREFETCH_HOLD_S
        without starting it (workers/worker.py)."""
        return [c for c in self.workers()
                if c.state == ChildState.RUNNING and c.ready and c.next_job_id is None
                and c.release_job_by is None and c.kill_reason is None and c.last_job_s is not None
                and c.last_job_s < PREFETCH_WITHIN_S]

    def holder(self, job_id: int) -> Child | None:
        return next((c for c in self.workers() if job_id in (c.job_id, c.next_job_id)), None)

    def start_all(self) -> None:
        now = self.clock()
        for child in self:
            if child.state == ChildState.STOPPED:
                child.spawn(now)

    def all_stopped(self) -> bool:
        return all(c.state in (ChildState.STOPPED, ChildState.FATAL) for c in self)

    def waitables(self) -> list:
        return [w for c in self for w in c.waitables()]

    def any_sentinel(self, ready: list) -> bool:
        """Whether `ready` (what the loop's wait returned) holds a child's process sentinel: it died."""
        if not ready:
            return False
        sentinels = {c.proc.sentinel for c in self if isinstance(c, ForkedChild) and c.proc is not None}
        return any(w in sentinels for w in ready if isinstance(w, int))

    # --- stopping -------------------------------------------------------------------------------

    def stop(self, child: Child, now: float) -> None:
        """Polite: an idle worker exits on the stop message; never SIGKILL one waiting for work."""
        if child.state in (ChildState.BACKOFF, ChildState.EXITED):
            child.change_state(ChildState.STOPPED, "stopping")
            return
        if not child.live:
            return
        child.change_state(ChildState.STOPPING, "stopping")
        if isinstance(child, FreshChild) or not child.send({"type": "stop"}):
            child.terminate(KillReason.SHUTDOWN, now)

    def stop_all(self) -> None:
        now = self.clock()
        for child in self:
            try:
                self.stop(child, now)
            except Exception:  # the stop path must reach every child
                log.exception("could not stop %s", child.name)

    def kill_all(self) -> None:
        for child in self:
            if child.live and child.alive():
                child.kill()

    # --- reaping and restarting -------------------------------------------------------------

    def reap(self, stopping: bool) -> list[Exit]:
        """Every child that died since the last call: closed, and set to BACKOFF, STOPPED or
        FATAL by the restart rules. Raises Fatal for a child that keeps failing at boot."""
        now = self.clock()
        exits = []
        fatal = None
        for child in self:
            if not child.live or child.alive():
                continue
            code = child.exitcode()
            planned = stopping or child.state == ChildState.STOPPING
            reason = child.kill_reason or KillReason.CRASH
            job_id, next_job_id, child.job_id, child.next_job_id = child.job_id, child.next_job_id, None, None
            exits.append(Exit(child, code, reason, job_id, planned, next_job_id))
            child.change_state(ChildState.EXITED, f"exit code {code}")
            child.pid = None
            if planned or child.oneshot:
                child.change_state(ChildState.STOPPED, "stopped" if planned else f"done (exit code {code})")
                continue
            child.restarts += 1
            if not child.ready and reason == KillReason.CRASH:
                child.boot_failures.append(now)
                if (len(child.boot_failures) == BOOT_FAILURE_LIMIT
                        and now - child.boot_failures[0] <= BOOT_FAILURE_WINDOW_S):
                    cause = child.last_error or (child.stderr_tail[-1] if child.stderr_tail else f"exit code {code}")
                    child.change_state(ChildState.FATAL, cause)
                    fatal = (f"{child.name} failed to start {BOOT_FAILURE_LIMIT} times in "
                             f"{int(BOOT_FAILURE_WINDOW_S)} s; last cause: {cause}")
                    continue
            delay = self.restart_delay(child, reason, job_id, now)
            child.restart_at = now + delay
            child.change_state(ChildState.BACKOFF, f"restart in {delay:.0f} s")
            log.warning("%s exited (code %s, %s); restarting in %.0f s", child.name, code, reason, delay)
        if fatal:
            raise Fatal(fatal)
        return exits

    def restart_delay(self, child: Child, reason: KillReason, job_id: int | None, now: float) -> float:
        """SPEC §5: backoff is for crash loops (a child that dies within 10 s of its start, or a
        worker that dies again on the same job); a worker lost after real work restarts at once,
        and so does one we stopped for a timeout or a cancel."""
        if reason in (KillReason.TIMEOUT, KillReason.CANCEL, KillReason.RELOAD):
            child.last_death_job = job_id
            return 0.0
        quick = now - child.started_mono < QUICK_DEATH_S
        same_job = job_id is not None and job_id == child.last_death_job
        child.last_death_job = job_id
        if not (quick or same_job):
            child.consecutive_failures = 0
            return 0.0
        child.consecutive_failures += 1
        return self.restart_policy.delay(child.consecutive_failures)

    def restart_due(self) -> None:
        now = self.clock()
        for child in self:
            if child.state == ChildState.BACKOFF and now >= child.restart_at:
                child.spawn(now)

    # --- deadlines ----------------------------------------------------------------------------

    def enforce(self, timeout_s: float, stop_deadline: float | None) -> list[tuple[str, dict]]:
        """Kill what ran past its deadline: SIGKILL after the grace of a SIGTERM, a child that never
        booted, a job never acknowledged, a file past `timeout`, a cancel not taken. Returns the
        events to emit (download_timeout)."""
        now = self.clock()
        events = []
        for child in self:
            if not child.live:
                continue
            if child.term_sent_mono is not None:
                if now - child.term_sent_mono >= KILL_GRACE_S and child.alive():
                    log.warning("%s ignored SIGTERM for %.0f s; killing it", child.name, KILL_GRACE_S)
                    child.kill()
                continue
            if child.state == ChildState.STOPPING:
                if stop_deadline is not None and now > stop_deadline - KILL_GRACE_S - 1:
                    child.terminate(KillReason.SHUTDOWN, now)
                continue
            if child.state == ChildState.STARTING and now - child.started_mono > BOOT_DEADLINE_S:
                log.warning("%s did not finish booting in %.0f s; restarting it", child.name, BOOT_DEADLINE_S)
                child.last_error = f"did not finish booting in {BOOT_DEADLINE_S:.0f} s"
                child.terminate(KillReason.CRASH, now)
                continue
            if child.kind != ChildKind.WORKER or child.job_id is None:
                continue
            if child.release_job_by is not None and now >= child.release_job_by:
                log.warning("job %s did not stop within %.0f s of its cancel or pause; stopping %s", child.job_id,
                            RELEASE_GRACE_S, child.name)
                child.terminate(KillReason.CANCEL, now)
                continue
            if child.acked_mono is None:
                if now - child.assigned_mono > ACK_DEADLINE_S:
                    log.warning("%s never acknowledged job %s; restarting it", child.name, child.job_id)
                    child.terminate(KillReason.CRASH, now)
                continue
            if now - child.acked_mono > timeout_s:
                log.warning("job %s on %s ran past timeout = %g s; stopping the worker", child.job_id, child.name,
                            timeout_s)
                events.append(("download_timeout", {"job_id": child.job_id, "timeout_s": timeout_s}))
                child.terminate(KillReason.TIMEOUT, now)
        return events

    def next_due(self, timeout_s: float, stop_deadline: float | None) -> float | None:
        """The earliest moment (monotonic) a deadline above falls or a restart is due."""
        times = []
        for child in self:
            if child.state == ChildState.BACKOFF:
                times.append(child.restart_at)
            if not child.live:
                continue
            if child.term_sent_mono is not None:
                times.append(child.term_sent_mono + KILL_GRACE_S)
                continue
            if child.state == ChildState.STOPPING:
                if stop_deadline is not None:
                    times.append(stop_deadline - KILL_GRACE_S - 1)
                continue
            if child.state == ChildState.STARTING:
                times.append(child.started_mono + BOOT_DEADLINE_S)
            if child.job_id is not None:
                if child.release_job_by is not None:
                    times.append(child.release_job_by)
                if child.acked_mono is None:
                    times.append(child.assigned_mono + ACK_DEADLINE_S)
                else:
                    times.append(child.acked_mono + timeout_s)
        return min(times) if times else None
