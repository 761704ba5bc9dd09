"""workers/sidecars.py: the .civitai.info and .preview.<ext> beside a verified file, against real
Civitai JSON (tests/data) and mocked image hosts (responses)."""
from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import responses

from ipc import files
from workers import sidecars
from workers.civitai import CivitaiClient
from workers.sidecars import (
    SidecarResult,
    SidecarWriter,
    info_document,
    info_path,
    is_sidecar_name,
    our_mark,
    preview_candidates,
    sidecar_state,
    sniff_image,
    write_sidecars,
    write_sidecars_for,
)

DATA = Path(__file__).parent.parent / "data"
API = "https://civitai.test/api/v1"
KEY = "sk-secret-key-1234567890"
IMG = "https://image.civitai.test/xG1n/abc"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40
JPEG = b"\xff\xd8\xff\xe0" + b"\x01" * 40
WEBP = b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\x02" * 40
GIF = b"GIF89a" + b"\x03" * 40
MP4 = b"\x00\x00\x00\x18ftypisom" + b"\x00" * 40


def load(name):
    return json.loads((DATA / name).read_text())


class CountingThrottle:
    def __init__(self):
        self.waits = 0

    def wait(self):
        self.waits += 1
        return 0.0


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """A request no test mocked is a test bug, never a trip to the real image host."""
    def refuse(self, request, **kwargs):
        raise AssertionError(f"unmocked request to {request.url}")
    monkeypatch.setattr("requests.adapters.HTTPAdapter.send", refuse)


@pytest.fixture
def version():
    return load("model-version-1387174.json")


@pytest.fixture
def model():
    return load("model-1231067.json")


@pytest.fixture
def model_file(tmp_path):
    folder = tmp_path / "Lora"
    folder.mkdir()
    path = folder / "pp-storybook_rank2_bf16.safetensors"
    path.write_bytes(b"weights")
    return path


@pytest.fixture
def client():
    c = CivitaiClient(API, api_key=KEY)
    c.session.headers["Authorization"] = f"Bearer {KEY}"  # even a session that carries the key
    c.session.cookies.set("session", "civitai-cookie", domain=".civitai.test")
    return c


def image(url, level=1, kind="image"):
    return {"url": url, "nsfwLevel": level, "type": kind, "width": 832, "height": 1216}


def with_images(version_json, *images):
    """The version with these images, or with none that can be fetched."""
    out = copy.deepcopy(version_json)
    out["images"] = list(images) or [image(f"{IMG}/rated-x.png", level=8)]
    return out


# --- the info document ----------------------------------------------------------------------------

def test_info_is_the_version_json_with_the_models_name_type_and_fields(version, model):
    doc = info_document(version, model)
    for key, value in version.items():
        if key != "model":
            assert doc[key] == value, key  # everything Civitai sent, as it sent it
    assert doc["trainedWords"] == ["ppstorybook"]
    assert doc["model"]["name"] == "Vivid Impressions Storybook Style" and doc["model"]["type"] == "LORA"
    assert doc["model"]["tags"] == model["tags"] and doc["model"]["description"] == model["description"]
    assert doc["model"]["allowCommercialUse"] == model["allowCommercialUse"]
    assert doc["creator"] == model["creator"]
    assert version.get("creator") is None  # the input is not changed


def test_info_of_a_version_from_the_models_list_gets_model_and_model_id(model):
    listed = model["modelVersions"][0]
    assert "model" not in listed and "modelId" not in listed
    doc = info_document(listed, model)
    assert doc["model"]["name"] == model["name"] and doc["model"]["type"] == "LORA"
    assert doc["modelId"] == 1231067 and doc["id"] == listed["id"]


def test_info_file_is_ascii_json_with_four_space_indents(version, model, model_file, client):
    as_given = json.dumps([version, model], sort_keys=True)
    with responses.RequestsMock() as mock:
        mock.get(version["images"][0]["url"], body=JPEG, content_type="image/jpeg")
        result = write_sidecars_for(version, model, model_file, client=client, throttle=None)
    assert json.dumps([version, model], sort_keys=True) == as_given  # Civitai's JSON is not changed (it is shared)
    target = model_file.with_name("pp-storybook_rank2_bf16.civitai.info")
    assert result.info == target == info_path(model_file)
    raw = target.read_bytes()
    raw.decode("ascii")  # Civitai Helper opens it with the platform's encoding
    assert raw.startswith(b'{\n    "id": 1387174,')
    written = json.loads(raw)
    assert written["trainedWords"] == ["ppstorybook"] and written["model"]["name"] == model["name"]
    assert written["extensions"]["civitai_daemon"]["version_id"] == 1387174


