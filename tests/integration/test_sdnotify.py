"""ipc/sdnotify.py against a datagram socket standing in for systemd, and a real daemon run."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import tempfile
import time
import uuid

import pytest

from ipc import sdnotify

pytestmark = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="sd_notify needs AF_UNIX")

SCM_CREDENTIALS = getattr(socket, "SCM_CREDENTIALS", 2)
SO_PASSCRED = getattr(socket, "SO_PASSCRED", 16)


class NotifySocket:
    """What systemd listens on: an AF_UNIX datagram socket that learns each sender's pid."""

    def __init__(self, abstract: bool = False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_PASSCRED, 1)
        self.folder = None
        if abstract:
            name = f"civitai-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
        else:
            # sun_path holds 108 bytes; pytest's tmp_path can be longer than that.
            self.folder = tempfile.mkdtemp(prefix="sdn")
            self.env_value = os.path.join(self.folder, "notify")
            self.sock.bind(self.env_value)

    def receive(self, timeout: float) -> tuple[list[str], int | None]:
        """One datagram: its lines and the sender's pid (from SCM_CREDENTIALS)."""
        self.sock.settimeout(timeout)
        data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = None
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == SCM_CREDENTIALS:
                pid = struct.unpack("iII", payload[:12])[0]
        return data.decode().split("\n"), pid

    def wait_for(self, line: str, timeout: float) -> tuple[list[tuple[list[str], int | None]], int | None]:
        """Read datagrams until one holds `line`; returns all read and the sender pid of that one."""
        seen = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {line} within {timeout} s; got {seen}")
            try:
                lines, pid = self.receive(remaining)
            except TimeoutError:
                continue
            seen.append((lines, pid))
            if line in lines:
                return seen, pid

    def close(self):
        self.sock.close()
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def listener(monkeypatch):
    made = []

    def make(abstract: bool = False) -> NotifySocket:
        sock = NotifySocket(abstract)
        made.append(sock)
        monkeypatch.setenv("NOTIFY_SOCKET", sock.env_value)
        return sock

    yield make
    for sock in made:
        sock.close()


def test_notify_sends_one_datagram_to_a_path_socket(listener):
    sock = listener()
    assert sdnotify.notify("READY=1", "STATUS=serving on 127.0.0.1:8000") is True
    lines, pid = sock.receive(2)
    assert lines == ["READY=1", "STATUS=serving on 127.0.0.1:8000"]
    assert pid == os.getpid()


def test_notify_reaches_an_abstract_socket(listener):
    sock = listener(abstract=True)
    assert sock.env_value.startswith("@")
    assert sdnotify.notify("WATCHDOG=1") is True
    assert sock.receive(2)[0] == ["WATCHDOG=1"]


def test_a_newline_inside_a_value_cannot_add_an_assignment(listener):
    sock = listener()
    assert sdnotify.notify("STATUS=two\nREADY=1")
    assert sock.receive(2)[0] == ["STATUS=two READY=1"]


@pytest.mark.parametrize("value", [None, "", "relative/path", "@", "vsock:2:1234"])
def test_notify_is_a_no_op_without_a_usable_socket(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert sdnotify.notify("READY=1") is False


def test_notify_never_raises_when_nobody_listens(monkeypatch, tmp_path):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert sdnotify.notify("STOPPING=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", f"@civitai-test-nobody-{uuid.uuid4().hex}")
    assert sdnotify.notify("STOPPING=1") is False


def test_notify_without_lines_sends_nothing(listener):
    listener()
    assert sdnotify.notify() is False


def test_notify_is_a_no_op_without_af_unix(listener, monkeypatch):
    listener()
    monkeypatch.delattr(socket, "AF_UNIX")
    assert sdnotify.notify("READY=1") is False


@pytest.mark.parametrize("usec, pid, expected", [
    (None, None, None),
    ("30000000", None, 30.0),
    ("500000", "self", 0.5),
    ("30000000", "other", None),
    ("30000000", "nonsense", None),
    ("0", None, None),
    ("-5", None, None),
    ("soon", None, None),
])
def test_watchdog_interval(monkeypatch, usec, pid, expected):
    for name, value in (("WATCHDOG_USEC", usec),
                        ("WATCHDOG_PID", {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(pid, pid))):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert sdnotify.watchdog_interval_s() == expected


def test_sd_notify_messages_from_a_real_daemon_run(daemon_factory):
    """READY=1 once it serves, WATCHDOG=1 while it runs, STOPPING=1 on SIGTERM, exit 0: all from the
    main pid, as systemd's NotifyAccess=main requires."""
    sock = NotifySocket()
    try:
        daemon = daemon_factory(
            {"jwt_secret": "", "civitai_url": "http://127.0.0.1:9/api/v1", "update_time": "04:00"},
            manifest=[],
            env={"NOTIFY_SOCKET": sock.env_value, "WATCHDOG_USEC": "2000000"},
        )
        daemon.start(wait_ready=False)
        main_pid = daemon.proc.pid
        seen, ready_pid = sock.wait_for("READY=1", 30)
        assert ready_pid == main_pid, seen
        # It serves by the time it says so.
        import requests
        assert requests.get(f"{daemon.base_url}/health", timeout=5).status_code == 200
        _, watchdog_pid = sock.wait_for("WATCHDOG=1", 5)   # every second at WatchdogSec=2
        assert watchdog_pid == main_pid
        daemon.track_pids()
        daemon.proc.send_signal(signal.SIGTERM)
        seen, stopping_pid = sock.wait_for("STOPPING=1", 25)
        assert stopping_pid == main_pid, seen
        assert daemon.proc.wait(25) == 0, daemon.stderr()
    finally:
        sock.close()
