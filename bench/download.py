"""Benchmark of one download: the daemon's path against curl and openssl on loopback.

    uv run python bench/download.py [--size-mib 1024] [--runs 3] [--dir PATH] [--cases abcd]

One process serves a generated file over loopback (a threaded HTTP server using sendfile, with
Range support) and a minimal stand-in of Civitai's API that answers the version's JSON and
307s the download endpoint to the file server. Each case runs as a child process and is measured
from outside (wall time, CPU time and peak RSS of that child via os.wait4):

  a  curl -o /dev/null URL                      transfer alone
  b  openssl dgst -sha256 FILE (page-cached)    hash alone
  c  curl -o FILE URL, then sha256sum FILE      the usual two-step way
  d  workers.download.run_job in a python child: resolve, stream with hashing, verify,
     fsync, rename into place (its own timing of run_job is shown too, without interpreter
     start-up and imports)

Prints medians and the ratios d / max(a, b) and d / c. Data goes to a temporary folder under
--dir (default bench/out/, on the repository's disk; refused if it is tmpfs) and is deleted.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL_ID, VERSION_ID, FILE_ID = 1, 11, 111
FILE_NAME = "bench.safetensors"


# -- the servers ------------------------------------------------------------------------------------

class _Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass


def file_server(path: Path) -> ThreadingHTTPServer:
    size = path.stat().st_size

    class Handler(_Quiet):
        def do_GET(self):  # noqa: N802 - http.server naming
            start = 0
            match = re.match(r"bytes=(\d+)-$", self.headers.get("Range", ""))
            if match and int(match.group(1)) >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if match:
                start = int(match.group(1))
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            else:
                self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size - start))
            self.send_header("ETag", '"bench"')
            self.end_headers()
            with open(path, "rb") as fh:
                self.wfile.flush()
                self.connection.sendfile(fh, start, size - start)

    return _serve(Handler)


def api_server(cdn_url: str, size: int, sha256: str) -> ThreadingHTTPServer:
    version = {
        "id": VERSION_ID, "modelId": MODEL_ID, "name": "v1", "status": "Published",
        "publishedAt": "2025-01-01T00:00:00.000Z", "updatedAt": "2025-01-01T00:00:00.000Z",
        "model": {"name": "Bench", "type": "Checkpoint"},
        "files": [{"id": FILE_ID, "name": FILE_NAME, "sizeKB": size / 1024, "type": "Model", "primary": True,
                   "pickleScanResult": "Success", "virusScanResult": "Success",
                   "metadata": {"format": "SafeTensor", "size": "pruned", "fp": "fp16"},
                   "hashes": {"SHA256": sha256.upper()}}],
    }
    body = json.dumps(version).encode()

    class Handler(_Quiet):
        def do_GET(self):  # noqa: N802
            if self.path.startswith(f"/api/v1/model-versions/{VERSION_ID}"):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif self.path.startswith(f"/api/download/models/{VERSION_ID}"):
                self.send_response(307)
                self.send_header("Location", cdn_url + "?sig=bench")
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

    return _serve(Handler)


def _serve(handler) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    return server


# -- measuring children ------------------------------------------------------------------------------

def run_child(cmd: list[str], **kw) -> dict:
    """Run one child; its wall time, CPU time and peak RSS (from os.wait4), and stdout."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, **kw)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed with {proc.returncode}")
    rss_kib = usage.ru_maxrss if sys.platform != "darwin" else usage.ru_maxrss // 1024
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss_mib": rss_kib / 1024, "out": out}


def combine(*results: dict) -> dict:
    return {"wall": sum(r["wall"] for r in results), "cpu": sum(r["cpu"] for r in results),
            "rss_mib": max(r["rss_mib"] for r in results)}


CHILD_CODE = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from workers.civitai import CivitaiClient
from workers.download import JobContext, run_job
api_url, work = sys.argv[2], Path(sys.argv[3])
ctx = JobContext(client=CivitaiClient(api_url), download_dir=work / "models", locks_dir=work / "locks",
                 allow_unsafe=False)
job = {"job_id": 1, "model_id": %d, "version_id": %d, "file_id": %d, "model_type": None, "filename": None,
       "sha256": None, "attempt": 1}
t0 = time.perf_counter()
done = run_job(job, ctx, lambda msg: None, lambda: False)
done["inner_s"] = time.perf_counter() - t0
print(json.dumps(done))
""" % (MODEL_ID, VERSION_ID, FILE_ID)


# -- setup ------------------------------------------------------------------------------------------

def fs_type(path: Path) -> str | None:
    """The file system type of the mount holding `path` (Linux), else None."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    best, kind = "", None
    real = str(path.resolve())
    for line in mounts:
        fields = line.split()
        if len(fields) >= 3:
            point = fields[1].replace("\\040", " ")
            if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                best, kind = point, fields[2]
    return kind


