"""Adopting the library the user already has: walk download_dir, hash its model files (several at
once, each at what one core's SHA-256 allows, remembered by path, size and mtime), identify them on
Civitai by SHA-256 in batches, and plan the manifest entries that pin each file where it is.

`run_scan` does one scan with everything it needs given as data and everything it learns handed
to callbacks, so it runs the same in `supervisor.py import` with no daemon (`import_here`: the
callbacks write the store, the result goes to manifest.json) and in a child of the daemon, which
must not open SQLite (`scan_child`: the callbacks become messages to the supervisor).
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from ipc.library import (
    LibraryError,
    due_for_lookup,
    is_model_file,
    new_scan,
    scan_folder,
)
from ipc.manifest import ManifestError, validate_entry
from ipc.naming import FolderError, check_folder, fold_case, safe_filename
from workers.civitai import BY_HASH_MAX, CivitaiError, file_sha256

log = logging.getLogger("library")

HASH_BUF_BYTES = 1 << 20  # per read: 256 KiB to 1 MiB hash alike, 4 MiB and up a little slower (bench/library.py)
PROGRESS_INTERVAL_S = 0.25
RATE_LIMIT_TRIES = 4  # a 429 from by-hash: wait (Retry-After, else RATE_LIMIT_WAIT_S) and ask again
RATE_LIMIT_WAIT_S = 30.0
O_BINARY = getattr(os, "O_BINARY", 0)
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def default_threads() -> int:
    """Files hashed at once: hashlib lets go of the GIL, so each thread gets a core."""
    return max(1, min(4, os.cpu_count() or 1))


class ScanCancelled(Exception):
    pass


@dataclass(frozen=True)
class LibraryFile:
    rel: str  # "<folder>/<name>", relative to download_dir: the key of the store's files table
    folder: str  # the model_type, as written on disk
    name: str
    size: int
    mtime_ns: int


# --- walking ---------------------------------------------------------------------------------


def _link(entry: os.DirEntry) -> bool:
    if entry.is_symlink():
        return True
    if sys.platform == "win32":  # a junction is no symlink to Python 3.11, and leads elsewhere all the same
        try:
            attrs = entry.stat(follow_symlinks=False).st_file_attributes
        except OSError:
            return False
        return bool(attrs & getattr(stat, "FILE_ATTRIBUTE_REPARSE_POINT", 0))
    return False


def walk_library(download_dir: Path, folder: str | None = None) -> tuple[list[LibraryFile], list[list[str]]]:
    """The model files under download_dir (or its `folder`), sorted by path, and what was left
    out that a user should hear about, as [path, why]. Hidden files and folders (partial files
    too), sidecars and other files that are no model are passed over in silence; symlinks are
    never followed."""
    base = Path(os.path.abspath(download_dir))
    files: list[LibraryFile] = []
    skipped: list[list[str]] = []
    stack = [folder or ""]
    while stack:
        rel_dir = stack.pop()
        try:
            with os.scandir(base / rel_dir if rel_dir else base) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            skipped.append([rel_dir or ".", f"cannot be read ({exc.strerror or type(exc).__name__})"])
            continue
        subdirs = []
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue  # hidden, and the daemon's own .<name>.part / .part.json
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if _link(entry):
                if entry.is_dir() or is_model_file(name):
                    skipped.append([rel, "a symlink: the import follows no link"])
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(rel)
                    continue
                if not is_model_file(name):
                    continue
                st = entry.stat(follow_symlinks=False)
            except OSError as exc:
                skipped.append([rel, f"cannot be read ({exc.strerror or type(exc).__name__})"])
                continue
            why = _not_adoptable(rel_dir, name, st)
            if why:
                skipped.append([rel, why])
                continue
            files.append(LibraryFile(rel, rel_dir, name, st.st_size, st.st_mtime_ns))
        stack.extend(reversed(subdirs))
    files.sort(key=lambda f: f.rel)
    return files, skipped


def _not_adoptable(folder: str, name: str, st: os.stat_result) -> str | None:
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if not folder:
        return "directly in download_dir: a manifest entry needs a folder (model_type); move it into one"
    try:
        if check_folder(folder) != folder:
            return "its folder's name is not in Unicode NFC form, which the manifest needs; rename the folder"
    except FolderError as exc:
        return f"its folder cannot be a model_type: {exc}"
    if safe_filename(name) != name:
        return "its name holds characters the manifest does not allow (or is too long); rename the file"
    return None


# --- hashing ---------------------------------------------------------------------------------


def cached_hash(f: LibraryFile, known_files: dict[str, dict]) -> str | None:
    """The SHA-256 recorded for this path at this size and mtime, if any (lower-case)."""
    record = known_files.get(f.rel)
    if record and record.get("size") == f.size and record.get("mtime_ns") == f.mtime_ns and record.get("sha256"):
        return str(record["sha256"]).lower()
    return None


class _Counter:
    """Bytes hashed so far by one thread: only that thread writes it, the progress reader sums."""

    __slots__ = ("n",)

    def __init__(self):
        self.n = 0


def hash_file(path: Path, buf: bytearray, counter: _Counter, stop: threading.Event) -> tuple[str, int, int]:
    """SHA-256 (lower-case hex) of one file read into the caller's buffer, and the (size,
    mtime_ns) it had when done. Follows no symlink; raises ScanCancelled once `stop` is set."""
    fd = os.open(path, os.O_RDONLY | O_BINARY | O_NOFOLLOW)
    try:
        if hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # larger readahead
            except OSError:
                pass
        hasher = hashlib.sha256()
        view = memoryview(buf)
        with io.FileIO(fd, "r", closefd=False) as raw:
            while True:
                n = raw.readinto(view)
                if not n:
                    break
                hasher.update(view[:n])  # hashlib lets go of the GIL for large updates
                counter.n += n
                if stop.is_set():
                    raise ScanCancelled()
        st = os.fstat(fd)
        return hasher.hexdigest(), st.st_size, st.st_mtime_ns
    finally:
        os.close(fd)


# --- identifying -----------------------------------------------------------------------------


def answer_of(version: dict, f: dict) -> dict:
    """What is kept of a by-hash answer for one file: enough for its manifest entry and for
    saying what it is."""
    model = version.get("model")
    if not isinstance(model, dict):
        model = {}
    return {"modelId": version.get("modelId"), "modelVersionId": version.get("id"), "fileId": f.get("id"),
            "updatedAt": version.get("updatedAt") or version.get("publishedAt"), "name": f.get("name"),
            "model_name": model.get("name"), "version_name": version.get("name"), "type": model.get("type"),
            "file_type": f.get("type"), "base_model": version.get("baseModel")}


def answers_from(versions: list[dict], asked: list[str], now: float) -> dict[str, dict]:
    """One by-hash answer as {SHA-256: {"t": now, "v": answer or None}} for every hash asked."""
    asked_set = set(asked)
    out: dict[str, dict] = {sha: {"t": now, "v": None} for sha in asked}
    for version in versions:
        for f in version.get("files") or []:
            if not isinstance(f, dict):
                continue
            sha = (file_sha256(f) or "").upper()
            if sha in asked_set and out[sha]["v"] is None and isinstance(version.get("modelId"), int) \
                    and isinstance(version.get("id"), int) and isinstance(f.get("id"), int):
                out[sha] = {"t": now, "v": answer_of(version, f)}
    return out


# --- planning --------------------------------------------------------------------------------


@dataclass
class Plan:
    entries: list[dict] = field(default_factory=list)  # to add to manifest.json
    matched: int = 0  # files that are known Civitai files
    already_listed: int = 0
    unknown: list[str] = field(default_factory=list)
    differs: list[str] = field(default_factory=list)
    skipped: list[list[str]] = field(default_factory=list)
    needs_lookup: list[str] = field(default_factory=list)  # hashes the plan could use an answer for


# Windows and macOS take "Lora/X.safetensors" and "lora/x.safetensors" for one file: so does the plan there.
CASE_INSENSITIVE_FS = os.name == "nt" or sys.platform == "darwin"


def _place(folder, name) -> tuple:
    if CASE_INSENSITIVE_FS:
        return (fold_case(str(folder)), fold_case(str(name)))
    return (folder, name)


def _listed_at(entries: list[dict]) -> dict[tuple, dict]:
    return {_place(e.get("model_type"), e["filename"]): e for e in entries if e.get("filename")}


def plan_import(found: list[tuple[str, str]], answers: dict[str, dict], entries: list[dict]) -> Plan:
    """Pure: the manifest entries that pin each identified file (rel, sha256) where it is, given
    the remembered answers and the entries in force. A file at the place an entry names is
    already listed (or differs, when its bytes are not the entry's sha256); a file of a listed
    fileId, or of a model an entry fetches into that folder without naming a file yet, is
    already listed; a file Civitai does not know is unknown. Nothing is ever moved or renamed."""
    plan = Plan()
    at = _listed_at(entries)
    file_ids = {e["fileId"] for e in entries if e.get("fileId") is not None}
    open_models = {(e["modelId"], e.get("model_type"), e.get("modelVersionId")) for e in entries
                   if e.get("fileId") is None}
    for rel, sha in found:
        folder, _, name = rel.rpartition("/")
        entry = at.get(_place(folder, name))
        if entry is not None:
            want = str(entry.get("sha256") or "").lower()
            if want and want != sha.lower():
                plan.differs.append(rel)
            else:
                plan.already_listed += 1
                if entry.get("fileId") is not None:
                    plan.matched += 1
            continue
        record = answers.get(sha.upper())
        if record is None:
            plan.needs_lookup.append(sha.upper())
        answer = record.get("v") if record else None
        if not answer:
            plan.unknown.append(rel)
            continue
        plan.matched += 1
        if answer["fileId"] in file_ids or (answer["modelId"], folder, None) in open_models \
                or (answer["modelId"], folder, answer["modelVersionId"]) in open_models:
            plan.already_listed += 1
            continue
        new = {"modelId": answer["modelId"], "modelVersionId": answer["modelVersionId"], "fileId": answer["fileId"],
               "model_type": folder, "sha256": sha.upper(), "filename": name}
        if answer.get("updatedAt"):
            new["updatedAt"] = answer["updatedAt"]
        try:
            validate_entry(new, rel)
        except ManifestError as exc:
            plan.skipped.append([rel, f"cannot be a manifest entry: {exc}"])
            continue
        plan.entries.append(new)
        file_ids.add(new["fileId"])
        at[_place(folder, name)] = new
    return plan


# --- one scan --------------------------------------------------------------------------------


@dataclass
class ScanOutcome:
    scan: dict  # the shape of ipc.library.new_scan
    entries: list[dict]  # the manifest entries to add (also in a dry run: what would be added)
    found: list[tuple[str, str]]  # (rel, sha256) of every model file hashed or known, for plan_import again
    answers: dict = field(default_factory=dict)  # every answer known at the end (remembered and new)
    hashed_files: int = 0  # files read in this scan (not known from an earlier one)
    requests: int = 0  # by-hash requests sent


def run_scan(download_dir: Path, folder: str | None, *, entries: list[dict], known_files: dict[str, dict],
             answers: dict[str, dict], lookup: Callable[[list[str]], list[dict]] | None,
             on_hashed: Callable[[list[tuple[str, str, int, int]]], None] = lambda records: None,
             on_answers: Callable[[dict[str, dict]], None] = lambda batch: None,
             on_progress: Callable[[dict], None] = lambda scan: None,
             should_stop: Callable[[], bool] = lambda: False, dry_run: bool = False,
             threads: int | None = None, clock: Callable[[], float] = time.time,
             sleep: Callable[[float], None] = time.sleep) -> ScanOutcome:
    """One scan of download_dir (or its `folder`, already checked with ipc.library.scan_folder).

    Given as data: the manifest `entries` in force, the store's `known_files` (path -> {sha256,
    size, mtime_ns}) and the remembered by-hash `answers` (SHA-256 -> {"t", "v"}). `lookup` asks
    Civitai about at most 100 hashes (CivitaiClient.versions_by_hash; None: ask nothing).
    Handed on as they are known, so that a kill loses none of them: `on_hashed([(rel, sha256,
    size, mtime_ns), …])` after each file hashed, `on_answers({SHA-256: {"t", "v"}})` after each
    by-hash request, `on_progress(scan)` at most every PROGRESS_INTERVAL_S. All callbacks run in
    the calling thread. Never raises for what goes wrong during the scan: the outcome's scan has
    state "failed" and an `error` sentence (a cancel: "cancelled")."""
    started = time.monotonic()
    scan = new_scan(folder, dry_run)
    answers = dict(answers)
    outcome = ScanOutcome(scan=scan, entries=[], found=[], answers=answers)

    last_progress = 0.0

    def tick(force: bool = False) -> None:
        nonlocal last_progress
        now = time.monotonic()
        scan["seconds"] = round(now - started, 3)
        if force or now - last_progress >= PROGRESS_INTERVAL_S:
            last_progress = now
            on_progress(dict(scan))

    try:
        files, skipped = walk_library(download_dir, folder)
        scan["skipped"] = skipped
        scan["files_total"] = len(files)
        found: list[tuple[str, str]] = []
        todo: list[LibraryFile] = []
        for f in files:
            sha = cached_hash(f, known_files)
            if sha is None:
                todo.append(f)
            else:
                found.append((f.rel, sha))
        scan["files_done"] = len(found)
        scan["bytes_total"] = sum(f.size for f in todo)
        tick(force=True)
        outcome.hashed_files = _hash_all(Path(download_dir), todo, found, scan, on_hashed, tick, should_stop,
                                         threads or default_threads())
        found.sort()
        outcome.found = found
        plan = plan_import(found, answers, entries)
        due = due_for_lookup(plan.needs_lookup + [a for a in _unknown_hashes(found, plan, answers)], answers,
                             clock())
        if due and lookup is not None:
            outcome.requests = _identify(due, answers, lookup, on_answers, tick, should_stop, clock, sleep)
            plan = plan_import(found, answers, entries)
        outcome.entries = plan.entries
        scan.update(matched=plan.matched, added=len(plan.entries), already_listed=plan.already_listed,
                    unknown=plan.unknown, differs=plan.differs, skipped=skipped + plan.skipped, state="done")
    except ScanCancelled:
        scan.update(state="failed", error="cancelled")
    except CivitaiError as exc:
        scan.update(state="failed", error=f"Civitai could not identify the files: {exc}; the hashes are kept, "
                                          "so the next import only asks again")
    except OSError as exc:
        scan.update(state="failed", error=f"the scan stopped: {exc}")
    tick(force=True)
    return outcome


def _unknown_hashes(found, plan: Plan, answers: dict) -> list[str]:
    """Hashes of files the plan calls unknown whose answer may be stale (re-asked after a week)."""
    unknown = set(plan.unknown)
    return [sha.upper() for rel, sha in found if rel in unknown and sha.upper() in answers]


def _hash_all(base: Path, todo: list[LibraryFile], found: list, scan: dict, on_hashed, tick, should_stop,
              threads: int) -> int:
    """Hash `todo` on `threads` threads, largest files first (the last one does not run alone
    for long); results are handed on in this thread as each file finishes."""
    if not todo:
        return 0
    stop = threading.Event()
    local = threading.local()
    counters: list[_Counter] = []
    lock = threading.Lock()
    hashed = 0
    done_bytes = 0

    def work(f: LibraryFile):
        if not hasattr(local, "buf"):
            local.buf = bytearray(HASH_BUF_BYTES)
            local.counter = _Counter()
            with lock:
                counters.append(local.counter)
        local.counter.n = 0
        try:
            return hash_file(base / f.rel, local.buf, local.counter, stop)
        finally:
            local.counter.n = 0  # a finished file's bytes are counted by the caller, once

    pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="library-hash")
    try:
        pending = {pool.submit(work, f): f for f in sorted(todo, key=lambda f: -f.size)}
        while pending:
            done, _ = wait(pending, timeout=PROGRESS_INTERVAL_S, return_when=FIRST_COMPLETED)
            for future in done:
                f = pending.pop(future)
                done_bytes += f.size
                try:
                    sha, size, mtime_ns = future.result()
                except ScanCancelled:
                    continue
                except OSError as exc:
                    scan["skipped"].append([f.rel, f"cannot be read ({exc.strerror or type(exc).__name__})"])
                    scan["files_total"] -= 1
                    continue
                if (size, mtime_ns) != (f.size, f.mtime_ns):
                    scan["skipped"].append([f.rel, "changed while it was read (still being written?); scan again"])
                    scan["files_total"] -= 1
                    continue
                hashed += 1
                found.append((f.rel, sha))
                on_hashed([(f.rel, sha, size, mtime_ns)])
                scan["files_done"] += 1
            if should_stop():
                stop.set()
                for future in pending:
                    future.cancel()
                raise ScanCancelled()
            scan["bytes_done"] = done_bytes + sum(c.n for c in counters)
            tick()
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
    scan["bytes_done"] = scan["bytes_total"]
    return hashed


def _identify(due: list[str], answers: dict, lookup, on_answers, tick, should_stop, clock, sleep) -> int:
    """Ask Civitai about `due` in batches of BY_HASH_MAX (each request waits its turn in the
    shared throttle, inside `lookup`); remember each batch's answers at once."""
    requests = 0
    for offset in range(0, len(due), BY_HASH_MAX):
        batch = due[offset: offset + BY_HASH_MAX]
        for attempt in range(1, RATE_LIMIT_TRIES + 1):
            if should_stop():
                raise ScanCancelled()
            try:
                requests += 1
                versions = lookup(batch)
                break
            except CivitaiError as exc:
                if exc.reason != "rate_limited" or attempt == RATE_LIMIT_TRIES:
                    raise
                delay = float(exc.retry_after_s or RATE_LIMIT_WAIT_S)
                log.info("%s; asking again in %.0f s", exc, delay)
                deadline = time.monotonic() + delay
                while time.monotonic() < deadline:
                    if should_stop():
                        raise ScanCancelled() from None
                    sleep(min(PROGRESS_INTERVAL_S, max(0.0, deadline - time.monotonic())))
                    tick()
        batch_answers = answers_from(versions, batch, clock())
        answers.update(batch_answers)
        on_answers(batch_answers)
        tick()
    return requests


