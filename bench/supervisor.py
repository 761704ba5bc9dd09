"""Supervisor figures of the real daemon, measured from outside (its files, REST API and /proc).

    uv run python bench/supervisor.py [--quick] [--only a,b,c,d] [--runs 3] [--idle-s 60] [--dir PATH]
                                      [--set KEY=JSON ...]

a  First sync of N model-only manifest entries (250, 1,000, 2,000, 10,000): the time from the
   daemon's start until all N jobs are in its store, and the supervisor's own part, from
   daemon_started to the last download_queued in its event log. The fake stalls every metadata
   request, so the two workers hold one job each and nothing eats the queue. A size that takes
   longer than --sync-cap-s is stopped there and reported as such.
b  N files of 256 KiB (throttle 0, 2 workers): files/s of the daemon, against a curl loop (one
   `curl -L` per file) and `aria2c -j2` over the same files on the same fake in the same run;
   CPU per file of the supervisor (utime + stime), of the whole tree and of this process (the
   fake), at 100, 500 and 2,000 files. Every file is checked against its sha256.
c  Idle for --idle-s with nothing queued: CPU % of a core and wake-ups/s (voluntary + involuntary
   context switches of every thread), per process and in total, without and with a webhook_url
   (a local receiver), and an idle `aria2c --enable-rpc` over the same window.
d  REST latency: 200 sequential authed GET /api/status on one kept-alive connection and on new
   connections; GET /health and aria2c's JSON-RPC the same way, for reference.

Medians of --runs runs where a run is cheap. The load average is printed at the start and the end
(the machine may be shared). Data goes to a temporary folder under --dir (default bench/out/, not
tmpfs) and is deleted.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import benchkit as kit  # noqa: I001  (puts the repository on sys.path)
import proctree
import requests
from download import run_child

from tests.helpers import Daemon, base_config, sha256_file, wait_until
from tests.webhook_receiver import WebhookReceiver

SYNC_SIZES = (250, 1000, 2000, 10000)
FILE_SIZES = (100, 500, 2000)
PEER_FILES = 500
FILE_BYTES = 256 * kit.KiB
REST_REQUESTS = 200
_seq = itertools.count(1)
# Part b's folders, removed together after its last case. ext4 makes each new inode scan the inodes
# freed in the last minute or so (find_inode_bit -> recently_deleted, a quarter of a worker's CPU
# in perf), so removing one case's 500 files before the next case starts slows that case's creates
# and every repeat drifts slower than the one before.
_removals: list[Path] = []
EXTRA: dict = {}  # config keys of part b's daemons (--set), for A/B runs of a setting

TARGETS = {
    "sync_2000_s": 0.5, "sync_10000_s": 2.0, "files_per_s": 150.0, "x_curl": 2.0, "sup_ms_per_file": 2.0,
    "idle_cpu_pct": 0.05, "idle_wakeups_per_s": 3.0,
}


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def verdict(ok: bool) -> str:
    return "meets target" if ok else "misses target"


def updater_checked(daemon: Daemon, timeout: float = 15.0) -> None:
    """Wait for the updater's start-up check (of an empty manifest) so it is not in the window."""
    try:
        wait_until(lambda: (daemon.api("GET", "/api/status").json().get("updater") or {}).get("last_check"),
                   timeout, interval=0.2, message="the updater's first check")
    except AssertionError:
        pass  # a daemon that reports no last_check: measure anyway


def stop(daemon: Daemon) -> None:
    if daemon.proc is not None and daemon.proc.poll() is None:
        try:
            daemon.stop(timeout=25)
            return
        except subprocess.TimeoutExpired:
            pass
    daemon.cleanup()


# -- a. first sync ------------------------------------------------------------------------------------

