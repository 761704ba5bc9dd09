"""Several files per model: which file of a version a job fetches (selectors, `like`), which
folder a job without one goes to (layouts, `folders`, a version's VAE), the hook after a file is
verified, and names that differ only in case. The fake Civitai serves real HTTP on loopback."""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

from tests.fakeciv import FakeCivitai
from workers.civitai import CivitaiClient, CivitaiError, pick_file, resolve
from workers.download import JobContext, run_job

MiB = 1 << 20

VERSION = {"id": 7, "files": [
    {"id": 71, "name": "m.safetensors", "type": "Model", "primary": True,
     "metadata": {"format": "SafeTensor", "fp": "fp16", "size": "pruned"}},
    {"id": 72, "name": "m_fp32.safetensors", "type": "Model", "metadata": {"format": "SafeTensor", "fp": "fp32",
                                                                            "size": "full"}},
    {"id": 73, "name": "m.vae.safetensors", "type": "VAE", "metadata": {"format": "SafeTensor", "fp": None}},
    {"id": 74, "name": "m_pruned.ckpt", "type": "Pruned Model", "metadata": {"format": "PickleTensor", "fp": "fp16"}},
    {"id": 75, "name": "m-Q8.gguf", "type": "Model", "metadata": {"format": "GGUF", "fp": "fp8"}},
    {"id": 76, "name": "m_bf16.safetensors", "type": "Model", "metadata": {"format": "SafeTensor", "fp": "bf16"}},
]}


@pytest.mark.parametrize("selectors, file_id", [
    ({"file_type": "VAE"}, 73),
    ({"file_type": "vae"}, 73),  # without case, as a person writes it
    ({"file_type": "Pruned Model"}, 74),
    ({"file_type": "pruned model", "format": "picKletensor"}, 74),
    ({"format": "GGUF"}, 75),
    ({"fp": "FP32"}, 72),
    ({"fp": "bf16"}, 76),
    ({"fp": "fp8"}, 75),
    ({"file_type": "Model", "format": "SafeTensor"}, 71),  # several fit: the primary among them
    ({"format": "SafeTensor", "fp": "fp32"}, 72),
    ({}, 71),  # no selectors: the primary
])
def test_selectors_pick_the_file_they_name(selectors, file_id):
    assert pick_file(VERSION, **selectors)["id"] == file_id


def test_among_several_fitting_files_without_a_primary_civitais_preference_wins():
    version = {"id": 8, "files": [
        {"id": 81, "name": "a.ckpt", "type": "Model", "metadata": {"format": "PickleTensor", "fp": "fp16"}},
        {"id": 82, "name": "a.safetensors", "type": "Model", "metadata": {"format": "SafeTensor", "fp": "fp16"}},
        {"id": 83, "name": "a.vae.pt", "type": "VAE", "metadata": {"format": "PickleTensor"}}]}
    assert pick_file(version, fp="fp16")["id"] == 82


def test_a_selector_nothing_fits_says_what_the_version_offers():
    with pytest.raises(CivitaiError) as err:
        pick_file(VERSION, file_type="VAE", fp="fp32")
    text = str(err.value)
    assert err.value.reason == "no_file" and not err.value.retryable
    assert "model version 7" in text and "file_type 'VAE'" in text and "fp 'fp32'" in text
    for offered in ("Model SafeTensor fp16 (m.safetensors)", "VAE SafeTensor (m.vae.safetensors)",
                    "Pruned Model PickleTensor fp16 (m_pruned.ckpt)", "Model GGUF fp8 (m-Q8.gguf)"):
        assert offered in text


def test_a_file_id_wins_over_selectors():
    assert pick_file(VERSION, 72, file_type="VAE")["id"] == 72


def test_like_a_vae_without_metadata_follows_the_new_vae_not_the_primary():
    old_vae = {"id": 3, "type": "VAE", "metadata": {}}
    assert pick_file(VERSION, like=old_vae)["id"] == 73
    old_model = {"id": 1, "type": "Model", "metadata": {}}
    assert pick_file(VERSION, like=old_model)["id"] == 71
    old_fp32 = {"id": 2, "type": "Model", "metadata": {"format": "SafeTensor", "fp": "fp32", "size": "full"}}
    assert pick_file(VERSION, like=old_fp32)["id"] == 72


# --- through the fake: resolve() and run_job() ------------------------------------------------


@pytest.fixture
def fake():
    fake = FakeCivitai()
    try:
        yield fake
    finally:
        fake.close()
        assert not fake.errors, fake.errors


