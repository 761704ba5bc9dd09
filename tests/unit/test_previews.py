"""ipc.previews.OwedPreviews: who owes which preview, as the supervisor keeps it."""
from __future__ import annotations

import json

from ipc.children import ChildState
from ipc.previews import OwedPreviews

W1, W2 = ("worker-1", 10.0), ("worker-2", 11.0)
W1_AGAIN = ("worker-1", 50.0)  # worker-1 restarted (maybe with its old pid)


def test_the_last_runs_list_goes_to_the_first_worker_ready_and_only_to_it():
    owed = OwedPreviews(["/m/a.safetensors", "/m/b.safetensors"])
    assert owed.hand_to(W1, live={W1}) == (["/m/a.safetensors", "/m/b.safetensors"], 2)
    assert owed.hand_to(W2, live={W1, W2}) == ([], 0)  # worker-1 owes them now


def test_what_a_dead_worker_owed_goes_to_the_next_worker_ready():
    owed = OwedPreviews([])
    owed.owed("/m/a.safetensors", W1)
    owed.owed("/m/b.safetensors", W2)
    assert owed.hand_to(W1_AGAIN, live={W1_AGAIN, W2}) == (["/m/a.safetensors"], 0)
    assert owed.hand_to(W2, live={W1_AGAIN, W2}) == ([], 0)


def test_a_settle_drops_the_path_unless_another_live_worker_owes_a_newer_file_there():
    owed = OwedPreviews(["/m/a.safetensors"])
    owed.hand_to(W1, live={W1})  # a top-up of the last run's preview, on worker-1
    owed.owed("/m/a.safetensors", W2)  # meanwhile worker-2 downloaded a.safetensors again
    assert owed.settled("/m/a.safetensors", W1, live={W1, W2}) is False  # worker-2 still fetches
    assert owed.settled("/m/a.safetensors", W2, live={W1, W2}) is True
    assert len(owed) == 0


def test_a_settle_from_a_worker_other_than_a_dead_owner_is_taken():
    owed = OwedPreviews([])
    owed.owed("/m/a.safetensors", W2)
    assert owed.settled("/m/a.safetensors", W1, live={W1}) is True  # worker-2 is gone
    assert owed.settled("/m/never.safetensors", W1, live={W1}) is True  # unknown: nothing to keep
    assert len(owed) == 0


def test_a_list_read_late_keeps_the_owners_this_run_has_seen_since():
    owed = OwedPreviews()
    assert not owed.loaded
    owed.owed("/m/new.safetensors", W2)  # worker-2 queued one before the store could be read
    owed.load(["/m/old.safetensors", "/m/new.safetensors"])  # the store has both by now
    assert owed.loaded
    assert owed.hand_to(W1, live={W1, W2}) == (["/m/old.safetensors"], 1)


# -- the supervisor's shell around it: a store that cannot be read when the first worker is ready --

class FakeWorker:
    name, started_mono, live, ready = "worker-1", 1.0, True, True
    state, job_id = ChildState.RUNNING, 7  # busy with a job: no dispatch due

    def __init__(self):
        self.sent: list[dict] = []

    def send(self, msg: dict) -> bool:
        self.sent.append(msg)
        return True


def test_owed_previews_the_store_could_not_give_at_the_first_ready_are_handed_on_later(tmp_path, monkeypatch):
    from ipc.store import StoreUnavailable
    from supervisor import OWED_RETRY_S, Supervisor, load_all

    (tmp_path / "config.json").write_text(json.dumps({"workers": 1, "throttle": 0}))
    (tmp_path / "manifest.json").write_text("[]")
    cfg, _, manifest = load_all(str(tmp_path / "config.json"))
    now = [100.0]
    sup = Supervisor(cfg, manifest, clock=lambda: now[0])
    try:
        sup.store.owe_preview("/m/a.safetensors")  # what the last run's worker had queued
        worker = FakeWorker()
        monkeypatch.setattr(sup.pool, "workers", lambda: [worker])
        read = sup.store.owed_previews
        failures = [StoreUnavailable("disk I/O error")]

        def flaky_read():
            if failures:
                raise failures.pop()
            return read()

        monkeypatch.setattr(sup.store, "owed_previews", flaky_read)
        sup.hand_owed_previews(worker)  # its READY
        assert worker.sent == []
        sup.retry_owed_previews()
        assert worker.sent == []  # not due yet
        now[0] += OWED_RETRY_S
        sup.retry_owed_previews()
        assert worker.sent == [{"type": "previews", "paths": ["/m/a.safetensors"]}]
        now[0] += OWED_RETRY_S
        sup.retry_owed_previews()
        assert len(worker.sent) == 1  # read once: nothing more to try
    finally:
        sup.store.close()