def one_sync(work: Path, fake, n: int, cap_s: float) -> dict:
    folder = work / f"a-{n}-{next(_seq)}"
    daemon = Daemon(folder, base_config(fake, timeout=86400), kit.model_entries(range(1, n + 1)))
    reader = kit.StoreReader(daemon.data_dir / "daemon.db")
    try:
        t0 = time.monotonic()
        daemon.start(wait_ready=False)
        while True:
            count = reader.count_jobs()
            elapsed = time.monotonic() - t0
            if count >= n or elapsed > cap_s:
                break
            if daemon.proc.poll() is not None:
                raise SystemExit(f"the daemon exited with {daemon.proc.returncode}:\n{daemon.stderr()[-3000:]}")
            time.sleep(0.005)
        result = {"n": n, "jobs": count, "complete": count >= n, "to_jobs_s": elapsed,
                  "sup_cpu_s": proctree.cpu_ticks_s(daemon.proc.pid)}
        started = reader.event_ts("daemon_started", last=False)
        last_queued = reader.event_ts("download_queued")
        result["supervisor_s"] = (last_queued - started) if result["complete"] and started and last_queued else None
        if result["complete"]:
            daemon.wait_ready(120)
            result["to_health_s"] = time.monotonic() - t0
            queue = daemon.api("GET", "/api/status").json().get("queue") or {}
            result["status_active"] = sum(queue.get(s, 0) for s in ("queued", "downloading", "verifying"))
        return result
    finally:
        reader.close()
        daemon.kill_tree()
        shutil.rmtree(folder, ignore_errors=True)


def bench_first_sync(work: Path, sizes, runs: int, cap_s: float) -> dict:
    print(f"\n== a. first sync of N model-only manifest entries (cap {cap_s:.0f} s a run) ==", flush=True)
    fake = kit.fake_with_nodelay()
    # Every metadata request stalls until the fake closes: each worker holds one job, the
    # updater's check waits, and nothing eats the queue or competes for the CPU.
    fake.set_api_fault(r"^/api/v1/", "stall")
    out: dict[int, list[dict]] = {}
    try:
        for n in sizes:
            results, spent = [], 0.0
            for _ in range(runs):
                r = one_sync(work, fake, n, cap_s)
                results.append(r)
                spent += r["to_jobs_s"]
                print(f"  N={n}: {r['jobs']} jobs in {r['to_jobs_s']:.2f} s"
                      + ("" if r["complete"] else " (stopped at the cap)"), flush=True)
                if not r["complete"] or spent > 30:  # repeat only what is cheap
                    break
            out[n] = results
    finally:
        fake.close()
    print(f"\n{'N':>6} {'runs':>4} {'start->N jobs s':>16} {'supervisor s':>13} {'sup CPU s':>10} "
          f"{'start->/health s':>17} {'jobs/s':>8}  note")
    for n, results in out.items():
        done = [r for r in results if r["complete"]]
        if not done:
            r = results[0]
            rate = r["jobs"] / r["to_jobs_s"]
            print(f"{n:>6} {len(results):>4} {'> ' + format(r['to_jobs_s'], '.0f'):>16} {'-':>13} "
                  f"{r['sup_cpu_s']:>10.2f} {'-':>17} {rate:>8.0f}  skipped: only {r['jobs']} of {n} jobs "
                  f"after {r['to_jobs_s']:.0f} s (at that rate all {n} would take > {n / rate:.0f} s)")
            continue
        to_jobs = kit.median([r["to_jobs_s"] for r in done])
        sup = [r["supervisor_s"] for r in done if r["supervisor_s"] is not None]
        sup_s = kit.median(sup) if sup else None
        note = ""
        if any(r.get("status_active") != n for r in done):
            note = f"/api/status counted {[r.get('status_active') for r in done]} active"
        target = TARGETS.get(f"sync_{n}_s")
        if target is not None:
            note = (note + "; " if note else "") + f"target <= {target} s: {verdict(to_jobs <= target)}"
        print(f"{n:>6} {len(done):>4} {to_jobs:>16.3f} {'-' if sup_s is None else format(sup_s, '.3f'):>13} "
              f"{kit.median([r['sup_cpu_s'] for r in done]):>10.2f} "
              f"{kit.median([r['to_health_s'] for r in done]):>17.3f} {n / to_jobs:>8.0f}  {note}")
    print("start->N jobs: from Popen until the store holds N jobs (interpreter start and imports included);"
          "\nsupervisor: daemon_started -> last download_queued (event timestamps, 1 ms resolution);"
          "\nsup CPU: the supervisor's utime + stime at that moment.")
    return out


