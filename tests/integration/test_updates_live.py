"""Update checks, manifest modes, webhooks and live manifest edits with the real daemon (a
process tree in a temporary folder) against the fake Civitai and a real local webhook receiver."""
from __future__ import annotations

import hashlib
import json
import os
import signal

import pytest

from tests.helpers import base_config, wait_until
from tests.webhook_receiver import WebhookReceiver

OLD = "2024-01-01T00:00:00.000Z"
NEW = "2024-06-01T00:00:00.000Z"
KiB = 1024


@pytest.fixture
def receiver():
    r = WebhookReceiver()
    yield r
    r.close()


def sha256_file(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def add_model(fake, model_id, version_id, file_id, name=None, published=OLD, size=128 * KiB):
    fake.add_model(model_id, name=f"Model {model_id}", type="Checkpoint", versions=[
        dict(id=version_id, published_at=published,
             files=[dict(id=file_id, name=name or f"m{model_id}.safetensors", size_bytes=size, primary=True)])])


def updater_status(daemon) -> dict:
    return daemon.api("GET", "/api/status").json()["updater"]


def wait_first_check(daemon, timeout=30) -> dict:
    return wait_until(lambda: (lambda u: u if u.get("last_success") and not u.get("running") else None)(
        updater_status(daemon)), timeout, interval=0.2, message="the update check at start")


def check_now(daemon, timeout=30) -> None:
    """POST /api/updates/check and wait until that check is done."""
    before = updater_status(daemon).get("last_check")
    wait_until(lambda: daemon.api("POST", "/api/updates/check").status_code == 202, 15, interval=0.2,
               message="the updater to take a check")
    wait_until(lambda: (lambda u: u.get("last_check") != before and not u.get("running"))(updater_status(daemon)),
               timeout, interval=0.2, message="the check to finish")


def wait_manifest(daemon, predicate, timeout=20, message="the manifest"):
    return wait_until(lambda: (lambda m: m if predicate(m) else None)(daemon.read_manifest()), timeout,
                      message=message)


def api_metadata_requests(fake) -> list:
    return [r for r in fake.requests if r.server == "api" and r.path.startswith("/api/v1/models")]


@pytest.mark.parametrize("mode", ["replace", "append"])
def test_a_newer_version_is_found_downloaded_recorded_and_announced(fake_civitai, daemon_factory, receiver, mode):
    fake = fake_civitai
    add_model(fake, 100, 1000, 5000)
    manifest = [{"modelId": 100, "model_type": "checkpoint", "priority": 3, "note": "keep me"}]
    daemon = daemon_factory(base_config(fake, manifest_mode=mode, webhook_url=receiver.url), manifest)
    daemon.start()
    daemon.wait_event("download_completed", lambda e: e["version_id"] == 1000)
    wait_manifest(daemon, lambda m: m[0].get("modelVersionId") == 1000 and m[0].get("sha256"))
    wait_first_check(daemon)
    assert not daemon.events("model_update")

    # A newer version, listed after the older one (Civitai lists newest first; don't rely on it).
    fake.add_version(100, dict(id=1001, published_at=NEW, files=[
        dict(id=5001, name="m100-v2.safetensors", size_bytes=160 * KiB, primary=True)]))
    check_now(daemon)
    update = daemon.wait_event("model_update")
    assert {k: update[k] for k in ("model_id", "version_id", "previous_version_id", "filename")} == \
        {"model_id": 100, "version_id": 1001, "previous_version_id": 1000, "filename": "m100-v2.safetensors"}
    assert update["sha256"].lower() == fake.file_sha256(5001).lower()
    assert update["updatedAt"] == fake.version_json(1001)["updatedAt"]
    done = daemon.wait_event("download_completed", lambda e: e["version_id"] == 1001)
    new_file = daemon.models_dir / "checkpoint" / "m100-v2.safetensors"
    assert sha256_file(new_file) == fake.file_sha256(5001).lower() == done["sha256"]
    old_file = daemon.models_dir / "checkpoint" / "m100.safetensors"
    assert sha256_file(old_file) == fake.file_sha256(5000).lower()  # old files are never deleted

    if mode == "replace":
        entries = wait_manifest(daemon, lambda m: m[0].get("modelVersionId") == 1001 and m[0].get("filename"))
        assert len(entries) == 1
    else:
        entries = wait_manifest(daemon, lambda m: len(m) == 2 and m[1].get("filename"))
        assert entries[0]["modelVersionId"] == 1000 and entries[0]["fileId"] == 5000  # the old one stays
    new = entries[-1]
    assert (new["modelVersionId"], new["fileId"], new["filename"]) == (1001, 5001, "m100-v2.safetensors")
    assert new["sha256"].lower() == fake.file_sha256(5001).lower()
    assert (new["note"], new["priority"], new["model_type"]) == ("keep me", 3, "checkpoint")  # carried over

    # Announced: the event log, the webhook (in order) and the log.
    wait_until(lambda: update["id"] in receiver.delivered_ids(), 15, message="the model_update webhook")
    hooked = next(e for e in receiver.events() if e["id"] == update["id"])
    assert hooked == update
    delivered = receiver.delivered_ids()
    assert delivered == sorted(delivered)
    assert "model 100: new version 1001 (was 1000)" in daemon.log_text()

    # The next check compares against the newest entry: nothing more to do.
    check_now(daemon)  # returns when the check is done: its update_found messages came before
    assert len(daemon.events("model_update")) == 1
    assert len(daemon.read_manifest()) == len(entries)
    assert daemon.stop() == 0


def test_a_model_whose_api_call_fails_is_an_error_while_another_updates(fake_civitai, daemon_factory, receiver):
    fake = fake_civitai
    add_model(fake, 100, 1000, 5000)
    add_model(fake, 101, 1010, 5100)
    manifest = [{"modelId": 100, "modelVersionId": 1000, "model_type": "checkpoint"},
                {"modelId": 101, "modelVersionId": 1010, "model_type": "lora", "mine": 1}]
    daemon = daemon_factory(base_config(fake, webhook_url=receiver.url), manifest)
    daemon.start()
    wait_until(lambda: len(daemon.events("download_completed")) == 2, 30, message="both downloads")
    wait_first_check(daemon)
    fake.add_version(100, dict(id=1001, published_at=NEW, files=[dict(id=5001, name="v2.safetensors",
                                                                     size_bytes=64 * KiB, primary=True)]))
    # Model 101 is gone: the batch answer lacks it and asking for it alone gives 404.
    fake.set_api_fault(r"ids=", 200, body={"items": [fake.model_json(100)], "metadata": {}})
    fake.set_api_fault(r"/api/v1/models/101$", 404)
    check_now(daemon)
    error = daemon.wait_event("model_update_error")
    assert error["model_id"] == 101
    assert "model 101" in error["error"] and "not found" in error["error"]
    update = daemon.wait_event("model_update")
    assert (update["model_id"], update["version_id"]) == (100, 1001)
    daemon.wait_event("download_completed", lambda e: e["version_id"] == 1001)
    entries = wait_manifest(daemon, lambda m: m[0].get("modelVersionId") == 1001)
    assert entries[1]["modelVersionId"] == 1010 and entries[1]["mine"] == 1
    wait_until(lambda: {error["id"], update["id"]} <= set(receiver.delivered_ids()), 15, message="both webhooks")
    assert "update check done: 2 model(s), 1 update(s), 1 error(s)" in daemon.log_text()
    assert daemon.stop() == 0


def test_a_file_replaced_in_place_counts_as_an_update(fake_civitai, daemon_factory):
    fake = fake_civitai
    add_model(fake, 100, 1000, 5000, name="same.safetensors")
    daemon = daemon_factory(base_config(fake), [{"modelId": 100, "modelVersionId": 1000, "model_type": "checkpoint"}])
    daemon.start()
    daemon.wait_event("download_completed")
    wait_manifest(daemon, lambda m: m[0].get("sha256"))
    wait_first_check(daemon)
    old_sha = fake.file_sha256(5000)
    fake.replace_file(5000, seed=777)  # same version, same file id, new bytes
    check_now(daemon)
    update = daemon.wait_event("model_update")
    assert (update["version_id"], update["previous_version_id"]) == (1000, 1000)
    assert update["sha256"].lower() == fake.file_sha256(5000).lower() != old_sha.lower()
    done = daemon.wait_event("download_completed", lambda e: e["sha256"] == fake.file_sha256(5000).lower())
    # The old file stays; the new one gets the deterministic other name.
    assert sha256_file(daemon.models_dir / "checkpoint" / "same.safetensors") == old_sha.lower()
    assert done["filename"] == "same_1000.safetensors"
    entry = wait_manifest(daemon, lambda m: m[0].get("filename") == "same_1000.safetensors")[0]
    assert entry["sha256"].lower() == fake.file_sha256(5000).lower()
    assert daemon.stop() == 0


def test_the_check_does_not_run_twice_after_a_restart_within_24_hours(fake_civitai, daemon_factory):
    fake = fake_civitai
    add_model(fake, 100, 1000, 5000)
    daemon = daemon_factory(base_config(fake), [{"modelId": 100, "modelVersionId": 1000, "model_type": "checkpoint"}])
    daemon.start()
    first = wait_first_check(daemon)
    assert first["next_check"]
    checks = len(api_metadata_requests(fake))
    assert checks >= 1
    assert daemon.stop() == 0

    daemon.start()
    wait_until(lambda: "last successful update check" in daemon.log_text(), 15, message="the updater's start")
    # That line is the updater's decision at start; a check would have logged "update check now".
    assert daemon.log_text().count("update check now") == 1
    assert len(api_metadata_requests(fake)) == checks
    status = updater_status(daemon)
    assert status["last_success"] == first["last_success"]
    # An updater that dies is restarted, and does not check again either.
    old_pid = daemon.children()["updater"]
    os.kill(old_pid, signal.SIGKILL)
    wait_until(lambda: daemon.children().get("updater") not in (None, old_pid), 15, message="a new updater")
    wait_until(lambda: daemon.log_text().count("last successful update check") >= 2, 15,
               message="the new updater's start")
    assert daemon.log_text().count("update check now") == 1
    assert len(api_metadata_requests(fake)) == checks
    assert daemon.stop() == 0


def test_a_live_edit_is_queued_and_a_broken_edit_is_reported_and_left_alone(fake_civitai, daemon_factory, receiver):
    fake = fake_civitai
    add_model(fake, 100, 1000, 5000)
    add_model(fake, 200, 2000, 6000)
    add_model(fake, 300, 3000, 7000)
    daemon = daemon_factory(base_config(fake, webhook_url=receiver.url),
                            [{"modelId": 100, "modelVersionId": 1000, "model_type": "checkpoint"}])
    daemon.start()
    daemon.wait_event("download_completed", lambda e: e["model_id"] == 100)
    entries = wait_manifest(daemon, lambda m: m[0].get("sha256"))

    # A person adds a model while the daemon runs.
    entries.append({"modelId": 200, "model_type": "lora", "added_by": "hand"})
    daemon.write_manifest(entries)
    done = daemon.wait_event("download_completed", lambda e: e["model_id"] == 200, timeout=20)
    assert done["path"] == "lora/m200.safetensors"
    good = wait_manifest(daemon, lambda m: len(m) == 2 and m[1].get("modelVersionId") == 2000)
    assert good[1]["added_by"] == "hand"

    # A broken save: reported, left exactly as written, the last good state stays in force.
    broken = json.dumps(good + [{"modelId": 300, "model_type": "Bad/../Type"}], indent=2) + "\n"
    daemon.manifest_path.write_text(broken)
    error = daemon.wait_event("manifest_error", timeout=10)
    assert "manifest.json" in error["error"] and "entry 2" in error["error"] and "model_type" in error["error"]
    wait_until(lambda: "manifest edit not taken" in daemon.log_text(), 10, message="the log line")  # logs are async
    wait_until(lambda: error["id"] in receiver.delivered_ids(), 10, message="the manifest_error webhook")
    shown = daemon.api("GET", "/api/manifest").json()
    assert [e["modelId"] for e in shown["entries"]] == [100, 200]
    assert "model_type" in daemon.api("GET", "/api/status").json()["manifest_error"]
    # The daemon wants to write the manifest (an API edit, an update): it must not.
    assert daemon.api("POST", "/api/manifest", json={"modelId": 300, "model_type": "lora"}).status_code == 409
    fake.add_version(100, dict(id=1001, published_at=NEW, files=[dict(id=5001, name="v2.safetensors",
                                                                     size_bytes=64 * KiB, primary=True)]))
    check_now(daemon)
    daemon.wait_event("download_completed", lambda e: e["version_id"] == 1001)
    # The update and its download are waiting to be written, and are not.
    wait_until(lambda: daemon.api("GET", "/api/status").json()["manifest_pending"] >= 1, 10,
               message="the update to wait for a valid manifest")
    assert daemon.manifest_path.read_text() == broken
    assert not any(e["model_id"] == 300 for e in daemon.jobs())
    assert len(daemon.events("manifest_error")) == 1  # reported once per save

    # Fixed: taken in, and what is new is queued.
    fixed = json.loads(broken.replace("Bad/../Type", "lora"))
    daemon.write_manifest(fixed)
    daemon.wait_event("download_completed", lambda e: e["model_id"] == 300, timeout=20)
    shown = daemon.api("GET", "/api/manifest").json()
    assert [e["modelId"] for e in shown["entries"]][:3] == [100, 200, 300]
    assert daemon.api("GET", "/api/status").json()["manifest_error"] is None
    assert daemon.stop() == 0
