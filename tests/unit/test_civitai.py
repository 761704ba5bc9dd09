"""workers/civitai.py against mocked HTTP (responses): status mapping, key handling, redirects,
version and file choice on real Civitai JSON.

tests/data/model-4468.json, model-1231067.json, model-version-1387174.json and
models-list-metadata.json are copies of /work/shared/civitai-samples/ (see its README for sources).
"""
from __future__ import annotations

import copy
import json
import logging
import time
from email.utils import formatdate
from pathlib import Path

import pytest
import requests
import responses
from responses import matchers

from workers.civitai import (
    CivitaiClient,
    CivitaiError,
    content_disposition_filename,
    file_sha256,
    is_unsafe,
    newest_published_version,
    parse_retry_after,
    parse_time,
    pick_file,
    redact_url,
    resolve,
    sniff_error_body,
)

DATA = Path(__file__).parent.parent / "data"
API = "https://civitai.test/api/v1"
ORIGIN = "https://civitai.test"
CDN = "https://cdn.example.net"
KEY = "sk-secret-key-1234567890"
DL = f"{ORIGIN}/api/download/models/57618?fileId=41079"
SIGNED = f"{CDN}/file/model.safetensors?X-Amz-Signature=deadbeef&X-Amz-Expires=3600"


def load(name: str) -> dict:
    return json.loads((DATA / name).read_text())


class CountingThrottle:
    def __init__(self):
        self.calls = 0

    def wait(self) -> float:
        self.calls += 1
        return 0.0


def make_client(key: str = KEY, throttle=None) -> CivitaiClient:
    client = CivitaiClient(API, api_key=key, throttle=throttle, timeout_s=5)
    client._sleep = lambda s: None  # no real backoff in unit tests
    return client


@pytest.fixture
def rsps():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def assert_no_secret(exc: BaseException) -> None:
    for text in (str(exc), repr(exc)):
        assert KEY not in text
        assert "X-Amz-Signature" not in text and "deadbeef" not in text


# -- pure helpers ----------------------------------------------------------------------------------

def test_redact_url_drops_query_fragment_and_userinfo():
    assert redact_url(SIGNED) == f"{CDN}/file/model.safetensors"
    assert redact_url("https://user:pw@host.test/a/b?token=x#frag") == "https://host.test/a/b"
    assert redact_url(f"{API}/models/1") == f"{API}/models/1"


def test_parse_retry_after_seconds_and_http_date():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    now = time.time()
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1.5)
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now=now) == 0.0


def test_content_disposition_filename():
    assert content_disposition_filename('attachment; filename="model.safetensors"') == "model.safetensors"
    assert content_disposition_filename("attachment; filename*=UTF-8''m%C3%BCdel.safetensors") == "müdel.safetensors"
    assert content_disposition_filename('attachment; filename="../../etc/passwd"') == "passwd"
    assert content_disposition_filename(None) is None


def test_sniff_error_body():
    assert sniff_error_body("text/html; charset=utf-8", b"") == "html"
    assert sniff_error_body("application/json", b"") == "json"
    assert sniff_error_body("application/octet-stream", b"  <!DOCTYPE html><html>") == "html"
    assert sniff_error_body("", b'{"error":"Unauthorized"}') == "json"
    # a safetensors file starts with an 8-byte header length, then {"
    assert sniff_error_body("application/octet-stream", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\"") is None
    assert sniff_error_body("binary/octet-stream", b"PK\x03\x04") is None


# -- version and file choice on real JSON ----------------------------------------------------------

def test_newest_published_version_is_by_date_not_array_order():
    model = load("model-4468.json")
    assert newest_published_version(model)["id"] == 57618
    shuffled = copy.deepcopy(model)
    shuffled["modelVersions"].reverse()
    assert newest_published_version(shuffled)["id"] == 57618
    # move the oldest version's date to the future: it becomes the newest wherever it sits
    bumped = copy.deepcopy(model)
    for version in bumped["modelVersions"]:
        if version["id"] == 5057:
            version["publishedAt"] = "2024-01-01T00:00:00.000"
    assert newest_published_version(bumped)["id"] == 5057


def test_newest_published_version_skips_unpublished_and_falls_back_to_created_at():
    model = load("model-1231067.json")
    draft = copy.deepcopy(model["modelVersions"][0])
    draft.update(id=9, status="Draft", publishedAt="2030-01-01T00:00:00.000Z")
    undated = copy.deepcopy(model["modelVersions"][0])
    undated.update(id=10, publishedAt=None, createdAt="2029-01-01T00:00:00.000Z")
    model["modelVersions"] = [model["modelVersions"][0], draft, undated]
    assert newest_published_version(model)["id"] == 10
    model["modelVersions"] = [draft]
    with pytest.raises(CivitaiError) as err:
        newest_published_version(model)
    assert err.value.reason == "no_file" and "no published version" in str(err.value)


