"""What the processes agree on about a library scan (`supervisor.py import`, POST/GET
/api/library/scan): which folder may be scanned, the shape of a scan's state, which names are
model files, and the remembered answers of Civitai's by-hash lookup in the store's kv table."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from ipc.naming import FolderError, check_folder

# Model weights as the programs that read download_dir name them (SPEC §10); sidecars
# (.civitai.info, .preview.png, .json, .txt, .yaml) and partial files never count.
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft", ".onnx")
SCAN_STATES = ("running", "done", "failed")
ANSWER_PREFIX = "library.byhash."  # kv key of one SHA-256 (upper-case): {"t": asked at, "v": answer or null}
RECHECK_UNMATCHED_S = 7 * 86400.0  # a file Civitai did not know is asked about again after a week


class LibraryError(Exception):
    """A scan that cannot start (a folder outside download_dir, a symlink, missing): one
    sentence that names the folder."""


def is_model_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(MODEL_SUFFIXES)


def new_scan(folder: str | None, dry_run: bool) -> dict:
    """The state of a scan as `GET /api/library/scan` answers it ({"scan": …}) and as the
    in-process import returns it. bytes_* count only what has to be hashed: files whose hash is
    already recorded (same path, size and mtime) are done at once and cost nothing."""
    return {"state": "running", "folder": folder, "dry_run": bool(dry_run), "files_done": 0, "files_total": 0,
            "bytes_done": 0, "bytes_total": 0, "matched": 0, "added": 0, "already_listed": 0, "unknown": [],
            "differs": [], "skipped": [], "seconds": 0.0, "error": None}


def _is_link(path: Path, st: os.stat_result) -> bool:
    """A symlink, or on Windows a junction (a reparse point that is not a plain folder)."""
    if stat.S_ISLNK(st.st_mode):
        return True
    attrs = getattr(st, "st_file_attributes", 0)
    return bool(attrs & getattr(stat, "FILE_ATTRIBUTE_REPARSE_POINT", 0))


def scan_folder(download_dir: Path, folder: str | None, cwd: Path | None = None) -> str | None:
    """FOLDER of `import [FOLDER]` as a folder relative to download_dir ("/"-separated, as
    written on disk), None for all of download_dir. An absolute FOLDER must lie inside
    download_dir; a relative one is taken inside download_dir (or, from the command line with
    `cwd`, relative to the current folder when that is where it exists inside download_dir). No
    component may be a symlink: the scan follows none. Raises LibraryError naming the folder."""
    base = Path(os.path.abspath(download_dir))
    if folder is None or str(folder).strip() in ("", "."):
        return None
    given = str(folder)
    path = Path(given)
    if not path.is_absolute():
        inside = base / path
        if cwd is not None and not os.path.lexists(inside) and os.path.lexists(Path(cwd) / path):
            path = Path(cwd) / path
        else:
            path = inside
    path = Path(os.path.abspath(path))  # removes "..": checked against download_dir below
    try:
        rel = path.relative_to(base)
    except ValueError:
        raise LibraryError(f"{given} is outside download_dir ({base}): the import only adopts files under "
                           "download_dir; give a folder inside it, or change download_dir in config.json") from None
    if str(rel) in ("", "."):
        return None
    current = base
    for part in rel.parts:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            raise LibraryError(f"{given}: there is no folder {current}") from None
        except OSError as exc:
            raise LibraryError(f"{given}: {current} cannot be read ({exc.strerror or exc})") from None
        if _is_link(current, st):
            raise LibraryError(f"{given}: {current} is a symlink, and the import follows no link: give the "
                               "folder it points to if that is inside download_dir")
        if not stat.S_ISDIR(st.st_mode):
            raise LibraryError(f"{given}: {current} is not a folder")
    text = "/".join(rel.parts)
    try:
        check_folder(text)
    except FolderError as exc:
        raise LibraryError(f"{given} cannot be a model_type: {exc}") from None
    return text


# --- Civitai's answers, remembered (in-process mode; the daemon keeps them the same way) --------


def load_answers(store) -> dict[str, dict]:
    """Every remembered by-hash answer: SHA-256 (upper-case) -> {"t": unix time asked,
    "v": answer (see workers/library.answer_of) or None when Civitai did not know it}."""
    rows = store._query("SELECT key, value FROM kv WHERE key >= ? AND key < ?",
                        (ANSWER_PREFIX, ANSWER_PREFIX[:-1] + chr(ord(ANSWER_PREFIX[-1]) + 1)))
    out = {}
    for row in rows:
        try:
            out[row["key"][len(ANSWER_PREFIX):]] = json.loads(row["value"])
        except ValueError:
            continue
    return out


def save_answers(store, answers: dict[str, dict]) -> None:
    """Remember one batch of answers (SHA-256 -> {"t", "v"}) in one transaction."""
    with store.transaction():
        for sha, record in answers.items():
            store.set_kv(ANSWER_PREFIX + sha.upper(), record)


def due_for_lookup(hashes, answers: dict[str, dict], now: float,
                   recheck_unmatched_s: float = RECHECK_UNMATCHED_S) -> list[str]:
    """Of `hashes` (upper-case), those to ask Civitai about: never asked, or unknown to it for
    longer than recheck_unmatched_s (a file may be uploaded since). Known ones are never asked again."""
    due = []
    for sha in dict.fromkeys(hashes):
        record = answers.get(sha)
        if record is None or (record.get("v") is None and now - float(record.get("t") or 0) >= recheck_unmatched_s):
            due.append(sha)
    return due
