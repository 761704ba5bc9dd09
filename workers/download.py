"""The download of one job: resolve it, resume its partial file, stream and hash, verify, rename into place."""
from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import math
import mmap
import os
import queue
import shutil
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from ipc.files import OutsideError, dir_syncs_batched, make_folder_inside, try_lock_fd
from ipc.layouts import folder_for
from ipc.naming import FolderError, alternate_filename, check_folder, fold_case, part_filename, safe_filename
from ipc.oslayer import OS
from ipc.ratelimit import SharedRateLimit
from ipc.throttle import file_lock
from workers import segments
from workers.civitai import (
    CDN_RERESOLVES,
    TEXT_FILE_SUFFIXES,
    UNHASHED_RECHECK_S,
    CdnRefused,
    CivitaiClient,
    CivitaiError,
    Download,
    Resolved,
    early_access_error,
    resolve,
    sniff_error_body,
    utc_text,
)

log = logging.getLogger(__name__)

BUF_SIZE = 1 << 20  # one socket readinto(); hashed and written as a unit
N_BUFS = 8  # buffers in flight between reader, hasher and writer: bounds memory at 8 MiB
WRITE_PIECE = 1 << 20  # bytes per os.write()
HASH_CHUNK = 1 << 20
POLL_S = 0.25  # should_stop(), stall and progress checks
PROGRESS_INTERVAL_S = 0.25  # at most 4 progress messages a second
RECORD_AFTER_S = 0.5  # a fresh body's resume record is written this far in (_Job._stream_one)
HOLDER_WAIT_S = RECORD_AFTER_S + 1.0  # for another job's record before taking its file as busy
HOLDER_POLL_S = 0.05
SPEED_WINDOW_S = 3.0
MAX_RESTARTS = 2  # restarts from zero within one attempt (200 to a Range, 416, bad Content-Range)
DISK_MARGIN_BYTES = 16 << 20
SIZE_TOLERANCE = (64 << 10, 0.01)  # sizeKB is only an estimate: absolute bytes, fraction
O_BINARY = getattr(os, "O_BINARY", 0)
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# Linux: write the partial file with O_DIRECT. Copying into the page cache cost more CPU than
# hashing on the machines we measured (and evicts the user's cache for a file nobody reads now);
# any refusal (other OS, tmpfs, FUSE, odd alignment) falls back to plain writes.
USE_DIRECT_IO = hasattr(os, "O_DIRECT")
DIRECT_ALIGN = 4096  # offset, length and memory alignment that every Linux block device accepts
STAGE_SIZE = 2 << 20  # staging for pieces that are not a multiple of DIRECT_ALIGN


@dataclass
class JobContext:
    client: CivitaiClient
    download_dir: Path  # absolute base folder
    locks_dir: Path  # data/locks (for ipc.throttle.file_lock around the final check+rename)
    allow_unsafe: bool
    read_timeout_s: float = 10  # no bytes for this long: the attempt fails as stalled
    layout: str = "plain"  # the folder of a job that names none: ipc.layouts.folder_for
    folders: dict = field(default_factory=dict)  # config `folders`: Civitai type -> folder
    # Called once the file is at its final path and verified (downloaded or already there), e.g.
    # to write sidecars; whatever it raises is logged and never fails the job.
    on_verified: Callable[[Resolved, Path], None] | None = None
    connections: int = 4  # config `connections`: at most this many for one file (workers/segments.py)
    rate_limit: SharedRateLimit | None = None  # the shared speed cap; None: locks_dir/speed.rate
    # A job's resolve_ahead() already under way (a job sent ahead, resolved while the one before
    # it ran: workers/worker.py), or None: run_job takes its result instead of asking again.
    resolved_ahead: Callable[[int], Future | None] | None = None


@dataclass
class _PartState:
    """What the claimed partial file holds of the file: `prefix` bytes in order from the start,
    hashed into `hasher`; with several connections also bytes past it (`missing`: the ranges
    still to fetch, of a file of `size` bytes)."""

    hasher: hashlib._Hash  # hashlib.sha256(); the name exists only in the stubs (never evaluated here)
    prefix: int = 0
    validator: str | None = None  # If-Range: the ETag, else the Last-Modified it was written with
    etag: str | None = None
    last_modified: str | None = None
    missing: list | None = None
    size: int | None = None

    def written_past(self, start: int) -> bool:
        """Whether bytes past `start` are already in the file (several connections wrote it)."""
        if self.missing is None or self.size is None or start >= self.size:
            return False
        still = sum(max(0, b - max(a, start)) for a, b in self.missing)
        return still < self.size - start


def _recorded_missing(meta: dict, end: int | None, have: int) -> list | None:
    """The missing ranges a sidecar of several connections records, checked: the file's size as
    now known, sorted ranges inside it, starts aligned down for direct writes, and nothing
    counted as present past the partial file's length. None: not such a sidecar, or not one
    to trust (the partial file is then resumed as a prefix)."""
    size, missing = meta.get("size"), meta.get("missing")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or not isinstance(missing, list):
        return None
    if end is not None and size != end:
        return None
    ranges = []
    for item in missing:
        if (not isinstance(item, list) or len(item) != 2 or not all(isinstance(x, int) and not isinstance(x, bool)
                                                                   for x in item)):
            return None
        a, b = item
        if not 0 <= a < b <= size:
            return None
        ranges.append([segments.align_down(a), b])
    if have < size:
        ranges.append([segments.align_down(have), size])
    return segments.merge(ranges)


def resolve_job(client: CivitaiClient, job: dict) -> Resolved:
    """What run_job asks Civitai first: the job's file, from its metadata."""
    return resolve(client, model_id=job.get("model_id"), version_id=job.get("version_id"),
                   file_id=job.get("file_id"), attempt=int(job.get("attempt") or 1),
                   file_type=job.get("file_type"), format=job.get("format"), fp=job.get("fp"))


def resolve_ahead(client: CivitaiClient, job: dict) -> tuple[Resolved, str | None]:
    """resolve_job() and, for a file that will be fetched, the signed link Civitai's download
    endpoint redirects to (None when asking failed: the job asks again, and handles the answer,
    when it runs; a link refused by then is asked for again the same way)."""
    res = resolve_job(client, job)
    link = None
    if res.sha256 and not res.unsafe:  # else the job waits or fails before it downloads
        try:
            link = client.fresh_link(res.version_id, res.file_id)
        except Exception as exc:
            log.debug("no early link for model version %s: %s", res.version_id, exc)
    return res, link


def run_job(job: dict, ctx: JobContext, report: Callable[[dict], None],
            should_stop: Callable[[], bool]) -> dict:
    """Download one job's file into download_dir/<model_type>/<filename>, verified.

    Returns the "done" message; raises CivitaiError on failure (reason "cancelled" when
    should_stop() became true, with the partial file kept for a later attempt).
    `report` and `should_stop` are only called from the calling thread.
    """
    return _Job(job, ctx, report, should_stop).run()


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "?"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _norm_sha(value) -> str | None:
    if isinstance(value, str) and len(value.strip()) == 64:
        try:
            int(value.strip(), 16)
        except ValueError:
            return None
        return value.strip().lower()
    return None


def file_end(civitai_size: int | None, host_total: int | None) -> int | None:
    """Where the file ends: at the size Civitai gives, else at the length the file host
    declares (Content-Length, Content-Range). No body is kept past it (SPEC §9)."""
    return civitai_size if civitai_size is not None else host_total


