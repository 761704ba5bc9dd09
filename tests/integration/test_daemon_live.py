"""The real daemon as a process tree against the local fake Civitai: downloads, crashes,
stalls, restarts, bad input. Every test stops what it starts."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.helpers import REPO, base_config, free_port, names_besides_sidecars, pid_alive, sha256_file, wait_until

MiB = 1024 * 1024


def add_simple_model(fake, model_id=100, version_id=1000, file_id=5000, size=256 * 1024, name="model.safetensors",
                     **file_kw):
    fake.add_model(model_id, name=f"Model {model_id}", type="Checkpoint", versions=[
        dict(id=version_id, published_at="2024-05-01T00:00:00.000Z",
             files=[dict(id=file_id, name=name, size_bytes=size, primary=True, **file_kw)]),
    ])
    return file_id


def test_starts_with_a_commented_config_and_stops_cleanly(fake_civitai, daemon_factory):
    port = free_port()
    config_text = (
        "// my daemon\n{\n"
        f'  "civitai_url": "{fake_civitai.api_url}", /* the fake */\n'
        f'  "active_port": {port},\n'
        '  "throttle": 0,\n  "workers": 2,\n}\n'
    )
    daemon = daemon_factory(config_text)
    daemon.config = {"active_port": port}
    daemon.start()
    status = daemon.api("GET", "/api/status").json()
    names = sorted(c["name"] for c in status["children"])
    assert names == ["updater", "web", "worker-1", "worker-2"]
    wait_until(lambda: "#token=" in daemon.stderr(), 10, message="the login link")  # printed ...
    started = time.monotonic()
    assert daemon.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 20
    log = daemon.log_text()
    assert "starting" in log and "stopped" in log
    assert "#token=" not in log  # ... but never logged
    assert [e["event"] for e in daemon.events()][:1] == ["daemon_started"]
    assert daemon.events("daemon_stopping")


def test_minimal_entry_gets_the_newest_published_version_verified(fake_civitai, daemon_factory):
    # The API lists the older version first: the daemon must pick by publish date.
    fake_civitai.add_model(4468, name="Counterfeit", type="Checkpoint", versions=[
        dict(id=1, published_at="2023-01-01T00:00:00.000Z",
             files=[dict(id=11, name="old.safetensors", size_bytes=100_000, primary=True)]),
        dict(id=2, published_at="2024-06-01T00:00:00.000Z",
             files=[dict(id=21, name="new-fp16.safetensors", size_bytes=300_000, primary=False, fp="fp16"),
                    dict(id=22, name="new.safetensors", size_bytes=700_000, primary=True, fp="fp32")]),
    ])
    manifest = [{"my_note": "keep me", "modelId": 4468, "model_type": "checkpoint", "priority": 3}]
    daemon = daemon_factory(base_config(fake_civitai), manifest)
    daemon.start()
    done = daemon.wait_event("download_completed", timeout=60)
    assert (done["version_id"], done["filename"], done["path"]) == (2, "new.safetensors", "checkpoint/new.safetensors")
    target = daemon.models_dir / "checkpoint" / "new.safetensors"
    assert sha256_file(target) == fake_civitai.file_sha256(22).lower() == done["sha256"]
    assert not list(target.parent.glob(".*.part"))
    entry = wait_until(lambda: (lambda m: m[0] if m[0].get("modelVersionId") else None)(daemon.read_manifest()), 10,
                       message="the manifest to record the version")
    assert list(entry)[:4] == ["my_note", "modelId", "model_type", "priority"]
    assert (entry["modelVersionId"], entry["fileId"], entry["filename"]) == (2, 22, "new.safetensors")
    assert entry["sha256"].lower() == fake_civitai.file_sha256(22).lower()
    # The CDN never saw the API key (there is none here) nor any Authorization header.
    assert all("authorization" not in {k.lower() for k in r.headers} for r in fake_civitai.requests_to("cdn"))
    assert daemon.stop() == 0


def test_present_files_are_not_downloaded_again_after_restart(fake_civitai, daemon_factory):
    add_simple_model(fake_civitai)
    daemon = daemon_factory(base_config(fake_civitai), [{"modelId": 100, "model_type": "checkpoint"}])
    daemon.start()
    daemon.wait_event("download_completed", timeout=60)
    wait_until(lambda: daemon.read_manifest()[0].get("filename"), 10, message="manifest filled")
    assert daemon.stop() == 0
    served = fake_civitai.bytes_served(5000)
    daemon.start()
    # The start's sync of the manifest is stored with daemon_started, in one transaction, before
    # any worker starts: a wrong re-download would be a download_queued event after it.
    started = [e for e in daemon.events() if e["event"] == "daemon_started"][-1]["id"]
    assert not [e for e in daemon.events("download_queued") if e["id"] > started]
    assert fake_civitai.bytes_served(5000) == served
    assert len(daemon.events("download_completed")) == 1
    assert daemon.stop() == 0


def test_api_key_goes_only_to_the_api_host_and_never_to_logs(fake_civitai, daemon_factory):
    key = "sk-test-0123456789abcdef0123456789"
    fake_civitai.api_key = key
    add_simple_model(fake_civitai)
    daemon = daemon_factory(base_config(fake_civitai, civitai_api_key=key), [{"modelId": 100, "model_type": "checkpoint"}])
    daemon.start()
    daemon.wait_event("download_completed", timeout=60)
    assert daemon.stop() == 0
    api_auth = [r.headers.get("Authorization") for r in fake_civitai.requests_to("api", r"/api/download/")]
    assert api_auth and all(a == f"Bearer {key}" for a in api_auth)
    for r in fake_civitai.requests_to("cdn"):
        assert key not in json.dumps(dict(r.headers)) and key not in r.url_path + r.query
    for text in (daemon.log_text(), daemon.stderr(), json.dumps(daemon.events())):
        assert key not in text
    assert "sig=" not in daemon.log_text()  # signed CDN URLs lose their query strings


def test_anonymous_download_of_a_login_only_file_fails_with_a_clear_reason(fake_civitai, daemon_factory):
    fake_civitai.api_key = "needs-a-key-0123456789"
    add_simple_model(fake_civitai)
    daemon = daemon_factory(base_config(fake_civitai), [{"modelId": 100, "model_type": "checkpoint"}])
    daemon.start()
    failed = daemon.wait_event("download_failed", timeout=60)
    assert "API key" in failed["error"] or "api key" in failed["error"].lower()
    assert not (daemon.models_dir / "checkpoint" / "model.safetensors").exists()
    assert daemon.stop() == 0


@pytest.mark.parametrize("mode,params,needle", [
    ("status", {"code": 404}, "not found"),
    ("html_login", {}, "web page"),
    ("status", {"code": 410}, "archived"),
])
def test_bad_answers_fail_with_a_sentence_and_leave_no_file(fake_civitai, daemon_factory, mode, params, needle):
    add_simple_model(fake_civitai)
    fake_civitai.set_fault(5000, mode, **params)
    daemon = daemon_factory(base_config(fake_civitai, retries=1),
                            [{"modelId": 100, "modelVersionId": 1000, "fileId": 5000, "model_type": "checkpoint",
                              "filename": "model.safetensors"}])
    daemon.start()
    failed = daemon.wait_event("download_failed", timeout=60)
    assert needle.lower() in failed["error"].lower(), failed["error"]
    assert not (daemon.models_dir / "checkpoint" / "model.safetensors").exists()
    assert daemon.stop() == 0


def test_wrong_bytes_and_a_reset_are_retried_to_a_verified_file(fake_civitai, daemon_factory):
    add_simple_model(fake_civitai, size=2 * MiB)
    fake_civitai.set_fault(5000, "wrong_bytes", times=1)
    fake_civitai.set_fault(5000, "reset", times=1, after_bytes=MiB)
    daemon = daemon_factory(base_config(fake_civitai, retries=3), [{"modelId": 100, "model_type": "checkpoint"}])
    daemon.start()
    done = daemon.wait_event("download_completed", timeout=90)
    assert daemon.events("download_retry")
    assert sha256_file(daemon.models_dir / done["path"]) == fake_civitai.file_sha256(5000).lower()
    assert daemon.stop() == 0


def test_rate_limit_honours_retry_after(fake_civitai, daemon_factory):
    add_simple_model(fake_civitai)
    fake_civitai.set_fault(5000, "status", times=1, code=429, retry_after=2)
    daemon = daemon_factory(base_config(fake_civitai), [{"modelId": 100, "modelVersionId": 1000, "fileId": 5000,
                                                         "model_type": "checkpoint"}])
    daemon.start()
    retry = daemon.wait_event("download_retry", timeout=60)
    assert retry["delay_s"] >= 2 and "rate" in retry["error"].lower()
    daemon.wait_event("download_completed", timeout=60)
    assert daemon.stop() == 0


def start_a_dripping_download(fake, daemon_factory, size):
    """One worker fetching `size` bytes at 2 MiB/s (the first attempt only); returns once more
    than 2 MiB of it are in the partial file."""
    add_simple_model(fake, size=size)
    fake.set_fault(5000, "drip", times=1, bps=2 * MiB)
    daemon = daemon_factory(base_config(fake, workers=1), [{"modelId": 100, "model_type": "checkpoint"}])
    daemon.start()
    part = daemon.models_dir / "checkpoint" / ".model.safetensors.part"
    wait_until(lambda: part.exists() and part.stat().st_size > 2 * MiB, 30, message="a partial file of 2 MiB")
    return daemon


def test_kill_9_of_a_downloading_worker_resumes_from_the_partial_file(fake_civitai, daemon_factory):
    size = 8 * MiB
    daemon = start_a_dripping_download(fake_civitai, daemon_factory, size)
    worker_pid = daemon.children()["worker-1"]
    os.kill(worker_pid, signal.SIGKILL)
    restarted = daemon.wait_event("worker_restarted", timeout=30)
    assert restarted["reason"] == "crash" and restarted["exitcode"] == -9
    done = daemon.wait_event("download_completed", timeout=60)
    assert sha256_file(daemon.models_dir / done["path"]) == fake_civitai.file_sha256(5000).lower()
    served = fake_civitai.bytes_served(5000)
    print(f"\nkill -9 of the worker mid-file: the CDN sent {served / size:.3f}x the file's size")
    assert served < 1.5 * size, f"served {served / size:.2f}x the file: it did not resume"
    ranges = [r.headers.get("Range") for r in fake_civitai.requests_to("cdn") if r.method == "GET"]
    assert any(r and r.startswith("bytes=") and r != "bytes=0-" for r in ranges), ranges
    job = daemon.job(done["job_id"])
    assert job["attempts"] == 2
    assert daemon.stop() == 0


def test_kill_9_of_the_whole_tree_then_restart_resumes(fake_civitai, daemon_factory):
    size = 8 * MiB
    daemon = start_a_dripping_download(fake_civitai, daemon_factory, size)
    daemon.kill_tree()
    assert not (daemon.models_dir / "checkpoint" / "model.safetensors").exists()
    daemon.start()
    done = daemon.wait_event("download_completed", timeout=60)
    assert sha256_file(daemon.models_dir / done["path"]) == fake_civitai.file_sha256(5000).lower()
    assert fake_civitai.bytes_served(5000) < 1.5 * size
    assert daemon.stop() == 0


def test_a_stall_is_killed_at_timeout_retried_failed_and_the_queue_moves_on(fake_civitai, daemon_factory):
    add_simple_model(fake_civitai, model_id=100, version_id=1000, file_id=5000, size=MiB)
    add_simple_model(fake_civitai, model_id=200, version_id=2000, file_id=6000, size=MiB, name="other.safetensors")
    fake_civitai.set_fault(5000, "stall", after_bytes=64 * 1024)  # every attempt stalls
    manifest = [
        {"modelId": 100, "modelVersionId": 1000, "fileId": 5000, "model_type": "checkpoint", "priority": 1},
        {"modelId": 200, "modelVersionId": 2000, "fileId": 6000, "model_type": "lora", "priority": 2},
    ]
    daemon = daemon_factory(base_config(fake_civitai, workers=1, timeout=4, retries=1), manifest)
    daemon.start()
    timeout_event = daemon.wait_event("download_timeout", timeout=30)
    started = next(e for e in daemon.events("download_started") if e["job_id"] == timeout_event["job_id"])
    restarted = daemon.wait_event("worker_restarted", timeout=15)
    assert restarted["reason"] == "timeout"
    failed = daemon.wait_event("download_failed", timeout=60)
    assert failed["job_id"] == timeout_event["job_id"] and "timeout" in failed["error"]
    assert not (daemon.models_dir / "checkpoint" / "model.safetensors").exists()
    daemon.wait_event("download_completed", lambda e: e["version_id"] == 2000, timeout=60)
    # Figures for the closing note: from the attempt's start to the kill.
    from datetime import datetime

    def secs(a, b):
        return (datetime.fromisoformat(b["ts"].replace("Z", "+00:00"))
                - datetime.fromisoformat(a["ts"].replace("Z", "+00:00"))).total_seconds()

    print(f"\ntimeout=4: attempt start -> kill {secs(started, timeout_event):.2f} s, "
          f"-> worker restarted {secs(started, restarted):.2f} s")
    assert daemon.stop() == 0


def test_hostile_names_stay_inside_download_dir(fake_civitai, daemon_factory):
    add_simple_model(fake_civitai, name="../../../escape.safetensors")
    daemon = daemon_factory(base_config(fake_civitai), [{"modelId": 100, "model_type": "checkpoint"}])
    daemon.start()
    done = daemon.wait_event("download_completed", timeout=60)
    assert done["path"] == "checkpoint/escape.safetensors"
    assert (daemon.models_dir / "checkpoint" / "escape.safetensors").is_file()
    assert not list(daemon.folder.rglob("escape.safetensors"))[1:]
    assert not (daemon.folder.parent / "escape.safetensors").exists()
    assert daemon.stop() == 0


def test_a_foreign_file_at_the_target_is_never_overwritten(fake_civitai, daemon_factory):
    add_simple_model(fake_civitai)
    daemon = daemon_factory(base_config(fake_civitai), [{"modelId": 100, "model_type": "checkpoint"}])
    mine = daemon.models_dir / "checkpoint" / "model.safetensors"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"my own file")
    daemon.start()
    done = daemon.wait_event("download_completed", timeout=60)
    assert done["filename"] == "model_1000.safetensors"
    assert mine.read_bytes() == b"my own file"
    wait_until(lambda: daemon.read_manifest()[0].get("filename") == "model_1000.safetensors", 10,
               message="the manifest to record the name used")
    assert daemon.stop() == 0


def run_exit(daemon, timeout=30):
    proc = subprocess.run(daemon.command(), cwd=str(REPO), capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stderr


def test_bad_config_exits_78_naming_the_key(tmp_path, daemon_factory):
    daemon = daemon_factory('{"workers": 2,\n "timeout": "soon"}')
    code, err = run_exit(daemon)
    assert code == 78
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "config.json" in lines[0] and "'timeout'" in lines[0] and "soon" in lines[0]


def test_broken_manifest_exits_78_naming_the_place(fake_civitai, daemon_factory):
    daemon = daemon_factory(base_config(fake_civitai), '[\n  {"modelId": 1, "model_type": "lora"},\n  {"modelId": 2}\n]')
    code, err = run_exit(daemon)
    assert code == 78
    assert "manifest.json" in err and "entry 1" in err and "'model_type'" in err
    daemon2 = daemon_factory(base_config(fake_civitai), '[{"modelId": 1, "model_type": "lora"},,]')
    code, err = run_exit(daemon2)
    assert code == 78 and "manifest.json" in err and "line 1" in err


def test_a_child_that_cannot_boot_stops_the_daemon_with_its_cause(fake_civitai, daemon_factory):
    import socket

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    try:
        daemon = daemon_factory(base_config(fake_civitai, active_port=port))
        daemon.start(wait_ready=False)
        code = daemon.proc.wait(90)
        assert code == 1
        err = daemon.stderr()
        assert "web failed to start 5 times" in err
        assert "in use" in err.lower() or "address" in err.lower()
        wait_until(lambda: not any(pid_alive(p) for p in daemon._all_pids), 10, message="children gone")
    finally:
        blocker.close()


def test_cancel_then_retry_never_runs_one_job_on_two_workers(fake_civitai, daemon_factory):
    add_simple_model(fake_civitai, size=8 * MiB)
    fake_civitai.set_fault(5000, "drip", bps=2 * MiB)
    daemon = daemon_factory(base_config(fake_civitai, workers=2))
    daemon.start()
    job = daemon.api("POST", "/api/jobs", json={"version_id": 1000}).json()["job"]
    part = daemon.models_dir / "checkpoint" / ".model.safetensors.part"
    wait_until(lambda: part.exists() and part.stat().st_size > MiB, 30, message="a partial file")
    assert daemon.api("DELETE", f"/api/jobs/{job['id']}").status_code == 200
    assert daemon.api("POST", f"/api/jobs/{job['id']}/retry").status_code == 200
    fake_civitai.clear_faults()
    done = daemon.wait_event("download_completed", timeout=60)
    assert done["path"] == "checkpoint/model.safetensors"  # not an alternate name: one writer only
    assert not list((daemon.models_dir / "checkpoint").glob(".*.part*"))
    assert names_besides_sidecars(daemon.models_dir / "checkpoint") == ["model.safetensors"]
    assert not daemon.events("worker_restarted")  # a cancel is not a crash
    assert daemon.stop() == 0


def test_the_newest_of_a_model_and_its_version_by_url_are_one_job(fake_civitai, daemon_factory):
    add_simple_model(fake_civitai, size=4 * MiB)
    fake_civitai.set_fault(5000, "drip", times=1, bps=2 * MiB)
    daemon = daemon_factory(base_config(fake_civitai, workers=2))
    daemon.start()
    first = daemon.api("POST", "/api/jobs", json={"model_id": 100})
    second = daemon.api("POST", "/api/jobs",
                        json={"url": "https://civitai.com/models/100/slug?modelVersionId=1000"})
    assert first.status_code == 201
    assert second.status_code == 200 and second.json()["job"]["id"] == first.json()["job"]["id"]
    daemon.wait_event("download_completed", timeout=60)
    assert names_besides_sidecars(daemon.models_dir / "checkpoint") == ["model.safetensors"]
    assert daemon.stop() == 0


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc")
def test_forked_children_hold_none_of_the_supervisors_files_even_after_restarts(fake_civitai, daemon_factory):
    """A forked child keeps only what it was handed: not daemon.db and its WAL, not the pid lock
    (which would outlive the supervisor for as long as an orphaned child lives), not the log
    file, not a sibling's pipes. Restarted workers do not pile up more descriptors."""
    daemon = daemon_factory(base_config(fake_civitai, workers=2), [])
    daemon.start()
    data = str(daemon.data_dir)

    def fds_of(pid: int) -> dict[int, str]:
        out = {}
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                out[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                pass
        return out

    held: dict[str, list[str]] = {}  # the last check's descriptors, for a failure's message

    def check(children: dict[str, int]) -> dict[str, int]:
        counts = {}
        for name, pid in children.items():
            if name not in ("worker-1", "worker-2", "updater"):
                continue
            links = fds_of(pid)
            ours = sorted(link for link in links.values() if link.startswith(data))
            assert ours == [], f"{name} holds the supervisor's files: {ours}"
            counts[name] = len(links)
            held[name] = sorted(links.values())
        return counts

    def ready(old: int | None = None) -> bool:
        """worker-1 (a new one if `old` is given), worker-2 and the updater ready: a child still
        starting (spawn: unpickling, importing) holds descriptors it lets go of before that."""
        kids = {c["name"]: c for c in daemon.api("GET", "/api/status").json()["children"]}
        return (all(kids.get(n, {}).get("state") == "running" for n in ("worker-1", "worker-2", "updater"))
                and kids["worker-1"]["pid"] != old)

    wait_until(ready, 30, message="the children ready")
    first = check(daemon.children())
    assert set(first) == {"worker-1", "worker-2", "updater"}
    for _ in range(3):  # restarts after outside kills: each new worker is forked beside the others
        old = daemon.children()["worker-1"]
        os.kill(old, signal.SIGKILL)
        wait_until(lambda old=old: ready(old), 30, message="worker-1 back and ready")
    later = check(daemon.children())
    assert later["worker-1"] <= first["worker-1"] and later["worker-2"] <= first["worker-2"], (first, later, held)
