"""Test harness: the real daemon as a process tree in a temporary folder, and polling helpers."""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def names_besides_sidecars(folder) -> list[str]:
    """The sorted names in `folder` without the sidecars (`<stem>.civitai.info`, `<stem>.preview.<ext>`)
    that are written beside each verified file (the preview a moment after it, on a thread)."""
    from ipc.naming import SIDECAR_INFO_SUFFIX, SIDECAR_PREVIEW_INFIX
    return sorted(p.name for p in Path(folder).iterdir()
                  if not p.name.endswith(SIDECAR_INFO_SUFFIX) and SIDECAR_PREVIEW_INFIX not in p.name)


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 49152, 65535  # the IANA range: Windows' and the BSDs' default


def free_port() -> int:
    """A free port for a daemon to listen on later. Not one from bind(port 0): that comes from
    the kernel's ephemeral range, from which the kernel also gives ports to every outgoing
    connection and every other bind(0) (the daemon's own control socket) in the seconds before
    the daemon listens. A port below the range is only ever taken by someone asking for it."""
    lo, hi = _ephemeral_range()
    below = (20000, lo - 1) if lo > 21000 else None
    if below is None and hi < 64000:
        below = (hi + 1, 65535)
    rng = random.Random()
    for _ in range(50) if below else ():
        port = rng.randint(*below)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05, message: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail with `message` after `timeout`."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # keep polling; show the last error on timeout
            last_exc = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}"
                                 + (f" (last error: {last_exc!r})" if last_exc else ""))
        time.sleep(interval)


def descendants(pid: int) -> list[int]:
    """All processes below `pid` (Linux /proc), children first."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().decode("utf-8", "replace")
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents[int(entry)] = ppid
    out, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == current]
        out.extend(kids)
        frontier.extend(kids)
    return out


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().decode().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return False


def process_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


class Daemon:
    """supervisor.py in `folder` with its own config.json and manifest.json."""

    def __init__(self, folder: Path, config: dict | str, manifest: list | str | None = None, env: dict | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config_path = self.folder / "config.json"
        if isinstance(config, str):
            self.config_path.write_text(config)
            self.config = {}
        else:
            self.config = dict(config)
            self.config.setdefault("active_port", free_port())
            self.config_path.write_text(json.dumps(self.config, indent=2))
        self.manifest_path = self.folder / "manifest.json"
        if manifest is not None:
            self.write_manifest(manifest)
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.stderr_path = self.folder / "daemon.stderr"
        self._store = None
        self._token = None
        self._all_pids: set[int] = set()

    # --- files ---
    def write_manifest(self, manifest) -> None:
        text = manifest if isinstance(manifest, str) else json.dumps(manifest, indent=2)
        self.manifest_path.write_text(text)

    def read_manifest(self) -> list:
        return json.loads(self.manifest_path.read_text())

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def port(self) -> int:
        return int(self.config.get("active_port", 8000))

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- process ---
    def command(self, *args: str) -> list[str]:
        return [sys.executable, str(REPO / "supervisor.py"), *args, "--config", str(self.config_path)]

    def start(self, wait_ready: bool = True, timeout: float = 30.0) -> Daemon:
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        env.pop("CIVITAI_API_KEY", None)
        env.pop("CIVITAI_JWT_SECRET", None)
        if self.env:
            env.update(self.env)
        # The child keeps its own copy of the handle: ours is closed at once, so a restart does
        # not leak one per start().
        with open(self.stderr_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), cwd=str(REPO), env=env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.stderr()}")
            self.track_pids()
            return requests.get(f"{self.base_url}/health", timeout=1).status_code == 200

        wait_until(ready, timeout, interval=0.1, message="the daemon's /health")

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_text(self) -> str:
        try:
            return (self.data_dir / "logs" / "daemon.log").read_text(errors="replace")
        except OSError:
            return ""

    def track_pids(self) -> list[int]:
        pids = descendants(self.proc.pid) if self.proc else []
        self._all_pids.update(pids)
        return pids

    def children(self) -> dict[str, int]:
        """Child name -> pid, from the supervisor's status (workers, updater, web)."""
        status = self.api("GET", "/api/status").json()
        return {c["name"]: c["pid"] for c in status["children"] if c.get("pid")}

    def stop(self, sig=signal.SIGTERM, timeout: float = 25.0) -> int:
        if self.proc is None:
            return 0
        self.track_pids()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        finally:
            self.cleanup()
        return code

    def kill_tree(self) -> None:
        """kill -9 of everything: the supervisor and every process below it."""
        if self.proc is None:
            return
        pids = [self.proc.pid, *self.track_pids()]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)
        wait_until(lambda: not any(pid_alive(p) for p in pids), 10, message="the killed tree to be gone")
        self.cleanup(kill=False)

    def cleanup(self, kill: bool = True) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if kill:
            for pid in list(self._all_pids):
                if pid_alive(pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        if self._store is not None:
            self._store.close()
            self._store = None

    # --- state ---
    @property
    def store(self):
        from ipc.store import JobStore

        if self._store is None:
            wait_until(lambda: (self.data_dir / "daemon.db").exists(), 20, message="daemon.db")
            self._store = JobStore(self.data_dir / "daemon.db", readonly=True)
        return self._store

    def jobs(self, **kw) -> list[dict]:
        return self.store.list_jobs(limit=10_000, **kw)

    def job(self, job_id: int) -> dict | None:
        return self.store.get_job(job_id)

    def events(self, name: str | None = None) -> list[dict]:
        events = self.store.events_after(0, limit=100_000)
        return [e for e in events if name is None or e["event"] == name]

    def wait_event(self, name: str, predicate=lambda e: True, timeout: float = 30.0) -> dict:
        def find():
            return next((e for e in self.events(name) if predicate(e)), None)

        return wait_until(find, timeout, interval=0.1, message=f"event {name}")

    def wait_job_state(self, job_id: int, state: str, timeout: float = 30.0) -> dict:
        def check():
            job = self.job(job_id)
            return job if job and job["state"] == state else None

        return wait_until(check, timeout, interval=0.1, message=f"job {job_id} to be {state} "
                          f"(now {self.job(job_id)})")

    # --- API ---
    def token(self) -> str:
        if self._token is None:
            out = subprocess.run(self.command("token"), cwd=str(REPO), capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            self._token = out.stdout.strip()
        return self._token

    def api(self, method: str, path: str, **kw) -> requests.Response:
        headers = kw.pop("headers", {})
        headers.setdefault("Authorization", f"Bearer {self.token()}")
        return requests.request(method, self.base_url + path, headers=headers, timeout=kw.pop("timeout", 10), **kw)


def base_config(fake, **overrides) -> dict:
    config = {"civitai_url": fake.api_url, "throttle": 0, "workers": 2, "timeout": 60, "retries": 3,
              "update_time": "04:00"}
    config.update(overrides)
    return config
