"""Benchmark of several connections for one file: the daemon's download path against aria2c and curl.

    uv run python bench/segments.py [--size-mib 1024] [--runs 3] [--cap-mbps 20] [--dir PATH]
                                    [--parts capped,uncapped,rss,cost] [--conns 1,4,8,16]

One nginx (nginx-light, /usr/sbin/nginx, run as this user) serves a generated file over loopback
twice: on one port with `limit_rate` (each connection capped at --cap-mbps MB/s, as CDNs cap each
TCP connection), on another without a cap. A minimal stand-in of Civitai's API (bench/download.py)
answers the version's JSON and 307s the download endpoint to the file. Every case is a child
process measured from outside (wall time, CPU time and peak RSS via os.wait4):

  capped    run_job with connections = N (1, 4, 8, 16): resolve, ranges, hash, verify, fsync,
            rename, in a python child as bench/download.py runs it; aria2c -x N -s N, with and
            without --checksum=sha-256=...; curl -o FILE (one connection)
  uncapped  run_job with connections = 1 and 8, against the limit max(curl -o /dev/null,
            openssl dgst -sha256 of a page-cached copy) (with 8, the first connection alone is
            fast enough that the download goes on over it: segments.FAST_ONE_BPS; "ranges
            forced": 8 connections where one would do)
  rss       run_job with 8 connections (forced), uncapped, on a file a quarter of the size: the
            worker's peak RSS must not grow with the file
  cost      the shared speed cap's cost: 8 connections uncapped with no cap set, and with a cap
            far above the line (every chunk then takes the cap's file lock)

Prints medians of --runs, ratios against the targets, CPU s/GB and the load average. Data goes to
a temporary folder under --dir (default bench/out/, refused on tmpfs) and is deleted.
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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from download import FILE_NAME, api_server, fs_type, make_file, run_child  # noqa: E402  (bench/download.py)

REPO = Path(__file__).resolve().parent.parent
NGINX = "/usr/sbin/nginx"
MB = 1_000_000

CHILD_CODE = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
import workers.download as download
import workers.segments as segments
from ipc.ratelimit import SharedRateLimit
from workers.civitai import CivitaiClient
from workers.download import JobContext, run_job
api_url, work, connections, direct, rate = sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1", int(sys.argv[6])
download.USE_DIRECT_IO = direct
if len(sys.argv) > 7 and sys.argv[7] == "ranges":
    segments.FAST_ONE_BPS = float("inf")  # several connections even where one would do
limit = SharedRateLimit(work / "locks" / "speed.rate")
limit.set_rate(rate)
ctx = JobContext(client=CivitaiClient(api_url), download_dir=work / "models", locks_dir=work / "locks",
                 allow_unsafe=False, connections=connections, rate_limit=limit)
job = {"job_id": 1, "model_id": 1, "version_id": 11, "file_id": 111, "model_type": None, "filename": None,
       "sha256": None, "attempt": 1}
t0 = time.perf_counter()
done = run_job(job, ctx, lambda msg: None, lambda: False)
done["inner_s"] = time.perf_counter() - t0
print(json.dumps(done))
"""