# --- the preview ----------------------------------------------------------------------------------

def test_the_preview_is_the_first_allowed_image_byte_for_byte_named_by_its_bytes(version, model, model_file,
                                                                                 client):
    v = with_images(version, image(f"{IMG}/x.mp4", kind="video"), image(f"{IMG}/r.jpeg", level=4),
                    image(f"{IMG}/ok.jpeg", level=2), image(f"{IMG}/later.jpeg", level=1))
    throttle = CountingThrottle()
    with responses.RequestsMock() as mock:
        mock.get(f"{IMG}/ok.jpeg", body=WEBP, content_type="image/webp")  # served as WebP whatever its name
        result = write_sidecars_for(v, model, model_file, client=client, throttle=throttle)
        assert [c.request.url for c in mock.calls] == [f"{IMG}/ok.jpeg"]
        sent = mock.calls[0].request.headers
    preview = model_file.with_name("pp-storybook_rank2_bf16.preview.webp")
    assert result.preview == preview and preview.read_bytes() == WEBP
    assert throttle.waits == 1  # through the daemon's throttle
    assert "Authorization" not in sent and "Cookie" not in sent, dict(sent)
    assert KEY not in json.dumps(dict(sent))
    assert sent["User-Agent"].startswith("civitai-daemon")


def test_preview_nsfw_allows_an_image_above_pg13(version, model, model_file, client):
    v = with_images(version, image(f"{IMG}/r.png", level=4), image(f"{IMG}/pg.png", level=1))
    with responses.RequestsMock() as mock:
        mock.get(f"{IMG}/r.png", body=PNG)
        result = write_sidecars_for(v, model, model_file, client=client, throttle=None, preview_nsfw=True)
    assert result.preview.name.endswith(".preview.png") and result.preview.read_bytes() == PNG


def test_candidates_follow_nsfw_levels_and_skip_videos():
    images = [image(f"{IMG}/1", 1), image(f"{IMG}/2", 2), image(f"{IMG}/4", 4), image(f"{IMG}/8", 8),
              image(f"{IMG}/16", 16), image(f"{IMG}/v", 1, "video"), {"url": f"{IMG}/unrated"},
              {"url": f"{IMG}/old-sfw", "nsfw": False}, {"url": f"{IMG}/old-none", "nsfw": "None"},
              {"url": f"{IMG}/old-soft", "nsfw": "Soft"}, {"url": "ftp://x/y", "nsfwLevel": 1}, "junk"]
    sfw = [c["url"].rsplit("/", 1)[1] for c in preview_candidates(images, False)]
    assert sfw == ["1", "2", "old-sfw", "old-none"]
    everything = [c["url"].rsplit("/", 1)[1] for c in preview_candidates(images, True)]
    assert everything == ["1", "2", "4", "8", "16", "unrated", "old-sfw", "old-none", "old-soft"]


def test_sniffing():
    assert [sniff_image(b[:16]) for b in (PNG, JPEG, WEBP, GIF, MP4, b"<html>", b"")] == [
        "png", "jpeg", "webp", "gif", None, None, None]


def test_a_video_or_a_web_page_where_an_image_was_listed_falls_to_the_next(version, model, model_file, client):
    v = with_images(version, image(f"{IMG}/a.jpeg"), image(f"{IMG}/b.jpeg"), image(f"{IMG}/c.jpeg"))
    with responses.RequestsMock() as mock:
        mock.get(f"{IMG}/a.jpeg", body=MP4, content_type="video/mp4")
        mock.get(f"{IMG}/b.jpeg", body=b"<html>nope</html>", content_type="text/html")
        mock.get(f"{IMG}/c.jpeg", body=GIF, content_type="image/gif")
        result = write_sidecars_for(v, model, model_file, client=client, throttle=None)
    assert result.preview.name.endswith(".preview.gif") and result.error is None


