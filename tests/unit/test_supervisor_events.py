"""The supervisor's event stream, built in-process (no children): every `download_started` of a
job is followed by an end of that attempt before the next one, and no download starts before
`daemon_started` is stored, even when the database refuses the first writes."""
from __future__ import annotations

import json
import sqlite3

import pytest

from ipc.children import ChildState
from ipc.states import ChildKind


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


class PoolWorker(FakeWorker):
    """A worker as the pool's own rules see it (idle, ahead, holder), without a process."""

    kill_reason = release_job_by = None
    kind = ChildKind.WORKER

    def __init__(self, name: str):
        super().__init__(name)
        self.assigned_mono, self.next_job_id, self.next_acked_mono, self.last_job_s = 0.0, None, None, None


def pool_of(sup, monkeypatch, *workers) -> None:
    monkeypatch.setattr(sup.pool, "workers", lambda: list(workers))
    monkeypatch.setattr(sup.pool, "get", lambda name: next((w for w in workers if w.name == name), None))


def queue_models(sup, *model_ids) -> None:
    from ipc.manifest import entry_to_job_spec

    with sup.txn():
        for model_id in model_ids:
            sup.note(sup.ledger.queue(entry_to_job_spec({"modelId": model_id, "model_type": "checkpoint"}),
                                      source="api"))


def ended(sup, worker, *msgs) -> None:
    """What one read from `worker` brings, stored as the loop stores it."""
    for msg in msgs:
        sup.on_message(worker, msg)
    sup.flush_batch()


def failure(job_id: int) -> dict:
    return {"type": "error", "job_id": job_id, "error": "connection reset", "reason": "connection",
            "retryable": True, "retry_after_s": None, "wait": False}


def test_a_worker_whose_last_job_was_quick_gets_one_job_ahead_which_starts_when_the_current_one_ends(
        supervisor, monkeypatch):
    sup = supervisor
    sup.announce_start()
    queue_models(sup, 2, 3, 4)
    w = PoolWorker("worker-1")
    pool_of(sup, monkeypatch, w)
    sup.dispatch()
    sup.dispatch()
    assert len(w.sent) == 1 and w.next_job_id is None  # nothing known of its speed yet: one job
    first = w.job_id
    sup.now[0] += 0.2
    commits = []
    real_transaction = sup.store.transaction
    monkeypatch.setattr(sup.store, "transaction",  # an outer block is a BEGIN and a COMMIT; nested ones join it
                        lambda: (commits.extend([1] if sup.store._depth == 0 else []), real_transaction())[1])
    ended(sup, w, failure(first))
    # Stored, and in the same transaction the freed worker gets a job and, its last one having
    # been quick, the next one ahead.
    assert w.last_job_s == pytest.approx(0.2) and len(commits) == 1
    current, ahead = (m["job"]["job_id"] for m in w.sent[1:])
    assert (w.job_id, w.next_job_id) == (current, ahead)
    assert sup.ledger.get(ahead)["state"] == "downloading"  # its attempt is stored before it is sent
    sup.dispatch()
    assert len(w.sent) == 3  # never more than one ahead
    # The current job ends and the one ahead acknowledges, in one read: it is the current job now,
    # acknowledged, and its deadlines count from this moment.
    sup.now[0] += 5.0
    ended(sup, w, failure(current), {"type": "ack", "job_id": ahead})
    assert (w.job_id, w.next_job_id, w.assigned_mono, w.acked_mono) == (ahead, None, sup.now[0], sup.now[0])
    assert w.last_job_s == pytest.approx(5.0)
    sup.dispatch()
    assert len(w.sent) == 3  # a slow last job: nothing goes ahead of this one


def test_a_job_sent_ahead_and_given_back_or_cancelled_or_lost_with_its_worker(supervisor, monkeypatch):
    from ipc.children import Exit
    from ipc.states import KillReason

    sup = supervisor
    sup.announce_start()
    queue_models(sup, 2, 3)
    w = PoolWorker("worker-1")
    pool_of(sup, monkeypatch, w)
    w.last_job_s = 0.1

    def send_ahead() -> int:
        w.last_job_s = 0.1  # its last job was quick
        sup.dispatch()
        assert w.next_job_id is not None
        return w.next_job_id

    ahead = send_ahead()
    # Given back (it waited too long behind the current job): queued again, the attempt returned,
    # and its start ended for listeners before it starts again; not sent ahead to the same busy
    # worker again (its current job is slow after all).
    ended(sup, w, {"type": "returned", "job_id": ahead})
    job = sup.ledger.get(ahead)
    assert (job["state"], job["attempts"], w.next_job_id, w.last_job_s) == ("queued", 0, None, None)
    sup.dispatch()
    assert w.next_job_id is None
    names = [(name, e.get("reason")) for name, e in stored(sup) if e.get("job_id") == ahead]
    assert names[-2:] == [("download_started", None), ("download_retry", "busy")]
    # A cancel of a job ahead goes to its worker, which answers at once: no deadline that would
    # stop the worker (and the download in front of it) is set.
    ahead = send_ahead()
    with sup.txn():
        sup.note(sup.ledger.cancel(ahead))
    sup.tell_holder(ahead, "cancel")
    assert w.sent[-1] == {"type": "cancel", "job_id": ahead} and w.release_job_by is None
    ended(sup, w, {"type": "returned", "job_id": ahead})
    assert (sup.ledger.get(ahead)["state"], w.next_job_id) == ("cancelled", None)
    assert ahead not in sup.ledger.held
    # Its worker killed for the current job's timeout: the job ahead never started, so it is
    # given back; dead of itself, it may have been running it, so the attempt counts.
    for reason, attempts in ((KillReason.TIMEOUT, 0), (KillReason.CRASH, 1)):
        queue_models(sup, 10 + attempts)
        ahead = send_ahead()
        current = w.job_id
        w.job_id = w.next_job_id = None
        w.ready = False  # dead: not a worker a job can go to
        sup.apply("lost", Exit(w, -9, reason, current, False, ahead))
        sup.flush_batch()
        job = sup.ledger.get(ahead)
        assert (job["state"], job["attempts"]) == ("queued", attempts), reason
        w.ready = True  # restarted


