"""The manifest's pure merges (a download, an update in both modes, several files per model) and
the keeper that writes them at most once a second and loses nothing in a crash between."""
from __future__ import annotations

import json
import os

import pytest

from ipc.keeper import ManifestKeeper
from ipc.ledger import JobLedger
from ipc.manifest import ManifestFile, apply_update, duplicate_entries, record_download
from ipc.store import JobStore

SHA_A, SHA_B = "AA" * 32, "BB" * 32


def job(**kw):
    base = {"id": 1, "model_id": 5, "version_id": 50, "file_id": 500, "model_type": "Lora", "sha256": SHA_A.lower(),
            "url": "https://civitai.test/api/download/models/50", "filename": "zxq.safetensors",
            "updated_at_civitai": "2026-01-01T00:00:00Z", "source": "manifest", "priority": 10,
            "file_type": None, "format": None, "fp": None}
    base.update(kw)
    return base


# --- record_download ------------------------------------------------------------------------------

def test_a_download_fills_in_its_minimal_entry_and_keeps_custom_fields_in_place():
    entries = [{"my_note": "keep", "modelId": 5, "model_type": "Lora", "priority": 2}]
    out, changed = record_download(entries, job())
    assert changed and list(out[0])[:4] == ["my_note", "modelId", "model_type", "priority"]
    assert out[0]["fileId"] == 500 and out[0]["sha256"] == SHA_A and out[0]["filename"] == "zxq.safetensors"
    assert entries[0] == {"my_note": "keep", "modelId": 5, "model_type": "Lora", "priority": 2}, "pure"
    again, changed = record_download(out, job())
    assert not changed and again is out


def test_a_checkpoint_and_its_vae_fill_their_own_entries():
    entries = [{"modelId": 5, "model_type": "models/Stable-diffusion"},
               {"modelId": 5, "model_type": "models/VAE", "file_type": "VAE"}]
    out, _ = record_download(entries, job(model_type="models/VAE", file_id=501, filename="vae.safetensors",
                                          file_type="VAE"))
    out, _ = record_download(out, job(model_type="models/Stable-diffusion", file_id=500, filename="ck.safetensors"))
    assert [(e["model_type"], e["fileId"], e["filename"]) for e in out] == [
        ("models/Stable-diffusion", 500, "ck.safetensors"), ("models/VAE", 501, "vae.safetensors")]


def test_an_api_download_without_an_entry_adds_one_and_a_manifest_one_does_not():
    out, changed = record_download([], job(source="api", priority=3))
    assert changed and out == [{"modelId": 5, "modelVersionId": 50, "fileId": 500, "model_type": "Lora",
                                "sha256": SHA_A, "url": "https://civitai.test/api/download/models/50",
                                "filename": "zxq.safetensors", "updatedAt": "2026-01-01T00:00:00Z", "priority": 3}]
    assert record_download([], job(source="manifest")) == ([], False)


# --- apply_update --------------------------------------------------------------------------------

def update(prev_v=50, prev_f=500, v=60, f=600, sha=SHA_B, name="zxq_v3.safetensors"):
    return {"model_id": 5, "previous_version_id": prev_v, "previous_file_id": prev_f,
            "entry": {"modelVersionId": v, "fileId": f, "sha256": sha, "filename": name,
                      "updatedAt": "2026-02-01T00:00:00Z", "url": f"https://x/{v}"}}


def test_replace_mode_swaps_the_file_fields_and_keeps_the_rest():
    entries = [{"modelId": 5, "note": 1, "modelVersionId": 50, "fileId": 500, "model_type": "Lora", "priority": 2,
                "sha256": SHA_A, "filename": "zxq.safetensors", "updatedAt": "x", "url": "u"}]
    out, entry = apply_update(entries, update(), "replace")
    assert len(out) == 1 and entry is out[0]
    assert out[0] == {"modelId": 5, "note": 1, "modelVersionId": 60, "fileId": 600, "model_type": "Lora",
                      "priority": 2, "sha256": SHA_B, "filename": "zxq_v3.safetensors",
                      "updatedAt": "2026-02-01T00:00:00Z", "url": "https://x/60"}
    again, entry2 = apply_update(out, update(), "replace")
    assert again is out and entry2 == out[0], "applying it twice changes nothing"


