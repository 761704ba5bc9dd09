"""The transfer side of workers/civitai.py against the local fake (real HTTP on loopback): a range of
a signed link, a fresh link from Civitai, and a connection kept alive for the next range."""
from __future__ import annotations

import pytest

from tests.fakeciv import running_fake
from workers.civitai import CdnRefused, CivitaiClient, CivitaiError

KEY = "test-key-0123456789"
MiB = 1 << 20


@pytest.fixture
def fake():
    with running_fake(KEY) as fake:
        fake.add_model(1, versions=[dict(id=11, published_at="2025-01-01T00:00:00.000Z",
                                         files=[dict(id=111, name="m.safetensors", size_bytes=3 * MiB + 7,
                                                     primary=True)])])
        connections = []
        accept = fake._cdn.process_request
        fake._cdn.process_request = lambda req, addr: (connections.append(addr), accept(req, addr))
        fake.cdn_connections = connections
        yield fake


@pytest.fixture
def client(fake):
    return CivitaiClient(fake.api_url, api_key=KEY, timeout_s=5)


def read_all(dl) -> bytes:
    out = bytearray()
    buf = bytearray(1 << 16)
    view = memoryview(buf)
    while True:
        n = dl.readinto(view)
        if not n:
            return bytes(out)
        out += view[:n]


def test_fresh_link_is_civitais_redirect_not_followed(fake, client):
    link = client.fresh_link(11, 111)
    assert link.startswith(fake.cdn_origin) and "sig=" in link
    assert fake.requests_to("cdn") == []  # not a byte asked of the file host
    api = fake.requests_to("api", path_re="/api/download/")
    assert len(api) == 1 and api[0].headers.get("Authorization") == f"Bearer {KEY}"


def test_fresh_link_reports_civitais_refusal(fake, client):
    fake.set_fault(111, "status", code=429, quota=True)
    with pytest.raises(CivitaiError) as err:
        client.fresh_link(11, 111)
    assert err.value.reason == "quota" and err.value.wait


def test_open_range_asks_for_exactly_that_part_without_the_key(fake, client):
    link = client.fresh_link(11, 111)
    session = client.cdn_session()
    dl = client.open_range(session, link, MiB, 2 * MiB + 5, '"other"', read_timeout_s=5, subject="model version 11")
    assert (dl.status, dl.total_size) == (200, 3 * MiB + 7)  # If-Range did not match: the whole file
    dl.close()
    etag = fake._files[111].etag
    dl = client.open_range(session, link, MiB, 2 * MiB + 5, etag, read_timeout_s=5, subject="model version 11")
    assert (dl.status, dl.start, dl.content_length, dl.total_size) == (206, MiB, MiB + 5, 3 * MiB + 7)
    assert read_all(dl) == fake.read_range(111, MiB, 2 * MiB + 5)
    dl.release()
    cdn = fake.requests_to("cdn")
    assert cdn[-1].headers.get("Range") == f"bytes={MiB}-{2 * MiB + 4}"
    assert cdn[-1].headers.get("If-Range") == etag
    assert all(r.headers.get("Authorization") is None and r.headers.get("Cookie") is None for r in cdn)
    assert "sig=" not in repr(dl) and "sig=" not in dl.url


def test_open_range_raises_cdn_refused_for_an_expired_link(fake, client):
    link = client.fresh_link(11, 111)
    fake.expire_cdn_urls()
    with pytest.raises(CdnRefused) as err:
        client.open_range(client.cdn_session(), link, 0, MiB, None, read_timeout_s=5, subject="model version 11")
    assert err.value.status == 403


def test_open_range_follows_the_hosts_redirects(fake, client):
    link = client.fresh_link(11, 111)
    fake.set_fault(111, "redirect_chain", times=1, n=2)
    dl = client.open_range(client.cdn_session(), link, 0, MiB, None, read_timeout_s=5, subject="model version 11")
    assert dl.status == 206 and read_all(dl) == fake.read_range(111, 0, MiB)
    dl.close()


def test_open_range_never_goes_back_to_civitai(fake, client):
    with pytest.raises(CivitaiError):
        client.open_range(client.cdn_session(), fake.download_url(11, 111), 0, MiB, None, read_timeout_s=5,
                          subject="model version 11")
    assert fake.requests_to("api") == []  # the key never rides a range request


def test_a_range_read_to_its_end_keeps_the_connection_for_the_next(fake, client):
    link = client.fresh_link(11, 111)
    session = client.cdn_session()
    for start in (0, MiB, 2 * MiB):
        dl = client.open_range(session, link, start, start + MiB, None, read_timeout_s=5, subject="v")
        assert read_all(dl) == fake.read_range(111, start, start + MiB)
        dl.release()
    assert len(fake.cdn_connections) == 1  # three ranges, one TCP connection


@pytest.mark.parametrize("extra_after_s", [0, 0.3], ids=["extra-bytes-waiting", "extra-bytes-late"])
def test_a_range_left_half_read_or_followed_by_more_bytes_is_not_reused(fake, client, extra_after_s):
    """Stray bytes already on the socket when the range is released: the connection is closed.
    Stray bytes that come only after it went back to the pool (no check can see them coming)
    spoil the next request's answer before it starts: that request goes once more on a new
    connection instead of failing the range."""
    link = client.fresh_link(11, 111)
    session = client.cdn_session()
    dl = client.open_range(session, link, 0, 2 * MiB, None, read_timeout_s=5, subject="v")
    dl.readinto(memoryview(bytearray(1000)))
    dl.release()  # unread body: closed, never handed to the next request
    fake.set_fault(111, "overlong", times=1, extra_bytes=4096, extra_after_s=extra_after_s)
    dl = client.open_range(session, link, 0, MiB, None, read_timeout_s=5, subject="v")
    assert read_all(dl) == fake.read_range(111, 0, MiB)
    dl.release()
    dl = client.open_range(session, link, MiB, 2 * MiB, None, read_timeout_s=5, subject="v")
    assert read_all(dl) == fake.read_range(111, MiB, 2 * MiB)  # a clean answer on a new connection
    dl.release()
    assert len(fake.cdn_connections) == 3
