"""The web app in-process for tests: a WSGI client, the supervisor's side of the control socket
recorded, and `make_env` (a real JobStore in a folder, a real token)."""
from __future__ import annotations

import io
import json
import sys
import time

from ipc.config import load_config
from ipc.control import ControlError
from ipc.manifest import ManifestError, validate_entry
from ipc.store import JobStore
from ipc.tokens import mint_token
from web.app import make_app
from web.hub import Hub

SECRET = "s" * 40
HOST = "127.0.0.1:8000"


# --- a WSGI test client ---------------------------------------------------------------------

class Response:
    def __init__(self, status: str, headers: list, body: bytes):
        self.status = int(status.split()[0])
        self.headers = {k.lower(): v for k, v in headers}
        self.body = body

    def json(self):
        assert self.headers.get("content-type", "").startswith("application/json"), self.headers
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


class WsgiClient:
    def __init__(self, app, token: str | None = None):
        self.app = app
        self.token = token

    def request(self, method: str, path: str, json_body=None, body: bytes | None = None, headers: dict | None = None,
                host: str | None = HOST, token: str | None = "default", environ: dict | None = None) -> Response:
        if json_body is not None:
            body = json.dumps(json_body).encode()
        body = body or b""
        path_only, _, query = path.partition("?")
        env = {
            "REQUEST_METHOD": method, "PATH_INFO": path_only, "QUERY_STRING": query, "SERVER_NAME": "localhost",
            "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr, "REMOTE_ADDR": "127.0.0.1",
        }
        if body:
            env["CONTENT_LENGTH"] = str(len(body))
            env["CONTENT_TYPE"] = "application/json"
        if host is not None:
            env["HTTP_HOST"] = host
        token = self.token if token == "default" else token
        if token:
            env["HTTP_AUTHORIZATION"] = f"Bearer {token}"
        for name, value in (headers or {}).items():
            key = name.upper().replace("-", "_")
            env[key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key] = value
        env.update(environ or {})
        captured = {}

        def start_response(status, response_headers, exc_info=None):
            captured["status"], captured["headers"] = status, response_headers

        chunks = self.app(env, start_response)
        data = b"".join(chunks)
        if hasattr(chunks, "close"):
            chunks.close()
        return Response(captured["status"], captured["headers"], data)

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, json_body=None, **kw):
        return self.request("POST", path, json_body=json_body, **kw)


