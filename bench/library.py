"""Benchmarks of the library import (`supervisor.py import`, workers/library.py).

    uv run python bench/library.py [--gib 2] [--files 8] [--repeat 3] [--small 1000] [--dir PATH]

1. Hashing throughput of the import's own path (run_scan with nothing recorded, no Civitai) over
   `--gib` GiB in `--files` files, on 1 thread and on the default number, against `sha256sum`,
   `openssl dgst -sha256` (both one process over all files, i.e. one core) and `openssl` on as
   many files at once as the import hashes (xargs -P); cold (every file's pages dropped with
   posix_fadvise(POSIX_FADV_DONTNEED) after an fsync: drop_caches is not used, the machine is
   shared) and warm. Medians of `--repeat` runs, and the ratios.
2. The read size: warm, one thread, 256 KiB to 16 MiB buffers.
3. A second scan of `--small` unchanged files (all known to the fake, all in the manifest): the
   in-process import (import_here: the store, the manifest, the walk, the plan) and the whole
   command (`supervisor.py import`, a fresh interpreter). Target: under 1 s.
4. Civitai requests for 100 new files (target: 1 batch), then for 150 more.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchkit import REPO, bench_dir, have, load_avg, median  # noqa: E402

import workers.library as library  # noqa: E402
from ipc.config import load_config  # noqa: E402
from tests.fakeciv import FakeCivitai  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30


def make_big_files(folder: Path, total: int, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    block = os.urandom(16 * MiB)  # random (no file system compresses it), varied per file below
    paths = []
    for i in range(n):
        path = folder / f"big{i}.safetensors"
        size = total // n
        with open(path, "wb") as fh:
            written = 0
            while written < size:
                piece = block[: min(len(block), size - written)]
                fh.write(i.to_bytes(8, "little") + piece[8:])
                written += len(piece)
            fh.flush()
            os.fsync(fh.fileno())
        paths.append(path)
    return paths


def evict(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths: list[Path]) -> None:
    for path in paths:
        with open(path, "rb") as fh:
            while fh.read(8 * MiB):
                pass


def time_ours(root: Path, threads: int) -> float:
    start = time.perf_counter()
    outcome = library.run_scan(root, None, entries=[], known_files={}, answers={}, lookup=None, threads=threads)
    elapsed = time.perf_counter() - start
    assert outcome.scan["state"] == "done" and outcome.hashed_files == outcome.scan["files_total"], outcome.scan
    return elapsed


def time_command(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def throughput(args, base: Path) -> None:
    root = base / "big"
    total = int(args.gib * GiB)
    print(f"writing {args.gib:g} GiB in {args.files} files …", flush=True)
    paths = make_big_files(root / "checkpoints", total, args.files)
    size = sum(p.stat().st_size for p in paths)
    threads = library.default_threads()
    names = [str(p) for p in paths]
    contenders = {
        "import, 1 thread": lambda: time_ours(root, 1),
        f"import, {threads} threads (default)": lambda: time_ours(root, threads),
    }
    if have("sha256sum"):
        contenders["sha256sum (one process)"] = lambda: time_command(["sha256sum", *names])
    if have("openssl"):
        contenders["openssl dgst -sha256 (one process)"] = lambda: time_command(["openssl", "dgst", "-sha256", *names])
        contenders[f"openssl, {threads} at once (xargs -P{threads})"] = lambda: time_command(
            ["sh", "-c", f'printf "%s\\0" "$@" | xargs -0 -n1 -P{threads} openssl dgst -sha256', "sh", *names])
    print(f"\n1. hashing {size / GiB:.2f} GiB in {len(paths)} files (medians of {args.repeat}; GB = 1e9 bytes)")
    results: dict[tuple[str, str], float] = {}
    for cache in ("cold", "warm"):
        for name, run in contenders.items():
            times = []
            for _ in range(args.repeat):
                evict(paths) if cache == "cold" else warm(paths)
                times.append(run())
            results[(cache, name)] = median(times)
            print(f"   {cache:4}  {name:40} {size / median(times) / 1e9:6.2f} GB/s  ({median(times):.2f} s)", flush=True)
    for cache in ("cold", "warm"):
        ours1 = results[(cache, "import, 1 thread")]
        oursn = results[(cache, f"import, {threads} threads (default)")]
        peers = [(n, t) for (c, n), t in results.items() if c == cache and not n.startswith("import")]
        for peer, t in peers:
            print(f"   {cache}: import 1 thread / {peer}: {t / ours1:.2f}x; default / {peer}: {t / oursn:.2f}x")
    print("\n2. read size (warm, 1 thread)")
    default = library.HASH_BUF_BYTES
    try:
        for buf in (256 << 10, 1 << 20, 4 << 20, 16 << 20):
            library.HASH_BUF_BYTES = buf
            warm(paths)
            t = median([time_ours(root, 1) for _ in range(args.repeat)])
            print(f"   {buf >> 10:6} KiB  {size / t / 1e9:6.2f} GB/s")
    finally:
        library.HASH_BUF_BYTES = default
    shutil.rmtree(root)


def small_library(args, base: Path) -> None:
    n = args.small
    folder = base / "small"
    fake = FakeCivitai()
    try:
        for i in range(n + 250):
            fake.add_model(10_000 + i, name=f"L{i}", type="LORA", versions=[dict(id=20_000 + i, files=[
                dict(id=30_000 + i, name=f"l{i}.safetensors", primary=True, size_bytes=4096, seed=i)])])
        root = folder / "webui"
        for i in range(n):
            path = root / f"models/Lora/set{i % 10}/l{i}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(fake.file_bytes(30_000 + i))
        (folder / "config.json").write_text(json.dumps({"civitai_url": fake.api_url, "throttle": 0,
                                                        "download_dir": "webui"}))
        (folder / "manifest.json").write_text("[]")
        cfg, _ = load_config(folder / "config.json")
        first = library.import_here(cfg, None, False)
        assert first["state"] == "done" and first["added"] == n, first
        by_hash = "/model-versions/by-hash"
        print(f"\n3. a second scan of {n} unchanged files ({n} manifest entries)")
        print(f"   first scan: {first['seconds']:.2f} s, {len(fake.requests_to('api', path_re=by_hash))} by-hash "
              f"requests for {n} new files")
        inproc, command, asked = [], [], []
        for _ in range(args.repeat):
            fake.clear_requests()
            start = time.perf_counter()
            scan = library.import_here(cfg, None, False)
            inproc.append(time.perf_counter() - start)
            assert scan["bytes_total"] == 0 and scan["added"] == 0 and scan["already_listed"] == n, scan
            command.append(time_command([sys.executable, str(REPO / "supervisor.py"), "import", "--config",
                                         str(folder / "config.json")]))
            asked.append(len(fake.requests))
        print(f"   in-process (import_here): median {median(inproc) * 1000:.0f} ms "
              f"(min {min(inproc) * 1000:.0f}, max {max(inproc) * 1000:.0f}); target < 1000 ms")
        print(f"   the whole command (fresh interpreter): median {median(command) * 1000:.0f} ms")
        print(f"   requests to Civitai during the second scans: {sum(asked)}")
        print("\n4. Civitai requests for new files")
        for extra in (100, 150):
            start_i = n if extra == 100 else n + 100
            for i in range(start_i, start_i + extra):
                path = root / f"models/Lora/new/l{i}.safetensors"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(fake.file_bytes(30_000 + i))
            fake.clear_requests()
            scan = library.import_here(cfg, None, False)
            sent = fake.requests_to("api", path_re=by_hash)
            print(f"   {extra} new files: {len(sent)} by-hash request(s) of {[len(json.loads(r.body)) for r in sent]} "
                  f"hashes; {scan['added']} added; {len(fake.requests)} requests in all")
    finally:
        fake.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    base = bench_dir(args.dir, "library-")
    print(f"bench/library.py in {base}; load average before: {load_avg()}; "
          f"default hashing threads: {library.default_threads()}")
    try:
        if not args.skip_throughput:
            throughput(args, base)
        small_library(args, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"\nload average after: {load_avg()}")


if __name__ == "__main__":
    main()
