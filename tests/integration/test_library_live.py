"""`supervisor.py import` as a user runs it: a real subprocess against the fake Civitai, killed
with -9 while it hashes or while it asks Civitai and run again, refusing folders it must not
scan, handing over to a running daemon's API, and a daemon started afterwards that downloads
nothing it adopted and keeps it current."""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ipc.files import PidLock
from tests.helpers import REPO, base_config, free_port, wait_until

KiB = 1024
MiB = 1 << 20
SECRET = "s" * 40
OLD = "2024-01-01T00:00:00.000Z"
NEW = "2024-06-01T00:00:00.000Z"


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def setup_folder(tmp_path: Path, fake, **config) -> Path:
    conf = {"civitai_url": fake.api_url, "throttle": 0, "download_dir": "webui", "jwt_secret": SECRET}
    conf.update(config)
    (tmp_path / "config.json").write_text(json.dumps(conf))
    (tmp_path / "manifest.json").write_text("[]")
    return tmp_path / "webui"


def command(tmp_path: Path, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "supervisor.py"), "import", *args, "--config", str(tmp_path / "config.json")]


def run_import(tmp_path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(command(tmp_path, *args), cwd=str(REPO), capture_output=True, text=True, timeout=timeout)


def db_rows(tmp_path: Path, sql: str) -> list[tuple]:
    path = tmp_path / "data" / "daemon.db"
    if not path.exists():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute(sql).fetchall()
    except sqlite3.OperationalError:
        return []  # not created yet
    finally:
        conn.close()


def recorded_files(tmp_path: Path) -> dict[str, str]:
    return dict(db_rows(tmp_path, "SELECT path, recorded_at FROM files"))


def by_hash_bodies(fake) -> list[list[str]]:
    return [json.loads(r.body) for r in fake.requests_to("api", path_re="/model-versions/by-hash")]


def test_the_command_adopts_prints_a_summary_and_a_dry_run_changes_nothing(fake_civitai, tmp_path):
    fake = fake_civitai
    root = setup_folder(tmp_path, fake)
    fake.add_model(1, name="Dream", type="Checkpoint", versions=[dict(id=10, files=[
        dict(id=101, name="dream.safetensors", primary=True, size_bytes=3 * MiB)])])
    write(root / "models/Stable-diffusion/dream (my copy).safetensors", fake.file_bytes(101))
    write(root / "models/Lora/homemade.safetensors", b"home" * 1000)
    write(root / "loose.ckpt", b"top level")

    dry = run_import(tmp_path, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert json.loads((tmp_path / "manifest.json").read_text()) == []
    assert "1 would be added to manifest.json" in dry.stdout and "dry run: manifest.json was not changed" in dry.stdout

    out = run_import(tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == (f"{root}: 2 model file(s); 1 known on Civitai; 1 added to manifest.json; 0 already listed")
    assert "unknown on Civitai (1), left as they are:" in lines and "  models/Lora/homemade.safetensors" in lines
    assert any(line.startswith("  loose.ckpt: directly in download_dir") for line in lines)
    assert json.loads((tmp_path / "manifest.json").read_text()) == [
        {"modelId": 1, "modelVersionId": 10, "fileId": 101, "model_type": "models/Stable-diffusion",
         "sha256": fake.file_sha256(101), "filename": "dream (my copy).safetensors",
         "updatedAt": fake.version_json(10)["updatedAt"]}]
    assert not fake.requests_to("api", path_re="/api/download/")
    info = json.loads((root / "models/Stable-diffusion/dream (my copy).civitai.info").read_text())
    assert info["id"] == 10 and info["model"]["name"] == "Dream"  # the sidecar other tools read


@pytest.mark.parametrize("folder, words", [
    ("{outside}", "is outside download_dir"),
    ("../elsewhere", "is outside download_dir"),
    ("models/Linked", "is a symlink"),
    ("models/Nothing", "there is no folder"),
])
def test_folders_the_import_must_not_scan_are_refused_by_name(fake_civitai, tmp_path, folder, words):
    root = setup_folder(tmp_path, fake_civitai)
    (tmp_path / "elsewhere").mkdir()
    write(tmp_path / "elsewhere/x.safetensors", b"x")
    (root / "models").mkdir(parents=True)
    os.symlink(tmp_path / "elsewhere", root / "models/Linked")
    folder = folder.format(outside=tmp_path / "elsewhere")
    out = run_import(tmp_path, folder)
    assert out.returncode == 1 and words in out.stderr and folder in out.stderr, out.stderr
    assert fake_civitai.requests == [] and json.loads((tmp_path / "manifest.json").read_text()) == []


def test_a_broken_manifest_stops_the_import_before_anything(fake_civitai, tmp_path):
    root = setup_folder(tmp_path, fake_civitai)
    write(root / "Lora/a.safetensors", b"a")
    (tmp_path / "manifest.json").write_text('[{"modelId": 1}]')
    out = run_import(tmp_path)
    assert out.returncode == 78 and "never overwritten while it is broken" in out.stderr
    assert (tmp_path / "manifest.json").read_text() == '[{"modelId": 1}]'


def test_kill_9_while_asking_civitai_then_a_rerun_finishes_without_hashing_again(fake_civitai, tmp_path):
    fake = fake_civitai
    # throttle: room to stall the second request; sidecars off: this is about hashes and answers
    root = setup_folder(tmp_path, fake, throttle=1.5, sidecars=False)
    n = 130
    for i in range(n):
        fake.add_model(1000 + i, name=f"Lora {i}", type="LORA", versions=[dict(id=2000 + i, files=[
            dict(id=3000 + i, name=f"lora{i}.safetensors", primary=True, size_bytes=KiB + i)])])
        write(root / f"Lora/lora{i}.safetensors", fake.file_bytes(3000 + i))
    proc = subprocess.Popen(command(tmp_path), cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: len(by_hash_bodies(fake)) == 1, 60, message="the first by-hash request")
        fake.set_api_fault(r"/model-versions/by-hash", "stall", delay_s=60)
        wait_until(lambda: len(fake.requests_to("api", path_re="/model-versions/by-hash")) == 2, 30,
                   message="the second by-hash request")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert json.loads((tmp_path / "manifest.json").read_text()) == []  # valid, and untouched
    before = recorded_files(tmp_path)
    assert len(before) == n  # every hash was kept as it came
    answered = db_rows(tmp_path, "SELECT COUNT(*) FROM kv WHERE key LIKE 'library.byhash.%'")[0][0]
    assert answered == 100  # the first batch's answers were kept

    fake.clear_faults()
    fake.clear_requests()
    out = run_import(tmp_path)
    assert out.returncode == 0, out.stderr
    assert recorded_files(tmp_path) == before  # nothing hashed again
    assert [len(b) for b in by_hash_bodies(fake)] == [n - 100]  # only what was not answered yet
    entries = json.loads((tmp_path / "manifest.json").read_text())
    assert sorted(e["fileId"] for e in entries) == list(range(3000, 3000 + n))


def test_kill_9_while_hashing_then_a_rerun_hashes_only_the_rest(fake_civitai, tmp_path):
    root = setup_folder(tmp_path, fake_civitai)
    n = 64
    for i in range(n):  # sparse: hashing costs the CPU what real files do, the disk nothing
        path = root / f"checkpoints/big{i:02d}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            fh.truncate(32 * MiB + i)
    proc = subprocess.Popen(command(tmp_path), cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: recorded_files(tmp_path), 60, interval=0.005, message="the first hash recorded")
        os.kill(proc.pid, signal.SIGSTOP)
        at_kill = recorded_files(tmp_path)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert 0 < len(at_kill) < n, f"{len(at_kill)} of {n} files were hashed before the kill"
    assert json.loads((tmp_path / "manifest.json").read_text()) == []
    out = run_import(tmp_path)
    assert out.returncode == 0, out.stderr
    after = recorded_files(tmp_path)
    assert len(after) == n and all(after[path] == stamp for path, stamp in at_kill.items())
    assert f"{n} model file(s); 0 known on Civitai" in out.stdout
    zeros = hashlib.sha256(b"\0" * (32 * MiB)).hexdigest()
    assert db_rows(tmp_path, "SELECT sha256 FROM files WHERE path = 'checkpoints/big00.safetensors'") == [(zeros,)]


class FakeDaemonAPI(http.server.ThreadingHTTPServer):
    """The two routes of a running daemon the command uses, as the lead implements them."""

    def __init__(self, port: int):
        self.posts: list[dict] = []
        self.polls = 0
        self.auth: set[str] = set()
        super().__init__(("127.0.0.1", port), _ScanHandler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def scan(self) -> dict:
        done = self.polls >= 4
        return {"state": "done" if done else "running", "folder": self.posts[-1]["folder"],
                "dry_run": self.posts[-1]["dry_run"], "files_done": 3 if done else 1, "files_total": 3,
                "bytes_done": 3000 if done else 1000, "bytes_total": 3000, "matched": 2, "added": 2,
                "already_listed": 0, "unknown": ["models/Lora/x.safetensors"], "differs": [],
                "skipped": [], "seconds": 1.0, "error": None}


class _ScanHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _answer(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802
        self.server.auth.add(self.headers.get("Authorization", "")[:7])
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.posts.append(body)
        self._answer(202, {"scan": self.server.scan()})

    def do_GET(self):  # noqa: N802
        self.server.polls += 1
        self._answer(200, {"scan": self.server.scan()})


def test_with_a_daemon_running_the_command_asks_its_api_and_follows_the_scan(fake_civitai, tmp_path):
    port = free_port()
    root = setup_folder(tmp_path, fake_civitai, active_port=port)
    (root / "models/Lora").mkdir(parents=True)
    write(root / "models/Lora/x.safetensors", b"x")
    lock = PidLock(tmp_path / "data" / "daemon.pid")
    assert lock.acquire() is None  # "the daemon" holds data/daemon.pid
    api = FakeDaemonAPI(port)
    try:
        out = run_import(tmp_path, str(root / "models" / "Lora"), "--dry-run")
    finally:
        api.shutdown()
        api.server_close()
        lock.release()
    assert out.returncode == 0, out.stderr
    assert api.posts == [{"folder": "models/Lora", "dry_run": True}] and api.polls >= 4
    assert api.auth == {"Bearer "}
    assert "3 model file(s); 2 known on Civitai; 2 would be added" in out.stdout
    assert fake_civitai.requests == [] and not (tmp_path / "data" / "daemon.db").exists()  # the daemon did it


def test_a_daemon_started_after_an_import_downloads_nothing_and_keeps_the_files_current(fake_civitai, daemon_factory,
                                                                                      tmp_path):
    fake = fake_civitai
    fake.add_model(1, name="Dream", type="Checkpoint", versions=[dict(id=10, published_at=OLD, files=[
        dict(id=101, name="dream.safetensors", primary=True, size_bytes=200 * KiB)])])
    daemon = daemon_factory(base_config(fake, download_dir="webui", jwt_secret=SECRET))
    root = daemon.folder / "webui"
    write(root / "models/Stable-diffusion/renamed dream.safetensors", fake.file_bytes(101))
    out = subprocess.run(daemon.command("import"), cwd=str(REPO), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert [e["fileId"] for e in daemon.read_manifest()] == [101]

    daemon.start()
    wait_until(lambda: (lambda u: u.get("last_success") and not u.get("running"))(
        daemon.api("GET", "/api/status").json()["updater"]), 30, interval=0.2, message="the first update check")
    assert not daemon.events("download_queued") and not fake.requests_to("api", path_re="/api/download/")

    fake.add_version(1, dict(id=11, published_at=NEW, files=[
        dict(id=111, name="dream-v2.safetensors", primary=True, size_bytes=210 * KiB)]))
    wait_until(lambda: daemon.api("POST", "/api/updates/check").status_code == 202, 15, interval=0.2,
               message="the updater to take a check")
    done = daemon.wait_event("download_completed", lambda e: e["version_id"] == 11)
    assert done["path"] == "models/Stable-diffusion/dream-v2.safetensors"  # where the adopted file lives
    assert (root / "models/Stable-diffusion/renamed dream.safetensors").read_bytes() == fake.file_bytes(101)
    entries = wait_until(lambda: (lambda m: m if m[0].get("fileId") == 111 else None)(daemon.read_manifest()), 20,
                         message="the entry replaced by the new version")
    assert entries[0]["model_type"] == "models/Stable-diffusion" and len(entries) == 1
    assert daemon.stop() == 0


def test_an_import_while_another_holds_the_data_folder_says_who(fake_civitai, tmp_path):
    root = setup_folder(tmp_path, fake_civitai, active_port=free_port())
    write(root / "Lora/a.safetensors", b"a")
    lock = PidLock(tmp_path / "data" / "daemon.pid")
    assert lock.acquire() is None
    try:
        out = run_import(tmp_path)
    finally:
        lock.release()
    assert out.returncode == 1 and f"is held by pid {os.getpid()}" in out.stderr, out.stderr