class FakeControl:
    """The supervisor's side of the control socket, recorded."""

    def __init__(self, store: JobStore):
        self.store = store  # writable
        self.calls: list[tuple[str, dict]] = []
        self.fail: ControlError | None = None
        self.manifest = [{"modelId": 1, "model_type": "checkpoint", "note": "mine"}]
        self.download_dir = None  # set by make_env: where a scan's folder must exist
        self.scan: dict | None = None
        self.speed_config, self.speed_override = 0, None

    def call(self, op, **args):
        self.calls.append((op, args))
        if self.fail:
            raise self.fail
        if op == "status":
            return {"version": "0.1.0", "uptime_s": 5.0, "queue": self.store.job_counts(),
                    "children": [{"name": "worker-1", "kind": "worker", "pid": 11, "state": "running",
                                  "job_id": None, "restarts": 2, "since": "2024-01-01T00:00:00Z"}],
                    "updater": {"last_check": None, "last_success": None, "next_check": None, "running": False}}
        if op == "add_job":
            existing = self.store.find_active(model_id=args.get("model_id"), version_id=args.get("version_id"),
                                              file_id=args.get("file_id"))
            if existing:
                return {"job": existing, "created": False}
            args = {"model_id": None, **args}
            return {"job": self.store.add_job(source="api", **args), "created": True}
        if op in ("set_priority", "cancel_job", "retry_job"):
            job = self.store.get_job(args["job_id"])
            if job is None:
                raise ControlError(404, f"no job with id {args['job_id']}")
            if op == "retry_job" and job["state"] not in ("failed", "cancelled"):
                raise ControlError(409, "only failed or cancelled jobs can be retried")
            if op == "set_priority":
                job = self.store.update_job(job["id"], priority=args["priority"])
            if op == "cancel_job":
                job = self.store.update_job(job["id"], state="cancelled")
            return {"job": job}
        if op == "manifest":
            return {"entries": self.manifest}
        if op == "add_manifest_entry":
            try:  # the supervisor's own check
                validate_entry(args["entry"], "entry")
            except ManifestError as exc:
                raise ControlError(422, str(exc)) from None
            self.manifest.append(args["entry"])
            return {"entry": args["entry"], "job": None}
        if op == "delete_manifest_model":
            raise ControlError(404, f"manifest.json has no entry for model {args['model_id']}")
        if op == "delete_manifest_entry":
            before = len(self.manifest)
            self.manifest = [e for e in self.manifest
                             if not (e["modelId"] == args["model_id"] and e.get("fileId") == args["file_id"])]
            if len(self.manifest) == before:
                raise ControlError(404, f"manifest.json has no entry for file {args['file_id']}")
            return {"removed": before - len(self.manifest)}
        if op in ("pause_job", "resume_job"):
            job = self.store.get_job(args["job_id"])
            if job is None:
                raise ControlError(404, f"no job with id {args['job_id']}")
            want, allowed = ("paused", ("queued", "downloading", "verifying")) if op == "pause_job" else (
                "queued", ("paused",))
            if job["state"] not in allowed and job["state"] != want:
                raise ControlError(409, f"job {job['id']} is {job['state']}")
            return {"job": self.store.update_job(job["id"], state=want)}
        if op in ("pause", "resume"):
            return {"paused": op == "pause"}
        if op == "health":
            return {"status": "ok", "reason": None}
        if op == "check_updates":
            return {"started": True}
        if op == "library_scan":
            if self.scan and self.scan["state"] == "running":
                raise ControlError(409, "a library scan is already running")
            folder = args.get("folder")
            if folder is not None and self.download_dir is not None and not (self.download_dir / folder).is_dir():
                raise ControlError(404, f"there is no folder {folder} under download_dir")
            self.scan = {"state": "running", "folder": folder, "dry_run": bool(args.get("dry_run")),
                         "files_done": 0, "files_total": 0, "bytes_done": 0, "bytes_total": 0, "matched": 0,
                         "added": 0, "already_listed": 0, "unknown": [], "differs": [], "skipped": [],
                         "seconds": 0.0, "error": None}
            return {"scan": self.scan}
        if op == "library_scan_status":
            return {"scan": self.scan}
        if op in ("speed", "set_speed"):
            if op == "set_speed":
                self.speed_override = args["max_speed"]
            override = self.speed_override
            in_force = override if override is not None else self.speed_config
            return {"max_speed": in_force or None, "source": "api" if override is not None else "config",
                    "config": self.speed_config, "override": override, "schedule": []}
        raise ControlError(400, f"unknown operation {op!r}")

    def subscribe(self):
        return iter(())


class Env:
    """What a test needs: the app, the stores behind it, the fake control, a valid token, a client."""

    def close(self) -> None:
        self.store.close()
        self.writer.close()


def make_env(tmp_path) -> Env:
    config = {"jwt_secret": SECRET, "allowed_hosts": ["nas.lan"], "civitai_api_key": "k" * 20,
              "webhook_secret": "w"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    cfg, _ = load_config(tmp_path / "config.json", environ={})
    writer = JobStore(cfg.db_path)
    reader = JobStore(cfg.db_path, readonly=True)
    control = FakeControl(writer)
    control.download_dir = cfg.download_path
    hub = Hub(reader)
    now = [time.time()]
    app = make_app(cfg, reader, control, hub, clock=lambda: now[0])

    e = Env()
    e.cfg, e.writer, e.store, e.control, e.hub, e.app, e.now = cfg, writer, reader, control, hub, app, now
    e.token = mint_token(SECRET, days=1, now=now[0])
    e.client = WsgiClient(app, e.token)
    return e


def make_cfg(tmp_path, **config):
    config.setdefault("jwt_secret", SECRET)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return load_config(tmp_path / "config.json", environ={})[0]
