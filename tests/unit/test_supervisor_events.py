"""The supervisor's event stream, built in-process (no children): every `download_started` of a
job is followed by an end of that attempt before the next one, and no download starts before
`daemon_started` is stored, even when the database refuses the first writes."""
from __future__ import annotations

import json
import sqlite3

import pytest

from ipc.children import ChildState


class FakeWorker:
    state, ready, live, started_mono = ChildState.RUNNING, True, True, 1.0

    def __init__(self, name: str, reachable: bool = True):
        self.name, self.reachable = name, reachable
        self.job_id = self.assigned_mono = self.acked_mono = None
        self.sent: list[dict] = []

    def send(self, msg: dict) -> bool:
        if not self.reachable:
            return False  # what Child.send says when the worker's end of the pipe is gone
        self.sent.append(msg)
        return True


@pytest.fixture
def supervisor(tmp_path):
    from supervisor import Supervisor, load_all

    (tmp_path / "config.json").write_text(json.dumps({"workers": 1, "throttle": 0}))
    (tmp_path / "manifest.json").write_text(json.dumps([{"modelId": 1, "model_type": "checkpoint"}]))
    cfg, _, manifest = load_all(str(tmp_path / "config.json"))
    now = [1000.0]
    sup = Supervisor(cfg, manifest, clock=lambda: now[0])
    sup.now = now
    sup.ledger.load()
    sup.keeper.load()
    try:
        yield sup
    finally:
        sup.store.close()


def stored(sup) -> list[tuple[str, dict]]:
    return [(e["event"], e) for e in sup.store.events_after(0, limit=1000)]


def use_workers(sup, monkeypatch, *workers) -> None:
    monkeypatch.setattr(sup.pool, "idle_workers", lambda: [w for w in workers if w.job_id is None])


def test_a_job_its_worker_could_not_be_sent_has_its_start_ended_and_starts_again_as_the_same_attempt(
        supervisor, monkeypatch):
    sup = supervisor
    sup.announce_start()
    dead, alive = FakeWorker("worker-1", reachable=False), FakeWorker("worker-2")
    use_workers(sup, monkeypatch, dead)
    sup.dispatch()
    job = sup.store.list_jobs(limit=10)[0]
    assert (job["state"], job["attempts"]) == ("queued", 0)  # the attempt never happened
    use_workers(sup, monkeypatch, alive)
    sup.dispatch()
    assert [m["job"]["job_id"] for m in alive.sent] == [job["id"]]
    assert alive.sent[0]["job"]["attempt"] == 1
    names = [(name, e.get("attempt")) for name, e in stored(sup) if e.get("job_id") == job["id"]]
    assert names == [("download_queued", None), ("download_started", 1), ("download_retry", 1),
                     ("download_started", 1)]
    retry = next(e for name, e in stored(sup) if name == "download_retry")
    assert retry["delay_s"] == 0 and "next worker" in retry["error"]


def test_daemon_started_is_stored_before_any_download_when_the_database_is_locked_at_start(
        supervisor, monkeypatch):
    sup = supervisor
    locker = sqlite3.connect(str(sup.store.path), timeout=10, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # another program holds the database
    try:
        sup.announce_start()
        worker = FakeWorker("worker-1")
        use_workers(sup, monkeypatch, worker)
        sup.dispatch()
        assert worker.sent == []  # nothing starts while the start is not stored
    finally:
        locker.execute("COMMIT")
        locker.close()
    assert stored(sup) == []
    for _ in range(3):
        sup.now[0] += 120  # past any backoff of the store retry
        sup.retry_deferred()
    sup.dispatch()
    names = [name for name, _ in stored(sup)]
    assert names == ["daemon_started", "download_queued", "download_started"], names
    assert len(worker.sent) == 1


def test_a_progress_read_together_with_its_jobs_done_is_dropped_and_any_other_goes_on(supervisor, monkeypatch):
    """A small file's last progress comes in the same read as its done (the worker's Channel
    sends them as one message): the done carries the bytes, so the progress is neither published
    nor stored. Another job's progress, or one read alone, goes on as before."""
    sup = supervisor
    seen: list[tuple[str, int]] = []
    monkeypatch.setattr(sup, "on_message", lambda child, msg: seen.append((msg["type"], msg["job_id"])))

    class Reads:
        def __init__(self, *reads):
            self.reads = list(reads)

        def recv_all(self):
            return self.reads.pop(0)

    child = Reads([{"type": "progress", "job_id": 1, "bytes_done": 5}, {"type": "progress", "job_id": 2, "bytes_done": 7},
                   {"type": "verifying", "job_id": 1}, {"type": "done", "job_id": 1}],
                  [{"type": "progress", "job_id": 3, "bytes_done": 9}])
    sup.read_messages(child)
    assert seen == [("progress", 2), ("verifying", 1), ("done", 1)]
    sup.read_messages(child)
    assert seen[-1] == ("progress", 3)
