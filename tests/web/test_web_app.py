"""The web app in-process (no sockets): routes, JSON errors, auth, Host check, the WebSocket session."""
from __future__ import annotations

import io
import json
import re
import sys
import time

import gevent
import gevent.queue
import jwt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ipc.control import ControlError
from ipc.states import JobState
from ipc.store import JobStore
from ipc.tokens import TokenError, mint_token, verify_token
from tests.web.appkit import HOST, SECRET, FakeControl, WsgiClient, make_cfg
from web import hub as hub_module
from web.app import make_app, parse_model_url
from web.auth import redact_tokens
from web.hub import Hub

# --- public routes and headers ------------------------------------------------------------------

def test_health_root_and_gui_need_no_token(env):
    anon = WsgiClient(env.app)
    health = anon.get("/health")
    assert health.status == 200 and health.json()["status"] == "ok"
    root = anon.get("/")
    assert root.status in (302, 303) and root.headers["location"].endswith("/gui")
    page = anon.get("/gui")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    assert "/gui/app.js" in page.text and "/gui/app.css" in page.text
    for name, ctype in (("app.js", "javascript"), ("app.css", "text/css")):
        res = anon.get(f"/gui/{name}")
        assert res.status == 200 and ctype in res.headers["content-type"]
    assert anon.get("/gui/../app.py").status in (403, 404)
    assert anon.get("/gui/nothing.js").json()["error"]


def test_gui_uses_no_external_resources(env):
    for name in ("index.html", "app.js", "app.css"):
        text = WsgiClient(env.app).get(f"/gui/{name}").text
        external = re.findall(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//|url\(\s*["']?(?:https?:)?//|@import|"""
                              r"""(?:fetch|WebSocket)\(\s*["'`]https?:""", text)
        assert not external, (name, external)


def test_no_cors_and_security_headers(env):
    res = env.client.get("/api/jobs", headers={"Origin": "http://evil.example"})
    assert res.status == 200
    assert not any(h.startswith("access-control-") for h in res.headers)
    assert res.headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in res.headers["content-security-policy"]
    options = env.client.request("OPTIONS", "/api/jobs", headers={"Origin": "http://evil.example"})
    assert options.status == 405 and not any(h.startswith("access-control-") for h in options.headers)


# --- auth ---------------------------------------------------------------------------------------

def _claims(now, **extra):
    return {"sub": "x", "iat": int(now), "exp": int(now) + 3600, **extra}


@pytest.mark.parametrize("case", ["missing", "garbage", "alg_none", "wrong_key", "expired", "no_exp", "hs512",
                                  "basic", "exp_string", "empty_bearer"])
@pytest.mark.filterwarnings("ignore:The HMAC key")
def test_bad_tokens_get_401_json(env, case):
    now = env.now[0]
    tokens = {
        "missing": None,
        "garbage": "not.a.jwt",
        "alg_none": jwt.encode(_claims(now), None, algorithm="none"),
        "wrong_key": jwt.encode(_claims(now), "x" * 40, algorithm="HS256"),
        "expired": jwt.encode(_claims(now, exp=int(now) - 10), SECRET, algorithm="HS256"),
        "no_exp": jwt.encode({"sub": "x"}, SECRET, algorithm="HS256"),
        "hs512": jwt.encode(_claims(now), SECRET, algorithm="HS512"),
        "exp_string": jwt.encode({"sub": "x", "exp": "9999999999"}, SECRET, algorithm="HS256"),
    }
    if case == "basic":
        res = env.client.get("/api/jobs", token=None, headers={"Authorization": "Basic dXNlcjpwYXNz"})
    elif case == "empty_bearer":
        res = env.client.get("/api/jobs", token=None, headers={"Authorization": "Bearer "})
    else:
        res = env.client.get("/api/jobs", token=tokens[case])
    assert res.status == 401
    assert res.json()["error"]
    assert res.headers["www-authenticate"].startswith("Bearer")
    assert SECRET not in res.text


def test_every_private_route_needs_a_token(env):
    anon = WsgiClient(env.app)
    public = {"/health", "/", "/gui", "/gui/", "/gui/<filename:path>"}
    for route in env.app.routes:
        if route.rule in public:
            continue
        path = route.rule.replace("<job_id:int>", "1").replace("<model_id:int>", "1").replace("<file_id:int>", "1")
        res = anon.request(route.method, path, json_body={} if route.method in ("POST", "PATCH") else None)
        assert res.status == 401, (route.method, route.rule, res.status)
        assert "error" in res.json()
    assert env.control.calls == []