NGINX_CONF = """
worker_processes 1;
error_log {root}/error.log warn;
pid {root}/nginx.pid;
events {{ worker_connections 512; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 10000;
  default_type application/octet-stream;
  types {{ }}
  client_body_temp_path {root}/tmp; proxy_temp_path {root}/tmp; fastcgi_temp_path {root}/tmp;
  uwsgi_temp_path {root}/tmp; scgi_temp_path {root}/tmp;
  server {{ listen 127.0.0.1:{capped}; root {www}; limit_rate {rate}; }}
  server {{ listen 127.0.0.1:{uncapped}; root {www}; }}
}}
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_avg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" ({os.cpu_count()} CPUs)"
    except OSError:
        return "n/a"


class Nginx:
    def __init__(self, work: Path, www: Path, rate_bps: int):
        self.root = work / "nginx"
        (self.root / "tmp").mkdir(parents=True)
        self.capped, self.uncapped = free_port(), free_port()
        conf = self.root / "nginx.conf"
        conf.write_text(NGINX_CONF.format(root=self.root, www=www, rate=rate_bps, capped=self.capped,
                                          uncapped=self.uncapped))
        self.proc = subprocess.Popen([NGINX, "-p", str(self.root), "-c", str(conf), "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        import socket

        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.uncapped), 0.2).close()
                socket.create_connection(("127.0.0.1", self.capped), 0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise SystemExit(f"nginx did not start: {self.proc.stderr.read().decode(errors='replace')}") from None
                time.sleep(0.05)
        raise SystemExit("nginx did not start listening")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def row(results: list[dict], size: int) -> dict:
    seconds = statistics.median(r["wall"] for r in results)
    cpu = statistics.median(r["cpu"] for r in results)
    return {"s": seconds, "mbps": size / MB / seconds, "cpu_per_gb": cpu / (size / 1e9),
            "rss": max(r["rss_mib"] for r in results), "runs": [r["wall"] for r in results]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cap-mbps", type=float, default=20.0, help="per-connection cap of the capped server")
    parser.add_argument("--dir", type=Path, default=REPO / "bench" / "out")
    parser.add_argument("--parts", default="capped,uncapped,rss,cost")
    parser.add_argument("--conns", default="1,4,8,16", help="connection counts of the capped part")
    parser.add_argument("--peers", default="aria2c,aria2c-sha,curl", help="peers of the capped part")
    parser.add_argument("--buffered", action="store_true",
                        help="also run ours without O_DIRECT (writes and the hash's read-back through the page cache)")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    conns = [int(c) for c in args.conns.split(",")]
    peers = set(args.peers.split(",")) if args.peers else set()
    for tool in (NGINX, "aria2c", "curl", "openssl"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed")
    args.dir.mkdir(parents=True, exist_ok=True)
    kind = fs_type(args.dir)
    if kind in ("tmpfs", "ramfs"):
        raise SystemExit(f"{args.dir} is on {kind}: pass --dir on a real disk")
    size = args.size_mib << 20
    work = Path(tempfile.mkdtemp(prefix="bench-seg-", dir=args.dir))
    servers, nginx = [], None
    print(f"load average at start: {load_avg()}", flush=True)
    try:
        www = work / "www"
        www.mkdir()
        for folder in (work, www):
            folder.chmod(0o755)  # nginx's workers run as nobody when it is started by root
        source = www / FILE_NAME
        print(f"generating {args.size_mib} MiB in {work} ({kind or 'unknown fs'}) ...", flush=True)
        sha = make_file(source, size)
        small = www / "small.safetensors"
        small_sha = make_file(small, size // 4) if "rss" in parts else None
        for path in www.iterdir():
            path.chmod(0o644)
        nginx = Nginx(work, www, int(args.cap_mbps * MB))
        urls = {"capped": f"http://127.0.0.1:{nginx.capped}/{FILE_NAME}",
                "uncapped": f"http://127.0.0.1:{nginx.uncapped}/{FILE_NAME}",
                "small": f"http://127.0.0.1:{nginx.uncapped}/small.safetensors"}
        apis = {}
        for name, url in urls.items():
            if name == "small" and small_sha is None:
                continue
            api = api_server(url, size if name != "small" else size // 4, sha if name != "small" else small_sha)
            servers.append(api)
            apis[name] = f"http://127.0.0.1:{api.server_address[1]}/api/v1"
        subprocess.run(["openssl", "dgst", "-sha256", str(source)], capture_output=True, check=False)  # warm cache
        target = work / "models" / "checkpoint"
        settle = getattr(os, "sync", lambda: None)
        results: dict[str, list[dict]] = {}
        inner: dict[str, list[float]] = {}  # run_job's own time, without interpreter start and imports
        loads: dict[str, str] = {}

        def ours(label: str, api: str, connections: int, expect: str, direct: bool = True, rate: int = 0,
                 ranges: bool = False) -> None:
            settle()
            r = run_child([sys.executable, "-c", CHILD_CODE, str(REPO), api, str(work), str(connections),
                           "1" if direct else "0", str(rate), "ranges" if ranges else "auto"])
            done = json.loads(r["out"])
            assert done["sha256"] == expect and not done["skipped"], done
            (target / done["filename"]).unlink()
            results.setdefault(label, []).append(r)
            inner.setdefault(label, []).append(done["inner_s"])

        def peer(label: str, cmd: list[str], out: Path | None = None) -> None:
            settle()
            r = run_child(cmd)
            results.setdefault(label, []).append(r)
            if out is not None:
                out.unlink(missing_ok=True)

        def aria(n: int, url: str, checksum: bool) -> list[str]:
            cmd = ["aria2c", "-q", f"-x{n}", f"-s{n}", "--min-split-size=1M", "--file-allocation=falloc",
                   "--allow-overwrite=true", "--auto-file-renaming=false", "--summary-interval=0",
                   "-d", str(work), "-o", "aria.bin", url]
            if checksum:
                cmd.insert(1, f"--checksum=sha-256={sha}")
            return cmd

        for run in range(1, args.runs + 1):
            if "capped" in parts:
                for n in conns:
                    ours(f"capped ours c={n}", apis["capped"], n, sha)
                    if args.buffered and n == 8:
                        ours(f"capped ours c={n} buffered", apis["capped"], n, sha, direct=False)
                    if "aria2c" in peers:
                        peer(f"capped aria2c -x{n}", aria(n, urls["capped"], False), work / "aria.bin")
                    if "aria2c-sha" in peers:
                        peer(f"capped aria2c -x{n} --checksum", aria(n, urls["capped"], True), work / "aria.bin")
                if "curl" in peers:
                    peer("capped curl -o FILE", ["curl", "-sS", "-o", str(work / "curl.bin"), urls["capped"]],
                         work / "curl.bin")
                loads["capped"] = load_avg()
            if "uncapped" in parts:
                peer("uncapped curl -o /dev/null", ["curl", "-sS", "-o", os.devnull, urls["uncapped"]])
                r = run_child(["openssl", "dgst", "-sha256", str(source)])
                assert sha in r["out"].decode()
                results.setdefault("uncapped openssl dgst (cached)", []).append(r)
                for n in (1, 8):
                    ours(f"uncapped ours c={n}", apis["uncapped"], n, sha)
                    if args.buffered:
                        ours(f"uncapped ours c={n} buffered", apis["uncapped"], n, sha, direct=False)
                ours("uncapped ours c=8, ranges forced", apis["uncapped"], 8, sha, ranges=True)
                loads["uncapped"] = load_avg()
            if "rss" in parts:
                ours("uncapped ours c=8, ranges forced, 1/4 size", apis["small"], 8, small_sha, ranges=True)
            if "cost" in parts:
                ours("cost: c=8, no cap", apis["uncapped"], 8, sha, rate=0)
                ours("cost: c=8, cap 100 GB/s", apis["uncapped"], 8, sha, rate=100_000 * MB)
            print(f"run {run}/{args.runs} done, load {load_avg()}", flush=True)

        rows = {label: row(rs, size // 4 if "1/4" in label else size) for label, rs in results.items()}
        print(f"\n{args.size_mib} MiB, median of {args.runs} runs, capped server {args.cap_mbps:g} MB/s a connection")
        print(f"{'case':44} {'seconds':>8} {'MB/s':>8} {'CPU s/GB':>9} {'peak RSS MiB':>13} {'run_job s':>10}  runs")
        for label, r in rows.items():
            runs = " ".join(f"{x:.2f}" for x in r["runs"])
            own = f"{statistics.median(inner[label]):10.2f}" if label in inner else " " * 10
            print(f"{label:44} {r['s']:8.2f} {r['mbps']:8.1f} {r['cpu_per_gb']:9.2f} {r['rss']:13.1f} {own}  {runs}")
        print("(seconds: the child process from outside, interpreter start included; run_job s: its own timing)")
        print()

        def ratio(a: str, b: str, target: str) -> None:
            if a in rows and b in rows:
                own = ""
                if a in inner and b in inner:
                    own = f", run_job's own: {statistics.median(inner[a]) / statistics.median(inner[b]):.3f}"
                print(f"{a} / {b} = {rows[a]['s'] / rows[b]['s']:.3f}{own}" + (f"   (target {target})" if target else ""))

        if "capped" in parts:
            for n in conns:
                if n != 1 and "capped ours c=1" in rows and f"capped ours c={n}" in rows:
                    print(f"speed-up of capped ours c={n} over c=1: "
                          f"{rows['capped ours c=1']['s'] / rows[f'capped ours c={n}']['s']:.2f}x"
                          + ("   (target >= 6x)" if n == 8 else ""))
            for n in conns:
                ratio(f"capped ours c={n}", f"capped aria2c -x{n}", "<= 1.15" if n == 8 else "")
                ratio(f"capped ours c={n}", f"capped aria2c -x{n} --checksum", "")
            ratio("capped ours c=1", "capped curl -o FILE", "")
            ratio("capped ours c=8 buffered", "capped ours c=8", "")
            print(f"load average after the capped runs: {loads.get('capped')}")
        if "uncapped" in parts:
            limit = max(rows["uncapped curl -o /dev/null"]["s"], rows["uncapped openssl dgst (cached)"]["s"])
            print(f"limit = max(curl -o /dev/null, openssl dgst) = {limit:.2f} s")
            for label in ("uncapped ours c=1", "uncapped ours c=8", "uncapped ours c=1 buffered",
                          "uncapped ours c=8 buffered"):
                if label in rows:
                    print(f"{label} / limit = {rows[label]['s'] / limit:.3f}, run_job's own: "
                          f"{statistics.median(inner[label]) / limit:.3f}"
                          + ("   (target <= 1.2)" if label == "uncapped ours c=1" else ""))
            ratio("uncapped ours c=8", "uncapped ours c=1", "<= 1.05")
            ratio("uncapped ours c=8, ranges forced", "uncapped ours c=1", "")
            ratio("uncapped ours c=8 buffered", "uncapped ours c=8", "")
            print(f"load average after the uncapped runs: {loads.get('uncapped')}")
        if "rss" in parts and "uncapped ours c=8, ranges forced" in rows:
            print(f"peak RSS over 8 connections: {rows['uncapped ours c=8, ranges forced, 1/4 size']['rss']:.1f} MiB "
                  f"at {args.size_mib // 4} MiB, {rows['uncapped ours c=8, ranges forced']['rss']:.1f} MiB at "
                  f"{args.size_mib} MiB   (target <= 60, flat)")
        if "cost" in parts:
            ratio("cost: c=8, cap 100 GB/s", "cost: c=8, no cap", "about 1")
        print(f"load average at the end: {load_avg()}")
    finally:
        if nginx is not None:
            nginx.close()
        for server in servers:
            server.shutdown()
            server.server_close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
