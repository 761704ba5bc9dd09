"""The shared speed cap's arithmetic with an injected clock: the total of several connections stays
at the cap over any 10 s, a change takes effect at the next chunk, and schedules pick their window."""
from __future__ import annotations

import pytest

from ipc.ratelimit import SharedRateLimit, effective_rate, next_boundary_s


class Clock:
    def __init__(self):
        self.t = 1_000.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


@pytest.fixture
def clock():
    return Clock()


def limiter(tmp_path, clock):
    return SharedRateLimit(tmp_path / "speed", clock=clock, sleep=clock.sleep)


def test_no_cap_costs_nothing(tmp_path, clock):
    lim = limiter(tmp_path, clock)
    lim.set_rate(0)
    assert sum(lim.consume(1 << 20) for _ in range(100)) == 0


def test_several_connections_share_the_cap_within_a_few_percent(tmp_path, clock):
    rate = 5_000_000
    conns = [limiter(tmp_path, clock) for _ in range(16)]  # 2 workers x 8 connections
    conns[0].set_rate(rate)
    start, sent, samples = clock(), 0, []
    i = 0
    while clock() - start < 30:
        conns[i % 16].consume(256 * 1024)  # each connection reads a chunk, then is held back
        sent += 256 * 1024
        samples.append((clock() - start, sent))
        i += 1
    achieved = sent / (clock() - start)
    assert abs(achieved - rate) / rate < 0.05, achieved
    # ... and over every 10 s window as well (a quarter second of burst at most).
    for t0, s0 in samples[::50]:
        end = next(((t, s) for t, s in samples if t >= t0 + 10), None)
        if end is not None:
            window = (end[1] - s0) / (end[0] - t0)
            assert abs(window - rate) / rate < 0.05, (t0, window)


def test_a_lower_cap_applies_at_once(tmp_path, clock):
    lim = limiter(tmp_path, clock)
    lim.set_rate(100_000_000)
    for _ in range(40):
        lim.consume(1 << 20)
    lim.set_rate(1_000_000)
    slept = lim.consume(1_000_000)
    assert 0.7 <= slept <= 1.0, "one second of the new cap, not the debt of the old one"


def test_a_stop_ends_the_wait(tmp_path, clock):
    lim = limiter(tmp_path, clock)
    lim.set_rate(1000)
    assert lim.consume(100_000, should_stop=lambda: True) == 0


def test_effective_rate_override_schedule_config():
    night = ((23 * 60, 8 * 60, 0),)
    day = ((8 * 60, 23 * 60, 5_000_000),)
    assert effective_rate(20_000_000, day, None, 12 * 60) == (5_000_000, "schedule")
    assert effective_rate(20_000_000, day, None, 7 * 60) == (20_000_000, "config")
    assert effective_rate(20_000_000, night, None, 2 * 60) == (0, "schedule")  # across midnight
    assert effective_rate(20_000_000, night, None, 22 * 60) == (20_000_000, "config")
    assert effective_rate(20_000_000, day, 1_000, 12 * 60) == (1_000, "api")


def test_next_boundary():
    day = ((8 * 60, 23 * 60, 5_000_000),)
    assert next_boundary_s(day, 7 * 60 + 59, 30.0) == 30.0
    assert next_boundary_s(day, 23 * 60, 0.0) == 9 * 3600
    assert next_boundary_s((), 0) is None