def test_token_expiry_follows_the_injected_clock(env):
    assert env.client.get("/api/jobs").status == 200
    env.now[0] += 2 * 86400
    res = env.client.get("/api/jobs")
    assert res.status == 401 and "expired" in res.json()["error"]


def test_token_in_the_url_is_not_accepted(env):
    res = env.client.get(f"/api/jobs?token={env.token}&access_token={env.token}", token=None)
    assert res.status == 401


def test_tokens_module_roundtrip_and_refusals():
    token = mint_token(SECRET, days=2, now=1000.0)
    claims = verify_token(SECRET, token, now=1001.0)
    assert claims["exp"] == 1000 + 2 * 86400
    with pytest.raises(TokenError, match="expired"):
        verify_token(SECRET, token, now=1000.0 + 3 * 86400)
    with pytest.raises(TokenError):
        verify_token("", token)
    with pytest.raises(TokenError):
        mint_token("", 1)
    assert jwt.get_unverified_header(token)["alg"] == "HS256"


@pytest.mark.parametrize("host,status", [
    ("127.0.0.1:8000", 200), ("localhost:8000", 200), ("LOCALHOST", 200), ("[::1]:8000", 200),
    ("127.0.0.2", 200), ("nas.lan:8000", 200), ("evil.example", 403), ("evil.example:8000", 403),
    ("192.168.1.5:8000", 403), ("127.0.0.1.evil.example", 403), (None, 403),
])
def test_host_header_is_checked_on_every_route(env, host, status):
    for path in ("/api/jobs", "/health", "/gui"):
        res = env.client.get(path, host=host)
        assert res.status == status, (path, host, res.status)
        if status == 403:
            assert "error" in res.json()


def test_bind_address_is_an_allowed_host(tmp_path):
    cfg = make_cfg(tmp_path, bind="10.1.2.3")
    store = JobStore(cfg.db_path)
    app = make_app(cfg, store, FakeControl(store), Hub(store))
    client = WsgiClient(app, mint_token(SECRET))
    assert client.get("/api/jobs", host="10.1.2.3:8000").status == 200
    assert client.get("/api/jobs", host="10.1.2.4:8000").status == 403


def test_wildcard_bind_accepts_the_address_the_connection_came_to(tmp_path):
    cfg = make_cfg(tmp_path, bind="0.0.0.0")
    store = JobStore(cfg.db_path)
    app = make_app(cfg, store, FakeControl(store), Hub(store))
    client = WsgiClient(app, mint_token(SECRET))
    local = {"civitai.local_addr": "192.168.1.5"}
    assert client.get("/api/jobs", host="192.168.1.5:8000", environ=local).status == 200
    assert client.get("/api/jobs", host="0.0.0.0:8000", environ=local).status == 403
    assert client.get("/api/jobs", host="rebind.evil.example:8000", environ=local).status == 403


def test_websocket_handshake_check(env):
    authorize = env.app.config["civitai.ws_authorize"]
    base = {"HTTP_HOST": HOST, "PATH_INFO": "/ws"}
    assert authorize({**base, "HTTP_SEC_WEBSOCKET_PROTOCOL": f"bearer, {env.token}"}) is None
    assert authorize({**base, "HTTP_AUTHORIZATION": f"Bearer {env.token}"}) is None
    assert authorize(base).status == 401
    assert authorize({**base, "HTTP_SEC_WEBSOCKET_PROTOCOL": "bearer, nope"}).status == 401
    assert authorize({**base, "HTTP_SEC_WEBSOCKET_PROTOCOL": env.token}).status == 401
    assert authorize({**base, "QUERY_STRING": f"token={env.token}"}).status == 401
    foreign = {**base, "HTTP_HOST": "evil.example", "HTTP_SEC_WEBSOCKET_PROTOCOL": f"bearer, {env.token}"}
    assert authorize(foreign).status == 403
    # The subprotocol form is only for the WebSocket route.
    res = env.client.get("/api/jobs", token=None, headers={"Sec-WebSocket-Protocol": f"bearer, {env.token}"})
    assert res.status == 401


def test_ws_route_without_upgrade_is_a_json_400(env):
    res = env.client.get("/ws")
    assert res.status == 400 and "WebSocket" in res.json()["error"]


def test_access_log_redaction():
    token = mint_token(SECRET)
    line = f'127.0.0.1 - - [x] "GET /api/jobs?token={token}&x=1 HTTP/1.1" 200 10 0.01'
    out = redact_tokens(line)
    assert token not in out and "token=***" in out and "x=1" in out
    assert token not in redact_tokens(f"GET /gui/{token}")


# --- jobs ---------------------------------------------------------------------------------------

