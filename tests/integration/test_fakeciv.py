"""Tests of the fake Civitai (tests/fakeciv.py) that the integration tests stand on."""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import socket
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
import requests

from tests.fakeciv import FakeCivitai, fake_civitai  # noqa: F401  (fixture)

SAMPLES = Path(__file__).resolve().parent.parent / "data"  # copies of ../shared/civitai-samples
MIB = 1 << 20


def _setup(fake: FakeCivitai) -> None:
    fake.add_model(1, name="Test Model", type="Checkpoint", versions=[
        dict(id=10, name="v1", published_at="2024-01-01T00:00:00.000Z", files=[
            dict(id=100, name="test model v1.safetensors", size_bytes=3 * MIB + 123, seed=7,
                 primary=True, format="SafeTensor", fp="fp16", size="pruned"),
            dict(id=101, name="test model v1.safetensors", data=b"fp32-bytes" * 1000,
                 primary=False, format="SafeTensor", fp="fp32", size="pruned"),
        ]),
        dict(id=11, name="v2", published_at="2024-06-01T00:00:00.000Z", files=[
            dict(id=110, name="small.safetensors", size_bytes=20000, primary=True),
        ]),
    ])


@pytest.fixture
def fake(fake_civitai):  # noqa: F811
    _setup(fake_civitai)
    yield fake_civitai
    assert fake_civitai.errors == []


def _location(fake: FakeCivitai, vid: int, fid: int | None = None, **headers) -> str:
    r = requests.get(fake.download_url(vid, fid), headers=headers, allow_redirects=False,
                     timeout=5)
    assert r.status_code == 307, r.text
    return r.headers["Location"]


def _raw(url: str, method: str = "GET", headers: dict | None = None, timeout: float = 5):
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    conn.request(method, u.path + ("?" + u.query if u.query else ""), headers=headers or {})
    return conn, conn.getresponse()


# --------------------------------------------------------------------------- API shapes


def test_model_json_shape(fake):
    r = requests.get(f"{fake.api_url}/models/1", timeout=5)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("application/json")
    m = r.json()
    assert m["id"] == 1 and m["name"] == "Test Model" and m["type"] == "Checkpoint"
    assert [v["id"] for v in m["modelVersions"]] == [10, 11]  # given order, not sorted
    v = m["modelVersions"][0]
    for k in ("id", "modelId", "name", "createdAt", "updatedAt", "publishedAt", "status",
              "baseModel", "earlyAccessEndsAt", "downloadUrl", "files", "images"):
        assert k in v, k
    assert v["publishedAt"] == "2024-01-01T00:00:00.000Z" and v["status"] == "Published"
    assert v["downloadUrl"] == f"{fake.origin}/api/download/models/10"
    f0, f1 = v["files"]
    sha = hashlib.sha256(fake.file_bytes(100)).hexdigest().upper()
    assert f0["hashes"]["SHA256"] == sha == fake.file_sha256(100)
    assert f0["hashes"]["AutoV2"] == sha[:10]
    assert {"CRC32", "BLAKE3"} <= set(f0["hashes"])
    assert f0["sizeKB"] == (3 * MIB + 123) / 1024
    assert f0["metadata"] == {"format": "SafeTensor", "fp": "fp16", "size": "pruned"}
    assert f0["primary"] is True and "primary" not in f1  # /models shows it only when true
    assert fake.version_json(10)["files"][1]["primary"] is False  # /model-versions says false
    assert f0["downloadUrl"] == f"{fake.origin}/api/download/models/10"
    q = urllib.parse.parse_qs(urllib.parse.urlsplit(f1["downloadUrl"]).query)
    assert q == {"type": ["Model"], "format": ["SafeTensor"], "size": ["pruned"], "fp": ["fp32"]}
    assert f0["pickleScanResult"] == "Success" and f0["virusScanResult"] == "Success"
    assert f1["hashes"]["SHA256"] == hashlib.sha256(b"fp32-bytes" * 1000).hexdigest().upper()


def test_keys_match_real_samples(fake):
    real = json.loads((SAMPLES / "model-1231067.json").read_text())
    ours = fake.model_json(1)
    assert set(real) <= set(ours)
    assert set(real["modelVersions"][0]) - {"images"} <= set(ours["modelVersions"][0])
    rf = real["modelVersions"][0]["files"][0]
    of = ours["modelVersions"][0]["files"][0]
    assert set(rf) <= set(of)
    assert set(rf["hashes"]) <= set(of["hashes"])
    realv = json.loads((SAMPLES / "model-version-1387174.json").read_text())
    oursv = fake.version_json(10)
    assert set(realv) - {"stats"} <= set(oursv)
    assert set(realv["model"]) == set(oursv["model"])


def test_model_version_endpoint_and_404s(fake):
    v = requests.get(f"{fake.api_url}/model-versions/11", timeout=5).json()
    assert v["id"] == 11 and v["modelId"] == 1
    assert v["model"] == {"name": "Test Model", "type": "Checkpoint", "nsfw": False, "poi": False}
    assert v["files"][0]["id"] == 110
    r = requests.get(f"{fake.api_url}/models/999", timeout=5)
    assert r.status_code == 404 and r.json() == {"error": "No model with id 999"}
    r = requests.get(f"{fake.api_url}/model-versions/999", timeout=5)
    assert r.status_code == 404 and "error" in r.json()
    sha = fake.file_sha256(110)
    r = requests.get(f"{fake.api_url}/model-versions/by-hash/{sha.lower()}", timeout=5)
    assert r.json()["id"] == 11


