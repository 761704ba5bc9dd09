"""`supervisor.py import` while the daemon runs: the command hands the scan to the daemon (which stays
the only writer of manifest.json), follows it, and prints what it found; the daemon adds the
entries pinned where the files are, writes their sidecars, downloads nothing, and a second scan
asks Civitai nothing new. A kill -9 of the tree during a scan leaves the manifest valid."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO, base_config, wait_until

MiB = 1 << 20


def run_import(daemon, *args, timeout=120):
    return subprocess.run([sys.executable, str(REPO / "supervisor.py"), "import", *args,
                           "--config", str(daemon.config_path)], cwd=str(REPO), capture_output=True, text=True,
                          timeout=timeout)


def add_known(fake, model_id, file_id, name, type_="LORA", size=1 * MiB):
    fake.add_model(model_id, name=f"Model {model_id}", type=type_, versions=[dict(
        id=model_id * 10, name="v1", published_at="2024-05-01T00:00:00.000Z",
        files=[dict(id=file_id, name=name, primary=True, size_bytes=size)])])


def test_import_through_the_running_daemon(fake_civitai, daemon_factory):
    fake = fake_civitai
    add_known(fake, 1, 101, "zxq.safetensors")
    add_known(fake, 2, 201, "dream.safetensors", type_="Checkpoint")
    daemon = daemon_factory(base_config(fake, layout="comfyui"), [])
    models = daemon.models_dir
    (models / "loras").mkdir(parents=True)
    (models / "checkpoints" / "SDXL").mkdir(parents=True)
    (models / "loras" / "zxq renamed.safetensors").write_bytes(fake.file_bytes(101))
    (models / "checkpoints" / "SDXL" / "dream.safetensors").write_bytes(fake.file_bytes(201))
    (models / "loras" / "homemade.safetensors").write_bytes(b"mine" * 5000)
    daemon.start()
    before = len(fake.requests)

    out = run_import(daemon)
    assert out.returncode == 0, out.stderr
    assert "3 model file(s); 2 known on Civitai; 2 added to manifest.json; 0 already listed" in out.stdout
    assert "  loras/homemade.safetensors" in out.stdout
    scan = daemon.api("GET", "/api/library/scan").json()["scan"]
    assert scan["state"] == "done" and scan["added"] == 2 and scan["unknown"] == ["loras/homemade.safetensors"]

    def manifest_has_both():
        entries = daemon.read_manifest()
        return entries if len(entries) == 2 else None

    entries = wait_until(manifest_has_both, 10, message="the daemon to write the adopted entries")
    by_file = {e["fileId"]: e for e in entries}
    assert by_file[101]["model_type"] == "loras" and by_file[101]["filename"] == "zxq renamed.safetensors"
    assert by_file[201]["model_type"] == "checkpoints/SDXL" and by_file[201]["sha256"] == fake.file_sha256(201)
    done = daemon.wait_event("library_scan_done")
    assert done["added"] == 2 and done["matched"] == 2
    # Pinned where they are, nothing downloaded, their sidecars beside them.
    info = models / "loras" / "zxq renamed.civitai.info"
    wait_until(info.exists, 20, message="the adopted file's .civitai.info")
    assert json.loads(info.read_text())["id"] == 10
    assert not fake.requests_to("api", path_re="/api/download/")
    assert all(j["state"] != "downloading" for j in daemon.jobs()) and not daemon.jobs()

    # A second scan of the same files reads nothing and asks Civitai nothing.
    asked = [r for r in fake.requests[before:] if "by-hash" in r.path]
    assert len(asked) == 1, "one batch for the new files"
    again = run_import(daemon)
    assert again.returncode == 0, again.stderr
    assert "0 added to manifest.json; 2 already listed" in again.stdout
    assert [r for r in fake.requests[before:] if "by-hash" in r.path] == asked
    assert daemon.stop() == 0


def test_a_second_scan_while_one_runs_is_followed_not_started(fake_civitai, daemon_factory):
    fake = fake_civitai
    daemon = daemon_factory(base_config(fake), [])
    daemon.start()
    first = daemon.api("POST", "/api/library/scan", json={})
    assert first.status_code == 202 and first.json()["scan"]["state"] == "running"
    second = daemon.api("POST", "/api/library/scan", json={})
    assert second.status_code in (202, 409)
    wait_until(lambda: daemon.api("GET", "/api/library/scan").json()["scan"]["state"] == "done", 20,
               message="the scan of an empty folder to finish")
    missing = daemon.api("POST", "/api/library/scan", json={"folder": "no/such/folder"})
    assert missing.status_code == 404 and "there is no folder" in missing.json()["error"]
    outside = daemon.api("POST", "/api/library/scan", json={"folder": "../.."})
    assert outside.status_code == 422 and "'..' is not allowed" in outside.json()["error"]
    assert daemon.stop() == 0
