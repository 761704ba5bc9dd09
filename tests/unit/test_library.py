"""The library import: which files a walk takes, which folders may be scanned, the plan of
entries (pure), the by-hash request, and whole scans in this process against the fake Civitai
(known, renamed, unknown and already listed files; a second scan reads and asks nothing)."""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest
import responses

from ipc.config import load_config
from ipc.library import (
    ANSWER_PREFIX,
    LibraryError,
    due_for_lookup,
    load_answers,
    new_scan,
    save_answers,
    scan_folder,
)
from ipc.manifest import ManifestError
from ipc.store import JobStore
from tests.fakeciv import FakeCivitai
from workers.civitai import CivitaiClient, CivitaiError
from workers.library import (
    answers_from,
    hash_file,
    import_here,
    plan_import,
    run_scan,
    walk_library,
)

KEY = "library-test-key-0123456789"
SCAN_KEYS = {"state", "folder", "dry_run", "files_done", "files_total", "bytes_done", "bytes_total", "matched",
             "added", "already_listed", "unknown", "differs", "skipped", "seconds", "error"}


def write(path: Path, data: bytes = b"weights") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- walking ---------------------------------------------------------------------------------


def test_the_walk_takes_model_files_and_passes_over_hidden_partial_and_sidecar_files(tmp_path):
    root = tmp_path / "models"
    for rel in ("Lora/a.safetensors", "Lora/sub/b.ckpt", "checkpoints/c.PT", "x/d.pth", "x/e.bin", "x/f.gguf",
                "x/g.sft", "x/h.onnx"):
        write(root / rel)
    for rel in ("Lora/.a2.safetensors.part", "Lora/.a2.safetensors.part.json", "Lora/a.civitai.info",
                "Lora/a.preview.png", "Lora/a.json", "Lora/a.txt", "Lora/a.yaml", "Lora/a.safetensors.part",
                ".hidden/i.safetensors", "Lora/.j.safetensors"):
        write(root / rel)
    files, skipped = walk_library(root)
    assert [f.rel for f in files] == ["Lora/a.safetensors", "Lora/sub/b.ckpt", "checkpoints/c.PT", "x/d.pth",
                                      "x/e.bin", "x/f.gguf", "x/g.sft", "x/h.onnx"]
    assert files[1].folder == "Lora/sub" and files[1].name == "b.ckpt" and files[1].size == len(b"weights")
    assert skipped == []


def test_symlinks_are_never_followed_and_are_reported(tmp_path):
    root = tmp_path / "models"
    outside = tmp_path / "elsewhere"
    write(outside / "secret.safetensors")
    write(root / "Lora/real.safetensors")
    os.symlink(outside, root / "Linked")
    os.symlink(outside / "secret.safetensors", root / "Lora/link.safetensors")
    os.symlink(root / "Lora" / "real.safetensors", root / "Lora/note.txt")  # not a model name: silent
    files, skipped = walk_library(root)
    assert [f.rel for f in files] == ["Lora/real.safetensors"]
    assert sorted(skipped) == [["Linked", "a symlink: the import follows no link"],
                               ["Lora/link.safetensors", "a symlink: the import follows no link"]]


def test_files_directly_in_download_dir_and_folders_the_manifest_refuses_are_reported(tmp_path):
    root = tmp_path / "models"
    write(root / "loose.safetensors")
    write(root / "ends in a dot./x.safetensors")
    write(root / "Lora/bad name .safetensors")  # trailing space before the suffix is fine: kept
    write(root / "Lora/ok.safetensors")
    files, skipped = walk_library(root)
    assert [f.rel for f in files] == ["Lora/bad name .safetensors", "Lora/ok.safetensors"]
    reasons = dict(map(tuple, skipped))
    assert "directly in download_dir" in reasons["loose.safetensors"]
    assert "cannot be a model_type" in reasons["ends in a dot./x.safetensors"]


def test_a_folder_inside_download_dir_is_walked_alone(tmp_path):
    root = tmp_path / "models"
    write(root / "Lora/a.safetensors")
    write(root / "checkpoints/b.safetensors")
    files, _ = walk_library(root, "Lora")
    assert [f.rel for f in files] == ["Lora/a.safetensors"]