def size_plausible(actual: int | None, estimate: int | None) -> bool:
    """Whether a real size fits Civitai's sizeKB estimate (which is only approximate)."""
    if actual is None or estimate is None:
        return True
    absolute, fraction = SIZE_TOLERANCE
    return abs(actual - estimate) <= max(absolute, estimate * fraction)


class _Call:
    """One blocking call handed to a helper thread, and what became of it."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.done = threading.Event()
        self.value = None
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._abandoned = False

    def run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            self.error = exc
        with self._lock:
            self.done.set()
            abandoned = self._abandoned
        if abandoned:
            self._close_value()

    def abandon(self) -> None:
        """The caller gave up: what the call opens, now or when it returns, is closed."""
        with self._lock:
            self._abandoned = True
            finished = self.done.is_set()
        if finished:
            self._close_value()

    def _close_value(self) -> None:
        if isinstance(self.value, Download):
            self.value.close()


class _Callers:
    """Helper threads for blocking calls, kept for the next call (a download makes several,
    and a thread's start was 9 % of a small file's cost). A thread whose call never returns
    is simply not handed another; each ends after IDLE_S without work."""

    IDLE_S = 60.0

    def __init__(self):
        self._lock = threading.Lock()
        self._idle: list[queue.SimpleQueue] = []

    def run(self, call: _Call, what: str) -> None:
        with self._lock:
            inbox = self._idle.pop() if self._idle else None
        if inbox is None:
            inbox = queue.SimpleQueue()
            threading.Thread(target=self._serve, args=(inbox,), name=f"civitai-{what}", daemon=True).start()
        inbox.put(call)

    def _serve(self, inbox: queue.SimpleQueue) -> None:
        while True:
            try:
                call = inbox.get(timeout=self.IDLE_S)
            except queue.Empty:
                with self._lock:
                    if inbox in self._idle:
                        self._idle.remove(inbox)
                        return
                continue  # handed a call just now: it is in the queue
            call.run()
            with self._lock:
                self._idle.append(inbox)


_CALLERS = _Callers()


class _Buffers:
    """The page-aligned read buffers of _Job._stream (mmap: direct I/O needs the alignment), kept
    for the next download: a fresh 1 MiB mapping per buffer and file cost a map, an unmap and a
    page fault per 4 KiB touched, a third of a small file's system time."""

    KEEP = 2 * N_BUFS  # two downloads' worth (a worker streams one file, or a few ranges, at a time)

    def __init__(self):
        self._lock = threading.Lock()
        self._free: list[mmap.mmap] = []

    def take(self, n: int) -> list[mmap.mmap]:
        with self._lock:
            got, self._free = self._free[:n], self._free[n:]
        return got + [mmap.mmap(-1, BUF_SIZE) for _ in range(n - len(got))]

    def give_back(self, bufs: list[mmap.mmap]) -> None:
        with self._lock:
            room = max(0, self.KEEP - len(self._free))
            self._free.extend(bufs[:room])
        for buf in bufs[room:]:
            try:
                buf.close()
            except BufferError:  # a slice still alive somewhere: the GC frees it
                pass


_BUFFERS = _Buffers()
SMALL_BODY = 8 << 20  # a body this short is hashed by the writing thread: a third thread costs more than it saves


class PartWriter:
    """Appends to the partial file from `offset` on: with O_DIRECT where it works (whole
    DIRECT_ALIGN blocks written straight from the caller's page-aligned buffer, other pieces
    gathered in an aligned staging buffer first), else plain writes. `close()` writes what is
    still staged, so the file always ends up holding every byte given to write()."""

    def __init__(self, path: Path, fd: int, offset: int, direct: bool | None = None):
        direct = USE_DIRECT_IO if direct is None else direct
        self.fd = fd
        self.offset = offset
        self.dfd = -1
        self.staged = 0
        self._stage: mmap.mmap | None = None
        self._stage_view: memoryview | None = None
        if direct and offset % DIRECT_ALIGN == 0:
            try:
                self.dfd = os.open(path, os.O_WRONLY | os.O_DIRECT | O_NOFOLLOW)
                os.lseek(self.dfd, offset, os.SEEK_SET)
                self._stage = mmap.mmap(-1, STAGE_SIZE)
                self._stage_view = memoryview(self._stage)
            except (OSError, ValueError, AttributeError):
                self._close_direct()
        if self.dfd < 0:
            os.lseek(fd, offset, os.SEEK_SET)

    @property
    def direct(self) -> bool:
        return self.dfd >= 0

    def _staging(self) -> memoryview:
        # Only direct writes stage, and __init__ keeps the direct descriptor only once the
        # staging buffer exists.
        assert self._stage_view is not None, "direct writes without a staging buffer"
        return self._stage_view

    def write(self, view: memoryview) -> None:
        """Write `view` (a slice from the start of a page-aligned buffer when direct). With
        direct I/O at most the last DIRECT_ALIGN - 1 bytes wait in the staging buffer, so a
        kill -9 loses no more than that of what reached write()."""
        if self.dfd < 0:
            self._plain(view)
            return
        if self.staged == 0:
            aligned = len(view) - len(view) % DIRECT_ALIGN
            if aligned:
                self._direct(view[:aligned])
                if self.dfd < 0:  # fell back to plain writes: the rest goes there too
                    self._plain(view[aligned:])
                    return
            view = view[aligned:]
        stage = self._staging()
        pos, n = 0, len(view)
        while pos < n:
            k = min(n - pos, STAGE_SIZE - self.staged)
            stage[self.staged: self.staged + k] = view[pos: pos + k]
            self.staged += k
            pos += k
            self._flush_stage()
            if self.dfd < 0:
                self._plain(view[pos:])
                return

    def _flush_stage(self) -> None:
        """Write the whole blocks of the staging buffer; keep only the tail that is not one."""
        aligned = self.staged - self.staged % DIRECT_ALIGN
        if not aligned:
            return
        tail = self.staged - aligned
        stage = self._staging()
        self._direct(stage[:aligned])
        if self.dfd < 0:  # fell back: the tail goes through the page cache too
            self._plain(stage[aligned:self.staged])
            self.staged = 0
            return
        stage[:tail] = stage[aligned:self.staged]
        self.staged = tail

    def _direct(self, view: memoryview) -> None:
        pos, n = 0, len(view)
        while pos < n:
            try:
                written = os.write(self.dfd, view[pos: min(n, pos + WRITE_PIECE)])
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                written = 0
            if written <= 0 or written % DIRECT_ALIGN:
                # refused (EINVAL) or a short, unaligned write: finish with plain writes
                self.offset += max(0, written)
                self._fall_back()
                self._plain(view[pos + max(0, written):])
                return
            pos += written
            self.offset += written

    def _plain(self, view: memoryview) -> None:
        pos, n = 0, len(view)
        while pos < n:
            written = os.write(self.fd, view[pos: min(n, pos + WRITE_PIECE)])
            pos += written
            self.offset += written

    def _fall_back(self) -> None:
        log.debug("direct I/O refused; writing the partial file through the page cache")
        self._close_direct()
        os.lseek(self.fd, self.offset, os.SEEK_SET)

    def _close_direct(self) -> None:
        if self.dfd >= 0:
            os.close(self.dfd)
            self.dfd = -1

    def close(self) -> None:
        """Write what is staged (through the page cache: it need not be aligned) and let go
        of the direct descriptor; the caller fsyncs `fd`."""
        try:
            if self.dfd >= 0:
                staged, self.staged = self.staged, 0
                os.lseek(self.fd, self.offset, os.SEEK_SET)
                if staged:
                    self._plain(self._staging()[:staged])
        finally:
            self._close_direct()
            if self._stage_view is not None:
                self._stage_view.release()
                self._stage_view = None
            if self._stage is not None:
                self._stage.close()
                self._stage = None