def test_an_image_above_the_cap_is_not_kept(version, model, model_file, client, monkeypatch):
    monkeypatch.setattr(sidecars, "MAX_PREVIEW_BYTES", 1000)
    big = PNG + b"\x00" * 2000
    v = with_images(version, image(f"{IMG}/big-declared.png"), image(f"{IMG}/big-streamed.png"),
                    image(f"{IMG}/small.png"))
    with responses.RequestsMock() as mock:
        mock.get(f"{IMG}/big-declared.png", body=big, headers={"Content-Length": str(len(big))})
        mock.get(f"{IMG}/big-streamed.png", body=big)  # no Content-Length: the cap counts bytes
        mock.get(f"{IMG}/small.png", body=PNG)
        result = write_sidecars_for(v, model, model_file, client=client, throttle=None)
    assert result.preview.read_bytes() == PNG
    leftovers = [p.name for p in model_file.parent.iterdir()]
    assert sorted(leftovers) == sorted([model_file.name, "pp-storybook_rank2_bf16.civitai.info",
                                        "pp-storybook_rank2_bf16.preview.png"])


def test_a_redirect_is_followed_without_the_key(version, model, model_file, client):
    v = with_images(version, image(f"{IMG}/moved.png"))
    with responses.RequestsMock() as mock:
        mock.get(f"{IMG}/moved.png", status=302, headers={"Location": "https://cdn.elsewhere.test/p.png"})
        mock.get("https://cdn.elsewhere.test/p.png", body=PNG)
        result = write_sidecars_for(v, model, model_file, client=client, throttle=None)
        assert all("Authorization" not in c.request.headers for c in mock.calls)
    assert result.preview.read_bytes() == PNG


def test_a_failed_fetch_never_fails_and_is_tried_again_later(version, model, model_file, client, caplog):
    v = with_images(version, image(f"{IMG}/p.png"), image(f"{IMG}/second.png"))
    now = [1_000_000.0]
    caplog.set_level(logging.INFO, logger="workers.sidecars")
    with responses.RequestsMock() as mock:
        mock.get(f"{IMG}/p.png", status=503)
        result = write_sidecars_for(v, model, model_file, client=client, throttle=None, clock=lambda: now[0])
        assert len(mock.calls) == 1  # the first allowed image is the preview: no fall-back on a 503
    assert result.preview is None and "503" in result.error and result.info.exists()
    mark = json.loads(result.info.read_text())["extensions"]["civitai_daemon"]
    assert mark["retry_at"] == now[0] + sidecars.PREVIEW_RETRY_S and "503" in mark["error"]
    assert "no preview" in caplog.text and "503" in caplog.text
    assert not sidecar_state(model_file, now=now[0])["retry_due"]

    # The next verify before the retry time asks nothing.
    with responses.RequestsMock() as mock:
        again = write_sidecars_for(v, model, model_file, client=client, throttle=None, clock=lambda: now[0] + 60)
        assert len(mock.calls) == 0
    assert again.preview is None and "later" in again.skipped

    # After it, the image comes.
    now[0] += sidecars.PREVIEW_RETRY_S + 1
    assert sidecar_state(model_file, now=now[0])["retry_due"]
    with responses.RequestsMock() as mock:
        mock.get(f"{IMG}/p.png", body=PNG)
        last = write_sidecars_for(v, model, model_file, client=client, throttle=None, clock=lambda: now[0])
    assert last.preview.read_bytes() == PNG and last.error is None
    mark = json.loads(last.info.read_text())["extensions"]["civitai_daemon"]
    assert "retry_at" not in mark and mark["preview"] == last.preview.name
    assert sidecar_state(model_file, now=now[0]) == {"info": True, "preview": last.preview.name, "retry_due": False}


def test_rate_limited_image_host_waits_as_long_as_it_says(version, model, model_file, client):
    v = with_images(version, image(f"{IMG}/p.png"))
    with responses.RequestsMock() as mock:
        mock.get(f"{IMG}/p.png", status=429, headers={"Retry-After": "7200"})
        result = write_sidecars_for(v, model, model_file, client=client, throttle=None, clock=lambda: 0.0)
    assert result.retry_at == 7200.0


