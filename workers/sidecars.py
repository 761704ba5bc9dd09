"""The files other tools read beside a verified model file: `<stem>.civitai.info` and `<stem>.preview.<ext>`.

Formats, as the readers expect them (SPEC §10):
- `.civitai.info` is the model version's JSON as Civitai's API returns it, with the model's
  `name` and `type` (and its description, tags, licence fields and creator, as zixaphir's
  Civitai Helper fork appends them) under `model`: what the web UI's Civitai Helper
  (butaixianran, zixaphir), ComfyUI-Lora-Manager (model_scanner: builds its `.metadata.json`
  from it) and Forge read. Written as ASCII JSON with 4-space indents like Civitai Helper,
  whose reader opens it with the platform's default encoding.
- `.preview.<ext>` is the version's first image (`type` "image") that `preview_nsfw` allows,
  byte for byte as served, named by what its bytes are: png, jpeg, webp or gif. The web UI's
  find_preview looks for `<stem>.preview.{png,jpg,jpeg,webp,gif}`, Lora-Manager for
  `.preview.{webp,png,jpeg,jpg,mp4}`.

Our own bookkeeping (which preview we wrote, a failed fetch to retry) lives in the info file
under `extensions.civitai_daemon`, the way zixaphir's fork keeps `extensions.sd_civitai_helper`.
A preview we did not write (the user's own) is never replaced. Nothing here ever fails a
download: the entry points log and return what they did.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import stat
import threading
import time
import zlib
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import requests

from ipc.files import atomic_write, dir_syncs_batched, file_lock
from ipc.naming import SIDECAR_INFO_SUFFIX, SIDECAR_PREVIEW_EXTS, SIDECAR_PREVIEW_INFIX
from workers.civitai import USER_AGENT, parse_retry_after, redact_url

log = logging.getLogger(__name__)

INFO_SUFFIX = SIDECAR_INFO_SUFFIX
PREVIEW_INFIX = SIDECAR_PREVIEW_INFIX
# Every name a preview of ours may have, and the ones the readers look for (a user's own may be any).
PREVIEW_EXTS = SIDECAR_PREVIEW_EXTS
MARK_KEY = "civitai_daemon"
MAX_PREVIEW_BYTES = 20 * 1024 * 1024
INFO_READ_LIMIT = 8 * 1024 * 1024
# In the data folder's locks/: one is held while a process writes a file's sidecars. Striped by the
# file's name (which every process spells the same), so a slow write holds up few others.
WRITERS_STRIPES = 16
SFW_MAX_LEVEL = 2  # Civitai's nsfwLevel flags: 1 PG, 2 PG-13, 4 R, 8 X, 16 XXX, 32 blocked
PREVIEW_RETRY_S = 3600.0  # a failed image fetch is tried again at the next verify or update after this
IMAGE_TIMEOUT_S = 30.0
MAX_IMAGE_REDIRECTS = 5
MAX_CANDIDATES = 10  # Civitai lists at most 10 images a version
# The model's fields that Civitai Helper (zixaphir) copies into the version's `model` object.
MODEL_FIELDS = ("name", "type", "nsfw", "poi", "mode", "description", "tags", "allowNoCredit",
                "allowCommercialUse", "allowDerivatives", "allowDifferentLicense")


class PreviewError(Exception):
    """One image could not be used. `retryable`: a passing fault (5xx, 429, connection), to try
    again later rather than fall back to the next image."""

    def __init__(self, message: str, *, retryable: bool = False, retry_after_s: float | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after_s = retry_after_s


@dataclass
class SidecarResult:
    info: Path | None = None  # the .civitai.info written or already current
    preview: Path | None = None  # our preview beside the file, if there is one now
    skipped: str | None = None  # why no preview was fetched (none allowed, the user's own, not due)
    error: str | None = None  # why the preview fetch failed; tried again after retry_at
    retry_at: float | None = None
    preview_due: bool = False  # a preview is to be fetched, and this call was told not to


# --- names ---------------------------------------------------------------------------------------

def info_path(final_path: Path) -> Path:
    final_path = Path(final_path)
    return final_path.with_name(final_path.stem + INFO_SUFFIX)


def preview_path(final_path: Path, ext: str) -> Path:
    final_path = Path(final_path)
    return final_path.with_name(f"{final_path.stem}{PREVIEW_INFIX}{ext}")


def existing_previews(final_path: Path) -> list[Path]:
    """The `<stem>.preview.*` images beside a model file, in the web UI's order of preference."""
    out = []
    base = str(preview_path(final_path, ""))  # strings, not a Path per name: called once a download
    for ext in PREVIEW_EXTS:
        try:
            if stat.S_ISREG(os.lstat(base + ext).st_mode):
                out.append(Path(base + ext))
        except OSError:
            continue
    return out