def test_models_list_ids_and_pagination(fake):
    fake.add_model(2, name="Two", type="LORA", versions=[dict(id=20, files=[
        dict(id=200, name="two.safetensors", size_bytes=10, primary=True)])])
    fake.add_model(3, name="Three", versions=[dict(id=30)])
    r = requests.get(f"{fake.api_url}/models", params={"ids": "1,3,77"}, timeout=5).json()
    assert sorted(i["id"] for i in r["items"]) == [1, 3]  # unknown ids simply missing
    assert "metadata" in r and "nextCursor" not in r["metadata"]
    r = requests.get(f"{fake.api_url}/models?ids=1&ids=2", timeout=5).json()
    assert sorted(i["id"] for i in r["items"]) == [1, 2]
    r = requests.get(f"{fake.api_url}/models", params={"ids": "1,2,3", "limit": 2},
                     timeout=5).json()
    assert len(r["items"]) == 2 and r["metadata"]["nextCursor"]
    r2 = requests.get(r["metadata"]["nextPage"], timeout=5).json()
    assert len(r2["items"]) == 1
    assert {i["id"] for i in r["items"] + r2["items"]} == {1, 2, 3}


def test_add_version_and_replace_file(fake):
    fake.add_version(1, dict(id=12, name="v3", published_at="2025-01-01T00:00:00.000Z",
                             files=[dict(id=120, name="new.safetensors", size_bytes=5000,
                                         primary=True)]))
    m = requests.get(f"{fake.api_url}/models/1", timeout=5).json()
    assert [v["id"] for v in m["modelVersions"]] == [10, 11, 12]
    old_sha, old_upd = fake.file_sha256(110), m["modelVersions"][1]["updatedAt"]
    url = _location(fake, 11)
    etag = requests.head(url, timeout=5).headers["ETag"]
    time.sleep(0.01)
    fake.replace_file(110, data=b"new content" * 10)
    v = requests.get(f"{fake.api_url}/model-versions/11", timeout=5).json()
    assert v["files"][0]["hashes"]["SHA256"] != old_sha
    assert v["files"][0]["hashes"]["SHA256"] == fake.file_sha256(110)
    assert v["updatedAt"] != old_upd
    # the old URL now serves the new content; an If-Range with the old ETag gets it all
    r = requests.get(url, headers={"Range": "bytes=5-", "If-Range": etag}, timeout=5)
    assert r.status_code == 200 and r.content == b"new content" * 10


def test_advertised_overrides(fake):
    fake.add_model(5, versions=[dict(id=50, files=[dict(id=500, data=b"abc", primary=True,
                                                        sha256="ab" * 32, size_kb=99.0)])])
    f = fake.model_json(5)["modelVersions"][0]["files"][0]
    assert f["hashes"]["SHA256"] == "AB" * 32 and f["sizeKB"] == 99.0
    assert fake.file_sha256(500) == hashlib.sha256(b"abc").hexdigest().upper()


# --------------------------------------------------------------------------- download + CDN


def test_download_redirect_and_cdn_headers(fake):
    loc = _location(fake, 10, 100)
    assert loc.startswith(fake.cdn_origin + "/files/100/")
    assert fake.cdn_origin != fake.origin
    assert "test%20model%20v1.safetensors" in loc and "sig=" in loc and "exp=" in loc
    r = requests.get(loc, timeout=10)
    assert r.status_code == 200
    assert r.content == fake.file_bytes(100)
    assert len(r.content) == fake.file_size(100) == 3 * MIB + 123
    assert r.headers["Content-Type"] == "application/octet-stream"
    assert r.headers["Accept-Ranges"] == "bytes"
    assert r.headers["ETag"].startswith('"') and r.headers["Last-Modified"]
    assert r.headers["Content-Disposition"] == 'attachment; filename="test model v1.safetensors"'
    # no fileId: the primary file; type/format/fp filters pick the matching file
    assert "/files/100/" in _location(fake, 10)
    r = requests.get(f"{fake.origin}/api/download/models/10?type=Model&format=SafeTensor&fp=fp32",
                     allow_redirects=False, timeout=5)
    assert "/files/101/" in r.headers["Location"]
    r = requests.get(fake.download_url(10, 110), allow_redirects=False, timeout=5)
    assert r.status_code == 404 and r.json() == {"error": "File not found"}
    r = requests.get(fake.download_url(999), allow_redirects=False, timeout=5)
    assert r.status_code == 404


