"""/openapi.json: every route of the web API described as OpenAPI 3.0."""
from __future__ import annotations

JOB_STATES = ["queued", "downloading", "verifying", "done", "failed", "cancelled"]


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict:
    return {str(c): {"$ref": f"#/components/responses/E{c}"} for c in codes}


def _op(summary: str, responses: dict, *, params=None, body=None, public=False, errors=(401, 403), tag="jobs"):
    op = {"summary": summary, "tags": [tag], "responses": {**responses, **_errors(*errors)}}
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if public:
        op["security"] = []
    return op


def _query(name: str, description: str, schema: dict) -> dict:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


_JOB_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}
_JOB_ANSWER = {"type": "object", "properties": {"job": _ref("Job")}, "required": ["job"]}


def spec(version: str) -> dict:
    job_errors = (400, 401, 403, 404, 409, 413, 503)
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Civitai download daemon",
            "version": version,
            "description": (
                "Every route needs `Authorization: Bearer <jwt>` (HS256 with `exp`, minted by "
                "`supervisor.py token`) except /health, / and the GUI's files. Errors are "
                '`{"error": "…"}`.'
            ),
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "tags": [{"name": n} for n in ("jobs", "manifest", "updates", "events", "daemon")],
        "paths": {
            "/health": {"get": _op("Liveness of the web process", {
                "200": _json({"type": "object", "properties": {"status": {"type": "string", "enum": ["ok"]}}},
                             "Alive")}, public=True, errors=(403,), tag="daemon")},
            "/": {"get": _op("Redirect to the GUI", {"302": {"description": "To /gui"}}, public=True,
                             errors=(403,), tag="daemon")},
            "/gui": {"get": _op("The GUI (HTML; static files under /gui/)",
                                {"200": {"description": "HTML page", "content": {"text/html": {}}}},
                                public=True, errors=(403,), tag="daemon")},
            "/api/status": {"get": _op("Version, uptime, children, queue counts, updater", {
                "200": _json(_ref("Status"), "Status")}, errors=(401, 403, 503), tag="daemon")},
            "/api/config": {"get": _op("The config with secrets shown as ***", {
                "200": _json({"type": "object", "additionalProperties": True,
                              "description": "config.json's keys with their values in force"}, "Config")},
                tag="daemon")},
            "/api/jobs": {
                "get": _op("Jobs, newest first", {"200": _json(
                    {"type": "object", "properties": {"jobs": {"type": "array", "items": _ref("Job")}}}, "Jobs")},
                    params=[_query("state", "One state or several separated by commas",
                                   {"type": "string", "example": "failed,cancelled"}),
                            _query("limit", "At most this many (1–1000, default 100)",
                                   {"type": "integer", "minimum": 1, "maximum": 1000})],
                    errors=(400, 401, 403)),
                "post": _op("Queue a model file", {
                    "201": _json(_JOB_ANSWER, "Queued"),
                    "200": _json(_JOB_ANSWER, "The same file is already queued or running: that job"),
                }, body=_ref("NewJob"), errors=(400, 401, 403, 413, 422, 503)),
            },
            "/api/jobs/{id}": {
                "get": _op("One job", {"200": _json(_JOB_ANSWER, "The job")}, params=[_JOB_ID],
                           errors=(401, 403, 404)),
                "patch": _op("Change a job's priority", {"200": _json(_JOB_ANSWER, "The changed job")},
                             params=[_JOB_ID], body={"type": "object", "required": ["priority"], "properties": {
                                 "priority": {"type": "integer", "minimum": 1}}}, errors=job_errors + (422,)),
                "delete": _op("Cancel a job (a running download stops within 2 s)",
                              {"200": _json(_JOB_ANSWER, "The cancelled job")}, params=[_JOB_ID], errors=job_errors),
            },
            "/api/jobs/{id}/retry": {"post": _op("Queue a failed or cancelled job again", {
                "200": _json(_JOB_ANSWER, "The queued job")}, params=[_JOB_ID], errors=job_errors)},
            "/api/manifest": {
                "get": _op("manifest.json's entries", {"200": _json(
                    {"type": "object", "properties": {"entries": {"type": "array", "items": _ref("ManifestEntry")}}},
                    "Entries")}, errors=(401, 403, 503), tag="manifest"),
                "post": _op("Add an entry (validated like the file) and queue its download", {
                    "201": _json({"type": "object", "properties": {"entry": _ref("ManifestEntry"),
                                                                    "job": _ref("Job")}}, "Added")},
                    body=_ref("ManifestEntry"), errors=(400, 401, 403, 409, 413, 422, 503), tag="manifest"),
            },
            "/api/manifest/{modelId}": {"delete": _op("Drop a model's entries (files stay)", {
                "200": _json({"type": "object", "properties": {"removed": {"type": "integer"}}}, "Removed")},
                params=[{"name": "modelId", "in": "path", "required": True, "schema": {"type": "integer"}}],
                errors=(401, 403, 404, 503), tag="manifest")},
            "/api/updates/check": {"post": _op("Run the update check now", {
                "202": _json({"type": "object", "properties": {"started": {"type": "boolean"}}}, "Started")},
                errors=(401, 403, 409, 503), tag="updates")},
            "/api/events": {"get": _op("The event log", {"200": _json(
                {"type": "object", "properties": {"events": {"type": "array", "items": _ref("Event")},
                                                  "last_id": {"type": "integer"}}}, "Events, oldest first")},
                params=[_query("after", "Events with an id above this; without it, the most recent ones",
                               {"type": "integer", "minimum": 0}),
                        _query("limit", "At most this many (1–1000, default 100)",
                               {"type": "integer", "minimum": 1, "maximum": 1000})],
                errors=(400, 401, 403), tag="events")},
            "/metrics": {"get": _op("Prometheus metrics", {"200": {
                "description": "Text exposition format 0.0.4", "content": {"text/plain": {}}}}, tag="daemon")},
            "/openapi.json": {"get": _op("This document", {"200": _json({"type": "object"}, "OpenAPI 3")},
                                         tag="daemon")},
            "/ws": {"get": _op(
                "WebSocket of live events. Send the token as the subprotocols `bearer`, `<jwt>` "
                "(`new WebSocket(url, ['bearer', token])`) or in an Authorization header, never in the URL. "
                "The first message is `{\"event\": \"snapshot\", \"jobs\": […], \"last_id\": N}`; with "
                "`?after=<id>` the events missed since that id follow, then every event live "
                "(download_progress at most 4 a second a job).",
                {"101": {"description": "Switching protocols"}},
                params=[_query("after", "Last event id the client saw", {"type": "integer", "minimum": 0})],
                errors=(400, 401, 403), tag="events")},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "responses": {f"E{c}": _json(_ref("Error"), d) for c, d in (
                (400, "Bad request"), (401, "Unauthorized"), (403, "Forbidden"), (404, "Not found"),
                (409, "Conflict"), (413, "Body too large"), (422, "Invalid values"),
                (503, "Supervisor unavailable"))},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
                "Job": {"type": "object", "properties": {
                    "id": {"type": "integer"}, "model_id": {"type": "integer", "nullable": True},
                    "version_id": {"type": "integer", "nullable": True},
                    "file_id": {"type": "integer", "nullable": True},
                    "model_type": {"type": "string", "nullable": True},
                    "filename": {"type": "string", "nullable": True},
                    "state": {"type": "string", "enum": JOB_STATES},
                    "priority": {"type": "integer", "description": "1 is the most urgent"},
                    "bytes_done": {"type": "integer"}, "bytes_total": {"type": "integer", "nullable": True},
                    "speed_bps": {"type": "number"}, "attempts": {"type": "integer"},
                    "error": {"type": "string", "nullable": True},
                    "created_at": {"type": "string", "format": "date-time"},
                    "updated_at": {"type": "string", "format": "date-time"},
                }},
                "NewJob": {"type": "object", "description": "One of model_id, version_id or url", "properties": {
                    "model_id": {"type": "integer"}, "version_id": {"type": "integer"},
                    "url": {"type": "string", "example": "https://civitai.com/models/4201?modelVersionId=130072"},
                    "file_id": {"type": "integer"}, "priority": {"type": "integer", "minimum": 1, "default": 10},
                    "model_type": {"type": "string", "pattern": "^[a-z0-9_-]{1,64}$"},
                }},
                "ManifestEntry": {"type": "object", "required": ["modelId", "model_type"],
                                  "additionalProperties": True, "properties": {
                    "modelId": {"type": "integer"}, "modelVersionId": {"type": "integer"},
                    "fileId": {"type": "integer"}, "model_type": {"type": "string"},
                    "sha256": {"type": "string"}, "url": {"type": "string"}, "filename": {"type": "string"},
                    "priority": {"type": "integer"}, "updatedAt": {"type": "string"}}},
                "Event": {"type": "object", "required": ["id", "event", "ts"], "additionalProperties": True,
                          "properties": {"id": {"type": "integer"}, "event": {"type": "string"},
                                         "ts": {"type": "string", "format": "date-time"}}},
                "Status": {"type": "object", "properties": {
                    "version": {"type": "string"}, "started_at": {"type": "string"},
                    "uptime_s": {"type": "number"},
                    "children": {"type": "array", "items": {"type": "object", "properties": {
                        "name": {"type": "string"}, "kind": {"type": "string"}, "pid": {"type": "integer"},
                        "state": {"type": "string"}, "job_id": {"type": "integer", "nullable": True},
                        "restarts": {"type": "integer"}, "since": {"type": "string"}}}},
                    "queue": {"type": "object", "additionalProperties": {"type": "integer"}},
                    "updater": {"type": "object", "properties": {
                        "last_check": {"type": "string", "nullable": True},
                        "last_success": {"type": "string", "nullable": True},
                        "next_check": {"type": "string", "nullable": True}, "running": {"type": "boolean"}}},
                }},
            },
        },
    }
