"""JSON answers for errors: every error the web process gives is `{"error": "…"}`."""
from __future__ import annotations

import json

from bottle import HTTPResponse

REASONS = {
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 409: "Conflict", 413: "Payload Too Large", 414: "URI Too Long",
    422: "Unprocessable Entity", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
}


def error_body(message: str) -> str:
    return json.dumps({"error": message})


def json_error(status: int, message: str, headers: dict | None = None) -> HTTPResponse:
    """An HTTPResponse to raise from a route or plugin."""
    all_headers = {"Content-Type": "application/json"}
    all_headers.update(headers or {})
    return HTTPResponse(body=error_body(message), status=int(status), headers=all_headers)
