"""Soak run of the real daemon against the local fake Civitai: hours of downloads, cancels, pauses,
restarts, kill -9s of workers and update checks, with the growth of every process measured.

    uv run python bench/soak.py [--hours 1] [--sample-s 60] [--seed 1] [--dir PATH] [--keep]

What it does, on a schedule scaled to --hours (so a short run still does every kind of action):
  downloads  a new model published on the fake every ~8 s, added through POST /api/manifest or
             POST /api/jobs (files of 64 KiB to 4 MiB)
  cancels    a 16 MiB file dripping at 1 MiB/s, cancelled (DELETE /api/jobs/<id>) once it is
             downloading, then retried at full speed; now and then a queued job is cancelled
  pauses     POST /api/pause + /api/resume and per-job pause/resume, where the routes exist (a 404
             turns that action off, and the report says so)
  restarts   3 a run: SIGTERM to the supervisor (what the systemd unit's KillMode=mixed does), or
             to every process of the tree at once; then a fresh start
  kill -9    5 a run: mostly of the worker in the middle of a dripping 8 MiB file (its job must
             resume from the partial file), now and then of an idle one
  updates    6 a run: the fake publishes a newer version of a model in the manifest, then
             POST /api/updates/check
A webhook_url points at a local receiver, so the webhook process runs too. Every --sample-s the
RSS, open fds and threads of each process (by name: supervisor, worker-N, updater, web, webhooks)
and the size of data/daemon.db + -wal are sampled. At the end: the queue is drained, the daemon
stopped, growth per hour per process (least-squares slope, first and last), errors seen
(tracebacks and ERROR lines in data/logs/daemon.log*, the daemon's stderr and the fake), and every
finished file is checked against its sha256.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import benchkit as kit  # noqa: I001  (puts the repository on sys.path)
import proctree
import requests

from ipc.naming import SIDECAR_INFO_SUFFIX, SIDECAR_PREVIEW_INFIX
from tests.helpers import Daemon, base_config, pid_alive, sha256_file, wait_until
from tests.webhook_receiver import WebhookReceiver

KiB, MiB = kit.KiB, kit.MiB
SIZES = [(64 * KiB, 3), (256 * KiB, 4), (1 * MiB, 3), (4 * MiB, 1)]  # (bytes, weight)
BIG = 16 * MiB
DRIP_BPS = 1 * MiB
FIRST_MODELS = 12


def iso_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class Catalogue:
    """What the fake publishes: model id -> its versions, file ids and sizes."""

    fake: object
    rng: random.Random
    next_model: int = 1
    versions: dict[int, list[int]] = field(default_factory=dict)  # model -> version ids, oldest first

    @staticmethod
    def file_of(version_id: int) -> int:
        return version_id * 10 + 1

    def publish_model(self, size: int | None = None) -> int:
        mid = self.next_model
        self.next_model += 1
        vid = mid * 100 + 1
        size = size or self.pick_size()
        self.fake.add_model(mid, name=f"Soak {mid}", type="Checkpoint", versions=[self._version(mid, vid, size)])
        self.versions[mid] = [vid]
        return mid

    def publish_version(self, mid: int) -> int:
        vid = self.versions[mid][-1] + 1
        self.fake.add_version(mid, self._version(mid, vid, self.pick_size()))
        self.versions[mid].append(vid)
        return vid

    def _version(self, mid: int, vid: int, size: int) -> dict:
        return dict(id=vid, published_at=iso_now(), files=[dict(
            id=self.file_of(vid), name=f"m{mid}_v{vid % 100}.safetensors", size_bytes=size, primary=True,
            seed=vid)])

    def pick_size(self) -> int:
        sizes, weights = zip(*SIZES)
        return self.rng.choices(sizes, weights)[0]


class Soak:
    def __init__(self, args, work: Path):
        self.args = args
        self.work = work
        self.rng = random.Random(args.seed)
        self.duration_s = args.hours * 3600
        self.fake = kit.fake_with_nodelay()
        self.catalogue = Catalogue(self.fake, self.rng)
        self.receiver = WebhookReceiver()
        config = base_config(self.fake, workers=2, throttle=0, timeout=300, retries=3,
                             webhook_url=self.receiver.url)
        first = [self.catalogue.publish_model() for _ in range(FIRST_MODELS)]
        self.daemon = Daemon(work / "daemon", config, kit.model_entries(first))
        self.reader = kit.StoreReader(self.daemon.data_dir / "daemon.db")
        self.t0 = 0.0
        self.counts: collections.Counter = collections.Counter()
        self.api_errors: collections.Counter = collections.Counter()
        self.unsupported: dict[str, str] = {}
        self.restarts: list[dict] = []
        self.samples: list[dict] = []
        self.names: dict[int, str] = {}
        self.pids_seen: dict[str, set[int]] = collections.defaultdict(set)
        self.paused = False

    # -- plumbing ---------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def api(self, method: str, path: str, **kw) -> requests.Response | None:
        try:
            return self.daemon.api(method, path, **kw)
        except requests.RequestException as exc:
            route = re.sub(r"/\d+", "/<id>", path)
            self.api_errors[f"{method} {route}: {type(exc).__name__}"] += 1
            return None

    def note(self, text: str) -> None:
        print(f"[{self.elapsed():7.1f} s] {text}", flush=True)

    def refresh_names(self) -> None:
        names = {self.daemon.proc.pid: "supervisor"}
        res = self.api("GET", "/api/status")
        if res is not None and res.ok:
            names.update({c["pid"]: c["name"] for c in res.json().get("children", []) if c.get("pid")})
        self.names = names

    # -- actions ----------------------------------------------------------------------------------

    def act_download(self) -> None:
        mid = self.catalogue.publish_model()
        if self.rng.random() < 0.5:
            res = self.api("POST", "/api/manifest", json={"modelId": mid, "model_type": "checkpoint"})
            kind = "download via POST /api/manifest"
        else:
            res = self.api("POST", "/api/jobs", json={"model_id": mid})
            kind = "download via POST /api/jobs"
        self.counts[kind if res is not None and res.ok else kind + " refused"] += 1
        if res is not None and not res.ok:
            self.note(f"{kind} of model {mid}: {res.status_code} {res.text[:200]}")

    def act_cancel(self) -> None:
        if self.rng.random() < 0.25:
            return self.cancel_queued()
        mid = self.catalogue.publish_model(size=BIG)
        fid = self.catalogue.file_of(self.catalogue.versions[mid][0])
        # Every request of the file drips (several connections share it out), until the cancel.
        self.fake.set_fault(fid, "drip", bps=DRIP_BPS)
        res = self.api("POST", "/api/jobs", json={"model_id": mid})
        if res is None or not res.ok:
            self.counts["cancel: could not queue"] += 1
            return
        job_id = res.json()["job"]["id"]
        try:
            wait_until(lambda: self.reader.scalar("SELECT state FROM jobs WHERE id = ?", (job_id,)) == "downloading"
                       and self.reader.scalar("SELECT bytes_done FROM jobs WHERE id = ?", (job_id,)), 30,
                       interval=0.2, message=f"job {job_id} downloading")
        except AssertionError:
            self.counts["cancel: job never downloading in 30 s"] += 1
        res = self.api("DELETE", f"/api/jobs/{job_id}")
        self.fake.clear_faults(fid)  # the retry below goes at full speed
        self.counts["cancel of a downloading job" if res is not None and res.ok else "cancel refused"] += 1
        if res is not None and not res.ok:
            self.note(f"cancel of job {job_id}: {res.status_code} {res.text[:200]}")
        try:
            wait_until(lambda: self.reader.scalar("SELECT COUNT(*) FROM events WHERE event = 'download_cancelled' "
                                                  "AND json_extract(data, '$.job_id') = ?", (job_id,)),
                       10, interval=0.2, message="download_cancelled")
            wait_until(lambda: all(c.get("job_id") != job_id for c in self.status_children()), 10, interval=0.2,
                       message="the worker to let go of the job")
        except AssertionError:
            self.counts["cancel: not let go of in 10 s"] += 1
        res = self.api("POST", f"/api/jobs/{job_id}/retry")
        self.counts["retry of a cancelled job" if res is not None and res.ok else "retry refused"] += 1

    def cancel_queued(self) -> None:
        mid = self.catalogue.publish_model()
        res = self.api("POST", "/api/jobs", json={"model_id": mid, "priority": 99})
        if res is None or not res.ok:
            return
        job_id = res.json()["job"]["id"]
        res = self.api("DELETE", f"/api/jobs/{job_id}")
        # 409 when it already finished: both are fine answers.
        self.counts["cancel of a queued job" if res is not None and res.ok else "cancel of a queued job: 409"] += 1

    def status_children(self) -> list[dict]:
        res = self.api("GET", "/api/status")
        return res.json().get("children", []) if res is not None and res.ok else []

    def act_pause(self) -> None:
        if "pause" not in self.unsupported:
            res = self.api("POST", "/api/pause")
            if res is not None and res.status_code in (404, 405):
                self.unsupported["pause"] = f"POST /api/pause answered {res.status_code}: pause/resume skipped"
                self.note(self.unsupported["pause"])
            elif res is not None and res.ok:
                self.paused = True
                time.sleep(3)  # the pause itself: downloads must stay stopped for it
                running = self.reader.count_jobs("downloading") + self.reader.count_jobs("verifying")
                self.counts["pause" + (" (but jobs ran)" if running else "")] += 1
                res = self.api("POST", "/api/resume")
                self.paused = not (res is not None and res.ok)
                self.counts["resume" if not self.paused else "resume refused"] += 1
        if "job pause" not in self.unsupported:
            job_id = self.reader.scalar("SELECT id FROM jobs WHERE state IN ('queued', 'downloading') "
                                        "ORDER BY id DESC LIMIT 1")
            if job_id is None:
                return
            res = self.api("POST", f"/api/jobs/{job_id}/pause")
            if res is not None and res.status_code == 404 and "no job" not in res.text.lower():
                self.unsupported["job pause"] = (f"POST /api/jobs/<id>/pause answered 404 ({res.text[:80]}): "
                                                 "per-job pause skipped")
                self.note(self.unsupported["job pause"])
            elif res is not None and res.ok:
                time.sleep(1)
                res = self.api("POST", f"/api/jobs/{job_id}/resume")
                self.counts["job pause + resume" if res is not None and res.ok else "job resume refused"] += 1

    def stop_tree(self, whole_tree: bool) -> tuple[object, float, int]:
        """SIGTERM the supervisor (or every process of the tree); (exit code, seconds, processes
        still alive once the supervisor has exited: it must stop its children first)."""
        pids = [self.daemon.proc.pid, *self.daemon.track_pids()]
        t = time.monotonic()
        for pid in pids if whole_tree else pids[:1]:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            code = self.daemon.proc.wait(30)
        except subprocess.TimeoutExpired:
            code = "did not stop in 30 s"
        stop_s = time.monotonic() - t
        left = [p for p in pids[1:] if pid_alive(p)]
        self.daemon.cleanup()
        return code, stop_s, len(left)

    def act_restart(self) -> None:
        whole_tree = len(self.restarts) % 2 == 1
        code, stop_s, left = self.stop_tree(whole_tree)
        t = time.monotonic()
        self.daemon.start(timeout=60)
        record = {"how": "SIGTERM to every process" if whole_tree else "SIGTERM to the supervisor", "exit": code,
                  "stop_s": stop_s, "start_s": time.monotonic() - t, "left_running": left}
        self.restarts.append(record)
        self.note(f"restart ({record['how']}): exit {code} after {stop_s:.1f} s, "
                  f"{left} process(es) left running, up again in {record['start_s']:.1f} s")
        self.refresh_names()

    def act_kill_worker(self) -> None:
        """Mostly the worker in the middle of a dripping 8 MiB file (its job must resume from the
        partial file), now and then an idle one."""
        victim = None
        if self.rng.random() >= 0.25:
            mid = self.catalogue.publish_model(size=8 * MiB)
            self.fake.set_fault(self.catalogue.file_of(self.catalogue.versions[mid][0]), "drip", times=1,
                                bps=2 * DRIP_BPS)
            res = self.api("POST", "/api/jobs", json={"model_id": mid})
            if res is not None and res.ok:
                job_id = res.json()["job"]["id"]

                def holder():
                    if not self.reader.scalar("SELECT bytes_done FROM jobs WHERE id = ?", (job_id,)):
                        return None
                    return next((c for c in self.status_children() if c.get("job_id") == job_id and c.get("pid")),
                                None)

                try:
                    victim = wait_until(holder, 30, interval=0.2, message=f"a worker downloading job {job_id}")
                except AssertionError:
                    self.counts["kill -9: the dripping job never started in 30 s"] += 1
        if victim is None:
            workers = [c for c in self.status_children() if c["name"].startswith("worker-") and c.get("pid")]
            if not workers:
                self.counts["kill -9: no worker to kill"] += 1
                return
            victim = self.rng.choice(workers)
        try:
            os.kill(victim["pid"], signal.SIGKILL)
        except ProcessLookupError:
            return
        self.counts["kill -9 of " + ("a downloading" if victim.get("job_id") else "an idle") + " worker"] += 1
        self.note(f"kill -9 of {victim['name']} (pid {victim['pid']}, job {victim.get('job_id')})")

    def act_update(self) -> None:
        in_manifest = [e["modelId"] for e in json.loads(self.daemon.manifest_path.read_text() or "[]")
                       if e.get("modelId") in self.catalogue.versions]
        if in_manifest:
            mid = self.rng.choice(in_manifest)
            vid = self.catalogue.publish_version(mid)
            self.note(f"the fake published version {vid} of model {mid}")
        res = self.api("POST", "/api/updates/check")
        self.counts["update check (202)" if res is not None and res.status_code == 202
                    else f"update check refused ({None if res is None else res.status_code})"] += 1

    # -- sampling ---------------------------------------------------------------------------------

    def sample(self) -> None:
        if self.daemon.proc is None or self.daemon.proc.poll() is not None:
            return
        self.refresh_names()
        row = {"t": self.elapsed(), "db": kit.db_bytes(self.daemon.data_dir), "procs": {}}
        for pid in proctree.tree(self.daemon.proc.pid):
            reading = proctree.read(pid)
            if reading is None:
                continue
            name = self.names.get(pid) or proctree.cmdline(pid)[:30] or str(pid)
            self.pids_seen[name].add(pid)
            row["procs"][name] = {"rss": reading.rss_kib or 0, "fds": reading.fds or 0, "threads": reading.threads or 0}
        self.samples.append(row)

    # -- the run ----------------------------------------------------------------------------------

    def schedule(self) -> list[tuple[float, str]]:
        """(seconds from start, action): evenly spaced restarts, kills and update checks, so a
        short run does each; downloads, cancels and pauses at a steady rate in between."""
        d = self.duration_s
        plan = [(d * k / 4, "restart") for k in (1, 2, 3)]
        plan += [(d * (k + 0.5) / 5, "kill") for k in range(5)]
        plan += [(d * (k + 0.3) / 6, "update") for k in range(6)]
        t = 5.0
        while t < d:
            plan.append((t, "download"))
            t += self.rng.uniform(5, 11)
        t = 20.0
        while t < d:
            plan.append((t, self.rng.choice(["cancel", "cancel", "pause"])))
            t += self.rng.uniform(25, 45)
        return sorted(plan)

    def run(self) -> int:
        print(f"soak for {self.args.hours} h ({self.duration_s:.0f} s), samples every {self.args.sample_s:.0f} s, "
              f"seed {self.args.seed}; data in {self.work}")
        print(f"load average at start: {kit.load_avg()}", flush=True)
        self.daemon.start(timeout=60)
        self.t0 = time.monotonic()
        self.refresh_names()
        self.sample()
        actions = {"download": self.act_download, "cancel": self.act_cancel, "pause": self.act_pause,
                   "restart": self.act_restart, "kill": self.act_kill_worker, "update": self.act_update}
        plan = self.schedule()
        next_sample = self.args.sample_s
        while plan or self.elapsed() < self.duration_s:
            now = self.elapsed()
            if now >= next_sample:
                self.sample()
                next_sample += self.args.sample_s
                continue
            if plan and now >= plan[0][0]:
                due, name = plan.pop(0)
                if name in ("download", "cancel", "pause") and now - due > 20:
                    self.counts[f"{name}: skipped, overdue after a long action"] += 1
                    continue
                try:
                    actions[name]()
                except (requests.RequestException, AssertionError, KeyError, ValueError) as exc:
                    self.counts[f"{name}: {type(exc).__name__}"] += 1
                    self.note(f"{name} failed: {exc!r}")
                continue
            if self.daemon.proc.poll() is not None:
                self.note(f"the daemon exited by itself with {self.daemon.proc.returncode}; starting it again")
                self.counts["daemon exited by itself"] += 1
                self.daemon.cleanup()
                self.daemon.start(timeout=60)
            wake = min(next_sample, plan[0][0] if plan else self.duration_s)
            time.sleep(max(0.0, min(1.0, wake - self.elapsed())))
        return self.finish()

    def finish(self) -> int:
        self.note("actions over: draining the queue")
        self.fake.clear_faults()
        if self.paused:
            self.api("POST", "/api/resume")
        drained = True
        try:
            wait_until(lambda: self.reader.scalar(
                "SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'downloading', 'verifying', 'paused')") == 0,
                600, interval=1.0, message="an empty queue")
        except AssertionError:
            drained = False
        self.sample()
        code, stop_s, left = self.stop_tree(whole_tree=False)
        self.note(f"final stop: exit {code} after {stop_s:.1f} s, {left} process(es) left running")
        failures = self.report(drained, code if not left else f"{code}, {left} process(es) left running")
        print(f"\nload average at end: {kit.load_avg()}")
        return 1 if failures else 0

    # -- the report -------------------------------------------------------------------------------

    def report(self, drained: bool, final_code) -> int:
        problems = 0
        print("\n== actions ==")
        for name, n in sorted(self.counts.items()):
            print(f"{n:6}  {name}")
        for r in self.restarts:
            print(f"restart: {r['how']}: exit {r['exit']} after {r['stop_s']:.1f} s, {r['left_running']} left "
                  f"running, start {r['start_s']:.1f} s")
            if r["exit"] != 0 or r["left_running"] or r["stop_s"] > 20:
                problems += 1
        for text in self.unsupported.values():
            print(f"skipped: {text}")
        if self.api_errors:
            print("API calls that failed (expected only around restarts):")
            for name, n in self.api_errors.most_common():
                print(f"{n:6}  {name}")
        states = dict(self.reader.rows("SELECT state, COUNT(*) FROM jobs GROUP BY state"))
        events = dict(self.reader.rows("SELECT event, COUNT(*) FROM events GROUP BY event"))
        print(f"jobs by state: {states}")
        print(f"events: {events}")
        print(f"webhook deliveries received: {len(self.receiver.deliveries)}")
        if not drained:
            print("the queue did not drain within 600 s of the end")
            problems += 1
        if final_code != 0:
            problems += 1

        self.print_growth()
        problems += self.print_errors()
        problems += self.verify_files()
        print(f"\n{'no problems' if not problems else f'{problems} problem(s)'} found")
        return problems

    def print_growth(self) -> None:
        print(f"\n== growth: {len(self.samples)} samples over {self.samples[-1]['t'] / 3600:.2f} h "
              "(slope: least squares per hour over every sample; first and last sample) ==")
        print(f"{'process':14} {'pids':>4} {'RSS MiB first':>13} {'last':>7} {'MiB/h':>8} {'fds first':>9} {'last':>5} "
              f"{'fds/h':>7} {'threads first':>13} {'last':>5} {'thr/h':>7}")
        names = sorted({n for s in self.samples for n in s["procs"]}, key=lambda n: (n != "supervisor", n))
        for name in names:
            series = [(s["t"], s["procs"][name]) for s in self.samples if name in s["procs"]]

            def col(key, scale=1.0, series=series):
                pts = [(t, p[key] * scale) for t, p in series]
                slope = kit.slope_per_hour(pts)
                return pts[0][1], pts[-1][1], slope

            rf, rl, rs = col("rss", 1 / 1024)
            ff, fl, fs = col("fds")
            tf, tl, ts = col("threads")

            def fmt(v, spec):
                return "-" if v is None else format(v, spec)

            print(f"{name[:14]:14} {len(self.pids_seen[name]):>4} {rf:>13.1f} {rl:>7.1f} {fmt(rs, '8.2f'):>8} "
                  f"{ff:>9.0f} {fl:>5.0f} {fmt(fs, '7.1f'):>7} {tf:>13.0f} {tl:>5.0f} {fmt(ts, '7.1f'):>7}")
        db = [(s["t"], s["db"] / MiB) for s in self.samples]
        slope = kit.slope_per_hour(db)
        print(f"{'daemon.db+wal':14} {'':>4} {db[0][1]:>13.2f} {db[-1][1]:>7.2f} "
              f"{'-' if slope is None else format(slope, '8.2f'):>8}  (MiB)")
        print("pids: how many processes held that name (restarts and kill -9s make new ones; RSS starts over)")

    def print_errors(self) -> int:
        print("\n== errors seen ==")
        texts = []
        for path in sorted(self.daemon.data_dir.joinpath("logs").glob("daemon.log*")):
            texts.append((path.name, path.read_text(errors="replace")))
        texts.append(("daemon.stderr", self.daemon.stderr()))
        tracebacks: collections.Counter = collections.Counter()
        errors: collections.Counter = collections.Counter()
        warnings = 0
        for _, text in texts:
            lines = text.splitlines()
            for i, line in enumerate(lines):
                if line.startswith("Traceback (most recent call last)"):
                    tail = next((x for x in lines[i + 1:] if x and not x.startswith((" ", "Traceback"))), "?")
                    tracebacks[tail[:160]] += 1
                m = re.match(r"^\S+ \S+ (ERROR|CRITICAL)\s+(\S+?)\[\d+\] (\S+): (.*)$", line)
                if m:
                    message = re.sub(r"\d+", "#", m.group(4))[:140]
                    errors[f"{m.group(1)} {m.group(2)}: {message}"] += 1
                elif re.match(r"^\S+ \S+ WARNING ", line):
                    warnings += 1
        print(f"tracebacks: {sum(tracebacks.values())}")
        for tail, n in tracebacks.most_common():
            print(f"{n:6}  {tail}")
        print(f"ERROR/CRITICAL lines: {sum(errors.values())} (digits shown as #)")
        for text, n in errors.most_common(20):
            print(f"{n:6}  {text}")
        print(f"WARNING lines: {warnings} (restarts, kill -9s and retries make these)")
        if self.fake.errors:
            print(f"bugs inside the fake: {len(self.fake.errors)}\n{self.fake.errors[0]}")
        return sum(tracebacks.values()) + len(self.fake.errors)

    def verify_files(self) -> int:
        """Every done job's file is at its path with the sha256 the fake serves; nothing else sits
        at a final path."""
        print("\n== files ==")
        bad = []
        done = self.reader.rows("SELECT id, path, sha256, file_id FROM jobs WHERE state = 'done'")
        known = set()
        for job_id, rel, sha, fid in done:
            path = self.daemon.models_dir / (rel or "")
            known.add(path)
            try:
                want = self.fake.file_sha256(fid).lower()
            except KeyError:
                bad.append(f"job {job_id}: file {fid} is not on the fake")
                continue
            if not rel or not path.is_file():
                bad.append(f"job {job_id}: no file at {rel}")
            elif (sha or "").lower() != want:
                bad.append(f"job {job_id}: recorded sha256 {sha} but the fake serves {want}")
            elif sha256_file(path) != want:
                bad.append(f"job {job_id}: {rel} does not hash to {want}")
        finals = [p for p in self.daemon.models_dir.rglob("*") if p.is_file() and not p.name.startswith(".")]
        partial = [p for p in self.daemon.models_dir.rglob(".*") if p.is_file()]
        sidecars = [p for p in finals if sidecar_of(p) is not None]
        for path in sidecars:  # beside a verified file, never alone
            if sidecar_of(path) not in known:
                bad.append(f"{path.relative_to(self.daemon.models_dir)} is a sidecar without its verified file")
        stray = [p for p in finals if p not in known and sidecar_of(p) is None]
        for path in stray:
            bad.append(f"{path.relative_to(self.daemon.models_dir)} is at a final path without a done job")
        print(f"done jobs: {len(done)}; files at final paths: {len(finals) - len(sidecars)} and {len(sidecars)} "
              f"sidecars; checked against sha256: {len(done) - len([b for b in bad if b.startswith('job')])} good, "
              f"{len(bad)} bad; hidden partial files left: {len(partial)}")
        active = self.reader.scalar("SELECT COUNT(*) FROM jobs WHERE state NOT IN ('done', 'failed', 'cancelled')")
        if partial and not active:  # nothing unfinished may keep a partial file: each is disk lost for good
            bad.extend(f"{p.relative_to(self.daemon.models_dir)} is a partial file of no unfinished job" for p in partial)
        for path in partial[:10]:
            print(f"  hidden: {path.relative_to(self.daemon.models_dir)} ({path.stat().st_size} bytes; "
                  f"{active} job(s) unfinished)")
        for line in bad[:20]:
            print("  " + line)
        served = sum(self.fake.bytes_served(fid) for fid in {row[3] for row in done})
        size = sum(self.fake.file_size(fid) for fid in {row[3] for row in done})
        if size:
            print(f"bytes the CDN served for those files / their sizes = {served / size:.3f} (over 1: bytes fetched "
                  "again after cancels, kill -9s and restarts)")
        if not done:
            print("  no file finished: nothing was verified")
            return 1
        return len(bad)


def sidecar_of(path: Path) -> Path | None:
    """The model file a sidecar (`<stem>.civitai.info`, `<stem>.preview.<ext>`) belongs to, or None.
    The stem is matched against the model files beside it."""
    name = path.name
    if name.endswith(SIDECAR_INFO_SUFFIX):
        stem = name[: -len(SIDECAR_INFO_SUFFIX)]
    elif SIDECAR_PREVIEW_INFIX in name:
        stem = name.rsplit(SIDECAR_PREVIEW_INFIX, 1)[0]
    else:
        return None
    for candidate in path.parent.glob(glob.escape(stem) + ".*"):
        if candidate != path and candidate.is_file() and not candidate.name.startswith(stem + ".preview.") \
                and not candidate.name.endswith(SIDECAR_INFO_SUFFIX):
            return candidate
    return path.parent / (stem + ".safetensors")  # the file it would belong to: reported as missing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, default=1.0)
    parser.add_argument("--sample-s", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=None, help="where the daemon's folder goes (default bench/out/)")
    parser.add_argument("--keep", action="store_true", help="keep the daemon's folder (logs, files) afterwards")
    args = parser.parse_args(argv)
    if args.hours <= 0 or args.sample_s <= 0:
        parser.error("--hours and --sample-s must be more than 0")
    work = kit.bench_dir(args.dir, "soak-")
    soak = Soak(args, work)
    try:
        return soak.run()
    finally:
        soak.daemon.cleanup()
        soak.reader.close()
        soak.receiver.close()
        soak.fake.close()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
