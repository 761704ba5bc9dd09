"""ipc.previews.OwedPreviews: who owes which preview, as the supervisor keeps it."""
from __future__ import annotations

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
