"""The file-system primitives every process shares, one copy each: locks between processes that
die with their holder, atomic replacement, making a rename durable, folders made inside a base,
and the data folder's pid lock. What differs on Windows is in ipc/oslayer.py."""
from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ipc.oslayer import OS

O_BINARY = getattr(os, "O_BINARY", 0)
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def lock_fd(fd: int) -> None:
    """Block until this process holds the lock of the open file `fd`."""
    OS.lock_fd(fd)


def unlock_fd(fd: int) -> None:
    OS.unlock_fd(fd)


def try_lock_fd(fd: int) -> bool:
    """Lock an open file for this process without waiting; False if another holds it."""
    return OS.try_lock_fd(fd)


@contextmanager
def file_lock(path: Path) -> Iterator[int]:
    """An exclusive lock between processes, held for the `with` block; the kernel drops it if
    the holder dies, so a killed process can never freeze the others."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | O_BINARY, 0o600)
    try:
        lock_fd(fd)
        try:
            yield fd
        finally:
            unlock_fd(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (nothing to do on Windows: NTFS journals renames)."""
    OS.fsync_dir(folder)


STALE_TEMP_S = 600.0  # a temp file of ours this old belongs to a writer that died (kill -9)


def remove_stale_temps(path: Path, now: float | None = None) -> int:
    """Remove `.<name>.<pid>.tmp` files beside `path` that a writer killed in the middle of an
    atomic write left behind (they live for milliseconds otherwise). Returns how many."""
    import time

    now = time.time() if now is None else now
    removed = 0
    try:
        candidates = [p for p in path.parent.glob(f".{glob_escape(path.name)}.*.tmp")]
    except OSError:
        return 0
    for candidate in candidates:
        middle = candidate.name[len(path.name) + 2:-4]
        try:
            if middle.isdigit() and now - os.lstat(candidate).st_mtime > STALE_TEMP_S:
                os.unlink(candidate)
                removed += 1
        except OSError:
            pass
    return removed


def glob_escape(name: str) -> str:
    import glob

    return glob.escape(name)


def atomic_write(path: Path, data: bytes, mode: int | None = None) -> None:
    """Temp file in the same folder, fsync, os.replace, fsync of the folder. The file keeps its
    permissions (or gets `mode`). A temp file a killed writer left behind is removed."""
    remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | O_BINARY, 0o600 if mode is None else mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if mode is None:
            try:
                os.chmod(tmp, os.stat(path).st_mode & 0o777)
            except OSError:
                os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


class PidLock:
    """One daemon per data folder: an exclusive lock on data/daemon.pid, held for the life of
    the process and dropped by the kernel when it dies (kill -9 included), on Linux and Windows.
    The file holds the holder's pid so that a second start can name it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd = -1

    def acquire(self) -> int | None:
        """Take the lock; returns None, or the pid of the running holder when it is taken."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | O_BINARY, 0o644)
        if not try_lock_fd(fd):
            try:
                os.lseek(fd, 1 if os.name == "nt" else 0, os.SEEK_SET)  # Windows: byte 0 is locked
                raw = os.read(fd, 64).decode("ascii", "replace").split()
                holder = int(raw[0]) if raw and raw[0].isdigit() else -1
            finally:
                os.close(fd)
            return holder
        # Windows locks byte 0 of the file: write the pid after it, keeping byte 0 a space.
        stamp = f" {os.getpid()}\n".encode("ascii") if os.name == "nt" else f"{os.getpid()}\n".encode("ascii")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, stamp)
        self.fd = fd
        return None

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class OutsideError(Exception):
    """A folder that would lead outside its base (a symlink, or not a folder): the message says which."""


def make_folder_inside(base: Path, rel: str) -> Path:
    """Create `base/rel` (rel already checked by ipc.naming.check_folder) one component at a time,
    following no symlink and creating nothing outside `base`. Returns the folder's real path."""
    base = Path(os.path.abspath(base))
    base.mkdir(parents=True, exist_ok=True)
    current = base
    for part in rel.split("/"):
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            try:
                os.mkdir(current)
            except FileExistsError:
                pass
            st = os.lstat(current)
        # resolve() also sees a Windows junction; normcase: it may give a folder's own case there.
        if stat.S_ISLNK(st.st_mode) or (stat.S_ISDIR(st.st_mode) and os.path.normcase(current.resolve())
                                          != os.path.normcase(current.parent.resolve() / part)):
            raise OutsideError(f"{current} is a symlink: the daemon only writes inside {base} and follows no "
                               f"link there; replace it with a real folder or choose another model_type")
        if not stat.S_ISDIR(st.st_mode):
            raise OutsideError(f"{current} exists but is not a folder: move it away")
    real_base, real = base.resolve(), current.resolve()
    if real != real_base and real_base not in real.parents:
        raise OutsideError(f"{current} leads outside download_dir: the daemon only writes inside {base}")
    return real