# --- `supervisor.py import` with no daemon running ----------------------------------------------

MANIFEST_SAVE_TRIES = 20  # a person's save or an editor's lock in the way: look again, then give up


def import_here(cfg, folder: str | None, dry_run: bool, *, progress: Callable[[dict], None] = lambda scan: None,
                cwd: Path | None = None, should_stop: Callable[[], bool] = lambda: False,
                threads: int | None = None) -> dict:
    """The import done in this process (the caller holds data/daemon.pid, so no daemon starts
    meanwhile): the store's files table and kv keep hashes and answers as they come, and
    manifest.json gets the new entries in one atomic write at the end (never over a broken or
    newer save: a person's save is taken in and the plan made again). Returns the scan.
    Raises LibraryError (the folder), ManifestError (manifest.json is broken: nothing was
    done), StoreOpenError / StoreUnavailable (the database)."""
    from ipc.library import load_answers, save_answers
    from ipc.manifest import ManifestFile
    from ipc.store import JobStore
    from ipc.throttle import Throttle
    from workers.civitai import CivitaiClient

    rel = scan_folder(cfg.download_path, folder, cwd)
    manifest = ManifestFile(cfg.manifest_path, cfg.locks_dir / "manifest.lock")
    manifest.load()
    store = JobStore(cfg.db_path)
    try:
        client = CivitaiClient(cfg.civitai_url, api_key=cfg.civitai_api_key,
                               throttle=Throttle(cfg.locks_dir / "civitai.throttle", cfg.throttle))

        def on_hashed(records):
            with store.transaction():
                for path, sha, size, mtime_ns in records:
                    store.record_file(path, sha, size, mtime_ns)

        captured = CapturingLookup(client)
        outcome = run_scan(cfg.download_path, rel, entries=manifest.entries, known_files=store.all_files(),
                           answers=load_answers(store), lookup=captured, on_hashed=on_hashed,
                           on_answers=lambda batch: save_answers(store, batch), on_progress=progress,
                           should_stop=should_stop, dry_run=dry_run, threads=threads)
        scan = outcome.scan
        if scan["state"] == "done" and not dry_run and outcome.entries:
            _write_entries(manifest, outcome, scan)
            write_adopted_sidecars(cfg, client, outcome.entries, captured.versions, should_stop)
        return scan
    finally:
        store.close()


