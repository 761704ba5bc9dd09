"""The webhook process (`python -m workers.webhooks`) as the supervisor runs it: a fresh
interpreter with a pipe on stdin and stderr, stopped by SIGTERM or by EOF on stdin."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from ipc.logsetup import RELAY_PREFIX, parse_relayed_line
from ipc.store import JobStore
from tests.helpers import REPO, wait_until
from tests.webhook_receiver import WebhookReceiver
from workers.webhooks import WAKE_BYTE, EventAnnouncer

pytestmark = pytest.mark.skipif(os.name == "nt", reason="SIGTERM is TerminateProcess on Windows")


@pytest.fixture
def receiver():
    r = WebhookReceiver()
    yield r
    r.close()


class WebhookProcess:
    """Started the way supervisor.py's _spawn_fresh starts it."""

    def __init__(self, folder, url: str, *extra: str):
        self.config_path = folder / "config.json"
        self.config_path.write_text(json.dumps({"webhook_url": url, "webhook_secret": "whsec_c2VjcmV0c2VjcmV0c2VjcmV0"}))
        self.store = JobStore(folder / "data" / "daemon.db")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers.webhooks", "--config", str(self.config_path), *extra],
            cwd=str(REPO), env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        wait_until(lambda: "@ready" in self.lines or self.proc.poll() is not None, 20, message="@ready")
        assert "@ready" in self.lines, self.stderr()

    def _read_stderr(self) -> None:
        for raw in self.proc.stderr:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def stderr(self) -> str:
        return "\n".join(self.lines)

    def finish(self, timeout: float = 10) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc.stdin.close()
        self.store.close()


@pytest.fixture
def start(tmp_path):
    made: list[WebhookProcess] = []

    def make(url: str, *extra: str) -> WebhookProcess:
        made.append(WebhookProcess(tmp_path, url, *extra))
        return made[-1]

    yield make
    for p in made:
        p.close()


def assert_clean_exit(p: WebhookProcess, code: int) -> None:
    assert "Fatal Python error" not in p.stderr(), p.stderr()
    assert code == 0, f"exit code {code}:\n{p.stderr()}"


def test_sigterm_is_a_clean_exit(receiver, start):
    p = start(receiver.url)
    p.store.add_event("daemon_started", {"version": "x"})
    wait_until(lambda: receiver.delivered_ids() == [1], 10, message="the first delivery")
    p.proc.send_signal(signal.SIGTERM)
    assert_clean_exit(p, p.finish())


def test_sigterm_while_a_delivery_hangs_is_a_clean_exit(receiver, start):
    receiver.mode = "stall"
    p = start(receiver.url)
    p.store.add_event("daemon_stopping", {"version": "x"})
    wait_until(lambda: receiver.deliveries, 10, message="the stalled delivery")
    p.proc.send_signal(signal.SIGTERM)
    assert_clean_exit(p, p.finish())
    assert [e["id"] for e in p.store.undelivered_events()] == [1]  # goes out after the next start


def test_eof_on_stdin_sends_what_is_queued_then_exits(receiver, start):
    """The supervisor's death (kill -9 included) closes our stdin."""
    p = start(receiver.url)
    p.store.add_event("daemon_stopping", {"version": "x"})
    p.proc.stdin.close()
    assert_clean_exit(p, p.finish())
    assert receiver.delivered_ids() == [1]


def test_a_byte_on_stdin_makes_it_look_now(receiver, start):
    # The event log is polled once an hour here: only the wake-up byte can explain a delivery.
    p = start(receiver.url, "--poll-min-s", "3600", "--poll-max-s", "3600")
    announcer = EventAnnouncer(p.proc.stdin)
    for round_ in range(3):
        ids = [p.store.add_event("download_queued", {"job_id": round_})["id"] for _ in range(2)]
        announcer.announce()
        wait_until(lambda ids=ids: receiver.delivered_ids()[-2:] == ids, 10, message=f"events {ids}")
    assert receiver.delivered_ids() == list(range(1, 7))
    # Many announcements in a burst (the pipe is never read as a count): still one ordered run.
    for _ in range(50):
        p.store.add_event("download_progress", {"job_id": 1})
        announcer.announce()
    wait_until(lambda: len(receiver.delivered_ids()) == 56, 10, message="the burst")
    assert receiver.delivered_ids() == list(range(1, 57))
    p.proc.send_signal(signal.SIGTERM)
    assert_clean_exit(p, p.finish())
    announcer.announce()  # the process is gone: never an error for the supervisor
    assert WAKE_BYTE == b"\n"


def test_its_records_reach_stderr_as_relay_lines(receiver, start):
    receiver.mode = "fail"
    p = start(receiver.url)
    p.store.add_event("download_failed", {"job_id": 1, "error": "x"})
    wait_until(lambda: any("gave up" in line for line in p.lines), 30, message="the give-up warning")
    p.proc.send_signal(signal.SIGTERM)
    assert_clean_exit(p, p.finish())
    records = [parse_relayed_line(line) for line in p.lines if line != "@ready"]
    assert all(line.startswith(RELAY_PREFIX) for line in p.lines if line != "@ready"), p.stderr()
    assert any(level == 30 and name == "webhooks" and "gave up on event 1" in message
               for level, name, message in records), records
