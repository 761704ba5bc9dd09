"""Everything the daemon does differently on Windows, in one place: file locks, making a rename
durable, replacing a file another program has open, direct I/O, stopping a child politely, the
console's stop signals, and tying the children's lives to the supervisor's (a Job Object). Each OS
is a class whose system calls are injected, so the Windows branch is unit-tested on Linux with
fakes."""
from __future__ import annotations

import errno
import os
import signal
import time
from typing import Any

JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE = 0x2000
JOB_OBJECT_EXTENDED_LIMIT_INFORMATION_CLASS = 9
# How long a rename onto a file another program has open is tried again on Windows (pip does the
# same: utils/filesystem.py, 1 s in steps of 0.25 s; ours starts shorter, most holds are a read).
REPLACE_PATIENCE_S = 1.0
REPLACE_WAITS_S = (0.01, 0.03, 0.1, 0.25)


class PosixLayer:
    name = "posix"
    direct_io_flag = getattr(os, "O_DIRECT", 0)  # 0: not available (macOS, BSD)
    stop_signals = ("SIGTERM", "SIGINT", "SIGHUP")

    def __init__(self, fcntl_mod: Any = None, os_mod: Any = os):
        if fcntl_mod is None:
            import fcntl as fcntl_mod
        self.fcntl = fcntl_mod
        self.os = os_mod

    def lock_fd(self, fd: int) -> None:
        self.fcntl.flock(fd, self.fcntl.LOCK_EX)

    def unlock_fd(self, fd: int) -> None:
        self.fcntl.flock(fd, self.fcntl.LOCK_UN)

    def try_lock_fd(self, fd: int) -> bool:
        try:
            self.fcntl.flock(fd, self.fcntl.LOCK_EX | self.fcntl.LOCK_NB)
        except OSError as exc:
            # Held by another: False. A file system without locks (ENOLCK, EOPNOTSUPP): go on unguarded.
            return exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES)
        return True

    def fsync_dir(self, folder) -> None:
        try:
            fd = self.os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            return
        try:
            self.os.fsync(fd)
        except OSError:
            pass
        finally:
            self.os.close(fd)

    def replace(self, src, dst) -> None:
        """os.replace: atomic, and no reader of `dst` can stop it on POSIX."""
        self.os.replace(src, dst)

    def polite_stop(self, proc) -> None:
        """SIGTERM: the child finishes its chunk, keeps its partial file and exits."""
        proc.terminate()

    def fresh_child_flags(self) -> dict:
        # Its own session: Ctrl-C in a terminal reaches only the supervisor, which stops it in order.
        return {"start_new_session": True}

    def kill_children_with_me(self) -> bool:
        """Linux kills nothing with its parent; the children watch their pipe's EOF instead."""
        return False