def test_list_jobs_newest_first_with_state_and_limit(env):
    ids = [env.writer.add_job(model_id=i)["id"] for i in range(1, 6)]
    env.writer.update_job(ids[1], state="cancelled")
    jobs = env.client.get("/api/jobs").json()["jobs"]
    assert [j["id"] for j in jobs] == ids[::-1]
    assert set(jobs[0]) >= {"id", "model_id", "version_id", "file_id", "model_type", "filename", "state", "priority",
                            "bytes_done", "bytes_total", "speed_bps", "attempts", "error", "created_at", "updated_at"}
    assert [j["id"] for j in env.client.get("/api/jobs?state=cancelled").json()["jobs"]] == [ids[1]]
    assert len(env.client.get("/api/jobs?limit=2").json()["jobs"]) == 2
    both = env.client.get("/api/jobs?state=cancelled,queued&limit=10").json()["jobs"]
    assert [j["id"] for j in both] == ids[::-1]
    for bad in ("limit=0", "limit=abc", "limit=100000", "state=bogus"):
        res = env.client.get(f"/api/jobs?{bad}")
        assert res.status == 400 and res.json()["error"], bad


def test_get_job_and_unknown_ids(env):
    job = env.writer.add_job(model_id=7, version_id=70)
    assert env.client.get(f"/api/jobs/{job['id']}").json()["job"]["version_id"] == 70
    res = env.client.get("/api/jobs/999")
    assert res.status == 404 and "999" in res.json()["error"]
    assert env.client.get("/api/jobs/abc").status == 404
    assert env.client.request("PATCH", "/api/jobs/999", json_body={"priority": 1}).status == 404
    assert env.client.request("DELETE", "/api/jobs/999").status == 404
    assert env.client.post("/api/jobs/999/retry").status == 404


def _id_routes(app):
    """Every route with an id in its path, as (method, rule)."""
    return [(r.method, r.rule) for r in app.routes if ":int>" in r.rule]


def test_every_route_with_an_id_is_covered_below(env):
    covered = set(_id_routes(env.app))
    assert covered >= {("GET", "/api/jobs/<job_id:int>"), ("PATCH", "/api/jobs/<job_id:int>"),
                       ("DELETE", "/api/jobs/<job_id:int>"), ("POST", "/api/jobs/<job_id:int>/retry"),
                       ("DELETE", "/api/manifest/<model_id:int>")}


@pytest.mark.parametrize("bad_id", [2**63, 2**64, 10**30, 2**63 - 1, 0, -1])
def test_an_id_that_does_not_exist_however_large_is_404_on_every_route(env, bad_id):
    env.writer.add_job(model_id=1)
    for method, rule in _id_routes(env.app):
        path = re.sub(r"<\w+:int>", str(bad_id), rule)
        body = {"priority": 1} if method == "PATCH" else None
        res = env.client.request(method, path, json_body=body)
        assert res.status == 404, (method, path, res.status, res.text)
        assert str(bad_id) in res.json()["error"], (method, path)
        # The token is still checked first: an anonymous client learns nothing from the id.
        assert WsgiClient(env.app).request(method, path, json_body=body).status == 401
    if bad_id != 2**63 - 1:  # within SQLite's range, the supervisor is asked and says 404
        assert env.control.calls == []


@pytest.mark.parametrize("nesting", [100_000, 33])
def test_a_deeply_nested_body_is_a_clear_400(env, nesting):
    for open_, close in (("[", "]"), ('{"a":', "}")):
        body = ('{"model_id": 1, "x": ' + open_ * nesting + "1" + close * nesting + "}").encode()
        for method, path in (("POST", "/api/jobs"), ("POST", "/api/manifest"), ("PATCH", "/api/jobs/1")):
            res = env.client.request(method, path, body=body)
            assert res.status == 400, (path, res.status, res.text[:200])
            assert "nested more than 32 levels" in res.json()["error"]
    assert env.control.calls == []
    # A custom field a few levels deep in a manifest entry is fine.
    entry = {"modelId": 5, "model_type": "lora", "mine": {"tags": [["a", {"b": 1}]]}}
    assert env.client.post("/api/manifest", entry).status == 201


@pytest.mark.parametrize("url", [
    "https://civitai.com/models/99999999999999999999999", "https://civitai.com/models/1?modelVersionId=9223372036854775808",
    "https://civitai.com/api/download/models/0", "https://civitai.com/models/1?modelVersionId=%C2%B2",
    "https://civitai.com/mod\tels/1", "https://civitai.com/models/1 2", "https://[::1/models/1",
])
def test_ids_in_a_url_are_checked_like_ids_in_the_body(env, url):
    res = env.client.post("/api/jobs", {"url": url})
    assert res.status == 422, res.text
    assert res.json()["error"]
    assert env.control.calls == []


