"""Spacing of requests to Civitai across every process of the daemon.

A timestamp file guarded by an OS file lock: the kernel drops the lock when its holder dies,
so a worker killed mid-request can never freeze the others (a shared multiprocessing lock could).
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

if os.name == "nt":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _lock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        while True:
            try:
                msvcrt.locking(fd, msvcrt.LK_LOCK, 1)
                return
            except OSError:
                continue

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


@contextmanager
def file_lock(path: Path):
    """An exclusive lock between processes, held for the `with` block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        _lock(fd)
        try:
            yield fd
        finally:
            _unlock(fd)
    finally:
        os.close(fd)


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
