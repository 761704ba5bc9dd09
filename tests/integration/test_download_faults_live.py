"""The real daemon against file hosts and Civitai answers that misbehave: a body without end,
a transient metadata answer, Civitai's own reason for a refusal."""
from __future__ import annotations

import threading

from tests.helpers import base_config, names_besides_sidecars, sha256_file

MiB = 1 << 20


def add_model(fake, size: int, **version_kw):
    fake.add_model(100, name="Model 100", type="Checkpoint", versions=[dict(
        id=1000, published_at="2024-05-01T00:00:00.000Z", **version_kw,
        files=[dict(id=5000, name="model.safetensors", size_bytes=size, primary=True)])])


def test_a_body_without_end_gives_the_file_and_never_more_on_disk(fake_civitai, daemon_factory):
    size = 4 * MiB
    add_model(fake_civitai, size)
    fake_civitai.set_fault(5000, "endless", times=1)  # no Content-Length, bytes without end
    daemon = daemon_factory(base_config(fake_civitai, workers=1),
                            [{"modelId": 100, "model_type": "checkpoint"}])
    folder = daemon.models_dir / "checkpoint"
    biggest = [0]
    stop = threading.Event()

    def watch():
        while not stop.wait(0.005):
            try:
                biggest[0] = max(biggest[0], (folder / ".model.safetensors.part").stat().st_size)
            except FileNotFoundError:
                pass

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        daemon.start()
        done = daemon.wait_event("download_completed", timeout=60)
    finally:
        stop.set()
        watcher.join(5)
    assert (done["bytes"], done["sha256"]) == (size, fake_civitai.file_sha256(5000).lower())
    assert sha256_file(folder / "model.safetensors") == done["sha256"]
    assert biggest[0] <= size
    assert names_besides_sidecars(folder) == ["model.safetensors"]
    assert not daemon.events("download_retry")  # the first attempt had the file
    assert daemon.stop() == 0


def test_a_single_metadata_404_after_publishing_costs_no_attempt(fake_civitai, daemon_factory):
    add_model(fake_civitai, 256 << 10)
    fake_civitai.metadata_fault("404", times=1, path=r"/api/v1/model-versions/1000$")
    daemon = daemon_factory(base_config(fake_civitai), [{"modelId": 100, "modelVersionId": 1000,
                                                         "model_type": "checkpoint"}])
    daemon.start()
    done = daemon.wait_event("download_completed", timeout=60)
    assert done["sha256"] == fake_civitai.file_sha256(5000).lower()
    assert not daemon.events("download_retry")
    assert daemon.stop() == 0


def test_downloads_disabled_by_the_creator_fail_in_civitais_words(fake_civitai, daemon_factory):
    fake_civitai.api_key = "a-key-that-works-0123456789"
    add_model(fake_civitai, 256 << 10)
    fake_civitai.set_fault(5000, "status", code=401,
                           message="The creator of this asset has disabled downloads on this file")
    daemon = daemon_factory(base_config(fake_civitai, civitai_api_key="a-key-that-works-0123456789"),
                            [{"modelId": 100, "model_type": "checkpoint"}])
    daemon.start()
    failed = daemon.wait_event("download_failed", timeout=60)
    assert "The creator of this asset has disabled downloads on this file" in failed["error"]
    assert "API key" not in failed["error"] and "civitai_api_key" not in failed["error"]
    assert not daemon.events("download_retry")  # no attempt wasted on it
    assert not (daemon.models_dir / "checkpoint" / "model.safetensors").exists()
    assert daemon.stop() == 0
