"""The speed cap shared by every connection of every worker (SPEC §2 `max_speed`, `speed_schedule`).

One small file holds the rate in force and the cap's clock (GCRA, the "virtual scheduling" form of
a token bucket): each connection, after reading n bytes, pushes the theoretical arrival time on by
n / rate under an OS file lock and sleeps for as long as it is ahead. One lock operation per
chunk, no retry loop, and the kernel drops the lock of a worker killed while holding it, so no
killed process can freeze the others. The supervisor alone sets the rate (config, schedule, an
override from the API); connections see a change at their next chunk.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from ipc.files import file_lock

BURST_S = 0.25  # how far ahead of the cap the total may run (the bucket's depth, in seconds of rate)
_RECORD = 96


def effective_rate(max_speed: int, schedule: tuple, override: int | None, minute_of_day: int) -> tuple[int, str]:
    """The cap in force (bytes/s, 0: none) and where it comes from: "api", "schedule" or "config"."""
    if override is not None:
        return int(override), "api"
    for start, end, rate in schedule:
        inside = start <= minute_of_day < end if start < end else (minute_of_day >= start or minute_of_day < end)
        if inside:
            return int(rate), "schedule"
    return int(max_speed), "config"


def next_boundary_s(schedule: tuple, minute_of_day: int, second: float = 0.0) -> float | None:
    """Seconds until the next window of `schedule` starts or ends (local time), if any."""
    if not schedule:
        return None
    now = minute_of_day * 60 + second
    best = None
    for start, end, _ in schedule:
        for edge in (start, end):
            delta = (edge * 60 - now) % 86400 or 86400
            best = delta if best is None else min(best, delta)
    return best


def local_minute(ts: float | None = None) -> tuple[int, float]:
    t = time.localtime(time.time() if ts is None else ts)
    return t.tm_hour * 60 + t.tm_min, float(t.tm_sec)


class SharedRateLimit:
    def __init__(self, path: Path, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep, burst_s: float = BURST_S):
        self.path = Path(path)
        self.clock = clock
        self.sleep = sleep
        self.burst_s = burst_s
        self._rate_cache: tuple[float, int] = (-1.0, 0)  # (checked at, rate): a free fast path

    @staticmethod
    def _read(fd: int) -> tuple[int, float]:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, _RECORD).decode("ascii", "replace").split()
        try:
            return int(raw[0]), float(raw[1])
        except (IndexError, ValueError):
            return 0, 0.0

    @staticmethod
    def _write(fd: int, rate: int, tat: float) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{rate} {tat:.6f}".ljust(_RECORD - 1).encode("ascii") + b"\n")

    def set_rate(self, rate: int) -> None:
        """The supervisor's: the cap in bytes per second (0: none). The clock restarts, so a
        lower cap applies at once instead of after the debt of the higher one."""
        with file_lock(self.path) as fd:
            _, tat = self._read(fd)
            self._write(fd, int(rate), min(tat, self.clock()))
        self._rate_cache = (self.clock(), int(rate))

    def rate(self) -> int:
        """The cap in force, read from the file at most once a second (a change applies within it)."""
        now = self.clock()
        checked, rate = self._rate_cache
        if 0 <= now - checked < 1.0:
            return rate
        with file_lock(self.path) as fd:
            rate = self._read(fd)[0]
        self._rate_cache = (now, rate)
        return rate

    def consume(self, nbytes: int, should_stop: Callable[[], bool] = lambda: False) -> float:
        """Account for `nbytes` just read; sleep while the total runs ahead of the cap. Returns the
        seconds slept. Without a cap this costs one read of the file a second."""
        now = self.clock()
        checked, rate = self._rate_cache
        if rate == 0 and 0 <= now - checked < 1.0:
            return 0.0
        with file_lock(self.path) as fd:
            rate, tat = self._read(fd)
            if rate <= 0:
                self._rate_cache = (now, 0)
                return 0.0
            tat = max(tat, now) + nbytes / rate
            self._write(fd, rate, tat)
        self._rate_cache = (now, rate)
        ahead = tat - now - self.burst_s
        slept = 0.0
        while ahead > 0 and not should_stop():
            step = min(ahead, 0.25)  # stay responsive to a cancel, a pause, or a raised cap
            self.sleep(step)
            slept += step
            ahead -= step
        return slept
