"""The faults of a long run, each reproduced against the real process tree: a second daemon on the
same data folder, the database locked by another program, a damaged database, SIGHUP, and the
restart rule for a worker lost after real work."""
from __future__ import annotations

import signal
import sqlite3
import threading
import time

import requests

from tests.helpers import base_config, names_besides_sidecars, sha256_file, wait_until

MiB = 1024 * 1024
KiB = 1024


def add_model(fake, model_id, size=256 * KiB, name=None):
    vid, fid = model_id * 10, model_id * 100
    fake.add_model(model_id, name=f"Model {model_id}", type="Checkpoint", versions=[
        dict(id=vid, published_at="2024-05-01T00:00:00.000Z",
             files=[dict(id=fid, name=name or f"m{model_id}.safetensors", size_bytes=size, primary=True)])])
    return fid


def test_a_second_daemon_on_the_same_data_folder_exits_at_once_naming_the_first(fake_civitai, daemon_factory):
    add_model(fake_civitai, 1)
    first = daemon_factory(base_config(fake_civitai), [{"modelId": 1, "model_type": "checkpoint"}])
    first.start()
    second = daemon_factory(dict(first.config), folder=first.folder)
    second.stderr_path = first.folder / "second.stderr"
    started = time.monotonic()
    second.start(wait_ready=False)
    code = second.proc.wait(15)
    took = time.monotonic() - started
    err = second.stderr()
    assert code == 1, err
    assert f"another daemon (pid {first.proc.pid}) is already running on {first.data_dir}" in err
    assert "open http" not in err and "Traceback" not in err, err
    assert took < 10
    # The first one never noticed.
    first.wait_event("download_completed", lambda e: e["model_id"] == 1)
    assert first.api("GET", "/api/status").json()["health"] == "ok"
    assert first.stop() == 0
    # Once the first is gone, the folder is free again (the lock died with it).
    again = daemon_factory(dict(first.config), folder=first.folder)
    again.start()
    assert again.stop() == 0


class Locker(threading.Thread):
    """Another program holding the database: BEGIN EXCLUSIVE for `hold_s` seconds."""

    def __init__(self, path, hold_s):
        super().__init__(daemon=True)
        self.path, self.hold_s = path, hold_s
        self.locked = threading.Event()
        self.release = threading.Event()

    def run(self):
        conn = sqlite3.connect(str(self.path), timeout=10, isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        self.locked.set()
        self.release.wait(self.hold_s)
        conn.execute("COMMIT")
        conn.close()


def test_a_locked_database_degrades_the_daemon_and_loses_nothing(fake_civitai, daemon_factory):
    fake = fake_civitai
    fids = [add_model(fake, i, size=2 * MiB) for i in range(1, 7)]
    for fid in fids:
        fake.set_fault(fid, "drip", bps=1 * MiB)  # ~2 s a file: some finish while the lock is held
    daemon = daemon_factory(base_config(fake, workers=2),
                            [{"modelId": i, "model_type": "checkpoint"} for i in range(1, 7)])
    daemon.start()
    daemon.wait_event("download_started")
    locker = Locker(daemon.data_dir / "daemon.db", hold_s=8)
    locker.start()
    assert locker.locked.wait(10)
    status = wait_until(lambda: (lambda s: s if s["health"] == "degraded" else None)(
        daemon.api("GET", "/api/status").json()), 15, interval=0.2, message="a degraded status")
    assert "locked by another program" in status["degraded"]
    health = requests.get(f"{daemon.base_url}/health", timeout=10).json()
    assert health["status"] == "degraded" and "locked by another program" in health["reason"]
    assert daemon.proc.poll() is None
    locker.release.set()
    locker.join(10)
    # Every file arrives, verified; nothing is left downloading; the status is ok again.
    wait_until(lambda: len({e["job_id"] for e in daemon.events("download_completed")}) == 6, 60, interval=0.3,
               message="every file to complete after the lock")
    for i, fid in enumerate(fids, 1):
        assert sha256_file(daemon.models_dir / "checkpoint" / f"m{i}.safetensors") == fake.file_sha256(fid).lower()
    wait_until(lambda: daemon.api("GET", "/api/status").json()["health"] == "ok", 10, message="health ok again")
    assert requests.get(f"{daemon.base_url}/health", timeout=10).json()["status"] == "ok"
    assert all(j["state"] == "done" for j in daemon.jobs())
    log = daemon.log_text()
    assert "cannot be written" in log and "can be written again" in log
    assert "Traceback" not in log, log
    assert daemon.stop() == 0


def test_sigterm_stops_the_daemon_while_the_database_is_locked(fake_civitai, daemon_factory):
    fake = fake_civitai
    fid = add_model(fake, 1, size=8 * MiB)
    fake.set_fault(fid, "drip", bps=512 * KiB)
    daemon = daemon_factory(base_config(fake), [{"modelId": 1, "model_type": "checkpoint"}])
    daemon.start()
    daemon.wait_event("download_started")
    locker = Locker(daemon.data_dir / "daemon.db", hold_s=40)
    locker.start()
    assert locker.locked.wait(10)
    started = time.monotonic()
    code = daemon.stop(signal.SIGTERM, timeout=25)
    took = time.monotonic() - started
    locker.release.set()
    locker.join(10)
    assert code == 0 and took < 20, (code, took)
    # The next start resumes the job as if nothing had happened.
    fake.clear_faults()
    daemon.start()
    daemon.wait_event("download_completed", lambda e: e["model_id"] == 1, timeout=30)
    assert sha256_file(daemon.models_dir / "checkpoint" / "m1.safetensors") == fake.file_sha256(fid).lower()
    assert daemon.stop() == 0


def test_a_damaged_database_is_one_sentence(fake_civitai, daemon_factory):
    daemon = daemon_factory(base_config(fake_civitai))
    daemon.data_dir.mkdir(parents=True)
    (daemon.data_dir / "daemon.db").write_bytes(b"this is not a database at all\n" * 200)
    daemon.start(wait_ready=False)
    assert daemon.proc.wait(20) == 1
    err = daemon.stderr()
    assert "daemon.db is damaged or not a database" in err and "move it away" in err, err
    assert "Traceback" not in err, err


def test_sighup_reloads_live_keys_and_names_the_ones_that_need_a_restart(fake_civitai, daemon_factory):
    import json

    daemon = daemon_factory(base_config(fake_civitai, throttle=0, workers=2))
    daemon.start()
    config = json.loads(daemon.config_path.read_text())
    config.update(throttle=0.25, retries=5, workers=3)
    daemon.config_path.write_text(json.dumps(config))
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "config.json reloaded" in daemon.log_text(), 10, message="the reload")
    log = daemon.log_text()
    assert "workers only change(s) at the next start" in log
    assert "retries" in log.split("config.json reloaded: ")[1].split("\n")[0]
    assert len([c for c in daemon.api("GET", "/api/status").json()["children"] if c["kind"] == "worker"]) == 2
    # A broken file is reported and the running config stays.
    daemon.config_path.write_text('{"throttle": "fast"}')
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "config.json not reloaded" in daemon.log_text(), 10, message="the refusal")
    assert "'throttle'" in daemon.log_text().split("config.json not reloaded")[1].split("\n")[0]
    assert daemon.proc.poll() is None and daemon.api("GET", "/api/status").status_code == 200
    assert daemon.stop() == 0


