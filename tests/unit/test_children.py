"""The child pool's rules with an injected clock and children that are not processes: state
transitions, restart backoff (crash loops only), boot failures, and every deadline."""
from __future__ import annotations

import pytest

from ipc.children import (
    ACK_DEADLINE_S,
    BOOT_DEADLINE_S,
    KILL_GRACE_S,
    RELEASE_GRACE_S,
    Child,
    ChildPool,
    Fatal,
)
from ipc.states import ChildKind, ChildState, IllegalChildTransition, KillReason


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class FakeChild(Child):
    """A child whose process is a flag: `die(code)` ends it; signals are recorded."""

    def __init__(self, name, kind=ChildKind.WORKER, **kw):
        super().__init__(name=name, kind=kind, **kw)
        self.running = False
        self.code = None
        self.signals: list[str] = []
        self.sent: list[dict] = []
        self._next_pid = 100

    def _start(self):
        self.running, self.code = True, None
        self._next_pid += 1
        self.pid = self._next_pid

    def alive(self):
        return self.running

    def exitcode(self):
        return self.code

    def send(self, msg):
        self.sent.append(msg)
        if msg.get("type") == "stop":
            self.die(0)
        return True

    def _signal(self, kill):
        self.signals.append("KILL" if kill else "TERM")
        if kill:
            self.die(-9)

    def die(self, code):
        self.running, self.code = False, code


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def pool(clock):
    p = ChildPool(clock)
    p.add(FakeChild("worker-1"))
    p.add(FakeChild("updater", ChildKind.UPDATER))
    p.start_all()
    for child in p:
        child.mark_ready()
    return p


def test_one_change_state_checks_the_transition_and_reports_it(clock):
    seen = []
    child = FakeChild("w", on_change=lambda c, old, new, why: seen.append((str(old), str(new))))
    child.spawn(clock())
    child.mark_ready()
    assert seen == [("stopped", "starting"), ("starting", "running")]
    with pytest.raises(IllegalChildTransition):
        child.change_state(ChildState.BACKOFF)


def test_a_crash_soon_after_the_start_backs_off_doubling(pool, clock):
    worker = pool["worker-1"]
    delays = []
    for _ in range(5):
        clock.t += 2
        worker.die(-9)
        pool.reap(stopping=False)
        assert worker.state == ChildState.BACKOFF
        delays.append(worker.restart_at - clock.t)
        clock.t = worker.restart_at
        pool.restart_due()
        worker.mark_ready()
    assert delays == [1, 2, 4, 8, 16]


def test_a_worker_lost_after_real_work_restarts_at_once_and_again_on_the_same_job_backs_off(pool, clock):
    worker = pool["worker-1"]
    clock.t += 60
    worker.job_id = 7
    worker.die(-9)
    exits = pool.reap(stopping=False)
    assert [(e.job_id, e.reason) for e in exits] == [(7, KillReason.CRASH)]
    assert worker.restart_at == clock.t, "no backoff after real work"
    pool.restart_due()
    worker.mark_ready()
    clock.t += 60
    worker.job_id = 7  # the same job kills it again: a crash loop
    worker.die(-11)
    pool.reap(stopping=False)
    assert worker.restart_at - clock.t == 1
    clock.t = worker.restart_at
    pool.restart_due()
    worker.mark_ready()
    clock.t += 60
    worker.job_id = 8  # another job after real work: at once again, and the count starts over
    worker.die(-9)
    pool.reap(stopping=False)
    assert worker.restart_at == clock.t and worker.consecutive_failures == 0


def test_our_own_kills_restart_at_once(pool, clock):
    worker = pool["worker-1"]
    for reason in (KillReason.TIMEOUT, KillReason.CANCEL, KillReason.RELOAD):
        clock.t += 1
        worker.job_id = 3
        worker.terminate(reason, clock())
        worker.die(-15)
        pool.reap(stopping=False)
        assert worker.restart_at == clock.t, reason
        pool.restart_due()
        worker.mark_ready()


def test_five_boot_failures_in_a_minute_are_fatal_with_the_cause(clock):
    pool = ChildPool(clock)
    web = pool.add(FakeChild("web", ChildKind.WEB))
    pool.start_all()
    for n in range(5):
        web.stderr_tail.append("OSError: [Errno 98] Address already in use")
        web.die(1)
        if n < 4:
            pool.reap(stopping=False)
            clock.t = web.restart_at
            pool.restart_due()
        else:
            with pytest.raises(Fatal) as err:
                pool.reap(stopping=False)
    assert "web failed to start 5 times in 60 s; last cause: OSError: [Errno 98] Address already in use" in str(err.value)
    assert web.state == ChildState.FATAL


