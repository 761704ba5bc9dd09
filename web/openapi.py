"""/openapi.json: every route of the web API described as OpenAPI 3.0, and the limits the routes enforce.

The limits live here, in the contract, and web/app.py enforces what this document says: a
third-party client (tests/web/test_schema.py runs one) must find the two in agreement.
"""
from __future__ import annotations

from ipc.states import JobState
from web.auth import MAX_BODY_BYTES

JOB_STATES = [s.value for s in JobState]
MAX_ID = 2**53  # what a browser's JSON numbers hold exactly: the most a body's id may be
MAX_STORE_ID = 2**63 - 1  # SQLite's largest integer: an id in a path above it cannot exist
MAX_PRIORITY = 1_000_000
MAX_LIST_LIMIT = 1000
MAX_SPEED_BPS = 2**40  # 1 TiB/s: an override above it is a typo, not a cap
DEFAULT_LIST_LIMIT = 100
MAX_JSON_DEPTH = 32  # nesting of a request body; the API's own bodies are at most 3 deep
# gevent's pywsgi (http.client.parse_headers) refuses these; web/ws.py answers them as JSON.
MAX_REQUEST_LINE_BYTES = 8192
MAX_HEADER_LINE_BYTES = 65536
MAX_HEADERS = 100
# Patterns state what every accepted value has (so a value that does not match is always refused);
# the rest of a rule (Windows' device names, invisible characters, lengths in bytes, which host a
# URL names) is checked by the code and refused with 422 and the reason.
_NAME_CHAR = r'[^\\/<>:"|?*\x00-\x1f\x7f-\x9f]'
_NAME_END = r'[^\\/<>:"|?*\x00-\x1f\x7f-\x9f. ]'
FOLDER_PATTERN = f"^{_NAME_CHAR}{{0,199}}{_NAME_END}(/{_NAME_CHAR}{{0,199}}{_NAME_END}){{0,15}}$"
FILENAME_PATTERN = f"^({_NAME_END}({_NAME_CHAR}{{0,198}}{_NAME_END})?)?$"
LIBRARY_PATH_PATTERN = f"^{_NAME_CHAR}{{0,199}}{_NAME_END}(/{_NAME_CHAR}{{0,199}}{_NAME_END}){{1,16}}$"
URL_PATTERN = r"^[ \t\r\n]*[hH][tT][tT][pP][sS]?://[^\x00-\x20\x7f]+[ \t\r\n]*$"

# Every answer may be one of these, whatever the route: the server refuses before any route runs.
_ALWAYS = (403, 414, 431)


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict:
    return {str(c): {"$ref": f"#/components/responses/E{c}"} for c in sorted(set(codes) | set(_ALWAYS))}


def _op(summary: str, responses: dict, *, params=None, body=None, body_required=True, public=False, errors=(401,),
        tag="jobs"):
    codes = set(errors) | ({400, 413} if body else set())
    op = {"summary": summary, "tags": [tag], "responses": {**responses, **_errors(*codes)}}
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = {"required": body_required, "content": {"application/json": {"schema": body}}}
    if public:
        op["security"] = []
    return op


def _query(name: str, description: str, schema: dict, required: bool = False, **extra) -> dict:
    return {"name": name, "in": "query", "required": required, "description": description, "schema": schema,
            **extra}


def _path_id(name: str, what: str) -> dict:
    # No maximum: an id that does not exist, however large, is a 404 (SPEC §6), not a bad request.
    return {"name": name, "in": "path", "required": True, "description": what,
            "schema": {"type": "integer", "minimum": 1}}


def _id(description: str) -> dict:
    return {"type": "integer", "minimum": 1, "maximum": MAX_ID, "description": description}


def _nullable(schema: dict) -> dict:
    return {**schema, "nullable": True}