def test_a_worker_lost_after_real_work_restarts_at_once(fake_civitai, daemon_factory):
    fake = fake_civitai
    fid = add_model(fake, 1, size=16 * MiB)
    fake.set_fault(fid, "drip", bps=1 * MiB)
    daemon = daemon_factory(base_config(fake, workers=1), [{"modelId": 1, "model_type": "checkpoint"}])
    daemon.start()
    daemon.wait_event("download_started")

    def busy_for_11_s():
        c = next(c for c in daemon.api("GET", "/api/status").json()["children"] if c["name"] == "worker-1")
        return c if c["job_id"] is not None else None

    worker = wait_until(busy_for_11_s, 20, message="the worker to be busy")
    started = daemon.events("download_started")[0]
    wait_until(lambda: time.time() - _ts(started["ts"]) > 11, 20, interval=0.2, message="11 s of real work")
    import os

    os.kill(worker["pid"], signal.SIGKILL)
    wait_until(lambda: "worker-1 exited (code -9, crash); restarting in 0 s" in daemon.log_text(), 10,
               message="an immediate restart")
    fake.clear_faults()
    daemon.wait_event("download_completed", timeout=40)
    assert daemon.stop() == 0


def _ts(iso: str) -> float:
    from datetime import datetime

    return datetime.strptime(iso, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=__import__("datetime").timezone.utc).timestamp()


def test_two_daemons_sharing_one_download_folder_fetch_each_file_once_at_a_time(fake_civitai, daemon_factory,
                                                                                  tmp_path):
    """SPEC §5: two daemons with their own data folders on one download_dir (a NAS that several
    machines mount): one fetches a file, the other waits and verifies it; nothing is corrupted."""
    fake = fake_civitai
    shared = tmp_path / "nas-models"
    fids = [add_model(fake, i, size=3 * MiB) for i in range(1, 5)]
    for fid in fids:
        fake.set_fault(fid, "drip", bps=2 * MiB)
    manifest = [{"modelId": i, "model_type": "checkpoint"} for i in range(1, 5)]
    a = daemon_factory(base_config(fake, download_dir=str(shared)), manifest, folder=tmp_path / "a")
    b = daemon_factory(base_config(fake, download_dir=str(shared)), manifest, folder=tmp_path / "b")
    a.start()
    b.start()
    for d in (a, b):
        wait_until(lambda d=d: len({e["job_id"] for e in d.events("download_completed") + d.events("download_skipped")})
                   == 4, 90, interval=0.3, message="every file done in both daemons")
    for i, fid in enumerate(fids, 1):
        path = shared / "checkpoint" / f"m{i}.safetensors"
        assert sha256_file(path) == fake.file_sha256(fid).lower()
    assert names_besides_sidecars(shared / "checkpoint") == [f"m{i}.safetensors" for i in range(1, 5)]
    fetched = {fid: fake.bytes_served(fid) for fid in fids}
    # Each file came down once (a wait, then a verify, for the other daemon), give or take a resume.
    assert all(n < 1.5 * 3 * MiB for n in fetched.values()), fetched
    for d in (a, b):
        assert not d.events("download_failed") and "Traceback" not in d.log_text()
        assert d.stop() == 0
