"""The download worker as a real process behind a stand-in supervisor: its messages, how
rarely it wakes up when idle, a cancel, a job sent ahead, and its exit when the supervisor is
killed with -9."""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.fakeciv import fake_civitai  # noqa: F401  (fixture)
from tests.helpers import REPO, base_config, pid_alive, wait_until

MiB = 1 << 20

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc and forks like the Linux supervisor")

# A supervisor reduced to its pipe: it forks the worker the way supervisor.py does (through
# child_entry, which closes the worker's copy of this end), relays JSON lines from stdin to the
# worker and the worker's messages to stdout. With "keep", the worker keeps that copy (so only
# the parent check can see the supervisor die) and checks every 0.5 s instead of every minute.
STAND_IN = r"""
import json, multiprocessing as mp, sys, threading
import workers.worker
from ipc.childmain import child_entry
from workers.worker import worker_main
from ipc.messages import unpack
keep = sys.argv[2] == "keep"
if keep:
    workers.worker.PARENT_CHECK_S = 0.5
if len(sys.argv) > 3:
    workers.worker.PREFETCH_HOLD_S = float(sys.argv[3])
ctx = mp.get_context("fork")
parent, child = ctx.Pipe(duplex=True)
fds = [] if keep else [parent.fileno()]
proc = ctx.Process(target=child_entry, name="worker-1", args=(worker_main, "worker-1", child, sys.argv[1], None, fds))
proc.start()
child.close()
print(json.dumps({"type": "pid", "pid": proc.pid}), flush=True)
def relay():
    for line in sys.stdin:
        parent.send(json.loads(line))
threading.Thread(target=relay, daemon=True).start()
while True:
    try:
        msg = parent.recv()
    except EOFError:
        break
    for one in unpack(msg):
        print(json.dumps(one), flush=True)
"""


