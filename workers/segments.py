"""Several connections for one file (SPEC §9): pieces handed out in file order and split again when
one is slow, each written at its offset in the partial file, the SHA-256 over the bytes that are in
order while the rest still arrive, and the ranges' progress for the partial file's sidecar.

How the hash keeps up with ranges that arrive out of order: pieces are handed out from the lowest
missing offset on, so the connections always work side by side near the front, and the first
ones are staggered (1, 2, ... N shares of a piece) so that they end one after the other: the
bytes in order (the contiguous prefix) then grow all through the download, not a wave at a time.
Pieces shrink towards the end (PIECE_MIN), so the last ones end together. A hasher reads the
prefix back from the partial file as it grows (O_DIRECT, like the writes: no page cache, the
kernel reads straight into an aligned buffer) in one thread and hashes it in another; when the
last byte is written only the last few pieces are left to hash. Where the machine, not the line,
is the limit, the connections wait for the hasher past BACKLOG_MAX instead of leaving all the
hashing for the end; and a first connection that alone brings FAST_ONE_BPS goes on alone,
hashed from memory as one connection always was (OneConnection).

Work stealing: a connection with nothing left to take splits the piece that will take longest to
finish (its remaining time at its own speed) and takes the second half; a piece whose connection
has sent nothing for stall_s is taken over whole and that connection dropped.

The sidecar records what is missing ([start, end) ranges, the exact bytes written at the last
checkpoint), besides the validator it was written with: a resume fetches the holes only.
"""
from __future__ import annotations

import ctypes
import errno
import io
import logging
import mmap
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from workers.civitai import CdnRefused, CivitaiClient, CivitaiError, Download

log = logging.getLogger(__name__)

KiB, MiB = 1 << 10, 1 << 20
ALIGN = 4096  # offset, length and memory alignment of direct I/O (download.DIRECT_ALIGN)
# A file smaller than this goes over one connection: one connection at a CDN's usual 10-20 MB/s
# has it within about a second, about what opening more TLS connections and ramping them up costs.
SPLIT_MIN_BYTES = 16 * MiB
PIECE_MAX = 64 * MiB  # one request; a new one on the kept-alive connection costs one round trip
PIECE_MIN = 4 * MiB  # the last pieces: small, so they end together and leave little to hash
FIRST_MIN = 4 * MiB  # the staggered first pieces, at least (the first one is also the probe)
BUF_SIZE = 1 * MiB  # per connection: one socket read, written straight from there
HASH_READ = 2 * MiB  # the hasher's read-back unit
HASH_BUFS = 3
# Bytes in order but not hashed yet, at most: beyond it the connections wait for the hasher. Where
# the machine, not the line, is the limit, connections running ahead would take the CPU the hash
# needs and leave it all for after the last byte. Above PIECE_MAX: the prefix grows a piece at a time.
BACKLOG_MAX = 2 * PIECE_MAX
STEAL_MIN_S = 0.5  # a piece is split only if it has at least this long to go
STEAL_MIN_BYTES = 256 * KiB  # ... and this much
CHECKPOINT_S = 0.5  # the sidecar records progress this often: what a kill -9 can cost, at most
RANGE_TRIES = 4  # failures in a row of one piece without a new byte before the attempt fails
RETRY_DELAYS_S = (0.25, 0.5, 1.0, 2.0)
POLL_S = 0.25
# One connection alone first, for up to PROBE_S: as fast as FAST_ONE_BPS, it already has what the
# line gives, and more connections would only cost (their bytes, out of order, must be read back
# to be hashed: on a fast line the disk and the CPU are the limit, not the host's pacing). The
# download then goes on over that one connection, hashed as it comes in. Slower, the others start.
PROBE_S = 0.15
FAST_ONE_BPS = 100_000_000
JOIN_S = 1.5  # how long a stop waits for the connections to write what they hold
O_BINARY = getattr(os, "O_BINARY", 0)
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def align_down(n: int) -> int:
    return n - n % ALIGN


