"""The file-system primitives every process shares, one copy each: locks between processes that
die with their holder, atomic replacement, making a rename durable, folders made inside a base,
and the data folder's pid lock. What differs on Windows is in ipc/oslayer.py."""
from __future__ import annotations

import os
import stat
import threading
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
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | O_BINARY, 0o600)
    except FileNotFoundError:  # the folder first (not looked for on every lock: a download takes several)
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


_batched = threading.local()


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (nothing to do on Windows: NTFS journals renames).
    Inside `dir_syncs_batched()` on this thread: at that block's end."""
    pending = getattr(_batched, "folders", None)
    if pending is not None:
        pending[Path(folder)] = None
        return
    OS.fsync_dir(folder)


@contextmanager
def dir_syncs_batched() -> Iterator[dict[Path, None]]:
    """Every fsync_dir() of this thread within the block is done once a folder, at its end
    (also when it raises). For several renames in one folder that must all be durable before
    one message (a verified file and its sidecar before `done`): one journal commit instead of
    one each, and none while a lock other processes wait for is held. Nested: the outer block's.
    Yields the pending folders, so a caller can add one it renamed into itself."""
    pending = getattr(_batched, "folders", None)
    if pending is not None:
        yield pending
        return
    _batched.folders = pending = {}
    try:
        yield pending
    finally:
        _batched.folders = None
        for folder in pending:
            OS.fsync_dir(folder)


STALE_TEMP_S = 600.0  # a temp file of ours this old belongs to a writer that died (kill -9)
TEMP_SWEEP_S = STALE_TEMP_S / 2  # how often one process looks through a folder for such files


class _TempSweeps:
    """The temp files a killed writer left, found by one scan of a folder every TEMP_SWEEP_S
    (per process) rather than one scan per write: a model folder holds thousands of files and
    gets a sidecar written per download, so a scan per write made an import quadratic. A temp
    is only ever removed by a write of its own target (`.<name>.<pid>.tmp` beside `name`)."""

    def __init__(self, clock=None):
        import time

        self.clock = clock or time.monotonic
        self._folders: dict[str, tuple[float, dict[str, list[str]]]] = {}

    def take(self, path: Path) -> list[Path]:
        """The temp files beside `path` seen by the last scan of its folder (scanned now when due)."""
        folder = os.path.abspath(path.parent)
        now = self.clock()
        seen = self._folders.get(folder)
        if seen is None or now - seen[0] >= TEMP_SWEEP_S:
            seen = (now, self._scan(folder))
            if len(self._folders) > 4096:
                self._folders.clear()  # bounded: a process writes into a few folders only
            self._folders[folder] = seen
        return [Path(folder, name) for name in seen[1].pop(path.name, ())]

    @staticmethod
    def _scan(folder: str) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    name = entry.name
                    if name.startswith(".") and name.endswith(".tmp"):
                        target, _, pid = name[1:-4].rpartition(".")
                        if target and pid.isdigit():
                            found.setdefault(target, []).append(name)
        except OSError:
            pass
        return found


_SWEEPS = _TempSweeps()


def remove_stale_temps(path: Path, now: float | None = None, sweeps: _TempSweeps | None = None) -> int:
    """Remove `.<name>.<pid>.tmp` files beside `path` that a writer killed in the middle of an
    atomic write left behind (they live for milliseconds otherwise). Returns how many."""
    import time

    now = time.time() if now is None else now
    removed = 0
    for candidate in (sweeps or _SWEEPS).take(path):
        try:
            if now - os.lstat(candidate).st_mtime > STALE_TEMP_S:
                os.unlink(candidate)
                removed += 1
        except OSError:
            pass
    return removed


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
        OS.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def open_descriptors(skip_under: tuple[Path, ...] = ()) -> list[int] | None:
    """This process's open descriptors but those of files inside `skip_under`, from
    /proc/self/fd; None where there is no such listing (only on Linux are children forked)."""
    try:
        entries = os.listdir("/proc/self/fd")
    except OSError:
        return None
    skips = [os.path.join(os.path.realpath(p), "") for p in skip_under]
    out = []
    for entry in entries:
        try:
            target = os.readlink(f"/proc/self/fd/{entry}")
        except OSError:
            continue  # the listing's own descriptor, closed by now
        if not any(target.startswith(s) for s in skips):
            out.append(int(entry))
    return out


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
    following no symlink and creating nothing outside `base`. Returns the folder's real path.

    The base is resolved once; each component is then judged by its own lstat (a symlink is
    refused). On Windows a junction is no symlink to lstat, so each component's resolved path is
    also compared with its parent's there (a download asked this four times over, 36 lstats)."""
    base = Path(os.path.abspath(base))
    base.mkdir(parents=True, exist_ok=True)
    real_base = base.resolve()
    current, real = base, real_base
    for part in rel.split("/"):
        current, real = current / part, real / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            try:
                os.mkdir(current)
            except FileExistsError:
                pass
            st = os.lstat(current)
        if stat.S_ISLNK(st.st_mode) or (os.name == "nt" and stat.S_ISDIR(st.st_mode)
                                         and os.path.normcase(current.resolve()) != os.path.normcase(real)):
            raise OutsideError(f"{current} is a symlink: the daemon only writes inside {base} and follows no "
                               f"link there; replace it with a real folder or choose another model_type")
        if not stat.S_ISDIR(st.st_mode):
            raise OutsideError(f"{current} exists but is not a folder: move it away")
    if os.name == "nt":
        real = current.resolve()  # its own case, as the folder has it
    if real != real_base and real_base not in real.parents:
        raise OutsideError(f"{current} leads outside download_dir: the daemon only writes inside {base}")
    return real
