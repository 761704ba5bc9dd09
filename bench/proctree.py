"""Readings of a running daemon's process tree from Linux /proc: CPU, wake-ups, memory, fds, threads.

Everything is read from outside, so the same readings work on any version of the daemon. CPU
comes from each thread's schedstat (nanoseconds) where the kernel has it, else from the
process's utime + stime (clock ticks); wake-ups are voluntary + involuntary context switches
summed over every thread. Deltas match threads by id: a thread that ends between two readings
takes its counts with it, so deltas are lower bounds when threads come and go.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return None


def _stat_fields(pid: int, tid: int | None = None) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name: [0] is the state, [1] the ppid."""
    text = _read(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat")
    if not text:
        return None
    return text.rsplit(")", 1)[1].split()


def cpu_ticks_s(pid: int) -> float | None:
    """utime + stime of a whole process (every thread, living or ended) in seconds."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tids(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def thread_cpu_ns(pid: int) -> dict[int, int]:
    """On-CPU time of each living thread, from schedstat (ns); empty where the kernel lacks it."""
    out = {}
    for tid in tids(pid):
        text = _read(f"/proc/{pid}/task/{tid}/schedstat")
        try:
            out[tid] = int(text.split()[0]) if text else None
        except (ValueError, IndexError):
            continue
    return {t: v for t, v in out.items() if v is not None}


def thread_ctx_switches(pid: int) -> dict[int, int]:
    """Voluntary + involuntary context switches of each living thread."""
    out = {}
    for tid in tids(pid):
        text = _read(f"/proc/{pid}/task/{tid}/status")
        if not text:
            continue
        total = 0
        for line in text.splitlines():
            if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                total += int(line.split()[1])
        out[tid] = total
    return out


def status_fields(pid: int) -> dict[str, str]:
    text = _read(f"/proc/{pid}/status") or ""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def rss_kib(pid: int) -> int | None:
    value = status_fields(pid).get("VmRSS")
    return int(value.split()[0]) if value else None


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def threads(pid: int) -> int | None:
    value = status_fields(pid).get("Threads")
    return int(value) if value else None


def cmdline(pid: int) -> str:
    text = _read(f"/proc/{pid}/cmdline") or ""
    return text.replace("\0", " ").strip()


def tree(root: int) -> list[int]:
    """`root` and every process below it, root first."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None or fields[0] == "Z":
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))
    out, frontier = [root], [root]
    while frontier:
        kids = parents.get(frontier.pop(), [])
        out.extend(kids)
        frontier.extend(kids)
    return out


@dataclass
class Reading:
    pid: int
    cpu_s: float  # utime + stime: every thread that ever ran, 1/CLK_TCK resolution
    thread_cpu_ns: dict[int, int]  # schedstat of each living thread: ns resolution
    thread_wakeups: dict[int, int]
    rss_kib: int | None
    fds: int | None
    threads: int | None

    @property
    def wakeups(self) -> int:
        return sum(self.thread_wakeups.values())


def read(pid: int) -> Reading | None:
    ticks = cpu_ticks_s(pid)
    if ticks is None:
        return None
    return Reading(pid, ticks, thread_cpu_ns(pid), thread_ctx_switches(pid), rss_kib(pid), open_fds(pid),
                   threads(pid))


def _per_thread_delta(before: dict[int, int], after: dict[int, int]) -> int:
    return sum(v - before.get(tid, 0) for tid, v in after.items())


def delta(before: Reading | None, after: Reading) -> tuple[float, int]:
    """(CPU seconds, wake-ups) between two readings of one process. Threads are matched by id, so
    one that ended is left out rather than subtracted; one that started counts from zero. CPU is
    the schedstat sum where the kernel has it, else utime + stime."""
    if before is None:
        cpu = sum(after.thread_cpu_ns.values()) / 1e9 if after.thread_cpu_ns else after.cpu_s
        return cpu, after.wakeups
    if after.thread_cpu_ns:
        cpu = _per_thread_delta(before.thread_cpu_ns, after.thread_cpu_ns) / 1e9
    else:
        cpu = after.cpu_s - before.cpu_s
    return cpu, _per_thread_delta(before.thread_wakeups, after.thread_wakeups)


def read_tree(root: int) -> dict[int, Reading]:
    out = {}
    for pid in tree(root):
        reading = read(pid)
        if reading is not None:
            out[pid] = reading
    return out