class StandIn:
    def __init__(self, tmp_path, fake, keep_parent_end: bool = False, hold_s: float | None = None):
        config = tmp_path / "config.json"
        self.models = tmp_path / "models"
        config.write_text(json.dumps(base_config(fake, download_dir=str(tmp_path / "models"))))
        self.proc = subprocess.Popen([sys.executable, "-c", STAND_IN, str(config),
                                      "keep" if keep_parent_end else "close",
                                      *([] if hold_s is None else [str(hold_s)])], cwd=REPO, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.messages: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.worker_pid = self.next("pid", 30)["pid"]
        self.next("ready", 30)

    def _read(self):
        for line in self.proc.stdout:
            self.messages.put((time.monotonic(), json.loads(line)))

    def next(self, kind: str, timeout: float) -> dict:
        return self.next_timed(kind, timeout)[1]

    def next_timed(self, kind: str, timeout: float) -> tuple[float, dict]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                at, msg = self.messages.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {kind!r} message from the worker within {timeout} s") from None
            if msg.get("type") == kind:
                return at, msg

    def send(self, msg: dict) -> None:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def close(self):
        for pid in (self.worker_pid, self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)


@pytest.fixture(params=[False], ids=["eof"])
def stand_in(request, tmp_path, fake_civitai):  # noqa: F811
    fake_civitai.add_model(1, type="Checkpoint", versions=[dict(id=11, files=[
        dict(id=111, name="model.safetensors", size_bytes=2 * MiB, primary=True)])])
    s = StandIn(tmp_path, fake_civitai, keep_parent_end=request.param)
    yield s
    s.close()


def job(job_id: int = 1, **kw) -> dict:
    spec = {"job_id": job_id, "model_id": 1, "version_id": None, "file_id": None, "model_type": None,
            "filename": None, "sha256": None, "attempt": 1}
    spec.update(kw)
    return {"type": "job", "job": spec}


def context_switches(pid: int) -> int:
    """Every time any thread of `pid` was switched in or out: its wake-ups, give or take."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as fh:
                for line in fh:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
        except OSError:
            pass  # a thread that ended meanwhile
    return total


def test_an_idle_worker_wakes_up_at_most_every_few_seconds(stand_in):
    stand_in.send(job())  # one job first: whatever it started must not keep waking the worker
    stand_in.next("done", 30)
    time.sleep(1)  # let the job's threads end; the window below is the idle worker
    before = context_switches(stand_in.worker_pid)
    time.sleep(10)
    woke = context_switches(stand_in.worker_pid) - before
    # The supervisor check every 5 s; polling every 0.5 s and 1 s was about 30 in this window.
    assert woke <= 6, f"{woke} context switches in 10 s of idleness"


def test_the_info_sidecar_is_there_when_the_worker_says_done(stand_in, tmp_path):
    """Whoever hears of the download (the supervisor, then a webhook's receiver) finds the
    file's .civitai.info beside it: it is written before `done` is sent, not after."""
    stand_in.send(job())
    done = stand_in.next("done", 30)
    model = tmp_path / "models" / done["path"]
    info = model.with_name(model.stem + ".civitai.info")
    assert info.is_file(), sorted(p.name for p in model.parent.iterdir())
    assert json.loads(info.read_text())["files"][0]["hashes"]["SHA256"].lower() == done["sha256"]


def test_a_cancel_reaches_a_running_download_within_two_seconds(stand_in, fake_civitai):  # noqa: F811
    fake_civitai.set_fault(111, "drip", bps=200_000, after_bytes=256 << 10)
    stand_in.send(job())
    stand_in.next("progress", 30)
    sent = time.monotonic()
    stand_in.send({"type": "cancel", "job_id": 1})
    at, error = stand_in.next_timed("error", 10)
    assert error["reason"] == "cancelled" and error["wait"] is False
    assert at - sent < 2.0


def test_a_wait_reaches_the_supervisor_with_its_moment(stand_in, fake_civitai):  # noqa: F811
    fake_civitai.set_file_meta(111, hashed=False)
    before = time.time()
    stand_in.send(job(7))
    error = stand_in.next("error", 30)
    assert set(error) == {"type", "job_id", "error", "reason", "retryable", "retry_after_s", "wait", "wait_until"}
    assert (error["job_id"], error["reason"], error["wait"], error["retryable"]) == (7, "unhashed", True, True)
    assert before + 850 < error["wait_until"] < time.time() + 950
    assert 850 < error["retry_after_s"] <= 900
    assert "has not hashed the file of model version 11" in error["error"]


@pytest.mark.parametrize("stand_in", [False, True], ids=["eof-on-the-pipe", "parent-check"], indirect=True)
def test_a_worker_whose_supervisor_is_killed_exits(stand_in):
    """At once through EOF on its pipe; where some other process still holds the supervisor's
    end (a copy the worker could not close), through the parent check."""
    assert pid_alive(stand_in.worker_pid)
    os.kill(stand_in.proc.pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(stand_in.worker_pid), 15, message="the orphaned worker to exit")


def test_a_job_sent_ahead_starts_when_the_current_one_ends(stand_in, fake_civitai):  # noqa: F811
    fake_civitai.add_model(2, type="Checkpoint", versions=[dict(id=21, files=[
        dict(id=211, name="second.safetensors", size_bytes=MiB, primary=True)])])
    stand_in.send(job(1))
    stand_in.send(job(2, model_id=2))  # ahead: it waits behind job 1 and starts without a round trip
    first, second = stand_in.next("done", 30), stand_in.next("done", 30)
    assert (first["job_id"], second["job_id"]) == (1, 2)
    assert (stand_in.models / second["path"]).is_file()


def test_a_job_sent_ahead_has_its_metadata_and_link_asked_for_while_the_one_in_front_downloads(tmp_path, fake_civitai):  # noqa: F811
    fake_civitai.add_model(1, type="Checkpoint", versions=[dict(id=11, files=[
        dict(id=111, name="model.safetensors", size_bytes=2 * MiB, primary=True)])])
    fake_civitai.add_model(2, type="Checkpoint", versions=[dict(id=21, files=[
        dict(id=211, name="second.safetensors", size_bytes=MiB, primary=True)])])
    # Job 1 takes about 1.75 s; job 2 may wait behind it for 10 s here (1 s in the daemon).
    fake_civitai.set_fault(111, "drip", bps=1 << 20, after_bytes=256 << 10)
    stand_in = StandIn(tmp_path, fake_civitai, hold_s=10.0)
    try:
        ahead_resolved(stand_in, fake_civitai)
    finally:
        stand_in.close()


def ahead_resolved(stand_in, fake_civitai) -> None:  # noqa: F811  (the fixture's name)
    stand_in.send(job(1))
    stand_in.next("progress", 30)
    stand_in.send(job(2, model_id=2))
    at = stand_in.next_timed("done", 30)[0]
    first_done = time.time() - (time.monotonic() - at)
    second = stand_in.next("done", 30)
    assert second["job_id"] == 2
    for path in (r"/api/v1/models/2$", r"/api/download/models/21(\?|$)"):  # the metadata, then the signed link
        asked = [r.time for r in fake_civitai.requests_to("api", path)]
        assert len(asked) == 1, path  # asked once: run_job took the answer instead of asking again
        assert asked[0] < first_done - 1.0, f"{path} of job 2 was asked for only after job 1 ended"


def test_a_job_sent_ahead_of_a_long_download_goes_back_and_a_cancel_of_one_at_once(stand_in, fake_civitai):  # noqa: F811
    """A job that waits behind a slow one is given back after PREFETCH_HOLD_S (1 s) for a free
    worker; a cancel of one that waits is answered at once; the download in front goes on."""
    fake_civitai.set_fault(111, "drip", bps=200_000, after_bytes=256 << 10)
    stand_in.send(job(1))
    stand_in.next("progress", 30)
    sent = time.monotonic()
    stand_in.send(job(2))
    at, back = stand_in.next_timed("returned", 10)
    assert back["job_id"] == 2
    assert 0.9 < at - sent < 3.0
    stand_in.send(job(3))
    sent = time.monotonic()
    stand_in.send({"type": "cancel", "job_id": 3})
    at, back = stand_in.next_timed("returned", 10)
    assert back["job_id"] == 3 and at - sent < 0.9  # before its hold was up
    progress = stand_in.next("progress", 10)
    assert progress["job_id"] == 1  # the download in front was not touched
    stand_in.send({"type": "cancel", "job_id": 1})
    assert stand_in.next("error", 10)["job_id"] == 1
