"""Request spacing shared through a lock file (real processes; the clock is injected in-process)."""
import multiprocessing
import time

from ipc.throttle import Throttle


def test_wait_spaces_calls_by_the_interval(tmp_path):
    now = [1000.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    t = Throttle(tmp_path / "t", 2.0, clock=lambda: now[0], sleep=sleep)
    assert t.wait() == 0
    now[0] += 0.5
    assert t.wait() == 1.5
    assert slept == [1.5]


def _hit(path, interval, out):
    t = Throttle(path, interval)
    for _ in range(3):
        t.wait()
        out.put(time.time())


def test_spacing_holds_across_processes(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_hit, args=(tmp_path / "t", 0.1, out)) for _ in range(2)]
    for p in procs:
        p.start()
    stamps = sorted(out.get(timeout=30) for _ in range(6))
    for p in procs:
        p.join(10)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert min(gaps) >= 0.09, gaps


def test_zero_interval_never_waits(tmp_path):
    assert Throttle(tmp_path / "t", 0).wait() == 0
