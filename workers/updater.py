"""The updater process: the update check, daily at `update_time`, at start when the last
successful check is more than 24 h old, and on demand.

The check itself (UpdateChecker) asks Civitai about every model in the manifest and reports
what changed; the supervisor owns the manifest, the job queue and the event log, so every
finding goes to it as a message (see docs/DESIGN.md and supervisor.on_updater_message):

  -> {"type": "ready", "pid"}
  -> {"type": "schedule", "next_check": iso8601 UTC}
  -> {"type": "check_started", "why"}
  -> {"type": "update_found", "model_id", "previous_version_id", "entry": {...}}
  -> {"type": "update_error", "model_id", "error"}
  -> {"type": "check_done", "ok", "ts", "unix_ts", "models", "updates", "errors", "requests",
      "duration_s"[, "error"]}
  <- {"type": "manifest", "entries": [...], "last_success_ts": float|None}
                                               on ready (with the time of the last successful
                                               check) and after every manifest change
  <- {"type": "check_now"}
  <- {"type": "stop"}
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import UTC
from typing import Any

import requests

from workers.civitai import parse_time

log = logging.getLogger("updater")

CHECK_EVERY_S = 24 * 3600  # a check at start when the last successful one is older than this
RETRY_FAILED_CHECK_S = 3600  # a failed check (Civitai unreachable, a bug) is tried again after this
RATE_LIMIT_TRIES = 4  # one API call answered 429: tries in all, honouring Retry-After
RATE_LIMIT_BASE_S = 5.0  # wait after a 429 without Retry-After: 5, 10, 20 s
RATE_LIMIT_MAX_WAIT_S = 300.0
TRANSIENT_TRIES = 2  # 5xx, connection errors, broken answers: the client already retried quickly
TRANSIENT_DELAY_S = 2.0
UNREACHABLE_AFTER = 3  # single-model asks failing in a row like this: Civitai is down, stop asking


class CheckStopped(Exception):
    """The process is stopping: the check ends where it is, unreported as a success."""


class CountingSession(requests.Session):
    """Counts every HTTP request sent (retries and redirects included), for the check's report."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def send(self, request, **kwargs):
        self.count += 1
        return super().send(request, **kwargs)


# --- comparing the manifest with Civitai ---------------------------------------------------------


def _same_time(a, b) -> bool:
    ta, tb = parse_time(a), parse_time(b)
    if ta is not None and tb is not None:
        return abs(ta - tb) < 0.001
    return str(a).strip() == str(b).strip()


def _versions(model: dict) -> list[dict]:
    return [v for v in (model.get("modelVersions") or []) if isinstance(v, dict)]


def _files(version: dict) -> list[dict]:
    return [f for f in (version.get("files") or []) if isinstance(f, dict)]


def version_updated_at(version: dict) -> str | None:
    """What the download worker records as the entry's `updatedAt` (the same fallback)."""
    return version.get("updatedAt") or version.get("publishedAt")


def checked_entries(entries: list[dict]) -> dict[int, list[dict]]:
    """modelId -> its entries that name a version, in manifest order. Entries without a
    modelVersionId are left out: their download resolves them to the newest version anyway."""
    out: dict[int, list[dict]] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        model_id, version_id = entry.get("modelId"), entry.get("modelVersionId")
        if isinstance(model_id, int) and isinstance(version_id, int):
            out.setdefault(model_id, []).append(entry)
    return out


def current_entries(entries: list[dict], model: dict) -> list[dict]:
    """Of one model's entries, those of its newest version: by Civitai's publish dates when the
    version is still listed, else by version id (ids grow with time). Several entries survive
    only when they are different files of that one version."""
    rank = {}
    for v in _versions(model):
        if isinstance(v.get("id"), int):
            when = parse_time(v.get("publishedAt"))
            rank[v["id"]] = when if when is not None else parse_time(v.get("createdAt"))
    known_times = [t for t in rank.values() if t is not None]

    def key(entry):
        vid = entry["modelVersionId"]
        when = rank.get(vid)
        if when is None:  # not listed any more (or undated): older than every dated one
            when = min(known_times) - 1 if known_times else 0.0
        return (when, vid)

    newest = max(entries, key=key)
    return [e for e in entries if e["modelVersionId"] == newest["modelVersionId"]]