def is_sidecar_name(name: str) -> bool:
    """A file beside a model that describes it (ours, Civitai Helper's, Lora-Manager's): never a model."""
    lower = name.lower()
    if lower.endswith((INFO_SUFFIX, ".metadata.json")):
        return True
    stem, dot, ext = lower.rpartition(".")
    return bool(dot) and stem.endswith(".preview") and ext in (*PREVIEW_EXTS, "mp4", "webm")


# --- the info document ---------------------------------------------------------------------------

def _version_in_model(model_json: dict | None, version_id) -> dict:
    for version in (model_json or {}).get("modelVersions") or ():
        if isinstance(version, dict) and version.get("id") == version_id:
            return version
    return {}


def info_document(version_json: dict, model_json: dict | None = None) -> dict:
    """The `.civitai.info` content: the version's JSON with the model's fields under `model`.

    A version taken from /models/{id} (`modelVersions[]`) lacks `model` and `modelId`; /model-versions
    has `model {name, type, nsfw, poi}` but not the description, tags and licence. Both are filled
    from the model's JSON where it is given; nothing Civitai sent is overwritten.

    The document shares its nested values with the given JSON (a deep copy was a fifth of a
    small download's sidecar work): only its own top level and `model` are new, and neither it
    nor the JSON is changed below that afterwards."""
    doc = dict(version_json)
    model_json = model_json or {}
    model = dict(doc.get("model") or {}) if isinstance(doc.get("model"), dict) else {}
    for key in MODEL_FIELDS:
        if key not in model and model_json.get(key) is not None:
            model[key] = model_json[key]
    doc["model"] = model
    if doc.get("modelId") is None and model_json.get("id") is not None:
        doc["modelId"] = model_json["id"]
    if "creator" not in doc and isinstance(model_json.get("creator"), dict):
        doc["creator"] = model_json["creator"]
    if not doc.get("images"):
        images = _version_in_model(model_json, doc.get("id")).get("images")
        if images:
            doc["images"] = images
    if "extensions" in doc and not isinstance(doc["extensions"], dict):
        del doc["extensions"]
    return doc


def render_info(doc: dict) -> bytes:
    return (json.dumps(doc, indent=4) + "\n").encode("ascii")


def read_info(path: Path) -> dict | None:
    return _parse_info(_read_bytes(path))


def our_mark(info: dict | None) -> dict:
    block = ((info or {}).get("extensions") or {}) if isinstance((info or {}).get("extensions"), dict) else {}
    mark = block.get(MARK_KEY)
    return mark if isinstance(mark, dict) else {}


def trained_words(info: dict | None) -> list[str]:
    words = (info or {}).get("trainedWords")
    if not isinstance(words, list):
        return []
    return [w.strip() for w in words if isinstance(w, str) and w.strip()]


# --- which image ---------------------------------------------------------------------------------

def image_allowed(image: dict, preview_nsfw: bool) -> bool:
    """A still image whose rating preview_nsfw allows: nsfwLevel 1 (PG) or 2 (PG-13) without it.
    An image with no rating at all (nsfwLevel 0 or missing, no legacy `nsfw`) counts as unrated,
    which only preview_nsfw allows."""
    if not isinstance(image, dict):
        return False
    if image.get("type", "image") != "image":
        return False  # Civitai serves some "images" as mp4/webm videos
    url = image.get("url")
    if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
        return False
    if preview_nsfw:
        return True
    level = image.get("nsfwLevel")
    if isinstance(level, int) and not isinstance(level, bool) and level > 0:
        return level <= SFW_MAX_LEVEL
    legacy = image.get("nsfw")  # before nsfwLevel: a bool, or "None" | "Soft" | "Mature" | "X"
    return legacy is False or legacy == "None"


