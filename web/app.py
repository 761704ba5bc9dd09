"""The Bottle application: REST routes of SPEC §6, the WebSocket route and the GUI's files.

It never changes jobs or files itself: reads come from the job store (read-only) and the config;
changes go to the supervisor over the control socket.
"""
from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import urlsplit

from bottle import Bottle, HTTPResponse, JSONPlugin, redirect, request, response, static_file

from ipc import VERSION
from ipc.config import jwt_secret
from ipc.control import ControlError
from ipc.layouts import CIVITAI_TYPES, folder_for
from ipc.links import parse_model_url
from ipc.naming import folder_problem
from ipc.states import JobState
from ipc.store import public_job
from web import library, metrics, openapi
from web.auth import MAX_BODY_BYTES, AuthPlugin, Gatekeeper
from web.errors import REASONS, error_body, json_error
from web.openapi import (
    DEFAULT_LIST_LIMIT,
    MAX_ID,
    MAX_JSON_DEPTH,
    MAX_LIST_LIMIT,
    MAX_PRIORITY,
    MAX_SPEED_BPS,
    MAX_STORE_ID,
)

HEALTH_TIMEOUT_S = 3.0  # /health waits this long for the supervisor's word

STATIC_DIR = Path(__file__).parent / "static"
WS_AUTHORIZE_KEY = "civitai.ws_authorize"
JOB_FIELDS = ("model_id", "version_id", "file_id", "url", "priority", "model_type")
SCAN_FIELDS = ("folder", "dry_run")
# What a 404 for a path id says; another `<name_id:int>` gets "no <name> with id N".
MISSING_ID = {
    "job_id": "no job with id {}",
    "model_id": "manifest.json has no entry for model {}",
    "file_id": "manifest.json has no entry for file {}",
}

# --- request helpers ----------------------------------------------------------------------