def test_pick_file_on_version_57618_with_two_files_of_the_same_name():
    version = next(v for v in load("model-4468.json")["modelVersions"] if v["id"] == 57618)
    fp32, fp16 = version["files"]
    assert fp32["name"] == fp16["name"]
    assert pick_file(version)["id"] == 41079  # the primary (fp16)
    assert pick_file(version, like=fp32)["id"] == 41074
    assert pick_file(version, like=fp16)["id"] == 41079
    assert pick_file(version, file_id=41074)["id"] == 41074
    like_other_size = copy.deepcopy(fp32)
    like_other_size["metadata"]["size"] = "full"  # no exact match: same format and fp still wins
    assert pick_file(version, like=like_other_size)["id"] == 41074
    with pytest.raises(CivitaiError) as err:
        pick_file(version, file_id=1)
    assert err.value.reason == "no_file"


def test_pick_file_without_primary_takes_first_model_file():
    version = {"id": 5, "files": [{"id": 1, "type": "Config"}, {"id": 2, "type": "Model"}, {"id": 3, "type": "Model"}]}
    assert pick_file(version)["id"] == 2
    with pytest.raises(CivitaiError) as err:
        pick_file({"id": 6, "files": []})
    assert err.value.reason == "no_file"


def test_file_sha256_and_is_unsafe():
    version = next(v for v in load("model-4468.json")["modelVersions"] if v["id"] == 57618)
    f = version["files"][1]
    assert file_sha256(f) == "cbfba64e662370f59d4aa2aa69bf16749fce93846ccce20506aee5df01169859"
    assert file_sha256({"hashes": {"AutoV2": "X"}}) is None
    assert not is_unsafe(f)
    assert is_unsafe({**f, "pickleScanResult": "Danger"})
    assert is_unsafe({**f, "virusScanResult": "Danger"})


def test_resolve_by_model_uses_newest_version_primary_file(rsps):
    rsps.get(f"{API}/models/4468", json=load("model-4468.json"))
    res = resolve(make_client(), model_id=4468)
    assert (res.model_id, res.version_id, res.file_id) == (4468, 57618, 41079)
    assert res.model_type == "checkpoint"
    assert res.filename == "counterfeitV30_v30.safetensors"
    assert res.sha256 == "cbfba64e662370f59d4aa2aa69bf16749fce93846ccce20506aee5df01169859"
    assert res.size_bytes == round(4144652.37109375 * 1024)
    assert res.updated_at == res.published_at == "2023-04-28T19:32:30.819"
    assert (res.file_format, res.fp, res.unsafe) == ("SafeTensor", "fp16", False)
    assert res.url == f"{ORIGIN}/api/download/models/57618?fileId=41079"


def test_resolve_by_version(rsps):
    rsps.get(f"{API}/model-versions/1387174", json=load("model-version-1387174.json"))
    res = resolve(make_client(), version_id=1387174)
    assert (res.model_id, res.version_id, res.file_id, res.model_type) == (1231067, 1387174, 1289799, "lora")
    assert res.filename == "pp-storybook_rank2_bf16.safetensors"
    assert res.updated_at == "2025-02-08T11:29:04.526Z"
    assert res.size_bytes == 19281048
    with pytest.raises(CivitaiError) as err:
        resolve(make_client(), model_id=5, version_id=1387174)
    assert err.value.reason == "not_found" and "belongs to model 1231067" in str(err.value)


# -- metadata requests -------------------------------------------------------------------------------

def test_metadata_get_sends_key_only_to_the_api_and_waits_its_turn(rsps):
    throttle = CountingThrottle()
    rsps.get(f"{API}/models/1231067", json=load("model-1231067.json"),
             match=[matchers.header_matcher({"Authorization": f"Bearer {KEY}"})])
    client = make_client(throttle=throttle)
    assert client.get_model(1231067)["id"] == 1231067
    assert throttle.calls == 1
    assert KEY not in repr(client)


def test_metadata_redirect_to_another_host_drops_the_key(rsps):
    rsps.get(f"{API}/models/1", status=301, headers={"Location": "https://mirror.example.org/api/v1/models/1"})
    rsps.get("https://mirror.example.org/api/v1/models/1", json={"id": 1, "modelVersions": []})
    rsps.get(f"{API}/model-versions/2", status=302, headers={"Location": "/api/v1/model-versions/3"})
    rsps.get(f"{API}/model-versions/3", json={"id": 3},
             match=[matchers.header_matcher({"Authorization": f"Bearer {KEY}"})])
    client = make_client()
    assert client.get_model(1)["id"] == 1
    mirror = [c.request for c in rsps.calls if "mirror" in c.request.url][0]
    assert "Authorization" not in mirror.headers
    assert client.get_version(2)["id"] == 3


