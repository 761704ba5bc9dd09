"""manifest.json: validation with errors that name the entry and field, and atomic rewrites
that keep every custom field where the user put it."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ipc import jsonc
from ipc.files import atomic_write, file_lock
from ipc.naming import folder_problem, safe_filename

DEFAULT_PRIORITY = 10
SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
KNOWN_FIELDS = ("modelId", "modelVersionId", "fileId", "model_type", "sha256", "url", "filename",
                "priority", "updatedAt", "file_type", "format", "fp")
# Optional selectors of an entry that names no fileId yet, matched against Civitai's file list.
SELECTOR_FIELDS = ("file_type", "format", "fp")


class ManifestError(Exception):
    """str() is one line: the file, the entry (index and modelId) and the field."""


MAX_ID = 2**53  # what a browser's JSON numbers hold exactly (and far inside SQLite's 2^63)
MAX_PRIORITY = 1_000_000


def _positive_int(value, hi: int = MAX_ID) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= hi


def validate_entry(entry, where: str) -> dict:
    """Check one entry; `where` names it in errors ("entry 3"). Returns the same dict."""
    if not isinstance(entry, dict):
        raise ManifestError(f"{where}: expected an object {{\"modelId\": …, \"model_type\": …}}, got {type(entry).__name__}")
    if "modelId" in entry and _positive_int(entry["modelId"]):
        where = f"{where} (modelId {entry['modelId']})"

    def bad(field, expect):
        return ManifestError(f"{where}: field '{field}': expected {expect}, got {entry.get(field)!r}")

    if "modelId" not in entry:
        raise ManifestError(f"{where}: field 'modelId' is required (the number in civitai.com/models/<id>)")
    if not _positive_int(entry["modelId"]):
        raise bad("modelId", f"a positive integer up to {MAX_ID}")
    if "model_type" not in entry:
        raise ManifestError(f"{where}: field 'model_type' is required (the folder under download_dir, such as "
                            f"\"checkpoint\", \"Lora\" or \"models/Stable-diffusion\")")
    problem = folder_problem(entry["model_type"])
    if problem:
        raise ManifestError(f"{where}: field 'model_type': {problem}")
    for field in ("modelVersionId", "fileId"):
        if entry.get(field) is not None and not _positive_int(entry[field]):
            raise bad(field, f"a positive integer up to {MAX_ID}")
    if entry.get("sha256") not in (None, "") and not (isinstance(entry["sha256"], str) and SHA256_RE.match(entry["sha256"])):
        raise bad("sha256", "64 hexadecimal characters")
    if "priority" in entry and not (_positive_int(entry["priority"], MAX_PRIORITY)):
        raise bad("priority", f"an integer from 1 (the most urgent) to {MAX_PRIORITY}")
    if entry.get("filename") not in (None, ""):
        name = entry["filename"]
        if not isinstance(name, str) or safe_filename(name) != name:
            raise bad("filename", "a plain file name without folders or special characters")
    for field in SELECTOR_FIELDS:
        if entry.get(field) is not None and not (isinstance(entry[field], str) and entry[field].strip()):
            raise bad(field, "a string such as " + {"file_type": '"Model" or "VAE"', "format": '"SafeTensor"',
                                                    "fp": '"fp16"'}[field])
    for field in ("url", "updatedAt"):
        if entry.get(field) is not None and not isinstance(entry[field], str):
            raise bad(field, "a string")
    return entry


def parse_manifest(text: str, path: Path | str = "manifest.json") -> list[dict]:
    if not text.strip():
        return []
    try:
        data = jsonc.loads(text)
    except jsonc.JsoncError as exc:
        raise ManifestError(f"{path}: {exc}") from None
    if not isinstance(data, list):
        raise ManifestError(f"{path}: expected a JSON array [ … ] of entries at the top, got {type(data).__name__}")
    for index, entry in enumerate(data):
        try:
            validate_entry(entry, f"entry {index}")
        except ManifestError as exc:
            raise ManifestError(f"{path}: {exc}") from None
    return data


def entry_priority(entry: dict) -> int:
    return int(entry.get("priority") or DEFAULT_PRIORITY)


def render(entries: list[dict], cache: dict[int, tuple[dict, dict, str]] | None = None) -> bytes:
    """The file's text: what `json.dumps(entries, indent=2)` gives, byte for byte. json's
    indenting encoder is pure Python (33 us an entry here, most of a rewrite's cost): with `cache`
    (kept by the caller), a rewrite after a few changes indents only the changed entries. An entry
    is found in it by identity and taken only if it still equals the copy made when it was
    rendered (a C comparison, cheaper than encoding it again), so one changed in place is rendered
    again. The cache is left holding exactly the entries rendered (and so keeps them alive: an id
    cannot be reused while it is a key)."""
    fresh: dict[int, tuple[dict, dict, str]] = {}
    parts = []
    for entry in entries:
        hit = cache.get(id(entry)) if cache else None
        if hit is not None and hit[0] is entry and hit[1] == entry:
            text = hit[2]
        else:  # a JSON string holds no raw newline: every one here is the layout's
            text = json.dumps(entry, indent=2, ensure_ascii=False).replace("\n", "\n  ")
            hit = (entry, copy.deepcopy(entry), text)
        fresh[id(entry)] = hit
        parts.append(text)
    if cache is not None:
        cache.clear()
        cache.update(fresh)
    body = "[\n  " + ",\n  ".join(parts) + "\n]" if parts else "[]"
    return (body + "\n").encode("utf-8")


@dataclass(frozen=True)
class FileState:
    """What we know of the file on disk, to tell a person's save from our own write."""

    exists: bool
    mtime_ns: int = 0
    size: int = 0
    digest: str = ""


def file_state(path: Path) -> FileState:
    try:
        data = path.read_bytes()
        st = os.stat(path)
    except FileNotFoundError:
        return FileState(False)
    return FileState(True, st.st_mtime_ns, st.st_size, hashlib.sha256(data).hexdigest())


def quick_stat(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


class ManifestFile:
    """The supervisor's hold on manifest.json: the last good entries, and whether the file on
    disk is still what we last read or wrote (if not, a person saved it)."""

    def __init__(self, path: Path, lock_path: Path):
        self.path = Path(path)
        self.lock_path = Path(lock_path)  # under data/: the daemon writes nothing else beside config.json
        self.entries: list[dict] = []
        self.error: str | None = None
        self._known = FileState(False)
        self._stat: tuple[int, int] | None = None
        self._rendered: dict[int, tuple[dict, dict, str]] = {}  # render()'s cache: each entry's indented text

    def load(self) -> list[dict]:
        """At start: parse or raise ManifestError. A missing file is an empty manifest."""
        state = file_state(self.path)
        text = self.path.read_text(encoding="utf-8") if state.exists else ""
        self.entries = parse_manifest(text, self.path)
        self._known = state
        self._stat = quick_stat(self.path)
        self.error = None
        return self.entries

    def poll(self, now_ns: int | None = None) -> str | None:
        """"changed" after a valid save by someone else, "invalid" after a bad one (reported once
        per save), None when nothing changed. A bad save leaves `entries` as they were."""
        stat = quick_stat(self.path)
        if stat == self._stat:
            return None
        now_ns = time.time_ns() if now_ns is None else now_ns
        if stat is not None and now_ns - stat[0] < SETTLE_NS:
            return None  # an editor may still be writing it: look again at the next poll
        self._stat = stat
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = None
        digest = hashlib.sha256(data).hexdigest() if data is not None else ""
        if digest == self._known.digest and (data is not None) == self._known.exists:
            return None
        self._known = FileState(data is not None, stat[0] if stat else 0, stat[1] if stat else 0, digest)
        try:
            entries = parse_manifest(data.decode("utf-8") if data is not None else "", self.path)
        except (ManifestError, UnicodeDecodeError) as exc:
            self.error = str(exc) if isinstance(exc, ManifestError) else f"{self.path}: not UTF-8 text: {exc}"
            return "invalid"
        self.entries = entries
        self.error = None
        return "changed"

    def save(self, entries: list[dict]) -> bool:
        """Write `entries` unless the file holds a save we have not taken in yet (or a broken
        one, which must stay as its author left it), or another program holds a lock on it.
        Returns whether it wrote."""
        if self.error is not None:
            return False
        data = render(entries, self._rendered)
        with file_lock(self.lock_path), _lock_if_free(self.path) as locked:
            if not locked:
                return False  # an editor or script holds manifest.json: try again later
            current = file_state(self.path)
            if current.digest != self._known.digest or current.exists != self._known.exists:
                return False
            try:
                atomic_write(self.path, data)
            except PermissionError:  # Windows: an editor has the file open without sharing
                return False
            stat = quick_stat(self.path)
        self.entries = entries
        # What we wrote, not a re-read: a save landing right after ours must still look new.
        self._known = FileState(True, stat[0] if stat else 0, stat[1] if stat else 0,
                                hashlib.sha256(data).hexdigest())
        self._stat = stat
        return True


SETTLE_NS = 300_000_000  # a save younger than this may be half-written


@contextmanager
def _lock_if_free(path: Path):
    """Hold an advisory lock on the file itself while we replace it, so tools that lock it
    (`flock manifest.json …`) and the daemon never write at once. Yields False if it is held."""
    if os.name == "nt":  # Windows editors lock by opening without sharing; os.replace then fails
        yield True
        return
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


# --- pure merges: what a download or an update does to the entries -------------------------

# Manifest fields that describe one version's file: an update replaces them all together.
VERSION_FIELDS = ("modelVersionId", "fileId", "sha256", "url", "filename", "updatedAt")


def _norm(value) -> str | None:
    return str(value).strip().lower() if value not in (None, "") else None


def entry_selectors(entry: dict) -> tuple:
    return tuple(_norm(entry.get(k)) for k in SELECTOR_FIELDS)


def entry_file_key(entry: dict) -> tuple:
    """Which file an entry asks for: two entries with the same key are one (SPEC §4)."""
    if entry.get("fileId") is not None:
        return ("file", entry.get("modelVersionId"), entry["fileId"])
    if entry.get("modelVersionId") is not None:
        return ("version", entry["modelVersionId"], entry_selectors(entry))
    return ("model", entry["modelId"], entry_selectors(entry), entry.get("model_type"))


def duplicate_entries(entries: list[dict]) -> list[tuple[int, int]]:
    """(index, index of the first entry it repeats) for each entry that names a file an earlier
    entry already names."""
    first: dict[tuple, int] = {}
    out = []
    for i, entry in enumerate(entries):
        key = entry_file_key(entry)
        if key in first:
            out.append((i, first[key]))
        else:
            first[key] = i
    return out


def entry_to_job_spec(entry: dict) -> dict:
    """What the ledger queues for an entry."""
    return {"model_id": entry["modelId"], "version_id": entry.get("modelVersionId"), "file_id": entry.get("fileId"),
            "model_type": entry["model_type"], "filename": entry.get("filename") or None,
            "sha256": entry.get("sha256") or None, "priority": entry_priority(entry),
            **{k: entry.get(k) for k in SELECTOR_FIELDS}}


def find_job_entry(entries: list[dict], job: dict, candidates: list[int] | None = None) -> int | None:
    """The index of the entry a finished job fulfils: the one naming its file, else the one
    that asked for it without naming a file yet (same model, folder and selectors).
    `candidates`: the indices of the model's entries, when the caller keeps them (no scan)."""
    indices = range(len(entries)) if candidates is None else candidates
    for i in indices:
        entry = entries[i]
        if (entry["modelId"] == job["model_id"] and entry.get("fileId") is not None
                and entry.get("fileId") == job["file_id"]):
            return i
    selectors = tuple(_norm(job.get(k)) for k in SELECTOR_FIELDS)
    for i in indices:
        entry = entries[i]
        if (entry["modelId"] == job["model_id"] and entry.get("fileId") is None
                and entry.get("modelVersionId") in (None, job["version_id"])
                and entry_selectors(entry) == selectors and entry["model_type"] == job["model_type"]):
            return i
    return None


def record_download(entries: list[dict], job: dict,
                    candidates: list[int] | None = None) -> tuple[list[dict], bool]:
    """After a download: the entry records what was fetched and the name actually used. A job
    the user added from the API or the GUI without an entry gets one. Returns (entries, changed);
    the entries given are never changed (a new list shares the entries it does not change)."""
    fields = {"modelId": job["model_id"], "modelVersionId": job["version_id"], "fileId": job["file_id"],
              "model_type": job["model_type"], "sha256": (job.get("sha256") or "").upper(),
              "url": job.get("url"), "filename": job.get("filename"), "updatedAt": job.get("updated_at_civitai")}
    fields = {k: v for k, v in fields.items() if v not in (None, "")}
    index = find_job_entry(entries, job, candidates)
    if index is None:
        if job.get("source") != "api":
            return entries, False  # the entry left the manifest while the file downloaded
        if job.get("priority") not in (None, DEFAULT_PRIORITY):
            fields["priority"] = job["priority"]
        return [*entries, fields], True
    fields.pop("model_type", None)  # the entry's folder choice stays
    target = {**entries[index], **fields}  # keys already there keep their place
    if target == entries[index]:
        return entries, False
    out = list(entries)
    out[index] = target
    return out, True


def describes_file(entry: dict, new: dict) -> bool:
    """Whether `entry` already records the file `new` describes (same ids, hash and date)."""
    if entry.get("modelVersionId") != new.get("modelVersionId") or entry.get("fileId") != new.get("fileId"):
        return False
    return all(str(entry.get(k) or "").lower() == str(new[k]).lower() for k in ("sha256", "updatedAt") if new.get(k))


def apply_update(entries: list[dict], update: dict, mode: str) -> tuple[list[dict], dict | None]:
    """A newer version (or a file replaced in place) for the entry that names
    (previous_version_id, previous_file_id) of model_id. `replace`: that entry takes the new
    file's fields, keeping its custom fields, priority and folder; `append`: a new entry is
    added beside it. Returns (entries, the entry to download) or (entries, None) when the entry
    is gone. Applying the same update twice changes nothing the second time."""
    model_id, new = update["model_id"], dict(update["entry"])
    prev_v, prev_f = update.get("previous_version_id"), update.get("previous_file_id")
    out = [dict(e) for e in entries]
    present = next((e for e in out if e["modelId"] == model_id and describes_file(e, new)), None)
    if present is not None:
        return entries, present
    candidates = [e for e in out if e["modelId"] == model_id and e.get("modelVersionId") == prev_v]
    old = next((e for e in candidates if prev_f is not None and e.get("fileId") == prev_f), None)
    if old is None and candidates and (prev_f is None or all(e.get("fileId") is None for e in candidates)):
        old = candidates[0]
    if old is None:
        return entries, None
    new["model_type"] = old["model_type"]
    if mode == "append" and old.get("modelVersionId") != new.get("modelVersionId"):
        added = {k: v for k, v in old.items() if k not in new and k not in VERSION_FIELDS}
        added.update(new)
        out.append(added)
        return out, added
    # What described the old file goes; custom fields, priority and model_type stay in place.
    for key in VERSION_FIELDS:
        if key not in new:
            old.pop(key, None)
    old.update(new)
    return out, old