_TICK = object()


@dataclass
class _Reading:
    """What the reader thread of _Job._stream tells the writing thread."""

    last_read: float  # time.monotonic() of the last read (or of the speed cap letting it go on)
    chunk: int  # bytes per readinto(), from the speed cap (_read_size)
    in_cap: bool = False  # held back by the speed cap: no stall
    error: BaseException | None = None  # what ended the reads, for the writing thread to raise


class _FolderScan(NamedTuple):
    at: float  # CaseIndex.clock at the scan
    wall_ns: int  # the wall clock at the scan
    mtime_ns: int  # the folder's mtime then
    keys: dict[str, set[str]]  # fold_case(name) -> the names of the folder with that key


class CaseIndex:
    """Which names of a folder collide under case folding (Windows, macOS): the same file there,
    two different ones here. Scanning the folder for every download made an import of N files
    into one folder O(N^2), so each folder's fold keys are kept and scanned again only when the
    folder changed (its mtime) and at most once every RESCAN_S; names this process places are
    added as it places them. A twin another process placed within the last RESCAN_S may go
    unseen, which costs nothing here (a case-sensitive file system keeps both)."""

    RESCAN_S = 1.0
    MAX_FOLDERS = 256

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._folders: dict[str, _FolderScan] = {}

    def _keys(self, folder: Path) -> dict[str, set[str]]:
        where = str(folder)
        try:
            mtime = os.stat(folder).st_mtime_ns
        except OSError:
            return {}
        now = self.clock()
        known = self._folders.get(where)
        if known is not None:
            # Unchanged since a scan well after its last change (a change in the same clock tick
            # as the scan would not move the mtime: git's "racy" entries), or scanned just now.
            settled = known.mtime_ns == mtime and mtime < known.wall_ns - 1_000_000_000
            if settled or now - known.at < self.RESCAN_S:
                return known.keys
        keys: dict[str, set[str]] = {}
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    keys.setdefault(fold_case(entry.name), set()).add(entry.name)
        except OSError:
            pass
        if known is None and len(self._folders) >= self.MAX_FOLDERS:
            self._folders.clear()
        self._folders[where] = _FolderScan(now, time.time_ns(), mtime, keys)
        return keys

    def twin(self, folder: Path, name: str) -> str | None:
        """Another entry of `folder` whose name differs from `name` only in case (or Unicode
        form), or None."""
        for other in sorted(self._keys(folder).get(fold_case(name), ())):
            if other != name:
                return other
        return None

    def placed(self, folder: Path, name: str) -> None:
        known = self._folders.get(str(folder))
        if known is not None:
            known.keys.setdefault(fold_case(name), set()).add(name)


_CASES = CaseIndex()


class _SlowAlone(Exception):
    """A connection going on alone (it was fast at first) has slowed down for good."""

    def __init__(self, done: int):
        super().__init__(done)
        self.done = done