def test_connection_error_is_retryable(version, model, model_file, client):
    import requests as rq
    v = with_images(version, image(f"{IMG}/p.png"))
    with responses.RequestsMock() as mock:
        mock.get(f"{IMG}/p.png", body=rq.ConnectionError("refused"))
        result = write_sidecars_for(v, model, model_file, client=client, throttle=None)
    assert result.error and result.retry_at and result.info.exists()


def test_the_users_own_preview_is_never_replaced(version, model, model_file, client):
    own = model_file.with_name("pp-storybook_rank2_bf16.preview.png")
    own.write_bytes(b"my own picture")
    with responses.RequestsMock() as mock:
        result = write_sidecars_for(version, model, model_file, client=client, throttle=None)
        assert len(mock.calls) == 0
    assert own.read_bytes() == b"my own picture" and "user's own" in result.skipped
    assert result.info.exists()


def test_an_update_refreshes_both_and_removes_our_old_preview(version, model, model_file, client):
    with responses.RequestsMock() as mock:
        mock.get(version["images"][0]["url"], body=PNG)
        first = write_sidecars_for(version, model, model_file, client=client, throttle=None)
    assert first.preview.name.endswith(".png")
    newer = with_images(version, image(f"{IMG}/v2.jpeg"))
    newer.update(id=2000001, name="v2", trainedWords=["newword"])
    with responses.RequestsMock() as mock:
        mock.get(f"{IMG}/v2.jpeg", body=JPEG)
        second = write_sidecars_for(newer, model, model_file, client=client, throttle=None)
    assert second.preview.name.endswith(".preview.jpeg") and second.preview.read_bytes() == JPEG
    assert not first.preview.exists()
    info = json.loads(second.info.read_text())
    assert info["id"] == 2000001 and info["trainedWords"] == ["newword"]

    # An update whose images are all above PG-13 leaves no stale preview of the old version.
    third_v = with_images(newer, image(f"{IMG}/x.png", level=16))
    third_v["id"] = 2000002
    third = write_sidecars_for(third_v, model, model_file, client=client, throttle=None)
    assert third.preview is None and not second.preview.exists() and "preview_nsfw" in third.skipped


def test_an_unchanged_info_is_not_rewritten(version, model, model_file, client):
    with responses.RequestsMock() as mock:
        mock.get(version["images"][0]["url"], body=PNG)
        write_sidecars_for(version, model, model_file, client=client, throttle=None)
    target = info_path(model_file)
    before = os.stat(target)
    with responses.RequestsMock() as mock:
        write_sidecars_for(version, model, model_file, client=client, throttle=None)
        assert len(mock.calls) == 0  # the preview of this version is there already
    assert os.stat(target).st_ino == before.st_ino and os.stat(target).st_mtime_ns == before.st_mtime_ns


def test_another_tools_extension_block_stays(version, model, model_file, client):
    target = info_path(model_file)
    target.write_text(json.dumps({"id": 1387174, "extensions": {"sd_civitai_helper": {"version": "1.8"}}}))
    write_sidecars_for(with_images(version), model, model_file, client=client, throttle=None)
    assert json.loads(target.read_text())["extensions"]["sd_civitai_helper"] == {"version": "1.8"}


def test_trouble_on_disk_is_logged_not_raised(version, model, model_file, client, caplog):
    info_path(model_file).mkdir()  # something in the way that is not a file
    result = write_sidecars_for(with_images(version), model, model_file, client=client, throttle=None)
    assert result.error and "not a plain file" in result.error and "not written" in caplog.text


def test_sidecars_off_writes_nothing(version, model, model_file, client):
    result = write_sidecars_for(version, model, model_file, client=client, throttle=None, sidecars=False)
    assert result.info is None and sorted(p.name for p in model_file.parent.iterdir()) == [model_file.name]


def test_write_sidecars_takes_the_resolved_json(version, model, model_file, client):
    res = SimpleNamespace(version_json=with_images(version), model_json=model, model_name=model["name"])
    write_sidecars(res, model_file, client=client, throttle=None, preview_nsfw=False, sidecars=True)
    assert json.loads(info_path(model_file).read_text())["model"]["name"] == model["name"]
    # A Resolved from before version_json existed writes nothing and does not fail.
    other = model_file.with_name("other.safetensors")
    other.write_bytes(b"x")
    result = write_sidecars(SimpleNamespace(version_id=1), other, client=client, throttle=None,
                            preview_nsfw=False, sidecars=True)
    assert result.info is None and not info_path(other).exists()


