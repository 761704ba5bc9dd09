"""The library as /api/library shows it: every manifest entry joined with its newest job, its file
on disk and the sidecars beside it, with free space and bytes used per folder. Read-only.

The sidecar names are the ones workers/sidecars.py writes (web/ does not import workers/):
`<stem>.civitai.info` (Civitai's version JSON: names, base model, `trainedWords`) and
`<stem>.preview.<ext>`.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path

from ipc.naming import SIDECAR_INFO_SUFFIX, SIDECAR_PREVIEW_EXTS, check_folder, component_problem

INFO_SUFFIX = SIDECAR_INFO_SUFFIX
PREVIEW_EXTS = SIDECAR_PREVIEW_EXTS
MAX_INFO_BYTES = 8 * 1024 * 1024
JOB_WINDOW = 10_000  # newest jobs looked at to find each entry's own
STATES = ("present", "downloading", "queued", "paused", "failed", "missing", "update_available")
_JOB_VIEW = ("id", "state", "bytes_done", "bytes_total", "speed_bps", "error", "source", "not_before", "attempts")
_IMAGE_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "gif": "image/gif"}


class LibraryPathError(ValueError):
    """A preview path that names nothing in the library; `status` is the HTTP answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def sniff_image_type(head: bytes) -> str | None:
    """The content type the bytes really are (png, jpeg, webp, gif), or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return _IMAGE_TYPES["png"]
    if head.startswith(b"\xff\xd8\xff"):
        return _IMAGE_TYPES["jpeg"]
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return _IMAGE_TYPES["webp"]
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return _IMAGE_TYPES["gif"]
    return None


def _stem(filename: str) -> str:
    return os.path.splitext(filename)[0]


def _regular_files(folder: Path) -> dict[str, os.stat_result] | None:
    """Every regular file directly in `folder` (no symlink followed), or None if it is no folder
    of ours (missing, or a symlink somewhere the daemon would not write through)."""
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            return None
        out = {}
        with os.scandir(folder) as it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    out[entry.name] = st
        return out
    except OSError:
        return None


def _inside(base: Path, folder: str) -> Path | None:
    """base/folder when no component of it is a symlink, else None."""
    current = base
    for part in folder.split("/"):
        current = current / part
        try:
            if stat.S_ISLNK(os.lstat(current).st_mode):
                return None
        except OSError:
            return current  # missing: nothing inside it either
    return current


class InfoCache:
    """The few fields the library needs from each .civitai.info, read again only when the file changes."""

    def __init__(self, max_items: int = 20_000):
        self._items: dict[str, tuple[tuple[int, int], dict]] = {}
        self._max = max_items

    def get(self, path: Path, st: os.stat_result) -> dict:
        key, sig = str(path), (st.st_mtime_ns, st.st_size)
        hit = self._items.get(key)
        if hit and hit[0] == sig:
            return hit[1]
        fields = self._read(path, st)
        if len(self._items) >= self._max:
            self._items.clear()
        self._items[key] = (sig, fields)
        return fields

    @staticmethod
    def _read(path: Path, st: os.stat_result) -> dict:
        if st.st_size > MAX_INFO_BYTES:
            return {}
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0))
            with os.fdopen(fd, "rb") as fh:
                doc = json.loads(fh.read(MAX_INFO_BYTES).decode("utf-8", "replace"))
        except (OSError, ValueError):
            return {}
        if not isinstance(doc, dict):
            return {}
        model = doc.get("model")
        if not isinstance(model, dict):
            model = {}
        words = doc.get("trainedWords")
        if not isinstance(words, list):
            words = []

        def text(value):
            return value.strip() if isinstance(value, str) and value.strip() else None

        return {
            "version_id": doc.get("id") if isinstance(doc.get("id"), int) else None,
            "model_name": text(model.get("name")), "version_name": text(doc.get("name")),
            "base_model": text(doc.get("baseModel")), "type": text(model.get("type")),
            "trigger_words": [w.strip() for w in words if isinstance(w, str) and w.strip()][:100],
        }


def _job_index(jobs: Iterable[dict]) -> tuple[dict[tuple, dict], dict[tuple, dict], dict[object, dict]]:
    """The newest job per file id, per (model, version), per model."""
    by_file: dict[tuple, dict] = {}
    by_version: dict[tuple, dict] = {}
    by_model: dict[object, dict] = {}
    for job in jobs:  # newest first
        if job.get("file_id") is not None:
            by_file.setdefault((job.get("model_id"), job["file_id"]), job)
        if job.get("version_id") is not None:
            by_version.setdefault((job.get("model_id"), job["version_id"]), job)
        by_model.setdefault(job.get("model_id"), job)
    return by_file, by_version, by_model


def _entry_job(entry: dict, index) -> dict | None:
    by_file, by_version, by_model = index
    model_id = entry.get("modelId")
    if entry.get("fileId") is not None:
        return by_file.get((model_id, entry["fileId"]))
    if entry.get("modelVersionId") is not None:
        return by_version.get((model_id, entry["modelVersionId"]))
    return by_model.get(model_id)


def _state(job: dict | None, present: bool) -> str:
    job = job or {}
    job_state = job.get("state")
    if job_state in ("downloading", "verifying"):
        return "downloading"
    if job_state == "paused":
        return "paused"
    if job_state == "queued":
        return "update_available" if job.get("source") == "update" and present else "queued"
    if present:
        return "present"
    if job_state == "failed":
        return "failed"
    return "missing"


def model_page(site_origin: str, model_id, version_id) -> str | None:
    if not isinstance(model_id, int):
        return None
    url = f"{site_origin}/models/{model_id}"
    return f"{url}?modelVersionId={version_id}" if isinstance(version_id, int) else url


def build_library(entries: list[dict], jobs: Iterable[dict], download_dir: Path, *, site_origin: str,
                  info_cache: InfoCache | None = None) -> dict:
    """The /api/library answer. `jobs` newest first (the job store's order)."""
    base = Path(download_dir)
    info_cache = info_cache or InfoCache()
    index = _job_index(jobs)
    listings: dict[str, dict | None] = {}

    def listing(folder: str) -> dict | None:
        if folder not in listings:
            path = _inside(base, folder)
            listings[folder] = _regular_files(path) if path is not None else None
        return listings[folder]

    items = []
    entry_bytes: dict[str, int] = {}
    entry_counts: dict[str, int] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        job = _entry_job(entry, index)
        folder = entry.get("model_type") if isinstance(entry.get("model_type"), str) else None
        filename = entry.get("filename") or (job or {}).get("filename")
        if folder is None and job:
            folder = job.get("model_type")
        files = listing(folder) if folder else None
        st = files.get(filename) if files and isinstance(filename, str) else None
        present = st is not None
        info = {}
        has_preview = False
        if folder and files and isinstance(filename, str):
            stem = _stem(filename)
            info_st = files.get(stem + INFO_SUFFIX)
            if info_st is not None:
                where = _inside(base, folder)
                if where is not None:  # None: a symlink swapped in since the listing
                    info = info_cache.get(where / (stem + INFO_SUFFIX), info_st)
            has_preview = any(f"{stem}.preview.{ext}" in files for ext in PREVIEW_EXTS)
        if folder:
            entry_counts[folder] = entry_counts.get(folder, 0) + 1
            if st is not None:
                entry_bytes[folder] = entry_bytes.get(folder, 0) + st.st_size
        job = job or {}
        version_id = entry.get("modelVersionId") or job.get("version_id") or info.get("version_id")
        items.append({
            "model_id": entry.get("modelId"), "version_id": version_id,
            "file_id": entry.get("fileId") or job.get("file_id"),
            "folder": folder, "filename": filename if isinstance(filename, str) else None,
            "path": f"{folder}/{filename}" if folder and isinstance(filename, str) else None,
            "state": _state(job or None, present),
            "model_name": job.get("model_name") or info.get("model_name"),
            "version_name": job.get("version_name") or info.get("version_name"),
            "base_model": job.get("base_model") or info.get("base_model"),
            "type": info.get("type"),
            "size": st.st_size if st is not None else None,
            "expected_size": job.get("bytes_total"),
            "trigger_words": info.get("trigger_words", []),
            "preview": has_preview, "info": bool(info),
            "priority": entry.get("priority", 10),
            "updated_at": entry.get("updatedAt"),
            "url": model_page(site_origin, entry.get("modelId"), version_id),
            "job": {k: job.get(k) for k in _JOB_VIEW} if job else None,
        })

    folders = []
    for folder in sorted(entry_counts):
        files = listing(folder)
        folders.append({"folder": folder, "exists": files is not None, "entries": entry_counts[folder],
                        "entry_bytes": entry_bytes.get(folder, 0),
                        "bytes": sum(st.st_size for st in (files or {}).values()),
                        "files": len(files or {})})
    try:
        usage = shutil.disk_usage(base)
        disk = {"total": usage.total, "used": usage.used, "free": usage.free}
    except OSError:
        disk = None
    counts = {state: 0 for state in STATES}
    for item in items:
        counts[item["state"]] += 1
    return {"entries": items, "folders": folders, "disk": disk, "counts": counts}


def has_preview(download_dir: Path, rel_path: str | None) -> bool:
    """Whether a `<stem>.preview.<ext>` (a plain file, reached through no symlink) is beside the
    library file `rel_path`: what a job row needs to know before it asks for the image."""
    if not isinstance(rel_path, str) or "/" not in rel_path:
        return False
    folder, _, filename = rel_path.rpartition("/")
    where = _inside(Path(download_dir), folder) if folder and ".." not in folder.split("/") else None
    if where is None:
        return False
    stem = _stem(filename)
    for ext in PREVIEW_EXTS:
        try:
            if stat.S_ISREG(os.lstat(where / f"{stem}.preview.{ext}").st_mode):
                return True
        except OSError:
            continue
    return False


def preview_file(download_dir: Path, rel_path: str) -> tuple[Path, str, int]:
    """The preview image of the library file `rel_path` (`<folder>/<file>`): (path, content type,
    size). Raises LibraryPathError (400 no folder in it, 422 a name the rules refuse, 404 no preview)."""
    if not isinstance(rel_path, str) or "/" not in rel_path:
        raise LibraryPathError(400, "'path' must be <folder>/<file>, as /api/library lists it")
    folder, _, filename = rel_path.rpartition("/")
    try:
        folder = check_folder(folder)
    except ValueError as exc:
        raise LibraryPathError(422, f"'path': {exc}") from None
    problem = component_problem(filename)
    if problem:
        raise LibraryPathError(422, f"'path': the file name is refused: {problem}")
    where = _inside(Path(download_dir), folder)
    if where is None:
        raise LibraryPathError(404, f"{folder} leads through a symlink: nothing is served from there")
    stem = _stem(filename)
    for ext in PREVIEW_EXTS:
        path = where / f"{stem}.preview.{ext}"
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISLNK(st.st_mode):
            raise LibraryPathError(404, f"the preview of {rel_path} is a symlink: it is not served")
        if not stat.S_ISREG(st.st_mode):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0))
            with os.fdopen(fd, "rb") as fh:
                head = fh.read(16)
        except OSError:
            continue
        content_type = sniff_image_type(head)
        if content_type is None:
            raise LibraryPathError(404, f"{path.name} is not a PNG, JPEG, WebP or GIF image")
        return path, content_type, st.st_size
    raise LibraryPathError(404, f"no preview beside {rel_path}")
