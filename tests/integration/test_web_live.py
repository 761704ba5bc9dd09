"""The web process in the real daemon, against the fake Civitai: REST, the WebSocket feed, cancel."""
from __future__ import annotations

import json
import time

import pytest
import requests
import websocket

from tests.helpers import base_config, sha256_file, wait_until

MiB = 1024 * 1024
CANCEL_WITHIN_S = 2.0  # SPEC 6: a running download stops within 2 s of DELETE /api/jobs/<id>


def add_model(fake, model_id, version_id, file_id, size=MiB, name=None, bps=None):
    fake.add_model(model_id, name=f"Model {model_id}", type="Checkpoint", versions=[
        dict(id=version_id, published_at="2024-01-01T00:00:00.000Z",
             files=[dict(id=file_id, name=name or f"m{model_id}.safetensors", size_bytes=size, seed=model_id,
                         primary=True)]),
    ])
    if bps:
        fake.set_fault(file_id, "drip", bps=bps)


class Feed:
    """A WebSocket client of /ws that keeps every message it got."""

    def __init__(self, daemon, after: int | None = None, **kw):
        query = f"?after={after}" if after is not None else ""
        kw.setdefault("subprotocols", ["bearer", daemon.token()])
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{daemon.port}/ws{query}", timeout=10, **kw)
        self.messages: list[dict] = []
        self.arrivals: list[float] = []

    def next(self, timeout: float = 10.0) -> dict:
        self.ws.settimeout(timeout)
        message = json.loads(self.ws.recv())
        self.messages.append(message)
        self.arrivals.append(time.monotonic())
        return message

    def until(self, predicate, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching message in {timeout} s; got {[m.get('event') for m in self.messages]}")
            message = self.next(left)
            if predicate(message):
                return message

    def close(self):
        self.ws.close()


def workers_by_name(daemon) -> dict[str, tuple[int, int]]:
    """Each worker's (pid, restarts), from /api/status."""
    children = daemon.api("GET", "/api/status").json()["children"]
    return {c["name"]: (c["pid"], c["restarts"]) for c in children if c["kind"] == "worker"}


def let_go_by_itself(daemon, job_id: int, before: dict, asked: float) -> None:
    """The worker that held `job_id` let go of it within the SPEC's 2 s (+1 s for the poll), as
    the same process: the supervisor's kill of a worker that does not let go (2 s after the
    cancel) would also free the job, and must not be what a test of the cancel sees."""
    def worker_let_go():
        children = daemon.api("GET", "/api/status").json()["children"]
        return all(c.get("job_id") != job_id for c in children if c["kind"] == "worker")

    wait_until(worker_let_go, max(0.1, asked + CANCEL_WITHIN_S + 1.0 - time.monotonic()), interval=0.05,
               message="the worker to let go of the cancelled job")
    assert time.monotonic() - asked <= CANCEL_WITHIN_S + 1.0
    assert workers_by_name(daemon) == before, "a worker was stopped instead of letting go of its job"
    assert "did not stop within" not in daemon.log_text()


@pytest.fixture
def daemon(fake_civitai, daemon_factory):
    d = daemon_factory(base_config(fake_civitai, workers=2))
    d.start()
    return d


def test_job_added_by_rest_is_followed_over_websocket_to_completion(fake_civitai, daemon):
    add_model(fake_civitai, 100, 1000, 5000, size=2 * MiB, name="a.safetensors", bps=1 * MiB)
    feed = Feed(daemon)
    try:
        snapshot = feed.next()
        assert snapshot["event"] == "snapshot" and isinstance(snapshot["jobs"], list)
        assert feed.ws.getsubprotocol() == "bearer"

        res = daemon.api("POST", "/api/jobs", json={"url": "https://civitai.com/models/100/some-slug"})
        assert res.status_code == 201, res.text
        job = res.json()["job"]
        assert job["state"] == "queued" and job["model_id"] == 100

        done = feed.until(lambda m: m.get("event") == "download_completed" and m.get("job_id") == job["id"], 40)
        assert done["filename"] == "a.safetensors" and done["path"] == "checkpoint/a.safetensors"
        assert done["sha256"] == fake_civitai.file_sha256(5000).lower()
        names = [m["event"] for m in feed.messages if m.get("job_id") == job["id"]]
        assert names[0] == "download_queued" and "download_started" in names and "download_progress" in names
        stored = [m["id"] for m in feed.messages[1:] if "id" in m]
        assert stored == sorted(set(stored)), "stored events arrive in order, once"
        # download_progress: at most 4 a second for the job (a little slack for network jitter).
        times = [t for m, t in zip(feed.messages, feed.arrivals) if m["event"] == "download_progress"]
        for i in range(len(times) - 4):
            assert times[i + 4] - times[i] >= 0.9, "more than 4 progress updates in a second"
        assert (daemon.models_dir / "checkpoint" / "a.safetensors").stat().st_size == 2 * MiB

        assert daemon.api("GET", f"/api/jobs/{job['id']}").json()["job"]["state"] == "done"
        wait_until(lambda: any(e.get("modelId") == 100 for e in daemon.read_manifest()), 15,
                   message="the REST-added model to enter manifest.json")
    finally:
        feed.close()


def test_queuing_the_same_file_twice_returns_the_running_job(fake_civitai, daemon):
    add_model(fake_civitai, 200, 2000, 6000, size=2 * MiB, bps=256 * 1024)
    first = daemon.api("POST", "/api/jobs", json={"version_id": 2000})
    again = daemon.api("POST", "/api/jobs", json={"url": "https://civitai.com/models/200?modelVersionId=2000"})
    assert (first.status_code, again.status_code) == (201, 200), (first.text, again.text)
    assert first.json()["job"]["id"] == again.json()["job"]["id"]
    daemon.api("DELETE", f"/api/jobs/{first.json()['job']['id']}")


def test_cancel_stops_a_running_download_within_two_seconds(fake_civitai, daemon):
    add_model(fake_civitai, 300, 3000, 7000, size=8 * MiB, name="slow.safetensors", bps=256 * 1024)
    feed = Feed(daemon)
    try:
        feed.next()
        job = daemon.api("POST", "/api/jobs", json={"model_id": 300}).json()["job"]
        feed.until(lambda m: m.get("event") == "download_progress" and m.get("job_id") == job["id"], 30)
        before = workers_by_name(daemon)
        asked = time.monotonic()
        res = daemon.api("DELETE", f"/api/jobs/{job['id']}")
        assert res.status_code == 200 and res.json()["job"]["state"] == "cancelled"
        feed.until(lambda m: m.get("event") == "download_cancelled" and m.get("job_id") == job["id"], 5)
        # Once no worker holds the job, the supervisor drops any late message about it: its
        # bytes_done cannot change any more.
        let_go_by_itself(daemon, job["id"], before, asked)
        stopped_at = daemon.job(job["id"])["bytes_done"]
        assert 0 < stopped_at < 8 * MiB and daemon.job(job["id"])["state"] == "cancelled"
        assert not (daemon.models_dir / "checkpoint" / "slow.safetensors").exists()
        again = daemon.api("POST", f"/api/jobs/{job['id']}/retry")
        assert again.status_code == 200 and again.json()["job"]["state"] == "queued"
        daemon.api("DELETE", f"/api/jobs/{job['id']}")
    finally:
        feed.close()


@pytest.mark.parametrize("stalled", ["metadata", "download endpoint"])
def test_cancel_while_the_worker_waits_on_civitai_stops_it_and_a_retry_downloads(fake_civitai, daemon, stalled):
    """A cancel that comes before the job's file is known (its worker still waits on Civitai,
    its `ack` and `resolved` perhaps not even sent yet) ends the job all the same, within the
    SPEC's 2 s, leaves no file and no partial, and a retry then downloads the file."""
    add_model(fake_civitai, 500, 5000, 9000, size=256 * 1024, name="late.safetensors")
    path = r"^/api/v1/models/500(\?|$)" if stalled == "metadata" else r"^/api/download/models/5000(\?|$)"
    fake_civitai.set_api_fault(path, "stall", delay_s=60, times=1)
    job = daemon.api("POST", "/api/jobs", json={"model_id": 500}).json()["job"]
    wait_until(lambda: fake_civitai.requests_to("api", path), 30, message=f"the worker to ask for the {stalled}")
    before = workers_by_name(daemon)
    asked = time.monotonic()
    res = daemon.api("DELETE", f"/api/jobs/{job['id']}")
    assert res.status_code == 200 and res.json()["job"]["state"] == "cancelled", res.text
    let_go_by_itself(daemon, job["id"], before, asked)
    folder = daemon.models_dir / "checkpoint"
    assert daemon.job(job["id"])["state"] == "cancelled"
    assert not folder.exists() or [p.name for p in folder.iterdir()] == []
    again = daemon.api("POST", f"/api/jobs/{job['id']}/retry")
    assert again.status_code == 200 and again.json()["job"]["state"] == "queued", again.text
    wait_until(lambda: daemon.job(job["id"])["state"] == "done", 30, message="the retry")
    assert sha256_file(folder / "late.safetensors") == fake_civitai.file_sha256(9000).lower()


def test_reconnect_with_after_replays_missed_events_without_gap_or_duplicate(fake_civitai, daemon):
    add_model(fake_civitai, 400, 4000, 8000, size=256 * 1024)
    add_model(fake_civitai, 401, 4010, 8010, size=256 * 1024)
    feed = Feed(daemon)
    first = daemon.api("POST", "/api/jobs", json={"model_id": 400}).json()["job"]
    feed.next()
    seen = feed.until(lambda m: m.get("event") == "download_completed" and m.get("job_id") == first["id"], 30)
    feed.close()

    second = daemon.api("POST", "/api/jobs", json={"model_id": 401}).json()["job"]
    daemon.wait_job_state(second["id"], "done", 30)
    missed = [e for e in daemon.events() if e["id"] > seen["id"]]
    assert any(e["event"] == "download_completed" for e in missed)

    feed = Feed(daemon, after=seen["id"])
    try:
        snapshot = feed.next()
        assert snapshot["event"] == "snapshot" and snapshot["last_id"] >= missed[-1]["id"]
        replay = [feed.next()["id"] for _ in missed]
        assert replay == [e["id"] for e in missed]
        # Then live, continuing the same sequence.
        add_model(fake_civitai, 402, 4020, 8020, size=128 * 1024)
        third = daemon.api("POST", "/api/jobs", json={"model_id": 402}).json()["job"]
        live = feed.until(lambda m: m.get("event") == "download_queued" and m.get("job_id") == third["id"], 10)
        stored = [m["id"] for m in feed.messages[1:] if "id" in m]
        assert stored == sorted(set(stored)) and stored[0] == seen["id"] + 1 and live["id"] == stored[-1]
    finally:
        feed.close()


def test_handshake_without_a_valid_token_is_refused_and_tokens_never_logged(daemon):
    url = f"ws://127.0.0.1:{daemon.port}/ws"
    for kw in ({}, {"subprotocols": ["bearer", "not-a-token"]}, {"header": ["Authorization: Bearer x.y.z"]}):
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            websocket.create_connection(url, timeout=5, **kw)
        assert refused.value.status_code == 401
    with pytest.raises(websocket.WebSocketBadStatusException) as foreign:
        websocket.create_connection(url, timeout=5, subprotocols=["bearer", daemon.token()], host="evil.example")
    assert foreign.value.status_code == 403
    by_header = websocket.create_connection(url, timeout=5, header=[f"Authorization: Bearer {daemon.token()}"])
    assert json.loads(by_header.recv())["event"] == "snapshot"
    by_header.close()
    # A token pasted into a URL is neither accepted nor written to the access log.
    assert requests.get(f"{daemon.base_url}/api/jobs?token={daemon.token()}", timeout=5).status_code == 401
    assert daemon.api("GET", "/api/jobs").status_code == 200
    wait_until(lambda: "/api/jobs?token=***" in daemon.log_text(), 10, message="the access log line")
    assert daemon.token() not in daemon.log_text()
    assert daemon.token() not in daemon.stderr().replace(f"#token={daemon.token()}", "")


def test_rest_errors_and_metrics_against_the_real_daemon(daemon):
    assert requests.get(f"{daemon.base_url}/api/jobs", timeout=5).status_code == 401
    assert requests.get(f"{daemon.base_url}/api/jobs", headers={"Host": "evil.example"}, timeout=5).status_code == 403
    big = daemon.api("POST", "/api/jobs", data=b"{" + b" " * (MiB + 10) + b"}",
                     headers={"Content-Type": "application/json"})
    assert big.status_code == 413 and big.json()["error"]
    assert daemon.api("GET", "/api/jobs/123456").status_code == 404
    assert daemon.api("POST", "/api/jobs/123456/retry").status_code == 404
    for method in ("GET", "DELETE"):  # past SQLite's integers: still a 404, never a 500
        huge = daemon.api(method, f"/api/jobs/{2**64}")
        assert huge.status_code == 404 and str(2**64) in huge.json()["error"]
    assert daemon.api("PATCH", f"/api/jobs/{10**30}", json={"priority": 1}).status_code == 404
    deep = daemon.api("POST", "/api/jobs", data=b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                      headers={"Content-Type": "application/json"})
    assert deep.status_code == 400 and "nested" in deep.json()["error"]
    big_header = daemon.api("GET", "/api/jobs", headers={"X-Padding": "a" * 100_000})
    assert big_header.status_code == 431 and "65536" in big_header.json()["error"]
    status = daemon.api("GET", "/api/status").json()
    assert {c["kind"] for c in status["children"]} >= {"worker", "updater", "web"}
    text = daemon.api("GET", "/metrics").text
    assert "civitai_supervisor_up 1" in text and 'civitai_jobs{state="queued"}' in text
    assert daemon.api("GET", "/openapi.json").json()["openapi"].startswith("3.")


def test_a_killed_web_process_comes_back_and_clients_catch_up(fake_civitai, daemon):
    import os
    import signal

    add_model(fake_civitai, 600, 6000, 60000, size=128 * 1024)
    feed = Feed(daemon)
    last_id = feed.next()["last_id"]
    feed.close()
    web_pid = daemon.children()["web"]
    os.kill(web_pid, signal.SIGKILL)
    # While the web process is down, the daemon goes on: a manifest edit queues a download.
    daemon.write_manifest([{"modelId": 600, "model_type": "checkpoint"}])
    wait_until(lambda: any(e["event"] == "download_completed" for e in daemon.events()), 30,
               message="the download while the web process is away")
    wait_until(lambda: requests.get(f"{daemon.base_url}/health", timeout=1).ok, 20, message="the web process back")
    assert daemon.children()["web"] != web_pid
    feed = Feed(daemon, after=last_id)
    try:
        feed.next()
        missed = [e["id"] for e in daemon.events() if e["id"] > last_id]
        assert [feed.next()["id"] for _ in missed] == missed
    finally:
        feed.close()


def test_clients_get_a_going_away_close_frame_when_the_daemon_stops(daemon):
    import signal

    feed = Feed(daemon)
    feed.next()
    daemon.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        opcode, data = feed.ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            assert int.from_bytes(data[:2], "big") == 1001
            break
    else:
        raise AssertionError("no close frame")
    assert daemon.proc.wait(20) == 0