def test_range_if_range_416_head(fake):
    url = _location(fake, 10, 100)
    data = fake.file_bytes(100)
    size = len(data)
    r = requests.get(url, headers={"Range": "bytes=1000000-"}, timeout=5)
    assert r.status_code == 206
    assert r.headers["Content-Range"] == f"bytes 1000000-{size - 1}/{size}"
    assert r.content == data[1000000:]
    r = requests.get(url, headers={"Range": "bytes=10-19"}, timeout=5)
    assert r.status_code == 206 and r.content == data[10:20]
    r = requests.get(url, headers={"Range": "bytes=-5"}, timeout=5)
    assert r.status_code == 206 and r.content == data[-5:]
    head = requests.head(url, timeout=5)
    assert head.status_code == 200 and int(head.headers["Content-Length"]) == size
    assert head.content == b""
    etag, lm = head.headers["ETag"], head.headers["Last-Modified"]
    r = requests.get(url, headers={"Range": "bytes=3000000-", "If-Range": etag}, timeout=5)
    assert r.status_code == 206 and r.content == data[3000000:]
    r = requests.get(url, headers={"Range": "bytes=3000000-", "If-Range": lm}, timeout=5)
    assert r.status_code == 206
    r = requests.get(url, headers={"Range": "bytes=3000000-", "If-Range": '"other"'}, timeout=5)
    assert r.status_code == 200 and r.content == data and "Content-Range" not in r.headers
    r = requests.get(url, headers={"Range": f"bytes={size}-"}, timeout=5)
    assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{size}"