# --- which folder may be scanned --------------------------------------------------------------


def test_scan_folder_rules(tmp_path):
    root = tmp_path / "webui"
    (root / "models/Lora").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    assert scan_folder(root, None) is None and scan_folder(root, ".") is None
    assert scan_folder(root, "models/Lora") == "models/Lora"
    assert scan_folder(root, str(root / "models" / "Lora")) == "models/Lora"
    assert scan_folder(root, str(root)) is None
    assert scan_folder(root, "Lora", cwd=root / "models") == "models/Lora"  # as typed in a shell there
    for outside in (str(tmp_path / "other"), "../other", "models/../../other"):
        with pytest.raises(LibraryError) as err:
            scan_folder(root, outside)
        assert outside in str(err.value) and "outside download_dir" in str(err.value) and str(root) in str(err.value)
    with pytest.raises(LibraryError, match="there is no folder"):
        scan_folder(root, "models/Nope")
    os.symlink(tmp_path / "other", root / "models/Linked")
    with pytest.raises(LibraryError, match="is a symlink"):
        scan_folder(root, "models/Linked")
    os.symlink(root / "models", root / "alias")  # a link inside pointing inside: still not followed
    with pytest.raises(LibraryError, match="is a symlink"):
        scan_folder(root, "alias/Lora")
    write(root / "models/file.safetensors")
    with pytest.raises(LibraryError, match="is not a folder"):
        scan_folder(root, "models/file.safetensors")


# --- the plan (pure) ----------------------------------------------------------------------------


def answer(model_id, version_id, file_id, updated="2025-01-02T03:04:05.000Z"):
    return {"t": 1.0, "v": {"modelId": model_id, "modelVersionId": version_id, "fileId": file_id,
                            "updatedAt": updated, "name": "civitai-name.safetensors"}}


A, B, C, D, E = ("a" * 64, "b" * 64, "c" * 64, "d" * 64, "e" * 64)


def test_plan_pins_known_files_where_they_are_under_their_own_names():
    answers = {A.upper(): answer(1, 10, 100), B.upper(): answer(2, 20, 200), C.upper(): {"t": 1.0, "v": None}}
    plan = plan_import([("Lora/SDXL/my own name.safetensors", A), ("ckpt/b.safetensors", B),
                        ("Lora/mine.safetensors", C)], answers, [])
    assert plan.entries == [
        {"modelId": 1, "modelVersionId": 10, "fileId": 100, "model_type": "Lora/SDXL", "sha256": A.upper(),
         "filename": "my own name.safetensors", "updatedAt": "2025-01-02T03:04:05.000Z"},
        {"modelId": 2, "modelVersionId": 20, "fileId": 200, "model_type": "ckpt", "sha256": B.upper(),
         "filename": "b.safetensors", "updatedAt": "2025-01-02T03:04:05.000Z"}]
    assert (plan.matched, plan.already_listed, plan.unknown, plan.differs) == (2, 0, ["Lora/mine.safetensors"], [])
    assert plan.needs_lookup == []


def test_plan_never_adds_a_file_twice_and_reports_one_that_differs_from_its_entry():
    entries = [
        {"modelId": 1, "model_type": "Lora", "modelVersionId": 10, "fileId": 100, "filename": "a.safetensors",
         "sha256": A.upper()},
        {"modelId": 5, "model_type": "ckpt", "filename": "changed.safetensors", "sha256": E.upper(), "fileId": 500},
        {"modelId": 3, "model_type": "Lora"},  # the newest of model 3 in Lora: it covers a model-3 file there
    ]
    answers = {A.upper(): answer(1, 10, 100), B.upper(): answer(1, 10, 100), D.upper(): answer(3, 30, 300)}
    found = [("Lora/a.safetensors", A),  # the entry's place and bytes
             ("backup/a-copy.safetensors", B),  # another copy of a listed fileId (hash B maps to it here)
             ("ckpt/changed.safetensors", C),  # at an entry's place with other bytes
             ("Lora/three.safetensors", D)]
    plan = plan_import(found, answers, entries)
    assert plan.entries == []
    assert plan.already_listed == 3 and plan.differs == ["ckpt/changed.safetensors"] and plan.unknown == []
    # the same file twice in one scan: one entry
    twice = plan_import([("x/a.safetensors", A), ("y/a.safetensors", A)], {A.upper(): answer(1, 10, 100)}, [])
    assert len(twice.entries) == 1 and twice.already_listed == 1