@pytest.mark.parametrize("status, reason, retryable, words", [
    (404, "not_found", False, "model 7 was not found on Civitai (deleted or wrong id)"),
    (410, "gone", False, "archived"),
    (400, "http_error", False, "400 Bad Request"),
    (401, "auth_required", False, "civitai_api_key"),
    (403, "forbidden", False, "403 Forbidden"),
])
def test_metadata_status_mapping(rsps, status, reason, retryable, words):
    rsps.get(f"{API}/models/7", status=status, json={"error": "No model with id 7"})
    with pytest.raises(CivitaiError) as err:
        make_client().get_model(7)
    assert (err.value.reason, err.value.retryable, err.value.status) == (reason, retryable, status)
    assert words in str(err.value)
    assert_no_secret(err.value)


def test_metadata_5xx_is_retried_quickly_then_raised_retryable(rsps):
    rsps.get(f"{API}/models/7", status=503, body="<html>503 Service Temporarily Unavailable</html>",
             content_type="text/html")
    throttle = CountingThrottle()
    with pytest.raises(CivitaiError) as err:
        make_client(throttle=throttle).get_model(7)
    assert (err.value.reason, err.value.retryable) == ("server_error", True)
    assert len(rsps.calls) == 3 and throttle.calls == 3


def test_metadata_5xx_then_success(rsps):
    rsps.get(f"{API}/models/7", status=500, json={"error": "boom"})
    rsps.get(f"{API}/models/7", json={"id": 7})
    assert make_client().get_model(7) == {"id": 7}


def test_metadata_connection_error_is_retryable(rsps):
    rsps.get(f"{API}/models/7", body=requests.ConnectionError("connection refused"))
    with pytest.raises(CivitaiError) as err:
        make_client().get_model(7)
    assert (err.value.reason, err.value.retryable) == ("connection", True)
    assert "civitai.test" in str(err.value)


def test_metadata_429_honours_retry_after_and_is_not_retried_inside(rsps):
    rsps.get(f"{API}/models/7", status=429, headers={"Retry-After": "42"}, json={"error": "slow down"})
    with pytest.raises(CivitaiError) as err:
        make_client().get_model(7)
    assert (err.value.reason, err.value.retryable, err.value.retry_after_s) == ("rate_limited", True, 42.0)
    assert len(rsps.calls) == 1


def test_metadata_html_instead_of_json_is_bad_body(rsps):
    rsps.get(f"{API}/models/7", body="<!DOCTYPE html><html>checking your browser</html>", content_type="text/html")
    with pytest.raises(CivitaiError) as err:
        make_client().get_model(7)
    assert (err.value.reason, err.value.retryable) == ("bad_body", True)


def test_get_models_batches_comma_separated_ids_and_paginates(rsps):
    metadata = load("models-list-metadata.json")
    assert {"nextCursor", "nextPage"} <= set(metadata)
    next_page = f"{API}/models?ids=1,2,3&limit=3&nsfw=true&cursor=abc"
    rsps.get(f"{API}/models", match=[matchers.query_param_matcher({"ids": "1,2,3", "limit": "3", "nsfw": "true"})],
             json={"items": [{"id": 1}], "metadata": {"nextCursor": "abc", "nextPage": next_page}})
    rsps.get(f"{API}/models", match=[matchers.query_param_matcher(
        {"ids": "1,2,3", "limit": "3", "nsfw": "true", "cursor": "abc"})],
        json={"items": [{"id": 2}, {"id": 99}], "metadata": {}})
    found = make_client().get_models([1, 2, 3, 2])
    assert set(found) == {1, 2}  # 3 is missing, 99 was not asked for


def test_get_models_chunks_of_100(rsps):
    seen = []

    def answer(request):
        ids = [int(i) for i in request.params["ids"].split(",")]
        seen.append(len(ids))
        return 200, {}, json.dumps({"items": [{"id": i} for i in ids], "metadata": {}})

    rsps.add_callback(responses.GET, f"{API}/models", callback=answer)
    found = make_client().get_models(list(range(1, 251)))
    assert seen == [100, 100, 50] and len(found) == 250


# -- download starts ---------------------------------------------------------------------------------

def add_redirect(rsps, location=SIGNED, status=307, url=DL):
    rsps.get(url, status=status, headers={"Location": location})