def test_api_key_required(fake):
    fake.api_key = "secret-key"
    r = requests.get(fake.download_url(10, 100), allow_redirects=False, timeout=5)
    assert r.status_code == 401
    assert r.json()["error"] == "Unauthorized" and "logged in" in r.json()["message"]
    r = requests.get(fake.download_url(10, 100), allow_redirects=False, timeout=5,
                     headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    # metadata stays open; the right key gets the redirect; requests drops it at the CDN
    assert requests.get(f"{fake.api_url}/models/1", timeout=5).status_code == 200
    r = requests.get(fake.download_url(11), headers={"Authorization": "Bearer secret-key"},
                     timeout=5)
    assert r.status_code == 200 and r.content == fake.file_bytes(110)
    api_req = fake.requests_to("api", r"/api/download/")[-1]
    assert api_req.headers["authorization"] == "Bearer secret-key"
    assert api_req.headers.get("AUTHORIZATION") == "Bearer secret-key"
    cdn_req = fake.requests_to("cdn")[-1]
    assert "authorization" not in cdn_req.headers and "sig=" in cdn_req.query


def test_early_access_version(fake):
    deadline = "2099-01-01T00:00:00.000Z"
    fake.add_version(1, dict(id=13, early_access_ends_at=deadline, files=[
        dict(id=130, name="ea.safetensors", size_bytes=100, primary=True)]))
    v = fake.version_json(13)
    assert v["earlyAccessEndsAt"] == deadline and v["availability"] == "EarlyAccess"
    r = requests.get(fake.download_url(13), allow_redirects=False, timeout=5)
    assert r.status_code == 403
    assert r.json()["error"] == "Early Access" and r.json()["deadline"] == deadline


def test_expired_and_unknown_signature(fake):
    fake.cdn_url_ttl_s = 0.3
    url = _location(fake, 11)
    assert requests.get(url, timeout=5).status_code == 200
    time.sleep(0.5)
    r = requests.get(url, timeout=5)
    assert r.status_code == 403 and b"<Code>AccessDenied</Code>" in r.content
    assert b"expired" in r.content
    bad = url.replace("sig=", "sig=00")
    r = requests.get(bad, timeout=5)
    assert r.status_code == 403 and b"SignatureDoesNotMatch" in r.content
    fake.cdn_url_ttl_s = 3600
    url = _location(fake, 11)
    fake.expire_cdn_urls()
    assert requests.get(url, timeout=5).status_code == 403


def test_requests_recorded(fake):
    fake.clear_requests()
    requests.get(f"{fake.api_url}/models?ids=1", headers={"X-Test": "yes"}, timeout=5)
    rec = fake.requests[-1]
    assert rec.server == "api" and rec.method == "GET" and rec.path == "/api/v1/models"
    assert rec.query == "ids=1" and rec.headers["x-test"] == "yes" and "X-TEST" in rec.headers
    assert rec.time <= time.time()
    requests.get(fake.download_url(11), timeout=5)
    assert [r.server for r in fake.requests] == ["api", "api", "cdn"]


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize("code", [401, 403, 404, 410, 429, 500, 502, 503])
def test_status_fault_on_download_endpoint(fake, code):
    kw = {"retry_after": 7} if code in (429, 503) else {}
    fake.set_fault(110, "status", code=code, times=1, **kw)
    r = requests.get(fake.download_url(11, 110), allow_redirects=False, timeout=5)
    assert r.status_code == code
    if kw:
        assert r.headers["Retry-After"] == "7"
    if code in (502, 503):
        assert "text/html" in r.headers["Content-Type"]
    else:
        body = r.json()
        assert body["error"]
        if code == 403:
            assert body["error"] == "Early Access" and body["deadline"]
        if code == 401:
            assert "logged in" in body["message"]
        if code == 429:
            assert body == {"error": "Rate limit exceeded, please retry shortly."}
    # times=1: the next request is normal again
    r = requests.get(fake.download_url(11, 110), allow_redirects=False, timeout=5)
    assert r.status_code == 307


def test_status_fault_times_and_cdn_side(fake):
    fake.set_fault(110, "status", code=503, times=2)
    codes = [requests.get(fake.download_url(11), allow_redirects=False, timeout=5).status_code
             for _ in range(3)]
    assert codes == [503, 503, 307]
    fake.set_fault(110, "status", code=500, where="cdn")  # always
    url = _location(fake, 11)
    for _ in range(2):
        r = requests.get(url, timeout=5)
        assert r.status_code == 500 and b"<Error>" in r.content
    fake.clear_faults(110)
    assert requests.get(url, timeout=5).status_code == 200


def test_html_login_and_json_error(fake):
    fake.set_fault(110, "html_login", times=1)
    r = requests.get(fake.download_url(11), timeout=5)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    assert b"<html" in r.content.lower()
    fake.set_fault(110, "html_login", times=1, via_redirect=True)
    r = requests.get(fake.download_url(11), timeout=5)
    assert r.status_code == 200 and "/login" in r.url and b"<html" in r.content.lower()
    fake.set_fault(110, "json_error", times=1)
    r = requests.get(fake.download_url(11), timeout=5)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
    assert r.json()["error"] == "Unauthorized"
    assert requests.get(fake.download_url(11), timeout=5).content == fake.file_bytes(110)


def test_stall_then_close(fake):
    url = _location(fake, 11)
    fake.set_fault(110, "stall", after_bytes=1000, seconds=0.6, times=1)
    conn, r = _raw(url, timeout=0.2)
    assert r.status == 200 and int(r.getheader("Content-Length")) == 20000
    assert len(r.read(1000)) == 1000
    with pytest.raises(TimeoutError):
        r.read(1)
    conn.close()
    # after `seconds` the connection is dropped, body incomplete
    conn, r = _raw(url, timeout=5)  # the fault was used up: normal again
    assert r.read() == fake.file_bytes(110)
    conn.close()
    fake.set_fault(110, "stall", after_bytes=1000, seconds=0.4, times=1)
    conn, r = _raw(url, timeout=5)
    t0 = time.monotonic()
    with pytest.raises(http.client.IncompleteRead) as ei:
        r.read()
    assert len(ei.value.partial) == 1000 and time.monotonic() - t0 >= 0.35
    conn.close()


def test_stall_resume(fake):
    url = _location(fake, 11)
    fake.set_fault(110, "stall", after_bytes=5000, seconds=0.3, resume=True, times=1)
    t0 = time.monotonic()
    r = requests.get(url, timeout=5)
    assert r.content == fake.file_bytes(110) and time.monotonic() - t0 >= 0.25


def test_close_unblocks_stalled_handlers():
    fake = FakeCivitai()
    fake.add_model(1, versions=[dict(id=10, files=[dict(id=100, size_bytes=50000,
                                                        primary=True)])])
    url = _location(fake, 10)
    fake.set_fault(100, "stall", after_bytes=100)  # forever
    result = {}

    def client():
        conn = None
        try:
            conn, r = _raw(url, timeout=10)
            result["data"] = r.read()
        except Exception as e:  # noqa: BLE001
            result["exc"] = e
        finally:
            if conn is not None:
                conn.close()

    t = threading.Thread(target=client, daemon=True)
    t.start()
    time.sleep(0.3)
    assert t.is_alive()
    t0 = time.monotonic()
    fake.close()
    assert time.monotonic() - t0 < 2
    t.join(3)
    assert not t.is_alive() and "exc" in result
    fake.close()  # idempotent


def test_drip(fake):
    url = _location(fake, 11)
    fake.set_fault(110, "drip", bps=40000, times=1)
    t0 = time.monotonic()
    r = requests.get(url, timeout=5)
    dt = time.monotonic() - t0
    assert r.content == fake.file_bytes(110)
    assert 0.4 <= dt < 2.0  # 20000 bytes at 40 kB/s


def test_reset(fake):
    url = _location(fake, 10, 100)
    fake.set_fault(100, "reset", after_bytes=5000, times=1)
    conn, r = _raw(url)
    got = b""
    with pytest.raises(ConnectionResetError):
        while True:
            chunk = r.read1(65536) if hasattr(r, "read1") else r.read(65536)
            if not chunk:
                break
            got += chunk
    assert len(got) <= 5000 and fake.file_bytes(100).startswith(got)
    conn.close()
    fake.set_fault(110, "reset", where="api", times=1)
    with pytest.raises(requests.ConnectionError):
        requests.get(fake.download_url(11), timeout=5)
    url = _location(fake, 11)
    fake.set_fault(110, "reset", before_headers=True, times=1)
    with pytest.raises(requests.ConnectionError):
        requests.get(url, timeout=5)
    assert requests.get(url, timeout=5).content == fake.file_bytes(110)


def test_short(fake):
    url = _location(fake, 11)
    fake.set_fault(110, "short", after_bytes=5000, times=1)
    conn, r = _raw(url)
    assert int(r.getheader("Content-Length")) == 20000
    with pytest.raises(http.client.IncompleteRead) as ei:
        r.read()
    assert ei.value.partial == fake.file_bytes(110)[:5000]
    conn.close()


def test_ignore_range(fake):
    url = _location(fake, 11)
    fake.set_fault(110, "ignore_range", times=1)
    r = requests.get(url, headers={"Range": "bytes=100-"}, timeout=5)
    assert r.status_code == 200 and "Content-Range" not in r.headers
    assert r.content == fake.file_bytes(110)
    r = requests.get(url, headers={"Range": "bytes=100-"}, timeout=5)
    assert r.status_code == 206


def test_wrong_bytes(fake):
    url = _location(fake, 11)
    good = fake.file_bytes(110)
    fake.set_fault(110, "wrong_bytes", times=1)
    bad = requests.get(url, timeout=5).content
    assert len(bad) == len(good) and bad != good
    assert sum(a != b for a, b in zip(bad, good)) == 1
    assert hashlib.sha256(bad).hexdigest().upper() != fake.file_sha256(110)
    fake.set_fault(110, "wrong_bytes", offset=15000, times=1)
    part = requests.get(url, headers={"Range": "bytes=10000-"}, timeout=5).content
    assert part[5000] != good[15000] and part[:5000] == good[10000:15000]
    assert requests.get(url, timeout=5).content == good


def test_expire_cdn(fake):
    url = _location(fake, 11)
    fake.set_fault(110, "expire_cdn", times=1)
    r = requests.get(url, timeout=5)
    assert r.status_code == 403 and b"AccessDenied" in r.content
    assert requests.get(url, timeout=5).status_code == 200


def test_redirect_loop_and_chain(fake):
    fake.set_fault(110, "redirect_loop", times=1)
    s = requests.Session()
    s.max_redirects = 8
    with pytest.raises(requests.TooManyRedirects):
        s.get(fake.download_url(11), timeout=5)
    fake.clear_requests()
    fake.set_fault(110, "redirect_chain", n=3, times=1)
    r = requests.get(fake.download_url(11), timeout=5)
    assert r.status_code == 200 and r.content == fake.file_bytes(110)
    assert [h.status_code for h in r.history] == [307, 302, 302, 302]
    assert all(h.url.startswith(fake.cdn_origin) for h in r.history[1:])
    assert len(fake.requests_to("cdn")) == 4


def test_set_fault_validation(fake):
    with pytest.raises(ValueError):
        fake.set_fault(110, "nonsense")
    with pytest.raises(ValueError):
        fake.set_fault(110, "status", code=418)
    with pytest.raises(ValueError):
        fake.set_fault(110, "drip", bps=100, where="api")
    with pytest.raises(KeyError):
        fake.set_fault(424242, "reset")


def test_api_faults(fake):
    fake.set_api_fault(r"/api/v1/models/1\b", 429, headers={"Retry-After": "3"}, times=1)
    r = requests.get(f"{fake.api_url}/models/1", timeout=5)
    assert r.status_code == 429 and r.headers["Retry-After"] == "3" and r.json()["error"]
    assert requests.get(f"{fake.api_url}/models/1", timeout=5).status_code == 200
    fake.set_api_fault(r"/model-versions/", 500, body="<html>oops</html>", times=1)
    r = requests.get(f"{fake.api_url}/model-versions/10", timeout=5)
    assert r.status_code == 500 and r.headers["Content-Type"].startswith("text/html")
    fake.set_api_fault(r"ids=", "reset", times=1)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{fake.api_url}/models?ids=1", timeout=5)
    fake.set_api_fault(r"/models/1$", "stall", delay_s=2, times=1)
    with pytest.raises(requests.Timeout):
        requests.get(f"{fake.api_url}/models/1", timeout=0.3)
    fake.clear_faults()
    assert requests.get(f"{fake.api_url}/models?ids=1", timeout=5).status_code == 200


# --------------------------------------------------------------------------- accounting, speed


def test_bytes_served(fake):
    url = _location(fake, 10, 100)
    size = fake.file_size(100)
    assert fake.bytes_served(100) == 0
    requests.get(url, timeout=10)
    assert fake.bytes_served(100) == size
    requests.get(url, headers={"Range": "bytes=1000000-"}, timeout=10)
    assert fake.bytes_served(100) == 2 * size - 1000000
    requests.head(url, timeout=5)
    assert fake.bytes_served(100) == 2 * size - 1000000
    fake.set_fault(100, "short", after_bytes=5000, times=1)
    with pytest.raises(requests.RequestException):
        _ = requests.get(url, timeout=10).content
    assert fake.bytes_served(100) == 2 * size - 1000000 + 5000
    assert fake.bytes_served(110) == 0


def test_generated_content_is_deterministic_and_fast():
    size = 128 * MIB + 5
    with FakeCivitai() as a, FakeCivitai() as b:
        for f in (a, b):
            f.add_model(1, versions=[dict(id=10, files=[
                dict(id=100, size_bytes=size, seed=42, primary=True, sha256="00" * 32)])])
        assert a.read_range(100, MIB - 10, MIB + 10) == b.read_range(100, MIB - 10, MIB + 10)
        # blocks differ from each other (the block index is mixed in)
        assert a.read_range(100, 0, 64) != a.read_range(100, MIB, MIB + 64)
        url = _location(a, 10)
        t0 = time.monotonic()
        h = hashlib.sha256()
        n = 0
        with requests.get(url, stream=True, timeout=10) as r:
            for chunk in r.iter_content(MIB):
                h.update(chunk)
                n += len(chunk)
        dt = time.monotonic() - t0
        assert n == size
        assert h.hexdigest().upper() == a.file_sha256(100)
        assert size / dt > 50e6, f"only {size / dt / 1e6:.0f} MB/s"


def test_fixture_is_usable(fake_civitai):  # noqa: F811
    assert fake_civitai.api_url.startswith("http://127.0.0.1:")
    assert fake_civitai.api_url.endswith("/api/v1")
    assert fake_civitai.origin + "/api/v1" == fake_civitai.api_url
    u = urllib.parse.urlsplit(fake_civitai.cdn_origin)
    with socket.create_connection((u.hostname, u.port), timeout=2):
        pass


def test_expired_status_configurable_and_cd_name(fake):
    fake.cdn_expired_status = 400
    url = _location(fake, 11)
    fake.expire_cdn_urls()
    assert requests.get(url, timeout=5).status_code == 400
    fake.set_file_meta(110, cd_name="../../evil name.safetensors")
    url = _location(fake, 11)
    fake.set_fault(110, "expire_cdn", code=403, times=1)
    assert requests.get(url, timeout=5).status_code == 403
    r = requests.get(url, timeout=5)
    assert r.headers["Content-Disposition"] == 'attachment; filename="../../evil name.safetensors"'
    fake.set_file_meta(110, cd_name="модель.safetensors")
    r = requests.head(_location(fake, 11), timeout=5)
    assert "filename*=UTF-8''%D0%BC" in r.headers["Content-Disposition"]


# --------------------------------------------------------------------------- bodies past the file


def _raw_body(url: str, limit: int, headers: dict | None = None):
    """(status, headers, bytes read until EOF or `limit`) with http.client, which, unlike a
    download client, keeps reading a body that has no length."""
    conn, resp = _raw(url, headers=headers)
    got = bytearray()
    try:
        while len(got) < limit:
            chunk = resp.read1(256 << 10) if hasattr(resp, "read1") else resp.read(256 << 10)
            if not chunk:
                break
            got += chunk
    finally:
        conn.close()
    return resp.status, resp.headers, bytes(got)


@pytest.mark.parametrize("framing", ["close", "chunked"])
def test_endless_body_has_no_length_and_does_not_end(fake, framing):
    fake.set_fault(110, "endless", framing=framing)
    status, headers, body = _raw_body(_location(fake, 11), limit=8 * MIB)
    assert status == 200 and headers.get("Content-Length") is None
    if framing == "chunked":
        assert headers["Transfer-Encoding"] == "chunked"
    else:
        assert headers["Connection"] == "close"
    assert len(body) >= 8 * MIB  # still going when we stopped reading
    assert body[:20000] == fake.file_bytes(110)  # the file first, then more


def test_endless_body_with_a_range_and_an_end(fake):
    fake.set_fault(100, "endless", framing="chunked", extra_bytes=5000)
    data = fake.file_bytes(100)
    status, headers, body = _raw_body(_location(fake, 10, 100), limit=64 * MIB,
                                      headers={"Range": "bytes=1000-"})
    assert status == 206 and headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
    assert len(body) == len(data) - 1000 + 5000 and body[:len(data) - 1000] == data[1000:]


@pytest.mark.parametrize("declared", ["file", "body"])
def test_overlong_body_goes_past_the_file(fake, declared):
    fake.set_fault(110, "overlong", extra_bytes=3000, declared=declared)
    url = _location(fake, 11)
    u = urllib.parse.urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=5) as sock:
        sock.sendall(f"GET {u.path}?{u.query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        raw = b""
        while chunk := sock.recv(1 << 16):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
    assert length == 20000 + (3000 if declared == "body" else 0)
    assert len(body) == 23000 and body[:20000] == fake.file_bytes(110)


# --------------------------------------------------------------------------- by hash


def test_by_hash_get_takes_any_of_the_files_hashes_in_any_case(fake):
    v = fake.version_json(11)
    hashes = v["files"][0]["hashes"]
    for value in (hashes["SHA256"].lower(), hashes["AutoV2"], hashes["BLAKE3"].lower(), hashes["CRC32"]):
        r = requests.get(f"{fake.api_url}/model-versions/by-hash/{value}", timeout=5)
        assert r.status_code == 200 and r.json() == v
    r = requests.get(f"{fake.api_url}/model-versions/by-hash/{'0' * 64}", timeout=5)
    assert r.status_code == 404 and r.json() == {"error": "Model not found"}


def test_by_hash_knows_only_hashed_files_and_the_oldest_of_duplicates(fake):
    fake.add_model(5, name="Reupload", versions=[dict(id=50, published_at="2025-01-01T00:00:00.000Z", files=[
        dict(id=500, name="same.safetensors", data=b"fp32-bytes" * 1000, primary=True)])])
    sha = fake.file_sha256(101)
    assert fake.file_sha256(500) == sha
    r = requests.get(f"{fake.api_url}/model-versions/by-hash/{sha}", timeout=5)
    assert r.json()["id"] == 10  # published 2024: before the re-upload
    fake.add_model(6, versions=[dict(id=60, files=[dict(id=600, name="new.safetensors", size_bytes=10,
                                                         primary=True, hashed=False)])])
    r = requests.get(f"{fake.api_url}/model-versions/by-hash/{fake.file_sha256(600)}", timeout=5)
    assert r.status_code == 404
    fake.hash_file(600)
    r = requests.get(f"{fake.api_url}/model-versions/by-hash/{fake.file_sha256(600)}", timeout=5)
    assert r.json()["id"] == 60


def test_by_hash_post_answers_a_version_per_matched_file(fake):
    wanted = [fake.file_sha256(110).lower(), "AB" * 32, fake.file_sha256(100), fake.file_sha256(101)]
    r = requests.post(f"{fake.api_url}/model-versions/by-hash", json=wanted, timeout=5)
    assert r.status_code == 200
    got = r.json()
    assert isinstance(got, list) and sorted(v["id"] for v in got) == [10, 10, 11]  # the unknown one is absent
    assert got[[v["id"] for v in got].index(11)] == fake.version_json(11)
    assert json.loads(fake.requests_to("api", method="POST")[-1].body) == wanted
    assert requests.post(f"{fake.api_url}/model-versions/by-hash", json=[], timeout=5).json() == []


@pytest.mark.parametrize("body, words", [
    (["AB" * 32] * 101, "Too many hashes"),
    (["abc"], "Invalid hash"),
    ({"hashes": []}, "Expected array"),
])
def test_by_hash_post_refuses_bad_input_with_400(fake, body, words):
    r = requests.post(f"{fake.api_url}/model-versions/by-hash", json=body, timeout=5)
    assert r.status_code == 400
    assert r.json()["error"] == f"Request must include an array of SHA256 Hashes. {words}"


def test_post_elsewhere_is_not_allowed(fake):
    assert requests.post(f"{fake.api_url}/models/1", json=[], timeout=5).status_code == 405
    assert requests.post(_location(fake, 11), data=b"x", timeout=5).status_code == 405


# --------------------------------------------------------------------------- file types


def test_a_checkpoint_with_its_vae_fp16_and_fp32(fake):
    fake.add_model(7, name="Full", versions=[dict(id=70, files=[
        dict(id=700, name="full.safetensors", size_bytes=1000, primary=True, fp="fp16", size="pruned"),
        dict(id=701, name="full_fp32.safetensors", size_bytes=2000, fp="fp32", size="full"),
        dict(id=702, name="full.vae.safetensors", size_bytes=300, type="VAE", fp=None, size=None),
        dict(id=703, name="full.ckpt", size_bytes=400, type="Pruned Model", format="PickleTensor", fp="fp16"),
    ])])
    listed = {f["id"]: f for f in fake.model_json(7)["modelVersions"][0]["files"]}
    version = {f["id"]: f for f in fake.version_json(70)["files"]}
    assert listed[702]["type"] == "VAE" and listed[702]["metadata"] == {"format": "SafeTensor"}  # no nulls
    assert version[702]["metadata"] == {"format": "SafeTensor", "size": None, "fp": None}
    assert listed[703]["type"] == "Pruned Model" and listed[703]["metadata"]["format"] == "PickleTensor"
    assert [i for i, f in version.items() if f["primary"]] == [700]
    assert version[701]["metadata"] == {"format": "SafeTensor", "size": "full", "fp": "fp32"}
    # each file's own downloadUrl answers with that file
    for fid, f in version.items():
        r = requests.get(f["downloadUrl"], allow_redirects=False, timeout=5)
        assert f"/files/{fid}/" in r.headers["Location"], (fid, f["downloadUrl"])
    assert version[702]["downloadUrl"].endswith("?type=VAE&format=SafeTensor")


# --------------------------------------------------------------------------- answers that mean "wait"


def test_an_unhashed_file_has_no_hashes_until_civitai_hashes_it(fake):
    fake.add_model(8, versions=[dict(id=80, files=[dict(id=800, name="fresh.safetensors", size_bytes=10,
                                                         primary=True, hashed=False)])])
    f = fake.version_json(80)["files"][0]
    assert f["hashes"] == {} and f["pickleScanResult"] == f["virusScanResult"] == "Pending"
    assert f["scannedAt"] is None
    fake.hash_file(800)
    f = fake.version_json(80)["files"][0]
    assert f["hashes"]["SHA256"] == fake.file_sha256(800) and f["pickleScanResult"] == "Success"


def test_early_access_answers_like_civitai(fake):
    deadline = "2099-01-01T00:00:00.000Z"
    fake.add_version(1, dict(id=13, early_access_ends_at=deadline, files=[
        dict(id=130, name="ea.safetensors", size_bytes=100, primary=True)]))
    r = requests.get(fake.download_url(13), allow_redirects=False, timeout=5)
    assert r.status_code == 403 and r.json() == {
        "error": "Early Access", "deadline": deadline,
        "message": "This asset is in Early Access. You can use Buzz access it now!"}
    listed = [v for v in fake.model_json(1)["modelVersions"] if v["id"] == 13][0]
    assert listed["earlyAccessDeadline"] == deadline and listed["availability"] == "EarlyAccess"


def test_downloads_disabled_by_the_creator(fake):
    fake.add_model(9, versions=[dict(id=90, usage_control="Generation", files=[
        dict(id=900, name="gen.safetensors", size_bytes=10, primary=True)])])
    assert fake.version_json(90)["usageControl"] == "Generation"
    r = requests.get(fake.download_url(90), allow_redirects=False, timeout=5)
    assert r.status_code == 401 and r.json() == {
        "error": "Unauthorized", "message": "The creator of this asset has disabled downloads on this file"}


def test_a_status_fault_can_play_the_quota(fake):
    fake.set_fault(110, "status", code=429, quota=True, times=1)
    r = requests.get(fake.download_url(11), allow_redirects=False, timeout=5)
    assert r.status_code == 429 and "unusual amount of downloading" in r.json()["error"]


def test_the_daily_download_quota(fake):
    fake.download_quota = 2
    assert _location(fake, 10) and _location(fake, 11)
    r = requests.get(fake.download_url(10), allow_redirects=False, timeout=5)
    assert r.status_code == 429 and "Retry-After" not in r.headers
    assert r.json() == {"error": "We've noticed an unusual amount of downloading from your account. "
                                 "Contact support@civitai.com or come back later."}
    assert fake.downloads_resolved == 2
    fake.download_quota = None
    assert _location(fake, 10)


@pytest.mark.parametrize("kind, status, ctype, words", [
    ("404", 404, "application/json", b'{"error": "Model not found"}'),
    ("html_403", 403, "text/html", b"Just a moment..."),
    ("500", 500, "application/json", b"Failed to fetch model version details"),
    ("503", 503, "text/html", b"503 Service Unavailable"),
])
def test_metadata_faults_for_the_first_requests(fake, kind, status, ctype, words):
    fake.metadata_fault(kind, times=2)
    for _ in range(2):
        r = requests.get(f"{fake.api_url}/model-versions/11", timeout=5)
        assert r.status_code == status and r.headers["Content-Type"].startswith(ctype) and words in r.content
    assert requests.get(f"{fake.api_url}/models/1", timeout=5).status_code == 200
    fake.metadata_fault(kind, times=1, path=r"/models/1$")
    assert requests.get(f"{fake.api_url}/model-versions/11", timeout=5).status_code == 200
    assert requests.get(f"{fake.api_url}/models/1", timeout=5).status_code == status


# --------------------------------------------------------------------------- sockets


def test_answers_go_out_with_nodelay_and_in_one_write(fake, monkeypatch):
    import socketserver

    writes: list[bytes] = []
    original = socketserver._SocketWriter.write

    def record(self, b):
        writes.append(bytes(b))
        return original(self, b)

    monkeypatch.setattr(socketserver._SocketWriter, "write", record)
    with requests.Session() as s:  # kept alive: where Nagle and delayed ACKs would add 40 ms
        assert s.get(f"{fake.api_url}/models/1", timeout=5).status_code == 200
        with fake._api.conns_lock:
            conns = list(fake._api.conns)
        assert conns and all(c.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for c in conns)
        writes.clear()
        r = s.get(f"{fake.api_url}/model-versions/11", timeout=5)
        assert len(writes) == 1 and writes[0].startswith(b"HTTP/1.1 200") and writes[0].endswith(r.content)
        url = _location(fake, 11)
        writes.clear()
        r = s.get(url, timeout=5)  # a small file: headers and bytes together
        assert r.content == fake.file_bytes(110)
        assert len(writes) == 1 and writes[0].endswith(r.content)


def test_images_are_served_from_the_cdn_origin_with_their_type_and_passing_faults(fake):
    png = b"\x89PNG\r\n\x1a\n" + b"p" * 500
    entry = fake.add_image(png, "image/png", name="a b.png", nsfw_level=4, fail_times=2, fail_status=502)
    assert entry["url"].startswith(fake.cdn_origin + "/images/") and entry["url"].endswith("/a%20b.png")
    assert (entry["nsfwLevel"], entry["type"]) == (4, "image")
    assert [requests.get(entry["url"], timeout=5).status_code for _ in range(2)] == [502, 502]
    r = requests.get(entry["url"], timeout=5)
    assert (r.status_code, r.headers["Content-Type"], r.content) == (200, "image/png", png)
    head = requests.head(entry["url"], timeout=5)
    assert head.headers["Content-Length"] == str(len(png)) and head.content == b""
    assert requests.get(fake.cdn_origin + "/images/00ff/width=450/x.png", timeout=5).status_code == 404
    # Through the version JSON, as Civitai lists a version's images.
    fake.add_model(7, versions=[dict(id=70, extra={"images": [entry]})])
    images = requests.get(f"{fake.api_url}/model-versions/70", timeout=5).json()["images"]
    assert images == [entry]