def find_update(entry: dict, model: dict, download_url: Callable[[int, int], str]) -> dict | None:
    """Compare one manifest entry with the model as Civitai lists it now. None when nothing
    changed; else the new entry fields and what changed:
    {"modelVersionId", "fileId", "sha256", "filename", "updatedAt", "url", "changes": [...]}.

    The newest published version by date, and in it the file that matches the entry's current
    one (the same file if the version is unchanged and the file still there; else the same
    format and precision; else one of the same name; else the primary). Compared: version id,
    file id, SHA-256 (without case) and updatedAt, each only when the entry records it.
    Raises CivitaiError (no published version, no file) for a model that cannot be updated."""
    from ipc.naming import safe_filename
    from workers.civitai import file_sha256, newest_published_version, pick_file

    newest = newest_published_version(model)
    cur_vid, cur_fid = entry.get("modelVersionId"), entry.get("fileId")
    cur_version = next((v for v in _versions(model) if v.get("id") == cur_vid), None)
    cur_file = None
    if cur_version is not None and cur_fid is not None:
        cur_file = next((f for f in _files(cur_version) if f.get("id") == cur_fid), None)

    chosen = None
    if newest.get("id") == cur_vid and cur_file is not None:
        chosen = cur_file
    elif cur_file is not None:
        chosen = pick_file(newest, like=cur_file)
    else:
        name = entry.get("filename")
        if name:
            chosen = next((f for f in _files(newest) if f.get("name") == name), None)
    if chosen is None:
        chosen = pick_file(newest)

    new_vid, new_fid = newest.get("id"), chosen.get("id")
    if not isinstance(new_vid, int) or not isinstance(new_fid, int):
        raise ValueError(f"Civitai listed a version or file without a numeric id ({new_vid!r}, {new_fid!r})")
    new_sha = file_sha256(chosen)
    new_updated = version_updated_at(newest)

    changes = []
    if new_vid != cur_vid:
        changes.append("version")
    else:
        if cur_fid is not None and new_fid != cur_fid:
            changes.append("file")
        old_sha = entry.get("sha256")
        if old_sha and new_sha and str(old_sha).strip().lower() != new_sha.lower():
            changes.append("sha256")
        old_updated = entry.get("updatedAt")
        if old_updated and new_updated and not _same_time(old_updated, new_updated):
            changes.append("updatedAt")
    if not changes:
        return None
    found = {
        "modelVersionId": new_vid,
        "fileId": new_fid,
        "sha256": new_sha.upper() if new_sha else None,  # as Civitai gives it
        "filename": safe_filename(chosen.get("name"), fallback=f"model_{new_vid}_{new_fid}.bin"),
        "updatedAt": new_updated,
        "url": download_url(new_vid, new_fid),
    }
    # What Civitai does not give stays out: the entry keeps no stale value and gets no null.
    return {**{k: v for k, v in found.items() if v is not None}, "changes": changes}