def _read_size(limit: SharedRateLimit) -> int:
    """One read: a whole buffer, or an eighth of a second of the speed cap when there is one,
    so a low cap holds the connection back in small steps the host does not time out on."""
    try:
        rate = limit.rate()
    except OSError:
        return BUF_SIZE
    return BUF_SIZE if rate <= 0 else max(16 << 10, min(BUF_SIZE, rate // 8))


class _Job:
    def __init__(self, job: dict, ctx: JobContext, report, should_stop):
        self.job = job
        self.job_id = job.get("job_id")
        self.ctx = ctx
        self.client = ctx.client
        self._report = report
        self._should_stop = should_stop
        self.subject = "the download"
        self.rel_name = "?"
        self.model_type = "?"  # the folder, relative to download_dir, once known
        self.part_path: Path | None = None
        self._early_link: str | None = None  # resolve_ahead()'s signed link, for the first open
        self._fd = -1  # the claimed (locked) partial file
        self._cut: tuple | None = None  # (file end, host's total) when a body went on past the file

    # -- small helpers ------------------------------------------------------------------------

    @property
    def _part(self) -> Path:
        # Every step that writes or renames the partial file runs after _choose_name claimed it.
        assert self.part_path is not None, "no partial file claimed"
        return self.part_path

    def _cancelled(self) -> CivitaiError:
        return CivitaiError("the download was cancelled; its partial file is kept so a later attempt resumes",
                            reason="cancelled")

    def _check_stop(self) -> None:
        if self._should_stop():
            raise self._cancelled()

    def _disk_error(self, exc: OSError, what: str) -> CivitaiError:
        if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
            return CivitaiError(f"the disk is full while {what} {self.rel_name}: free some space in "
                                f"{self.ctx.download_dir}", reason="disk")
        return CivitaiError(f"could not write {self.rel_name} while {what}: {exc.strerror or type(exc).__name__}",
                            reason="disk")

    def _interruptible(self, fn, what: str):
        """Run a blocking network call on a helper thread so should_stop() is still honoured
        within POLL_S; an abandoned call finishes (or times out) on its own and is closed."""
        call = _Call(fn)
        _CALLERS.run(call, what)
        while not call.done.wait(POLL_S):
            if self._should_stop():
                call.abandon()
                raise self._cancelled()
        if call.error is not None:
            raise call.error
        return call.value

    def _hash_fd(self, fd: int, hasher, limit: int | None = None) -> int:
        """Feed a file's bytes into `hasher` (up to `limit`), checking should_stop() as it goes."""
        raw = io.FileIO(fd, "r", closefd=False)
        buf = bytearray(HASH_CHUNK)
        view = memoryview(buf)
        total = 0
        next_check = time.monotonic() + POLL_S
        while limit is None or total < limit:
            want = HASH_CHUNK if limit is None else min(HASH_CHUNK, limit - total)
            n = raw.readinto(view[:want])
            if not n:
                break
            hasher.update(view[:n])
            total += n
            if time.monotonic() >= next_check:
                self._check_stop()
                next_check = time.monotonic() + POLL_S
        return total

    def _hash_path(self, path: Path) -> str | None:
        try:
            fd = os.open(path, os.O_RDONLY | O_BINARY | O_NOFOLLOW)
        except OSError:
            return None
        try:
            hasher = hashlib.sha256()
            self._hash_fd(fd, hasher)
            return hasher.hexdigest()
        finally:
            os.close(fd)

    def _target_state(self, path: Path, sha: str | None, size_estimate: int | None = None) -> str:
        """"free", "same" (a regular file with the expected hash) or "taken" (anything else)."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return "free"
        if not stat.S_ISREG(st.st_mode) or not sha:
            return "taken"
        if not size_plausible(st.st_size, size_estimate):
            return "taken"  # clearly another file: don't spend seconds hashing it
        return "same" if self._hash_path(path) == sha else "taken"

    # -- the job --------------------------------------------------------------------------------

    def run(self) -> dict:
        self._check_stop()
        job = self.job
        if job.get("model_type"):
            self._check_model_type(job["model_type"])  # the user's to fix: before asking Civitai anything
        ahead = (self.ctx.resolved_ahead(self.job_id)
                 if self.ctx.resolved_ahead is not None and self.job_id is not None else None)
        if ahead is not None:
            res, self._early_link = self._interruptible(ahead.result, "resolve")
        else:
            res = self._interruptible(lambda: resolve_job(self.client, job), "resolve")
        self.subject = f"model version {res.version_id}"
        # No folder named (GUI, API, `add`): the layout's folder for the file's type; a version's
        # VAE file goes where VAEs go, not beside its checkpoint.
        model_type = self._check_model_type(job.get("model_type") or folder_for(
            res.api_type, self.ctx.layout, self.ctx.folders, res.file_type))
        wanted = safe_filename(job["filename"]) if job.get("filename") else res.filename
        sha = res.sha256 or _norm_sha(job.get("sha256"))
        self.rel_name = f"{model_type}/{wanted}"
        resolved = {"type": "resolved", "job_id": self.job_id, "model_id": res.model_id,
                    "version_id": res.version_id, "file_id": res.file_id, "model_type": model_type,
                    "filename": wanted, "sha256": sha, "bytes_total": res.size_bytes,
                    "updatedAt": res.updated_at, "url": res.url, "model_name": res.model_name,
                    "version_name": res.version_name, "base_model": res.base_model}
        if res.unsafe and not self.ctx.allow_unsafe:
            self._report(resolved)
            raise CivitaiError(f"Civitai's scan flags the file of {self.subject} ({wanted}) as dangerous; it was not "
                               f"downloaded (set allow_unsafe in config.json to download it anyway)", reason="unsafe")
        if not sha:
            # Nothing to verify against: Civitai hashes a file when it scans it, minutes to hours
            # after upload. A file is never placed unverified, so the job waits (SPEC §9).
            self._report(resolved)
            until = time.time() + UNHASHED_RECHECK_S
            scan = f" (its scan is {res.scan.lower()})" if res.scan and res.scan != "Success" else ""
            raise CivitaiError(f"Civitai has not hashed the file of {self.subject} ({wanted}) yet{scan}; it is not "
                               f"placed unverified, so the job waits and asks Civitai again at {utc_text(until)}",
                               reason="unhashed", wait=True, wait_until=until)
        self.model_type = model_type
        folder = self._folder(model_type)
        candidates = list(dict.fromkeys([wanted, alternate_filename(wanted, res.version_id),
                                         alternate_filename(wanted, res.version_id, res.file_id)]))
        name, state = self._choose_name(folder, candidates, sha, res.size_bytes, res)
        self.rel_name = f"{model_type}/{name}"
        try:
            self._report({**resolved, "filename": name})
            if state == "same":
                self._remove_stale_part(folder, name)
                size = os.lstat(folder / name).st_size
                log.info("%s is already there and verified; skipping the download", self.rel_name)
                done = self._done(model_type, name, sha, size, skipped=True)
            else:
                done = self._download(folder, model_type, name, candidates[candidates.index(name):], res, sha)
        except BaseException:
            if self._fd >= 0 and os.fstat(self._fd).st_size == 0:
                self._release_part(discard=True)  # nothing worth keeping for a later attempt
            raise
        finally:
            self._release_part()
        # The file's rename and its .civitai.info's (same folder) made durable by one fsync of the
        # folder, before the caller sends `done`. Always, also when this job placed nothing: a file
        # found in place ("same", or a twin that appeared meanwhile) may be another job's rename
        # whose fsync is still ahead of it. A job that fails between the rename and here reports
        # no `done`; its retry verifies what it finds at the path (and syncs the folder too).
        with dir_syncs_batched() as pending:
            pending[folder] = None
            self._verified(res, folder / done["filename"])
        return done

    def _verified(self, res: Resolved, path: Path) -> None:
        """The file is in place and verified: tell ctx.on_verified (sidecars). Its failure is
        logged and never fails a job whose file is already there."""
        hook = self.ctx.on_verified
        if hook is None:
            return
        try:
            hook(res, path)
        except Exception:  # noqa: BLE001 - a hook is an extra; the download itself succeeded
            log.warning("after %s was verified, its follow-up work failed", self.rel_name, exc_info=True)

    def _done(self, model_type: str, name: str, sha: str, size: int, skipped: bool) -> dict:
        return {"type": "done", "job_id": self.job_id, "path": f"{model_type}/{name}", "filename": name,
                "sha256": sha, "bytes": size, "skipped": skipped}

    @staticmethod
    def _check_model_type(model_type) -> str:
        """The folder as the rules of ipc/naming.py accept it (NFC), else the reason to fix it."""
        try:
            return check_folder(model_type)
        except FolderError as exc:
            raise CivitaiError(f"model_type is not a folder the daemon can use: {exc}; fix it in the manifest",
                               reason="path_conflict") from None

    def _folder(self, model_type: str) -> Path:
        """download_dir/<model_type>, made as needed, one component at a time: none of them may
        be a symlink (or a junction), so nothing is ever written outside download_dir."""
        try:
            return make_folder_inside(self.ctx.download_dir, model_type)
        except OutsideError as exc:
            raise CivitaiError(str(exc), reason="path_conflict") from None
        except OSError as exc:
            raise self._disk_error(exc, "creating the folder for") from None

    def _choose_name(self, folder: Path, candidates: list[str], sha: str | None, estimate: int | None,
                     res: Resolved):
        """The first candidate that already holds this file ("same"), or that is free and whose
        partial file this job could claim ("free"; self._fd is then the claimed partial file)."""
        for name in candidates:
            unknown_until = time.monotonic() + HOLDER_WAIT_S
            while (got := self._try_name(folder, name, sha, estimate, res)) == "unknown holder":
                # Another job holds the partial file and has written no record yet (it writes it
                # RECORD_AFTER_S into the body, and never for a small file that arrives at once):
                # in a moment it has a record, or its file is in place, or it is gone.
                if time.monotonic() >= unknown_until:
                    raise CivitaiError(f"{self.model_type}/{name} is being downloaded by another job right now; "
                                       "this one waits for it", reason="busy", retryable=True, retry_after_s=10)
                if self._should_stop():
                    raise self._cancelled()
                time.sleep(HOLDER_POLL_S)
            if got is not None:
                return got
        raise CivitaiError(f"{self.model_type}/{candidates[0]} and its alternative names ({', '.join(candidates[1:])}) "
                           f"are all taken by other files: move one away or set another filename in the manifest",
                           reason="path_conflict")

    def _try_name(self, folder: Path, name: str, sha: str | None, estimate: int | None, res: Resolved):
        """(name, "same" | "free") as _choose_name returns it, None for "try the next name", or
        "unknown holder" (another job's partial file without a record: ask again in a moment)."""
        twin = _CASES.twin(folder, name)
        if twin is not None:
            # Windows and macOS take `twin` for `name`: writing one would replace the other.
            if self._target_state(folder / twin, sha, estimate) == "same":
                return twin, "same"
            log.info("%s/%s is taken by a different file (%s, which differs only in case); it is never "
                     "overwritten", self.model_type, name, twin)
            return None
        state = self._target_state(folder / name, sha, estimate)
        if state == "same":
            return name, state
        if state != "free":
            log.info("%s/%s is taken by a different file; it is never overwritten", self.model_type, name)
            return None
        part = folder / part_filename(name)
        if self._claim_part(part):
            return name, state
        holder = self._read_sidecar(part.with_name(part.name + ".json"))
        if holder is None:
            return "unknown holder"
        if holder.get("version_id") == res.version_id and holder.get("file_id") == res.file_id:
            # The very same file is on its way in another job: wait for it, never fetch twice.
            raise CivitaiError(f"{self.model_type}/{name} is being downloaded by another job right now; "
                               "this one waits for it", reason="busy", retryable=True, retry_after_s=10)
        log.info("%s/%s is being downloaded by another job; trying another name", self.model_type, name)
        return None

    # -- partial file and sidecar ------------------------------------------------------------------

    def _claim_part(self, part: Path) -> bool:
        """Open the partial file and lock it for this job (the kernel drops the lock if the
        worker dies). False if another job holds it. Done under the finalize lock, so it never
        interleaves with another job's last close-and-rename of the same name."""
        with file_lock(self.ctx.locks_dir / "finalize.lock"):
            try:
                st = os.lstat(part)
            except FileNotFoundError:
                st = None
            if st is not None and not stat.S_ISREG(st.st_mode):
                try:
                    os.unlink(part)  # a symlink or similar where our partial file goes: never follow it
                except OSError:
                    raise CivitaiError(f"{part} is in the way and is not a file: move it away",
                                       reason="path_conflict") from None
            try:
                fd = os.open(part, os.O_RDWR | os.O_CREAT | O_BINARY | O_NOFOLLOW, 0o644)
            except OSError as exc:
                raise self._disk_error(exc, "opening the partial file of") from None
            if not try_lock_fd(fd):
                os.close(fd)
                return False
            self._fd = fd
            self.part_path = part
            return True

    def _release_part(self, discard: bool = False) -> None:
        """Close (and with `discard`, delete along with its sidecar) the claimed partial file.
        Deleting before closing keeps the claim until the file is gone (not possible on Windows)."""
        fd, self._fd = self._fd, -1
        part = self.part_path
        if fd >= 0 and os.name == "nt":
            os.close(fd)
            fd = -1
        if discard and part is not None:
            for path in (part, part.with_name(part.name + ".json")):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("could not remove %s: %s", path, exc)
        if fd >= 0:
            os.close(fd)

    def _remove_stale_part(self, folder: Path, name: str) -> None:
        """A partial file beside a finished one is left over, unless a job is still writing it."""
        part = folder / part_filename(name)
        if os.path.lexists(part) and self._claim_part(part):
            self._release_part(discard=True)

    @staticmethod
    def _read_sidecar(path: Path) -> dict | None:
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _write_sidecar(self, path: Path, data: dict) -> None:
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(data, fh)
            OS.replace(tmp, path)
        except OSError as exc:
            raise self._disk_error(exc, "starting") from None

    def _open_part(self, side: Path, res: Resolved, sha: str | None) -> _PartState:
        """Keep what the claimed partial file holds of this very file, drop the rest; the bytes
        in order from the start (the contiguous prefix) are hashed again here, before anything
        is asked of the host, as a single connection's resume always did.

        One connection's partial file is a prefix (its length says how far it got); one written
        by several connections has holes, and its sidecar lists the missing ranges."""
        fd = self._fd
        meta = self._read_sidecar(side) or {}
        have = os.fstat(fd).st_size
        keep = (have > 0 and meta.get("version_id") == res.version_id
                and meta.get("file_id") == res.file_id and meta.get("sha256") == sha)
        state = _PartState(hashlib.sha256())
        end = file_end(res.size_bytes, meta.get("total"))
        missing = _recorded_missing(meta, end, have) if keep else None
        if keep and missing is None and "missing" in meta:
            # Written by several connections (its length says nothing), with a record that does
            # not fit: nothing in it can be trusted.
            log.info("discarding a partial file of %s whose record of missing ranges does not fit it", self.rel_name)
            keep = False
        if keep:
            if missing is not None:
                size = int(meta["size"])
                if have > size:
                    os.ftruncate(fd, size)
                state.missing, state.size = missing, size
                prefix = missing[0][0] if missing else size
                log.info("resuming %s: %s of %s are there (%d ranges missing)", self.rel_name,
                         fmt_bytes(size - sum(b - a for a, b in missing)), fmt_bytes(size), len(missing))
            else:
                if end is not None and have > end:
                    # Left by a body that went on past the file (before the cap existed): the file,
                    # if it is there, is the first `end` bytes.
                    log.info("%s: the partial file has %s, more than the file's %s; cutting it back",
                             self.rel_name, fmt_bytes(have), fmt_bytes(end))
                    have = end
                if USE_DIRECT_IO and have != end:
                    have -= have % DIRECT_ALIGN  # direct writes continue from an aligned offset
                log.info("resuming %s from %s", self.rel_name, fmt_bytes(have))
                os.ftruncate(fd, have)
                prefix = have
            os.lseek(fd, 0, os.SEEK_SET)
            state.prefix = self._hash_fd(fd, state.hasher, prefix)
            state.etag, state.last_modified = meta.get("etag"), meta.get("last_modified")
            state.validator = state.etag or state.last_modified
        else:
            if have:
                log.info("discarding a partial file of %s that belongs to another file or version", self.rel_name)
            os.ftruncate(fd, 0)
        os.lseek(fd, state.prefix, os.SEEK_SET)
        return state

    def _restart(self) -> _PartState:
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        return _PartState(hashlib.sha256())

    # -- download, verify, finalize ----------------------------------------------------------------

    def _download(self, folder: Path, model_type: str, name: str, names: list[str], res: Resolved,
                  sha: str | None) -> dict:
        side = folder / (part_filename(name) + ".json")
        part = self._open_part(side, res, sha)
        have, total, digest = self._fetch(side, part, res, sha, name)
        self._report({"type": "verifying", "job_id": self.job_id})
        ends = [n for n in (total, res.size_bytes) if n is not None]
        if ends and have < min(ends) and digest != sha:
            raise CivitaiError(f"the file of {self.subject} ended after {fmt_bytes(have)} of "
                               f"{fmt_bytes(min(ends))}; the next attempt resumes", reason="connection",
                               retryable=True)
        if sha and digest != sha:
            self._release_part(discard=True)
            got = f"(got {digest[:12]}…, expected {sha[:12]}…)"
            if self._cut is not None:
                end, declared = self._cut
                host = "without saying its length" if declared is None else f"(it declared {fmt_bytes(declared)})"
                raise CivitaiError(f"the file host sent more than the {fmt_bytes(end)} Civitai lists for "
                                   f"{self.subject} {host}, and those first {fmt_bytes(end)} do not match "
                                   f"Civitai's SHA-256 {got}; they were deleted and will be downloaded again",
                                   reason="hash_mismatch", retryable=True)
            raise CivitaiError(f"the downloaded file of {self.subject} does not match Civitai's SHA-256 "
                               f"{got}; it was deleted and will be downloaded again",
                               reason="hash_mismatch", retryable=True)
        if not sha and not size_plausible(have, res.size_bytes):
            self._release_part(discard=True)
            raise CivitaiError(f"the file of {self.subject} has {fmt_bytes(have)} but Civitai lists about "
                               f"{fmt_bytes(res.size_bytes)} (and gives no SHA-256 to check); it was deleted "
                               f"and will be downloaded again", reason="size_mismatch", retryable=True)
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise self._disk_error(exc, "saving") from None
        final, skipped = self._finalize(folder, names, digest, res.size_bytes)
        self.rel_name = f"{model_type}/{final}"
        # DEBUG: the supervisor's "job N done" line says the same, with the worker's name.
        log.debug("%s: %s verified (%s)", self.rel_name, fmt_bytes(have), digest[:12])
        return self._done(model_type, final, digest, have, skipped)

    def _fetch(self, side: Path, part: _PartState, res: Resolved, sha, name: str):
        """Bring the partial file to its full length, over several connections where the host
        allows it (segments.SPLIT_MIN_BYTES, JobContext.connections), else over one. Returns
        (length, the host's total or None, SHA-256 of the file)."""
        restarts = 0
        one_only = self.ctx.connections <= 1
        alone_ok = True  # a first connection fast enough may go on alone (segments.FAST_ONE_BPS)
        while True:
            start = part.prefix
            probe = not one_only and self._ranges_worth_asking(part, res)
            upto = self._first_piece_end(part, res) if probe else None
            try:
                link, self._early_link = self._early_link, None  # once: a later open asks Civitai
                dl: Download = self._interruptible(
                    lambda start=start, validator=part.validator, probe=probe, upto=upto, link=link:
                    self.client.open_download(
                        res.version_id, res.file_id, start=start, etag=validator if start else None,
                        read_timeout_s=self.ctx.read_timeout_s + 2, filename=name, probe=probe, end=upto, link=link),
                    "open")
            except CivitaiError as exc:
                if (exc.reason == "early_access" and exc.ends_at is None
                        and res.early_access_ends_at is not None):
                    raise early_access_error(self.subject, res.early_access_ends_at) from None
                raise
            with dl:
                if dl.status == 416:
                    # Nothing past `start`: complete, if that is where the file ends (the hash decides).
                    sidecar_total = part.size if part.size is not None else (
                        (self._read_sidecar(side) or {}).get("total") if start else None)
                    if start > 0 and not part.written_past(start) and (
                            sidecar_total is None or start in (sidecar_total, dl.total_size, res.size_bytes)):
                        log.info("%s: the partial file is already complete; verifying it", self.rel_name)
                        return start, start, part.hasher.hexdigest()
                    if restarts >= MAX_RESTARTS:
                        raise CivitaiError(f"the file host keeps refusing to resume {self.subject} (416); "
                                           f"it will be retried", reason="http_error", retryable=True, status=416)
                    restarts += 1
                    part = self._restart()
                    continue
                if dl.status == 206 and dl.start != start:
                    if restarts >= MAX_RESTARTS:
                        raise CivitaiError(f"the file host sent the wrong part of {self.subject}; it will be retried",
                                           reason="bad_body", retryable=True, status=206)
                    restarts += 1
                    part = self._restart()
                    continue
                if start > 0 and self._other_version(dl, part):
                    if restarts >= MAX_RESTARTS:
                        raise CivitaiError(f"the file host keeps sending parts of another version of {self.subject}; "
                                           f"it will be retried", reason="bad_body", retryable=True, status=206)
                    log.info("%s: the file host sent a part of another version of the file; starting from zero",
                             self.rel_name)
                    restarts += 1
                    part = self._restart()
                    continue
                if dl.status == 200 and start > 0:
                    log.info("%s: the file host sent the whole file again (file changed or no resume support); "
                             "starting from zero", self.rel_name)
                    part = self._restart()
                    start = 0
                total = dl.total_size
                if not size_plausible(total, res.size_bytes):
                    raise CivitaiError(f"the file host is sending {fmt_bytes(total)} for {self.subject} but Civitai "
                                       f"lists about {fmt_bytes(res.size_bytes)}; it will be retried",
                                       reason="size_mismatch", retryable=True)
                end = file_end(res.size_bytes, total)
                why = self._one_connection_why(dl, part, start, end) if probe else "one connection"
                if why is None:
                    assert end is not None  # _one_connection_why said "no length" otherwise
                    try:
                        digest = self._fetch_ranges(dl, side, part, res, sha, end, name, probe=alone_ok)
                    except segments.OneConnection as solo:
                        try:
                            return self._go_on_alone(solo, dl, side, part, res, sha, end, name)
                        except _SlowAlone as slow:
                            log.info("%s: one connection slowed down after %s; going on over several",
                                     self.rel_name, fmt_bytes(slow.done))
                            part = self._open_part(side, res, sha)  # what is there, hashed again
                            alone_ok = False
                            continue
                    except segments.RestartWhole as exc:
                        if restarts >= MAX_RESTARTS:
                            raise CivitaiError(f"the file host of {self.subject} keeps changing its answers ({exc}); "
                                               f"it will be retried", reason="bad_body", retryable=True) from None
                        log.info("%s: %s; starting from zero on one connection", self.rel_name, exc)
                        restarts += 1
                        part = self._restart()
                        one_only = True
                        continue
                    if total is not None and total > end:
                        self._cut = (end, total)
                    return end, total, digest
                if upto is not None and dl.status == 206 and (dl.content_length or 0) < (end or 0) - start:
                    # Only the first piece was asked for: ask again for all of it, over one connection.
                    log.info("%s: one connection (%s)", self.rel_name, why)
                    one_only = True
                    continue
                if part.written_past(start):
                    # One connection from here on: only the prefix counts, the bytes past it go.
                    log.info("%s: going on over one connection from %s", self.rel_name, fmt_bytes(start))
                    os.ftruncate(self._fd, start)
                    part.missing = None
                return self._stream_one(dl, side, part, res, sha, start, end, total, name)

    def _stream_one(self, dl: Download, side: Path, part: _PartState, res: Resolved, sha, start: int,
                    end: int | None, total: int | None, name: str, slow_below: float | None = None):
        """One connection's answer from `start` on into the file, hashed as it comes in."""
        if end is not None:
            dl.limit_body(end - start)
        self._check_disk_space((end or 0) - start)
        meta = {"version_id": res.version_id, "file_id": res.file_id, "sha256": sha,
                "etag": dl.etag, "last_modified": dl.last_modified, "total": total}

        recorded = False

        def record() -> None:
            nonlocal recorded
            self._write_sidecar(side, meta)
            recorded = True

        # The record a later attempt resumes from. A fresh start defers it to RECORD_AFTER_S into
        # the body (or the attempt's end, if that is sooner and it failed): a small file that
        # arrives at once then creates and deletes no record, two of its three temporary files
        # (an inode made and freed costs real time on some filesystems, and Windows' scanner opens
        # each new file). A record from an earlier attempt is rewritten at once: it must not
        # describe another answer of the host.
        deferred = start == 0 and not os.path.lexists(side)
        if not deferred:
            record()
        os.lseek(self._fd, start, os.SEEK_SET)
        have = self._stream(dl, self._fd, part.hasher, start, end, sniff=(start == 0),
                            json_ok=name.lower().endswith(TEXT_FILE_SUFFIXES), slow_below=slow_below,
                            record=record if deferred else None)
        if not recorded and end is not None and start < have < end:
            record()  # the body ended early: the next attempt resumes from what came
        if dl.overran:
            self._cut = (end, total)
            log.info("%s: the file host sent more than the file's %s (%s); the rest was dropped",
                     self.rel_name, fmt_bytes(end),
                     "it gave no length" if total is None else f"it declared {fmt_bytes(total)}")
        return have, total, part.hasher.hexdigest()

    def _go_on_alone(self, solo: segments.OneConnection, first: Download, side: Path, part: _PartState,
                     res: Resolved, sha, end: int, name: str):
        """The first piece showed one connection is as fast as the line: the rest over one
        connection (an open Range to the end of the same signed link), hashed as it comes."""
        at = solo.at
        # The file loses the length the ranges gave it up front: a resume goes by its length again.
        os.ftruncate(self._fd, at)
        part.prefix, part.missing, part.size = at, None, None
        session = self.client.cdn_session()
        try:
            try:
                dl = self._interruptible(
                    lambda: self.client.open_range(session, solo.url, at, end, first.etag or first.last_modified,
                                                   read_timeout_s=self.ctx.read_timeout_s + 2,
                                                   subject=self.subject, filename=name), "open")
            except CdnRefused:
                dl = self._interruptible(
                    lambda: self.client.open_download(res.version_id, res.file_id, start=at,
                                                      etag=first.etag or first.last_modified,
                                                      read_timeout_s=self.ctx.read_timeout_s + 2, filename=name),
                    "open")
            with dl:
                if dl.status != 206 or dl.start != at:
                    raise CivitaiError(f"the file host stopped serving parts of {self.subject} in the middle of "
                                       f"the download; the next attempt resumes", reason="bad_body", retryable=True,
                                       status=dl.status)
                # A host may let the first megabytes through fast and cap each connection after
                # them: then the rest goes over several connections after all.
                return self._stream_one(dl, side, part, res, sha, at, end, first.total_size, name,
                                        slow_below=segments.FAST_ONE_BPS / 2)
        finally:
            session.close()

    def _ranges_worth_asking(self, part: _PartState, res: Resolved) -> bool:
        """Whether to ask for a Range from the first byte on, to learn if the host serves parts."""
        if part.written_past(part.prefix):
            return True
        return res.size_bytes is None or res.size_bytes - part.prefix >= segments.SPLIT_MIN_BYTES

    def _first_piece_end(self, part: _PartState, res: Resolved) -> int | None:
        if part.missing is not None and part.missing:
            return segments.first_piece_end(part.missing, self.ctx.connections)
        if res.size_bytes is None or res.size_bytes <= part.prefix:
            return None
        return segments.first_piece_end([[part.prefix, res.size_bytes]], self.ctx.connections)

    @staticmethod
    def _one_connection_why(dl: Download, part: _PartState, start: int, end: int | None) -> str | None:
        """Why this answer does not allow several connections, or None when it does: a 206 with
        the exact length and a validator (ETag or Last-Modified, for If-Range on every range),
        from a file host (not Civitai itself: every request there is spaced by the throttle), and
        enough to fetch (or a partial file with holes)."""
        if dl.status != 206 or dl.total_size is None or end is None or end > dl.total_size:
            return "it does not serve parts of the file with their length"
        if dl.from_api:
            return "Civitai serves the file itself"
        if not (dl.etag or dl.last_modified):
            return "it gives no ETag or Last-Modified to ask for the parts of the very same file"
        if part.missing is not None and part.size != end:
            return "the file's length changed"
        if not part.written_past(start) and end - start < segments.SPLIT_MIN_BYTES:
            return "the rest is small"
        return None

    @staticmethod
    def _other_version(dl: Download, part: _PartState) -> bool:
        """A 206 whose validator is not the one the partial file was written with: the host
        ignored If-Range, and its bytes would mix two versions of the file."""
        if dl.status != 206 or not part.validator:
            return False
        if part.etag and dl.etag:
            return dl.etag != part.etag
        return bool(not part.etag and part.last_modified and dl.last_modified
                    and dl.last_modified != part.last_modified)

    def _fetch_ranges(self, dl: Download, side: Path, part: _PartState, res: Resolved, sha, end: int,
                      name: str, probe: bool = True) -> str:
        # Only an answer that gives the file's length gets here (_one_connection_why).
        assert dl.total_size is not None, "ranges of an answer without the file's length"
        start = part.prefix
        missing = part.missing if part.missing is not None else [[start, end]]
        todo = sum(b - a for a, b in missing)
        self._check_disk_space(todo)
        meta = {"version_id": res.version_id, "file_id": res.file_id, "sha256": sha, "etag": dl.etag,
                "last_modified": dl.last_modified, "total": dl.total_size, "size": end}

        def checkpoint(missing_now):
            self._write_sidecar(side, {**meta, "missing": missing_now})

        checkpoint(missing)  # before the file takes its full size (preallocate): its length then says nothing
        samples: deque = deque([(time.monotonic(), end - todo)])
        host = segments.Host(
            should_stop=self._should_stop,
            progress=lambda done, total: self._progress(samples, time.monotonic(), done, total),
            checkpoint=checkpoint,
            cancelled=self._cancelled,
            disk_error=lambda exc, what: self._disk_error(exc, what),
            read_error=self._read_error,
        )
        ranged = segments.RangedDownload(
            client=self.client, host=host, subject=self.subject, filename=name, version_id=res.version_id,
            file_id=res.file_id, path=self._part, fd=self._fd, size=end, host_total=dl.total_size,
            etag=dl.etag, last_modified=dl.last_modified, missing=missing, hasher=part.hasher,
            hashed_upto=start, width=self.ctx.connections, read_timeout_s=self.ctx.read_timeout_s,
            rate_limit=self.rate_limit, direct=USE_DIRECT_IO, max_renewals=CDN_RERESOLVES, probe=probe)
        log.info("%s: %s over %d connections", self.rel_name, fmt_bytes(todo), ranged.width)
        return ranged.run(dl)

    def _check_disk_space(self, needed: int) -> None:
        if needed <= 0:
            return
        try:
            free = shutil.disk_usage(self.ctx.download_dir).free
        except OSError:
            return
        if free < needed + DISK_MARGIN_BYTES:
            raise CivitaiError(f"not enough disk space for {self.rel_name}: it needs {fmt_bytes(needed)} more but "
                               f"only {fmt_bytes(free)} is free in {self.ctx.download_dir}", reason="disk")

    def _stream(self, dl: Download, fd: int, hasher, offset: int, total: int | None, *, sniff: bool,
                json_ok: bool, slow_below: float | None = None, record: Callable[[], None] | None = None) -> int:
        """Copy the body into the file at `offset`, hashing as it goes. Returns the new length.
        With `slow_below` (bytes/s), raises _SlowAlone when the rate falls under it for a while
        with much still to come (the bytes received are kept in the file; the hash is not).
        `record` (the partial file's sidecar) is called once RECORD_AFTER_S into the body, or
        when the attempt ends early with bytes in the file; never for a body that is all there
        by then.

        A reader thread fills a small ring of reused buffers with readinto(), a hasher thread
        hashes them (hashlib releases the GIL), and this thread writes them, reports progress and
        watches should_stop() and stalls. Order is kept, so the file is always a prefix of the
        body; buffers in flight when the attempt stops are simply dropped. A body known to be
        under SMALL_BODY is hashed by this thread instead of a third one. The reader runs on a
        kept helper thread and the buffers come from _BUFFERS.
        """
        expected = (total - offset) if total is not None else None
        inline_hash = expected is not None and expected <= SMALL_BODY
        bufs = _BUFFERS.take(N_BUFS)  # page-aligned, for direct I/O
        views = [memoryview(b) for b in bufs]
        writer = PartWriter(self._part, fd, offset)
        free_q: queue.SimpleQueue = queue.SimpleQueue()
        hash_q: queue.SimpleQueue = queue.SimpleQueue()
        write_q: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(N_BUFS):
            free_q.put(i)
        quit_flag = threading.Event()
        limit = self.rate_limit
        shared = _Reading(last_read=time.monotonic(), chunk=_read_size(limit))

        def read_loop():
            try:
                while not quit_flag.is_set():
                    i = free_q.get()
                    if i is None or quit_flag.is_set():
                        break
                    n = dl.readinto(views[i][: shared.chunk])
                    if not n:
                        break
                    shared.last_read = time.monotonic()
                    shared.in_cap = True
                    try:
                        limit.consume(n, quit_flag.is_set)
                    finally:
                        shared.in_cap = False
                        shared.last_read = time.monotonic()
                    out_q.put((i, n))
            except BaseException as exc:  # noqa: BLE001 - handed to the writing thread
                if not quit_flag.is_set():
                    shared.error = exc
            finally:
                out_q.put(None)

        def hash_loop():
            while True:
                item = hash_q.get()
                if item is None:
                    write_q.put(None)
                    return
                if not quit_flag.is_set():
                    hasher.update(views[item[0]][: item[1]])
                write_q.put(item)

        out_q = write_q if inline_hash else hash_q
        calls = [_Call(read_loop)]
        if not inline_hash:
            calls.append(_Call(hash_loop))
        for call, what in zip(calls, ("read", "hash")):
            _CALLERS.run(call, what)
        done = offset
        finished = False
        samples: deque = deque([(time.monotonic(), done)])
        last_write = next_check = next_cap = started = time.monotonic()
        next_report = next_check + PROGRESS_INTERVAL_S
        record_at = started + RECORD_AFTER_S if record is not None else math.inf
        try:
            while True:
                try:
                    item = write_q.get(timeout=POLL_S)
                except queue.Empty:
                    item = _TICK
                if item is None:
                    finished = True
                    break
                now = time.monotonic()
                if item is not _TICK:
                    i, n = item
                    if sniff:
                        sniff = False
                        kind = sniff_error_body("", bytes(views[i][:64]))
                        if kind and not (kind == "json" and json_ok):
                            raise self.client.bad_body_error(kind, self.subject, bytes(views[i][:n]))
                    if inline_hash:
                        hasher.update(views[i][:n])
                    try:
                        writer.write(views[i][:n])
                    except OSError as exc:
                        raise self._disk_error(exc, "downloading") from None
                    free_q.put(i)
                    done += n
                    last_write = now = time.monotonic()
                if now >= next_check:
                    next_check = now + POLL_S
                    if self._should_stop():
                        raise self._cancelled()
                    idle = now - max(last_write, shared.last_read)
                    if idle > self.ctx.read_timeout_s and not shared.in_cap:
                        raise CivitaiError(f"the download stalled: no data for {self.ctx.read_timeout_s:g} s "
                                           f"({fmt_bytes(done)} of {fmt_bytes(total)} saved; the next attempt "
                                           f"resumes)", reason="connection", retryable=True)
                if now >= record_at:
                    record_at = math.inf
                    record()  # type: ignore[misc]  # record_at is finite only with a record
                if now >= next_cap:
                    next_cap = now + 1.0
                    shared.chunk = _read_size(limit)
                if now >= next_report:
                    next_report = now + PROGRESS_INTERVAL_S
                    self._progress(samples, now, done, total)
                    if (slow_below is not None and now - started >= SPEED_WINDOW_S and total is not None
                            and total - done >= segments.SPLIT_MIN_BYTES
                            and (done - samples[0][1]) / max(now - samples[0][0], 1e-3) < slow_below):
                        raise _SlowAlone(done)
            error = shared.error
            if error is not None:
                raise self._read_error(error, done, total, dl.url)
            self._progress(samples, time.monotonic(), done, total)
            return done
        except BaseException:
            if record_at != math.inf and done > offset:
                try:
                    record()  # type: ignore[misc]
                except BaseException:  # noqa: BLE001 - the attempt's own error is the one to report
                    log.warning("%s: could not save the record of the partial file", self.rel_name, exc_info=True)
            raise
        finally:
            quit_flag.set()
            if not finished:
                dl.abort()
            free_q.put(None)
            for call in calls:
                call.done.wait(timeout=5)
            try:
                writer.close()
            except OSError as exc:
                raise self._disk_error(exc, "downloading") from None
            finally:
                if all(call.done.is_set() for call in calls):  # a stuck thread's buffers are never reused
                    for view in views:
                        try:
                            view.release()
                        except BufferError:  # a slice still alive somewhere (nothing writes it now)
                            pass
                    _BUFFERS.give_back(bufs)

    @property
    def rate_limit(self) -> SharedRateLimit:
        """The speed cap every connection of every worker shares (the supervisor sets its rate)."""
        if self.ctx.rate_limit is None:
            self.ctx.rate_limit = SharedRateLimit(self.ctx.locks_dir / "speed.rate")
        return self.ctx.rate_limit

    def _progress(self, samples: deque, now: float, done: int, total: int | None) -> None:
        samples.append((now, done))
        while len(samples) > 2 and now - samples[0][0] > SPEED_WINDOW_S:
            samples.popleft()
        span = now - samples[0][0]
        speed = int((done - samples[0][1]) / span) if span > 0 else 0
        self._report({"type": "progress", "job_id": self.job_id, "bytes_done": done, "bytes_total": total,
                      "speed_bps": speed})

    def _read_error(self, exc: BaseException, done: int, total: int | None, url: str) -> CivitaiError:
        """The job's error for a failed read of the body from `url` (redacted; "" when not known)."""
        if isinstance(exc, CivitaiError):
            return exc
        timeout_types: tuple = (socket.timeout, TimeoutError)
        try:
            import urllib3.exceptions

            timeout_types += (urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.TimeoutError)
        except ImportError:  # pragma: no cover - urllib3 comes with requests
            pass
        saved = f"{fmt_bytes(done)} of {fmt_bytes(total)} saved; the next attempt resumes"
        if isinstance(exc, timeout_types):
            return CivitaiError(f"the download stalled: no data for {self.ctx.read_timeout_s:g} s ({saved})",
                                reason="connection", retryable=True)
        host = url.split("/")[2] if url.count("/") >= 2 else "the file host"
        return CivitaiError(f"the connection to {host} broke during the download ({type(exc).__name__}; {saved})",
                            reason="connection", retryable=True)

    def _finalize(self, folder: Path, names: list[str], digest: str, estimate: int | None):
        """Move the verified file to the first of `names` that is free (or already holds this
        very file), under the lock every job takes for this step. Returns (name, skipped)."""
        part = self._part
        with file_lock(self.ctx.locks_dir / "finalize.lock"):
            self._check_stop()  # a cancel that came in during the last bytes: nothing reaches the final path
            for name in names:
                target = folder / name
                state = self._target_state(target, digest, estimate)
                if state == "same":
                    log.info("%s/%s appeared meanwhile with the same content; keeping it", self.model_type, name)
                    self._release_part(discard=True)
                    return name, True
                if state == "free":
                    if os.name == "nt":  # Windows cannot rename an open file
                        self._release_part()
                    try:
                        OS.replace(part, target)
                    except OSError as exc:
                        raise self._disk_error(exc, "renaming into place") from None
                    # Made durable by run()'s fsync of the folder with the sidecar's rename, before
                    # `done` and outside this lock (an fsync here held up the other workers' finalize).
                    _CASES.placed(folder, name)
                    self._release_part(discard=True)  # the sidecar; the part is gone already
                    return name, False
        raise CivitaiError(f"{self.model_type}/{names[0]} and its alternative names were taken by other files "
                           f"during the download: move one away; the verified file stays as {part.name}",
                           reason="path_conflict")