def preview_candidates(images, preview_nsfw: bool) -> list[dict]:
    if not isinstance(images, list):
        return []
    return [img for img in images if image_allowed(img, preview_nsfw)][:MAX_CANDIDATES]


def sniff_image(head: bytes) -> str | None:
    """The image type the bytes are (the extension the file gets), or None for anything else."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    return None


def _what_it_is(head: bytes, content_type: str) -> str:
    if len(head) >= 12 and head[4:8] == b"ftyp":
        return "an MP4 video"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "a WebM video"
    if head.lstrip()[:1] in (b"<", b"{"):
        return "a web page or JSON, not an image"
    return f"not a PNG, JPEG, WebP or GIF image ({content_type or 'no content type'})"


# --- fetching ------------------------------------------------------------------------------------

def fetch_image(session, url: str, *, user_agent: str = USER_AGENT, throttle=None,
                timeout_s: float = IMAGE_TIMEOUT_S, max_bytes: int | None = None) -> tuple[bytes, str]:
    """GET one image: (bytes, ext). Raises PreviewError.

    Each request is built fresh and sent through the session's connection pool with only a
    User-Agent and Accept: no Authorization, no cookies, whatever the session holds, because
    the image host is not Civitai's API host and the key must never reach it."""
    for _ in range(MAX_IMAGE_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PreviewError(f"the image URL {redact_url(url)} is not http(s)")
        if throttle is not None:
            throttle.wait()
        prepared = requests.Request("GET", url, headers={
            "User-Agent": user_agent, "Accept": "image/png,image/jpeg,image/webp,image/gif;q=0.9,*/*;q=0.1",
            "Accept-Encoding": "identity",
        }).prepare()
        # The environment's proxies and CA bundle still apply, as they do to every other request.
        settings = session.merge_environment_settings(url, {}, True, None, None)
        settings.pop("stream", None)
        try:
            resp = session.send(prepared, stream=True, allow_redirects=False,
                                timeout=(min(10.0, timeout_s), timeout_s), **settings)
        except requests.RequestException as exc:
            raise PreviewError(f"fetching {redact_url(url)} failed ({type(exc).__name__})", retryable=True) from None
        try:
            if resp.is_redirect:
                url = urljoin(url, resp.headers.get("Location", ""))
                continue
            return _read_image(resp, url, MAX_PREVIEW_BYTES if max_bytes is None else max_bytes)
        finally:
            resp.close()
    raise PreviewError(f"the image at {redact_url(url)} redirected too many times")


def _read_image(resp, url: str, max_bytes: int) -> tuple[bytes, str]:
    shown = redact_url(url)
    status = resp.status_code
    if status == 429 or status >= 500:
        raise PreviewError(f"the image host answered {status} for {shown}", retryable=True,
                           retry_after_s=parse_retry_after(resp.headers.get("Retry-After")))
    if status != 200:
        raise PreviewError(f"the image host answered {status} for {shown}")
    try:
        length = int(resp.headers.get("Content-Length") or -1)
    except ValueError:
        length = -1
    if length > max_bytes:
        raise PreviewError(f"the image at {shown} is {length} bytes, more than the {max_bytes} a preview may be")
    chunks, size = [], 0
    try:
        for chunk in resp.iter_content(64 * 1024):
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise PreviewError(f"the image at {shown} is more than the {max_bytes} bytes a preview may be")
    except requests.RequestException as exc:
        raise PreviewError(f"reading {shown} failed ({type(exc).__name__})", retryable=True) from None
    body = b"".join(chunks)
    if length >= 0 and size != length:
        raise PreviewError(f"the image at {shown} ended after {size} of {length} bytes", retryable=True)
    ext = sniff_image(body[:16])
    if ext is None:
        content_type = (resp.headers.get("Content-Type") or "").split(";")[0].strip()
        raise PreviewError(f"{shown} is {_what_it_is(body[:16], content_type)}")
    return body, ext


# --- the entry points ----------------------------------------------------------------------------

def _writable_target(path: Path) -> bool:
    """A path we may (re)place: absent, or a regular file (never a symlink or a folder)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _remove(path: Path) -> None:
    try:
        if stat.S_ISREG(os.lstat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass


def write_sidecars_for(version_json: dict | None, model_json: dict | None, final_path: Path, *,
                       client=None, session=None, throttle=None, preview_nsfw: bool = False,
                       sidecars: bool = True, clock=time.time, fetch_preview: bool = True,
                       locks_dir: Path | None = None, expect: bytes | None = None) -> SidecarResult:
    """Write or refresh the sidecars of the verified file `final_path` from Civitai's JSON (an
    adopted file, a finished download, an update). Never raises: trouble is logged and returned.
    With `fetch_preview` False only the .civitai.info is written (it needs no request), and
    `preview_due` says whether a later call should fetch the preview. `locks_dir`: the data
    folder's locks, for the lock every process takes to write sidecars (else unguarded);
    `expect`: the info's bytes `version_json` was read from (a top-up)."""
    result = SidecarResult()
    if not sidecars:
        result.skipped = "sidecars are off"
        return result
    final_path = Path(final_path)
    if not isinstance(version_json, dict) or not version_json.get("id"):
        result.skipped = "no version JSON from Civitai"
        log.debug("no sidecars for %s: %s", final_path.name, result.skipped)
        return result
    try:
        _write(version_json, model_json, final_path, result, client=client, session=session, throttle=throttle,
               preview_nsfw=preview_nsfw, clock=clock, fetch_preview=fetch_preview,
               lock_path=None if locks_dir is None else writers_lock_path(locks_dir, final_path), expect=expect)
    except Exception as exc:  # a sidecar is never worth a failed download
        log.warning("the sidecars of %s were not written: %s", final_path.name, exc, exc_info=not isinstance(exc, OSError))
        result.error = result.error or str(exc)
    return result