def test_plan_asks_for_what_it_has_no_answer_for():
    plan = plan_import([("Lora/a.safetensors", A)], {}, [])
    assert plan.needs_lookup == [A.upper()] and plan.unknown == ["Lora/a.safetensors"]


def test_unmatched_hashes_are_asked_again_after_a_week_known_ones_never():
    now = 1_000_000_000.0
    answers = {A: {"t": now - 3600, "v": None}, B: {"t": now - 8 * 86400, "v": None},
               C: {"t": now - 400 * 86400, "v": {"modelId": 1}}}
    assert due_for_lookup([A, B, C, D], answers, now) == [B, D]


def test_answers_map_each_asked_hash_to_its_file_or_none():
    versions = [{"id": 10, "modelId": 1, "name": "v1", "updatedAt": "2025-01-01T00:00:00Z", "baseModel": "SD 1.5",
                 "model": {"name": "Dream", "type": "Checkpoint"},
                 "files": [{"id": 100, "name": "d.safetensors", "type": "Model", "hashes": {"SHA256": A.upper()}},
                           {"id": 101, "name": "d.vae.pt", "type": "VAE", "hashes": {"SHA256": B.upper()}},
                           {"id": 102, "name": "other.ckpt", "type": "Model", "hashes": {"SHA256": E.upper()}}]}]
    out = answers_from(versions, [A.upper(), B.upper(), C.upper()], now=5.0)
    assert set(out) == {A.upper(), B.upper(), C.upper()}
    assert out[A.upper()]["v"]["fileId"] == 100 and out[B.upper()]["v"]["file_type"] == "VAE"
    assert out[A.upper()]["v"]["model_name"] == "Dream" and out[A.upper()]["v"]["type"] == "Checkpoint"
    assert out[C.upper()] == {"t": 5.0, "v": None}


# --- the request ----------------------------------------------------------------------------------


def test_by_hash_posts_up_to_100_hashes_a_request_with_the_key_and_its_turn():
    turns = []

    class Throttle:
        def wait(self):
            turns.append(1)

    client = CivitaiClient("https://civitai.example/api/v1", api_key=KEY, throttle=Throttle(), timeout_s=5)
    client._sleep = lambda s: None
    hashes = [f"{i:064x}" for i in range(250)]
    with responses.RequestsMock() as rsps:
        rsps.add(responses.POST, "https://civitai.example/api/v1/model-versions/by-hash", status=502)
        rsps.add(responses.POST, "https://civitai.example/api/v1/model-versions/by-hash",
                 json=[{"id": 1, "modelId": 2, "files": []}])
        rsps.add(responses.POST, "https://civitai.example/api/v1/model-versions/by-hash", json=[])
        rsps.add(responses.POST, "https://civitai.example/api/v1/model-versions/by-hash", json=[])
        found = client.versions_by_hash(hashes)
        bodies = [json.loads(c.request.body) for c in rsps.calls]
        auth = {c.request.headers.get("Authorization") for c in rsps.calls}
    assert found == [{"id": 1, "modelId": 2, "files": []}]
    assert [len(b) for b in bodies] == [100, 100, 100, 50]  # the 502 was asked again
    assert bodies[1] == [h.upper() for h in hashes[:100]] and bodies[3] == [h.upper() for h in hashes[200:]]
    assert auth == {f"Bearer {KEY}"} and len(turns) == 4


def test_by_hash_errors_are_sentences_without_the_key():
    client = CivitaiClient("https://civitai.example/api/v1", api_key=KEY, timeout_s=5)
    with responses.RequestsMock() as rsps:
        rsps.add(responses.POST, "https://civitai.example/api/v1/model-versions/by-hash", status=429,
                 headers={"Retry-After": "7"}, json={"error": "Rate limit exceeded, please retry shortly."})
        with pytest.raises(CivitaiError) as err:
            client.versions_by_hash([A])
    assert err.value.reason == "rate_limited" and err.value.retry_after_s == 7 and KEY not in str(err.value)
    with pytest.raises(ValueError):
        client.versions_by_hash(["not a hash"])