def test_append_mode_adds_an_entry_beside_the_old_one():
    entries = [{"modelId": 5, "modelVersionId": 50, "fileId": 500, "model_type": "Lora", "mine": True,
                "sha256": SHA_A, "filename": "zxq.safetensors"}]
    out, entry = apply_update(entries, update(), "append")
    assert len(out) == 2 and out[0] == entries[0] and entry is out[1]
    assert entry["mine"] is True and entry["model_type"] == "Lora" and entry["fileId"] == 600
    assert apply_update(out, update(), "append")[0] is out


def test_each_file_of_a_model_follows_its_own_successor():
    entries = [{"modelId": 5, "modelVersionId": 50, "fileId": 500, "model_type": "checkpoints"},
               {"modelId": 5, "modelVersionId": 50, "fileId": 501, "model_type": "vae"}]
    out, _ = apply_update(entries, update(prev_f=501, f=601, name="vae3.safetensors"), "replace")
    out, _ = apply_update(out, update(prev_f=500, f=600), "replace")
    assert [(e["model_type"], e["fileId"]) for e in out] == [("checkpoints", 600), ("vae", 601)]


def test_an_update_for_an_entry_that_left_does_nothing():
    entries = [{"modelId": 5, "modelVersionId": 40, "fileId": 400, "model_type": "Lora"}]
    assert apply_update(entries, update(), "replace") == (entries, None)


def test_duplicates_are_found():
    entries = [{"modelId": 1, "model_type": "a"}, {"modelId": 1, "model_type": "a"},
               {"modelId": 1, "model_type": "a", "fp": "fp16"}, {"modelId": 2, "modelVersionId": 3, "fileId": 4,
                                                                 "model_type": "b"},
               {"modelId": 2, "modelVersionId": 3, "fileId": 4, "model_type": "c"}]
    assert duplicate_entries(entries) == [(1, 0), (4, 3)]


# --- the keeper -------------------------------------------------------------------------------------

class Clock:
    t = 100.0

    def __call__(self):
        return self.t


@pytest.fixture
def env(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps([{"modelId": 5, "model_type": "Lora"}]))
    os.utime(path, (1, 1))  # settled: not a save in progress
    store = JobStore(tmp_path / "data" / "daemon.db")
    clock = Clock()

    def make():
        mf = ManifestFile(path, tmp_path / "data" / "manifest.lock")
        mf.load()
        keeper = ManifestKeeper(mf, store, "replace", tmp_path / "models", clock=clock)
        keeper.load()
        return keeper

    yield path, store, clock, make
    store.close()


def test_writes_are_coalesced_to_one_a_second(env):
    path, store, clock, make = env
    keeper = make()
    with store.transaction():
        keeper.apply({"op": "record", "job": job()})
    assert keeper.flush() and "zxq" in path.read_text()
    writes = 0
    for i in range(20):
        with store.transaction():
            keeper.apply({"op": "add", "entry": {"modelId": 100 + i, "model_type": "Lora"}})
        if keeper.flush():
            writes += 1
        clock.t += 0.125
    assert writes == 2, "20 changes in 2.5 s after a write: two more rewrites"
    assert keeper.flush(force=True) and len(json.loads(path.read_text())) == 21


def test_a_crash_before_the_write_loses_nothing(env):
    path, store, clock, make = env
    keeper = make()
    keeper.flush(force=True)
    clock.t += 5
    with store.transaction():
        keeper.apply({"op": "record", "job": job()})
    assert keeper.dirty  # ... and the process dies here
    assert "zxq" not in path.read_text()
    again = make()
    assert again.entries[0]["fileId"] == 500, "the pending change is in force at once"
    assert again.flush(force=True) and json.loads(path.read_text())[0]["fileId"] == 500
    assert store.manifest_ops() == []


