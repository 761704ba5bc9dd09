"""The library routes in-process: /api/library from the manifest, the job store and the files on
disk; previews served from beside the files; the scan, speed and layout routes and what they ask
the supervisor."""
from __future__ import annotations

import json
import os
import time

import pytest

from tests.web.appkit import FakeControl, WsgiClient, make_cfg
from web.app import make_app
from web.hub import Hub

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 100
JPEG = b"\xff\xd8\xff\xe0" + b"\x01" * 100


def info(version_id, model_name, version_name, words, base="SDXL 1.0", kind="LORA"):
    return json.dumps({"id": version_id, "name": version_name, "baseModel": base, "trainedWords": words,
                       "model": {"name": model_name, "type": kind}, "images": []})


@pytest.fixture
def lib(env):
    """A library with one model in each state."""
    base = env.cfg.download_path
    for folder in ("checkpoint", "Lora/SDXL"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    (base / "checkpoint" / "dream.safetensors").write_bytes(b"d" * 1000)
    (base / "checkpoint" / "dream.civitai.info").write_text(info(11, "Dream (from info)", "v1", ["dreamy", " "]))
    (base / "checkpoint" / "dream.preview.png").write_bytes(JPEG)  # named .png, really a JPEG
    (base / "Lora" / "SDXL" / "old.safetensors").write_bytes(b"o" * 300)
    (base / "Lora" / "SDXL" / "old.civitai.info").write_text(info(41, "Old Lora", "v1", ["oldword"]))
    (base / "Lora" / "SDXL" / ".new.safetensors.part").write_bytes(b"p" * 50)
    env.control.manifest = [
        {"modelId": 1, "modelVersionId": 11, "fileId": 111, "model_type": "checkpoint",
         "filename": "dream.safetensors", "priority": 3, "mine": True},
        {"modelId": 2, "modelVersionId": 21, "fileId": 211, "model_type": "Lora/SDXL", "filename": "run.safetensors"},
        {"modelId": 3, "model_type": "checkpoint"},  # minimal, never resolved
        {"modelId": 4, "modelVersionId": 42, "fileId": 421, "model_type": "Lora/SDXL", "filename": "old.safetensors"},
        {"modelId": 5, "modelVersionId": 51, "fileId": 511, "model_type": "Lora/SDXL", "filename": "bad.safetensors"},
        {"modelId": 6, "modelVersionId": 61, "fileId": 611, "model_type": "Lora/SDXL", "filename": "wait.safetensors"},
    ]
    w = env.writer
    done = w.add_job(model_id=1, version_id=11, file_id=111, model_type="checkpoint", filename="dream.safetensors")
    w.update_job(done["id"], state="downloading")
    w.update_job(done["id"], state="verifying")
    w.update_job(done["id"], state="done", model_name="Dream XL", version_name="v1.0", base_model="Pony")
    run = w.add_job(model_id=2, version_id=21, file_id=211, model_type="Lora/SDXL", filename="run.safetensors",
                    bytes_total=5000)
    w.update_job(run["id"], state="downloading", bytes_done=1000, model_name="Runner")
    w.add_job(model_id=4, version_id=42, file_id=421, model_type="Lora/SDXL", filename="old.safetensors",
              source="update")
    bad = w.add_job(model_id=5, version_id=51, file_id=511, model_type="Lora/SDXL", filename="bad.safetensors")
    w.update_job(bad["id"], state="downloading")
    w.update_job(bad["id"], state="failed", error="Civitai refused access")
    wait = w.add_job(model_id=6, version_id=61, file_id=611, model_type="Lora/SDXL", filename="wait.safetensors")
    w.update_job(wait["id"], state="paused")
    return env


def by_model(body):
    return {e["model_id"]: e for e in body["entries"]}


def test_every_entry_with_its_state_names_and_files(lib):
    res = lib.client.get("/api/library")
    assert res.status == 200
    body = res.json()
    e = by_model(body)
    assert [x["model_id"] for x in body["entries"]] == [1, 2, 3, 4, 5, 6]  # the manifest's order
    assert {m: x["state"] for m, x in e.items()} == {
        1: "present", 2: "downloading", 3: "missing", 4: "update_available", 5: "failed", 6: "paused"}
    dream = e[1]
    # The job's names win over the info file's; the info gives what the job lacks.
    assert (dream["model_name"], dream["version_name"], dream["base_model"]) == ("Dream XL", "v1.0", "Pony")
    assert dream["type"] == "LORA" and dream["trigger_words"] == ["dreamy"]
    assert dream["preview"] is True and dream["info"] is True
    assert dream["size"] == 1000 and dream["path"] == "checkpoint/dream.safetensors" and dream["priority"] == 3
    assert dream["url"] == f"{lib.cfg.civitai_origin}/models/1?modelVersionId=11"
    assert e[4]["model_name"] == "Old Lora" and e[4]["trigger_words"] == ["oldword"] and e[4]["preview"] is False
    assert e[2]["model_name"] == "Runner" and e[2]["size"] is None and e[2]["job"]["bytes_done"] == 1000
    assert e[5]["job"]["error"] == "Civitai refused access"
    assert e[3]["path"] is None and e[3]["url"] == f"{lib.cfg.civitai_origin}/models/3"
    assert body["counts"]["present"] == 1 and body["counts"]["missing"] == 1


def test_folders_bytes_and_free_space(lib):
    body = lib.client.get("/api/library").json()
    folders = {f["folder"]: f for f in body["folders"]}
    assert set(folders) == {"checkpoint", "Lora/SDXL"}
    ckpt = folders["checkpoint"]
    assert ckpt["entries"] == 2 and ckpt["entry_bytes"] == 1000
    assert ckpt["bytes"] == 1000 + len(JPEG) + len((lib.cfg.download_path / "checkpoint" / "dream.civitai.info")
                                                   .read_bytes())
    lora = folders["Lora/SDXL"]
    assert lora["entries"] == 4 and lora["bytes"] >= 350  # the model, its info and the partial file
    disk = body["disk"]
    assert disk["free"] > 0 and disk["total"] >= disk["used"]


def test_the_info_file_is_read_again_when_it_changes(lib):
    path = lib.cfg.download_path / "Lora" / "SDXL" / "old.civitai.info"
    assert by_model(lib.client.get("/api/library").json())[4]["trigger_words"] == ["oldword"]
    path.write_text(info(41, "Old Lora", "v1", ["fresh", "words"]))
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    assert by_model(lib.client.get("/api/library").json())[4]["trigger_words"] == ["fresh", "words"]


def test_a_symlinked_folder_is_not_looked_into(lib, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.safetensors").write_bytes(b"x")
    (outside / "x.preview.png").write_bytes(PNG)
    os.symlink(outside, lib.cfg.download_path / "linked")
    lib.control.manifest = [{"modelId": 9, "model_type": "linked", "filename": "x.safetensors"}]
    entry = lib.client.get("/api/library").json()["entries"][0]
    assert entry["state"] == "missing" and entry["preview"] is False
    res = lib.client.get("/api/library/preview?path=linked/x.safetensors")
    assert res.status == 404 and "symlink" in res.json()["error"]


def test_the_library_with_a_thousand_entries_is_one_quick_answer(env):
    base = env.cfg.download_path / "lora"
    base.mkdir(parents=True)
    env.control.manifest = []
    for i in range(1000):
        name = f"model-{i}.safetensors"
        (base / name).write_bytes(b"m")
        (base / f"model-{i}.civitai.info").write_text(info(i + 1, f"Model {i}", "v1", [f"w{i}"]))
        env.control.manifest.append({"modelId": i + 1, "modelVersionId": i + 1, "fileId": i + 1,
                                     "model_type": "lora", "filename": name})
    body = env.client.get("/api/library").json()
    assert len(body["entries"]) == 1000 and body["counts"]["present"] == 1000
    assert body["entries"][999]["trigger_words"] == ["w999"]


# --- previews ---------------------------------------------------------------------------------------

def test_a_preview_is_served_with_its_real_content_type(lib):
    res = lib.client.get("/api/library/preview?path=checkpoint/dream.safetensors")
    assert res.status == 200 and res.body == JPEG
    assert res.headers["content-type"] == "image/jpeg"  # what the bytes are, not the name
    assert res.headers["content-length"] == str(len(JPEG))
    assert res.headers["cache-control"].startswith("private")
    assert res.headers["x-content-type-options"] == "nosniff"


def test_a_preview_needs_the_token(lib):
    res = WsgiClient(lib.app).get("/api/library/preview?path=checkpoint/dream.safetensors")
    assert res.status == 401


@pytest.mark.parametrize("path, status", [
    ("dream.safetensors", 400), ("../checkpoint/dream.safetensors", 422), ("/etc/passwd", 422),
    ("checkpoint/..", 422), ("checkpoint\\x/dream.safetensors", 422), ("con/dream.safetensors", 422),
    ("checkpoint/nothing.safetensors", 404), ("Lora/SDXL/old.safetensors", 404), ("nowhere/x.bin", 404),
])
def test_preview_paths_are_checked(lib, path, status):
    from urllib.parse import quote
    res = lib.client.get(f"/api/library/preview?path={quote(path)}")
    assert res.status == status, res.body
    assert res.json()["error"]


def test_a_preview_path_is_required(lib):
    res = lib.client.get("/api/library/preview")
    assert res.status == 400 and "'path'" in res.json()["error"]


def test_a_symlinked_preview_or_garbage_is_not_served(lib, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(PNG)
    folder = lib.cfg.download_path / "Lora" / "SDXL"
    os.symlink(secret, folder / "old.preview.png")
    res = lib.client.get("/api/library/preview?path=Lora/SDXL/old.safetensors")
    assert res.status == 404 and "symlink" in res.json()["error"]
    (folder / "old.preview.png").unlink()
    (folder / "old.preview.webp").write_bytes(b"<html>not an image</html>")
    res = lib.client.get("/api/library/preview?path=Lora/SDXL/old.safetensors")
    assert res.status == 404 and "not a PNG" in res.json()["error"]


def test_the_csp_lets_the_page_show_blob_images(env):
    csp = env.client.get("/gui").headers["content-security-policy"]
    assert "img-src 'self' data: blob:" in csp


# --- scan ------------------------------------------------------------------------------------------

def test_a_scan_starts_with_no_body_and_reports(env):
    assert env.client.get("/api/library/scan").json() == {"scan": None}
    res = env.client.request("POST", "/api/library/scan")
    assert res.status == 202 and res.json()["scan"]["state"] == "running"
    assert env.control.calls[-1] == ("library_scan", {})
    status = env.client.get("/api/library/scan").json()["scan"]
    assert status["state"] == "running" and status["unknown"] == []
    again = env.client.post("/api/library/scan", {})
    assert again.status == 409


def test_a_scan_of_one_folder_as_a_dry_run(env):
    (env.cfg.download_path / "Lora").mkdir(parents=True)
    res = env.client.post("/api/library/scan", {"folder": "Lora", "dry_run": True})
    assert res.status == 202
    assert env.control.calls[-1] == ("library_scan", {"folder": "Lora", "dry_run": True})
    scan = res.json()["scan"]
    assert scan["folder"] == "Lora" and scan["dry_run"] is True


@pytest.mark.parametrize("body, status, words", [
    ({"folder": "../etc"}, 422, "'folder'"), ({"folder": 5}, 400, "'folder'"), ({"dry_run": "yes"}, 400, "dry_run"),
    ({"folders": "x"}, 422, "unknown field"), ({"folder": "missing"}, 404, "no folder"),
])
def test_bad_scan_requests(env, body, status, words):
    res = env.client.post("/api/library/scan", body)
    assert res.status == status and words in res.json()["error"]


# --- speed -----------------------------------------------------------------------------------------

def test_speed_is_read_set_and_cleared(env):
    res = env.client.get("/api/speed")
    assert res.status == 200 and res.json()["source"] == "config" and env.control.calls[-1] == ("speed", {})
    res = env.client.request("PUT", "/api/speed", json_body={"max_speed": 5_000_000})
    assert res.status == 200 and res.json() == {"max_speed": 5_000_000, "source": "api", "config": 0,
                                                "override": 5_000_000, "schedule": []}
    assert env.control.calls[-1] == ("set_speed", {"max_speed": 5_000_000})
    res = env.client.request("PUT", "/api/speed", json_body={"max_speed": None})
    assert res.status == 200 and res.json()["override"] is None
    assert env.control.calls[-1] == ("set_speed", {"max_speed": None})


@pytest.mark.parametrize("body", [{"max_speed": "5MB"}, {"max_speed": -1}, {"max_speed": True}, {"max_speed": 1.5},
                                  {"max_speed": 2**41}, {}, {"max_speed": 1, "x": 2}])
def test_a_speed_that_is_not_bytes_per_second_is_422(env, body):
    calls = len(env.control.calls)
    res = env.client.request("PUT", "/api/speed", json_body=body)
    assert res.status == 422, res.body
    assert "max_speed" in res.json()["error"] or "unknown field" in res.json()["error"]
    assert len(env.control.calls) == calls


# --- layout ----------------------------------------------------------------------------------------

def test_the_layout_table_follows_the_config(tmp_path):
    cfg = make_cfg(tmp_path, layout="comfyui", folders={"LORA": "loras/civitai"})
    from ipc.store import JobStore
    from ipc.tokens import mint_token
    store = JobStore(cfg.db_path)
    try:
        app = make_app(cfg, store, FakeControl(store), Hub(store))
        token = mint_token(cfg.jwt_secret, days=1)
        body = WsgiClient(app, token).get("/api/layout").json()
    finally:
        store.close()
    assert body["layout"] == "comfyui"
    assert body["folders"]["Checkpoint"] == "checkpoints" and body["folders"]["LORA"] == "loras/civitai"
    assert body["folders"]["LoCon"] == "loras" and "LORA" in body["types"]


# --- a job's preview flag ----------------------------------------------------------------------------

def test_a_finished_job_says_whether_its_preview_is_there(lib):
    jobs = {j["model_id"]: j for j in lib.client.get("/api/jobs?limit=50").json()["jobs"]}
    assert jobs[1]["state"] == "done" and jobs[1]["preview"] is True  # checkpoint/dream.preview.png
    assert jobs[2]["preview"] is False  # still downloading
    one = lib.client.get(f"/api/jobs/{jobs[1]['id']}").json()["job"]
    assert one["preview"] is True
    assert {j["id"]: j["preview"] for j in lib.hub.snapshot_jobs()}[jobs[1]["id"]] is True
    (lib.cfg.download_path / "checkpoint" / "dream.preview.png").unlink()
    assert lib.client.get(f"/api/jobs/{jobs[1]['id']}").json()["job"]["preview"] is False