# --- run_scan with callbacks ------------------------------------------------------------------------


def test_run_scan_hands_on_each_hash_and_answer_and_reports_progress(tmp_path):
    root = tmp_path / "models"
    data = {f"Lora/f{i}.safetensors": os.urandom(3000 + i) for i in range(5)}
    for rel, blob in data.items():
        write(root / rel, blob)
    known = {rel: blob for rel, blob in list(data.items())[:2]}
    st = {rel: os.stat(root / rel) for rel in data}
    known_files = {rel: {"sha256": sha(blob), "size": st[rel].st_size, "mtime_ns": st[rel].st_mtime_ns}
                   for rel, blob in known.items()}
    hashed, batches, progress, asked = [], [], [], []

    def lookup(batch):
        asked.append(list(batch))
        f0 = sha(data["Lora/f0.safetensors"]).upper()
        f3 = sha(data["Lora/f3.safetensors"]).upper()
        return [{"id": 10, "modelId": 1, "files": [{"id": 100, "hashes": {"SHA256": f0}},
                                                   {"id": 103, "hashes": {"SHA256": f3}}]}]

    outcome = run_scan(root, None, entries=[], known_files=known_files, answers={}, lookup=lookup,
                       on_hashed=hashed.extend, on_answers=batches.append, on_progress=progress.append)
    scan = outcome.scan
    assert set(scan) == SCAN_KEYS and scan["state"] == "done" and scan["error"] is None
    assert sorted(r[0] for r in hashed) == ["Lora/f2.safetensors", "Lora/f3.safetensors", "Lora/f4.safetensors"]
    assert all(r[1] == sha(data[r[0]]) and r[2] == st[r[0]].st_size and r[3] == st[r[0]].st_mtime_ns for r in hashed)
    assert outcome.hashed_files == 3 and outcome.requests == 1 and len(asked[0]) == 5
    assert len(batches) == 1 and len(batches[0]) == 5
    assert (scan["files_total"], scan["files_done"]) == (5, 5)
    assert scan["bytes_total"] == scan["bytes_done"] == sum(len(data[f"Lora/f{i}.safetensors"]) for i in (2, 3, 4))
    assert (scan["matched"], scan["added"]) == (2, 2) and len(scan["unknown"]) == 3
    assert [e["fileId"] for e in outcome.entries] == [100, 103]
    assert progress[0]["state"] == "running" and progress[-1]["state"] == "done"
    assert all(set(p) == SCAN_KEYS for p in progress)


def test_a_scan_can_be_cancelled_and_keeps_what_it_hashed(tmp_path):
    root = tmp_path / "models"
    for i in range(3):
        write(root / f"ckpt/big{i}.safetensors", b"\0" * (64 << 20))
    hashed = []
    started = time.monotonic()
    calls = {"n": 0}

    def stop_soon():
        calls["n"] += 1
        return calls["n"] > 1

    outcome = run_scan(root, None, entries=[], known_files={}, answers={}, lookup=None, on_hashed=hashed.extend,
                       should_stop=stop_soon, threads=1)
    assert outcome.scan["state"] == "failed" and outcome.scan["error"] == "cancelled"
    assert time.monotonic() - started < 5
    assert len(hashed) < 3


def test_a_file_that_changes_while_it_is_read_is_not_recorded(tmp_path, monkeypatch):
    root = tmp_path / "models"
    write(root / "ckpt/growing.safetensors", b"x" * 10_000)
    import workers.library as library

    real = library.hash_file

    def racing(path, buf, counter, stop):  # another program appends while the import reads
        with open(path, "ab") as fh:
            fh.write(b"more")
        return real(path, buf, counter, stop)

    monkeypatch.setattr(library, "hash_file", racing)
    hashed = []
    outcome = run_scan(root, None, entries=[], known_files={}, answers={}, lookup=None, on_hashed=hashed.extend)
    assert hashed == []
    assert outcome.scan["skipped"] == [["ckpt/growing.safetensors",
                                        "changed while it was read (still being written?); scan again"]]