def make_file(path: Path, size: int) -> str:
    hasher = hashlib.sha256()
    block = os.urandom(1 << 20)
    with open(path, "wb") as fh:
        written = 0
        index = 0
        while written < size:
            piece = (index.to_bytes(8, "little") + block[8:])[: size - written]
            fh.write(piece)
            hasher.update(piece)
            written += len(piece)
            index += 1
        fh.flush()
        os.fsync(fh.fileno())
    return hasher.hexdigest()


def median_row(results: list[dict], size: int, key: str = "wall") -> dict:
    seconds = statistics.median(r[key] for r in results)
    cpu = statistics.median(r["cpu"] for r in results)
    return {"s": seconds, "gbps": size / 1e9 / seconds, "cpu_per_gb": cpu / (size / 1e9),
            "rss": max(r["rss_mib"] for r in results)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--cases", default="abcd", help="which cases to run (default abcd)")
    args = parser.parse_args(argv)
    for tool in ("curl", "openssl", "sha256sum"):
        if shutil.which(tool) is None and any(c in args.cases for c in "abc"):
            raise SystemExit(f"{tool} is needed for cases a-c")
    args.dir.mkdir(parents=True, exist_ok=True)
    kind = fs_type(args.dir)
    if kind in ("tmpfs", "ramfs"):
        raise SystemExit(f"{args.dir} is on {kind}: pass --dir on a real disk")
    size = args.size_mib << 20
    work = Path(tempfile.mkdtemp(prefix="bench-", dir=args.dir))
    servers = []
    try:
        source = work / "source.bin"
        print(f"generating {args.size_mib} MiB in {work} ({kind or 'unknown fs'}) ...", flush=True)
        sha = make_file(source, size)
        files = file_server(source)
        servers.append(files)
        cdn_url = f"http://127.0.0.1:{files.server_address[1]}/file/{FILE_NAME}"
        api = api_server(cdn_url, size, sha)
        servers.append(api)
        api_url = f"http://127.0.0.1:{api.server_address[1]}/api/v1"
        subprocess.run(["openssl", "dgst", "-sha256", str(source)], capture_output=True, check=False)  # warm cache
        out_file = work / "curl.bin"
        target = work / "models" / "checkpoint" / FILE_NAME
        results: dict[str, list[dict]] = {c: [] for c in "abcd"}
        inner: list[dict] = []
        settle = getattr(os, "sync", lambda: None)  # no dirty pages of one case slow down the next

        for run in range(1, args.runs + 1):
            settle()
            if "a" in args.cases:
                results["a"].append(run_child(["curl", "-sS", "-o", os.devnull, cdn_url]))
            if "b" in args.cases:
                settle()
                r = run_child(["openssl", "dgst", "-sha256", str(source)])
                assert sha in r["out"].decode(), "openssl disagrees with the generated hash"
                results["b"].append(r)
            if "c" in args.cases:
                settle()
                get = run_child(["curl", "-sS", "-o", str(out_file), cdn_url])
                check = run_child(["sha256sum", str(out_file)])
                assert check["out"].decode().split()[0] == sha
                results["c"].append(combine(get, check))
                out_file.unlink()
            if "d" in args.cases:
                settle()
                r = run_child([sys.executable, "-c", CHILD_CODE, str(REPO), api_url, str(work)])
                done = json.loads(r["out"])
                assert done["sha256"] == sha and not done["skipped"] and target.is_file(), done
                results["d"].append(r)
                inner.append({**r, "wall": done["inner_s"]})
                target.unlink()
            print(f"run {run}/{args.runs} done", flush=True)
        labels = {"a": "a curl -o /dev/null", "b": "b openssl dgst -sha256", "c": "c curl -o FILE + sha256sum",
                  "d": "d run_job (child process)", "d_inner": "d run_job (its own timing)"}
        rows = {c: median_row(results[c], size) for c in "abcd" if results[c]}
        if inner:
            rows["d_inner"] = median_row(inner, size)
        print(f"\n{args.size_mib} MiB, median of {args.runs} runs, {os.cpu_count()} CPUs")
        print(f"{'case':32} {'seconds':>8} {'GB/s':>7} {'CPU s/GB':>9} {'peak RSS MiB':>13}")
        for key, row in rows.items():
            print(f"{labels[key]:32} {row['s']:8.3f} {row['gbps']:7.2f} {row['cpu_per_gb']:9.2f} {row['rss']:13.1f}")
        if "d" in rows:
            print()
            for name in ("d", "d_inner"):
                d = rows[name]["s"]
                if "a" in rows and "b" in rows:
                    print(f"{name:8} / max(a, b) = {d / max(rows['a']['s'], rows['b']['s']):.2f}")
                if "c" in rows:
                    print(f"{name:8} / c         = {d / rows['c']['s']:.2f}")
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