def write_sidecars(res, final_path: Path, *, client, throttle, preview_nsfw: bool, sidecars: bool,
                   fetch_preview: bool = True, locks_dir: Path | None = None) -> SidecarResult:
    """The worker's call after a file is verified (workers.civitai.Resolved carries the JSON) or
    for a top-up (a _FromInfo)."""
    return write_sidecars_for(getattr(res, "version_json", None), getattr(res, "model_json", None), final_path,
                              client=client, throttle=throttle, preview_nsfw=preview_nsfw, sidecars=sidecars,
                              fetch_preview=fetch_preview, locks_dir=locks_dir,
                              expect=getattr(res, "info_bytes", None))


@dataclass
class _PathTurn:
    """What a SidecarWriter knows of one path while something is owed for it."""
    lock: threading.Lock = field(default_factory=threading.Lock)  # held by whoever writes its sidecars
    latest: int = 0  # the newest verified file at this path (a count of after_verified calls)
    holders: int = 0  # calls and thread entries still using this record


class SidecarWriter:
    """A worker's sidecars after each verified file: the `.civitai.info` at once, in the job's
    thread and before its `done` (it needs no request, and whoever hears of the download, a
    webhook's receiver, the GUI, another tool, finds it there); the preview, which needs the
    image host, on the writer's own thread, so a slow host never holds up the next job.

    One writer at a time for a path (two would share atomic_write's temp name, and the older
    one's info could land last): the job thread waits for a preview fetch of the same path in
    flight, at most one image's timeout, and only when that path was verified twice that soon.
    A thread entry for a path that has had a newer file since is dropped: the newer one's info is
    written, and its own entry follows if its preview is due. Between processes (another worker,
    the library's child) the write function guards the same: it writes under a lock file and
    drops a fetched preview whose info another process rewrote meanwhile (see _write)."""

    def __init__(self, write: Callable[..., SidecarResult], *, on_owed: Callable[[str], None] | None = None,
                 on_settled: Callable[[str], None] | None = None):
        self._write = write  # write_sidecars with the worker's client and settings bound
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._turns: dict[Path, _PathTurn] = {}
        self._lock = threading.Lock()
        # Paths whose preview waits for the thread. on_owed(path) when one starts to wait (before
        # the job's `done`), on_settled(path) once its newest file needs nothing more: the
        # supervisor keeps the list in its store, so a worker that stops first loses nothing.
        self._owing: set[Path] = set()
        self._on_owed = on_owed
        self._on_settled = on_settled

    def _hold(self, path: Path) -> tuple[_PathTurn, int]:
        with self._lock:
            turn = self._turns.setdefault(path, _PathTurn())
            turn.latest += 1
            turn.holders += 1
            return turn, turn.latest

    def _let_go(self, path: Path, turn: _PathTurn) -> None:
        with self._lock:
            turn.holders -= 1
            if turn.holders <= 0 and self._turns.get(path) is turn:
                del self._turns[path]

    def _owe(self, path: Path) -> None:
        with self._lock:
            new = path not in self._owing
            self._owing.add(path)
        if new and self._on_owed is not None:
            self._on_owed(str(path))

    def _settle(self, path: Path) -> None:
        with self._lock:
            was = path in self._owing
            self._owing.discard(path)
        if was and self._on_settled is not None:
            self._on_settled(str(path))

    def after_verified(self, res, path: Path) -> None:
        turn, mine = self._hold(path)
        queued = False
        try:
            with turn.lock:
                due = self._write(res, path, fetch_preview=False).preview_due
                if due:
                    self._owe(path)
                else:
                    self._settle(path)  # an older file's entry here, if any, is dropped
            if due:
                self._work.put((res, path, turn, mine))
                queued = True
        finally:
            if not queued:
                self._let_go(path, turn)

    def top_up(self, path: Path) -> None:
        """Fetch the preview a worker no longer running owed `path` (the supervisor's list), from
        the .civitai.info beside it. Settled at once when the file or its info is gone."""
        path = Path(path)
        turn, mine = self._hold(path)
        with self._lock:
            self._owing.add(path)  # owed in the store already: no message
        self._work.put((None, path, turn, mine))

    def run_one(self, timeout: float | None = None) -> bool:
        """Do the thread's next entry (False: none came within `timeout`)."""
        try:
            res, path, turn, mine = self._work.get(timeout=timeout)
        except queue.Empty:
            return False
        try:
            with turn.lock:
                if mine == turn.latest:  # else a newer file is at this path: its info is written
                    try:
                        if res is None:
                            res = _from_info(path)
                        if res is not None:
                            self._write(res, path, fetch_preview=True)
                    finally:
                        if mine == turn.latest:  # no newer file came while it was fetched
                            self._settle(path)
        except Exception:  # noqa: BLE001 - write_sidecars never raises; a bug here must not end the thread
            log.exception("sidecars of %s", path)
        finally:
            self._let_go(path, turn)
        return True

    def owed(self) -> int:
        """Paths something is still owed for (for tests: 0 once the thread is through)."""
        with self._lock:
            return len(self._turns)

    def start(self) -> SidecarWriter:
        def loop():
            while True:
                self.run_one()
        threading.Thread(target=loop, name="sidecars", daemon=True).start()
        return self