def test_the_info_alone_asks_nothing_and_says_a_preview_is_due(version, model, model_file, client):
    v = with_images(version, image(f"{IMG}/ok.png"))
    result = write_sidecars_for(v, model, model_file, client=client, throttle=None, fetch_preview=False)
    assert result.info == info_path(model_file) and result.preview is None and result.preview_due
    assert json.loads(result.info.read_text())["id"] == v["id"]  # no request: no_network would have failed it
    with responses.RequestsMock() as mock:
        mock.get(f"{IMG}/ok.png", body=PNG, content_type="image/png")
        later = write_sidecars_for(v, model, model_file, client=client, throttle=None)
    assert later.preview == model_file.with_name("pp-storybook_rank2_bf16.preview.png") and not later.preview_due
    assert our_mark(json.loads(later.info.read_text()))["preview"] == later.preview.name
    again = write_sidecars_for(v, model, model_file, client=client, throttle=None, fetch_preview=False)
    assert not again.preview_due and again.preview == later.preview  # the preview is there: nothing owed


def test_a_version_without_an_allowed_image_owes_no_preview(version, model, model_file, client):
    result = write_sidecars_for(with_images(version), model, model_file, client=client, throttle=None,
                                fetch_preview=False)
    assert result.info is not None and not result.preview_due


# --- several processes writing one path's sidecars ---------------------------------------------------

def test_a_top_up_whose_info_was_rewritten_during_its_fetch_writes_nothing(version, model, model_file, client,
                                                                          tmp_path):
    """Worker A tops up the last run's preview of a path from its info; worker B (another
    process: only the lock file is shared) places a newer file there and writes its info while
    A's image is on the way. A's preview and info of the older file are dropped; B's info stays
    and B's own preview entry follows."""
    locks = tmp_path / "locks"
    old_v = with_images(version, image(f"{IMG}/old.png"))
    new_v = with_images(dict(version, id=version["id"] + 1, name="v2"), image(f"{IMG}/new.png"))
    write_sidecars_for(old_v, model, model_file, client=client, throttle=None, fetch_preview=False, locks_dir=locks)
    owed = sidecars._from_info(model_file)  # what the top-up reads before its fetch
    assert owed is not None
    other: list = []

    def while_fetched(request):
        # B's info-before-done write, on a thread: were A's fetch under the lock, it would wait for it.
        t = threading.Thread(target=lambda: other.append(write_sidecars_for(
            new_v, model, model_file, client=client, throttle=None, fetch_preview=False, locks_dir=locks)))
        t.start()
        t.join(10)
        return 200, {"Content-Type": "image/png"}, PNG

    with responses.RequestsMock() as mock:
        mock.add_callback(responses.GET, f"{IMG}/old.png", callback=while_fetched)
        result = write_sidecars(owed, model_file, client=client, throttle=None, preview_nsfw=False, sidecars=True,
                                locks_dir=locks)
        assert len(mock.calls) == 1
    assert other and other[0].preview_due  # B's write went through during A's fetch
    info = json.loads(info_path(model_file).read_text())
    assert info["id"] == new_v["id"] and "preview" not in our_mark(info)
    assert sidecars.existing_previews(model_file) == [] and result.preview is None
    assert "another writer" in result.skipped and not result.error


def test_a_top_up_of_an_info_changed_since_it_was_read_asks_nothing(version, model, model_file, client, tmp_path):
    locks = tmp_path / "locks"
    write_sidecars_for(with_images(version, image(f"{IMG}/old.png")), model, model_file, client=client,
                       throttle=None, fetch_preview=False, locks_dir=locks)
    owed = sidecars._from_info(model_file)
    newer = with_images(dict(version, id=version["id"] + 1), image(f"{IMG}/new.png"))
    write_sidecars_for(newer, model, model_file, client=client, throttle=None, fetch_preview=False, locks_dir=locks)
    with responses.RequestsMock() as mock:  # nothing registered: a request would fail the test
        result = write_sidecars(owed, model_file, client=client, throttle=None, preview_nsfw=False, sidecars=True,
                                locks_dir=locks)
        assert len(mock.calls) == 0
    assert json.loads(info_path(model_file).read_text())["id"] == newer["id"]
    assert "another writer" in result.skipped