def _write_entries(manifest, outcome: ScanOutcome, scan: dict) -> None:
    entries = outcome.entries
    for _ in range(MANIFEST_SAVE_TRIES):
        if manifest.save([*manifest.entries, *entries]):
            scan["added"] = len(entries)
            return
        seen = manifest.poll(now_ns=time.time_ns() + 10**12)  # no settling: we are about to write
        if seen == "invalid":
            scan.update(state="failed", added=0, error=f"manifest.json was changed into something invalid while the "
                        f"import ran ({manifest.error}); nothing was added: fix it and run the import again (the "
                        "hashes are kept)")
            return
        if seen == "changed":  # a person's save: plan again on top of it
            plan = plan_import(outcome.found, outcome.answers, manifest.entries)
            entries = plan.entries
            scan.update(matched=plan.matched, already_listed=plan.already_listed, unknown=plan.unknown,
                        differs=plan.differs, added=len(entries))
            if not entries:
                return
            continue
        time.sleep(0.25)  # an editor holds a lock on manifest.json
    scan.update(state="failed", added=0, error="manifest.json stayed locked by another program; nothing was added: "
                "close it and run the import again (the hashes are kept)")


# --- in a child of the daemon -----------------------------------------------------------------


def scan_child(send: Callable[[dict], None], cfg, request: dict, should_stop: Callable[[], bool]) -> None:
    """One scan inside a child of the daemon, which never opens SQLite: what it needs comes in
    `request` as data, what it learns goes out through `send` as messages, in this order:

    - {"type": "library_progress", "scan": {…}} at most 4 a second (the shape of new_scan);
    - {"type": "library_hashes", "files": [[rel, sha256, size, mtime_ns]]} after each file hashed:
      the supervisor records each with store.record_file (a kill loses no hash);
    - {"type": "library_answers", "answers": {SHA-256: {"t", "v"}}} after each by-hash request:
      the supervisor keeps them with ipc.library.save_answers;
    - {"type": "library_done", "scan": {…}, "entries": [new entries], "found": [[rel, sha256]]}
      last: unless dry_run, the supervisor adds the entries (an "add" operation each; or plans
      again with plan_import(found, load_answers(store), keeper.entries) if the manifest
      changed meanwhile).

    request: {"folder": rel or None (checked by the supervisor with ipc.library.scan_folder),
    "dry_run", "entries": the manifest entries in force, "files": store.all_files(), "answers":
    ipc.library.load_answers(store)}."""
    from ipc.throttle import Throttle
    from workers.civitai import CivitaiClient

    client = CivitaiClient(cfg.civitai_url, api_key=cfg.civitai_api_key,
                           throttle=Throttle(cfg.locks_dir / "civitai.throttle", cfg.throttle))
    outcome = run_scan(
        cfg.download_path, request.get("folder"), entries=request.get("entries") or [],
        known_files=request.get("files") or {}, answers=request.get("answers") or {},
        lookup=client.versions_by_hash,
        on_hashed=lambda records: send({"type": "library_hashes", "files": [list(r) for r in records]}),
        on_answers=lambda batch: send({"type": "library_answers", "answers": batch}),
        on_progress=lambda scan: send({"type": "library_progress", "scan": scan}),
        should_stop=should_stop, dry_run=bool(request.get("dry_run")))
    send({"type": "library_done", "scan": outcome.scan, "entries": outcome.entries,
          "found": [list(pair) for pair in outcome.found]})


