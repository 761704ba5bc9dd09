"""Web process figures against the real daemon while two downloads run.

    uv run python bench/web.py [--requests 4000] [--clients 20] [--ws-clients 100] [--events 30]
    uv run python bench/web.py --latency [--sequential 200]

1. p50/p99 latency of `GET /api/jobs` with 1,000 jobs in the store, from 20 concurrent clients.
2. The time for one event to reach each of 100 connected WebSocket clients.
3. (`--latency`, on its own) the median of 200 sequential GETs of /health and of an authed
   /api/status on one kept-alive connection and on a new connection each, with curl reusing one
   connection as the peer: a kept-alive request that is much slower than a new one is Nagle's
   algorithm meeting delayed ACKs on the server's socket.

Everything runs on 127.0.0.1 (the fake Civitai and the daemon in a temporary folder) and stops by
itself. Results are printed and written to bench/out/web.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import requests  # noqa: E402
import websocket  # noqa: E402

from ipc.store import JobStore  # noqa: E402
from tests.fakeciv import FakeCivitai  # noqa: E402
from tests.helpers import Daemon, base_config, wait_until  # noqa: E402

MiB = 1024 * 1024


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1)))))
    return ordered[k]


def seed_store(db_path: Path, n_jobs: int, n_spare: int) -> list[int]:
    """Fill the job store before the daemon starts: finished jobs for the list, plus cancelled ones
    the event benchmark re-queues and cancels (each is one event)."""
    store = JobStore(db_path)
    states = ["done", "done", "done", "failed", "cancelled"]
    for i in range(n_jobs - n_spare):
        job = store.add_job(model_id=900_000 + i, version_id=9_000_000 + i, file_id=90_000_000 + i,
                            model_type="checkpoint", filename=f"bench-{i}.safetensors", bytes_total=123_456_789,
                            source="api")
        state = states[i % len(states)]
        if state == "done":
            store.update_job(job["id"], state="downloading")
        store.update_job(job["id"], state=state, error="Not found on Civitai (404)" if state == "failed" else None,
                         reason="not_found" if state == "failed" else None)
    spare = []
    for i in range(n_spare):
        job = store.add_job(model_id=800_000 + i, version_id=8_000_000 + i, file_id=80_000_000 + i,
                            model_type="checkpoint", filename=f"spare-{i}.safetensors", source="api")
        store.update_job(job["id"], state="cancelled")
        spare.append(job["id"])
    store.close()
    return spare


def bench_rest(daemon: Daemon, total: int, clients: int, path: str) -> dict:
    headers = {"Authorization": f"Bearer {daemon.token()}"}
    url = daemon.base_url + path
    per_client = total // clients
    latencies: list[float] = []
    lock = threading.Lock()

    def run(_):
        mine = []
        with requests.Session() as session:
            session.get(url, headers=headers, timeout=10).raise_for_status()  # warm the connection
            for _ in range(per_client):
                started = time.perf_counter()
                res = session.get(url, headers=headers, timeout=10)
                mine.append(time.perf_counter() - started)
                res.raise_for_status()
        with lock:
            latencies.extend(mine)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(run, range(clients)))
    elapsed = time.perf_counter() - started
    size = len(requests.get(url, headers=headers, timeout=10).content)
    return {
        "path": path, "clients": clients, "requests": len(latencies), "response_bytes": size,
        "p50_ms": round(percentile(latencies, 50) * 1000, 2), "p90_ms": round(percentile(latencies, 90) * 1000, 2),
        "p99_ms": round(percentile(latencies, 99) * 1000, 2), "max_ms": round(max(latencies) * 1000, 2),
        "requests_per_s": round(len(latencies) / elapsed, 1),
    }


class Listener(threading.Thread):
    """One WebSocket client; records when each stored event id arrived."""

    def __init__(self, daemon: Daemon):
        super().__init__(daemon=True)
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{daemon.port}/ws",
                                              subprotocols=["bearer", daemon.token()], timeout=30)
        self.snapshot = json.loads(self.ws.recv())
        self.arrivals: dict[int, float] = {}
        self.stop = False

    def run(self):
        while not self.stop:
            try:
                message = json.loads(self.ws.recv())
            except Exception:
                return
            if "id" in message:
                self.arrivals[message["id"]] = time.perf_counter()


def bench_fanout(daemon: Daemon, n_clients: int, spare: list[int], n_events: int) -> dict:
    listeners = [Listener(daemon) for _ in range(n_clients)]
    for listener in listeners:
        listener.start()
    wait_until(lambda: daemon.api("GET", "/api/status").json()["web"]["websocket_clients"] >= n_clients, 10,
               message="all WebSocket clients registered")
    per_event_all, per_client = [], []
    try:
        for i in range(n_events):
            job_id = spare[i // 2]
            last_before = daemon.store.last_event_id()
            sent = time.perf_counter()
            if i % 2 == 0:
                res = daemon.api("POST", f"/api/jobs/{job_id}/retry")  # -> download_queued
            else:
                res = daemon.api("DELETE", f"/api/jobs/{job_id}")  # -> download_cancelled
            res.raise_for_status()
            event = wait_until(lambda after=last_before, job=job_id: next(
                (e for e in daemon.store.events_after(after, 10) if e.get("job_id") == job), None),
                10, interval=0.005, message="the event in the store")
            wait_until(lambda event_id=event["id"]: all(event_id in lst.arrivals for lst in listeners), 10,
                       interval=0.002, message=f"event {event['id']} at every client")
            times = [lst.arrivals[event["id"]] - sent for lst in listeners]
            per_client.extend(times)
            per_event_all.append(max(times))
            time.sleep(0.05)
    finally:
        for listener in listeners:
            listener.stop = True
            try:
                listener.ws.close()
            except Exception:
                pass
    return {
        "clients": n_clients, "events": n_events,
        "note": "from the REST call that causes the event to its arrival at a client (REST + supervisor + fan-out)",
        "all_clients_p50_ms": round(statistics.median(per_event_all) * 1000, 2),
        "all_clients_max_ms": round(max(per_event_all) * 1000, 2),
        "per_client_p50_ms": round(percentile(per_client, 50) * 1000, 2),
        "per_client_p99_ms": round(percentile(per_client, 99) * 1000, 2),
    }


def _latency_summary(latencies: list[float]) -> dict:
    return {"requests": len(latencies), "p50_ms": round(statistics.median(latencies) * 1000, 2),
            "p90_ms": round(percentile(latencies, 90) * 1000, 2), "max_ms": round(max(latencies) * 1000, 2)}


def curl_keepalive(url: str, headers: dict, n: int, folder: Path) -> dict | None:
    """curl fetching `url` n times over one reused connection (a config file, so the token is not
    on a command line). None when curl is not installed."""
    curl = shutil.which("curl")
    if curl is None:
        return None
    config = folder / "curl-latency.cfg"
    lines = [f'header = "{k}: {v}"' for k, v in headers.items()]
    lines += ['write-out = "\\n@@%{time_total} %{num_connects}\\n"', "silent"]
    lines += [f'url = "{url}"', f'output = "{os.devnull}"'] * (n + 1)
    config.write_text("\n".join(lines) + "\n")
    try:
        out = subprocess.run([curl, "-K", str(config)], capture_output=True, text=True, timeout=120).stdout
    finally:
        config.unlink()
    rows = [line[2:].split() for line in out.splitlines() if line.startswith("@@")]
    times = [float(t) for t, _ in rows[1:]]  # the first transfer opens the connection
    return {**_latency_summary(times), "connections_opened": sum(int(c) for _, c in rows)}


def bench_sequential(daemon: Daemon, n: int, folder: Path) -> dict:
    """n sequential GETs, kept alive on one requests.Session and on a new connection each."""
    auth = {"Authorization": f"Bearer {daemon.token()}"}
    out: dict = {}
    for path, headers in (("/health", {}), ("/api/status", auth)):
        url = daemon.base_url + path
        kept, fresh = [], []
        with requests.Session() as session:
            session.get(url, headers=headers, timeout=10).raise_for_status()
            for _ in range(n):
                started = time.perf_counter()
                session.get(url, headers=headers, timeout=10).raise_for_status()
                kept.append(time.perf_counter() - started)
        for _ in range(n):
            started = time.perf_counter()
            with requests.Session() as session:  # a new TCP connection for each request
                session.get(url, headers={**headers, "Connection": "close"}, timeout=10).raise_for_status()
            fresh.append(time.perf_counter() - started)
        row = {"keepalive": _latency_summary(kept), "new_connection": _latency_summary(fresh)}
        row["keepalive_over_new_connection"] = round(row["keepalive"]["p50_ms"] / row["new_connection"]["p50_ms"], 2)
        peer = curl_keepalive(url, headers, n, folder)
        if peer is not None:
            row["curl_keepalive"] = peer
            row["keepalive_over_curl_keepalive"] = round(row["keepalive"]["p50_ms"] / max(peer["p50_ms"], 0.001), 2)
        out[path] = row
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--ws-clients", type=int, default=100)
    parser.add_argument("--events", type=int, default=30)
    parser.add_argument("--latency", action="store_true",
                        help="only the sequential kept-alive / new-connection latency figures")
    parser.add_argument("--sequential", type=int, default=200, help="requests per case with --latency")
    args = parser.parse_args(argv)
    if args.latency:
        return main_latency(args)

    fake = FakeCivitai()
    folder = Path(tempfile.mkdtemp(prefix="bench-web-"))
    daemon = Daemon(folder, base_config(fake, workers=2), [])
    spare = seed_store(folder / "data" / "daemon.db", args.jobs - 2, (args.events + 1) // 2)
    results: dict = {}
    try:
        for n in (1, 2):  # two downloads that run through the whole benchmark
            fake.add_model(n, name=f"Big {n}", type="Checkpoint", versions=[dict(
                id=10 + n, published_at="2024-01-01T00:00:00.000Z",
                files=[dict(id=100 + n, name=f"big-{n}.safetensors", size_bytes=512 * MiB, seed=n, primary=True)])])
            fake.set_fault(100 + n, "drip", bps=2 * MiB)
        daemon.start()
        for n in (1, 2):
            daemon.api("POST", "/api/jobs", json={"model_id": n}).raise_for_status()
        wait_until(lambda: len(daemon.jobs(state="downloading")) == 2, 20, message="two downloads running")
        results["jobs_in_store"] = len(daemon.jobs())
        results["downloads_running"] = len(daemon.jobs(state="downloading"))
        results["rest_default_limit"] = bench_rest(daemon, args.requests, args.clients, "/api/jobs")
        results["rest_limit_1000"] = bench_rest(daemon, args.requests // 4, args.clients, "/api/jobs?limit=1000")
        results["websocket_fanout"] = bench_fanout(daemon, args.ws_clients, spare, args.events)
        results["downloads_still_running"] = len(daemon.jobs(state="downloading"))
    finally:
        daemon.stop()
        fake.close()
    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "web.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


def main_latency(args) -> int:
    fake = FakeCivitai()
    folder = Path(tempfile.mkdtemp(prefix="bench-web-latency-"))
    daemon = Daemon(folder, base_config(fake, workers=1), [])
    results: dict = {}
    try:
        daemon.start()
        results["load_average_before"] = _load_average()
        results["sequential"] = bench_sequential(daemon, args.sequential, folder)
        results["load_average_after"] = _load_average()
    finally:
        daemon.stop()
        fake.close()
    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "web-latency.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # Windows
        return None


if __name__ == "__main__":
    sys.exit(main())
