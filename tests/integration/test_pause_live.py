"""Pause and resume through the real process tree (SPEC §6): everything paused stays paused over a
restart and nothing starts; a paused job keeps its partial file and its bytes, stays paused over
a restart, and resumes from them when resumed."""
from __future__ import annotations

import time

from tests.helpers import base_config, names_besides_sidecars, sha256_file, wait_until

MiB = 1 << 20
SIZE = 8 * MiB


def add_model(fake, model_id: int, size: int = SIZE) -> int:
    file_id = model_id * 10
    fake.add_model(model_id, name=f"Model {model_id}", type="Checkpoint", versions=[dict(
        id=model_id + 1000, published_at="2024-05-01T00:00:00.000Z",
        files=[dict(id=file_id, name=f"m{model_id}.safetensors", size_bytes=size, primary=True)])])
    return file_id


def test_everything_paused_stays_paused_over_a_restart_and_resumes(fake_civitai, daemon_factory):
    fake = fake_civitai
    fids = [add_model(fake, i) for i in (1, 2)]
    for fid in fids:
        fake.set_fault(fid, "drip", bps=2 * MiB)  # about 4 s a file: paused mid-file
    daemon = daemon_factory(base_config(fake, workers=1, connections=1),
                            [{"modelId": i, "model_type": "checkpoint"} for i in (1, 2)])
    daemon.start()
    first = wait_until(lambda: next((j for j in daemon.jobs() if j["state"] == "downloading" and j["bytes_done"]),
                                    None), 30, message="a download under way")
    assert daemon.api("POST", "/api/pause").status_code == 200
    wait_until(lambda: all(c.get("job_id") is None for c in daemon.api("GET", "/api/status").json()["children"]
                           if c["kind"] == "worker"), 5, message="the worker to let go")
    kept = daemon.job(first["id"])["bytes_done"]
    assert 0 < kept < SIZE

    assert daemon.stop() == 0
    daemon.start()
    assert daemon.api("GET", "/api/status").json()["paused"] is True
    served = sum(fake.bytes_served(fid) for fid in fids)
    deadline = time.monotonic() + 3  # a window in which a started download would show
    wait_until(lambda: time.monotonic() >= deadline or any(j["state"] == "downloading" for j in daemon.jobs()),
               5, message="three seconds")
    assert not any(j["state"] == "downloading" for j in daemon.jobs()), "nothing starts while paused"
    assert sum(fake.bytes_served(fid) for fid in fids) == served

    fake.clear_faults()
    assert daemon.api("POST", "/api/resume").status_code == 200
    wait_until(lambda: all(j["state"] == "done" for j in daemon.jobs()) and len(daemon.jobs()) == 2, 60,
               message="both files done after the resume")
    for i, fid in enumerate(fids, 1):
        assert sha256_file(daemon.models_dir / "checkpoint" / f"m{i}.safetensors") == fake.file_sha256(fid).lower()
    # The paused file went on from its bytes: the CDN served it about once, not once and a half.
    assert fake.bytes_served(first["file_id"]) < SIZE * 1.25
    assert daemon.stop() == 0


def test_a_paused_job_keeps_its_partial_over_a_restart_and_resumes_from_it(fake_civitai, daemon_factory):
    fake = fake_civitai
    fid = add_model(fake, 7)
    fake.set_fault(fid, "drip", bps=2 * MiB)
    daemon = daemon_factory(base_config(fake, workers=1, connections=1), [{"modelId": 7, "model_type": "checkpoint"}])
    daemon.start()
    job = wait_until(lambda: next((j for j in daemon.jobs() if j["state"] == "downloading"
                                   and j["bytes_done"] >= MiB), None), 30, message="a download under way")
    res = daemon.api("POST", f"/api/jobs/{job['id']}/pause")
    assert res.status_code == 200 and res.json()["job"]["state"] == "paused"
    daemon.wait_event("download_paused", lambda e: e["job_id"] == job["id"], timeout=10)
    wait_until(lambda: all(c.get("job_id") != job["id"] for c in daemon.api("GET", "/api/status").json()["children"]
                           if c["kind"] == "worker"), 5, message="the worker to let go")
    part = daemon.models_dir / "checkpoint" / ".m7.safetensors.part"
    assert part.exists() and part.stat().st_size >= MiB, "the partial file stays"
    kept = daemon.job(job["id"])["bytes_done"]
    assert kept >= MiB

    assert daemon.stop() == 0
    daemon.start()
    assert daemon.job(job["id"])["state"] == "paused" and daemon.job(job["id"])["bytes_done"] == kept
    assert part.exists()
    served = fake.bytes_served(fid)

    fake.clear_faults()
    res = daemon.api("POST", f"/api/jobs/{job['id']}/resume")
    assert res.status_code == 200
    daemon.wait_event("download_completed", lambda e: e["job_id"] == job["id"], timeout=60)
    assert sha256_file(daemon.models_dir / "checkpoint" / "m7.safetensors") == fake.file_sha256(fid).lower()
    assert names_besides_sidecars(daemon.models_dir / "checkpoint") == ["m7.safetensors"]
    # Resumed from the partial: after the resume the CDN sent about what was missing, not the file.
    assert fake.bytes_served(fid) - served <= SIZE - kept + MiB
    assert daemon.stop() == 0