_JOB_ID = _path_id("id", "The job's id")
_MODEL_ID = _path_id("modelId", "The model's id on Civitai (civitai.com/models/<id>)")
_FILE_ID = _path_id("fileId", "The file's id on Civitai (fileId in the manifest entry)")
_PAUSED = {"type": "object", "required": ["paused"], "properties": {"paused": {"type": "boolean"}}}
_FILE_ID = _path_id("fileId", "The file's id on Civitai")
_JOB_ANSWER = {"type": "object", "properties": {"job": _ref("Job")}, "required": ["job"]}
_SCAN_ANSWER = {"type": "object", "properties": {"scan": _nullable(_ref("Scan"))}, "required": ["scan"]}
_RATE = {"type": "integer", "minimum": 0, "description": "Bytes per second; 0: no cap"}
_LIBRARY_STATES = ["present", "downloading", "queued", "paused", "failed", "missing", "update_available"]
_PRIORITY = {"type": "integer", "minimum": 1, "maximum": MAX_PRIORITY, "description": "1 is the most urgent"}
_FOLDER = {
    "type": "string", "pattern": FOLDER_PATTERN, "example": "lora",
    "description": "The folder under download_dir, such as `lora` or `models/Stable-diffusion`: relative, "
                   "'/' between folders, each a name Linux and Windows both allow (SPEC §3); a name "
                   "Windows reserves (`con`, `aux`, `com1`…), an invisible character or a name longer "
                   "than 200 bytes is refused with 422 and the reason.",
}
_SECURITY_NOTE = (
    "Every route needs `Authorization: Bearer <jwt>` (HS256 with `exp`, minted by `supervisor.py token`) "
    "except /health, / and the GUI's files. Every error is `{\"error\": \"…\"}` saying what to fix, with "
    "400 (malformed: not JSON, a wrong type), 401, 403 (the Host is not allowed), 404, 409, 413 (body "
    f"above {MAX_BODY_BYTES} bytes), 414 (request line above {MAX_REQUEST_LINE_BYTES} bytes), 422 "
    "(well-formed but not acceptable: out of range, unknown fields, rules between fields), 431 (a header "
    f"line above {MAX_HEADER_LINE_BYTES} bytes, or more than {MAX_HEADERS} headers) or 503 (the "
    "supervisor is not answering)."
)


