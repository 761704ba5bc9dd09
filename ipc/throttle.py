"""Spacing of requests to Civitai across every process of the daemon.

A timestamp file guarded by an OS file lock: the kernel drops the lock when its holder dies,
so a worker killed mid-request can never freeze the others (a shared multiprocessing lock could).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from ipc.files import file_lock


class Throttle:
    """`wait()` returns once at least `interval_s` has passed since the previous `wait()`
    of any process sharing `path`."""

    def __init__(self, path: Path, interval_s: float, clock=time.time, sleep=time.sleep):
        self.path = Path(path)
        self.interval_s = float(interval_s)
        self._clock = clock
        self._sleep = sleep

    def wait(self) -> float:
        """Block until a request may go out; returns the seconds waited."""
        if self.interval_s <= 0:
            return 0.0
        with file_lock(self.path) as fd:
            os.lseek(fd, 0, os.SEEK_SET)
            raw = os.read(fd, 64)
            try:
                last = float(raw.decode("ascii").strip() or 0)
            except ValueError:
                last = 0.0
            now = self._clock()
            if last > now + self.interval_s:  # clock went back: don't wait forever
                last = 0.0
            waited = max(0.0, last + self.interval_s - now)
            if waited:
                self._sleep(waited)
            stamp = f"{self._clock():.6f}".ljust(32).encode("ascii")
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, stamp)
            return waited