def test_download_follows_307_without_key_or_cookies_to_the_cdn(rsps):
    throttle = CountingThrottle()
    rsps.get(DL, status=307, headers={"Location": SIGNED, "Set-Cookie": "session=abc; Path=/"},
             match=[matchers.header_matcher({"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})])
    rsps.get(SIGNED.split("?")[0], body=b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}",
             headers={"ETag": '"e1"', "Content-Disposition": 'attachment; filename="m.safetensors"',
                      "Content-Length": "16"},
             content_type="application/octet-stream")
    client = make_client(throttle=throttle)
    with client.open_download(57618, 41079) as dl:
        buf = bytearray(64)
        n = dl.readinto(memoryview(buf))
        assert (dl.status, dl.start, dl.total_size, dl.etag, dl.filename) == (200, 0, 16, '"e1"', "m.safetensors")
        assert dl.url == f"{CDN}/file/model.safetensors" and not dl.from_api
        assert bytes(buf[:n]).startswith(b"\x08")
    cdn = rsps.calls[-1].request
    assert "Authorization" not in cdn.headers and "Cookie" not in cdn.headers
    assert cdn.headers["Accept-Encoding"] == "identity"
    assert throttle.calls == 1


def test_download_cookies_never_reach_the_cdn_on_the_same_host(rsps):
    same_host_cdn = "https://civitai.test:8443/file/x.bin?sig=1"
    client = make_client()
    client.session.cookies.set("session", "abc", domain="civitai.test")
    add_redirect(rsps, same_host_cdn)
    rsps.get("https://civitai.test:8443/file/x.bin", body=b"data", content_type="application/octet-stream")
    with client.open_download(57618, 41079):
        pass
    assert "Authorization" not in rsps.calls[-1].request.headers
    assert "Cookie" not in rsps.calls[-1].request.headers
    assert "Cookie" in rsps.calls[0].request.headers


def test_download_range_and_if_range_reach_the_cdn(rsps):
    add_redirect(rsps)
    rsps.get(SIGNED.split("?")[0], status=206, body=b"6789",
             headers={"Content-Range": "bytes 6-9/10", "ETag": '"e1"'}, content_type="application/octet-stream")
    with make_client().open_download(57618, 41079, start=6, etag='"e1"') as dl:
        assert (dl.status, dl.start, dl.total_size, dl.content_length) == (206, 6, 10, 4)
    cdn = rsps.calls[-1].request
    assert cdn.headers["Range"] == "bytes=6-" and cdn.headers["If-Range"] == '"e1"'


def test_download_416_is_returned_with_the_total(rsps):
    add_redirect(rsps)
    rsps.get(SIGNED.split("?")[0], status=416, headers={"Content-Range": "bytes */10"})
    with make_client().open_download(57618, 41079, start=10) as dl:
        assert (dl.status, dl.total_size) == (416, 10)


@pytest.mark.parametrize("status, body, reason, retryable, words", [
    (401, {"error": "Unauthorized"}, "auth_required", False,
     "Civitai did not accept the API key"),
    (403, {"error": "Early Access", "deadline": "2031-05-01T00:00:00.000Z"}, "early_access", True,
     "until 2031-05-01 00:00 UTC"),
    (403, {"error": "Forbidden"}, "forbidden", False, "403 Forbidden"),
    (404, {"error": "File not found"}, "not_found", True,
     "the file of model version 57618 was not found on Civitai's download endpoint"),
    (410, {"error": "Model archived, not available for download"}, "gone", False, "archived"),
    (429, {"error": "Rate limit exceeded, please retry shortly."}, "rate_limited", True, "429"),
    (500, {"error": "Error getting file"}, "server_error", True, "500"),
    (502, "<html>bad gateway</html>", "server_error", True, "502"),
])
def test_download_status_mapping(rsps, status, body, reason, retryable, words):
    kwargs = {"json": body} if isinstance(body, dict) else {"body": body, "content_type": "text/html"}
    rsps.get(DL, status=status, headers={"Retry-After": "5"} if status == 429 else {}, **kwargs)
    with pytest.raises(CivitaiError) as err:
        make_client().open_download(57618, 41079)
    assert (err.value.reason, err.value.retryable, err.value.status) == (reason, retryable, status)
    assert words in str(err.value)
    if status == 429:
        assert err.value.retry_after_s == 5.0
    assert_no_secret(err.value)
    assert len(rsps.calls) == 1  # the supervisor retries between attempts, not open_download


def test_download_401_without_key_names_the_setting_and_env_var(rsps):
    rsps.get(DL, status=401, json={"error": "Unauthorized"})
    with pytest.raises(CivitaiError) as err:
        make_client(key="").open_download(57618, 41079)
    text = str(err.value)
    assert text.startswith("Civitai requires a login or API key for this file")
    assert "civitai_api_key in config.json" in text and "CIVITAI_API_KEY" in text
    assert "Authorization" not in rsps.calls[0].request.headers


def test_placeholder_key_is_treated_as_none(rsps):
    rsps.get(f"{API}/models/1", json={"id": 1})
    make_client(key="<your-api-key>").get_model(1)
    assert "Authorization" not in rsps.calls[0].request.headers


@pytest.mark.parametrize("location, reason", [
    ("/login?reason=download-auth&returnUrl=/model-versions/57618", "auth_required"),
    (f"{ORIGIN}/join?reason=early-access&returnUrl=/model-versions/57618", "early_access"),
])
def test_download_redirect_to_site_pages_is_mapped(rsps, location, reason):
    add_redirect(rsps, location)
    with pytest.raises(CivitaiError) as err:
        make_client().open_download(57618, 41079)
    assert err.value.reason == reason
    assert err.value.wait == (reason == "early_access")  # early access waits; a login is the user's to fix
    assert err.value.retryable == (reason == "early_access")
    assert len(rsps.calls) == 1


def test_download_expired_cdn_link_is_resolved_again(rsps):
    throttle = CountingThrottle()
    add_redirect(rsps)
    rsps.get(SIGNED.split("?")[0], status=403, body="<Error><Code>AccessDenied</Code></Error>",
             content_type="application/xml")
    rsps.get(SIGNED.split("?")[0], body=b"\x00" * 10, content_type="application/octet-stream")
    with make_client(throttle=throttle).open_download(57618, 41079) as dl:
        assert dl.status == 200
    assert [c.request.url.split("?")[0] for c in rsps.calls] == [DL.split("?")[0], SIGNED.split("?")[0]] * 2
    assert throttle.calls == 2


def test_download_with_an_early_link_goes_to_the_host_alone_and_a_refused_one_means_asking_civitai(rsps):
    throttle = CountingThrottle()
    rsps.get(SIGNED.split("?")[0], body=b"\x00" * 10, content_type="application/octet-stream")
    with make_client(throttle=throttle).open_download(57618, 41079, link=SIGNED) as dl:
        assert dl.status == 200
    assert [c.request.url.split("?")[0] for c in rsps.calls] == [SIGNED.split("?")[0]]
    assert "Authorization" not in rsps.calls[0].request.headers and throttle.calls == 0
    rsps.reset()
    # Expired by the time the job ran: one refusal, then every try a plain download still has.
    rsps.get(SIGNED.split("?")[0], status=403, body="<Error><Code>AccessDenied</Code></Error>",
             content_type="application/xml")
    add_redirect(rsps)
    rsps.get(SIGNED.split("?")[0], status=400, body="<Error><Code>ExpiredToken</Code></Error>")
    with pytest.raises(CivitaiError) as err:
        make_client(throttle=throttle).open_download(57618, 41079, link=SIGNED)
    assert (err.value.reason, err.value.status) == ("forbidden", 400)
    assert len(rsps.calls) == 1 + 6 and throttle.calls == 3  # the early link, then three links asked for


def test_download_cdn_refusing_every_link_is_retryable(rsps, caplog):
    add_redirect(rsps)
    rsps.get(SIGNED.split("?")[0], status=400, body="<Error><Code>ExpiredToken</Code></Error>")
    with caplog.at_level(logging.DEBUG), pytest.raises(CivitaiError) as err:
        make_client().open_download(57618, 41079)
    assert (err.value.reason, err.value.retryable, err.value.status) == ("forbidden", True, 400)
    assert len(rsps.calls) == 6  # three links, each refused
    assert_no_secret(err.value)
    assert "deadbeef" not in caplog.text and KEY not in caplog.text


def test_download_cdn_chain_of_redirects_never_gets_the_key(rsps):
    add_redirect(rsps)
    rsps.get(SIGNED.split("?")[0], status=302, headers={"Location": "https://b2.example.com/f?auth=1"})
    rsps.get("https://b2.example.com/f", body=b"\x00" * 4, content_type="application/octet-stream")
    with make_client().open_download(57618, 41079) as dl:
        assert dl.url == "https://b2.example.com/f"
    assert all("Authorization" not in c.request.headers for c in rsps.calls[1:])


def test_download_redirect_loop_gives_up(rsps):
    add_redirect(rsps)
    rsps.get(SIGNED.split("?")[0], status=302, headers={"Location": SIGNED})
    with pytest.raises(CivitaiError) as err:
        make_client().open_download(57618, 41079)
    assert err.value.retryable and "redirected too many times" in str(err.value)


@pytest.mark.parametrize("key", [KEY, ""])
def test_download_html_body_is_refused_with_a_login_hint(rsps, key):
    add_redirect(rsps)
    rsps.get(SIGNED.split("?")[0], body="<!DOCTYPE html><html><title>Sign in | Civitai</title></html>",
             content_type="text/html; charset=utf-8")
    with pytest.raises(CivitaiError) as err:
        make_client(key=key).open_download(57618, 41079)
    assert err.value.reason == "bad_body"
    assert "web page" in str(err.value)
    if not key:
        assert "login" in str(err.value) and "civitai_api_key" in str(err.value)
        assert not err.value.retryable


def test_download_json_body_is_refused_unless_a_json_file_is_expected(rsps):
    rsps.get(DL, json={"error": "Unauthorized", "message": "log in"})
    with pytest.raises(CivitaiError) as err:
        make_client().open_download(57618, 41079, filename="model.safetensors")
    assert err.value.reason == "bad_body" and "Unauthorized" in str(err.value)
    with make_client().open_download(57618, 41079, filename="config.json") as dl:
        assert dl.status == 200 and dl.from_api


def test_download_connection_error_is_retryable_and_clean(rsps):
    add_redirect(rsps)
    rsps.get(SIGNED.split("?")[0], body=requests.ConnectionError(f"failed for {SIGNED}"))
    with pytest.raises(CivitaiError) as err:
        make_client().open_download(57618, 41079)
    assert (err.value.reason, err.value.retryable) == ("connection", True)
    assert "cdn.example.net" in str(err.value)
    assert_no_secret(err.value)


def test_download_compressed_body_is_refused(rsps):
    add_redirect(rsps)
    rsps.get(SIGNED.split("?")[0], body=b"x", headers={"Content-Encoding": "gzip"},
             content_type="application/octet-stream")
    with pytest.raises(CivitaiError) as err:
        make_client().open_download(57618, 41079)
    assert err.value.reason == "bad_body" and err.value.retryable


def test_urllib3_debug_log_has_no_query_strings(caplog):
    with caplog.at_level(logging.DEBUG, logger="urllib3.connectionpool"):
        logging.getLogger("urllib3.connectionpool").debug(
            '%s://%s:%s "%s %s %s" %s %s', "https", "cdn.example.net", 443, "GET", "/f?X-Amz-Signature=s", "HTTP/1.1",
            200, 10)
    assert "X-Amz-Signature" not in caplog.text and "/f" in caplog.text


def test_error_message_as_worker_message():
    err = CivitaiError("boom", reason="server_error", retryable=True, retry_after_s=3.0, status=500)
    assert err.as_message(5) == {"type": "error", "job_id": 5, "error": "boom", "retryable": True,
                                 "retry_after_s": 3.0, "reason": "server_error", "wait": False,
                                 "wait_until": None}


def test_a_wait_as_worker_message_has_both_the_moment_and_the_delay():
    before = time.time()
    err = CivitaiError("early access until …", reason="early_access", wait=True, wait_until=before + 100)
    msg = err.as_message(6)
    assert (msg["wait"], msg["retryable"], msg["reason"], msg["wait_until"]) == (True, True, "early_access",
                                                                                  before + 100)
    assert 99 <= msg["retry_after_s"] <= 100
    err = CivitaiError("quota", reason="quota", wait=True, retry_after_s=3600)
    assert before + 3600 <= err.as_message(7)["wait_until"] <= time.time() + 3600
    json.dumps(msg)  # travels over the Pipe as plain data


def test_requests_identify_the_daemon_not_python_requests():
    client = CivitaiClient("https://civitai.com/api/v1")
    assert not client.session.headers["User-Agent"].startswith("python-requests")


# -- Civitai's own words, and answers that mean "wait" ----------------------------------------------

DISABLED = "The creator of this asset has disabled downloads on this file"
LOGIN = "The creator of this asset requires you to be logged in to download it"
QUOTA = ("We've noticed an unusual amount of downloading from your account. Contact support@civitai.com "
         "or come back later.")


@pytest.mark.parametrize("key", [KEY, ""])
def test_downloads_disabled_by_the_creator_is_said_and_no_key_is_blamed(rsps, key):
    rsps.get(DL, status=401, json={"error": "Unauthorized", "message": DISABLED})
    with pytest.raises(CivitaiError) as err:
        make_client(key=key).open_download(57618, 41079)
    assert (err.value.reason, err.value.retryable, err.value.wait) == ("downloads_disabled", False, False)
    assert str(err.value) == (f"Civitai refuses the download of model version 57618: {DISABLED} (401); "
                              f"only its creator can change that")
    assert "civitai_api_key" not in str(err.value) and "API key" not in str(err.value)


def test_a_login_only_file_without_a_key_gives_civitais_words_and_the_setting(rsps):
    rsps.get(DL, status=401, json={"error": "Unauthorized", "message": LOGIN})
    with pytest.raises(CivitaiError) as err:
        make_client(key="").open_download(57618, 41079)
    assert str(err.value) == ("Civitai requires a login or API key for this file (model version 57618; Civitai "
                              f"says: {LOGIN}): set civitai_api_key in config.json or the CIVITAI_API_KEY "
                              "environment variable")


def test_early_access_waits_until_its_deadline(rsps):
    rsps.get(DL, status=403, json={"error": "Early Access", "deadline": "2031-05-01T18:00:00.000Z",
                                   "message": "This asset is in Early Access. You can use Buzz access it now!"})
    with pytest.raises(CivitaiError) as err:
        make_client().open_download(57618, 41079)
    e = err.value
    assert (e.reason, e.wait, e.retryable) == ("early_access", True, True)
    deadline = parse_time("2031-05-01T18:00:00.000Z")
    assert e.wait_until == deadline + 60  # a minute after, not a moment before
    assert str(e) == ("model version 57618 is in early access on Civitai until 2031-05-01 18:00 UTC; the download "
                      "starts then; to get it sooner, buy early access on civitai.com with civitai_api_key set")
    assert e.as_message(1)["wait_until"] == deadline + 60


def test_early_access_past_its_deadline_or_without_one_waits_an_hour(rsps):
    rsps.get(DL, status=403, json={"error": "Early Access", "deadline": "2020-01-01T00:00:00.000Z"})
    rsps.get(DL, status=403, json={"error": "Early Access"})
    for words in ("was to end at 2020-01-01 00:00 UTC, but Civitai still refuses", "which gives no end date"):
        with pytest.raises(CivitaiError) as err:
            make_client().open_download(57618, 41079)
        assert err.value.wait and words in str(err.value)
        assert 3590 <= err.value.wait_until - time.time() <= 3600


def test_the_daily_quota_waits_an_hour_or_what_retry_after_says(rsps):
    rsps.get(DL, status=429, json={"error": QUOTA})
    rsps.get(DL, status=429, json={"error": QUOTA}, headers={"Retry-After": "7200"})
    for wait_s in (3600, 7200):
        before = time.time()
        with pytest.raises(CivitaiError) as err:
            make_client().open_download(57618, 41079)
        e = err.value
        assert (e.reason, e.wait, e.retryable, e.status) == ("quota", True, True, 429)
        assert before + wait_s <= e.wait_until <= time.time() + wait_s
        assert str(e).startswith(f"Civitai's download quota for this account is used up (429: {QUOTA}); "
                                 "downloads wait until ")


def test_a_cloudflare_page_with_403_on_the_download_is_retried_not_final(rsps):
    rsps.get(DL, status=403, body="<!DOCTYPE html><html><title>Just a moment...</title></html>",
             content_type="text/html")
    with pytest.raises(CivitaiError) as err:
        make_client().open_download(57618, 41079)
    assert (err.value.reason, err.value.retryable, err.value.wait) == ("forbidden", True, False)
    assert "web page" in str(err.value)


@pytest.mark.parametrize("first", [
    dict(status=404, json={"error": "Model not found"}),
    dict(status=403, body="<!DOCTYPE html><html>Just a moment...</html>", content_type="text/html"),
])
def test_resolve_asks_again_after_one_transient_metadata_answer(rsps, first):
    rsps.get(f"{API}/model-versions/1387174", **first)
    rsps.get(f"{API}/model-versions/1387174", json=load("model-version-1387174.json"))
    assert resolve(make_client(), version_id=1387174).file_id == 1289799
    assert len(rsps.calls) == 2


@pytest.mark.parametrize("answer, calls", [
    (dict(status=404, json={"error": "Model not found"}), 2),
    (dict(status=403, body="<html><body>Checking your browser</body></html>", content_type="text/html"), 2),
    (dict(status=503, body="<html>503 Service Temporarily Unavailable</html>", content_type="text/html"), 3),
    (dict(status=500, json={"error": "Failed to fetch model version details"}), 3),
    (dict(status=200, body="<!DOCTYPE html><html>maintenance</html>", content_type="text/html"), 3),
])
def test_a_transient_metadata_answer_is_retryable_with_a_growing_backoff(rsps, answer, calls):
    rsps.get(f"{API}/model-versions/7", **answer)
    for attempt, delay in ((1, 15), (2, 60), (3, 240), (4, 900), (9, 900)):
        rsps.calls.reset()
        with pytest.raises(CivitaiError) as err:
            resolve(make_client(), version_id=7, attempt=attempt)
        e = err.value
        assert (e.reason, e.retryable, e.wait, e.retry_after_s) == ("metadata_unavailable", True, False, delay)
        assert len(rsps.calls) == calls  # the client's quick retries of 5xx are not repeated
    assert "model version 7" in str(e)


def test_a_metadata_403_in_json_is_a_refusal_not_a_hiccup(rsps):
    rsps.get(f"{API}/model-versions/7", status=403, json={"error": "Forbidden"})
    with pytest.raises(CivitaiError) as err:
        resolve(make_client(), version_id=7)
    assert (err.value.reason, err.value.retryable) == ("forbidden", False)
    assert len(rsps.calls) == 1


def test_a_version_whose_creator_disabled_downloads_is_refused_before_any_download(rsps):
    version = load("model-version-1387174.json")
    version["usageControl"] = "Generation"
    rsps.get(f"{API}/model-versions/1387174", json=version)
    with pytest.raises(CivitaiError) as err:
        resolve(make_client(), version_id=1387174)
    assert (err.value.reason, err.value.retryable) == ("downloads_disabled", False)
    assert "has disabled downloads on Civitai (usageControl: Generation)" in str(err.value)


def test_resolve_knows_when_early_access_ends(rsps):
    version = load("model-version-1387174.json")
    assert version["usageControl"] == "Download"
    version.update(availability="EarlyAccess", earlyAccessEndsAt="2031-05-01T18:00:00.000Z")
    rsps.get(f"{API}/model-versions/1387174", json=version)
    res = resolve(make_client(), version_id=1387174)
    assert res.early_access_ends_at == parse_time("2031-05-01T18:00:00.000Z")
    assert resolve(make_client(), version_id=1387174).scan == "Success"


def test_the_session_reads_proxies_from_the_environment_once_per_host(monkeypatch):
    """The environment is read once per host (it was a quarter of a small request's CPU), and
    what it says still holds: the proxy, NO_PROXY per host, the CA bundle."""
    from workers import civitai

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.lan:3128")
    monkeypatch.setenv("NO_PROXY", "internal.lan")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/lan.pem")
    reads = []
    real = requests.utils.get_environ_proxies
    monkeypatch.setattr(requests.utils, "get_environ_proxies", lambda url, no_proxy=None: reads.append(url) or real(url, no_proxy=no_proxy))
    session = civitai.new_session()
    for i in range(5):
        got = session.merge_environment_settings(f"https://civitai.com/api/v1/models/{i}", {}, None, None, None)
        assert got["proxies"]["https"] == "http://proxy.lan:3128" and got["verify"] == "/etc/ssl/lan.pem"
    inside = session.merge_environment_settings("https://internal.lan/x", {}, None, False, None)
    assert "https" not in inside["proxies"] and inside["verify"] is False
    assert reads == ["https://civitai.com/api/v1/models/0", "https://internal.lan/x"]
    monkeypatch.setenv("HTTP_PROXY", "http://u:p@proxy.lan:3128")
    hop = requests.Request("GET", "http://cdn.example/f?sig=1").prepare()  # a redirect's next hop
    assert session.rebuild_proxies(hop, {})["http"] == "http://u:p@proxy.lan:3128"
    assert hop.headers["Proxy-Authorization"].startswith("Basic ")
    tls = requests.Request("GET", "https://cdn.example/f", headers={"Proxy-Authorization": "old"}).prepare()
    session.rebuild_proxies(tls, {})
    assert "Proxy-Authorization" not in tls.headers  # never on a TLS tunnel
    assert reads[2:] == ["http://cdn.example/f?sig=1", "https://cdn.example/f"]
    session.trust_env = False
    assert session.merge_environment_settings("https://civitai.com/", {}, None, None, None)["proxies"] == {}


def test_the_sessions_own_requests_are_sent_as_requests_would_send_them_bar_netrc(monkeypatch, tmp_path):
    """A GET or HEAD that follows no redirect is prepared directly: the same method, URL
    (requoted), headers (the session's, the call's, a None one dropped), cookies, proxies, CA
    bundle, stream and timeout as requests' own path, except that ~/.netrc is never read (its
    Basic auth would replace the API key and go to the file host too). Anything else is requests'."""
    from workers import civitai

    (tmp_path / ".netrc").write_text("machine civitai.com login someone password secret\n")
    (tmp_path / ".netrc").chmod(0o600)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.lan:3128")
    monkeypatch.setenv("NO_PROXY", "internal.lan")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/lan.pem")
    session = civitai.new_session()
    session.cookies.set("cf_clearance", "c1", domain="civitai.com")
    sent: list = []

    def capture(prep, **kwargs):
        sent.append((prep, kwargs))
        return requests.Response()

    monkeypatch.setattr(session, "send", capture)
    calls = [("GET", "https://civitai.com/api/v1/models/1?x=a b", {"Accept": "application/json", "Authorization": "Bearer k"},
              dict(stream=True, timeout=(5, 30))),
             ("GET", "https://internal.lan/f/é", {"User-Agent": None, "Range": "bytes=0-"}, dict(timeout=7)),
             ("HEAD", "https://cdn.example/f", None, dict(verify=False))]
    for method, url, headers, kw in calls:
        session.request(method, url, headers=headers, allow_redirects=False, **kw)
        fast = sent.pop()
        requests.Session.request(session, method, url, headers=headers, allow_redirects=False, **kw)
        slow = sent.pop()
        assert (fast[0].method, fast[0].url, fast[0].body) == (slow[0].method, slow[0].url, slow[0].body)
        slow_headers = dict(slow[0].headers)
        if method == "GET" and "civitai.com" in url:
            assert slow_headers.pop("Authorization").startswith("Basic ")  # netrc's, over the caller's key
            slow_headers["Authorization"] = "Bearer k"
        assert dict(fast[0].headers) == slow_headers
        assert fast[1] == slow[1], (fast[1], slow[1])
    assert sent == []
    assert session.request("GET", "https://civitai.com/", allow_redirects=False).__class__ is requests.Response
    assert sent.pop()[0].headers["Cookie"] == "cf_clearance=c1"
    monkeypatch.setattr(requests.Session, "request", lambda self, *a, **kw: sent.append(("requests", a, kw)))
    session.get("https://civitai.com/", allow_redirects=True)
    session.get("https://civitai.com/", params={"a": "1"}, allow_redirects=False)
    session.request("POST", "https://civitai.com/", data=b"x", allow_redirects=False)
    assert [item[0] for item in sent] == ["requests"] * 3


@responses.activate
def test_a_redirect_not_followed_is_not_prepared_and_one_followed_still_is():
    from workers.civitai import new_session
    responses.add(responses.GET, f"{ORIGIN}/api/download/models/1", status=307,
                  headers={"Location": f"{CDN}/f/1"})
    responses.add(responses.GET, f"{CDN}/f/1", body=b"body")
    session = new_session()
    resp = session.get(f"{ORIGIN}/api/download/models/1", allow_redirects=False)
    assert resp.status_code == 307 and resp.next is None and len(responses.calls) == 1
    followed = session.get(f"{ORIGIN}/api/download/models/1")
    assert followed.content == b"body" and [r.status_code for r in followed.history] == [307]