@dataclass
class _FromInfo:
    """A file's Civitai JSON as its .civitai.info holds it, the model's fields included (what
    SidecarWriter's write takes in place of a Resolved), and the info's bytes it was read from:
    the write that follows goes ahead only while the info still holds them."""
    version_json: dict
    info_bytes: bytes


def _from_info(final_path: Path) -> _FromInfo | None:
    if not final_path.is_file():
        return None
    data = _read_bytes(info_path(final_path))
    info = _parse_info(data)
    return _FromInfo(info, data) if info is not None and data is not None and info.get("id") else None


def _read_bytes(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return fh.read(INFO_READ_LIMIT)
    except OSError:
        return None


def _parse_info(data: bytes | None) -> dict | None:
    if data is None:
        return None
    try:
        doc = json.loads(data.decode("utf-8", "replace"))
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def writers_lock_path(locks_dir: Path, final_path: Path) -> Path:
    """The lock a process holds while it writes `final_path`'s sidecars."""
    stripe = zlib.crc32(os.path.normcase(Path(final_path).name).encode("utf-8", "surrogatepass")) % WRITERS_STRIPES
    return Path(locks_dir) / f"sidecars.{stripe:02d}.lock"


def _writers_lock(path: Path | None) -> AbstractContextManager:
    """Held while a process writes a path's sidecars (no request is made under it): the workers,
    the library's child. None: unguarded (a caller with no data folder, tests)."""
    return nullcontext() if path is None else file_lock(path)


def _write(version_json, model_json, final_path: Path, result: SidecarResult, *, client, session, throttle,
           preview_nsfw: bool, clock, fetch_preview: bool = True, lock_path: Path | None = None,
           expect: bytes | None = None) -> None:
    """The sidecars of `final_path` from `version_json`. Without a preview fetch, all of it under
    the writers' lock. With one, the fetch runs outside it and the files are written only if the
    info still holds what it held before the fetch (or `expect`, the bytes `version_json` was read
    from): otherwise another process wrote it meanwhile, for a newer file at this path or its
    own top-up, and this write is dropped (that writer's preview entry follows if one is due)."""
    target = info_path(final_path)
    if not fetch_preview:
        with dir_syncs_batched(), _writers_lock(lock_path):  # the folder's fsync after the lock
            plan = _plan(version_json, model_json, final_path, target, result, preview_nsfw=preview_nsfw,
                         now=clock(), fetch_preview=False)
            _commit(plan, None, None, result)
        return
    plan = _plan(version_json, model_json, final_path, target, result, preview_nsfw=preview_nsfw, now=clock(),
                 fetch_preview=True)
    if expect is not None and plan.seen != expect:
        result.skipped = "the info changed since it was read: another writer has this path"
        return
    got, retry_after_s = None, None
    if plan.fetch:
        try:
            got, retry_after_s = _fetch_first(plan.candidates, client=client, session=session, throttle=throttle,
                                              result=result)
        except Exception as exc:  # the info file is still worth writing
            log.warning("fetching the preview of %s failed: %s", final_path.name, exc, exc_info=True)
            got, retry_after_s, result.error = None, None, f"the preview fetch failed: {exc}"
    with dir_syncs_batched(), _writers_lock(lock_path):  # preview and info: one fsync of the folder, after the lock
        if _read_bytes(target) != plan.seen:
            result.skipped = "the info changed during the preview fetch: another writer has this path"
            result.error = None
            log.debug("sidecars of %s: %s", final_path.name, result.skipped)
            return
        _commit(plan, got, retry_after_s, result)


@dataclass
class _Plan:
    """What _plan decided from the info as it was (`seen`), for _commit to write."""
    final_path: Path
    seen: bytes | None
    old: dict | None
    doc: dict
    mark: dict
    ours: Path | None  # our preview that stays, if nothing new is fetched
    drop: Path | None  # our preview to remove (it shows another version)
    preview_version: object
    candidates: list[dict]
    fetch: bool
    now: float


def _plan(version_json, model_json, final_path: Path, target: Path, result: SidecarResult, *, preview_nsfw: bool,
          now: float, fetch_preview: bool) -> _Plan:
    if not _writable_target(target):
        raise OSError(f"{target} exists and is not a plain file: it is left as it is")
    seen = _read_bytes(target)
    old = _parse_info(seen)
    old_mark = our_mark(old)
    doc = info_document(version_json, model_json)
    version_id = doc.get("id")

    mark = {"version_id": version_id}
    preview, preview_version = old_mark.get("preview"), old_mark.get("preview_version_id")
    ours = preview_path(final_path, preview.rpartition(".")[2]) if isinstance(preview, str) and preview else None
    previews = existing_previews(final_path)
    if ours is not None and (ours.name != preview or ours not in previews):
        ours = None  # gone, or a name that is not one of ours
    foreign = [p for p in previews if p != ours]
    drop = None

    candidates = preview_candidates(doc.get("images"), preview_nsfw)
    fetch = True
    if foreign:
        result.skipped, fetch = f"{foreign[0].name} is the user's own preview", False
    elif not candidates:
        result.skipped, fetch = "no image of this version is one preview_nsfw allows", False
        drop, ours = ours, None  # it shows another version
    elif ours is not None and preview_version == version_id:
        fetch = False
    elif old_mark.get("retry_at") and old_mark.get("error_version_id") == version_id and old_mark["retry_at"] > now:
        result.skipped, fetch = "the last fetch failed; it is tried again later", False
        mark.update({k: old_mark[k] for k in ("error", "retry_at", "error_version_id") if k in old_mark})

    if fetch and not fetch_preview:  # the later call with fetch_preview decides the preview's mark
        result.preview_due, fetch = True, False
    return _Plan(final_path, seen, old, doc, mark, ours, drop, preview_version, candidates, fetch, now)


def _commit(plan: _Plan, got, retry_after_s, result: SidecarResult) -> None:
    """Write what `plan` and the fetch (`got`: bytes and extension, or None) came to."""
    final_path, mark, ours, preview_version = plan.final_path, plan.mark, plan.ours, plan.preview_version
    version_id = plan.doc.get("id")
    if plan.drop is not None:
        _remove(plan.drop)
    if got is not None:
        body, ext = got
        new = preview_path(final_path, ext)
        if _writable_target(new):
            atomic_write(new, body, mode=0o644)
            if ours is not None and ours != new:
                _remove(ours)
            ours, preview_version = new, version_id
        else:
            result.error = f"{new.name} exists and is not a plain file"
    if result.error:
        result.retry_at = plan.now + max(PREVIEW_RETRY_S, retry_after_s or 0.0)
        mark.update(error=result.error, retry_at=result.retry_at, error_version_id=version_id)
        log.warning("no preview for %s yet: %s; tried again at the next check after %s", final_path.name,
                    result.error, time.strftime("%Y-%m-%d %H:%M", time.localtime(result.retry_at)))
    if ours is not None:
        mark.update(preview=ours.name, preview_version_id=preview_version)
        result.preview = ours

    doc, old = plan.doc, plan.old
    extensions = dict(doc.get("extensions") or {}) if isinstance(doc.get("extensions"), dict) else {}
    if isinstance(old, dict) and isinstance(old.get("extensions"), dict):
        extensions = {**old["extensions"], **extensions}  # another tool's block stays
    extensions[MARK_KEY] = mark
    doc["extensions"] = extensions
    data = render_info(doc)
    target = info_path(final_path)
    if plan.seen != data:
        atomic_write(target, data, mode=0o644)
    result.info = target


def _fetch_first(candidates: list[dict], *, client, session, throttle, result: SidecarResult):
    """(bytes, ext) of the first candidate that is a still image within the cap, and the
    Retry-After of a passing fault. It stops at a passing fault: the first allowed image is the
    preview, and a later one is no stand-in for a 503."""
    session = session if session is not None else getattr(client, "session", None)
    if session is None:
        session = requests.Session()
    user_agent = str(getattr(session, "headers", {}).get("User-Agent") or USER_AGENT)
    timeout_s = min(IMAGE_TIMEOUT_S, float(getattr(client, "timeout_s", IMAGE_TIMEOUT_S) or IMAGE_TIMEOUT_S))
    problems = []
    for image in candidates:
        try:
            return fetch_image(session, image["url"], user_agent=user_agent, throttle=throttle,
                               timeout_s=timeout_s), None
        except PreviewError as exc:
            if exc.retryable:
                result.error = str(exc)
                return None, exc.retry_after_s
            log.info("preview candidate skipped: %s", exc)
            problems.append(str(exc))
    result.skipped = "no allowed image could be used: " + "; ".join(problems[:3])
    return None, None


def sidecar_state(final_path: Path, now: float | None = None) -> dict:
    """What is beside a model file, for the library and a scan that tops sidecars up:
    {"info": bool, "preview": name | None, "retry_due": bool}."""
    info = read_info(info_path(final_path))
    previews = existing_previews(final_path)
    mark = our_mark(info)
    retry_at = mark.get("retry_at")
    due = bool(retry_at and retry_at <= (time.time() if now is None else now))
    return {"info": info is not None, "preview": previews[0].name if previews else None, "retry_due": due}