def test_nulls_are_fields_left_out(env):
    res = env.client.post("/api/jobs", {"model_id": 4, "version_id": None, "url": None, "file_id": None,
                                        "priority": None, "model_type": None})
    assert res.status == 201, res.text
    assert env.control.calls[-1] == ("add_job", {"model_id": 4})
    assert env.client.post("/api/jobs", {"model_id": None}).status == 422


@pytest.mark.parametrize("body,expected", [
    ({"model_id": 12}, {"model_id": 12}),
    ({"version_id": 34, "priority": 2, "model_type": "lora"}, {"version_id": 34, "priority": 2, "model_type": "lora"}),
    ({"version_id": 34, "file_id": 5}, {"version_id": 34, "file_id": 5}),
    ({"url": "https://civitai.com/models/4201"}, {"model_id": 4201}),
    ({"url": "https://civitai.com/models/4201/realistic-vision?modelVersionId=130072"},
     {"model_id": 4201, "version_id": 130072}),
    ({"url": "https://www.civitai.com/models/4201?modelVersionId=9"}, {"model_id": 4201, "version_id": 9}),
    ({"url": "https://civitai.com/api/download/models/130072?fileId=8"}, {"version_id": 130072, "file_id": 8}),
])
def test_add_job_forwards_parsed_ids(env, body, expected):
    res = env.client.post("/api/jobs", body)
    assert res.status == 201, res.text
    assert res.json()["job"]["state"] == "queued"
    op, args = env.control.calls[-1]
    assert op == "add_job" and args == expected


def test_add_job_again_returns_the_existing_job_with_200(env):
    first = env.client.post("/api/jobs", {"version_id": 55})
    again = env.client.post("/api/jobs", {"url": "https://civitai.com/models/1?modelVersionId=55"})
    assert (first.status, again.status) == (201, 200)
    assert first.json()["job"]["id"] == again.json()["job"]["id"]


@pytest.mark.parametrize("body,status,word", [
    (b"{not json", 400, "invalid JSON"),
    (b"[1, 2]", 400, "object"),
    (b"", 400, "JSON object"),
    (b"\xff\xfe", 400, "UTF-8"),
    (json.dumps({"model_id": "12"}).encode(), 400, "model_id"),
    (json.dumps({"model_id": True}).encode(), 400, "model_id"),
    (json.dumps({"model_id": 1.5}).encode(), 400, "model_id"),
    (json.dumps({"model_id": 1, "priority": "high"}).encode(), 400, "priority"),
    (json.dumps({"model_id": 1, "model_type": 3}).encode(), 400, "model_type"),
    (json.dumps({"modelId": 1}).encode(), 422, "unknown field 'modelId'"),
    (json.dumps({"model_id": 1, "priorty": 1, "typ": "x"}).encode(), 422, "unknown fields 'priorty', 'typ'"),
    (json.dumps({"url": 5}).encode(), 400, "url"),
    (json.dumps({}).encode(), 422, "model_id"),
    (json.dumps({"model_id": 0}).encode(), 422, "model_id"),
    (json.dumps({"model_id": 1, "priority": 0}).encode(), 422, "priority"),
    (json.dumps({"model_id": 1, "model_type": "../etc"}).encode(), 422, "model_type"),
    (json.dumps({"file_id": 1}).encode(), 422, "file_id"),
    (json.dumps({"url": "https://evil.example/models/1"}).encode(), 422, "civitai.com"),
    (json.dumps({"url": "https://civitai.com.evil.example/models/1"}).encode(), 422, "civitai.com"),
    (json.dumps({"url": "ftp://civitai.com/models/1"}).encode(), 422, "url"),
    (json.dumps({"url": "https://civitai.com/images/5"}).encode(), 422, "url"),
    (json.dumps({"url": "https://civitai.com/models/1", "model_id": 2}).encode(), 422, "model_id"),
])
def test_add_job_rejects_bad_bodies(env, body, status, word):
    res = env.client.request("POST", "/api/jobs", body=body)
    assert res.status == status, res.text
    assert word.lower() in res.json()["error"].lower()
    assert env.control.calls == []


def test_oversized_bodies_get_413(env):
    big = json.dumps({"model_id": 1, "pad": "x" * (1024 * 1024)}).encode()
    res = env.client.request("POST", "/api/jobs", body=big)
    assert res.status == 413 and res.json()["error"]
    # A lying Content-Length is refused before anything is read.
    res = env.client.request("POST", "/api/manifest", body=b"{}", headers={"Content-Length": str(5 * 1024 * 1024)})
    assert res.status == 413
    # Exactly at the limit is fine (and then fails on content, not on size).
    padded = b'{"model_id": 1}' + b" " * (1024 * 1024 - 15)
    assert env.client.request("POST", "/api/jobs", body=padded).status == 201