# -- b. many small files ------------------------------------------------------------------------------

def tree_cpu_delta(before: dict[int, proctree.Reading], after: dict[int, proctree.Reading]) -> float:
    return sum(r.cpu_s - (before[pid].cpu_s if pid in before else 0.0) for pid, r in after.items())


def daemon_files(work: Path, fake, n: int) -> dict:
    folder = work / f"b-daemon-{n}-{next(_seq)}"
    ids = range(1, n + 1)
    daemon = Daemon(folder, base_config(fake, **EXTRA), [])
    reader = kit.StoreReader(daemon.data_dir / "daemon.db")
    try:
        daemon.start()
        updater_checked(daemon)
        kit.settle(1.0)
        sup = daemon.proc.pid
        before, fake0 = proctree.read_tree(sup), time.process_time()
        t0 = time.time()
        kit.write_manifest_atomically(daemon.manifest_path, kit.model_entries(ids))

        def finished():
            if daemon.proc.poll() is not None:
                raise SystemExit(f"the daemon exited with {daemon.proc.returncode}:\n{daemon.stderr()[-3000:]}")
            return reader.count_jobs("done") + reader.count_jobs("failed") >= n

        wait_until(finished, 120 + n * 0.5, interval=0.05, message=f"{n} finished jobs")
        t1 = time.time()
        after, fake1 = proctree.read_tree(sup), time.process_time()
        first = reader.event_ts("download_started", last=False)
        last = reader.event_ts("download_completed")
        names = names_of(daemon)
        per_child: dict[str, float] = {}
        for pid, r in after.items():
            name = names.get(pid, "other")
            name = "worker" if name.startswith("worker") else name
            per_child[name] = per_child.get(name, 0.0) + (r.cpu_s - (before[pid].cpu_s if pid in before else 0.0)) / n * 1000
        failed = reader.count_jobs("failed")
        retries = int(reader.scalar("SELECT COUNT(*) FROM events WHERE event = 'download_retry'") or 0)
        bad = [mid for mid in ids
               if sha256_file(daemon.models_dir / "checkpoint" / f"m{mid}.safetensors")
               != fake.file_sha256(kit.file_id(mid)).lower()] if not failed else list(ids)
        if failed or bad:
            raise SystemExit(f"daemon run of {n}: {failed} failed jobs, {len(bad)} files missing or wrong")
        return {"n": n, "files_per_s": n / (last - first), "wall_s": t1 - t0, "events_s": last - first,
                "sup_ms": (after[sup].cpu_s - before[sup].cpu_s) / n * 1000,
                "tree_ms": tree_cpu_delta(before, after) / n * 1000, "fake_ms": (fake1 - fake0) / n * 1000,
                "retries": retries, "per_child_ms": per_child}
    finally:
        reader.close()
        stop(daemon)
        _removals.append(folder)


def check_files(folder: Path, fake, ids) -> None:
    for mid in ids:
        path = folder / f"m{mid}.safetensors"
        if not path.is_file() or sha256_file(path) != fake.file_sha256(kit.file_id(mid)).lower():
            raise SystemExit(f"{path} is missing or wrong")


def curl_loop(work: Path, fake, n: int) -> dict:
    folder = work / f"b-curl-{next(_seq)}"
    folder.mkdir()
    ids = range(1, n + 1)
    listing = folder / "list.txt"
    listing.write_text("".join(f"{fake.download_url(kit.version_id(mid))} {folder / f'm{mid}.safetensors'}\n"
                               for mid in ids))
    script = 'while read -r url out; do curl -sSfL -o "$out" "$url" || exit 1; done < "$1"'
    fake0 = time.process_time()
    r = run_child(["bash", "-c", script, "curl-loop", str(listing)])
    fake1 = time.process_time()
    check_files(folder, fake, ids)
    _removals.append(folder)
    return {"n": n, "files_per_s": n / r["wall"], "wall_s": r["wall"], "tree_ms": r["cpu"] / n * 1000,
            "fake_ms": (fake1 - fake0) / n * 1000}