__all__ = ["LibraryError", "LibraryFile", "Plan", "ScanOutcome", "answer_of", "answers_from", "cached_hash",
           "hash_file", "import_here", "plan_import", "run_scan", "scan_child", "walk_library"]


# --- sidecars of adopted files, and the daemon's child ------------------------------------------------

class CapturingLookup:
    """The by-hash lookup, keeping the full version objects it saw (the sidecars want them)."""

    def __init__(self, client):
        self.client = client
        self.versions: dict[int, dict] = {}

    def __call__(self, hashes: list[str]) -> list[dict]:
        versions = self.client.versions_by_hash(hashes)
        for version in versions:
            if isinstance(version, dict) and isinstance(version.get("id"), int):
                self.versions[version["id"]] = version
        return versions


def write_adopted_sidecars(cfg, client, entries: list[dict], versions: dict[int, dict],
                           should_stop: Callable[[], bool] = lambda: False) -> int:
    """`.civitai.info` and `.preview.<ext>` beside each adopted file (SPEC §10), from the version
    objects this scan's lookup returned, else (an answer remembered from a dry run or an
    interrupted scan) asked again, once per file that has no info file yet. Never raises;
    returns how many files got them."""
    if not cfg.sidecars:
        return 0
    from workers.sidecars import sidecar_state, write_sidecars_for

    done = 0
    for entry in entries:
        if should_stop():
            break
        path = cfg.download_path / entry["model_type"] / entry["filename"]
        version_id = entry.get("modelVersionId")
        version = versions.get(version_id) if isinstance(version_id, int) else None
        try:
            if version is None:
                if sidecar_state(path)["info"]:
                    continue  # written before (an earlier scan, another tool)
                version = client.get_version(entry["modelVersionId"])
            model = version.get("model") if isinstance(version.get("model"), dict) else {}
            write_sidecars_for(version, model, path, client=client, throttle=client.throttle,
                               preview_nsfw=cfg.preview_nsfw, sidecars=cfg.sidecars, locks_dir=cfg.locks_dir)
            done += 1
        except Exception as exc:  # a sidecar is never a failure of the import
            log.warning("sidecars of %s/%s: %s", entry["model_type"], entry["filename"], exc)
    return done