class UpdateChecker:
    """One run of the check over a manifest. `report` gets the update_found / update_error
    messages as they are known; `run` returns the check_done summary (without ts)."""

    def __init__(self, client, report: Callable[[dict], None], should_stop: Callable[[], bool] = lambda: False,
                 sleep: Callable[[float], bool | None] | None = None):
        self.client = client
        self.report = report
        self.should_stop = should_stop
        self._sleep = sleep or time.sleep

    def _requests(self) -> int:
        return int(getattr(self.client.session, "count", 0))

    def _pause(self, seconds: float) -> None:
        if self.should_stop():
            raise CheckStopped()
        if self._sleep(seconds) is True or self.should_stop():  # Event.wait() is True when stopping
            raise CheckStopped()

    def call(self, fn, what: str):
        """One API call with the updater's own backoff on top of the client's quick retries:
        429 waits for Retry-After (else 5, 10, 20 s); 5xx, connection errors and answers that
        are not JSON get one more try after a pause. Other errors are final."""
        from workers.civitai import CivitaiError

        attempt = 0
        while True:
            if self.should_stop():
                raise CheckStopped()
            attempt += 1
            try:
                return fn()
            except CivitaiError as exc:
                if exc.reason == "rate_limited" and attempt < RATE_LIMIT_TRIES:
                    delay = exc.retry_after_s if exc.retry_after_s is not None else RATE_LIMIT_BASE_S * 2 ** (attempt - 1)
                    delay = min(RATE_LIMIT_MAX_WAIT_S, max(0.0, float(delay)))
                elif exc.retryable and exc.reason != "rate_limited" and attempt < TRANSIENT_TRIES:
                    delay = exc.retry_after_s if exc.retry_after_s else TRANSIENT_DELAY_S * attempt
                    delay = min(RATE_LIMIT_MAX_WAIT_S, float(delay))
                else:
                    raise
                log.info("update check: %s: %s; trying again in %.1f s", what, exc, delay)
                self._pause(delay)

    def fetch(self, model_ids: list[int]) -> Iterator[tuple[list[int], dict[int, dict], dict[int, tuple[str, bool]]]]:
        """Models by id, a batch at a time (`ids=` of up to 100 a request): yields each batch's
        ids, models and errors, so a check holds one batch's answers and never the library's
        (a popular model's JSON, with every version and image, is hundreds of KB; a library of
        thousands of them would stay in the updater's memory after its first check). A model
        missing from a batch answer (or from a batch that failed) is asked for alone, so that its
        own error can be told. Errors: model id -> (sentence, transient)."""
        from workers.civitai import IDS_PER_REQUEST, CivitaiError

        failing, last_error = 0, ""
        for offset in range(0, len(model_ids), IDS_PER_REQUEST):
            chunk = model_ids[offset: offset + IDS_PER_REQUEST]
            errors: dict[int, tuple[str, bool]] = {}
            try:
                got = self.call(lambda chunk=chunk: self.client.get_models(chunk), f"{len(chunk)} model(s)")
            except CivitaiError as exc:
                log.warning("update check: asking for %d model(s) at once failed (%s); asking one by one",
                            len(chunk), exc)
                got = {}
            wanted = set(chunk)
            models = {mid: model for mid, model in got.items() if mid in wanted and isinstance(model, dict)}
            del got
            for model_id in chunk:
                if model_id in models:
                    continue
                if failing >= UNREACHABLE_AFTER:
                    errors[model_id] = (f"not checked: Civitai did not answer for other models either ({last_error})",
                                        True)
                    continue
                try:
                    models[model_id] = self.call(lambda m=model_id: self.client.get_model(m), f"model {model_id}")
                    failing = 0
                except CivitaiError as exc:
                    errors[model_id] = (str(exc), bool(exc.retryable))
                    if exc.retryable:
                        failing, last_error = failing + 1, str(exc)
                    else:
                        failing = 0
            yield chunk, models, errors

    def _each_model(self, ids: list[int]) -> Iterator[tuple[int, dict | None, tuple[str, bool] | None]]:
        """(model id, its model or None, its error or None) in the order of `ids`, a batch
        fetched at a time; a batch's answers are let go before the next is asked for."""
        for chunk, models, errors in self.fetch(ids):
            for model_id in chunk:
                yield model_id, models.pop(model_id, None), errors.get(model_id)

    def run(self, entries: list[dict]) -> dict:
        """Check every model of `entries`; returns the check_done summary (without ts).
        `ok` is False only when Civitai could not be reached for any model: such a check says
        nothing, and is tried again."""
        from workers.civitai import CivitaiError

        started = time.monotonic()
        requests_before = self._requests()
        groups = checked_entries(entries)
        ids = list(groups)
        updates = n_errors = transient = 0
        for model_id, model, failure in self._each_model(ids):
            if self.should_stop():
                raise CheckStopped()
            error: str | None = None
            if failure is not None:
                error, is_transient = failure
                transient += int(is_transient)
            else:
                assert model is not None  # fetch gives every id of a batch a model or an error
                try:
                    seen_files: set[int] = set()
                    for entry in current_entries(groups[model_id], model):
                        found = find_update(entry, model, self.client.download_url)
                        if found is None or found["fileId"] in seen_files:
                            continue
                        seen_files.add(found["fileId"])
                        changes = found.pop("changes")
                        log.info("update check: model %s: version %s -> version %s, file %s (%s)", model_id,
                                 entry.get("modelVersionId"), found["modelVersionId"], found["fileId"],
                                 ", ".join(changes))
                        self.report({"type": "update_found", "model_id": model_id,
                                     "previous_version_id": entry.get("modelVersionId"),
                                     "previous_file_id": entry.get("fileId"), "entry": found,
                                     "changes": changes})
                        updates += 1
                except CivitaiError as exc:
                    error = str(exc)
                except Exception as exc:  # an answer of a shape we did not expect: this model only
                    log.warning("update check: model %s: unexpected answer from Civitai\n%s", model_id,
                                traceback.format_exc())
                    error = (f"Civitai's answer for model {model_id} could not be read "
                             f"({type(exc).__name__}: {exc})")
            if error is not None:
                n_errors += 1
                log.warning("update check: model %s: %s", model_id, error)
                self.report({"type": "update_error", "model_id": model_id, "error": error})
            model = None  # let it go before the next batch is asked for
        return {
            "ok": not ids or transient < len(ids),
            "models": len(ids), "updates": updates, "errors": n_errors,
            "requests": self._requests() - requests_before,
            "duration_s": round(time.monotonic() - started, 3),
        }