def aria2c_j2(work: Path, fake, n: int) -> dict:
    folder = work / f"b-aria2c-{next(_seq)}"
    folder.mkdir()
    ids = range(1, n + 1)
    listing = folder / "input.txt"
    listing.write_text("".join(f"{fake.download_url(kit.version_id(mid))}\n  out=m{mid}.safetensors\n" for mid in ids))
    cmd = ["aria2c", "-i", str(listing), "-d", str(folder), "-j2", "-x1", "-s1", "--file-allocation=none",
           "--allow-overwrite=true", "--auto-file-renaming=false", "--quiet=true", "--no-conf=true",
           "--summary-interval=0", "--disable-ipv6=true"]
    fake0 = time.process_time()
    r = run_child(cmd)
    fake1 = time.process_time()
    check_files(folder, fake, ids)
    _removals.append(folder)
    return {"n": n, "files_per_s": n / r["wall"], "wall_s": r["wall"], "tree_ms": r["cpu"] / n * 1000,
            "fake_ms": (fake1 - fake0) / n * 1000}


def disk_floor(work: Path, n: int = 100) -> float:
    """ms per file for what a verified download must do on disk at least: write, fsync, rename,
    fsync the folder (one at a time)."""
    folder = work / f"b-disk-{next(_seq)}"
    folder.mkdir()
    block = os.urandom(FILE_BYTES)
    t0 = time.perf_counter()
    for i in range(n):
        tmp = folder / f".f{i}.part"
        with open(tmp, "wb") as fh:
            fh.write(block)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, folder / f"f{i}")
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    elapsed = time.perf_counter() - t0
    _removals.append(folder)
    return elapsed / n * 1000