class WindowsLayer:
    name = "windows"
    direct_io_flag = 0  # Windows has FILE_FLAG_NO_BUFFERING, but not through os.open
    stop_signals = ("SIGTERM", "SIGINT", "SIGBREAK")  # SIGBREAK: Ctrl-Break, and a console closing

    def __init__(self, msvcrt_mod: Any = None, kernel32: Any = None, os_mod: Any = os, ctypes_mod: Any = None,
                 sleep=time.sleep, clock=time.monotonic):
        self.msvcrt = msvcrt_mod
        self._kernel32 = kernel32
        self.os = os_mod
        self._ctypes = ctypes_mod
        self._sleep, self._clock = sleep, clock
        self._job = None  # the Job Object handle: closing it (our death) kills every child

    def _msvcrt(self):
        if self.msvcrt is None:
            import msvcrt

            self.msvcrt = msvcrt
        return self.msvcrt

    def lock_fd(self, fd: int) -> None:
        m = self._msvcrt()
        self.os.lseek(fd, 0, os.SEEK_SET)
        while True:
            try:
                m.locking(fd, m.LK_LOCK, 1)  # retries for 10 s, then raises: go on waiting
                return
            except OSError:
                continue

    def unlock_fd(self, fd: int) -> None:
        m = self._msvcrt()
        self.os.lseek(fd, 0, os.SEEK_SET)
        m.locking(fd, m.LK_UNLCK, 1)

    def try_lock_fd(self, fd: int) -> bool:
        m = self._msvcrt()
        self.os.lseek(fd, 0, os.SEEK_SET)
        try:
            m.locking(fd, m.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def fsync_dir(self, folder) -> None:
        """A folder cannot be opened on Windows; NTFS journals its renames."""

    def replace(self, src, dst) -> None:
        """os.replace, tried again for up to REPLACE_PATIENCE_S while it meets a sharing violation:
        on Windows a file another program has open (a tool reading a .civitai.info, a virus
        scanner looking at a file just written) cannot be replaced or renamed, and such holds are
        short. Still held after that: the PermissionError goes to the caller, nothing was changed."""
        deadline = self._clock() + REPLACE_PATIENCE_S
        waits = iter(REPLACE_WAITS_S)
        while True:
            try:
                self.os.replace(src, dst)
                return
            except PermissionError:
                wait = next(waits, REPLACE_WAITS_S[-1])
                if self._clock() + wait > deadline:
                    raise
            self._sleep(wait)

    def polite_stop(self, proc) -> None:
        """A fresh interpreter in its own process group gets Ctrl-Break (its SIGBREAK handler stops
        it cleanly); a multiprocessing child has no console signal to get: TerminateProcess."""
        ctrl_break = getattr(signal, "CTRL_BREAK_EVENT", None)
        if ctrl_break is not None and hasattr(proc, "args") and getattr(proc, "pid", None):
            try:
                self.os.kill(proc.pid, ctrl_break)
                return
            except OSError:
                pass
        proc.terminate()

    def fresh_child_flags(self) -> dict:
        import subprocess

        return {"creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x200)}

    def kill_children_with_me(self) -> bool:
        """Put this process (and so every child it starts) in a Job Object that kills them all when
        its last handle closes: under NSSM or Task Scheduler the children must not outlive the
        service, even when it is killed. Returns whether it worked."""
        import ctypes as real_ctypes
        from ctypes import wintypes

        ctypes: Any = self._ctypes or real_ctypes

        kernel32 = self._kernel32 or ctypes.WinDLL("kernel32", use_last_error=True)

        class IO_COUNTERS(real_ctypes.Structure):
            _fields_ = [(n, ctypes.c_ulonglong) for n in (
                "ReadOperationCount", "WriteOperationCount", "OtherOperationCount",
                "ReadTransferCount", "WriteTransferCount", "OtherTransferCount")]

        class BASIC_LIMIT(real_ctypes.Structure):
            _fields_ = [("PerProcessUserTimeLimit", ctypes.c_longlong), ("PerJobUserTimeLimit", ctypes.c_longlong),
                        ("LimitFlags", wintypes.DWORD), ("MinimumWorkingSetSize", ctypes.c_size_t),
                        ("MaximumWorkingSetSize", ctypes.c_size_t), ("ActiveProcessLimit", wintypes.DWORD),
                        ("Affinity", ctypes.c_size_t), ("PriorityClass", wintypes.DWORD),
                        ("SchedulingClass", wintypes.DWORD)]

        class EXTENDED_LIMIT(real_ctypes.Structure):
            _fields_ = [("BasicLimitInformation", BASIC_LIMIT), ("IoInfo", IO_COUNTERS),
                        ("ProcessMemoryLimit", ctypes.c_size_t), ("JobMemoryLimit", ctypes.c_size_t),
                        ("PeakProcessMemoryUsed", ctypes.c_size_t), ("PeakJobMemoryUsed", ctypes.c_size_t)]

        job = kernel32.CreateJobObjectW(None, None)
        if not job:
            return False
        info = EXTENDED_LIMIT()
        info.BasicLimitInformation.LimitFlags = JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
        if not kernel32.SetInformationJobObject(job, JOB_OBJECT_EXTENDED_LIMIT_INFORMATION_CLASS,
                                                ctypes.byref(info), ctypes.sizeof(info)):
            kernel32.CloseHandle(job)
            return False
        if not kernel32.AssignProcessToJobObject(job, kernel32.GetCurrentProcess()):
            kernel32.CloseHandle(job)  # already in a job that forbids nesting (Windows 7): go on without
            return False
        self._job = job  # never closed by us: the kernel closes it when we die, and kills the children
        return True


def current():
    return WindowsLayer() if os.name == "nt" else PosixLayer()


OS = current()