def test_a_verifying_read_with_its_jobs_done_is_not_written_and_one_read_alone_is(supervisor, monkeypatch):
    """A small file's `verifying` comes in the same read as its `done`: the done stores the
    state itself, so the verifying row is one write the database need not take. Read alone (a
    big file hashing its tail), it is stored as before."""
    sup = supervisor
    sup.announce_start()
    queue_models(sup, 2, 3)
    w = PoolWorker("worker-1")
    pool_of(sup, monkeypatch, w)
    written: list[tuple[int, object]] = []
    real = sup.store.set_fields
    monkeypatch.setattr(sup.store, "set_fields", lambda job_id, fields: (
        written.append((job_id, fields.get("state"))), real(job_id, fields))[1])

    def done(job_id: int) -> dict:
        return {"type": "done", "job_id": job_id, "path": f"checkpoint/m{job_id}.safetensors", "sha256": "ab" * 32,
                "bytes": 5, "filename": f"m{job_id}.safetensors"}

    sup.dispatch()
    first = w.job_id
    ended(sup, w, {"type": "progress", "job_id": first, "bytes_done": 5}, {"type": "verifying", "job_id": first},
          done(first))
    assert sup.ledger.get(first)["state"] == "done"
    assert ("verifying" not in [state for job_id, state in written if job_id == first]), written
    sup.dispatch()
    second = w.job_id
    ended(sup, w, {"type": "verifying", "job_id": second})
    assert sup.ledger.get(second)["state"] == "verifying"
    ended(sup, w, done(second))
    assert sup.ledger.get(second)["state"] == "done"


def test_a_dispatch_whose_write_fails_leaves_no_job_held_by_a_worker_that_never_got_it(supervisor, monkeypatch):
    """The attempt is written, then the database refuses the rest (a disk full at the commit):
    nothing was sent, so the job must not stay held in memory (it would never be taken again in
    this run); once the database takes writes again, the job goes out."""
    from ipc.store import StoreUnavailable

    sup = supervisor
    sup.announce_start()
    worker = FakeWorker("worker-1")
    use_workers(sup, monkeypatch, worker)
    real_take = sup.ledger.take

    def take_then_fail(workers):
        real_take(workers)
        raise StoreUnavailable("database or disk is full")

    monkeypatch.setattr(sup.ledger, "take", take_then_fail)
    sup.dispatch()
    assert worker.sent == [] and sup.ledger.held == {}
    monkeypatch.setattr(sup.ledger, "take", real_take)
    for _ in range(3):
        sup.now[0] += 120  # past any backoff of the store retry
        sup.retry_deferred()
    sup.dispatch()
    assert len(worker.sent) == 1
    job = sup.ledger.get(worker.sent[0]["job"]["job_id"])
    assert (job["state"], job["attempts"]) == ("downloading", 1)


def test_a_done_whose_transaction_fails_keeps_its_worker_as_it_was_and_lands_later(supervisor, monkeypatch):
    """The done and the freed worker's next job share one transaction. If it fails (disk full),
    the worker is put back as it was (its job still its own, nothing sent); once the database
    takes writes again the done is stored, and only then does the worker get its next job."""
    from ipc.store import StoreUnavailable

    sup = supervisor
    sup.announce_start()
    queue_models(sup, 2)
    w = PoolWorker("worker-1")
    pool_of(sup, monkeypatch, w)
    sup.dispatch()
    first, assigned_at = w.job_id, w.assigned_mono
    real_take = sup.ledger.take

    def take_then_fail(workers):
        real_take(workers)
        raise StoreUnavailable("database or disk is full")

    monkeypatch.setattr(sup.ledger, "take", take_then_fail)
    sup.now[0] += 0.1
    ended(sup, w, {"type": "done", "job_id": first, "path": "checkpoint/a.safetensors", "sha256": "ab" * 32,
                   "bytes": 5, "filename": "a.safetensors"})
    assert (w.job_id, w.next_job_id, w.assigned_mono, w.last_job_s) == (first, None, assigned_at, None)
    assert len(w.sent) == 1 and sup.ledger.get(first)["state"] == "downloading" and first in sup.ledger.held
    monkeypatch.setattr(sup.ledger, "take", real_take)
    for _ in range(3):
        sup.now[0] += 120  # past any backoff of the store retry
        sup.retry_deferred()
    assert sup.ledger.get(first)["state"] == "done" and w.job_id is None
    sup.dispatch()
    assert len(w.sent) == 2 and w.job_id == w.sent[1]["job"]["job_id"] != first