def bench_files(work: Path, sizes, peer_n: int, runs: int) -> dict:
    print(f"\n== b. files of {FILE_BYTES // kit.KiB} KiB: the daemon (2 workers, throttle 0) against a curl loop "
          f"and aria2c -j2 ==", flush=True)
    print(kit.nodelay_note())
    fake = kit.fake_with_nodelay()
    daemon_runs: dict[int, list[dict]] = {n: [] for n in sizes}
    peers: dict[str, list[dict]] = {"curl loop": [], "aria2c -j2": []}
    try:
        kit.add_models(fake, range(1, max(*sizes, peer_n) + 1), FILE_BYTES)
        floor_ms = disk_floor(work)
        for run in range(runs):
            for n in sizes:
                if run == 0 or n == peer_n:
                    r = daemon_files(work, fake, n)
                    daemon_runs[n].append(r)
                    print(f"  run {run + 1}: daemon {n} files: {r['files_per_s']:.1f} files/s, supervisor "
                          f"{r['sup_ms']:.2f} ms CPU/file; ms CPU/file by process: "
                          + ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["per_child_ms"].items())), flush=True)
            peers["curl loop"].append(curl_loop(work, fake, peer_n))
            if kit.have("aria2c"):
                peers["aria2c -j2"].append(aria2c_j2(work, fake, peer_n))
            print(f"  run {run + 1}: curl loop {peers['curl loop'][-1]['files_per_s']:.1f} files/s"
                  + (f", aria2c {peers['aria2c -j2'][-1]['files_per_s']:.1f} files/s" if peers["aria2c -j2"] else ""),
                  flush=True)
    finally:
        fake.close()
        while _removals:
            shutil.rmtree(_removals.pop(), ignore_errors=True)

    def med(rows, key):
        return kit.median([r[key] for r in rows])

    def spread(rows):
        values = [r["files_per_s"] for r in rows]
        return f"{min(values):.0f}-{max(values):.0f}"

    print(f"\n{'case':24} {'runs':>4} {'files/s':>8} {'range':>9} {'wall s':>7} {'sup ms CPU/file':>16} "
          f"{'tree ms CPU/file':>17} {'fake ms CPU/file':>17}")
    for n, rows in daemon_runs.items():
        print(f"{'daemon, ' + str(n) + ' files':24} {len(rows):>4} {med(rows, 'files_per_s'):>8.1f} {spread(rows):>9} "
              f"{med(rows, 'wall_s'):>7.2f} {med(rows, 'sup_ms'):>16.2f} {med(rows, 'tree_ms'):>17.2f} "
              f"{med(rows, 'fake_ms'):>17.2f}")
    for name, rows in peers.items():
        if rows:
            print(f"{name + ', ' + str(peer_n) + ' files':24} {len(rows):>4} {med(rows, 'files_per_s'):>8.1f} "
                  f"{spread(rows):>9} {med(rows, 'wall_s'):>7.2f} {'-':>16} {med(rows, 'tree_ms'):>17.2f} "
                  f"{med(rows, 'fake_ms'):>17.2f}")
    print(f"disk floor (write {FILE_BYTES // kit.KiB} KiB + fsync + rename + fsync dir, one at a time): "
          f"{floor_ms:.2f} ms/file = {1000 / floor_ms:.0f} files/s")
    main_rows = daemon_runs.get(peer_n) or []
    if main_rows:
        fps = med(main_rows, "files_per_s")
        print(f"\ndaemon {peer_n} files: {fps:.1f} files/s (target >= {TARGETS['files_per_s']:.0f}: "
              f"{verdict(fps >= TARGETS['files_per_s'])})")
        if peers["curl loop"]:
            x = fps / med(peers["curl loop"], "files_per_s")
            print(f"daemon / curl loop   = {x:.2f}x (target >= {TARGETS['x_curl']:.0f}x: {verdict(x >= TARGETS['x_curl'])})")
        if peers["aria2c -j2"]:
            print(f"daemon / aria2c -j2  = {fps / med(peers['aria2c -j2'], 'files_per_s'):.2f}x")
        sup = {n: med(rows, "sup_ms") for n, rows in daemon_runs.items() if rows}
        worst = max(sup.values())
        print("supervisor ms CPU/file: " + ", ".join(f"{n}: {v:.2f}" for n, v in sup.items())
              + f" (target <= {TARGETS['sup_ms_per_file']:.0f} and flat: {verdict(worst <= TARGETS['sup_ms_per_file'])}; "
              f"max/min = {worst / max(min(sup.values()), 1e-9):.2f})")
    print("files/s of the daemon: first download_started -> last download_completed (its event log); wall: "
          "manifest write -> all done as seen by polling the store (includes the ~1 s manifest poll);\n"
          "the daemon makes 3 requests a file (metadata, download endpoint, CDN), curl and aria2c 2; the "
          "daemon makes each file durable (3 fsyncs: the file, its .civitai.info, their folder), curl and "
          "aria2c do not;\nfake ms: CPU of this process (the fake's threads "
          "and the bench's polling) per file. With 2 cores, tree + fake CPU per file bounds files/s: on a shared "
          "machine files/s moves with the load, CPU per file much less.\n"
          "every case's files stay on disk until the last case has run: on ext4 a create right after many "
          "deletions pays for scanning them, so deleting between cases slows the next one.")
    return {"daemon": daemon_runs, "peers": peers}


# -- c. idle ------------------------------------------------------------------------------------------

def names_of(daemon: Daemon) -> dict[int, str]:
    names = {daemon.proc.pid: "supervisor"}
    try:
        names.update({pid: name for name, pid in daemon.children().items()})
    except (requests.RequestException, ValueError, KeyError):
        pass
    return names


