"""What bench/supervisor.py and bench/soak.py share: the fake's catalogue, the daemon's files read
from outside, peers (aria2c), statistics and the load average."""
from __future__ import annotations

import inspect
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from download import fs_type  # noqa: E402  (bench/download.py: the mount's file system type)

from ipc.manifest import atomic_write, render  # noqa: E402
from tests import fakeciv  # noqa: E402
from tests.helpers import free_port, wait_until  # noqa: E402

KiB = 1024
MiB = 1024 * 1024


# -- the machine -------------------------------------------------------------------------------------

def load_avg() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "n/a"
    return f"{one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} CPUs)"


def bench_dir(base: Path | None, prefix: str) -> Path:
    """A fresh folder under `base` (default bench/out/), refused on tmpfs: the daemon fsyncs, and
    a RAM file system would flatter it."""
    base = base or REPO / "bench" / "out"
    base.mkdir(parents=True, exist_ok=True)
    kind = fs_type(base)
    if kind in ("tmpfs", "ramfs"):
        raise SystemExit(f"{base} is on {kind}: pass --dir on a real disk")
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


# -- statistics --------------------------------------------------------------------------------------

def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1)))))
    return ordered[k]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per hour."""
    if len(points) < 2:
        return None
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx * 3600


# -- the fake ----------------------------------------------------------------------------------------

FAKE_HAS_NODELAY = "TCP_NODELAY" in inspect.getsource(fakeciv)


def fake_with_nodelay() -> fakeciv.FakeCivitai:
    """A FakeCivitai whose accepted sockets have TCP_NODELAY, so small answers are not held back by
    Nagle against the client's delayed ACK (that would time the fake, not the daemon)."""
    fake = fakeciv.FakeCivitai()
    for server in (fake._api, fake._cdn):
        accept = server.get_request

        def get_request(accept=accept):
            sock, address = accept()
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            return sock, address

        server.get_request = get_request  # serve_forever looks it up on every accept
    return fake


def nodelay_note() -> str:
    if FAKE_HAS_NODELAY:
        return "fake: tests/fakeciv.py sets TCP_NODELAY (the bench sets it too; harmless)"
    return "fake: tests/fakeciv.py on this branch does not set TCP_NODELAY; the bench sets it on accepted sockets"


SEEDS = 64  # distinct contents: the fake caches this many generated blocks and their hashes


def version_id(model_id: int) -> int:
    return 1_000_000 + model_id


def file_id(model_id: int) -> int:
    return 10_000_000 + model_id


def add_models(fake, model_ids, size: int) -> None:
    """One version with one primary file of `size` bytes per model (`m<id>.safetensors`)."""
    for mid in model_ids:
        fake.add_model(mid, name=f"Bench {mid}", type="Checkpoint", versions=[
            dict(id=version_id(mid), published_at="2024-05-01T00:00:00.000Z",
                 files=[dict(id=file_id(mid), name=f"m{mid}.safetensors", size_bytes=size, primary=True,
                             seed=mid % SEEDS)]),
        ])
    one_per_seed: dict[int, int] = {}
    for mid in model_ids:
        one_per_seed.setdefault(mid % SEEDS, mid)
    for mid in one_per_seed.values():  # hash now, not during the first timed request
        fake.file_sha256(file_id(mid))


def model_entries(model_ids) -> list[dict]:
    return [{"modelId": mid, "model_type": "checkpoint"} for mid in model_ids]


def write_manifest_atomically(path: Path, entries: list[dict]) -> None:
    """The daemon must never see half a file (it would report a manifest_error)."""
    atomic_write(path, render(entries))


# -- the daemon's files ------------------------------------------------------------------------------

class StoreReader:
    """Read-only SQL on data/daemon.db (jobs and events), opened when it appears."""

    def __init__(self, db_path: Path):
        self.db_path = db_path
        self._conn: sqlite3.Connection | None = None

    def conn(self) -> sqlite3.Connection | None:
        if self._conn is None:
            if not self.db_path.exists():
                return None
            try:
                self._conn = sqlite3.connect(f"file:{self.db_path.as_posix()}?mode=ro", uri=True, timeout=10)
            except sqlite3.OperationalError:
                return None
        return self._conn

    def scalar(self, sql: str, args=()):
        conn = self.conn()
        if conn is None:
            return None
        try:
            row = conn.execute(sql, args).fetchone()
        except sqlite3.OperationalError:  # the schema is not there yet
            return None
        return row[0] if row else None

    def rows(self, sql: str, args=()) -> list[tuple]:
        conn = self.conn()
        if conn is None:
            return []
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError:
            return []

    def count_jobs(self, state: str | None = None) -> int:
        if state is None:
            return int(self.scalar("SELECT COUNT(*) FROM jobs") or 0)
        return int(self.scalar("SELECT COUNT(*) FROM jobs WHERE state = ?", (state,)) or 0)

    def event_ts(self, name: str, last: bool = True) -> float | None:
        order = "DESC" if last else "ASC"
        ts = self.scalar(f"SELECT ts FROM events WHERE event = ? ORDER BY id {order} LIMIT 1", (name,))
        return parse_ts(ts) if ts else None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def parse_ts(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def db_bytes(data_dir: Path) -> int:
    total = 0
    for name in ("daemon.db", "daemon.db-wal"):
        try:
            total += (data_dir / name).stat().st_size
        except OSError:
            pass
    return total


# -- peers -------------------------------------------------------------------------------------------

def have(tool: str) -> bool:
    return shutil.which(tool) is not None


class Aria2Rpc:
    """An idle `aria2c --enable-rpc` daemon: the peer for idle cost and request latency."""

    def __init__(self, folder: Path):
        self.port = free_port()
        self.secret = "bench"
        folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["aria2c", "--enable-rpc", f"--rpc-listen-port={self.port}", f"--rpc-secret={self.secret}",
             f"--dir={folder}", "--quiet=true", "--no-conf=true", "--disable-ipv6=true"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}/jsonrpc"
        wait_until(self._up, 10, message="aria2c's RPC port")

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"aria2c exited with {self.proc.returncode}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def call_body(self) -> dict:
        return {"jsonrpc": "2.0", "id": "b", "method": "aria2.getGlobalStat", "params": [f"token:{self.secret}"]}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def settle(seconds: float) -> None:
    """A quiet pause before a measurement window (not a wait for a condition)."""
    time.sleep(seconds)