def test_a_preview_and_its_info_take_one_fsync_of_the_folder_after_the_lock(version, model, model_file, client,
                                                                            tmp_path, monkeypatch):
    locks = tmp_path / "locks"
    synced = []

    def fsync_dir(folder):
        fd = os.open(sidecars.writers_lock_path(locks, model_file), os.O_RDWR | os.O_CREAT)
        try:
            free = files.try_lock_fd(fd)
            if free:
                files.unlock_fd(fd)
        finally:
            os.close(fd)
        synced.append((Path(folder), free))

    monkeypatch.setattr(files.OS, "fsync_dir", fsync_dir)
    with responses.RequestsMock() as mock:
        mock.get(f"{IMG}/ok.png", body=PNG, content_type="image/png")
        result = write_sidecars_for(with_images(version, image(f"{IMG}/ok.png")), model, model_file, client=client,
                                    throttle=None, locks_dir=locks)
    assert result.preview is not None and result.info is not None
    assert synced == [(model_file.parent, True)]


def test_the_writers_lock_is_one_of_a_few_per_file_name_whatever_the_folder(tmp_path):
    locks = tmp_path / "locks"
    a = sidecars.writers_lock_path(locks, tmp_path / "Lora" / "x.safetensors")
    assert a == sidecars.writers_lock_path(locks, Path("/elsewhere/x.safetensors")) and a.parent == locks
    names = {sidecars.writers_lock_path(locks, Path(f"m{i}.safetensors")) for i in range(200)}
    assert len(names) == sidecars.WRITERS_STRIPES


HOLD_LOCK = """
import sys
from ipc.files import file_lock
with file_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_another_process_writing_sidecars_holds_off_this_ones_write(version, model, model_file, client, tmp_path):
    locks = tmp_path / "locks"
    locks.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(sidecars.writers_lock_path(locks, model_file))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parent.parent.parent)
    try:
        assert holder.stdout.readline().strip() == "held"
        t = threading.Thread(target=write_sidecars_for, args=(with_images(version), model, model_file),
                             kwargs=dict(client=client, throttle=None, fetch_preview=False, locks_dir=locks))
        t.start()
        t.join(0.5)  # unguarded, the write takes a few ms
        assert t.is_alive() and not info_path(model_file).exists()
        holder.stdin.close()
        t.join(10)
        assert not t.is_alive() and json.loads(info_path(model_file).read_text())["id"] == version["id"]
    finally:
        holder.kill()
        holder.wait(10)


class FakeWrites:
    """write_sidecars as the SidecarWriter calls it: records (path, fetch_preview) and says
    a preview is due for the paths in `due`."""

    def __init__(self, due=()):
        self.calls: list[tuple[str, str, bool]] = []
        self.due = set(due)

    def __call__(self, res, path, *, fetch_preview):
        self.calls.append((res, path.name, fetch_preview))
        return SidecarResult(preview_due=not fetch_preview and path.name in self.due)


def test_the_writer_writes_the_info_in_the_callers_thread_and_leaves_the_preview_to_its_own(tmp_path):
    writes = FakeWrites(due={"a.safetensors"})
    writer = SidecarWriter(writes)
    writer.after_verified("r1", tmp_path / "a.safetensors")
    writer.after_verified("r2", tmp_path / "b.safetensors")  # no preview due: nothing for the thread
    assert writes.calls == [("r1", "a.safetensors", False), ("r2", "b.safetensors", False)]
    assert writer.run_one(timeout=0) and not writer.run_one(timeout=0)
    assert writes.calls[-1] == ("r1", "a.safetensors", True)


def test_a_newer_file_at_a_path_still_owed_gets_its_info_at_once_and_the_older_entry_is_dropped(tmp_path):
    writes = FakeWrites(due={"a.safetensors"})
    writer = SidecarWriter(writes)
    path = tmp_path / "a.safetensors"
    writer.after_verified("old", path)
    writer.after_verified("new", path)  # the thread still has "old" for this path
    assert writes.calls == [("old", "a.safetensors", False), ("new", "a.safetensors", False)]
    assert writer.run_one(timeout=0) and writer.run_one(timeout=0) and not writer.run_one(timeout=0)
    assert writes.calls[2:] == [("new", "a.safetensors", True)]  # "old" would fetch an outdated preview
    assert writer.owed() == 0


def test_the_info_waits_for_a_preview_fetch_of_the_same_path_in_flight_and_only_that(tmp_path):
    """One writer at a time for a path: the older file's info (written last) must not win, and
    two writes would share atomic_write's temp name. Another path does not wait."""
    import threading

    fetching, release = threading.Event(), threading.Event()
    order: list[str] = []

    def write(res, path, *, fetch_preview):
        if fetch_preview:
            fetching.set()
            assert release.wait(10)
        order.append(f"{res}:{path.name}:{'preview' if fetch_preview else 'info'}")
        return SidecarResult(preview_due=not fetch_preview and res == "old")

    writer = SidecarWriter(write)
    path = tmp_path / "a.safetensors"
    writer.after_verified("old", path)
    thread = threading.Thread(target=writer.run_one, kwargs={"timeout": 5})
    thread.start()
    assert fetching.wait(5)
    writer.after_verified("other", tmp_path / "b.safetensors")  # not held up
    newer = threading.Thread(target=writer.after_verified, args=("new", path))
    newer.start()
    newer.join(0.2)
    assert newer.is_alive()  # waits for the fetch of its path
    release.set()
    newer.join(5)
    thread.join(5)
    assert order == ["old:a.safetensors:info", "other:b.safetensors:info", "old:a.safetensors:preview",
                     "new:a.safetensors:info"]
    assert writer.owed() == 0


