"""Previews through the real daemon: the version's first allowed image comes from the image
host (the fake's CDN, as image.civitai.com) and lands beside the verified file, byte for byte;
a fault of the image host never touches the download."""
from __future__ import annotations

import json
import os
import signal

from tests.fakeciv import fake_civitai  # noqa: F401  (fixture)
from tests.helpers import base_config, sha256_file, wait_until

API_KEY = "k3y-that-must-stay-with-civitai-0123456789"
PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(3000)
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + os.urandom(3000)


def add_model_with_images(fake, images, size=256 * 1024):
    fake.add_model(100, name="Model 100", type="LORA", versions=[
        dict(id=1000, published_at="2024-05-01T00:00:00.000Z", extra={"images": images},
             files=[dict(id=5000, name="style.safetensors", size_bytes=size, primary=True)]),
    ])


def mark_of(info_path):
    return json.loads(info_path.read_text())["extensions"]["civitai_daemon"]


def test_a_download_brings_the_first_allowed_image_as_its_preview(fake_civitai, daemon_factory):  # noqa: F811
    x_rated = fake_civitai.add_image(JPEG, "image/jpeg", name="x.jpeg", nsfw_level=8)
    video = fake_civitai.add_image(b"\x00\x00\x00\x18ftypmp42" + os.urandom(500), "video/mp4",
                                   name="clip.mp4", type="video")
    pg = fake_civitai.add_image(PNG, "image/png", name="still.png", nsfw_level=1)
    add_model_with_images(fake_civitai, [x_rated, video, pg])
    daemon = daemon_factory(base_config(fake_civitai, civitai_api_key=API_KEY))
    daemon.start()
    job = daemon.api("POST", "/api/jobs", json={"version_id": 1000}).json()["job"]
    done = daemon.wait_event("download_completed", timeout=60)
    model = daemon.models_dir / done["path"]
    assert sha256_file(model) == fake_civitai.file_sha256(5000).lower()
    preview = model.with_name("style.preview.png")
    wait_until(preview.exists, 20, message="the preview beside the model")
    assert preview.read_bytes() == PNG
    info = model.with_name("style.civitai.info")
    assert mark_of(info)["preview"] == "style.preview.png"
    assert json.loads(info.read_text())["images"][2]["url"] == pg["url"]
    # Only the allowed still image was fetched (not the X-rated one, not the video), and the
    # image host never saw the API key, in a header or in the URL.
    fetched = fake_civitai.requests_to("cdn", r"^/images/")
    assert [r.url_path for r in fetched] == [pg["url"].split(fake_civitai.cdn_origin, 1)[1]]
    assert "Authorization" not in fetched[0].headers and API_KEY not in fetched[0].query
    assert daemon.job(job["id"])["state"] == "done"
    assert API_KEY not in daemon.log_text()
    assert daemon.stop() == 0


def test_an_image_host_fault_leaves_the_download_done_and_the_preview_owed(fake_civitai, daemon_factory):  # noqa: F811
    pg = fake_civitai.add_image(PNG, "image/png", fail_times=1000, fail_status=503)
    add_model_with_images(fake_civitai, [pg])
    daemon = daemon_factory(base_config(fake_civitai))
    daemon.start()
    job = daemon.api("POST", "/api/jobs", json={"version_id": 1000}).json()["job"]
    done = daemon.wait_event("download_completed", timeout=60)
    model = daemon.models_dir / done["path"]
    info = model.with_name("style.civitai.info")
    wait_until(lambda: "error" in mark_of(info), 20, message="the failed fetch marked in the info")
    mark = mark_of(info)
    assert "503" in mark["error"] and mark["retry_at"] > 0
    assert not list(model.parent.glob("style.preview.*"))
    assert daemon.job(job["id"])["state"] == "done"
    assert sha256_file(model) == fake_civitai.file_sha256(5000).lower()
    assert not daemon.events("download_failed")
    assert daemon.stop() == 0


def test_a_preview_still_owed_when_the_daemon_stops_is_fetched_at_the_next_start(fake_civitai, daemon_factory):  # noqa: F811
    pg = fake_civitai.add_image(PNG, "image/png", stall_times=1)  # the image host hangs on the first try
    add_model_with_images(fake_civitai, [pg])
    daemon = daemon_factory(base_config(fake_civitai))
    daemon.start()
    daemon.api("POST", "/api/jobs", json={"version_id": 1000})
    done = daemon.wait_event("download_completed", timeout=60)
    model = daemon.models_dir / done["path"]
    wait_until(lambda: fake_civitai.requests_to("cdn", r"^/images/"), 20, message="the preview fetch to start")
    assert [os.path.realpath(p) for p in daemon.store.owed_previews()] == [os.path.realpath(model)]
    assert daemon.stop() == 0  # the hanging fetch holds nothing up
    assert not list(model.parent.glob("style.preview.*"))
    daemon.start()
    preview = model.with_name("style.preview.png")
    wait_until(preview.exists, 30, message="the owed preview at the next start")
    assert preview.read_bytes() == PNG
    assert mark_of(model.with_name("style.civitai.info"))["preview"] == "style.preview.png"
    wait_until(lambda: daemon.store.owed_previews() == [], 10, message="the preview settled in the store")
    assert "1 preview(s) owed from the last run and 0 by a worker that stopped" in daemon.log_text()
    assert len(daemon.jobs()) == 1  # no download again: only the preview
    assert daemon.stop() == 0


def test_a_preview_owed_by_a_worker_that_dies_is_fetched_by_its_restarted_self(fake_civitai, daemon_factory):  # noqa: F811
    pg = fake_civitai.add_image(PNG, "image/png", stall_times=1)
    add_model_with_images(fake_civitai, [pg])
    daemon = daemon_factory(base_config(fake_civitai, workers=1))
    daemon.start()
    daemon.api("POST", "/api/jobs", json={"version_id": 1000})
    done = daemon.wait_event("download_completed", timeout=60)
    model = daemon.models_dir / done["path"]
    wait_until(lambda: fake_civitai.requests_to("cdn", r"^/images/"), 20, message="the preview fetch to start")
    os.kill(daemon.children()["worker-1"], signal.SIGKILL)
    daemon.wait_event("worker_restarted", timeout=30)
    preview = model.with_name("style.preview.png")
    wait_until(preview.exists, 30, message="the preview fetched by the restarted worker")
    assert preview.read_bytes() == PNG
    assert "0 preview(s) owed from the last run and 1 by a worker that stopped" in daemon.log_text()
    wait_until(lambda: daemon.store.owed_previews() == [], 10, message="the preview settled in the store")
    assert daemon.stop() == 0