def add_checkpoint_with_vae(fake: FakeCivitai, model_id=1, vid=10, base=100):
    fake.add_model(model_id, name="Dream", type="Checkpoint", versions=[dict(id=vid, name="v1", base_model="SD 1.5", files=[
        dict(id=base + 1, name="dream.safetensors", primary=True, size_bytes=MiB + 1),
        dict(id=base + 2, name="dream.vae.safetensors", type="VAE", fp=None, size=None, size_bytes=4096)])])


def test_resolve_carries_names_types_and_the_raw_json(fake):
    add_checkpoint_with_vae(fake)
    client = CivitaiClient(fake.api_url, timeout_s=5)
    by_model = resolve(client, model_id=1, file_type="vae")
    assert (by_model.file_id, by_model.api_type, by_model.file_type) == (102, "Checkpoint", "VAE")
    assert (by_model.model_name, by_model.version_name, by_model.base_model) == ("Dream", "v1", "SD 1.5")
    assert by_model.model_json["id"] == 1 and by_model.model_json["modelVersions"][0]["id"] == 10
    assert by_model.version_json["id"] == 10
    by_version = resolve(client, version_id=10)
    assert (by_version.file_id, by_version.file_type, by_version.model_name) == (101, "Model", "Dream")
    assert by_version.version_json == fake.version_json(10)  # as Civitai gave it, for the .civitai.info
    assert by_version.model_json == {"name": "Dream", "type": "Checkpoint", "nsfw": False, "poi": False}
    with pytest.raises(CivitaiError, match="offers: .*dream.vae.safetensors"):
        resolve(client, version_id=10, format="GGUF")


class Runner:
    def __init__(self, fake: FakeCivitai, base: Path, **ctx_kw):
        self.messages: list[dict] = []
        self.base = base
        client = CivitaiClient(fake.api_url, timeout_s=5)
        self.ctx = JobContext(client=client, download_dir=base / "models", locks_dir=base / "locks",
                              allow_unsafe=False, read_timeout_s=3, **ctx_kw)

    def report(self, msg: dict) -> None:
        json.dumps(msg)  # it crosses a Pipe as plain data
        self.messages.append(msg)

    def run(self, **job) -> dict:
        spec = dict(job_id=1, model_id=None, version_id=None, file_id=None, model_type=None, filename=None,
                    sha256=None, attempt=1)
        spec.update(job)
        return run_job(spec, self.ctx, self.report, threading.Event().is_set)


@pytest.mark.parametrize("layout, checkpoint, vae, lora", [
    ("plain", "checkpoint", "vae", "lora"),
    ("comfyui", "checkpoints", "vae", "loras"),
    ("a1111", "models/Stable-diffusion", "models/VAE", "models/Lora"),
])
def test_a_job_without_a_folder_goes_where_the_layout_puts_its_file(fake, tmp_path, layout, checkpoint, vae, lora):
    add_checkpoint_with_vae(fake)
    fake.add_model(2, name="Style", type="LORA", versions=[dict(id=20, files=[
        dict(id=201, name="style.safetensors", primary=True, size_bytes=2048)])])
    runner = Runner(fake, tmp_path, layout=layout)
    done = [runner.run(model_id=1), runner.run(job_id=2, model_id=1, file_type="VAE"), runner.run(job_id=3, model_id=2)]
    assert [d["path"] for d in done] == [f"{checkpoint}/dream.safetensors", f"{vae}/dream.vae.safetensors",
                                        f"{lora}/style.safetensors"]
    for d, fid in zip(done, (101, 102, 201)):
        assert hashlib.sha256((tmp_path / "models" / d["path"]).read_bytes()).hexdigest() == fake.file_sha256(fid).lower()
    resolved = [m for m in runner.messages if m["type"] == "resolved"]
    assert [m["model_type"] for m in resolved[-3:]] == [checkpoint, vae, lora]
    assert resolved[0]["model_name"] == "Dream" and resolved[0]["base_model"] == "SD 1.5"


def test_folders_override_the_layout_and_a_named_folder_overrides_both(fake, tmp_path):
    fake.add_model(2, name="Style", type="LORA", versions=[dict(id=20, files=[
        dict(id=201, name="style.safetensors", primary=True, size_bytes=2048)])])
    runner = Runner(fake, tmp_path, layout="comfyui", folders={"lora": "loras/civitai"})
    assert runner.run(model_id=2)["path"] == "loras/civitai/style.safetensors"
    assert runner.run(job_id=2, model_id=2, model_type="Mine/LoRA")["path"] == "Mine/LoRA/style.safetensors"