def test_patch_cancel_retry(env):
    job = env.writer.add_job(model_id=3)
    res = env.client.request("PATCH", f"/api/jobs/{job['id']}", json_body={"priority": 1})
    assert res.status == 200 and res.json()["job"]["priority"] == 1
    assert env.control.calls[-1] == ("set_priority", {"job_id": job["id"], "priority": 1})
    assert env.client.request("PATCH", f"/api/jobs/{job['id']}", json_body={}).status == 422
    assert env.client.request("PATCH", f"/api/jobs/{job['id']}", json_body={"priority": "1"}).status == 400
    unknown = env.client.request("PATCH", f"/api/jobs/{job['id']}", json_body={"state": "done"})
    assert unknown.status == 422 and "unknown field 'state'" in unknown.json()["error"]
    retry_early = env.client.post(f"/api/jobs/{job['id']}/retry")
    assert retry_early.status == 409 and retry_early.json()["error"]
    cancelled = env.client.request("DELETE", f"/api/jobs/{job['id']}")
    assert cancelled.status == 200 and cancelled.json()["job"]["state"] == "cancelled"
    assert env.client.post(f"/api/jobs/{job['id']}/retry").status == 200


def test_supervisor_unreachable_is_503(env):
    env.control.fail = ControlError(503, "the supervisor is not answering (Connection refused)")
    for method, path, body in (("GET", "/api/status", None), ("POST", "/api/jobs", {"model_id": 1}),
                               ("GET", "/api/manifest", None), ("POST", "/api/updates/check", None)):
        res = env.client.request(method, path, json_body=body)
        assert res.status == 503 and "supervisor" in res.json()["error"], path
    # Reads from the store still work.
    assert env.client.get("/api/jobs").status == 200
    metrics = env.client.get("/metrics")
    assert metrics.status == 200 and "civitai_supervisor_up 0" in metrics.text


def test_status_config_manifest_updates(env):
    status = env.client.get("/api/status").json()
    assert status["children"][0]["name"] == "worker-1" and "queue" in status and "updater" in status
    config = env.client.get("/api/config").json()
    assert config["civitai_api_key"] == "***" and config["jwt_secret"] == "***" and config["webhook_secret"] == "***"
    assert SECRET not in json.dumps(config) and "k" * 20 not in json.dumps(config)
    assert env.client.get("/api/manifest").json()["entries"][0]["note"] == "mine"
    added = env.client.post("/api/manifest", {"modelId": 9, "model_type": "lora", "custom": [1]})
    assert added.status == 201 and added.json()["entry"]["custom"] == [1]
    wrapped = env.client.post("/api/manifest", {"entry": {"modelId": 10, "model_type": "lora"}})
    assert wrapped.status == 201 and env.control.calls[-1][1]["entry"]["modelId"] == 10
    bad = env.client.post("/api/manifest", {"model_type": "lora"})
    assert bad.status == 422 and "modelId" in bad.json()["error"]
    missing = env.client.request("DELETE", "/api/manifest/77")
    assert missing.status == 404 and "77" in missing.json()["error"]
    check = env.client.post("/api/updates/check")
    assert check.status == 202 and check.json() == {"started": True}


def test_events_route(env):
    for i in range(5):
        env.writer.add_event("download_started", {"job_id": i, "attempt": 1})
    recent = env.client.get("/api/events?limit=2").json()
    assert [e["id"] for e in recent["events"]] == [4, 5] and recent["last_id"] == 5
    after = env.client.get("/api/events?after=3").json()["events"]
    assert [e["id"] for e in after] == [4, 5]
    assert set(after[0]) >= {"id", "event", "ts", "job_id", "attempt"}
    assert env.client.get("/api/events?after=-1").status == 400


def test_unknown_route_and_method_are_json(env):
    res = env.client.get("/api/nothing")
    assert res.status == 404 and res.json()["error"]
    res = env.client.request("PUT", "/api/jobs")
    assert res.status == 405 and res.json()["error"]