def test_a_failing_write_on_the_thread_does_not_leave_the_path_owed(tmp_path, caplog):
    path = tmp_path / "a.safetensors"

    def write(res, p, *, fetch_preview):
        if fetch_preview:
            raise RuntimeError("a bug")
        return SidecarResult(preview_due=True)

    writer = SidecarWriter(write)
    writer.after_verified("r", path)
    assert writer.owed() == 1
    assert writer.run_one(timeout=0) and "sidecars of" in caplog.text
    assert writer.owed() == 0


def test_a_failing_info_write_in_the_job_thread_leaves_nothing_owed(tmp_path):
    def write(res, p, *, fetch_preview):
        raise OSError("disk full")

    writer = SidecarWriter(write)
    with pytest.raises(OSError):
        writer.after_verified("r", tmp_path / "a.safetensors")  # download._verified logs it
    assert writer.owed() == 0 and not writer.run_one(timeout=0)


class Ledger:
    """The supervisor's side of on_owed / on_settled: what it would keep in its store."""

    def __init__(self):
        self.said: list[tuple[str, str]] = []

    def owed(self, path):
        self.said.append(("owed", Path(path).name))

    def settled(self, path):
        self.said.append(("settled", Path(path).name))


def test_a_preview_is_owed_before_the_job_ends_and_settled_once_the_thread_is_through(tmp_path):
    writes, ledger = FakeWrites(due={"a.safetensors"}), Ledger()
    writer = SidecarWriter(writes, on_owed=ledger.owed, on_settled=ledger.settled)
    writer.after_verified("r1", tmp_path / "a.safetensors")
    writer.after_verified("r2", tmp_path / "b.safetensors")  # nothing due: nothing to say
    assert ledger.said == [("owed", "a.safetensors")]  # before after_verified returns (before `done`)
    assert writer.run_one(timeout=0)
    assert ledger.said == [("owed", "a.safetensors"), ("settled", "a.safetensors")]


def test_a_path_verified_twice_while_owed_is_owed_once_and_settled_by_its_newest_entry(tmp_path):
    writes, ledger = FakeWrites(due={"a.safetensors"}), Ledger()
    writer = SidecarWriter(writes, on_owed=ledger.owed, on_settled=ledger.settled)
    path = tmp_path / "a.safetensors"
    writer.after_verified("old", path)
    writer.after_verified("new", path)
    assert writer.run_one(timeout=0)  # "old": dropped, and not settled: "new" still waits
    assert ledger.said == [("owed", "a.safetensors")]
    assert writer.run_one(timeout=0)
    assert ledger.said == [("owed", "a.safetensors"), ("settled", "a.safetensors")]


