"""The Windows branch of ipc/oslayer.py on Linux, with its system calls injected: msvcrt locks, the
Job Object that kills the children with the supervisor (ctypes' kernel32 faked), the polite stop of
a fresh interpreter (Ctrl-Break to its process group); and the POSIX branch for real."""
from __future__ import annotations

import ctypes
import os
import signal

import pytest

from ipc.oslayer import JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE, PosixLayer, WindowsLayer


class FakeMsvcrt:
    LK_LOCK, LK_NBLCK, LK_UNLCK = 1, 2, 0

    def __init__(self, busy: int = 0):
        self.calls = []
        self.busy = busy  # how many LK_LOCK calls time out (raise) before one succeeds
        self.held_by_other = False

    def locking(self, fd, mode, nbytes):
        self.calls.append((fd, mode, nbytes))
        if mode == self.LK_LOCK and self.busy:
            self.busy -= 1
            raise OSError(36, "Resource deadlock avoided")
        if mode == self.LK_NBLCK and self.held_by_other:
            raise OSError(13, "Permission denied")


class FakeOs:
    def __init__(self):
        self.seeks = []
        self.killed = []

    def lseek(self, fd, pos, how):
        self.seeks.append((fd, pos))

    def kill(self, pid, sig):
        self.killed.append((pid, sig))


def test_windows_locks_lock_byte_zero_and_wait_through_msvcrt_timeouts():
    m, fake_os = FakeMsvcrt(busy=2), FakeOs()
    layer = WindowsLayer(msvcrt_mod=m, os_mod=fake_os)
    layer.lock_fd(7)
    assert m.calls == [(7, 1, 1)] * 3 and fake_os.seeks[0] == (7, 0)
    layer.unlock_fd(7)
    assert m.calls[-1] == (7, 0, 1)
    assert layer.try_lock_fd(7) is True
    m.held_by_other = True
    assert layer.try_lock_fd(7) is False
    assert layer.fsync_dir("C:/models") is None  # nothing to do: NTFS journals renames


class FakeKernel32:
    def __init__(self, fail: str = ""):
        self.fail = fail
        self.calls = []
        self.info = None

    def CreateJobObjectW(self, attrs, name):
        self.calls.append("CreateJobObjectW")
        return 0 if self.fail == "create" else 1234

    def SetInformationJobObject(self, job, klass, info_ref, size):
        self.calls.append(("SetInformationJobObject", job, klass, size))
        self.info = info_ref._obj  # ctypes.byref's target
        return 0 if self.fail == "set" else 1

    def GetCurrentProcess(self):
        return -1  # the pseudo-handle Windows returns

    def AssignProcessToJobObject(self, job, process):
        self.calls.append(("AssignProcessToJobObject", job, process))
        return 0 if self.fail == "assign" else 1

    def CloseHandle(self, handle):
        self.calls.append(("CloseHandle", handle))
        return 1


def test_the_job_object_kills_the_children_when_the_supervisor_dies():
    kernel32 = FakeKernel32()
    layer = WindowsLayer(kernel32=kernel32)
    assert layer.kill_children_with_me() is True
    assert kernel32.calls[0] == "CreateJobObjectW"
    _, job, klass, size = kernel32.calls[1]
    assert (job, klass) == (1234, 9)  # JobObjectExtendedLimitInformation
    assert size == ctypes.sizeof(type(kernel32.info))
    assert kernel32.info.BasicLimitInformation.LimitFlags == JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE == 0x2000
    assert kernel32.calls[2] == ("AssignProcessToJobObject", 1234, -1)
    assert not any(c[0] == "CloseHandle" for c in kernel32.calls if isinstance(c, tuple)), \
        "the handle stays open for the process's life: its closing is what kills the children"
    assert layer._job == 1234


@pytest.mark.parametrize("fail", ["create", "set", "assign"])
def test_without_a_job_object_the_daemon_goes_on(fail):
    kernel32 = FakeKernel32(fail=fail)
    assert WindowsLayer(kernel32=kernel32).kill_children_with_me() is False
    if fail != "create":
        assert ("CloseHandle", 1234) in kernel32.calls


def test_a_fresh_interpreter_gets_ctrl_break_a_forked_child_terminate(monkeypatch):
    monkeypatch.setattr(signal, "CTRL_BREAK_EVENT", 1, raising=False)
    fake_os = FakeOs()
    layer = WindowsLayer(os_mod=fake_os)

    class Popen:  # subprocess.Popen has .args
        args = ["python", "-m", "web"]
        pid = 42
        terminated = False

        def terminate(self):
            self.terminated = True

    class Process:  # multiprocessing.Process has no .args
        pid = 43
        terminated = False

        def terminate(self):
            self.terminated = True

    web, worker = Popen(), Process()
    layer.polite_stop(web)
    layer.polite_stop(worker)
    assert fake_os.killed == [(42, 1)] and not web.terminated and worker.terminated
    assert "creationflags" in layer.fresh_child_flags() and "SIGBREAK" in layer.stop_signals
    assert layer.direct_io_flag == 0


def test_the_posix_layer_for_real(tmp_path):
    layer = PosixLayer()
    path = tmp_path / "lock"
    a = os.open(path, os.O_RDWR | os.O_CREAT)
    b = os.open(path, os.O_RDWR)
    try:
        assert layer.try_lock_fd(a) is True
        assert layer.try_lock_fd(b) is False  # another open file description: flock says held
        layer.unlock_fd(a)
        assert layer.try_lock_fd(b) is True
    finally:
        os.close(a)
        os.close(b)
    layer.fsync_dir(tmp_path)
    assert layer.fresh_child_flags() == {"start_new_session": True}
    assert layer.kill_children_with_me() is False


class HeldFile:
    """os.replace onto a file another program holds open, as Windows answers it, for `holds` tries."""

    def __init__(self, holds: int, clock):
        self.holds, self.clock, self.tries = holds, clock, []

    def replace(self, src, dst):
        self.tries.append(self.clock.t)
        if self.holds:
            self.holds -= 1
            raise PermissionError(13, "The process cannot access the file because it is being used by another process")


class ManualClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


def test_windows_replace_waits_out_a_short_hold_on_the_target():
    clock = ManualClock()
    held = HeldFile(holds=3, clock=clock)
    WindowsLayer(os_mod=held, sleep=clock.sleep, clock=clock).replace("a.tmp", "a")
    assert len(held.tries) == 4 and held.holds == 0
    assert clock.t == pytest.approx(0.14)  # 10 + 30 + 100 ms: a reader's hold costs little


def test_windows_replace_gives_up_after_a_second_and_says_why():
    clock = ManualClock()
    held = HeldFile(holds=10_000, clock=clock)
    with pytest.raises(PermissionError, match="used by another process"):
        WindowsLayer(os_mod=held, sleep=clock.sleep, clock=clock).replace("a.tmp", "a")
    assert clock.t <= 1.0 and held.tries[-1] >= 0.6  # about a second of patience, never more
    assert 4 <= len(held.tries) <= 8


def test_posix_replace_never_waits(tmp_path):
    (tmp_path / "a.tmp").write_text("new")
    (tmp_path / "a").write_text("old")
    with open(tmp_path / "a") as reader:  # a reader never stops a rename on POSIX
        PosixLayer().replace(tmp_path / "a.tmp", tmp_path / "a")
        assert reader.read() == "old"
    assert (tmp_path / "a").read_text() == "new"