def idle_rows(label: str, names: dict[int, str], before, after, seconds: float) -> list[tuple]:
    rows = []
    for pid, r1 in after.items():
        r0 = before.get(pid)
        name = names.get(pid) or proctree.cmdline(pid)[:40] or str(pid)
        if r0 is None:
            name += " (born in the window)"
        cpu, wake = proctree.delta(r0, r1)
        churn = ""
        if r0 is not None:
            born = len(set(r1.thread_wakeups) - set(r0.thread_wakeups))
            ended = len(set(r0.thread_wakeups) - set(r1.thread_wakeups))
            churn = f"+{born}/-{ended}" if born or ended else ""
        rows.append((label, name, pid, cpu / seconds * 100, wake / seconds, r1.threads, churn))
    gone = [names.get(pid, str(pid)) for pid in before if pid not in after]
    if gone:
        rows.append((label, "ended in the window: " + ", ".join(gone), None, None, None, None, ""))
    return rows


def bench_idle(work: Path, seconds: float, settle_s: float) -> dict:
    print(f"\n== c. idle for {seconds:.0f} s with nothing queued ==", flush=True)
    fake = kit.fake_with_nodelay()
    receiver = WebhookReceiver()
    plain = Daemon(work / "c-plain", base_config(fake), [])
    hooked = Daemon(work / "c-webhook", base_config(fake, webhook_url=receiver.url), [])
    aria = None
    try:
        plain.start()
        hooked.start()
        aria = kit.Aria2Rpc(work / "c-aria2") if kit.have("aria2c") else None
        for daemon in (plain, hooked):
            updater_checked(daemon)
        try:
            wait_until(lambda: receiver.events(), 15, message="the first webhook delivery")
        except AssertionError:
            print("  (no webhook delivery seen before the window)")
        names = {d: names_of(d) for d in (plain, hooked)}
        kit.settle(settle_s)
        before = {d: proctree.read_tree(d.proc.pid) for d in (plain, hooked)}
        aria0 = proctree.read(aria.proc.pid) if aria else None
        t0 = time.monotonic()
        kit.settle(seconds)
        window = time.monotonic() - t0
        after = {d: proctree.read_tree(d.proc.pid) for d in (plain, hooked)}
        aria1 = proctree.read(aria.proc.pid) if aria else None
    finally:
        for daemon in (plain, hooked):
            stop(daemon)
        if aria:
            aria.close()
        receiver.close()
        fake.close()
    source = "schedstat (ns)" if next(iter(after[plain].values())).thread_cpu_ns else "utime+stime (ticks)"
    print(f"window {window:.1f} s; CPU from {source}; wake-ups = voluntary + involuntary context switches "
          "of every thread")
    print(f"\n{'daemon':16} {'process':34} {'pid':>7} {'CPU % core':>11} {'wake-ups/s':>11} {'threads':>8} "
          "threads born/ended in the window")
    totals = {}
    for label, daemon in (("no webhook", plain), ("webhook_url set", hooked)):
        rows = idle_rows(label, names[daemon], before[daemon], after[daemon], window)
        for row in rows:
            if row[2] is None:
                print(f"{row[0]:16} {row[1]}")
                continue
            print(f"{row[0]:16} {row[1]:34} {row[2]:>7} {row[3]:>11.4f} {row[4]:>11.2f} {row[5] or 0:>8} {row[6]}")
        cpu = sum(r[3] for r in rows if r[2] is not None)
        wake = sum(r[4] for r in rows if r[2] is not None)
        totals[label] = (cpu, wake)
        print(f"{label:16} {'TOTAL (' + str(len([r for r in rows if r[2]])) + ' processes)':34} {'':>7} "
              f"{cpu:>11.4f} {wake:>11.2f}   CPU target <= {TARGETS['idle_cpu_pct']}: "
              f"{verdict(cpu <= TARGETS['idle_cpu_pct'])}; wake-up target <= {TARGETS['idle_wakeups_per_s']:.0f}/s: "
              f"{verdict(wake <= TARGETS['idle_wakeups_per_s'])}")
    if aria0 and aria1:
        cpu, wake = proctree.delta(aria0, aria1)
        cpu, wake = cpu / window * 100, wake / window
        totals["aria2c"] = (cpu, wake)
        print(f"{'peer':16} {'aria2c --enable-rpc':34} {aria1.pid:>7} {cpu:>11.4f} {wake:>11.2f} {aria1.threads or 0:>8}")
        if wake > 0:
            print(f"wake-ups/s daemon (no webhook) / aria2c = {totals['no webhook'][1] / wake:.1f}x")
    return totals