# --- the process ------------------------------------------------------------------------------


def iso_utc(ts: float | None = None) -> str:
    from ipc.store import utc_now_iso

    return utc_now_iso(ts)


def check_due_at_start(last_ts: float | None, now: float | None = None) -> bool:
    now = time.time() if now is None else now
    if last_ts is None:
        return True
    if last_ts > now + CHECK_EVERY_S:  # the clock went back a long way: don't trust the record
        return True
    return now - last_ts > CHECK_EVERY_S


def updater_main(name: str, conn, config_path: str, log_queue=None) -> None:
    import schedule

    from ipc.childmain import Wake
    from ipc.config import load_config
    from ipc.logsetup import setup_child_logging
    from ipc.throttle import Throttle
    from workers.civitai import CivitaiClient
    from workers.worker import Channel, ignore_terminal_interrupt

    ignore_terminal_interrupt()
    cfg, _ = load_config(config_path)
    setup_child_logging(log_queue, secrets=(cfg.civitai_api_key,))
    channel = Channel(conn)
    stop = threading.Event()
    wake = Wake()  # the main loop's sleep; SIGTERM wakes it too (an Event's lock could deadlock there)
    terminated: list[int] = []
    have_manifest = threading.Event()
    lock = threading.Lock()
    state: dict[str, Any] = {"entries": [], "pending": None, "running": False, "retry_at": None,
                             "last_success_ts": None, "config": None}

    def on_sigterm(signum, frame):
        # Runs on the main thread, which may be inside wake.wait(): nothing here takes a lock.
        # The main loop sets `stop` for the other threads.
        terminated.append(signum)
        wake.set()

    signal.signal(signal.SIGTERM, on_sigterm)

    def request_check(why: str) -> None:
        with lock:
            if state["pending"] is None:
                state["pending"] = why
        wake.set()

    def read_channel():
        while not stop.is_set():
            try:
                msg = channel.recv()
            except (EOFError, OSError):
                break
            kind = msg.get("type") if isinstance(msg, dict) else None
            if kind == "manifest":
                with lock:
                    state["entries"] = list(msg.get("entries") or [])
                    if not have_manifest.is_set():
                        # The supervisor keeps the time of the last successful check in the job
                        # store and hands it over here. This process must not open SQLite
                        # itself: it is forked while the supervisor's threads use SQLite, and a
                        # mutex inherited locked deadlocks the first sqlite3.connect (seen).
                        last = msg.get("last_success_ts")
                        state["last_success_ts"] = float(last) if isinstance(last, (int, float)) else None
                have_manifest.set()
                wake.set()
            elif kind == "check_now":
                log.info("update check asked for")
                request_check("asked")
            elif kind == "config":  # SIGHUP: the live keys of a reloaded config
                with lock:
                    state["config"] = msg["config"]
                wake.set()
            elif kind == "stop":
                break
        stop.set()
        wake.set()

    threading.Thread(target=read_channel, name="channel-reader", daemon=True).start()

    client = CivitaiClient(
        cfg.civitai_url,
        api_key=cfg.civitai_api_key,
        throttle=Throttle(cfg.locks_dir / "civitai.throttle", cfg.throttle),
        session=CountingSession(),
    )
    scheduler = schedule.Scheduler()

    def plan(cfg) -> None:
        scheduler.clear()
        if cfg.update_every:
            scheduler.every(int(cfg.update_every)).seconds.do(request_check, "scheduled")
        else:
            scheduler.every().day.at(cfg.update_time).do(request_check, "daily")

    plan(cfg)

    def run_check(why: str) -> None:
        with lock:
            entries = list(state["entries"])
        started = time.time()
        channel.send({"type": "check_started", "why": why})
        log.info("update check (%s): %d manifest entries", why, len(entries))
        checker = UpdateChecker(client, channel.send, should_stop=stop.is_set, sleep=stop.wait)
        summary: dict
        try:
            summary = checker.run(entries)
        except CheckStopped:
            log.info("update check stopped: the daemon is stopping")
            return
        except Exception as exc:  # a bug: report it, keep the schedule
            log.error("update check failed\n%s", traceback.format_exc())
            summary = {"ok": False, "models": len(checked_entries(entries)), "updates": 0, "errors": 0,
                       "requests": 0, "duration_s": round(time.time() - started, 3),
                       "error": f"internal error in the update check: {type(exc).__name__}: {exc}"}
        finally:
            with lock:
                state["running"] = False
            wake.set()
        now = time.time()
        with lock:
            state["retry_at"] = None if summary["ok"] else now + RETRY_FAILED_CHECK_S
        channel.send({"type": "check_done", "ts": iso_utc(now), "unix_ts": now, **summary})

    def next_check_iso() -> str | None:
        candidates = []
        if scheduler.next_run is not None:
            candidates.append(scheduler.next_run.astimezone(UTC).timestamp())  # naive = local time
        with lock:
            if state["retry_at"] is not None:
                candidates.append(state["retry_at"])
        return iso_utc(min(candidates)) if candidates else None

    channel.send({"type": "ready", "pid": os.getpid()})
    log.info("%s ready", name)
    decided = False
    sent_next = None
    while not stop.is_set():
        if terminated:
            stop.set()  # the check ends at its next request or pause
            break
        if not decided and have_manifest.is_set():
            decided = True
            with lock:
                last = state["last_success_ts"]
            if check_due_at_start(last):
                why = "never checked" if last is None else f"last successful check {iso_utc(last)}"
                log.info("update check now (%s), then %s", why, f"every {cfg.update_every / 3600:g} h"
                         if cfg.update_every else f"daily at {cfg.update_time}")
                request_check("start")
            else:
                log.info("last successful update check %s (%.1f h ago); next at %s",
                         iso_utc(last), (time.time() - last) / 3600, next_check_iso())
        try:
            scheduler.run_pending()
        except Exception:  # only request_check runs in there
            log.exception("update schedule failed")
        now = time.time()
        with lock:
            if state["retry_at"] is not None and now >= state["retry_at"] and state["pending"] is None:
                state["retry_at"] = None
                state["pending"] = "retry"
            start = state["pending"] is not None and not state["running"] and have_manifest.is_set()
            if start:
                why, state["pending"], state["running"] = state["pending"], None, True
        if start:
            threading.Thread(target=run_check, args=(why,), name="update-check", daemon=True).start()
        with lock:
            new_cfg, state["config"] = state.get("config"), None
        if new_cfg is not None:
            if (new_cfg.update_time, new_cfg.update_every) != (cfg.update_time, cfg.update_every):
                plan(new_cfg)
            if client.throttle is not None:
                client.throttle.interval_s = float(new_cfg.throttle)
            cfg = new_cfg
        next_iso = next_check_iso()
        if next_iso != sent_next:
            sent_next = next_iso
            channel.send({"type": "schedule", "next_check": next_iso})
        # Sleep until the schedule or a retry is due, or a message wakes us: an idle updater
        # costs nothing.
        due = [scheduler.idle_seconds] if scheduler.idle_seconds is not None else []
        with lock:
            if state["retry_at"] is not None:
                due.append(state["retry_at"] - time.time())
        wake.wait(min(3600.0, max(0.05, min(due))) if due else 3600.0)
    # A check still running is abandoned with the process; it was not a success, so the next
    # start checks again if it is due.
    log.info("%s stopping", name)
