"""The real gevent server in-process, over real sockets: what it refuses before the app runs, and
the options of the connections it accepts."""
from __future__ import annotations

import http.client
import json
import socket
import time

import gevent
import gevent.socket
import pytest
from gevent import pywsgi

from web import ws
from web.openapi import MAX_HEADER_LINE_BYTES, MAX_HEADERS, MAX_REQUEST_LINE_BYTES
from web.ws import make_server


def _listener():
    sock = gevent.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


@pytest.fixture
def server(env):
    srv = make_server(env.cfg, env.app, listener=_listener())
    srv.start()
    yield srv
    srv.stop(timeout=2)


def exchange(port: int, data: bytes, timeout: float = 10.0) -> tuple[int, dict, bytes]:
    """Send raw bytes, read until the server closes; (status, headers, body) of the one answer."""
    conn = gevent.socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        conn.sendall(data)
        received = b""
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            received += chunk
            head, sep, rest = received.partition(b"\r\n\r\n")
            if sep and b"content-length:" in head.lower():
                length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length:")))
                if len(rest) >= length:
                    break
    finally:
        conn.close()
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def request_bytes(path="/health", headers=(), request_line=None) -> bytes:
    lines = [request_line or f"GET {path} HTTP/1.1", "Host: 127.0.0.1:8000", *headers, "", ""]
    return "\r\n".join(lines).encode("latin-1")


def test_the_limits_the_api_states_are_the_servers():
    assert (MAX_REQUEST_LINE_BYTES, MAX_HEADER_LINE_BYTES, MAX_HEADERS) == (
        pywsgi.MAX_REQUEST_LINE, http.client._MAXLINE, http.client._MAXHEADERS)


def test_the_server_answers_a_plain_request(server):
    status, headers, body = exchange(server.server_port, request_bytes(headers=["Connection: close"]))
    assert status == 200 and json.loads(body)["status"] == "ok"


@pytest.mark.parametrize("case,status,words", [
    ("header_100k", 431, "header line is longer than 65536 bytes"),
    ("101_headers", 431, "more than 100 headers"),
    ("request_line_9k", 414, "request line is longer than 8192 bytes"),
    ("garbage_request_line", 400, "malformed HTTP request"),
    ("bad_content_length", 400, "malformed HTTP request"),
    ("bad_http_version", 400, "malformed HTTP request"),
])
def test_what_the_server_refuses_is_a_json_error_that_names_the_limit(server, case, status, words):
    data = {
        "header_100k": request_bytes(headers=["X-Big: " + "a" * 100_000]),
        "101_headers": request_bytes(headers=[f"X-H{i}: {i}" for i in range(101)]),
        "request_line_9k": request_bytes(path="/health?pad=" + "a" * 9000),
        "garbage_request_line": request_bytes(request_line="HELLO"),
        "bad_content_length": request_bytes(request_line="POST /api/jobs HTTP/1.1",
                                            headers=["Content-Length: lots"]),
        "bad_http_version": request_bytes(request_line="GET /health HTTP/7.0"),
    }[case]
    got, headers, body = exchange(server.server_port, data)
    assert got == status, (got, body[:200])
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    assert words in json.loads(body)["error"]


def test_a_broken_chunked_body_is_a_json_400(server, env):
    data = request_bytes(request_line="POST /api/jobs HTTP/1.1", headers=[
        f"Authorization: Bearer {env.token}", "Content-Type: application/json", "Transfer-Encoding: chunked",
        "Connection: close"]) + b"zz\r\n{}\r\n"
    status, headers, body = exchange(server.server_port, data)
    assert status == 400 and headers["content-type"] == "application/json"
    assert "could not be read" in json.loads(body)["error"]
    assert env.control.calls == []


def test_a_refused_request_is_read_to_its_end_so_the_answer_is_not_reset(server, monkeypatch):
    # Closing a connection with unread data sends a TCP reset, and a client that reads its answer
    # after the reset arrived gets ECONNRESET instead of the answer.
    monkeypatch.setattr(ws, "LINGER_S", 0.5)
    listener = _listener()
    client = gevent.socket.create_connection(listener.getsockname())
    conn, peer = listener.accept()
    handler = gevent.spawn(server.handle, conn, peer)
    client.sendall(request_bytes(headers=["X-Big: " + "b" * 300_000]))
    handler.join(10)  # the server has answered and closed its side
    assert handler.dead
    received = b""
    while chunk := client.recv(65536):
        received += chunk
    assert received.startswith(b"HTTP/1.1 431 ")
    assert "65536" in json.loads(received.partition(b"\r\n\r\n")[2])["error"]
    client.close()
    listener.close()


def test_accepted_connections_have_nagle_off(server):
    # Nagle's algorithm holds the body of an answer back until the client ACKs its headers, which
    # a client delays by ~40 ms on a kept-alive connection (bench/web.py --latency measures it).
    listener = _listener()
    client = gevent.socket.create_connection(listener.getsockname())
    conn, peer = listener.accept()
    assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0  # the OS default
    handler = gevent.spawn(server.handle, conn, peer)
    deadline = time.monotonic() + 5
    while not conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY):
        assert time.monotonic() < deadline, "TCP_NODELAY never set"
        gevent.sleep(0.01)
    client.sendall(request_bytes(headers=["Connection: close"]))
    received = b""
    while chunk := client.recv(65536):
        received += chunk
    assert received.startswith(b"HTTP/1.1 200")
    handler.join(5)
    client.close()
    listener.close()