# -- d. REST latency ----------------------------------------------------------------------------------

def timed(call, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        res = call()
        out.append(time.perf_counter() - t0)
        res.raise_for_status()
    return out


def segment_gaps_ms(host: str, port: int, path: str = "/health", requests_n: int = 4) -> list[float]:
    """Sequential requests on one raw kept-alive connection (client TCP_NODELAY set): for each
    answer, the ms between its first and its last received piece. Tens of ms mean the server's
    second write of the answer waited for the ACK of its first (Nagle against a delayed ACK)."""
    import socket

    gaps = []
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(requests_n):
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
            data, first, last = b"", None, None
            while True:
                piece = sock.recv(65536)
                if not piece:
                    raise SystemExit("the web server closed a kept-alive connection")
                last = time.perf_counter()
                first = first or last
                data += piece
                head, sep, body = data.partition(b"\r\n\r\n")
                if sep:
                    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length:")), 0)
                    if len(body) >= length:
                        break
            gaps.append((last - first) * 1000)
    return gaps[1:]  # the first answer on a fresh connection is not held back


def bench_rest(work: Path, n: int) -> dict:
    print(f"\n== d. REST latency: {n} sequential requests ==", flush=True)
    fake = kit.fake_with_nodelay()
    daemon = Daemon(work / "d-daemon", base_config(fake), [])
    aria = None
    results: dict[str, list[float]] = {}
    try:
        daemon.start()
        auth = {"Authorization": f"Bearer {daemon.token()}"}
        updater_checked(daemon)
        aria = kit.Aria2Rpc(work / "d-aria2") if kit.have("aria2c") else None
        kit.settle(1.0)
        status, health = daemon.base_url + "/api/status", daemon.base_url + "/health"
        with requests.Session() as session:
            session.get(status, headers=auth, timeout=10).raise_for_status()
            results["GET /api/status, kept-alive"] = timed(lambda: session.get(status, headers=auth, timeout=10), n)
            results["GET /health, kept-alive"] = timed(lambda: session.get(health, timeout=10), n)
        # requests.get makes a Session for each call and closes it: a new TCP connection each time.
        results["GET /api/status, new connection"] = timed(lambda: requests.get(status, headers=auth, timeout=10), n)
        results["GET /health, new connection"] = timed(lambda: requests.get(health, timeout=10), n)
        gaps = segment_gaps_ms("127.0.0.1", daemon.port)
        if aria:
            body = aria.call_body()
            with requests.Session() as session:
                session.post(aria.url, json=body, timeout=10).raise_for_status()
                results["aria2c RPC getGlobalStat, kept-alive"] = timed(
                    lambda: session.post(aria.url, json=body, timeout=10), n)
            results["aria2c RPC getGlobalStat, new connection"] = timed(
                lambda: requests.post(aria.url, json=body, timeout=10), n)
    finally:
        stop(daemon)
        if aria:
            aria.close()
        fake.close()
    print(f"\n{'request':42} {'median ms':>10} {'p99 ms':>8} {'max ms':>8}")
    for name, values in results.items():
        print(f"{name:42} {ms(kit.median(values)):>10} {ms(kit.percentile(values, 99)):>8} {ms(max(values)):>8}")
    kept = kit.median(results["GET /api/status, kept-alive"])
    fresh = kit.median(results["GET /api/status, new connection"])
    print(f"/api/status / /health (new connections, medians) = "
          f"{fresh / kit.median(results['GET /health, new connection']):.2f}x "
          "(the extra is the supervisor's round trip over the control socket)")
    print(f"kept-alive / new connection for /api/status (medians) = {kept / fresh:.2f}x")
    print("GET /health on one raw kept-alive connection, ms between the first and the last piece of each answer: "
          + ", ".join(f"{g:.1f}" for g in gaps))
    if kit.median(gaps) > 20:
        print("  -> the answer's second write waits for the client's delayed ACK (Nagle): the web server does not "
              "set TCP_NODELAY on accepted sockets (or should write headers and body at once)")
    if "aria2c RPC getGlobalStat, kept-alive" in results:
        print(f"/api/status / aria2c RPC (kept-alive, medians) = "
              f"{kept / kit.median(results['aria2c RPC getGlobalStat, kept-alive']):.2f}x")
    return results


# -- main ---------------------------------------------------------------------------------------------

def git_head() -> str:
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%h %s"], cwd=kit.REPO, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip()[:100]
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small N, 1 run, 5 s idle: a smoke test of about a minute")
    parser.add_argument("--only", default="a,b,c,d", help="which parts, e.g. --only a,c (default a,b,c,d)")
    parser.add_argument("--runs", type=int, default=3, help="runs for medians where cheap (default 3)")
    parser.add_argument("--idle-s", type=float, default=60.0)
    parser.add_argument("--sync-cap-s", type=float, default=120.0,
                        help="a first sync still running after this long is stopped and reported (default 120)")
    parser.add_argument("--dir", type=Path, default=None, help="where the daemons' folders go (default bench/out/)")
    parser.add_argument("--sizes", default=None, metavar="N,N",
                        help="part b's numbers of files (default 100,500,2000); the first of them is compared with the peers "
                             "if 500 is not among them")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="a config key for part b's daemons, e.g. --set sidecars=false (repeatable)")
    args = parser.parse_args(argv)
    for item in args.set:
        key, eq, value = item.partition("=")
        try:
            EXTRA[key.strip()] = json.loads(value)
        except ValueError:
            eq = ""
        if not eq or not key.strip():
            parser.error(f"--set takes KEY=JSON, e.g. sidecars=false; got {item!r}")
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    if not parts <= set("abcd"):
        parser.error(f"--only takes a, b, c and d; got {args.only!r}")
    sync_sizes, file_sizes, peer_n, runs = SYNC_SIZES, FILE_SIZES, PEER_FILES, args.runs
    idle_s, settle_s, rest_n, cap_s = args.idle_s, 5.0, REST_REQUESTS, args.sync_cap_s
    if args.quick:
        sync_sizes, file_sizes, peer_n, runs = (50, 250), (50, 100), 100, 1
        idle_s, settle_s, rest_n, cap_s = min(idle_s, 5.0), 1.0, 50, min(cap_s, 30.0)
    if args.sizes:
        try:
            file_sizes = tuple(int(n) for n in args.sizes.split(",") if n.strip())
        except ValueError:
            parser.error(f"--sizes takes numbers of files, e.g. 500 or 100,500; got {args.sizes!r}")
        if not file_sizes or min(file_sizes) <= 0:
            parser.error(f"--sizes takes positive numbers of files; got {args.sizes!r}")
        peer_n = peer_n if peer_n in file_sizes else file_sizes[0]
    work = kit.bench_dir(args.dir, "supervisor-")
    print(f"bench/supervisor.py at {git_head()}")
    print(f"python {platform.python_version()}, {platform.system()} {platform.release()}, data in {work} "
          f"({kit.fs_type(work) or 'unknown fs'})")
    print(f"load average at start: {kit.load_avg()}" + (f"; part b's daemons with {EXTRA}" if EXTRA else ""),
          flush=True)
    started = time.monotonic()
    try:
        if "a" in parts:
            bench_first_sync(work, sync_sizes, runs, cap_s)
        if "b" in parts:
            bench_files(work, file_sizes, peer_n, runs)
        if "c" in parts:
            bench_idle(work, idle_s, settle_s)
        if "d" in parts:
            bench_rest(work, rest_n)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nload average at end: {kit.load_avg()}; {time.monotonic() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