def test_a_persons_save_becomes_the_base_of_the_pending_changes(env):
    path, store, clock, make = env
    keeper = make()
    with store.transaction():
        keeper.apply({"op": "record", "job": job()})
    path.write_text(json.dumps([{"modelId": 5, "model_type": "Lora", "note": "theirs"},
                                {"modelId": 9, "model_type": "checkpoint"}]))
    os.utime(path, (2, 2))
    assert not keeper.flush(force=True), "their save must be read first"
    assert keeper.poll() == "changed"
    assert keeper.entries[0]["note"] == "theirs" and keeper.entries[0]["fileId"] == 500
    assert keeper.flush(force=True)
    on_disk = json.loads(path.read_text())
    assert on_disk[0]["note"] == "theirs" and on_disk[0]["fileId"] == 500 and on_disk[1]["modelId"] == 9


def test_a_broken_save_is_never_overwritten(env):
    path, store, clock, make = env
    keeper = make()
    path.write_text("[{broken")
    os.utime(path, (3, 3))
    assert keeper.poll() == "invalid" and keeper.error
    with store.transaction():
        keeper.apply({"op": "record", "job": job()})
    assert keeper.next_due() is None and not keeper.flush(force=True)
    assert path.read_text() == "[{broken"


def test_sync_queues_what_is_missing_once(env, tmp_path):
    path, store, clock, make = env
    path.write_text(json.dumps([{"modelId": i, "model_type": "checkpoint"} for i in range(1, 501)]
                               + [{"modelId": 1, "model_type": "checkpoint"}]))
    os.utime(path, (4, 4))
    keeper = make()
    ledger = JobLedger(store)
    ledger.load()
    with store.transaction():
        events, queued = keeper.sync(ledger, "start")
    assert queued == 500 and len(events) == 500
    with store.transaction():
        assert keeper.sync(ledger, "edit") == ([], 0)


def test_sync_skips_a_verified_file_and_queues_a_changed_one(env, tmp_path):
    path, store, clock, make = env
    folder = tmp_path / "models" / "Lora"
    folder.mkdir(parents=True)
    f = folder / "zxq.safetensors"
    f.write_bytes(b"x")
    st = f.stat()
    store.record_file("Lora/zxq.safetensors", SHA_A, st.st_size, st.st_mtime_ns, 50)
    path.write_text(json.dumps([{"modelId": 5, "modelVersionId": 50, "fileId": 500, "model_type": "Lora",
                                 "filename": "zxq.safetensors", "sha256": SHA_A}]))
    os.utime(path, (5, 5))
    keeper = make()
    ledger = JobLedger(store)
    ledger.load()
    assert keeper.sync(ledger, "start")[1] == 0
    f.write_bytes(b"yy")
    assert keeper.sync(ledger, "edit")[1] == 1


def test_a_database_that_refuses_to_forget_written_changes_loses_nothing(env, monkeypatch):
    from ipc.store import StoreUnavailable

    path, store, clock, make = env
    keeper = make()
    with store.transaction():
        keeper.apply({"op": "record", "job": job()})

    def locked(up_to_id):
        raise StoreUnavailable("daemon.db is locked by another program")

    monkeypatch.setattr(store, "clear_manifest_ops", locked)
    with pytest.raises(StoreUnavailable):
        keeper.flush(force=True)
    assert json.loads(path.read_text())[0]["fileId"] == 500, "the file was written"
    assert not keeper.dirty, "and is not written again every second"
    monkeypatch.undo()
    again = make()  # a restart: the rows left behind are applied again, harmlessly
    assert again.entries == keeper.entries and again.flush(force=True)
    assert store.manifest_ops() == []


def test_an_update_found_against_an_older_copy_of_the_entries_is_known(env):
    """The updater's copy of the entries trails by up to UPDATER_SEND_S: the same update can come
    twice, and the second must be recognised so it is neither announced nor queued again."""
    path, store, clock, make = env
    keeper = make()
    with store.transaction():
        keeper.apply({"op": "record", "job": job()})
    assert not keeper.records(5, update()["entry"])
    with store.transaction():
        keeper.apply({"op": "update", "update": update(), "mode": "replace"})
    assert keeper.records(5, update()["entry"])
    assert not keeper.records(6, update()["entry"]), "another model's entries are not looked at"
    assert not keeper.records(5, update(v=61, f=601)["entry"])
