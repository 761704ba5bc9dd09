"""The real daemon (process tree) downloading over several connections from a fake CDN that caps
each one: kill -9 of the worker or of everything resumes each range where it stopped, and the
speed cap holds two workers' connections together to the rate set."""
from __future__ import annotations

import json
import os
import signal
import time

from ipc.ratelimit import SharedRateLimit
from tests.helpers import base_config, names_besides_sidecars, sha256_file, wait_until

MiB = 1 << 20
ALIGN = 4096
SIZE = 48 * MiB + 99
PER_CONN_BPS = 3 * MiB  # with 4 connections: about 4 s for the file
# A range's bytes the sidecar may not have recorded at a kill -9: up to CHECKPOINT_S (0.5 s) of
# the connection, what was in flight on the socket, and the block a resume aligns down to.
SLACK = 2 * MiB


def add_model(fake, model_id=100, version_id=1000, file_id=5000, size=SIZE, name="model.safetensors"):
    fake.add_model(model_id, name=f"Model {model_id}", type="Checkpoint", versions=[dict(
        id=version_id, published_at="2024-05-01T00:00:00.000Z",
        files=[dict(id=file_id, name=name, size_bytes=size, primary=True)])])


def requested(r) -> tuple[int, int]:
    a, b = r.headers.get("Range")[6:].split("-")
    return int(a), int(b) + 1 if b else SIZE


def start_ranged_download(fake, daemon_factory):
    fake.cdn_conn_bps = PER_CONN_BPS
    add_model(fake)
    daemon = daemon_factory(base_config(fake, workers=1, connections=4),
                            [{"modelId": 100, "model_type": "checkpoint"}])
    daemon.start()
    side = daemon.models_dir / "checkpoint" / ".model.safetensors.part.json"

    def far_enough():
        data = json.loads(side.read_text())
        missing = data.get("missing")
        return missing is not None and SIZE - sum(b - a for a, b in missing) > 14 * MiB

    wait_until(far_enough, 60, message="a third of the file over several connections")
    return daemon


def check_each_range_resumed(fake, kill_time: float) -> None:
    cdn = [r for r in fake.requests_to("cdn", method="GET") if r.headers.get("Range")]
    before = [r for r in cdn if r.time < kill_time]
    after = [r for r in cdn if r.time > kill_time]
    assert len(before) >= 4 and after, (len(before), len(after))
    for r in before:
        a, b = requested(r)
        stopped = a + r.sent
        if r.sent < SLACK or stopped >= b:
            continue  # nothing worth resuming, or complete
        # This range had bytes when the worker died: the next attempt asks for its rest from
        # (about) where it stopped, not again from its start.
        resumed = [requested(x)[0] for x in after if stopped - SLACK - ALIGN <= requested(x)[0] <= stopped]
        assert resumed, f"the range {a}-{b} stopped at {stopped}; after the kill: {[requested(x) for x in after]}"
        assert not any(requested(x)[0] == a for x in after), f"the range {a}-{b} started over"


def test_kill_9_of_the_worker_resumes_each_range_where_it_stopped(fake_civitai, daemon_factory):
    daemon = start_ranged_download(fake_civitai, daemon_factory)
    worker = daemon.children()["worker-1"]
    kill_time = time.time()
    os.kill(worker, signal.SIGKILL)
    restarted = daemon.wait_event("worker_restarted", timeout=30)
    assert restarted["exitcode"] == -9
    done = daemon.wait_event("download_completed", timeout=90)
    assert sha256_file(daemon.models_dir / done["path"]) == fake_civitai.file_sha256(5000).lower()
    check_each_range_resumed(fake_civitai, kill_time)
    served = fake_civitai.bytes_served(5000)
    print(f"\nkill -9 of the worker over 4 connections: the CDN sent {served / SIZE:.3f}x the file")
    assert served < SIZE + 4 * SLACK, f"served {served / SIZE:.2f}x the file"
    assert daemon.job(done["job_id"])["attempts"] == 2
    assert names_besides_sidecars(daemon.models_dir / "checkpoint") == ["model.safetensors"]
    assert daemon.stop() == 0