def test_on_verified_is_called_after_a_download_and_after_a_skip_and_never_fails_the_job(fake, tmp_path, caplog):
    add_checkpoint_with_vae(fake)
    calls = []

    def hook(res, path):
        calls.append((res.file_id, res.model_name, path, path.exists()))
        raise OSError("disk full while writing a sidecar")

    runner = Runner(fake, tmp_path, on_verified=hook)
    first = runner.run(model_id=1)
    second = runner.run(job_id=2, model_id=1)
    assert (first["skipped"], second["skipped"]) == (False, True)
    target = tmp_path / "models" / "checkpoint" / "dream.safetensors"
    assert calls == [(101, "Dream", target, True), (101, "Dream", target, True)]
    assert "follow-up work failed" in caplog.text


def test_on_verified_is_not_called_when_the_job_fails(fake, tmp_path):
    add_checkpoint_with_vae(fake)
    fake.set_fault(101, "wrong_bytes")
    calls = []
    runner = Runner(fake, tmp_path, on_verified=lambda res, path: calls.append(path))
    with pytest.raises(CivitaiError):
        runner.run(model_id=1)
    assert calls == []


def test_a_name_differing_only_in_case_from_another_file_is_taken(fake, tmp_path):
    """Windows and macOS would take Dream.safetensors for dream.safetensors and the download
    would replace the other file; here both exist, so the rule is checked directly."""
    add_checkpoint_with_vae(fake)
    folder = tmp_path / "models" / "checkpoint"
    folder.mkdir(parents=True)
    (folder / "Dream.SafeTensors").write_bytes(b"somebody else's model")
    done = Runner(fake, tmp_path).run(model_id=1)
    assert done["filename"] == "dream_10.safetensors" and not done["skipped"]
    assert (folder / "Dream.SafeTensors").read_bytes() == b"somebody else's model"
    assert sorted(p.name for p in folder.iterdir()) == ["Dream.SafeTensors", "dream_10.safetensors"]


def test_the_same_file_under_another_case_is_recognised_not_fetched_again(fake, tmp_path):
    add_checkpoint_with_vae(fake)
    folder = tmp_path / "models" / "checkpoint"
    folder.mkdir(parents=True)
    (folder / "DREAM.safetensors").write_bytes(fake.file_bytes(101))
    fake.clear_requests()
    done = Runner(fake, tmp_path).run(model_id=1)
    assert done["skipped"] and done["filename"] == "DREAM.safetensors"
    assert not fake.requests_to("api", path_re="/api/download/")


def test_the_case_index_scans_a_changing_folder_at_most_once_per_rescan_and_a_quiet_one_once(tmp_path, monkeypatch):
    """A scan per download made an import into one folder quadratic; the index scans a folder
    again only when it changed and RESCAN_S has passed, and knows the names it placed itself."""
    from workers.download import CaseIndex

    clock = [100.0]
    index = CaseIndex(clock=lambda: clock[0])
    scans = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path: scans.append(path) or real_scandir(path))
    folder = tmp_path / "loras"
    folder.mkdir()
    for i in range(100):
        (folder / f"m{i}.safetensors").write_bytes(b"")
    old = time.time_ns() - 10_000_000_000
    os.utime(folder, ns=(old, old))  # settled long before the scan
    assert index.twin(folder, "M5.safetensors") == "m5.safetensors"
    for i in range(100):
        assert index.twin(folder, f"x{i}.safetensors") is None
    clock[0] += 60
    assert index.twin(folder, "X1.SAFETENSORS") is None
    assert len(scans) == 1  # quiet: one scan however long
    (folder / "Late.safetensors").write_bytes(b"")  # another process, just now
    assert index.twin(folder, "late.safetensors") == "Late.safetensors" and len(scans) == 2  # mtime moved
    (folder / "Mine.safetensors").write_bytes(b"")
    index.placed(folder, "Mine.safetensors")
    assert index.twin(folder, "mine.safetensors") == "Mine.safetensors" and len(scans) == 2  # known, no scan
    (folder / "Later.safetensors").write_bytes(b"")
    assert index.twin(folder, "later.safetensors") is None and len(scans) == 2  # within RESCAN_S
    clock[0] += CaseIndex.RESCAN_S
    assert index.twin(folder, "later.safetensors") == "Later.safetensors" and len(scans) == 3