def test_hash_file_is_sha256_of_every_byte(tmp_path):
    blob = os.urandom((3 << 20) + 17)
    path = write(tmp_path / "x.bin", blob)

    class Counter:
        n = 0

    counter = Counter()
    digest, size, mtime_ns = hash_file(path, bytearray(1 << 20), counter, threading.Event())
    assert digest == sha(blob) and size == len(blob) == counter.n and mtime_ns == os.stat(path).st_mtime_ns


def test_the_remembered_answers_round_trip_through_the_store(tmp_path):
    store = JobStore(tmp_path / "daemon.db")
    save_answers(store, {A.upper(): {"t": 1.0, "v": None}, B.upper(): answer(1, 10, 100)})
    store.set_kv("library.byhash", "not an answer")
    store.set_kv("library.byhasi", "neither")
    assert load_answers(store) == {A.upper(): {"t": 1.0, "v": None}, B.upper(): answer(1, 10, 100)}
    assert store.get_kv(ANSWER_PREFIX + A.upper()) == {"t": 1.0, "v": None}
    store.close()


def test_a_new_scan_has_the_shape_the_api_answers():
    assert set(new_scan("Lora", True)) == SCAN_KEYS


# --- import_here against the fake Civitai ----------------------------------------------------------


@pytest.fixture
def fake():
    fake = FakeCivitai()
    try:
        yield fake
    finally:
        fake.close()
        assert not fake.errors, fake.errors