def test_kill_9_of_the_whole_tree_then_restart_resumes_each_range(fake_civitai, daemon_factory):
    daemon = start_ranged_download(fake_civitai, daemon_factory)
    kill_time = time.time()
    daemon.kill_tree()
    assert not (daemon.models_dir / "checkpoint" / "model.safetensors").exists()
    daemon.start()
    done = daemon.wait_event("download_completed", timeout=90)
    assert sha256_file(daemon.models_dir / done["path"]) == fake_civitai.file_sha256(5000).lower()
    check_each_range_resumed(fake_civitai, kill_time)
    assert fake_civitai.bytes_served(5000) < SIZE + 4 * SLACK
    assert daemon.stop() == 0


def present_over_time(samples: list[tuple[float, int]], t: float) -> float:
    """Bytes on disk at time t, between the two samples around it."""
    for (ta, pa), (tb, pb) in zip(samples, samples[1:]):
        if ta <= t <= tb:
            return pa + (pb - pa) * (t - ta) / (tb - ta) if tb > ta else pb
    raise AssertionError(f"no samples around {t}")


def test_two_workers_together_hold_the_speed_cap(fake_civitai, daemon_factory):
    rate = 8_000_000
    size = 30 * MiB
    add_model(fake_civitai, 100, 1000, 5000, size, "a.safetensors")
    add_model(fake_civitai, 200, 2000, 6000, size, "b.safetensors")
    config = base_config(fake_civitai, workers=2, connections=4, max_speed=rate)
    daemon = daemon_factory(config, [{"modelId": 100, "model_type": "checkpoint"},
                                     {"modelId": 200, "model_type": "checkpoint"}])
    # The rate in force, as the supervisor keeps it for every connection of every worker.
    SharedRateLimit(daemon.data_dir / "locks" / "speed.rate").set_rate(rate)
    # What is on disk, as each job's sidecar records it (every half second; its mtime says when):
    # the bytes the fake has sent include what waits in the sockets' buffers.
    sides = [daemon.models_dir / "checkpoint" / f".{n}.safetensors.part.json" for n in "ab"]
    samples: list[list[tuple[float, int]]] = [[], []]
    daemon.start(wait_ready=False)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not all(s and s[-1][1] >= 0.95 * size for s in samples):
        for side, series in zip(sides, samples):
            try:
                stamp = side.stat().st_mtime
                missing = json.loads(side.read_text()).get("missing")
            except (OSError, ValueError):
                continue
            if missing is not None and (not series or stamp > series[-1][0]):
                series.append((stamp, size - sum(b - a for a, b in missing)))
        time.sleep(0.02)
    daemon.wait_ready()
    done = [daemon.wait_event("download_completed", lambda e, v=v: e["version_id"] == v, timeout=60)
            for v in (1000, 2000)]
    for event, fid in zip(done, (5000, 6000)):
        assert sha256_file(daemon.models_dir / event["path"]) == fake_civitai.file_sha256(fid).lower()
    # The steady part: both files past a tenth, neither past nine tenths (the cap's burst and
    # the start-up are outside it): both workers download all along.
    t0 = max(next(t for t, n in series if n >= 0.1 * size) for series in samples)
    t1 = min(next(t for t, n in series if n >= 0.9 * size) for series in samples)
    assert t1 - t0 > 2, (t0, t1)
    achieved = sum(present_over_time(series, t1) - present_over_time(series, t0) for series in samples) / (t1 - t0)
    print(f"\nspeed cap {rate / 1e6:.1f} MB/s, two workers over 4 connections each: {achieved / 1e6:.2f} MB/s "
          f"over {t1 - t0:.1f} s")
    assert abs(achieved - rate) / rate < 0.05, achieved
    ranged = [r for r in fake_civitai.requests_to("cdn", method="GET") if r.headers.get("Range")]
    assert len(ranged) >= 8, "the downloads did not use several connections"
    assert daemon.stop() == 0
