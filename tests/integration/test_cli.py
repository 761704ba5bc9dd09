"""`supervisor.py add`, `status` and `--version` as a shell user runs them, against the real daemon."""
from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO, base_config

MiB = 1024 * 1024


def run(daemon, *args, timeout=30):
    return subprocess.run([sys.executable, str(REPO / "supervisor.py"), *args, "--config", str(daemon.config_path)],
                          cwd=str(REPO), capture_output=True, text=True, timeout=timeout)


def test_add_and_status_through_the_running_daemon(fake_civitai, daemon_factory):
    fake = fake_civitai
    fake.add_model(77, name="Zxq Ink Style", type="LORA", versions=[
        dict(id=770, name="v2", published_at="2024-05-01T00:00:00.000Z",
             files=[dict(id=7700, name="zxq.safetensors", size_bytes=8 * MiB, primary=True)])])
    fake.set_fault(7700, "drip", bps=1 * MiB)
    daemon = daemon_factory(base_config(fake))
    daemon.start()
    added = run(daemon, "add", "https://civitai.com/models/77?modelVersionId=770", "--folder", "Lora/SDXL",
                "--priority", "2")
    assert added.returncode == 0, added.stderr
    assert added.stdout.startswith("queued #") and "(Lora/SDXL" in added.stdout
    job_id = int(added.stdout.split("#")[1].split()[0])
    again = run(daemon, "add", "v:770")
    assert again.returncode == 0 and again.stdout.startswith("already queued: #%d" % job_id), again.stdout
    daemon.wait_event("download_started", lambda e: e["job_id"] == job_id)
    status = run(daemon, "status")
    assert status.returncode == 0, status.stderr
    assert "civitai-daemon" in status.stdout and "worker-1" in status.stdout and "updater running" in status.stdout
    assert f"#{job_id}" in status.stdout and "updates: last check" in status.stdout
    assert daemon.token() not in status.stdout + status.stderr
    bad = run(daemon, "add", "https://example.com/models/1")
    assert bad.returncode == 1 and "civitai.com or civitai.red" in bad.stderr
    folder = run(daemon, "add", "77", "--folder", "Lora/../x")
    assert folder.returncode == 1 and "'..'" in folder.stderr
    fake.clear_faults()
    done = daemon.wait_event("download_completed", lambda e: e["job_id"] == job_id)
    assert done["path"] == "Lora/SDXL/zxq.safetensors"
    assert daemon.stop() == 0
    gone = run(daemon, "status")
    assert gone.returncode == 1 and "no daemon is running on http://127.0.0.1:" in gone.stderr


def test_version():
    out = subprocess.run([sys.executable, str(REPO / "supervisor.py"), "--version"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0 and out.stdout.startswith("civitai-daemon 0.")
