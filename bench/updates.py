"""Benchmarks of the update check and of webhooks against the local fake Civitai.

    uv run python bench/updates.py [--models 100] [--throttle 0.05] [--size-mib 128] [--repeat 3]

1. The update check of N models (workers/updater.UpdateChecker with the real client and the
   cross-process throttle), for: nothing new; 10 % with a new version; and the worst case, the
   batch request failing so that every model is asked for alone.
2. One download through the real daemon with a webhook receiver that answers at once, one that
   answers 500, and one that never answers: the time from download_started to download_completed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ipc.throttle import Throttle  # noqa: E402
from tests.fakeciv import FakeCivitai  # noqa: E402
from tests.helpers import Daemon, base_config  # noqa: E402
from tests.webhook_receiver import WebhookReceiver  # noqa: E402
from workers import updater  # noqa: E402
from workers.civitai import CivitaiClient  # noqa: E402

MiB = 1024 * 1024


def build_catalogue(fake: FakeCivitai, n: int) -> list[dict]:
    entries = []
    for i in range(n):
        mid, vid, fid = 10_000 + i, 100_000 + i * 10, 1_000_000 + i * 10
        fake.add_model(mid, name=f"Model {mid}", type="LORA", versions=[
            dict(id=vid, published_at="2024-01-01T00:00:00.000Z",
                 files=[dict(id=fid, name=f"m{mid}.safetensors", size_bytes=4096, primary=True)])])
        version = fake.version_json(vid)
        entries.append({"modelId": mid, "modelVersionId": vid, "fileId": fid, "model_type": "lora",
                        "sha256": version["files"][0]["hashes"]["SHA256"], "updatedAt": version["updatedAt"],
                        "filename": f"m{mid}.safetensors"})
    return entries


def timed_check(fake: FakeCivitai, entries: list[dict], throttle_s: float, folder: Path) -> dict:
    client = CivitaiClient(fake.api_url, throttle=Throttle(folder / "civitai.throttle", throttle_s),
                           session=updater.CountingSession())
    messages: list[dict] = []
    before = len(fake.requests)
    started = time.perf_counter()
    summary = updater.UpdateChecker(client, messages.append).run(entries)
    summary["wall_s"] = time.perf_counter() - started
    summary["fake_saw"] = len(fake.requests) - before
    return summary


def bench_check(n: int, throttle_s: float) -> None:
    print(f"== update check of {n} models, throttle = {throttle_s} s ==")
    with FakeCivitai() as fake, tempfile.TemporaryDirectory() as tmp:
        entries = build_catalogue(fake, n)
        # Warm the fake's hash cache so its first answer is not slower than the rest.
        fake.model_json(entries[0]["modelId"])
        rows = []
        rows.append(("nothing new", timed_check(fake, entries, throttle_s, Path(tmp))))
        for i in range(0, n, 10):
            mid = entries[i]["modelId"]
            fake.add_version(mid, dict(id=entries[i]["modelVersionId"] + 1, published_at="2024-06-01T00:00:00.000Z",
                                       files=[dict(id=entries[i]["fileId"] + 1, name="v2.safetensors",
                                                   size_bytes=4096, primary=True)]))
        rows.append((f"{len(range(0, n, 10))} new versions", timed_check(fake, entries, throttle_s, Path(tmp))))
        fake.set_api_fault(r"ids=", 400)  # the batch refused: every model asked for alone
        rows.append(("batch refused, one by one", timed_check(fake, entries, throttle_s, Path(tmp))))
        fake.clear_faults()
        for label, s in rows:
            print(f"  {label:28s} {s['wall_s']:7.3f} s  {s['requests']:4d} HTTP request(s) "
                  f"(fake saw {s['fake_saw']})  updates {s['updates']:3d}  errors {s['errors']}")


def _ts(event: dict) -> float:
    return datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).timestamp()


def one_download(mode: str, size_mib: int, folder: Path) -> float:
    receiver = WebhookReceiver(mode=mode)
    fake = FakeCivitai()
    daemon = None
    try:
        fake.add_model(100, name="Big", type="Checkpoint", versions=[
            dict(id=1000, published_at="2024-01-01T00:00:00.000Z",
                 files=[dict(id=5000, name="big.safetensors", size_bytes=size_mib * MiB, primary=True)])])
        fake.file_sha256(5000)  # hash the fake's content before timing
        daemon = Daemon(folder, base_config(fake, webhook_url=receiver.url, workers=1, timeout=600),
                        [{"modelId": 100, "modelVersionId": 1000, "model_type": "checkpoint"}])
        daemon.start()
        started = daemon.wait_event("download_started", timeout=60)
        done = daemon.wait_event("download_completed", timeout=300)
        seconds = _ts(done) - _ts(started)
        if mode == "stall":  # proof that the webhook thread was held up meanwhile
            assert len(receiver.deliveries) == 1, len(receiver.deliveries)
        daemon.stop()
        return seconds
    finally:
        if daemon is not None:
            daemon.cleanup()
        fake.close()
        receiver.close()


def bench_webhooks(size_mib: int, repeat: int) -> None:
    print(f"== one {size_mib} MiB download through the daemon, by webhook receiver (median of {repeat}) ==")
    labels = {"ok": "answers at once (204)", "fail": "answers 500", "stall": "never answers"}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("ok", "stall", "fail"):
            times = [one_download(mode, size_mib, Path(tmp) / f"{mode}{i}") for i in range(repeat)]
            print(f"  {labels[mode]:24s} {statistics.median(times):6.3f} s "
                  f"(runs: {', '.join(f'{t:.3f}' for t in times)}; {size_mib / statistics.median(times):.0f} MiB/s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--throttle", type=float, default=0.05)
    parser.add_argument("--size-mib", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-download", action="store_true")
    args = parser.parse_args()
    bench_check(args.models, args.throttle)
    if not args.skip_download:
        bench_webhooks(args.size_mib, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