def test_a_newer_file_with_no_preview_due_settles_what_the_older_one_owed(tmp_path):
    ledger = Ledger()
    answers = iter([True, False])

    def write(res, path, *, fetch_preview):
        return SidecarResult(preview_due=not fetch_preview and next(answers))

    writer = SidecarWriter(write, on_owed=ledger.owed, on_settled=ledger.settled)
    path = tmp_path / "a.safetensors"
    writer.after_verified("old", path)
    writer.after_verified("new", path)  # e.g. the user put their own preview there meanwhile
    assert ledger.said == [("owed", "a.safetensors"), ("settled", "a.safetensors")]
    assert writer.run_one(timeout=0) and ledger.said[-1] == ("settled", "a.safetensors")
    assert len(ledger.said) == 2 and writer.owed() == 0


def test_a_failing_preview_write_still_settles(tmp_path):
    ledger = Ledger()

    def write(res, p, *, fetch_preview):
        if fetch_preview:
            raise RuntimeError("a bug")
        return SidecarResult(preview_due=True)

    writer = SidecarWriter(write, on_owed=ledger.owed, on_settled=ledger.settled)
    writer.after_verified("r", tmp_path / "a.safetensors")
    assert writer.run_one(timeout=0)
    assert ledger.said == [("owed", "a.safetensors"), ("settled", "a.safetensors")]  # never handed out forever


def test_a_preview_owed_from_the_last_run_is_fetched_from_the_info_beside_the_file(tmp_path):
    model = tmp_path / "a.safetensors"
    model.write_bytes(b"weights")
    info = {"id": 1000, "name": "v1", "images": [{"url": "http://img/1.png", "type": "image", "nsfwLevel": 1}]}
    (tmp_path / "a.civitai.info").write_text(json.dumps(info))
    gone = tmp_path / "gone.safetensors"  # deleted by the user since
    calls, ledger = [], Ledger()

    def write(res, path, *, fetch_preview):
        calls.append((res.version_json, path.name, fetch_preview))
        return SidecarResult()

    writer = SidecarWriter(write, on_owed=ledger.owed, on_settled=ledger.settled)
    writer.top_up(model)
    writer.top_up(gone)
    assert ledger.said == []  # the supervisor has them already
    assert writer.run_one(timeout=0) and writer.run_one(timeout=0) and not writer.run_one(timeout=0)
    assert calls == [(info, "a.safetensors", True)]
    assert ledger.said == [("settled", "a.safetensors"), ("settled", "gone.safetensors")]
    assert writer.owed() == 0


def test_a_preview_owed_from_the_last_run_gives_way_to_a_newer_download_of_the_path(tmp_path):
    model = tmp_path / "a.safetensors"
    model.write_bytes(b"weights")
    (tmp_path / "a.civitai.info").write_text(json.dumps({"id": 1}))
    writes, ledger = FakeWrites(due={"a.safetensors"}), Ledger()
    writer = SidecarWriter(writes, on_owed=ledger.owed, on_settled=ledger.settled)
    writer.top_up(model)
    writer.after_verified("new", model)  # owed already: no second message
    assert writer.run_one(timeout=0) and writer.run_one(timeout=0)
    assert [c[0] for c in writes.calls] == ["new", "new"]  # the old info's entry was dropped
    assert ledger.said == [("settled", "a.safetensors")]


def test_sidecar_names_are_never_model_files():
    for name in ("a.civitai.info", "a.preview.png", "A.Preview.JPEG", "a.preview.webp", "a.preview.gif",
                 "a.preview.mp4", "a.metadata.json"):
        assert is_sidecar_name(name), name
    for name in ("a.safetensors", "preview.png.safetensors", "a.png", "civitai.info.ckpt", "a.preview"):
        assert not is_sidecar_name(name), name


def test_existing_previews_lists_the_regular_images_in_the_web_uis_order(tmp_path):
    model_file = tmp_path / "a.b.safetensors"
    for name in ("a.b.preview.webp", "a.b.preview.png", "a.b.preview.txt", "a.preview.jpg"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "a.b.preview.gif").mkdir()  # not a file
    assert sidecars.existing_previews(model_file) == [tmp_path / "a.b.preview.png", tmp_path / "a.b.preview.webp"]