def spec(version: str) -> dict:
    job_errors = (401, 404, 409, 503)
    return {
        "openapi": "3.0.3",
        "info": {"title": "Civitai download daemon", "version": version, "description": _SECURITY_NOTE},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "tags": [{"name": n} for n in ("jobs", "manifest", "library", "updates", "events", "daemon")],
        "paths": {
            "/health": {"get": _op("Liveness of the web process", {
                "200": _json({"type": "object", "required": ["status"],
                              "properties": {"status": {"type": "string", "enum": ["ok", "degraded"]},
                                             "reason": {"type": "string", "description": "Why it is degraded"},
                                             "version": {"type": "string"}, "uptime_s": {"type": "number"},
                                             "events_connected": {"type": "boolean"}}},
                             "Alive")}, public=True, errors=(), tag="daemon")},
            # Bottle's redirect() answers an HTTP/1.1 client with 303 See Other.
            "/": {"get": _op("Redirect to the GUI", {"303": {"description": "To /gui"}}, public=True,
                             errors=(), tag="daemon")},
            "/gui": {"get": _op("The GUI (HTML; static files under /gui/)",
                                {"200": {"description": "HTML page", "content": {"text/html": {}}}},
                                public=True, errors=(), tag="daemon")},
            "/api/status": {"get": _op("Version, uptime, children, queue counts, updater", {
                "200": _json(_ref("Status"), "Status")}, errors=(401, 503), tag="daemon")},
            "/api/config": {"get": _op("The config with secrets shown as ***", {
                "200": _json({"type": "object", "additionalProperties": True,
                              "description": "config.json's keys with their values in force"}, "Config")},
                tag="daemon")},
            "/api/jobs": {
                "get": _op("Jobs, newest first", {"200": _json(
                    {"type": "object", "required": ["jobs"],
                     "properties": {"jobs": {"type": "array", "items": _ref("Job")}}}, "Jobs")},
                    params=[_query("state", "Only jobs in these states, separated by commas",
                                   {"type": "array", "minItems": 1, "items": {"type": "string", "enum": JOB_STATES},
                                    "example": ["failed", "cancelled"]}, style="form", explode=False),
                            _query("limit", f"At most this many (1–{MAX_LIST_LIMIT}, default {DEFAULT_LIST_LIMIT})",
                                   {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT})],
                    errors=(400, 401)),
                "post": _op("Queue a model file", {
                    "201": _json(_JOB_ANSWER, "Queued"),
                    "200": _json(_JOB_ANSWER, "The same file is already queued or running: that job"),
                }, body=_ref("NewJob"), errors=(401, 422, 503)),
            },
            "/api/jobs/{id}": {
                "get": _op("One job", {"200": _json(_JOB_ANSWER, "The job")}, params=[_JOB_ID],
                           errors=(401, 404)),
                "patch": _op("Change a job's priority", {"200": _json(_JOB_ANSWER, "The changed job")},
                             params=[_JOB_ID], body=_ref("JobChange"), errors=job_errors + (422,)),
                "delete": _op("Cancel a job (a running download stops within 2 s)",
                              {"200": _json(_JOB_ANSWER, "The cancelled job")}, params=[_JOB_ID], errors=job_errors),
            },
            "/api/jobs/{id}/retry": {"post": _op("Queue a failed or cancelled job again", {
                "200": _json(_JOB_ANSWER, "The queued job")}, params=[_JOB_ID], errors=job_errors)},
            "/api/jobs/{id}/pause": {"post": _op(
                "Pause one job: a running download stops within 2 s and keeps its partial file", {
                    "200": _json(_JOB_ANSWER, "The paused job")}, params=[_JOB_ID], errors=job_errors)},
            "/api/jobs/{id}/resume": {"post": _op("Queue a paused job again", {
                "200": _json(_JOB_ANSWER, "The queued job")}, params=[_JOB_ID], errors=job_errors)},
            "/api/pause": {"post": _op(
                "Pause every download: running ones stop within 2 s and keep their bytes, nothing starts; "
                "kept across restarts", {"200": _json(_PAUSED, "Paused")}, errors=(401, 503), tag="daemon")},
            "/api/resume": {"post": _op("Resume downloads after a pause", {"200": _json(_PAUSED, "Resumed")},
                                        errors=(401, 503), tag="daemon")},
            "/api/speed": {
                "get": _op("The download speed cap in force and where it comes from", {
                    "200": _json(_ref("Speed"), "The cap")}, errors=(401, 503), tag="daemon"),
                "put": _op("Set an override of the cap (kept across restarts), or clear it with null", {
                    "200": _json(_ref("Speed"), "The cap now")}, body=_ref("SpeedChange"),
                    errors=(401, 422, 503), tag="daemon"),
            },
            "/api/library": {"get": _op(
                "Every manifest entry with its state, names, base model, type, folder, size, trigger "
                "words and whether a preview is beside it; free space and bytes used per folder",
                {"200": _json(_ref("Library"), "The library")}, errors=(401, 503), tag="library")},
            "/api/library/preview": {"get": _op(
                "The preview image beside a file of the library (`<stem>.preview.<ext>`), with its real "
                "content type; symlinks are not followed",
                {"200": {"description": "The image", "content": {
                    t: {"schema": {"type": "string", "format": "binary"}}
                    for t in ("image/png", "image/jpeg", "image/webp", "image/gif")}}},
                params=[_query("path", "`<folder>/<file>` of the model file, as /api/library lists it; a "
                               "name the folder rules refuse (SPEC §3) is a 422",
                               {"type": "string", "pattern": LIBRARY_PATH_PATTERN,
                                "example": "lora/model.safetensors"}, required=True)],
                errors=(400, 401, 404, 422), tag="library")},
            "/api/library/scan": {
                "post": _op("Adopt the model files already under download_dir (`supervisor.py import`): "
                            "hash them, identify them on Civitai, add them to the manifest as they are", {
                                "202": _json(_SCAN_ANSWER, "Started")},
                            body=_ref("ScanRequest"), body_required=False, errors=(401, 404, 409, 422, 503),
                            tag="library"),
                "get": _op("The running or last scan", {"200": _json(
                    {"type": "object", "required": ["scan"], "properties": {"scan": _nullable(_ref("Scan"))}},
                    "The scan, or null when none ran since the daemon started")}, errors=(401, 503), tag="library"),
            },
            "/api/layout": {"get": _op("Where each Civitai type goes under the configured layout and folders", {
                "200": _json(_ref("Layout"), "The layout")}, tag="library")},
            "/api/manifest": {
                "get": _op("manifest.json's entries", {"200": _json(
                    {"type": "object", "required": ["entries"],
                     "properties": {"entries": {"type": "array", "items": _ref("ManifestEntry")}}},
                    "Entries")}, errors=(401, 503), tag="manifest"),
                "post": _op("Add an entry (validated like the file) and queue its download", {
                    "201": _json({"type": "object", "required": ["entry", "job"],
                                  "properties": {"entry": _ref("ManifestEntry"),
                                                 "job": {**_ref("Job"), "nullable": True}}},
                                 "Added; `job` is the download it queued, if one is queued already")},
                    body=_ref("ManifestEntry"), errors=(401, 409, 422, 503), tag="manifest"),
            },
            "/api/manifest/{modelId}": {"delete": _op("Drop a model's entries (files stay)", {
                "200": _json({"type": "object", "required": ["removed"],
                              "properties": {"removed": {"type": "integer", "minimum": 1}}}, "Removed")},
                params=[_MODEL_ID], errors=(401, 404, 409, 503), tag="manifest")},
            "/api/manifest/{modelId}/{fileId}": {"delete": _op("Drop one entry of a model (the file stays)", {
                "200": _json({"type": "object", "required": ["removed"],
                              "properties": {"removed": {"type": "integer", "minimum": 1}}}, "Removed")},
                params=[_MODEL_ID, _FILE_ID], errors=(401, 404, 409, 503), tag="manifest")},
            "/api/updates/check": {"post": _op("Run the update check now", {
                "202": _json({"type": "object", "properties": {"started": {"type": "boolean"}}}, "Started")},
                errors=(401, 409, 503), tag="updates")},
            "/api/events": {"get": _op("The event log", {"200": _json(
                {"type": "object", "required": ["events", "last_id"],
                 "properties": {"events": {"type": "array", "items": _ref("Event")},
                                "last_id": {"type": "integer", "minimum": 0}}}, "Events, oldest first")},
                params=[_query("after", "Events with an id above this; without it, the most recent ones",
                               {"type": "integer", "minimum": 0, "maximum": MAX_STORE_ID}),
                        _query("limit", f"At most this many (1–{MAX_LIST_LIMIT}, default {DEFAULT_LIST_LIMIT})",
                               {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT})],
                errors=(400, 401), tag="events")},
            "/metrics": {"get": _op("Prometheus metrics", {"200": {
                "description": "Text exposition format 0.0.4", "content": {"text/plain": {}}}}, tag="daemon")},
            "/openapi.json": {"get": _op("This document", {"200": _json({"type": "object"}, "OpenAPI 3")},
                                         tag="daemon")},
            "/ws": {"get": _op(
                "WebSocket of live events. Send the token as the subprotocols `bearer`, `<jwt>` "
                "(`new WebSocket(url, ['bearer', token])`) or in an Authorization header, never in the URL. "
                "The first message is `{\"event\": \"snapshot\", \"jobs\": […], \"last_id\": N}`; with "
                "`?after=<id>` the events missed since that id follow, then every event live "
                "(download_progress at most 4 a second a job). A GET without the upgrade is a 400.",
                {"101": {"description": "Switching protocols"}},
                params=[_query("after", "Last event id the client saw", {"type": "integer", "minimum": 0}),
                        {"name": "Upgrade", "in": "header", "required": True,
                         "schema": {"type": "string", "enum": ["websocket"]}},
                        {"name": "Sec-WebSocket-Version", "in": "header", "required": True,
                         "schema": {"type": "string", "enum": ["13"]}},
                        {"name": "Sec-WebSocket-Key", "in": "header", "required": True,
                         "schema": {"type": "string", "pattern": "^[A-Za-z0-9+/]{22}==$"}}],
                errors=(400, 401), tag="events")},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "responses": {f"E{c}": _json(_ref("Error"), d) for c, d in (
                (400, "Malformed request: not JSON, not an object, a value of the wrong type"),
                (401, "Missing, invalid or expired token"), (403, "The Host header is not allowed"),
                (404, "No such thing"), (409, "Conflict with the current state"),
                (413, f"Body larger than {MAX_BODY_BYTES} bytes"),
                (414, f"Request line longer than {MAX_REQUEST_LINE_BYTES} bytes"),
                (422, "Well-formed, but a value is out of range, a field is unknown or fields disagree"),
                (431, f"A header line longer than {MAX_HEADER_LINE_BYTES} bytes, or more than {MAX_HEADERS} headers"),
                (503, "The supervisor is not answering"))},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
                "Job": {"type": "object", "required": [
                    "id", "model_id", "version_id", "file_id", "model_type", "filename", "model_name",
                    "version_name", "state", "priority", "bytes_done", "bytes_total", "speed_bps", "attempts",
                    "error", "not_before", "created_at", "updated_at",
                ], "properties": {
                    "id": {"type": "integer", "minimum": 1},
                    "model_id": _nullable({"type": "integer"}),
                    "version_id": _nullable({"type": "integer"}),
                    "file_id": _nullable({"type": "integer"}),
                    "model_type": _nullable({"type": "string"}),
                    "filename": _nullable({"type": "string"}),
                    "model_name": _nullable({"type": "string", "description": "The model's name on Civitai"}),
                    "version_name": _nullable({"type": "string", "description": "The version's name on Civitai"}),
                    "base_model": _nullable({"type": "string", "description": "Civitai's base model (SDXL 1.0, "
                                                                              "Pony, Flux.1 D, …)"}),
                    "state": {"type": "string", "enum": JOB_STATES},
                    "priority": {"type": "integer", "description": "1 is the most urgent"},
                    "bytes_done": {"type": "integer", "minimum": 0},
                    "bytes_total": _nullable({"type": "integer", "minimum": 0}),
                    "speed_bps": {"type": "number", "minimum": 0},
                    "attempts": {"type": "integer", "minimum": 0},
                    "error": _nullable({"type": "string"}),
                    "not_before": _nullable({
                        "type": "string", "format": "date-time",
                        "description": "Set while the job waits for a time: early access ending, a rate "
                                       "limit, Civitai still hashing the file"}),
                    "created_at": {"type": "string", "format": "date-time"},
                    "updated_at": {"type": "string", "format": "date-time"},
                    "max_attempts": {"type": "integer", "minimum": 1},
                    "reason": _nullable({"type": "string", "description": "Why it failed, as a short key "
                                                                          "(`not_found`, `cancelled`…)"}),
                    "sha256": _nullable({"type": "string"}),
                    "path": _nullable({"type": "string", "description": "The file, relative to download_dir"}),
                    "source": {"type": "string", "description": "Who queued it: `manifest`, `api`, `update`…"},
                    "preview": {"type": "boolean", "description": "A finished file has its preview beside it "
                                                                  "(GET /api/library/preview?path=<path>)"},
                }},
                "NewJob": {
                    "type": "object", "additionalProperties": False,
                    "description": "One of model_id, version_id or url; null is the same as leaving a field "
                                   "out; a field not listed here is refused with 422 naming it. `file_id` "
                                   "needs a version (version_id, or a URL with ?modelVersionId=); ids given "
                                   "beside a URL must be the URL's.",
                    "anyOf": [{"required": [name], "properties": {name: {"type": kind}}}
                              for name, kind in (("model_id", "integer"), ("version_id", "integer"), ("url", "string"))],
                    "properties": {
                        "model_id": _nullable(_id("civitai.com/models/<id>: its newest version's primary file")),
                        "version_id": _nullable(_id("A model version's id: its primary file")),
                        "url": _nullable({
                            "type": "string", "pattern": URL_PATTERN,
                            "example": "https://civitai.com/models/4201?modelVersionId=130072",
                            "description": "A civitai.com (or civitai.green) model page or download URL: "
                                           "/models/<id>[/slug][?modelVersionId=<id>], /model-versions/<id>, "
                                           "/api/download/models/<id>[?fileId=<id>]; another host or path is "
                                           "refused with 422."}),
                        "file_id": _nullable(_id("One file of the version")),
                        "priority": _nullable({**_PRIORITY, "default": 10}),
                        "model_type": _nullable(_FOLDER),
                    }},
                "JobChange": {"type": "object", "additionalProperties": False, "required": ["priority"],
                              "properties": {"priority": _PRIORITY}},
                "ManifestEntry": {
                    "type": "object", "required": ["modelId", "model_type"], "additionalProperties": True,
                    "description": "An entry of manifest.json; fields of your own are kept as they are.",
                    "properties": {
                        "modelId": _id("civitai.com/models/<id>"),
                        "modelVersionId": _nullable(_id("Pin this version; without it, the newest")),
                        "fileId": _nullable(_id("Pin this file of the version")),
                        "model_type": _FOLDER,
                        "sha256": _nullable({"type": "string", "pattern": "^([0-9a-fA-F]{64})?$"}),
                        "url": _nullable({"type": "string"}),
                        "filename": _nullable({"type": "string", "pattern": FILENAME_PATTERN,
                                               "description": "A plain file name, no folders"}),
                        "priority": _PRIORITY,
                        "updatedAt": _nullable({"type": "string"}),
                        "file_type": _nullable({"type": "string", "pattern": r"\S", "example": "Model"}),
                        "format": _nullable({"type": "string", "pattern": r"\S", "example": "SafeTensor"}),
                        "fp": _nullable({"type": "string", "pattern": r"\S", "example": "fp16"}),
                    }},
                "Speed": {"type": "object", "required": ["max_speed", "source", "config", "override", "schedule"],
                          "properties": {
                              "max_speed": _nullable({**_RATE, "description": "The cap in force, bytes per "
                                                      "second; null: no cap"}),
                              "source": {"type": "string", "enum": ["config", "schedule", "api"]},
                              "config": _RATE,
                              "override": _nullable({**_RATE, "description": "Set by PUT /api/speed"}),
                              "schedule": {"type": "array", "items": {
                                  "type": "object", "properties": {"from": {"type": "string"}, "to": {"type": "string"},
                                                                   "max_speed": _RATE}}}}},
                "SpeedChange": {"type": "object", "additionalProperties": False, "required": ["max_speed"],
                                "properties": {"max_speed": _nullable({
                                    **_RATE, "maximum": MAX_SPEED_BPS,
                                    "description": "An override in bytes per second (0: no cap); null clears it. "
                                                   "A rate such as \"5MB\" is for config.json: 422 here."})}},
                "ScanRequest": {"type": "object", "additionalProperties": False, "properties": {
                    "folder": _nullable({**_FOLDER, "description": "Only this folder under download_dir"}),
                    "dry_run": _nullable({"type": "boolean", "description": "Identify, add nothing"})}},
                "Scan": {"type": "object", "required": ["state"], "additionalProperties": True, "properties": {
                    "state": {"type": "string", "enum": ["running", "done", "failed"]},
                    "folder": _nullable({"type": "string"}), "dry_run": {"type": "boolean"},
                    "files_done": {"type": "integer", "minimum": 0}, "files_total": {"type": "integer", "minimum": 0},
                    "bytes_done": {"type": "integer", "minimum": 0}, "bytes_total": {"type": "integer", "minimum": 0},
                    "matched": {"type": "integer", "minimum": 0}, "added": {"type": "integer", "minimum": 0},
                    "already_listed": {"type": "integer", "minimum": 0},
                    "unknown": {"type": "array", "items": {"type": "string"}},
                    "differs": {"type": "array", "items": {"type": "string"}},
                    "skipped": {"type": "array", "items": {"type": "array", "items": {"type": "string"}}},
                    "seconds": _nullable({"type": "number", "minimum": 0}), "error": _nullable({"type": "string"})}},
                "LibraryEntry": {"type": "object", "required": ["model_id", "folder", "state"], "properties": {
                    "model_id": _nullable({"type": "integer"}), "version_id": _nullable({"type": "integer"}),
                    "file_id": _nullable({"type": "integer"}), "folder": _nullable({"type": "string"}),
                    "filename": _nullable({"type": "string"}),
                    "path": _nullable({"type": "string", "description": "<folder>/<file>: the preview route's path"}),
                    "state": {"type": "string", "enum": _LIBRARY_STATES},
                    "model_name": _nullable({"type": "string"}), "version_name": _nullable({"type": "string"}),
                    "base_model": _nullable({"type": "string"}),
                    "type": _nullable({"type": "string", "description": "Civitai's type (LORA, Checkpoint, …)"}),
                    "size": _nullable({"type": "integer", "minimum": 0, "description": "Bytes on disk"}),
                    "expected_size": _nullable({"type": "integer", "minimum": 0}),
                    "trigger_words": {"type": "array", "items": {"type": "string"}},
                    "preview": {"type": "boolean"}, "info": {"type": "boolean"},
                    "url": _nullable({"type": "string", "description": "The model's page on Civitai"}),
                    "job": _nullable({"type": "object", "additionalProperties": True})}},
                "Library": {"type": "object", "required": ["entries", "folders", "disk", "counts"], "properties": {
                    "entries": {"type": "array", "items": _ref("LibraryEntry")},
                    "folders": {"type": "array", "items": {"type": "object", "properties": {
                        "folder": {"type": "string"}, "exists": {"type": "boolean"},
                        "entries": {"type": "integer", "minimum": 0}, "entry_bytes": {"type": "integer", "minimum": 0},
                        "bytes": {"type": "integer", "minimum": 0}, "files": {"type": "integer", "minimum": 0}}}},
                    "disk": _nullable({"type": "object", "properties": {
                        "total": {"type": "integer"}, "used": {"type": "integer"}, "free": {"type": "integer"}}}),
                    "counts": {"type": "object", "additionalProperties": {"type": "integer"}}}},
                "Layout": {"type": "object", "required": ["layout", "types", "folders"], "properties": {
                    "layout": {"type": "string", "enum": ["plain", "comfyui", "a1111"]},
                    "types": {"type": "array", "items": {"type": "string"}},
                    "folders": {"type": "object", "additionalProperties": {"type": "string"}}}},
                "Event": {"type": "object", "required": ["id", "event", "ts"], "additionalProperties": True,
                          "properties": {"id": {"type": "integer"}, "event": {"type": "string"},
                                         "ts": {"type": "string", "format": "date-time"}}},
                "Status": {"type": "object", "properties": {
                    "version": {"type": "string"}, "started_at": {"type": "string"},
                    "uptime_s": {"type": "number"},
                    "children": {"type": "array", "items": {"type": "object", "properties": {
                        "name": {"type": "string"}, "kind": {"type": "string"}, "pid": _nullable({"type": "integer"}),
                        "state": {"type": "string"}, "job_id": _nullable({"type": "integer"}),
                        "restarts": {"type": "integer"}, "since": _nullable({"type": "string"})}}},
                    "queue": {"type": "object", "additionalProperties": {"type": "integer"}},
                    "updater": {"type": "object", "properties": {
                        "last_check": _nullable({"type": "string"}),
                        "last_success": _nullable({"type": "string"}),
                        "next_check": _nullable({"type": "string"}), "running": {"type": "boolean"}}},
                }},
            },
        },
    }