def library_main(name: str, conn, config_path: str, log_channel=None) -> None:
    """The daemon's library child: one scan (the request comes over the pipe), then its
    sidecars, then it exits. It never opens SQLite: it is forked, and the supervisor holds the
    database (what it learns goes back as messages, see scan_child)."""
    from ipc.childmain import Wake
    from ipc.config import load_config
    from ipc.logsetup import setup_child_logging
    from ipc.throttle import Throttle
    from workers.civitai import CivitaiClient
    from workers.worker import Channel, ignore_terminal_interrupt

    ignore_terminal_interrupt()
    cfg, _ = load_config(config_path)
    setup_child_logging(log_channel, secrets=(cfg.civitai_api_key,))
    channel = Channel(conn)
    stop = threading.Event()
    requests_in: list[dict] = []
    got = Wake()  # not an Event: the SIGTERM handler sets it while the main thread waits on it

    def read_channel():
        while not stop.is_set():
            try:
                msg = channel.recv()
            except (EOFError, OSError):
                break
            kind = msg.get("type") if isinstance(msg, dict) else None
            if kind == "scan":
                requests_in.append(msg["request"])
                got.set()
            elif kind in ("stop", "cancel"):
                break
        stop.set()
        got.set()

    import signal

    def on_sigterm(signum, frame):
        stop.set()  # safe: only other threads ever hold this Event's lock, and never for long
        got.set()

    signal.signal(signal.SIGTERM, on_sigterm)
    threading.Thread(target=read_channel, name="channel-reader", daemon=True).start()
    channel.send({"type": "ready", "pid": os.getpid()})
    got.wait()
    if stop.is_set() or not requests_in:
        return
    request = requests_in[0]
    client = CivitaiClient(cfg.civitai_url, api_key=cfg.civitai_api_key,
                           throttle=Throttle(cfg.locks_dir / "civitai.throttle", cfg.throttle))
    lookup = CapturingLookup(client)
    outcome = run_scan(
        cfg.download_path, request.get("folder"), entries=request.get("entries") or [],
        known_files=request.get("files") or {}, answers=request.get("answers") or {}, lookup=lookup,
        on_hashed=lambda records: channel.send({"type": "library_hashes", "files": [list(r) for r in records]}),
        on_answers=lambda batch: channel.send({"type": "library_answers", "answers": batch}),
        on_progress=lambda scan: channel.send({"type": "library_progress", "scan": scan}),
        should_stop=stop.is_set, dry_run=bool(request.get("dry_run")))
    channel.send({"type": "library_done", "scan": outcome.scan, "entries": outcome.entries,
                  "found": [list(pair) for pair in outcome.found]})
    if outcome.scan["state"] == "done" and not request.get("dry_run"):
        n = write_adopted_sidecars(cfg, client, outcome.entries, lookup.versions, stop.is_set)
        if n:
            log.info("library: sidecars written beside %d adopted file(s)", n)