def _nested_deeper_than(value, limit: int) -> bool:
    """Without recursion: the point is to refuse what would exhaust the stack."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children: Iterable
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def read_json_object() -> dict:
    """The request body as a JSON object, or a JSON error (400 bad JSON, 413 too large)."""
    environ = request.environ
    stream = environ["wsgi.input"]
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise json_error(400, "bad Content-Length header") from None
    if length > MAX_BODY_BYTES:
        raise json_error(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
    try:
        if length:
            raw = stream.read(length)
        elif "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
            raw = stream.read(MAX_BODY_BYTES + 1)  # the server has already removed the chunking
        else:
            raw = b""
    except OSError:  # pywsgi's broken chunked encoding, or the client went away mid-body
        raise json_error(400, "the request body could not be read (broken chunked encoding?)") from None
    if len(raw) > MAX_BODY_BYTES:
        raise json_error(413, f"request body is larger than {MAX_BODY_BYTES} bytes")
    if not raw.strip():
        raise json_error(400, "the request body must be a JSON object")
    too_deep = f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep"
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise json_error(400, "the request body is not UTF-8") from None
    except RecursionError:
        raise json_error(400, too_deep) from None
    except ValueError as exc:
        raise json_error(400, f"invalid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise json_error(400, f"the request body must be a JSON object, not {type(body).__name__}")
    if _nested_deeper_than(body, MAX_JSON_DEPTH):
        raise json_error(400, too_deep)
    return body


def read_optional_json_object() -> dict:
    """Like read_json_object, but no body at all is an empty object (a POST with nothing to say)."""
    environ = request.environ
    chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    if not chunked and environ.get("CONTENT_LENGTH") in (None, "", "0"):
        return {}
    return read_json_object()


def refuse_unknown_fields(body: dict, accepted) -> None:
    """A misspelt field silently ignored would look like success: name every one instead."""
    unknown = sorted(set(body) - set(accepted))
    if unknown:
        names = ", ".join("'" + json.dumps(name)[1:-1][:60] + "'" for name in unknown[:5]) + (", …" if len(unknown) > 5 else "")
        raise json_error(422, f"unknown field{'s' if len(unknown) > 1 else ''} {names}; "
                              f"accepted: {', '.join(accepted)}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def int_field(body: dict, name: str, lo: int = 1, hi: int = MAX_ID) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise json_error(400, f"'{name}' must be an integer, got {json.dumps(value)[:60]}")
    if not lo <= value <= hi:
        raise json_error(422, f"'{name}' must be from {lo} to {hi}, got {value}")
    return value


def query_int(name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"-?[0-9]+", raw.strip()):
        raise json_error(400, f"query parameter '{name}' must be an integer, got {raw[:40]!r}")
    value = int(raw)
    if not lo <= value <= hi:
        raise json_error(400, f"query parameter '{name}' must be from {lo} to {hi}, got {value}")
    return value


class IdRangePlugin:
    """A path id outside 1..2^63-1 names nothing that can exist (SQLite cannot even hold it): a
    404 before anything looks it up. Installed after AuthPlugin, so it runs after the token check."""

    name = "id_range"
    api = 2

    def apply(self, callback, route):
        names = re.findall(r"<(\w+):int>", route.rule)
        if not names:
            return callback

        def in_range(*args, **kwargs):
            for name in names:
                value = kwargs.get(name)
                if value is not None and not 1 <= value <= MAX_STORE_ID:
                    noun = name[:-3] if name.endswith("_id") else name
                    raise json_error(404, MISSING_ID.get(name, f"no {noun} with id {{}}").format(value))
            return callback(*args, **kwargs)

        return in_range


# --- the application ----------------------------------------------------------------------

def make_app(cfg, store, control, hub, clock: Callable[[], float] = time.time) -> Bottle:
    """Build the web application. `control` has `call(op, **args)` (raises ControlError) and
    `subscribe()`; `hub` is a web.hub.Hub; `clock` gives unix seconds (token expiry, uptime)."""
    app = Bottle()
    app.uninstall(JSONPlugin)  # replaced by one with compact output
    app.install(JSONPlugin(json_dumps=lambda obj: json.dumps(obj, separators=(",", ":"), default=str)))
    gate = Gatekeeper(cfg, lambda: jwt_secret(cfg), clock)
    app.install(AuthPlugin(gate))
    app.install(IdRangePlugin())
    app.config[WS_AUTHORIZE_KEY] = gate.check_websocket
    started_at = clock()
    api_hosts = tuple(h for h in {urlsplit(cfg.civitai_url).hostname or ""} if h)

    def ask(op: str, **args):
        try:
            return control.call(op, **args)
        except ControlError as exc:
            status = exc.status if exc.status in REASONS else 500
            raise json_error(status, exc.error) from None
        except OSError as exc:
            raise json_error(503, f"the supervisor is not answering ({exc})") from None

    def job_view(row: dict) -> dict:
        """A job as the API shows it, with `preview`: whether the finished file has its preview
        beside it (the GUI asks for the image only then)."""
        out = public_job(row)
        rel = row.get("path") or (f"{row['model_type']}/{row['filename']}"
                                  if row.get("model_type") and row.get("filename") else None)
        out["preview"] = row.get("state") == JobState.DONE and library.has_preview(cfg.download_path, rel)
        return out

    if hub is not None:
        hub.job_view = job_view  # the WebSocket snapshot shows jobs the same way

    def job_or_404(job_id: int) -> dict:
        job = store.get_job(job_id)
        if job is None:
            raise json_error(404, f"no job with id {job_id}")
        return job

    def answer(status: int, body: dict) -> HTTPResponse:
        return HTTPResponse(body=json.dumps(body, separators=(",", ":"), default=str), status=status,
                            headers={"Content-Type": "application/json"})

    # --- headers on every answer, and JSON for every error ---

    @app.hook("after_request")
    def security_headers():
        response.set_header("X-Content-Type-Options", "nosniff")
        response.set_header("Referrer-Policy", "no-referrer")
        response.set_header("X-Frame-Options", "DENY")
        host = request.environ.get("HTTP_HOST", "")
        ws_src = f" ws://{host} wss://{host}" if re.fullmatch(r"[A-Za-z0-9.:\[\]-]+", host) else ""
        response.set_header(
            "Content-Security-Policy",
            # blob: previews are fetched with the token (an <img> cannot send it) and shown as blob URLs.
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            f"connect-src 'self'{ws_src}; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        )
        if "Cache-Control" not in response.headers:
            response.set_header("Cache-Control", "no-store")

    def json_error_page(res):
        response.content_type = "application/json"
        message = res.body if isinstance(res.body, str) and res.body else REASONS.get(res.status_code, res.status_line)
        if res.status_code == 404 and message == "Not found: '%s'" % request.path:
            message = f"no route {request.method} {request.path}"
        if res.status_code == 500:
            message = "internal server error"
        return error_body(message)

    app.default_error_handler = json_error_page

    # --- public ---

    @app.get("/", public=True)
    def root():
        redirect("/gui")

    @app.get("/health", public=True)
    def health():
        body = {"status": "ok", "version": VERSION, "uptime_s": round(clock() - started_at, 1),
                "events_connected": hub.connected if hub is not None else False}
        # The supervisor's own word: a hung loop or a database it cannot write is not "ok".
        try:
            answer_ = control.call("health", _timeout_s=HEALTH_TIMEOUT_S)
        except ControlError as exc:
            body.update(status="degraded", reason=f"the supervisor is not answering: {exc.error}")
        except OSError as exc:
            body.update(status="degraded", reason=f"the supervisor is not answering ({exc})")
        else:
            if isinstance(answer_, dict) and answer_.get("status") == "degraded":
                body.update(status="degraded", reason=answer_.get("reason"))
        return body

    @app.get("/gui", public=True)
    @app.get("/gui/", public=True)
    def gui_index():
        return _static("index.html")

    @app.get("/gui/<filename:path>", public=True)
    def gui_file(filename):
        return _static(filename)

    def _static(filename):
        res = static_file(filename, root=str(STATIC_DIR))
        if isinstance(res, HTTPResponse) and res.status_code >= 400:
            raise json_error(res.status_code, f"no file {filename}")
        res.set_header("Cache-Control", "no-cache")
        return res

    # --- status and config ---

    @app.get("/api/status")
    def status():
        result = ask("status")
        if isinstance(result, dict):
            result = dict(result)
            result["web"] = {"websocket_clients": len(hub.clients) if hub else 0,
                             "events_connected": hub.connected if hub else False,
                             "last_event_id": hub.last_id if hub else store.last_event_id()}
        return result

    @app.get("/api/config")
    def config():
        return cfg.public_dict()

    # --- jobs ---

    @app.get("/api/jobs")
    def list_jobs():
        limit = query_int("limit", DEFAULT_LIST_LIMIT, 1, MAX_LIST_LIMIT)
        raw_state = request.query.get("state")
        states = [] if raw_state is None else list(dict.fromkeys(s.strip() for s in raw_state.split(",")))
        valid = {s.value for s in JobState}
        for state in states:
            if state not in valid:
                raise json_error(400, f"unknown state '{state[:40]}'; expected one of {', '.join(sorted(valid))}")
        if len(states) <= 1:
            rows = store.list_jobs(state=states[0] if states else None, limit=limit)
        else:
            rows = [row for state in states for row in store.list_jobs(state=state, limit=limit)]
            rows = sorted(rows, key=lambda r: r["id"], reverse=True)[:limit]
        return {"jobs": [job_view(r) for r in rows]}

    @app.post("/api/jobs")
    def add_job():
        body = read_json_object()
        refuse_unknown_fields(body, JOB_FIELDS)
        args: dict[str, int | str | None] = {
            name: int_field(body, name) for name in ("model_id", "version_id", "file_id")}
        priority = int_field(body, "priority", 1, MAX_PRIORITY)
        model_type = body.get("model_type")
        if model_type is not None:
            if not isinstance(model_type, str):
                raise json_error(400, "'model_type' must be a string")
            problem = folder_problem(model_type)
            if problem:
                raise json_error(422, f"'model_type' must be a folder under download_dir: {problem}")
        url = body.get("url")
        if url is not None:
            if not isinstance(url, str):
                raise json_error(400, "'url' must be a string")
            try:
                parsed = parse_model_url(url, api_hosts)
            except ValueError as exc:
                raise json_error(422, str(exc)) from None
            for key, value in parsed.items():
                if args.get(key) is not None and args[key] != value:
                    raise json_error(422, f"'{key}' {args[key]} does not match the URL's {value}")
                args[key] = value
        if args["file_id"] is not None and args["version_id"] is None:
            raise json_error(422, "'file_id' needs 'version_id' (or a URL with ?modelVersionId=)")
        if args["model_id"] is None and args["version_id"] is None:
            raise json_error(422, "give 'model_id', 'version_id' or a civitai.com 'url'")
        args["priority"] = priority
        args["model_type"] = model_type
        result = ask("add_job", **{k: v for k, v in args.items() if v is not None})
        return answer(201 if result.get("created") else 200, {"job": job_view(result["job"])})

    @app.get("/api/jobs/<job_id:int>")
    def get_job(job_id):
        return {"job": job_view(job_or_404(job_id))}

    @app.route("/api/jobs/<job_id:int>", method="PATCH")
    def patch_job(job_id):
        body = read_json_object()
        refuse_unknown_fields(body, ("priority",))
        priority = int_field(body, "priority", 1, MAX_PRIORITY)
        if priority is None:
            raise json_error(422, "'priority' is required")
        result = ask("set_priority", job_id=job_id, priority=priority)
        return {"job": job_view(result["job"])}

    @app.delete("/api/jobs/<job_id:int>")
    def cancel_job(job_id):
        result = ask("cancel_job", job_id=job_id)
        return {"job": job_view(result["job"])}

    @app.post("/api/jobs/<job_id:int>/retry")
    def retry_job(job_id):
        result = ask("retry_job", job_id=job_id)
        return {"job": job_view(result["job"])}

    @app.post("/api/jobs/<job_id:int>/pause")
    def pause_job(job_id):
        return {"job": job_view(ask("pause_job", job_id=job_id)["job"])}

    @app.post("/api/jobs/<job_id:int>/resume")
    def resume_job(job_id):
        return {"job": job_view(ask("resume_job", job_id=job_id)["job"])}

    @app.post("/api/pause")
    def pause_all():
        return ask("pause")

    @app.post("/api/resume")
    def resume_all():
        return ask("resume")

    # --- speed ---

    @app.get("/api/speed")
    def get_speed():
        return ask("speed")

    @app.put("/api/speed")
    def put_speed():
        body = read_json_object()
        refuse_unknown_fields(body, ("max_speed",))
        if "max_speed" not in body:
            raise json_error(422, "'max_speed' is required: bytes per second (0: no cap), or null to go back "
                                  "to the config's and the schedule's cap")
        value = body["max_speed"]
        if value is not None and (not _is_int(value) or not 0 <= value <= MAX_SPEED_BPS):
            shown = json.dumps(value)[:60]
            raise json_error(422, f"'max_speed' must be a whole number of bytes per second from 0 (no cap) to "
                                  f"{MAX_SPEED_BPS}, or null to clear the override; got {shown} (a rate such as "
                                  f"\"5MB\" is written in config.json, the API takes bytes)")
        return ask("set_speed", max_speed=value)

    # --- the library ---

    info_cache = library.InfoCache()

    @app.get("/api/library")
    def get_library():
        result = ask("manifest")
        entries = result.get("entries", []) if isinstance(result, dict) else []
        jobs = store.list_jobs(limit=library.JOB_WINDOW)
        return library.build_library(entries, jobs, cfg.download_path, site_origin=cfg.civitai_origin,
                                     info_cache=info_cache)

    @app.get("/api/library/preview")
    def get_preview():
        rel = request.query.getunicode("path")
        if rel is None:
            raise json_error(400, "query parameter 'path' (<folder>/<file>, as /api/library lists it) is required")
        try:
            path, content_type, size = library.preview_file(cfg.download_path, rel)
            # No symlink put there since the check is followed either; the server closes the file.
            fh = os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)), "rb")
        except library.LibraryPathError as exc:
            raise json_error(exc.status, str(exc)) from None
        except OSError:
            raise json_error(404, f"no preview beside {rel}") from None
        # A preview changes only with its version; the page keeps what it fetched for a while.
        return HTTPResponse(body=fh, status=200, headers={
            "Content-Type": content_type, "Content-Length": str(size), "Cache-Control": "private, max-age=300"})

    @app.post("/api/library/scan")
    def start_scan():
        body = read_optional_json_object()
        refuse_unknown_fields(body, SCAN_FIELDS)
        args: dict[str, str | bool] = {}
        folder = body.get("folder")
        if folder is not None:
            if not isinstance(folder, str):
                raise json_error(400, "'folder' must be a string")
            problem = folder_problem(folder)
            if problem:
                raise json_error(422, f"'folder' must be a folder under download_dir: {problem}")
            args["folder"] = folder
        dry_run = body.get("dry_run")
        if dry_run is not None:
            if not isinstance(dry_run, bool):
                raise json_error(400, "'dry_run' must be true or false")
            args["dry_run"] = dry_run
        result = ask("library_scan", **args)
        return answer(202, {"scan": result.get("scan") if isinstance(result, dict) else None})

    @app.get("/api/library/scan")
    def scan_status():
        result = ask("library_scan_status")
        return {"scan": result.get("scan") if isinstance(result, dict) else None}

    @app.get("/api/layout")
    def get_layout():
        # What "Add a model" shows before the download: where each Civitai type goes.
        return {"layout": cfg.layout, "types": list(CIVITAI_TYPES),
                "folders": {kind: folder_for(kind, cfg.layout, cfg.folders) for kind in CIVITAI_TYPES}}

    # --- manifest and updates ---

    @app.get("/api/manifest")
    def get_manifest():
        result = ask("manifest")
        return {"entries": result.get("entries", []) if isinstance(result, dict) else []}

    @app.post("/api/manifest")
    def add_manifest_entry():
        body = read_json_object()
        entry = body["entry"] if set(body) == {"entry"} and isinstance(body["entry"], dict) else body
        # manifest.json itself has no upper bounds; the API keeps to the ones it states.
        for name in ("modelId", "modelVersionId", "fileId"):
            if _is_int(entry.get(name)) and entry[name] > MAX_ID:
                raise json_error(422, f"'{name}' must be from 1 to {MAX_ID}, got {entry[name]}")
        if _is_int(entry.get("priority")) and entry["priority"] > MAX_PRIORITY:
            raise json_error(422, f"'priority' must be from 1 to {MAX_PRIORITY}, got {entry['priority']}")
        result = ask("add_manifest_entry", entry=entry)
        job = result.get("job")
        return answer(201, {"entry": result.get("entry"), "job": job_view(job) if isinstance(job, dict) else None})

    @app.delete("/api/manifest/<model_id:int>")
    def delete_manifest_model(model_id):
        return ask("delete_manifest_model", model_id=model_id)

    @app.delete("/api/manifest/<model_id:int>/<file_id:int>")
    def delete_manifest_entry(model_id, file_id):
        return ask("delete_manifest_entry", model_id=model_id, file_id=file_id)

    @app.post("/api/updates/check")
    def check_updates():
        result = ask("check_updates")
        return answer(202, result if isinstance(result, dict) else {"started": True})

    # --- events ---

    @app.get("/api/events")
    def events():
        limit = query_int("limit", DEFAULT_LIST_LIMIT, 1, MAX_LIST_LIMIT)
        after = query_int("after", None, 0, MAX_STORE_ID)
        rows = store.recent_events(limit) if after is None else store.events_after(after, limit)
        return {"events": rows, "last_id": store.last_event_id()}

    @app.get("/ws", websocket=True)
    def websocket():
        ws = request.environ.get("wsgi.websocket")
        if ws is None:
            raise json_error(400, "this is the WebSocket endpoint: connect with a WebSocket client")
        try:
            after = int(request.query.get("after", ""))
        except ValueError:
            after = None
        hub.run_session(ws, after)
        return ""

    # --- monitoring and description ---

    @app.get("/metrics")
    def prometheus():
        try:
            status = control.call("status")
        except (ControlError, OSError):
            status = None
        response.content_type = metrics.CONTENT_TYPE
        return metrics.render(store, status, hub)

    @app.get("/openapi.json")
    def openapi_json():
        return openapi.spec(VERSION)

    return app
