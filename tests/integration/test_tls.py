"""HTTPS on the LAN: with tls_cert/tls_key the web process serves the GUI, REST and the WebSocket
over TLS (certificates made here, tests/integration/tlskit.py); plain HTTP on that port is sent to https://; a
pair that cannot serve is exit 78 naming the file. Then the whole daemon: its readiness probe,
the login link, and `supervisor.py token`, `add` and `status` over HTTPS."""
from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest
import requests
import websocket

from ipc.control import ENV_ADDR, ENV_TOKEN, ControlServer
from ipc.logsetup import parse_relayed_line
from ipc.store import JobStore
from ipc.tokens import mint_token
from tests.helpers import REPO, Daemon, base_config, free_port, wait_until
from tests.integration.tlskit import make_cert

SECRET = "s" * 40
MiB = 1024 * 1024


class WebProcess:
    """`python -m web` as the supervisor starts it, with a real control socket of our own."""

    def __init__(self, folder, config: dict, *extra: str):
        self.folder = folder
        self.port = free_port()
        (folder / "config.json").write_text(json.dumps({"jwt_secret": SECRET, "active_port": self.port, **config}))
        self.store = JobStore(folder / "data" / "daemon.db")
        self.control = ControlServer("c" * 64, lambda op, args: {}).start()
        env = dict(os.environ, PYTHONUNBUFFERED="1", **{ENV_ADDR: self.control.address, ENV_TOKEN: "c" * 64})
        self.proc = subprocess.Popen([sys.executable, "-m", "web", "--config", str(folder / "config.json"), *extra],
                                     cwd=str(REPO), env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for raw in self.proc.stderr:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def messages(self) -> list[str]:
        return [parse_relayed_line(line)[2] for line in self.lines]

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc.stdin.close()
        self._reader.join(5)
        self.control.close()
        self.store.close()


@pytest.fixture
def web(tmp_path):
    made: list[WebProcess] = []

    def make(config: dict, *extra: str) -> WebProcess:
        made.append(WebProcess(tmp_path, config, *extra))
        return made[-1]

    yield make
    for w in made:
        w.close()


def tls_config(tmp_path) -> dict:
    make_cert(tmp_path / "tls")  # nas.lan, 127.0.0.1, 192.168.1.10
    return {"tls_cert": "tls/server.crt", "tls_key": "tls/server.key"}


def test_gui_rest_and_websocket_are_served_over_tls(tmp_path, web):
    w = web(tls_config(tmp_path))
    cert = str(tmp_path / "tls" / "server.crt")
    base = f"https://127.0.0.1:{w.port}"
    # requests checks the name too: the certificate lists 127.0.0.1 beside nas.lan.
    wait_until(lambda: requests.get(f"{base}/health", verify=cert, timeout=2).status_code == 200, 30,
               message="/health over https")
    job = w.store.add_job(model_id=77, version_id=770, model_type="lora", filename="zxq.safetensors")
    gui = requests.get(f"{base}/gui", verify=cert, timeout=5)
    assert gui.status_code == 200 and "text/html" in gui.headers["Content-Type"]
    token = mint_token(SECRET, days=1)
    jobs = requests.get(f"{base}/api/jobs", headers={"Authorization": f"Bearer {token}"}, verify=cert, timeout=5)
    assert jobs.status_code == 200 and [j["id"] for j in jobs.json()["jobs"]] == [job["id"]]
    assert requests.get(f"{base}/api/jobs", verify=cert, timeout=5).status_code == 401
    # wss:// with the token as the subprotocol, as the GUI's `new WebSocket(url, ["bearer", token])`.
    ws = websocket.create_connection(f"wss://127.0.0.1:{w.port}/ws", subprotocols=["bearer", token],
                                     sslopt={"ca_certs": cert}, timeout=10)
    try:
        snapshot = json.loads(ws.recv())
        assert snapshot["event"] == "snapshot" and [j["id"] for j in snapshot["jobs"]] == [job["id"]]
        live = w.store.add_event("download_started", {"job_id": job["id"], "attempt": 1})
        w.control.publish(live)
        assert json.loads(ws.recv())["id"] == live["id"]
    finally:
        ws.close()
    assert any(f"listening on https://127.0.0.1:{w.port}" in m for m in w.messages()), w.lines
    assert token not in "\n".join(w.lines)


def test_plain_http_on_the_https_port_is_sent_to_https(tmp_path, web):
    w = web(tls_config(tmp_path))
    cert = str(tmp_path / "tls" / "server.crt")
    wait_until(lambda: requests.get(f"https://127.0.0.1:{w.port}/health", verify=cert, timeout=2).ok, 30,
               message="/health over https")
    plain = requests.get(f"http://127.0.0.1:{w.port}/gui?x=1", allow_redirects=False, timeout=5)
    assert plain.status_code == 301 and plain.headers["Location"] == f"https://127.0.0.1:{w.port}/gui?x=1"
    assert "speaks HTTPS only" in plain.json()["error"]
    posted = requests.post(f"http://127.0.0.1:{w.port}/api/jobs", json={"model_id": 1}, allow_redirects=False,
                           timeout=5)
    assert posted.status_code == 400 and f"use https://127.0.0.1:{w.port}/api/jobs" in posted.json()["error"]
    # A client that does not trust us: one log line saying so, and the server goes on serving.
    untrusting = ssl.create_default_context()
    with socket.create_connection(("127.0.0.1", w.port), timeout=5) as raw, pytest.raises(ssl.SSLError):
        untrusting.wrap_socket(raw, server_hostname="nas.lan")
    wait_until(lambda: any("TLS handshake with 127.0.0.1 failed: the client does not trust our certificate" in m
                           for m in w.messages()), 10, message="the handshake's log line")
    assert requests.get(f"https://127.0.0.1:{w.port}/health", verify=cert, timeout=5).ok
    assert not [line for line in w.lines if not line.startswith("@log ")], w.lines  # no traceback on stderr


def test_a_renewed_certificate_is_served_without_a_restart(tmp_path, web):
    w = web(tls_config(tmp_path), "--cert-check-s", "0.2")
    first = (tmp_path / "tls" / "server.crt").read_text()
    wait_until(lambda: requests.get(f"https://127.0.0.1:{w.port}/health", verify=str(tmp_path / "tls" / "server.crt"),
                                    timeout=2).ok, 30, message="/health over https")

    def served() -> str:
        with socket.create_connection(("127.0.0.1", w.port), timeout=5) as raw:
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            with ctx.wrap_socket(raw) as tls:
                return ssl.DER_cert_to_PEM_cert(tls.getpeercert(binary_form=True))

    assert served().split() == first.split()
    make_cert(tmp_path / "tls", name="nas2.lan")  # the same files, a new pair
    second = (tmp_path / "tls" / "server.crt").read_text()
    assert second != first
    wait_until(lambda: served().split() == second.split(), 20, interval=0.2, message="the renewed certificate")
    assert any("reloaded" in m for m in w.messages())
    # A half-written or wrong pair is not taken: the good one stays.
    (tmp_path / "tls" / "server.key").write_text("-----BEGIN PRIVATE KEY-----\ntruncated")
    wait_until(lambda: any("is not taken" in m for m in w.messages()), 20, message="the refusal")
    assert served().split() == second.split()


def test_a_pair_that_cannot_serve_exits_78_naming_the_file(tmp_path):
    make_cert(tmp_path / "tls")
    make_cert(tmp_path / "other", stem="other")
    (tmp_path / "config.json").write_text(json.dumps({"jwt_secret": SECRET, "tls_cert": "tls/server.crt",
                                                      "tls_key": "other/other.key"}))
    out = subprocess.run([sys.executable, "-m", "web", "--config", str(tmp_path / "config.json")], cwd=str(REPO),
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert out.returncode == 78
    assert out.stderr.strip() == (f"{tmp_path / 'config.json'}: key 'tls_key': {tmp_path / 'other' / 'other.key'}: "
                                  f"this key does not belong to the certificate {tmp_path / 'tls' / 'server.crt'}")


# --- the whole daemon (needs supervisor.py's HTTPS probe and login link) ----------------------------


class TLSDaemon(Daemon):
    cert: str = ""

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.stderr()}")
            self.track_pids()
            return requests.get(f"{self.base_url}/health", verify=self.cert, timeout=1).status_code == 200

        wait_until(ready, timeout, interval=0.1, message="the daemon's /health over https")

    def api(self, method: str, path: str, **kw) -> requests.Response:
        headers = kw.pop("headers", {})
        headers.setdefault("Authorization", f"Bearer {self.token()}")
        return requests.request(method, self.base_url + path, headers=headers, timeout=kw.pop("timeout", 10),
                                verify=self.cert, **kw)


@pytest.fixture
def tls_daemon(tmp_path):
    made: list[TLSDaemon] = []

    def make(config: dict, manifest=None) -> TLSDaemon:
        folder = tmp_path / f"d{len(made)}"
        make_cert(folder / "tls")
        daemon = TLSDaemon(folder, {**config, "tls_cert": "tls/server.crt", "tls_key": "tls/server.key"},
                           manifest if manifest is not None else [])
        daemon.cert = str(folder / "tls" / "server.crt")
        made.append(daemon)
        return daemon

    yield make
    for d in made:
        d.cleanup()


def run_cli(daemon, *args):
    return subprocess.run([sys.executable, str(REPO / "supervisor.py"), *args, "--config", str(daemon.config_path)],
                          cwd=str(REPO), capture_output=True, text=True, timeout=60)


def test_the_daemon_serves_https_and_its_command_line_follows(fake_civitai, tls_daemon):
    fake_civitai.add_model(77, name="Zxq Ink Style", type="LORA", versions=[
        dict(id=770, name="v2", published_at="2024-05-01T00:00:00.000Z",
             files=[dict(id=7700, name="zxq.safetensors", size_bytes=1 * MiB, primary=True)])])
    daemon = tls_daemon(base_config(fake_civitai))
    daemon.start()  # ready only once the supervisor's own probe got /health over TLS
    wait_until(lambda: "civitai-daemon: open https://" in daemon.stderr(), 10, message="the login link")
    assert f"open https://127.0.0.1:{daemon.port}/gui#token=" in daemon.stderr()
    assert "#token=" not in daemon.log_text() and f"GUI at https://127.0.0.1:{daemon.port}/gui" in daemon.log_text()
    status = {c["name"]: c["state"] for c in daemon.api("GET", "/api/status").json()["children"]}
    assert status["web"] == "running"
    token = run_cli(daemon, "token", "--days", "1")
    assert token.returncode == 0 and token.stdout.count(".") == 2
    added = run_cli(daemon, "add", "v:770")
    assert added.returncode == 0 and added.stdout.startswith("queued #"), added.stderr
    done = daemon.wait_event("download_completed")
    assert done["path"] == "lora/zxq.safetensors"
    shown = run_cli(daemon, "status")
    assert shown.returncode == 0 and f"on https://127.0.0.1:{daemon.port}" in shown.stdout, shown.stderr
    ws = websocket.create_connection(f"wss://127.0.0.1:{daemon.port}/ws", subprotocols=["bearer", daemon.token()],
                                     sslopt={"ca_certs": daemon.cert}, timeout=10)
    try:
        assert json.loads(ws.recv())["event"] == "snapshot"
    finally:
        ws.close()
    assert daemon.stop() == 0


def test_a_mismatched_pair_stops_the_daemon_at_start_with_78(tmp_path, fake_civitai):
    folder = tmp_path / "d"
    make_cert(folder / "tls")
    make_cert(folder / "other", stem="other")
    daemon = Daemon(folder, {**base_config(fake_civitai), "tls_cert": "tls/server.crt", "tls_key": "other/other.key"},
                    [])
    started = time.monotonic()
    try:
        daemon.start(wait_ready=False)
        code = daemon.proc.wait(30)
    finally:
        daemon.cleanup()
    assert code == 78 and time.monotonic() - started < 20
    lines = [line for line in daemon.stderr().splitlines() if line.strip()]
    assert lines == [f"{daemon.config_path}: key 'tls_key': {folder / 'other' / 'other.key'}: this key does not "
                     f"belong to the certificate {folder / 'tls' / 'server.crt'}"]
    assert not (folder / "data" / "daemon.db").exists()  # refused before anything started
    checked = subprocess.run([sys.executable, str(REPO / "supervisor.py"), "check", "--config",
                              str(daemon.config_path)], cwd=str(REPO), capture_output=True, text=True, timeout=60)
    assert checked.returncode == 78 and "key 'tls_key'" in checked.stderr
