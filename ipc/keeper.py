"""The supervisor's hold on manifest.json: the entries in force, the changes not yet written
(coalesced: at most one rewrite a second, and always before a stop), and the sync that queues
every entry whose file is missing.

A change (a finished download, an update, an entry added or removed from the API) is applied to
the entries in memory at once and stored in the database as a pending operation in the same
transaction as the job change that caused it; the file is rewritten later. A crash in between
loses nothing: at the next start the pending operations are applied again to the file as it is
(each is idempotent). A person's save that arrives meanwhile becomes the new base, and the
pending operations are applied on top of it.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from ipc.manifest import (
    ManifestFile,
    apply_update,
    describes_file,
    duplicate_entries,
    entry_file_key,
    entry_to_job_spec,
    record_download,
)

log = logging.getLogger("manifest")

WRITE_INTERVAL_S = 1.0


def apply_op(entries: list[dict], op: dict, mode: str,
             by_model: dict[int, list[int]] | None = None) -> tuple[list[dict], dict | None]:
    """One pending operation on a list of entries; returns (entries, the entry it concerns).
    `by_model`: the indices of each model's entries, when the caller keeps them."""
    kind = op["op"]
    if kind == "record":
        candidates = None if by_model is None else by_model.get(op["job"]["model_id"], [])
        out, _ = record_download(entries, op["job"], candidates)
        return out, None
    if kind == "update":
        return apply_update(entries, op["update"], op.get("mode", mode))
    if kind == "add":
        key = entry_file_key(op["entry"])
        if any(entry_file_key(e) == key for e in entries):
            return entries, None
        return [*entries, dict(op["entry"])], op["entry"]
    if kind == "remove_model":
        return [e for e in entries if e["modelId"] != op["model_id"]], None
    if kind == "remove_entry":
        return [e for e in entries if not (e["modelId"] == op["model_id"] and e.get("fileId") == op["file_id"])], None
    raise ValueError(f"unknown manifest operation {kind!r}")


class ManifestKeeper:
    def __init__(self, manifest: ManifestFile, store, mode: str, download_path: Path,
                 clock: Callable[[], float] = time.monotonic, write_interval_s: float = WRITE_INTERVAL_S):
        self.manifest = manifest
        self.store = store
        self.mode = mode
        self.download_path = Path(download_path)
        self.clock = clock
        self.write_interval_s = write_interval_s
        self.entries: list[dict] = list(manifest.entries)
        self._by_model = self._index(self.entries)  # modelId -> positions: a download finds its entry at once
        self._pending: list[tuple[int, dict]] = []
        self._next_write = 0.0
        self._reported_duplicates: set[tuple] = set()

    @property
    def error(self) -> str | None:
        return self.manifest.error

    @property
    def dirty(self) -> bool:
        return bool(self._pending)

    @property
    def pending_count(self) -> int:
        """Changes in force that manifest.json does not show yet."""
        return len(self._pending)

    def load(self) -> int:
        """At start: the operations a crash left unwritten, applied again. Returns their number."""
        self._pending = self.store.manifest_ops()
        self._rebase()
        return len(self._pending)

    @staticmethod
    def _index(entries: list[dict]) -> dict[int, list[int]]:
        by_model: dict[int, list[int]] = {}
        for i, entry in enumerate(entries):
            by_model.setdefault(entry["modelId"], []).append(i)
        return by_model

    def _rebase(self) -> None:
        entries = list(self.manifest.entries)
        for _, op in self._pending:
            entries, _ = apply_op(entries, op, self.mode)
        self.entries = entries
        self._by_model = self._index(entries)

    def apply(self, op: dict) -> dict | None:
        """Apply a change now and write it to the file soon. Call inside the store transaction
        of the job change that causes it. Returns the entry it concerns (update, add)."""
        entries, entry = apply_op(self.entries, op, self.mode, self._by_model)
        if entries is self.entries:
            return entry  # nothing to change
        op_id = self.store.add_manifest_op(op)
        self._pending.append((op_id, op))
        if op["op"] == "record" and len(entries) == len(self.entries):
            pass  # one entry replaced in place: the positions stay
        else:
            self._by_model = self._index(entries)
        self.entries = entries
        return entry

    def records(self, model_id: int, new: dict) -> bool:
        """Whether an entry of `model_id` already describes the file `new` (a stale update)."""
        return any(describes_file(self.entries[i], new) for i in self._by_model.get(model_id, ()))

    def next_due(self) -> float | None:
        """When a pending write is due (monotonic clock), if any."""
        if not self._pending or self.manifest.error is not None:
            return None
        return self._next_write

    def flush(self, force: bool = False) -> bool:
        """Write the pending changes if due (or now with `force`). False when nothing could be
        written (a person's save not taken in yet, a broken one, a lock held by an editor)."""
        if not self._pending:
            return True
        now = self.clock()
        if not force and now < self._next_write:
            return False
        self._next_write = now + self.write_interval_s
        if not self.manifest.save(self.entries):
            return False
        last, self._pending = self._pending[-1][0], []
        self.store.clear_manifest_ops(last)  # may raise StoreUnavailable: the rows stay, harmless
        return True

    def poll(self) -> str | None:
        """A person's save: "changed" (the pending changes are applied on top of it), "invalid"
        (reported; the last good entries stay in force), or None."""
        result = self.manifest.poll()
        if result == "changed":
            self._rebase()
            self._next_write = 0.0
        return result

    # --- what the manifest asks for ---------------------------------------------------------

    def file_present(self, entry: dict, files: dict[str, dict]) -> bool:
        """The entry's file is on disk and is what was verified (size, mtime, hash)."""
        name, sha = entry.get("filename"), entry.get("sha256")
        if not name:
            return False
        rel = f"{entry['model_type']}/{name}"
        try:
            st = os.lstat(self.download_path / rel)
        except OSError:
            return False
        record = files.get(rel)
        return bool(record and record["size"] == st.st_size and record["mtime_ns"] == st.st_mtime_ns
                    and (not sha or record["sha256"] == str(sha).lower()))

    def sync(self, ledger, why: str) -> tuple[list, int]:
        """Queue every entry whose file is missing or differs: one pass over the entries, one
        query for the recorded files. Returns (events, number queued). Call in a transaction."""
        files = self.store.all_files()
        events: list = []
        queued = 0
        duplicates = duplicate_entries(self.entries)
        skip = {i for i, _ in duplicates}
        for i, first in duplicates:
            key = entry_file_key(self.entries[i])
            if key not in self._reported_duplicates:
                self._reported_duplicates.add(key)
                log.warning("manifest.json: entry %d (modelId %s) names the same file as entry %d; they count as "
                            "one", i, self.entries[i]["modelId"], first)
        for i, entry in enumerate(self.entries):
            if i in skip or self.file_present(entry, files):
                continue
            outcome = ledger.queue(entry_to_job_spec(entry), source="manifest", requeue_finished=True)
            if outcome.created:
                queued += 1
                events.extend(outcome.events)
        if queued:
            log.info("manifest (%s): %d file(s) queued", why, queued)
        return events, queued
