"""The user's own program reads the files: a daemon whose download_dir is an AUTOMATIC1111 webui
folder or ComfyUI's models/ folder puts each file where that program looks, a checkpoint and
its VAE are two entries of one model, and in replace mode each follows its own successor. The
real process tree against the fake Civitai."""
from __future__ import annotations

import hashlib

import pytest

from tests.helpers import base_config, wait_until

KiB = 1024
OLD = "2024-01-01T00:00:00.000Z"
NEW = "2024-06-01T00:00:00.000Z"

LAYOUTS = {
    "a1111": {"checkpoint": "models/Stable-diffusion", "vae": "models/VAE", "lora": "models/Lora"},
    "comfyui": {"checkpoint": "checkpoints", "vae": "vae", "lora": "loras"},
}


def sha256_file(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def updater_status(daemon) -> dict:
    return daemon.api("GET", "/api/status").json()["updater"]


def check_now(daemon, timeout=30) -> None:
    before = updater_status(daemon).get("last_check")
    wait_until(lambda: daemon.api("POST", "/api/updates/check").status_code == 202, 15, interval=0.2,
               message="the updater to take a check")
    wait_until(lambda: (lambda u: u.get("last_check") != before and not u.get("running"))(updater_status(daemon)),
               timeout, interval=0.2, message="the check to finish")


@pytest.mark.parametrize("layout", ["a1111", "comfyui"])
def test_each_file_lands_where_its_program_reads_it_and_follows_its_own_successor(fake_civitai, daemon_factory,
                                                                                  tmp_path, layout):
    fake = fake_civitai
    folders = LAYOUTS[layout]
    fake.add_model(1, name="Dream", type="Checkpoint", versions=[dict(id=10, name="v1", published_at=OLD, files=[
        dict(id=101, name="dream.safetensors", primary=True, size_bytes=96 * KiB),
        dict(id=102, name="dream.vae.safetensors", type="VAE", fp=None, size=None, size_bytes=24 * KiB)])])
    fake.add_model(2, name="Style", type="LORA", versions=[dict(id=20, files=[
        dict(id=201, name="style.safetensors", primary=True, size_bytes=16 * KiB)])])
    root = tmp_path / ("webui" if layout == "a1111" else "ComfyUI/models")
    manifest = [{"modelId": 1, "model_type": folders["checkpoint"]},
                {"modelId": 1, "model_type": folders["vae"], "file_type": "VAE"}]
    daemon = daemon_factory(base_config(fake, download_dir=str(root), layout=layout, manifest_mode="replace"), manifest)
    daemon.start()
    resp = daemon.api("POST", "/api/jobs", json={"model_id": 2})  # no folder: the layout's
    assert resp.status_code == 201, resp.text

    for folder, name, fid in ((folders["checkpoint"], "dream.safetensors", 101),
                              (folders["vae"], "dream.vae.safetensors", 102),
                              (folders["lora"], "style.safetensors", 201)):
        event = daemon.wait_event("download_completed", lambda e, fid=fid: e["path"].endswith(fake.file_name(fid)))
        assert event["path"] == f"{folder}/{name}"
        assert sha256_file(root / folder / name) == fake.file_sha256(fid).lower() == event["sha256"]

    def recorded(m):
        return len(m) == 3 and all(e.get("fileId") and e.get("sha256") for e in m)

    entries = wait_until(lambda: (lambda m: m if recorded(m) else None)(daemon.read_manifest()), 20,
                         message="both entries and the LORA recorded in manifest.json")
    by_file = {e["fileId"]: e for e in entries}
    assert (by_file[101]["model_type"], by_file[101]["filename"], by_file[101]["modelVersionId"]) == \
        (folders["checkpoint"], "dream.safetensors", 10)
    assert (by_file[102]["model_type"], by_file[102]["filename"], by_file[102]["file_type"]) == \
        (folders["vae"], "dream.vae.safetensors", "VAE")
    assert (by_file[201]["model_type"], by_file[201]["filename"]) == (folders["lora"], "style.safetensors")
    assert by_file[102]["sha256"] == fake.file_sha256(102)  # upper-case, as Civitai gives it
    jobs = daemon.jobs()
    assert {j["model_name"] for j in jobs} == {"Dream", "Style"}
    assert {j["base_model"] for j in jobs} == {"SDXL 1.0"}

    # A new version with both files changed: each entry follows its own successor.
    fake.add_version(1, dict(id=11, name="v2", published_at=NEW, files=[
        dict(id=111, name="dream-v2.safetensors", primary=True, size_bytes=100 * KiB),
        dict(id=112, name="dream-v2.vae.safetensors", type="VAE", fp=None, size=None, size_bytes=28 * KiB)]))
    check_now(daemon)
    for folder, name, fid in ((folders["checkpoint"], "dream-v2.safetensors", 111),
                              (folders["vae"], "dream-v2.vae.safetensors", 112)):
        event = daemon.wait_event("download_completed", lambda e, fid=fid: e["path"].endswith(fake.file_name(fid)))
        assert event["path"] == f"{folder}/{name}"
        assert sha256_file(root / folder / name) == fake.file_sha256(fid).lower()

    def followed(m):
        files = {e.get("fileId") for e in m}
        return len(m) == 3 and {111, 112, 201} == files and all(e.get("sha256") for e in m)

    entries = wait_until(lambda: (lambda m: m if followed(m) else None)(daemon.read_manifest()), 20,
                         message=f"each entry replaced by its own successor (manifest now {daemon.read_manifest()})")
    by_file = {e["fileId"]: e for e in entries}
    assert (by_file[111]["model_type"], by_file[111]["modelVersionId"]) == (folders["checkpoint"], 11)
    assert (by_file[112]["model_type"], by_file[112]["modelVersionId"], by_file[112]["file_type"]) == \
        (folders["vae"], 11, "VAE")
    assert (root / folders["checkpoint"] / "dream.safetensors").exists()  # old files stay
    assert daemon.stop() == 0


def test_in_append_mode_each_file_of_a_model_gets_its_successor_beside_it(fake_civitai, daemon_factory, tmp_path):
    fake = fake_civitai
    fake.add_model(1, name="Dream", type="Checkpoint", versions=[dict(id=10, name="v1", published_at=OLD, files=[
        dict(id=101, name="dream.safetensors", primary=True, size_bytes=96 * KiB),
        dict(id=102, name="dream.vae.safetensors", type="VAE", fp=None, size=None, size_bytes=24 * KiB)])])
    root = tmp_path / "ComfyUI" / "models"
    manifest = [{"modelId": 1, "model_type": "checkpoints", "mine": 1},
                {"modelId": 1, "model_type": "vae", "file_type": "VAE", "mine": 2}]
    daemon = daemon_factory(base_config(fake, download_dir=str(root), layout="comfyui", manifest_mode="append"),
                            manifest)
    daemon.start()
    wait_until(lambda: len(daemon.events("download_completed")) == 2, 30, message="both files")
    wait_until(lambda: all(e.get("fileId") for e in daemon.read_manifest()), 20, message="both recorded")
    fake.add_version(1, dict(id=11, name="v2", published_at=NEW, files=[
        dict(id=111, name="dream-v2.safetensors", primary=True, size_bytes=100 * KiB),
        dict(id=112, name="dream-v2.vae.safetensors", type="VAE", fp=None, size=None, size_bytes=28 * KiB)]))
    check_now(daemon)
    wait_until(lambda: len(daemon.events("download_completed")) == 4, 30, message="both successors")

    def appended(m):
        return len(m) == 4 and {e.get("fileId") for e in m} == {101, 102, 111, 112} and all(e.get("sha256") for e in m)

    entries = wait_until(lambda: (lambda m: m if appended(m) else None)(daemon.read_manifest()), 20,
                         message=f"a successor beside each entry (manifest now {daemon.read_manifest()})")
    by_file = {e["fileId"]: e for e in entries}
    assert [e["fileId"] for e in entries[:2]] == [101, 102], "the old entries stay as they were"
    assert (by_file[111]["model_type"], by_file[111]["mine"]) == ("checkpoints", 1)
    assert (by_file[112]["model_type"], by_file[112]["mine"], by_file[112]["file_type"]) == ("vae", 2, "VAE")
    for folder, fid in (("checkpoints", 101), ("vae", 102), ("checkpoints", 111), ("vae", 112)):
        assert sha256_file(root / folder / fake.file_name(fid)) == fake.file_sha256(fid).lower()
    assert daemon.stop() == 0