def make_library(fake: FakeCivitai, tmp_path: Path, manifest: list | str | None = None):
    fake.add_model(1, name="Dream", type="Checkpoint", versions=[dict(id=10, files=[
        dict(id=101, name="dream.safetensors", primary=True, size_bytes=(2 << 20) + 3),
        dict(id=102, name="dream.vae.safetensors", type="VAE", fp=None, size=None, size_bytes=5000)])])
    fake.add_model(2, name="Style", type="LORA", versions=[dict(id=20, files=[
        dict(id=201, name="style.safetensors", primary=True, size_bytes=4096)])])
    fake.add_model(3, name="Listed", type="LORA", versions=[dict(id=30, files=[
        dict(id=301, name="listed.safetensors", primary=True, size_bytes=3000)])])
    root = tmp_path / "webui"
    write(root / "models/Stable-diffusion/dream.safetensors", fake.file_bytes(101))
    write(root / "models/VAE/dream.vae.safetensors", fake.file_bytes(102))
    write(root / "models/Lora/SDXL/my style (renamed).safetensors", fake.file_bytes(201))
    write(root / "models/Lora/listed.safetensors", fake.file_bytes(301))
    write(root / "models/Lora/homemade.safetensors", b"trained at home" * 100)
    write(root / "models/Lora/homemade.civitai.info", b"{}")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"civitai_url": fake.api_url, "throttle": 0, "download_dir": "webui",
                                  "civitai_api_key": KEY}))
    if manifest is None:
        manifest = [{"modelId": 3, "model_type": "models/Lora", "filename": "listed.safetensors", "note": "mine"}]
    (tmp_path / "manifest.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    cfg, _ = load_config(config)
    return cfg, root


def by_hash_requests(fake):
    return fake.requests_to("api", path_re="/model-versions/by-hash")


def test_an_import_adopts_known_and_renamed_files_lists_the_unknown_and_skips_the_listed(fake, tmp_path):
    cfg, root = make_library(fake, tmp_path)
    scan = import_here(cfg, None, dry_run=False)
    assert scan["state"] == "done", scan
    assert (scan["files_total"], scan["matched"], scan["added"], scan["already_listed"]) == (5, 3, 3, 1)
    assert scan["unknown"] == ["models/Lora/homemade.safetensors"] and scan["differs"] == []
    entries = json.loads(cfg.manifest_path.read_text())
    assert entries[0] == {"modelId": 3, "model_type": "models/Lora", "filename": "listed.safetensors", "note": "mine"}
    added = {e["fileId"]: e for e in entries[1:]}
    assert added[201] == {"modelId": 2, "modelVersionId": 20, "fileId": 201, "model_type": "models/Lora/SDXL",
                          "sha256": fake.file_sha256(201), "filename": "my style (renamed).safetensors",
                          "updatedAt": fake.version_json(20)["updatedAt"]}
    assert (added[101]["model_type"], added[101]["filename"]) == ("models/Stable-diffusion", "dream.safetensors")
    assert (added[102]["model_type"], added[102]["modelId"]) == ("models/VAE", 1)
    assert not fake.requests_to("api", path_re="/api/download/")  # nothing downloaded
    assert not fake.requests_to("cdn")
    # Nothing moved, renamed or touched; the file table knows every hash for the daemon's sync.
    assert (root / "models/Lora/SDXL/my style (renamed).safetensors").read_bytes() == fake.file_bytes(201)
    store = JobStore(cfg.db_path)
    files = store.all_files()
    store.close()
    assert files["models/VAE/dream.vae.safetensors"]["sha256"] == fake.file_sha256(102).lower()
    assert len(files) == 5
    assert [len(json.loads(r.body)) for r in by_hash_requests(fake)] == [4]  # the listed file is not asked about


def test_a_second_scan_reads_nothing_and_asks_civitai_nothing(fake, tmp_path, monkeypatch):
    cfg, _ = make_library(fake, tmp_path)
    first = import_here(cfg, None, dry_run=False)
    assert first["bytes_total"] > 2 << 20 and len(by_hash_requests(fake)) == 1
    manifest_before = cfg.manifest_path.read_bytes()
    import workers.library as library

    reads = []
    real = library.hash_file
    monkeypatch.setattr(library, "hash_file", lambda *a: reads.append(a[0]) or real(*a))
    fake.clear_requests()
    second = import_here(cfg, None, dry_run=False)
    assert second["state"] == "done" and (second["bytes_total"], second["bytes_done"]) == (0, 0)
    assert reads == [] and fake.requests == []
    assert (second["matched"], second["added"], second["already_listed"]) == (3, 0, 4)  # the hand entry names no file
    assert second["unknown"] == ["models/Lora/homemade.safetensors"]
    assert cfg.manifest_path.read_bytes() == manifest_before  # nothing to add: not even rewritten


def test_a_changed_file_is_hashed_again_and_an_unknown_one_asked_again_after_a_week(fake, tmp_path):
    cfg, root = make_library(fake, tmp_path)
    import_here(cfg, None, dry_run=False)
    homemade = root / "models/Lora/homemade.safetensors"
    write(homemade, b"trained again" * 100)
    fake.clear_requests()
    scan = import_here(cfg, None, dry_run=False)
    assert scan["bytes_total"] == homemade.stat().st_size
    assert [json.loads(r.body) for r in by_hash_requests(fake)] == [[sha(b"trained again" * 100).upper()]]
    store = JobStore(cfg.db_path)
    key = ANSWER_PREFIX + sha(b"trained again" * 100).upper()
    store.set_kv(key, {"t": time.time() - 8 * 86400, "v": None})
    store.close()
    fake.clear_requests()
    import_here(cfg, None, dry_run=False)
    assert [json.loads(r.body) for r in by_hash_requests(fake)] == [[sha(b"trained again" * 100).upper()]]


def test_a_dry_run_changes_no_manifest(fake, tmp_path):
    cfg, _ = make_library(fake, tmp_path)
    before = cfg.manifest_path.read_bytes()
    scan = import_here(cfg, None, dry_run=True)
    assert scan["state"] == "done" and scan["dry_run"] and scan["added"] == 3
    assert cfg.manifest_path.read_bytes() == before


def test_a_file_at_an_entrys_place_with_other_bytes_differs_and_is_left_alone(fake, tmp_path):
    manifest = [{"modelId": 2, "modelVersionId": 20, "fileId": 201, "model_type": "models/Lora/SDXL",
                 "filename": "my style (renamed).safetensors", "sha256": "AB" * 32}]
    cfg, root = make_library(fake, tmp_path, manifest)
    scan = import_here(cfg, None, dry_run=False)
    assert scan["differs"] == ["models/Lora/SDXL/my style (renamed).safetensors"]
    entries = json.loads(cfg.manifest_path.read_text())
    assert entries[0] == manifest[0] and 201 not in [e.get("fileId") for e in entries[1:]]
    assert (root / "models/Lora/SDXL/my style (renamed).safetensors").read_bytes() == fake.file_bytes(201)


def test_a_folder_import_takes_only_that_folder(fake, tmp_path):
    cfg, root = make_library(fake, tmp_path)
    scan = import_here(cfg, "models/VAE", dry_run=False)
    assert scan["folder"] == "models/VAE" and scan["files_total"] == 1 and scan["added"] == 1
    with pytest.raises(LibraryError, match="outside download_dir"):
        import_here(cfg, str(tmp_path), dry_run=False)


def test_a_broken_manifest_is_never_overwritten_and_nothing_is_hashed(fake, tmp_path):
    cfg, _ = make_library(fake, tmp_path, manifest='[{"modelId": 1, "model_type": "x",}, oops]')
    with pytest.raises(ManifestError):
        import_here(cfg, None, dry_run=False)
    assert cfg.manifest_path.read_text() == '[{"modelId": 1, "model_type": "x",}, oops]'
    assert fake.requests == [] and not cfg.db_path.exists()


def test_a_persons_save_during_the_import_is_kept_and_planned_on(fake, tmp_path):
    cfg, _ = make_library(fake, tmp_path)
    saved = {"done": False}
    edit = [{"modelId": 3, "model_type": "models/Lora", "filename": "listed.safetensors", "note": "mine"},
            {"modelId": 1, "modelVersionId": 10, "fileId": 102, "model_type": "models/VAE",
             "filename": "dream.vae.safetensors", "note": "added by hand"}]

    def progress(scan):
        if not saved["done"] and scan["files_done"]:
            saved["done"] = True
            cfg.manifest_path.write_text(json.dumps(edit))

    scan = import_here(cfg, None, dry_run=False, progress=progress)
    assert saved["done"] and scan["state"] == "done"
    entries = json.loads(cfg.manifest_path.read_text())
    assert entries[:2] == edit  # the person's save, as saved
    assert sorted(e["fileId"] for e in entries[2:]) == [101, 201]  # 102 is theirs now: not added twice
    assert scan["added"] == 2


def test_civitai_down_fails_the_scan_with_a_sentence_and_keeps_the_hashes(fake, tmp_path):
    cfg, _ = make_library(fake, tmp_path)
    fake.set_api_fault(r"/model-versions/by-hash", 503)
    before = cfg.manifest_path.read_bytes()
    scan = import_here(cfg, None, dry_run=False)
    assert scan["state"] == "failed" and "Civitai could not identify the files" in scan["error"]
    assert "503" in scan["error"] and KEY not in scan["error"]
    assert cfg.manifest_path.read_bytes() == before
    store = JobStore(cfg.db_path)
    assert len(store.all_files()) == 5
    store.close()
    fake.clear_faults()
    again = import_here(cfg, None, dry_run=False)
    assert again["state"] == "done" and again["bytes_total"] == 0 and again["added"] == 3


# --- the command line's progress and summary ---------------------------------------------------------


class Stream:
    def __init__(self, tty: bool):
        self.tty = tty
        self.text = ""

    def isatty(self):
        return self.tty

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_progress_on_a_terminal_is_one_line_with_speed_and_time_left():
    from ipc.cli import ScanProgress

    now = [100.0]
    stream = Stream(tty=True)
    bar = ScanProgress(stream, clock=lambda: now[0])
    scan = {**new_scan(None, False), "files_total": 8, "bytes_total": 8_000_000_000}
    for step in range(1, 5):
        now[0] += 1.0
        bar.update({**scan, "files_done": step, "bytes_done": step * 1_000_000_000})
    assert "\n" not in stream.text and stream.text.count("\r") == 4
    last = stream.text.rsplit("\r", 1)[1]
    assert last.startswith("hashing 4/8 files · 4.00 GB of 8.00 GB · 1.00 GB/s · 4 s left")
    bar.finish()
    assert stream.text.endswith("\r")


def test_progress_elsewhere_is_a_line_every_few_seconds():
    from ipc.cli import PLAIN_LINE_EVERY_S, ScanProgress

    now = [0.0]
    stream = Stream(tty=False)
    bar = ScanProgress(stream, clock=lambda: now[0])
    scan = {**new_scan(None, False), "files_total": 2, "bytes_total": 10}
    for _ in range(int(PLAIN_LINE_EVERY_S * 4) * 3):  # 3 periods at 4 updates a second
        now[0] += 0.25
        bar.update({**scan, "bytes_done": 1})
    assert stream.text.count("\n") == 3 and "\r" not in stream.text


def test_the_summary_names_every_unknown_differing_and_skipped_file():
    from ipc.cli import scan_summary

    scan = {**new_scan("Lora", False), "state": "done", "files_total": 4, "matched": 2, "added": 1,
            "already_listed": 1, "unknown": ["Lora/a.safetensors"], "differs": ["Lora/b.safetensors"],
            "skipped": [["Lora/link.safetensors", "a symlink: the import follows no link"]], "seconds": 2.5}
    text = scan_summary(scan, "/srv/webui/Lora")
    assert text.splitlines() == [
        "/srv/webui/Lora: 4 model file(s); 2 known on Civitai; 1 added to manifest.json; 1 already listed",
        "unknown on Civitai (1), left as they are:", "  Lora/a.safetensors",
        "different from the file their manifest entry names (1), left as they are:", "  Lora/b.safetensors",
        "skipped (1):", "  Lora/link.safetensors: a symlink: the import follows no link", "took 2.5 s"]


def test_in_a_child_the_scan_is_messages_and_never_touches_the_database(fake, tmp_path):
    from ipc.library import load_answers as load
    from workers.library import scan_child

    cfg, _ = make_library(fake, tmp_path)
    sent = []
    request = {"folder": "models", "dry_run": False, "entries": json.loads(cfg.manifest_path.read_text()),
               "files": {}, "answers": {}}
    scan_child(lambda msg: sent.append(json.loads(json.dumps(msg))), cfg, request, lambda: False)
    assert not cfg.db_path.exists()
    kinds = [m["type"] for m in sent]
    assert kinds[0] == "library_progress" and kinds[-1] == "library_done"
    assert kinds.count("library_hashes") == 5 and kinds.count("library_answers") == 1
    assert kinds.index("library_answers") > max(i for i, k in enumerate(kinds) if k == "library_hashes")
    done = sent[-1]
    assert done["scan"]["state"] == "done" and sorted(e["fileId"] for e in done["entries"]) == [101, 102, 201]
    assert len(done["found"]) == 5
    # What the supervisor does with the messages gives the next scan all it needs: nothing to read or ask.
    store = JobStore(tmp_path / "daemon.db")
    for msg in sent:
        if msg["type"] == "library_hashes":
            for path, digest, size, mtime_ns in msg["files"]:
                store.record_file(path, digest, size, mtime_ns)
        elif msg["type"] == "library_answers":
            save_answers(store, msg["answers"])
    fake.clear_requests()
    sent.clear()
    again = {**request, "files": store.all_files(), "answers": load(store),
             "entries": request["entries"] + done["entries"]}
    store.close()
    scan_child(sent.append, cfg, again, lambda: False)
    assert fake.requests == [] and [m["type"] for m in sent].count("library_hashes") == 0
    assert sent[-1]["scan"]["bytes_total"] == 0 and sent[-1]["entries"] == []


def test_on_a_case_insensitive_file_system_an_entry_spelled_otherwise_is_the_same_place(monkeypatch):
    import workers.library as library

    entries = [{"modelId": 1, "model_type": "Lora", "filename": "Style.safetensors", "sha256": A.upper()}]
    found = [("lora/style.safetensors", A)]
    answers = {A.upper(): answer(1, 10, 100)}
    monkeypatch.setattr(library, "CASE_INSENSITIVE_FS", False)  # Linux: another folder, another file
    assert len(plan_import(found, answers, entries).entries) == 1
    monkeypatch.setattr(library, "CASE_INSENSITIVE_FS", True)  # Windows, macOS: the listed file
    plan = plan_import(found, answers, entries)
    assert plan.entries == [] and plan.already_listed == 1