def test_internal_errors_are_json_500_without_details(env, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("secret detail")

    monkeypatch.setattr(env.store, "list_jobs", boom)
    res = env.client.get("/api/jobs")
    assert res.status == 500 and res.json() == {"error": "internal server error"}


# --- metrics and openapi ------------------------------------------------------------------------

def scrape(client) -> dict[str, tuple[str, dict]]:
    """/metrics read the way Prometheus reads it: {sample name: (family type, {labels: value})}."""
    res = client.get("/metrics")
    assert res.status == 200 and res.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples: dict[str, tuple[str, dict]] = {}
    for family in text_string_to_metric_families(res.text):
        assert family.documentation, family.name
        for sample in family.samples:
            samples.setdefault(sample.name, (family.type, {}))[1][tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def test_metrics_prometheus_text(env, monkeypatch):
    a = env.writer.add_job(model_id=1, bytes_total=1000)
    env.writer.update_job(a["id"], state="downloading")
    env.writer.update_job(a["id"], state="done")
    b = env.writer.add_job(model_id=2)
    env.writer.update_job(b["id"], state="failed", reason="not_found", error="404")
    env.writer.add_job(model_id=3)
    env.writer.set_kv("metrics.downloaded_bytes", 123_456_789_012)
    env.writer.set_kv("metrics.worker_restarts", 4)
    env.writer.set_kv("updater.last_success_ts", 1700000000)
    status = env.control.call("status")
    status["children"].append({"name": 'odd "name"\\with\nbreaks', "kind": "web", "pid": 12, "state": "backoff",
                               "restarts": 7})
    monkeypatch.setattr(env.control, "call", lambda op, **args: status)
    got = scrape(env.client)
    states = {(("state", s.value),): 0.0 for s in JobState} | {
        (("state", "done"),): 1.0, (("state", "failed"),): 1.0, (("state", "queued"),): 1.0}
    worker = (("kind", "worker"), ("name", "worker-1"))
    odd = (("kind", "web"), ("name", 'odd "name"\\with\nbreaks'))
    assert got == {
        "civitai_jobs": ("gauge", states),
        "civitai_queue_length": ("gauge", {(): 1.0}),
        "civitai_downloaded_bytes_total": ("counter", {(): 123_456_789_012.0}),
        "civitai_download_failures": ("gauge", {(("reason", "not_found"),): 1.0}),
        "civitai_worker_restarts_total": ("counter", {(): 4.0}),
        "civitai_last_update_check_timestamp_seconds": ("gauge", {(): 1700000000.0}),
        "civitai_supervisor_up": ("gauge", {(): 1.0}),
        "civitai_child_running": ("gauge", {worker: 1.0, odd: 0.0}),
        "civitai_child_restarts_total": ("counter", {worker: 2.0, odd: 7.0}),
        "civitai_uptime_seconds": ("gauge", {(): 5.0}),
        "civitai_websocket_clients": ("gauge", {(): 0.0}),
        "civitai_websocket_dropped_total": ("counter", {(): 0.0}),
    }
    assert WsgiClient(env.app).get("/metrics").status == 401


def test_downloaded_bytes_never_go_down_when_old_jobs_are_pruned(env):
    for model_id in (1, 2):
        job = env.writer.add_job(model_id=model_id, bytes_total=1000)
        env.writer.update_job(job["id"], state="downloading")
        env.writer.update_job(job["id"], state="done")
        env.writer.incr_kv("metrics.downloaded_bytes", 1000)  # what the supervisor does on completion
    assert scrape(env.client)["civitai_downloaded_bytes_total"] == ("counter", {(): 2000.0})
    assert env.writer.prune(older_than_s=0, now=time.time() + 60)[0] == 2
    assert env.writer.job_counts()["done"] == 0
    assert scrape(env.client)["civitai_downloaded_bytes_total"] == ("counter", {(): 2000.0})
    env.writer.set_kv("metrics.downloaded_bytes", "garbled")  # never breaks the scrape
    assert scrape(env.client)["civitai_downloaded_bytes_total"] == ("counter", {(): 0.0})


def test_openapi_describes_every_route(env):
    doc = env.client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    described = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}
    for route in env.app.routes:
        rule = (route.rule.replace("<job_id:int>", "{id}").replace("<model_id:int>", "{modelId}")
                .replace("<file_id:int>", "{fileId}"))
        if rule in ("/gui/", "/gui/<filename:path>"):
            continue
        assert (rule, route.method) in described, (route.method, route.rule)
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_parse_model_url_accepts_the_configured_api_host():
    assert parse_model_url("http://127.0.0.1:5000/models/3", ("127.0.0.1",)) == {"model_id": 3}
    with pytest.raises(ValueError):
        parse_model_url("http://127.0.0.1:5000/models/3")


# --- the live feed ------------------------------------------------------------------------------

class FakeWebSocket:
    def __init__(self, send_delay_s: float = 0.0):
        self.sent: list[dict] = []
        self.inbox: gevent.queue.Queue = gevent.queue.Queue()
        self.closed = False
        self.close_code = None
        self.send_delay_s = send_delay_s

    def send(self, text):
        if self.send_delay_s:
            gevent.sleep(self.send_delay_s)
        self.sent.append(json.loads(text))

    def receive(self):
        return self.inbox.get()

    def close(self, code=1000, message=""):
        self.closed, self.close_code = True, code

    def hang_up(self):
        self.inbox.put(None)


def _wait(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        gevent.sleep(0.01)


def _drained(hub):
    """Every registered client's session has sent all it was given (FakeWebSocket.send never
    yields, so an empty queue means the session is back waiting on it)."""
    return all(client.queue.empty() for client in hub.clients)


def _event(store, name, **fields):
    return store.add_event(name, fields)


def test_session_snapshot_then_live_events(env):
    job = env.writer.add_job(model_id=1)
    old = _event(env.writer, "download_queued", job_id=job["id"])
    env.hub.catch_up()
    ws = FakeWebSocket()
    session = gevent.spawn(env.app, {
        "REQUEST_METHOD": "GET", "PATH_INFO": "/ws", "QUERY_STRING": "", "HTTP_HOST": HOST,
        "HTTP_SEC_WEBSOCKET_PROTOCOL": f"bearer, {env.token}", "wsgi.websocket": ws,
        "wsgi.input": io.BytesIO(), "wsgi.errors": sys.stderr, "SERVER_NAME": "x", "SERVER_PORT": "1",
        "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.url_scheme": "http"}, lambda *a: None)
    _wait(lambda: ws.sent)
    snapshot = ws.sent[0]
    assert snapshot["event"] == "snapshot" and snapshot["last_id"] == old["id"]
    assert [j["id"] for j in snapshot["jobs"]] == [job["id"]]
    new = _event(env.writer, "download_started", job_id=job["id"], attempt=1)
    env.hub.publish(new)
    env.hub.publish(new)  # a duplicate is never sent twice
    _wait(lambda: len(ws.sent) == 2)
    assert ws.sent[1]["id"] == new["id"]
    ws.hang_up()
    session.join(5)
    assert session.dead and not env.hub.clients


def test_reconnect_with_after_gets_missed_events_without_gap_or_duplicate(env):
    events = [_event(env.writer, "download_started", job_id=1, attempt=i) for i in range(1, 6)]
    env.hub.catch_up()
    ws = FakeWebSocket()
    session = gevent.spawn(env.hub.run_session, ws, events[1]["id"])
    _wait(lambda: len(ws.sent) >= 4)
    later = _event(env.writer, "download_completed", job_id=1)
    env.hub.publish(later)
    _wait(lambda: len(ws.sent) == 5)
    assert ws.sent[0]["event"] == "snapshot" and ws.sent[0]["last_id"] == events[-1]["id"]
    assert [e["id"] for e in ws.sent[1:]] == [e["id"] for e in events[2:]] + [later["id"]]
    ws.hang_up()
    session.join(5)


def test_gap_in_live_ids_is_filled_from_the_store(env):
    ws = FakeWebSocket()
    session = gevent.spawn(env.hub.run_session, ws, None)
    _wait(lambda: ws.sent)
    first = _event(env.writer, "download_queued", job_id=1)
    second = _event(env.writer, "download_started", job_id=1, attempt=1)
    third = _event(env.writer, "download_completed", job_id=1)
    env.hub.publish(third)  # the subscription missed the first two
    env.hub.publish(first)
    _wait(lambda: len(ws.sent) == 4)
    assert [e["id"] for e in ws.sent[1:]] == [first["id"], second["id"], third["id"]]
    ws.hang_up()
    session.join(5)


def test_progress_is_at_most_four_a_second_a_job_and_the_newest_wins(env, monkeypatch):
    clock = [100.0]
    hub = Hub(env.store, clock=lambda: clock[0])
    ws = FakeWebSocket()
    session = gevent.spawn(hub.run_session, ws, None)
    _wait(lambda: ws.sent)
    for i in range(10):
        hub.publish({"event": "download_progress", "job_id": 1, "bytes_done": i, "bytes_total": 10, "speed_bps": 1})
        hub.publish({"event": "download_progress", "job_id": 2, "bytes_done": i, "bytes_total": 10, "speed_bps": 1})
        clock[0] += 0.0625  # exact in binary: every 4th update is 0.25 s after the last one sent
    _wait(lambda: _drained(hub))
    sent = [(e["job_id"], e["bytes_done"]) for e in ws.sent[1:]]
    assert sent == [(1, 0), (2, 0), (1, 4), (2, 4), (1, 8), (2, 8)]
    clock[0] += 1
    hub._flush_progress()
    _wait(lambda: len(ws.sent) == 9)
    assert sorted((e["job_id"], e["bytes_done"]) for e in ws.sent[7:]) == [(1, 9), (2, 9)]
    # A stored event for the job makes its pending progress stale.
    clock[0] += 0.01
    hub.publish({"event": "download_progress", "job_id": 1, "bytes_done": 10, "bytes_total": 10, "speed_bps": 1})
    hub.publish(_event(env.writer, "download_completed", job_id=1))
    clock[0] += 1
    hub._flush_progress()
    _wait(lambda: len(ws.sent) >= 10 and _drained(hub))
    assert [e["event"] for e in ws.sent[9:]] == ["download_completed"]
    ws.hang_up()
    session.join(5)


def test_scan_progress_is_at_most_four_a_second_and_never_after_the_scan(env):
    clock = [100.0]
    hub = Hub(env.store, clock=lambda: clock[0])
    ws = FakeWebSocket()
    session = gevent.spawn(hub.run_session, ws, None)
    _wait(lambda: ws.sent)
    for i in range(10):
        hub.publish({"event": "library_scan_progress", "files_done": i, "files_total": 10, "bytes_done": i,
                     "bytes_total": 10})
        clock[0] += 0.0625
    _wait(lambda: _drained(hub))
    assert [e["files_done"] for e in ws.sent[1:]] == [0, 4, 8]
    # The scan's end makes the pending progress (files_done 9) stale: it is never sent after it.
    hub.publish(_event(env.writer, "library_scan_done", folder=None, files=10, matched=1, added=1,
                       already_listed=0, unknown=[], seconds=1.0))
    clock[0] += 1
    hub._flush_progress()
    _wait(lambda: len(ws.sent) >= 5 and _drained(hub))
    assert [e["event"] for e in ws.sent[4:]] == ["library_scan_done"]
    ws.hang_up()
    session.join(5)


def test_a_slow_client_is_dropped_and_others_keep_up(env, monkeypatch):
    monkeypatch.setattr(hub_module, "CLIENT_QUEUE_MAX", 5)
    slow, fast = FakeWebSocket(send_delay_s=10), FakeWebSocket()
    slow_session = gevent.spawn(env.hub.run_session, slow, None)
    fast_session = gevent.spawn(env.hub.run_session, fast, None)
    _wait(lambda: fast.sent)
    started = time.monotonic()
    for i in range(20):
        env.hub.publish(_event(env.writer, "download_started", job_id=i, attempt=1))
        gevent.sleep(0)  # a yield, not a wait: the fast client's session takes its turn; the slow one is stuck in send
    assert time.monotonic() - started < 1  # publishing never waits for a client
    _wait(lambda: len(fast.sent) == 21)
    assert env.hub.dropped_total == 1 and len(env.hub.clients) == 1
    slow_session.kill()
    fast.hang_up()
    fast_session.join(5)


def test_health_says_what_the_supervisor_says(env):
    anon = WsgiClient(env.app)
    assert anon.get("/health").json()["status"] == "ok"
    env.control.call = lambda op, **kw: {"status": "degraded", "reason": "the job database cannot be written"}
    body = anon.get("/health").json()
    assert body["status"] == "degraded" and "cannot be written" in body["reason"]

    def hung(op, **kw):
        raise ControlError(503, "the supervisor is busy; try again")

    env.control.call = hung
    res = anon.get("/health")
    assert res.status == 200 and res.json()["status"] == "degraded"
    assert "not answering" in res.json()["reason"]


def test_with_no_page_open_the_hub_encodes_nothing_and_still_keeps_its_place(env, monkeypatch):
    encoded = []
    real = hub_module._dumps
    monkeypatch.setattr(hub_module, "_dumps", lambda obj: encoded.append(obj.get("event")) or real(obj))
    hub = Hub(env.store)
    first = _event(env.writer, "download_started", job_id=1)
    hub.publish(first)
    hub.publish({"event": "download_progress", "job_id": 1, "bytes_done": 1, "bytes_total": 10, "speed_bps": 1})
    assert encoded == [] and hub.last_id == first["id"]  # the watermark moves: no replay later
    ws = FakeWebSocket()
    session = gevent.spawn(hub.run_session, ws, None)
    _wait(lambda: ws.sent)
    second = _event(env.writer, "download_completed", job_id=1)
    hub.publish(second)
    _wait(lambda: len(ws.sent) == 2)
    assert ws.sent[1]["id"] == second["id"] and encoded[-1] == "download_completed"
    ws.hang_up()
    session.join(5)