def align_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def merge(intervals) -> list[list[int]]:
    """Sorted, disjoint [start, end) intervals covering the same bytes; empty ones dropped."""
    out: list[list[int]] = []
    for a, b in sorted((int(a), int(b)) for a, b in intervals if b > a):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def piece_size(left: int, width: int) -> int:
    """A piece's length once under way: a share of what is left, so that the last pieces, small,
    end at about the same time and leave little to hash after the last byte."""
    return align_up(min(PIECE_MAX, max(PIECE_MIN, left // (2 * max(1, width)))))


def first_wave(left: int, width: int) -> list[int]:
    """The lengths of the first `width` pieces: 1, 2, ... `width` shares of a whole piece. Equal
    pieces started together would end together, and the bytes in order would grow in bursts,
    a wave at a time; staggered, each connection's next piece ends soon after the one before
    it in the file, and the prefix (what can be hashed) grows all along."""
    whole = piece_size(left, width)
    return [align_up(max(FIRST_MIN, whole * (k + 1) // width)) for k in range(width)]


def effective_width(todo: int, width: int) -> int:
    """No more connections than there are minimum-sized pieces to fetch."""
    return max(1, min(width, -(-todo // PIECE_MIN)))


def first_piece_end(missing: list[list[int]], width: int) -> int:
    """Where the first piece ends: the first request, which also learns whether the host serves
    ranges at all, asks for no more than that."""
    a, b = missing[0]
    left = sum(y - x for x, y in missing)
    cut = a + first_wave(left, effective_width(left, width))[0]
    return b if cut >= b - FIRST_MIN // 2 else cut


# -- positional I/O (Windows has neither pwrite nor preadv) -------------------------------------------

_SEEK_LOCK = threading.Lock()


def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    pos, n = 0, len(view)
    while pos < n:
        if hasattr(os, "pwrite"):
            written = os.pwrite(fd, view[pos:], offset + pos)
        else:  # pragma: no cover - Windows: one descriptor, seek and write under a lock
            with _SEEK_LOCK:
                os.lseek(fd, offset + pos, os.SEEK_SET)
                written = os.write(fd, view[pos:])
        if written <= 0:
            raise OSError(errno.EIO, "short write")
        pos += written


def pread_into(fd: int, view: memoryview, offset: int) -> int:
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    with _SEEK_LOCK:  # pragma: no cover - Windows
        os.lseek(fd, offset, os.SEEK_SET)
        return io.FileIO(fd, "r", closefd=False).readinto(view)


def _libc_fallocate():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    fn.restype = ctypes.c_int
    return fn


_FALLOCATE = _libc_fallocate()


def preallocate(fd: int, size: int) -> bool:
    """Give the partial file its blocks up front (Linux fallocate(2), never glibc's emulation,
    which writes every block: hours on a NAS). Writes into allocated blocks below the file's end
    are overwrites: ext4 and XFS then let the connections' direct writes and the hasher's
    direct reads run side by side, where writes that allocate or extend the file take the
    inode's lock alone and hold the reads up. It also claims the disk space at the start."""
    if _FALLOCATE is None or size <= 0:
        return False
    return _FALLOCATE(fd, 0, 0, size) == 0


class WriterClosed(Exception):
    """A connection that outlived its download tried to write: nothing is written."""


class RangeWriter:
    """Writes at offsets into the claimed partial file from several threads: whole aligned blocks
    with O_DIRECT straight from the caller's page-aligned buffer where the file system takes it,
    the rest (and everything, without direct I/O) through `fd`. After close() nothing more is
    written, so a connection still stuck in a connect when the attempt ended can never write into
    a descriptor that has been closed (and perhaps reused) meanwhile."""

    def __init__(self, path, fd: int, direct: bool):
        self.fd = fd
        self.dfd = -1
        self.direct = False
        self._lock = threading.Condition()
        self._inflight = 0
        self._closed = False
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.dfd = os.open(path, os.O_WRONLY | os.O_DIRECT | O_NOFOLLOW)
                self.direct = True
            except OSError:
                self.dfd = -1

    def write(self, view: memoryview, offset: int) -> None:
        with self._lock:
            if self._closed:
                raise WriterClosed()
            self._inflight += 1
        try:
            n = len(view)
            done = 0
            if self.direct and offset % ALIGN == 0:
                aligned = align_down(n)
                if aligned:
                    try:
                        pwrite_all(self.dfd, view[:aligned], offset)
                        done = aligned
                    except OSError as exc:
                        if exc.errno != errno.EINVAL:
                            raise
                        log.debug("direct I/O refused; writing the partial file through the page cache")
                        self.direct = False  # the descriptor stays open until close(): others may hold it
            if done < n:
                pwrite_all(self.fd, view[done:], offset + done)
        finally:
            with self._lock:
                self._inflight -= 1
                self._lock.notify_all()

    def close(self, timeout_s: float = 5.0) -> None:
        with self._lock:
            self._closed = True
            self._lock.wait_for(lambda: self._inflight == 0, timeout_s)
        if self.dfd >= 0:
            os.close(self.dfd)
            self.dfd = -1


# -- the plan ---------------------------------------------------------------------------------------

class Piece:
    """Bytes [start, end) of the file, fetched by one connection: [start, pos) are written, a
    write up to `writing` is under way; `end` moves down when another connection takes the rest."""

    __slots__ = ("start", "pos", "end", "writing", "owner", "t0", "p0", "last_byte")

    def __init__(self, start: int, end: int, owner, now: float):
        self.start = self.pos = self.writing = self.p0 = start
        self.end = end
        self.owner = owner
        self.t0 = self.last_byte = now


class Plan:
    """Which bytes are still missing, which connection fetches which, and the contiguous prefix."""

    def __init__(self, size: int, missing: list[list[int]], width: int, stall_s: float):
        self.size = size
        self.width = max(1, width)
        self.stall_s = stall_s
        self.cond = threading.Condition()
        self.unassigned = merge(missing)
        self.active: list[Piece] = []
        self.present = size - sum(b - a for a, b in self.unassigned)
        self.first = first_wave(size - self.present, self.width)  # handed out first, in this order

    def next_piece(self, owner, now: float, upto: int | None = None) -> tuple[Piece | None, Piece | None]:
        """The next piece in file order for `owner` (ending at `upto` if given), else part of
        another's (stolen); and the piece whose connection must be dropped because all of its
        rest was taken."""
        with self.cond:
            if self.unassigned:
                a, b = self.unassigned[0]
                left = sum(y - x for x, y in self.unassigned)
                if upto is not None:
                    cut = upto
                else:
                    cut = a + (self.first.pop(0) if self.first else piece_size(left, self.width))
                if cut >= b or (upto is None and cut >= b - FIRST_MIN // 2):  # no crumb left behind
                    cut = b
                    self.unassigned.pop(0)
                else:
                    self.unassigned[0][0] = cut
                if upto is not None and self.first:
                    self.first.pop(0)
                piece = Piece(a, cut, owner, now)
                self.active.append(piece)
                return piece, None
            return self._steal(owner, now)

    def _steal(self, owner, now: float) -> tuple[Piece | None, Piece | None]:
        best: Piece | None = None
        best_key: tuple[bool, float, int] | None = None
        for p in self.active:
            committed = max(p.pos, p.writing)
            rem = p.end - committed
            if p.owner is owner or rem <= 0:
                continue
            # A connection held back on purpose (the speed cap, the hash's backlog) is not stalled.
            stalled = now - p.last_byte > self.stall_s and not getattr(p.owner, "in_cap", False)
            if not stalled and now - p.t0 < STEAL_MIN_S:
                continue  # too young to know its speed
            speed = (p.pos - p.p0) / max(now - p.t0, 1e-3)
            left_s = float("inf") if stalled or speed <= 0 else rem / speed
            key = (stalled, left_s, rem)
            if best_key is None or key > best_key:
                best, best_key = p, key
        if best is None or best_key is None:
            return None, None
        stalled, left_s, rem = best_key
        committed = max(best.pos, best.writing)
        if stalled:
            mid = align_up(committed)
        else:
            if left_s < STEAL_MIN_S or rem < 2 * STEAL_MIN_BYTES:
                return None, None
            mid = align_up(committed + rem // 2)
        if mid >= best.end:
            return None, None
        piece = Piece(mid, best.end, owner, now)
        best.end = mid
        self.active.append(piece)
        log.debug("piece %d-%d split at %d (%s)", best.start, piece.end, mid, "stalled" if stalled else
                  f"{left_s:.1f} s to go")
        return piece, (best if stalled else None)

    def reserve(self, piece: Piece, wpos: int, avail: int, direct: bool) -> tuple[int, int]:
        """Of `avail` bytes held for offset `wpos`: how many to write now (whole blocks, or all
        at the piece's end) and how many belong to the piece at all (the rest was taken away)."""
        with self.cond:
            allowed = max(0, min(avail, piece.end - wpos))
            k = allowed if (not direct or wpos + allowed >= piece.end) else align_down(allowed)
            piece.writing = wpos + k
            return k, allowed

    def written(self, piece: Piece, upto: int, now: float) -> None:
        with self.cond:
            if upto > piece.pos:
                self.present += upto - piece.pos
                piece.pos = upto
            piece.writing = piece.pos
            piece.last_byte = now
            self.cond.notify_all()

    def end_of(self, piece: Piece) -> int:
        with self.cond:
            return piece.end

    def retire(self, piece: Piece, done: bool) -> None:
        """The piece's connection is done with it: finished, or its rest goes back to be taken."""
        with self.cond:
            if piece in self.active:
                self.active.remove(piece)
            if piece.pos < piece.end and not done:
                self.unassigned = merge(self.unassigned + [[piece.pos, piece.end]])
            self.cond.notify_all()

    def frontier(self) -> int:
        """The first byte not yet written: everything before it is in the file, in order."""
        with self.cond:
            starts = [p.pos for p in self.active if p.pos < p.end]
            if self.unassigned:
                starts.append(self.unassigned[0][0])
            return min(starts) if starts else self.size

    def missing(self) -> list[list[int]]:
        with self.cond:
            return merge(self.unassigned + [[p.pos, p.end] for p in self.active])

    def finished(self) -> bool:
        with self.cond:
            return not self.unassigned and all(p.pos >= p.end for p in self.active)


# -- the hash over the contiguous prefix --------------------------------------------------------------

class PrefixHasher:
    """Hashes the file from `start` on as the contiguous prefix grows, reading it back: one
    thread reads the next chunk while another hashes the last (both let go of the GIL), so the
    hash runs at the speed of the slower of the two, not of their sum."""

    def __init__(self, plan: Plan, path, hasher, start: int, direct: bool, quit_flag: threading.Event,
                 fd: int = -1):
        self.plan = plan
        self.path = path
        self.shared_fd = fd  # Windows: the claimed descriptor (its lock keeps other handles out)
        self.hasher = hasher
        self.done = start  # hashed up to here
        self.direct = direct and start % ALIGN == 0
        self.quit = quit_flag
        self.error: BaseException | None = None
        self.finished = threading.Event()
        self.on_end: Callable[[], None] | None = None
        self._bufs = [mmap.mmap(-1, HASH_READ) for _ in range(HASH_BUFS)]  # page-aligned, for direct reads
        self._views = [memoryview(b) for b in self._bufs]
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        self._full: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(HASH_BUFS):
            self._free.put(i)
        self.thread = threading.Thread(target=self._read, name="download-hash-read", daemon=True)
        self._hash_thread = threading.Thread(target=self._hash, name="download-hash", daemon=True)

    def start(self) -> None:
        self.thread.start()
        self._hash_thread.start()

    def join(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        self.thread.join(max(0.0, deadline - time.monotonic()))
        self._hash_thread.join(max(0.0, deadline - time.monotonic()))
        if not self.thread.is_alive() and not self._hash_thread.is_alive():
            for view, buf in zip(self._views, self._bufs):
                view.release()
                buf.close()

    def _open(self) -> int:
        if os.name == "nt" and self.shared_fd >= 0:  # pragma: no cover - Windows
            self.direct = False
            return self.shared_fd
        if self.direct:
            try:
                return os.open(self.path, os.O_RDONLY | os.O_DIRECT | O_NOFOLLOW)
            except (OSError, AttributeError):
                self.direct = False
        return os.open(self.path, os.O_RDONLY | O_BINARY | O_NOFOLLOW)

    def _close(self, fd: int) -> None:
        if fd >= 0 and fd != self.shared_fd:
            os.close(fd)

    def _read(self) -> None:
        fd = -1
        plan = self.plan
        pos = self.done
        try:
            fd = self._open()
            while pos < plan.size:
                with plan.cond:
                    while not self.quit.is_set():
                        front = plan.frontier()
                        if front - pos >= ALIGN or (front > pos and (front == plan.size or not self.direct)):
                            break
                        plan.cond.wait(POLL_S)
                if self.quit.is_set():
                    return
                n = min(HASH_READ, front - pos)
                if self.direct:
                    n = min(HASH_READ, align_up(n)) if front == plan.size else align_down(n)
                i = self._free.get()
                if i is None:
                    return
                try:
                    got = pread_into(fd, self._views[i][:n], pos)
                except OSError as exc:
                    self._free.put(i)
                    if exc.errno != errno.EINVAL or not self.direct:
                        raise
                    self._close(fd)
                    fd, self.direct = -1, False
                    fd = self._open()
                    continue
                got = min(got, front - pos)
                if got <= 0:
                    raise OSError(errno.EIO, "the partial file is shorter than the bytes written to it")
                self._full.put((i, got))
                pos += got
        except BaseException as exc:  # noqa: BLE001 - handed to the monitoring thread
            self.error = exc
            if self.on_end is not None:
                self.on_end()
        finally:
            self._full.put(None)
            self._close(fd)

    def _hash(self) -> None:
        while True:
            item = self._full.get()
            if item is None:
                break
            i, got = item
            if not self.quit.is_set():
                self.hasher.update(self._views[i][:got])
                self.done += got
                with self.plan.cond:
                    self.plan.cond.notify_all()  # connections held back by the backlog go on
            self._free.put(i)
        if self.done >= self.plan.size and self.error is None:
            self.finished.set()
        if self.on_end is not None:
            self.on_end()
        self._free.put(None)  # a reader still waiting for a buffer gives up


# -- the signed link, shared -------------------------------------------------------------------------

class SourceLink:
    """The file host's signed link all connections use. When the host refuses it (expired), the
    first connection to see it asks Civitai for a new one; the others, which saw the same old
    one, take the new one: one re-resolution for all, not one per range."""

    def __init__(self, url: str, renew: Callable[[], str], max_unproven: int):
        self.url = url
        self.gen = 0
        self._renew = renew
        self._max_unproven = max_unproven
        self._unproven = 0  # renewals in a row with no range opened on them yet
        self._lock = threading.Lock()
        self.renewals = 0
        self.last_refusal: CdnRefused | None = None

    def current(self) -> tuple[str, int]:
        return self.url, self.gen

    def works(self, gen: int) -> None:
        if gen == self.gen:
            self._unproven = 0

    def renew(self, gen: int, refusal: CdnRefused, subject: str) -> None:
        with self._lock:
            if gen != self.gen:
                return  # another connection renewed it already
            if self._unproven >= self._max_unproven:
                raise CivitaiError(f"the file host {refusal.host} refused the download link from Civitai for "
                                   f"{subject} ({refusal.status}) {self._unproven + 1} times; it will be retried",
                                   reason="not_found" if refusal.status in (404, 410) else "forbidden",
                                   retryable=True, status=refusal.status)
            log.info("%s refused the download link for %s (%s); asking Civitai for a new one for all "
                     "connections", refusal.host, subject, refusal.status)
            self.url = self._renew()
            self.gen += 1
            self._unproven += 1
            self.renewals += 1


# -- the download over several connections -------------------------------------------------------------

class RestartWhole(Exception):
    """The host sent the whole file to a Range (it ignores ranges, or the file changed since):
    start over from zero on one connection (SPEC §9: a 200 to a Range restarts from zero)."""


class OneConnection(Exception):
    """One connection is as fast as the line: go on over it from `at` (everything before is in
    the file and hashed) with the job's own single-connection stream; `url` is the signed link."""

    def __init__(self, at: int, url: str):
        super().__init__(at)
        self.at = at
        self.url = url


class _Retire(Exception):
    """This connection stops (the host refuses more of them); its piece goes back to the others."""


class _Fatal(Exception):
    """An error that ends the attempt at once, whichever connection meets it (Civitai's answer
    when asked for a new link, or a link refused again and again)."""

    def __init__(self, error: CivitaiError):
        super().__init__(str(error))
        self.error = error


class _DiskError(Exception):
    """A write into the partial file failed; the job turns it into its disk error."""

    def __init__(self, exc: OSError):
        super().__init__(str(exc))
        self.os_error = exc


class _Conn:
    """One connection: its current answer, and the bytes it holds for the piece it fetches
    (view[:filled] is [wpos, wpos + filled) of the file; wpos is where the next write goes)."""

    __slots__ = ("index", "dl", "last_byte", "first_byte", "in_cap", "thread", "piece", "wpos", "filled")

    def __init__(self, index: int, now: float):
        self.index = index
        self.dl: Download | None = None
        self.last_byte = now
        self.first_byte: float | None = None
        self.in_cap = False
        self.thread: threading.Thread | None = None
        self.piece: Piece | None = None
        self.wpos = 0
        self.filled = 0

    def alive(self) -> bool:
        """Whether its thread runs (a connection not started yet has none)."""
        return self.thread is not None and self.thread.is_alive()


@dataclass
class Host:
    """What the job gives its connections. Only RangedDownload.run() (the job's thread) calls
    should_stop, progress and checkpoint; the error makers are pure."""

    should_stop: Callable[[], bool]
    progress: Callable[[int, int], None]  # (bytes on disk, file size)
    checkpoint: Callable[[list[list[int]]], None]  # the missing ranges, into the sidecar
    cancelled: Callable[[], CivitaiError]
    disk_error: Callable[[OSError, str], CivitaiError]
    read_error: Callable[[BaseException, int, int, str], CivitaiError]  # (exc, done, total, url or "")


class RangedDownload:
    """Fetch the missing bytes of one file over up to `width` connections into the claimed
    partial file; run() returns the SHA-256 of the whole file."""

    def __init__(self, *, client: CivitaiClient, host: Host, subject: str, filename: str | None,
                 version_id: int, file_id: int, path, fd: int, size: int, host_total: int,
                 etag: str | None, last_modified: str | None, missing: list[list[int]], hasher,
                 hashed_upto: int, width: int, read_timeout_s: float, rate_limit, direct: bool,
                 max_renewals: int, probe: bool = True):
        self.client = client
        self.host = host
        self.subject = subject
        self.filename = filename
        self.size = size
        self.host_total = host_total
        self.etag = etag
        self.last_modified = last_modified
        self.validator = etag or last_modified
        self.read_timeout_s = read_timeout_s
        # One connection with no byte for this long is dropped and opened again; the whole
        # attempt fails as stalled only when no connection has had a byte for read_timeout_s.
        self.stall_s = max(1.0, min(5.0, read_timeout_s / 2))
        self.rate_limit = rate_limit
        self.may_probe = probe  # False: several connections at once, whatever the first one brings
        self.quit = threading.Event()
        self.wake = threading.Event()
        missing = merge(missing)
        self.width = effective_width(sum(b - a for a, b in missing), width)
        self.plan = Plan(size, missing, self.width, self.stall_s)
        self.writer = RangeWriter(path, fd, direct)
        self.hasher = PrefixHasher(self.plan, path, hasher, hashed_upto, self.writer.direct, self.quit, fd)
        self.hasher.on_end = self.wake.set
        self.link = SourceLink("", lambda: client.fresh_link(version_id, file_id), max_renewals)
        self.conns: list[_Conn] = []
        self.error: BaseException | None = None
        self.restart: str | None = None
        self.chunk = BUF_SIZE
        self.decided = threading.Event()  # the first connection alone showed whether more help
        self.solo = False  # ... and they do not: OneConnection once the first piece is in
        self.failures = 0
        self.max_failures = max(16, 4 * self.width)
        self._lock = threading.Lock()

    # -- the job's thread ----------------------------------------------------------------------------

    def run(self, first: Download) -> str:
        """`first`: the open answer (206) for the first missing byte on; it becomes the first
        connection. Raises the job's CivitaiError, or RestartWhole."""
        self.link.url = first.source_url
        now = time.monotonic()
        conn0 = _Conn(0, now)
        upto = None if first.content_length is None else first.start + first.content_length
        if upto is not None and upto >= self.size:
            upto = None  # an open answer (no size known beforehand): the first piece is the plan's
        elif upto is not None:
            upto = align_down(upto)  # a host that sends less than asked: the next piece starts aligned
        piece0, _ = self.plan.next_piece(conn0, now, upto=upto)
        if piece0 is None or piece0.start != first.start:
            first.close()
            raise CivitaiError(f"internal error: the first part of {self.subject} does not start where the "
                               f"file host's answer does", reason="internal", retryable=True)
        self._read_cap()
        self.hasher.start()
        self._start(conn0, (piece0, first))
        # A partial file with bytes past its first hole is fetched in ranges whatever the speed.
        probing = (self.may_probe and self.width > 1 and piece0.end < self.size
                   and self.plan.unassigned == [[piece0.end, self.size]])
        if not probing:
            self.decided.set()
            self._start_others(now)
        finished = False
        all_in = None
        started = next_check = next_report = next_save = next_rate = time.monotonic()
        try:
            while True:
                self.wake.wait(0.01 if probing or self.solo else POLL_S)  # those moments count
                self.wake.clear()
                if self.host.should_stop():
                    raise self.host.cancelled()
                self._raise_failure()
                now = time.monotonic()
                if probing:
                    probing = self._probe(conn0, piece0, now)
                if self.solo:
                    if not conn0.alive() and self.hasher.done >= self.plan.frontier():
                        raise OneConnection(self.hasher.done, self.link.url)
                    if conn0.alive() and now >= next_check:
                        next_check = now + POLL_S
                        self._watch(now)
                    continue
                if self.plan.finished():
                    if all_in is None:
                        all_in = now
                    if self.hasher.finished.is_set():
                        finished = True
                        log.debug("%s: the last byte came %.3f s after the start, the hash %.3f s after it",
                                  self.subject, all_in - started, time.monotonic() - all_in)
                        break
                else:
                    if not any(c.alive() for c in self.conns):
                        self._raise_failure()
                        raise CivitaiError(f"every connection to the file host for {self.subject} ended before "
                                           f"the file was complete ({_saved(self.plan.present, self.size)})",
                                           reason="connection", retryable=True)
                    if now >= next_check:
                        next_check = now + POLL_S
                        self._watch(now)
                    if now >= next_save:
                        next_save = now + CHECKPOINT_S
                        self.host.checkpoint(self.plan.missing())
                if now >= next_rate:
                    next_rate = now + 1.0
                    self._read_cap()
                if now >= next_report:
                    next_report = now + 0.25
                    self.host.progress(self.plan.present, self.size)
            self.host.progress(self.size, self.size)
            return self.hasher.hasher.hexdigest()
        finally:
            self._stop_all()
            try:
                self.writer.close()
            except OSError as exc:
                if finished:
                    raise self.host.disk_error(exc, "downloading") from None
            if not finished:
                try:
                    self.host.checkpoint(self.plan.missing())
                except CivitaiError as exc:  # a full disk: the error in flight says more
                    log.warning("%s: could not record the download's progress: %s", self.subject, exc)

    def _start_others(self, now: float) -> None:
        # Only now: a first connection that goes on alone never needs it (and would pay for giving
        # the blocks back). The sidecar already lists what is missing, the length no longer counts.
        preallocate(self.writer.fd, self.size)
        for i in range(1, self.width):
            self._start(_Conn(i, now), None)
        log.debug("%s: %d connections for %d missing bytes", self.subject, self.width,
                  self.size - self.plan.present)

    def _probe(self, conn0: _Conn, piece0: Piece, now: float) -> bool:
        """Whether to go on watching the first connection alone (PROBE_S, FAST_ONE_BPS)."""
        first = conn0.first_byte
        done = piece0.pos >= piece0.end
        if first is None or (not done and now - first < PROBE_S):
            return True
        rate = (piece0.pos - piece0.start) / max(now - first, 1e-3)
        if rate >= FAST_ONE_BPS:
            log.info("%s: one connection brings %.0f MB/s: going on over it alone", self.subject, rate / 1e6)
            self.solo = True
        else:
            log.debug("%s: one connection brings %.1f MB/s: opening %d more", self.subject, rate / 1e6,
                      self.width - 1)
            self._start_others(now)
        self.decided.set()
        return False

    def _raise_failure(self) -> None:
        if self.error is not None:
            if isinstance(self.error, _DiskError):
                raise self.host.disk_error(self.error.os_error, "downloading")
            raise self.error
        if self.restart is not None:
            raise RestartWhole(self.restart)
        error = self.hasher.error
        if error is not None:
            if isinstance(error, OSError):
                raise self.host.disk_error(error, "verifying")
            raise error

    def _stop_all(self) -> None:
        """Every connection stops, writes what it holds and ends (a connection still opening is
        left to finish on its own: the closed writer keeps it from writing)."""
        self.quit.set()
        with self.plan.cond:
            self.plan.cond.notify_all()
        for c in self.conns:
            dl = c.dl
            if dl is not None:
                dl.abort()
        deadline = time.monotonic() + JOIN_S
        for c in self.conns:
            if c.thread is not None:
                c.thread.join(max(0.0, deadline - time.monotonic()))
        self.hasher.join(max(0.0, deadline - time.monotonic()))

    def _watch(self, now: float) -> None:
        """Drop a connection that has sent nothing for stall_s (it opens again); fail the attempt
        when none has sent anything for read_timeout_s."""
        newest = max(c.last_byte for c in self.conns)
        if not any(c.in_cap for c in self.conns) and now - newest > self.read_timeout_s:
            raise CivitaiError(f"the download stalled: no data for {self.read_timeout_s:g} s on any of "
                               f"{len(self.conns)} connections ({_saved(self.plan.present, self.size)})",
                               reason="connection", retryable=True)
        for c in self.conns:
            dl = c.dl
            if dl is not None and not c.in_cap and now - c.last_byte > self.stall_s and not dl.aborted:
                log.debug("%s: connection %d sent nothing for %.1f s; opening it again", self.subject,
                          c.index, now - c.last_byte)
                dl.abort()

    def _read_cap(self) -> None:
        """Reads no larger than an eighth of a second of the cap: a low cap then holds each
        connection back in small steps, never so long at once that the host gives up on it."""
        try:
            rate = self.rate_limit.rate() if self.rate_limit is not None else 0
        except OSError:
            rate = 0
        self.chunk = BUF_SIZE if rate <= 0 else max(16 * KiB, min(BUF_SIZE, rate // 8))

    # -- the connections' threads ----------------------------------------------------------------------

    def _start(self, conn: _Conn, first) -> None:
        if conn not in self.conns:
            self.conns.append(conn)
        conn.thread = threading.Thread(target=self._conn_main, args=(conn, first),
                                       name=f"download-range-{conn.index}", daemon=True)
        conn.thread.start()

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None and self.restart is None:
                if isinstance(exc, RestartWhole):
                    self.restart = str(exc)
                else:
                    self.error = exc
        self.quit.set()
        self.wake.set()

    def _conn_main(self, conn: _Conn, first) -> None:
        buf = mmap.mmap(-1, BUF_SIZE)  # page-aligned, for direct writes
        view = memoryview(buf)
        session = self.client.cdn_session()
        try:
            piece, dl = first if first is not None else (None, None)
            while not self.quit.is_set():
                if piece is None:
                    while not self.decided.wait(POLL_S):
                        if self.quit.is_set():
                            return
                    if self.solo:
                        return  # the job goes on over one connection of its own
                    piece, victim = self.plan.next_piece(conn, time.monotonic())
                    if victim is not None and victim.owner is not None:
                        owner_dl = victim.owner.dl
                        if owner_dl is not None:
                            owner_dl.abort()  # all of its rest is ours now
                    if piece is None:
                        if self.plan.finished():
                            return
                        # Nothing to take yet: the pieces under way are too young to judge, or
                        # quick. Wait: one of them may stall or turn out slow.
                        with self.plan.cond:
                            self.plan.cond.wait(POLL_S)
                        continue
                conn.piece = piece
                try:
                    done = self._fetch_piece(conn, piece, view, session, dl)
                except _Retire:
                    self.plan.retire(piece, done=False)
                    return
                self.plan.retire(piece, done=done)
                piece = dl = None
        except WriterClosed:
            pass
        except _Fatal as exc:
            if not self.quit.is_set():
                self._fail(exc.error)
        except BaseException as exc:  # noqa: BLE001 - handed to the job's thread
            if not self.quit.is_set():
                self._fail(exc)
        finally:
            conn.piece = None
            conn.dl = None
            self.wake.set()
            session.close()
            try:
                view.release()
                buf.close()
            except BufferError:  # pragma: no cover - a slice still alive somewhere: the GC frees it
                pass

    def _write(self, conn: _Conn, piece: Piece, view: memoryview, k: int) -> None:
        """Write the first k held bytes at wpos; keep the rest of what belongs to the piece."""
        try:
            self.writer.write(view[:k], conn.wpos)
        except OSError as exc:
            raise _DiskError(exc) from None
        conn.wpos += k
        self.plan.written(piece, conn.wpos, time.monotonic())

    def _fetch_piece(self, conn: _Conn, piece: Piece, view: memoryview, session, dl: Download | None) -> bool:
        """Fetch one piece to its (moving) end. True when complete, False on a stop. On a stop the
        bytes held are written (nothing received is lost); after a failure they stay held and
        the next request asks for what follows them."""
        plan = self.plan
        direct = self.writer.direct
        conn.wpos = align_down(piece.pos) if direct else piece.pos  # rewriting a block is harmless
        conn.filled = 0
        tries = 0
        try:
            while not self.quit.is_set():
                end = plan.end_of(piece)
                mark = conn.wpos + conn.filled
                if mark >= end:
                    if dl is not None:
                        dl.release()  # kept alive for the next piece if it was read to its end
                        dl = conn.dl = None
                    k, allowed = plan.reserve(piece, conn.wpos, conn.filled, direct)
                    if k:
                        self._write(conn, piece, view, k)
                    conn.filled = 0
                    return True
                try:
                    if dl is None:
                        dl = self._open(session, mark, end)
                        if dl is None:
                            continue  # the link was renewed: ask again
                        conn.last_byte = time.monotonic()
                    conn.dl = dl
                    self._stream(conn, piece, dl, view)
                    if conn.wpos + conn.filled >= plan.end_of(piece) or self.quit.is_set():
                        continue
                    dl.release()  # the answer ended before the piece did
                    dl = conn.dl = None
                    if conn.wpos + conn.filled > mark:
                        continue
                    raise CivitaiError(f"the file host ended a part of {self.subject} before its end",
                                       reason="connection", retryable=True)
                except (RestartWhole, WriterClosed, _Retire, _DiskError, _Fatal):
                    raise
                except Exception as exc:  # noqa: BLE001 - CivitaiError, OSError, http.client, urllib3
                    if self.quit.is_set():
                        break
                    if dl is not None:
                        dl.close()
                        dl = conn.dl = None
                    progressed = conn.wpos + conn.filled > mark
                    if conn.wpos + conn.filled >= plan.end_of(piece):
                        continue  # taken over by another connection, which dropped this one
                    if isinstance(exc, CivitaiError):
                        if exc.status in (429, 503) and self._others_running(conn):
                            log.info("%s: the file host refuses one more connection (%s); going on with "
                                     "fewer", self.subject, exc.status)
                            raise _Retire() from None
                        if not exc.retryable and exc.reason != "bad_body":
                            raise
                    tries = self._failed(conn, exc, tries, progressed)
            return False
        finally:
            if dl is not None:
                dl.close()
            conn.dl = None
            if conn.filled and self.quit.is_set():
                # Stopping: write what is held, aligned or not, so no byte received is lost.
                k, _ = plan.reserve(piece, conn.wpos, conn.filled, direct=False)
                if k:
                    try:
                        self._write(conn, piece, view, k)
                    except (WriterClosed, _DiskError):
                        pass
                conn.filled = 0

    def _open(self, session, start: int, end: int) -> Download | None:
        """One request for [start, end): the Download, or None to ask again (the link was renewed)."""
        url, gen = self.link.current()
        try:
            dl = self.client.open_range(session, url, start, end, self.validator,
                                        read_timeout_s=self.read_timeout_s + 2, subject=self.subject,
                                        filename=self.filename)
        except CdnRefused as exc:
            try:
                self.link.renew(gen, exc, self.subject)
            except CivitaiError as error:
                raise _Fatal(error) from None
            return None
        if dl.status == 200:
            dl.close()
            raise RestartWhole("the file host sent the whole file to a request for a part of it (the file "
                               "changed, or the host does not serve parts after all)")
        if dl.status == 416 or dl.start != start:
            dl.close()
            raise CivitaiError(f"the file host sent the wrong part of {self.subject}; it will be retried",
                               reason="bad_body", retryable=True, status=dl.status)
        changed = (dl.total_size is not None and dl.total_size != self.host_total) or (
            bool(self.etag) and bool(dl.etag) and dl.etag != self.etag) or (
            not self.etag and bool(self.last_modified) and bool(dl.last_modified)
            and dl.last_modified != self.last_modified)
        if changed:
            dl.close()
            raise RestartWhole("the file changed on the file host during the download")
        self.link.works(gen)
        return dl

    def _others_running(self, conn: _Conn) -> bool:
        return any(c is not conn and c.piece is not None and c.alive() for c in self.conns)

    def _failed(self, conn: _Conn, exc: BaseException, tries: int, progressed: bool) -> int:
        """Count a failed request of a piece and wait a little before the next. Raises when the
        piece failed RANGE_TRIES times in a row without a byte, or the attempt too often overall."""
        tries = 1 if progressed else tries + 1
        with self._lock:
            self.failures += 1
            failures = self.failures
        if tries > RANGE_TRIES or failures > self.max_failures:
            if isinstance(exc, CivitaiError):
                raise exc
            raise self.host.read_error(exc, self.plan.present, self.size, "")  # any of the connections
        log.debug("%s: connection %d failed (%s: %s); asking for its part again", self.subject, conn.index,
                  type(exc).__name__, exc)
        if not progressed:
            self.quit.wait(RETRY_DELAYS_S[min(tries - 1, len(RETRY_DELAYS_S) - 1)])
        return tries

    def _wait_for_hash(self, conn: _Conn) -> None:
        plan, hasher = self.plan, self.hasher
        conn.in_cap = True  # held back on purpose: no stall
        try:
            with plan.cond:
                while (not self.quit.is_set() and hasher.error is None
                       and plan.frontier() - hasher.done > BACKLOG_MAX):
                    plan.cond.wait(POLL_S)
        finally:
            conn.in_cap = False
            conn.last_byte = time.monotonic()

    def _stream(self, conn: _Conn, piece: Piece, dl: Download, view: memoryview) -> None:
        """Read the answer into the piece until the piece is complete or the answer ends,
        writing whole blocks as they come (the unaligned rest waits at the buffer's start)."""
        plan = self.plan
        direct = self.writer.direct
        limit = self.rate_limit
        hasher = self.hasher
        while not self.quit.is_set():
            need = plan.end_of(piece) - (conn.wpos + conn.filled)
            if need <= 0:
                return
            if plan.frontier() - hasher.done > BACKLOG_MAX:
                self._wait_for_hash(conn)
                continue
            filled = conn.filled
            n = dl.readinto(view[filled: filled + min(BUF_SIZE - filled, need, self.chunk)])
            if not n:
                return
            conn.last_byte = time.monotonic()
            if conn.first_byte is None:
                conn.first_byte = conn.last_byte
            if limit is not None:
                conn.in_cap = True
                try:
                    limit.consume(n, self.quit.is_set)
                finally:
                    conn.in_cap = False
                    conn.last_byte = time.monotonic()
            filled += n
            k, allowed = plan.reserve(piece, conn.wpos, filled, direct)
            conn.filled = filled
            if k:
                self._write(conn, piece, view, k)
                tail = allowed - k
                if tail:
                    view[:tail] = view[k:k + tail]
                conn.filled = tail
            else:
                conn.filled = allowed


def _saved(done: int, total: int) -> str:
    from workers.download import fmt_bytes

    return f"{fmt_bytes(done)} of {fmt_bytes(total)} saved; the next attempt resumes"