def test_crashes_after_booting_are_not_boot_failures(pool, clock):
    worker = pool["worker-1"]
    for _ in range(8):
        clock.t += 1
        worker.die(-9)
        pool.reap(stopping=False)
        clock.t = worker.restart_at
        pool.restart_due()
        worker.mark_ready()
    assert worker.state == ChildState.RUNNING


def test_deadlines_timeout_ack_release_boot_and_kill_grace(pool, clock):
    worker = pool["worker-1"]
    worker.job_id, worker.assigned_mono = 1, clock()
    assert pool.next_due(60, None) == clock() + ACK_DEADLINE_S
    clock.t += ACK_DEADLINE_S + 0.1
    assert pool.enforce(60, None) == [] and worker.signals == ["TERM"] and worker.kill_reason == KillReason.CRASH
    clock.t += KILL_GRACE_S
    pool.enforce(60, None)
    assert worker.signals == ["TERM", "KILL"]
    pool.reap(stopping=False)
    clock.t = worker.restart_at
    pool.restart_due()
    worker.mark_ready()

    worker.job_id, worker.assigned_mono, worker.acked_mono = 2, clock(), clock()
    assert pool.next_due(60, None) == clock() + 60
    clock.t += 60.5
    assert pool.enforce(60, None) == [("download_timeout", {"job_id": 2, "timeout_s": 60})]
    assert worker.kill_reason == KillReason.TIMEOUT
    worker.die(-15)
    pool.reap(stopping=False)
    pool.restart_due()
    worker.mark_ready()

    worker.job_id, worker.assigned_mono, worker.acked_mono = 3, clock(), clock()
    worker.release_job_by = clock() + RELEASE_GRACE_S
    assert pool.next_due(60, None) == worker.release_job_by
    clock.t += RELEASE_GRACE_S
    pool.enforce(60, None)
    assert worker.kill_reason == KillReason.CANCEL

    starting = pool.add(FakeChild("late", ChildKind.UPDATER))
    starting.spawn(clock())
    clock.t += BOOT_DEADLINE_S + 1
    pool.enforce(60, None)
    assert starting.signals[-1] == "TERM" and "did not finish booting" in starting.last_error


def test_an_idle_worker_stops_on_the_message_and_is_never_killed(pool, clock):
    pool.stop_all()
    worker = pool["worker-1"]
    assert {"type": "stop"} in worker.sent and worker.signals == []
    exits = pool.reap(stopping=True)
    assert all(e.planned for e in exits) and pool.all_stopped()


def test_a_child_in_backoff_is_simply_stopped(pool, clock):
    worker = pool["worker-1"]
    worker.die(-9)
    pool.reap(stopping=False)
    assert worker.state == ChildState.BACKOFF
    pool.stop(worker, clock())
    assert worker.state == ChildState.STOPPED


def _exit_when_told(name, conn, config_path, log_channel):
    conn.recv()  # any message: exit


def test_a_forked_childs_death_shows_as_its_sentinel_in_what_the_loop_waits_on():
    """The loop reaps only when a sentinel fires (or every REAP_POLL_S): any_sentinel must see a
    real child's death in the wait's result, and nothing else there (its pipe, a wake pipe)."""
    import multiprocessing
    import multiprocessing.connection

    from ipc.children import ForkedChild

    pool = ChildPool(Clock())
    child = pool.add(ForkedChild("worker-1", ChildKind.WORKER, _exit_when_told, lambda c: ("unused", ),
                                 ctx=multiprocessing.get_context("spawn")))
    wake_r, wake_w = multiprocessing.Pipe(duplex=False)
    pool.start_all()
    try:
        wake_w.send_bytes(b"x")
        ready = multiprocessing.connection.wait([wake_r, *pool.waitables()], timeout=10)
        assert ready == [wake_r] and not pool.any_sentinel(ready) and not pool.any_sentinel([])
        child.send({"type": "stop"})
        child.proc.join(30)
        ready = multiprocessing.connection.wait(pool.waitables(), timeout=10)
        assert child.proc.sentinel in ready and pool.any_sentinel(ready)
        assert [e.child.name for e in pool.reap(stopping=True)] == ["worker-1"]
    finally:
        if child.proc is not None and child.proc.is_alive():
            child.proc.kill()
