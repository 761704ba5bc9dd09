"""The HTTP(S) server and the WebSocket handshake: the only module that imports geventwebsocket.

gevent-websocket upgrades a connection before the application runs, so the token and Host are
checked here, in the handshake: a refused client gets a 401/403 answer and never a WebSocket.
A request the server itself refuses (headers too large, not HTTP) gets a JSON error here too.
With tls_cert/tls_key every connection is TLS (1.2 at least, ipc/tlsconf.py); one that begins
in plain HTTP is sent to its https:// address instead of failing a handshake in silence.
"""
from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import ssl
import struct
import time

from gevent.pywsgi import WSGIHandler, WSGIServer
from geventwebsocket.exceptions import WebSocketError
from geventwebsocket.handler import WebSocketHandler
from geventwebsocket.websocket import WebSocket

from web.app import WS_AUTHORIZE_KEY
from web.auth import LOCAL_ADDR_KEY, redact_tokens
from web.errors import REASONS
from web.openapi import MAX_HEADER_LINE_BYTES, MAX_HEADERS, MAX_REQUEST_LINE_BYTES

SUBPROTOCOL = "bearer"
# After refusing a request whose rest is still unread, read it (within these bounds) before the
# close: closing with unread data sends a TCP reset, which can destroy the answer on its way.
LINGER_S = 2.0
LINGER_MAX_BYTES = 4 * 1024 * 1024
# A TLS client says its hello at once; one that does not within this long is dropped (the
# request-reading part of pywsgi has no timeout of its own to fall back on).
HANDSHAKE_TIMEOUT_S = 10.0
TLS_HANDSHAKE_RECORD = 0x16  # the first byte of every TLS ClientHello
PLAIN_HEAD_MAX_BYTES = 8192
_HOST_RE = re.compile(r"^(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::\d{1,5})?$")
_TLS_PROBLEMS = (
    ("CERTIFICATE_UNKNOWN", "the client does not trust our certificate (install it, or its CA, on the client)"),
    ("UNKNOWN_CA", "the client does not trust our certificate's issuer"),
    ("BAD_CERTIFICATE", "the client refused our certificate"),
    ("UNSUPPORTED_PROTOCOL", "the client offers only TLS older than 1.2"),
    ("VERSION_TOO_LOW", "the client offers only TLS older than 1.2"),
    ("NO_SHARED_CIPHER", "no cipher in common with the client"),
    ("WRONG_VERSION_NUMBER", "not a TLS client"),
)

log = logging.getLogger("web.server")


def send_then_drain(sock, data: bytes) -> bool:
    """Send a whole answer, then read (within bounds) what the client still sends before the
    caller closes; whether the answer went out."""
    try:
        sock.sendall(data)
    except OSError:
        return False
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LINGER_S
        drained = 0
        while drained < LINGER_MAX_BYTES:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                break
            drained += len(chunk)
    except OSError:  # socket.timeout is one: the client kept sending, or went away
        pass
    return True


def refusal_bytes(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A whole HTTP answer with a JSON error, for the moments before any route runs."""
    body = json.dumps({"error": message}).encode("utf-8")
    head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nX-Content-Type-Options: nosniff\r\nCache-Control: no-store\r\n"
            + "".join(f"{name}: {value}\r\n" for name, value in headers) + "Connection: close\r\n\r\n")
    return head.encode("latin-1") + body


# pywsgi's texts quote the raw request line, which may hold anything: only their kind is kept.
_REQUEST_PROBLEMS = (
    ("Invalid http version", "the HTTP version is not one this server speaks (use HTTP/1.1)"),
    ("Invalid Content-Length", "the Content-Length header is not a number of bytes"),
    ("invalid literal for int()", "the Content-Length header is not a number of bytes"),
    ("Unexpected Content-Length", "a HEAD request cannot have a body"),
    ("Invalid headers status", "the request headers cannot be read"),
)


def client_error(exc: BaseException) -> tuple[int, str]:
    """(status, message) for what pywsgi found wrong with a request before any route ran."""
    text = str(exc)
    if isinstance(exc, http.client.LineTooLong) or "Line too long" in text:
        return 431, f"a request header line is longer than {MAX_HEADER_LINE_BYTES} bytes"
    if isinstance(exc, http.client.HTTPException) and "more than" in text and "headers" in text:
        return 431, f"the request has more than {MAX_HEADERS} headers"
    problem = next((says for kind, says in _REQUEST_PROBLEMS if kind in text),
                   "the request line is not 'METHOD /path HTTP/1.1'")
    return 400, f"malformed HTTP request: {problem}"


class _WebSocket(WebSocket):
    # No slots of its own, so that __class__ can be swapped on a live WebSocket (the layouts must
    # match). geventwebsocket ships no types: mypy sees neither the base's slots nor their types.
    __slots__ = ()
    closed: bool  # the base's slot

    def close(self, code=1000, message=b""):
        # gevent-websocket's own close() sends the text as the whole payload and drops the code;
        # RFC 6455 wants the 2-byte code first, or a browser reads the text as the code.
        if self.closed:
            return
        if isinstance(message, str):
            message = message.encode("utf-8")
        try:
            self.send_frame(struct.pack("!H", int(code)) + message[:120], opcode=self.OPCODE_CLOSE)
        except WebSocketError:
            pass  # the peer is gone; the socket is closed anyway
        finally:
            self.closed = True  # type: ignore[misc]
            self.stream = None  # type: ignore[misc]
            self.raw_write = None  # type: ignore[misc]
            self.raw_read = None  # type: ignore[misc]


class DaemonHandler(WebSocketHandler):
    def handle_one_request(self):
        result = super().handle_one_request()
        if isinstance(result, tuple) and str(result[0]) == "414":  # pywsgi's answer has no body
            return self._refuse(414, f"the request line is longer than {MAX_REQUEST_LINE_BYTES} bytes")
        return result

    def _handle_client_error(self, ex):
        # pywsgi's hook for a request it cannot parse; its own answer is an empty 400, and for
        # too many headers it prints a traceback first.
        if isinstance(ex, OSError):
            # A broken body, found while the app reads it: pywsgi goes on to answer through
            # _send_error_response_if_possible, which knows whether an answer has begun.
            log.info("broken request body from %s: %s", self.client_address[0] if self.client_address else "?",
                     type(ex).__name__)
            return "400", b""
        status, message = client_error(ex)
        log.info("refused a request from %s: %s", self.client_address[0] if self.client_address else "?", message)
        return self._refuse(status, message)

    def _send_error_response_if_possible(self, error_code):
        # The other errors pywsgi answers itself (a broken chunked body, a crash outside the app).
        if self.response_length:
            self.close_connection = True
            return
        message = "malformed request body" if error_code == 400 else "internal server error"
        body = json.dumps({"error": message}).encode("utf-8")
        try:
            self.start_response(f"{error_code} {REASONS.get(error_code, 'Error')}",
                                [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                                 ("Connection", "close")])
            self.write(body)
        except OSError:
            self.close_connection = True

    def _refuse(self, status: int, message: str) -> tuple[str, bytes]:
        """Answer now, then read what is left of the request before handle() closes."""
        data = refusal_bytes(status, message)
        if send_then_drain(self.socket, data):
            self.response_length = len(data)
        self.close_connection = True
        return str(status), b""

    def get_environ(self):
        environ = super().get_environ()
        try:
            environ[LOCAL_ADDR_KEY] = self.socket.getsockname()[0]
        except (OSError, AttributeError, IndexError):
            pass
        return environ

    def upgrade_connection(self):
        authorize = getattr(self.server, "ws_authorize", None)
        refusal = authorize(self.environ) if authorize else None
        if refusal is not None:
            body = json.dumps({"error": refusal.error}).encode("utf-8")
            headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
            headers += list(refusal.headers.items())
            self.start_response(f"{refusal.status} {REASONS.get(refusal.status, 'Error')}", headers)
            return [body]
        result = super().upgrade_connection()
        if getattr(self, "websocket", None) is not None and type(self.websocket) is WebSocket:
            self.websocket.__class__ = _WebSocket
        return result

    def format_request(self):
        # Tokens never travel in URLs here, but a user may still paste one into a query string.
        return redact_tokens(super().format_request())

    def log_request(self):
        # WebSocketHandler skips 101s; an access log should show WebSocket sessions too.
        WSGIHandler.log_request(self)


class _Application:
    """The Bottle app, plus the hook gevent-websocket asks which subprotocol to answer with."""

    def __init__(self, app):
        self.app = app

    def __call__(self, environ, start_response):
        return self.app(environ, start_response)

    @staticmethod
    def app_protocol(path):
        # gevent-websocket echoes it only when the client offered it ("bearer", "<jwt>").
        return SUBPROTOCOL if path == "/ws" else None


def plain_http_answer(head: bytes) -> tuple[int, bytes]:
    """The answer to a plain HTTP request on the HTTPS port: a GET or HEAD is sent to the same
    path over https://, anything else is told where to go."""
    line, _, rest = head.partition(b"\r\n")
    parts = line.decode("latin-1").split(" ")
    host = next((h.split(b":", 1)[1].strip().decode("latin-1") for h in rest.split(b"\r\n")
                 if h.lower().startswith(b"host:")), "")
    path = parts[1] if len(parts) == 3 and parts[1].startswith("/") and len(parts[1]) <= 2048 else "/"
    if not _HOST_RE.match(host):
        return 400, refusal_bytes(400, "this server speaks HTTPS only: use https://")
    target = f"https://{host}{path}"
    if parts[0] in ("GET", "HEAD"):
        return 301, refusal_bytes(301, f"this server speaks HTTPS only: use {target}", (("Location", target),))
    return 400, refusal_bytes(400, f"this server speaks HTTPS only: use {target}")


def tls_problem(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no TLS handshake within {HANDSHAKE_TIMEOUT_S:.0f} s"
    text = f"{getattr(exc, 'reason', '') or ''} {exc}"
    return next((says for kind, says in _TLS_PROBLEMS if kind in text), type(exc).__name__ + ": " + str(exc)[:200])


def _read_head(sock) -> bytes:
    head = b""
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
    while b"\r\n\r\n" not in head and len(head) < PLAIN_HEAD_MAX_BYTES:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(PLAIN_HEAD_MAX_BYTES - len(head))
        if not chunk:
            break
        head += chunk
    return head


class DaemonServer(WSGIServer):
    def wrap_socket_and_handle(self, client_socket, address):
        """gevent's TLS path, with the handshake bounded in time, plain HTTP answered, and a
        failed handshake one log line instead of a traceback on stderr."""
        peer = address[0] if address else "?"
        try:
            client_socket.settimeout(HANDSHAKE_TIMEOUT_S)
            first = client_socket.recv(1, socket.MSG_PEEK)
            if first and first[0] != TLS_HANDSHAKE_RECORD:
                status, answer = plain_http_answer(_read_head(client_socket))
                log.info("a plain HTTP request from %s on the HTTPS port: answered %d", peer, status)
                send_then_drain(client_socket, answer)
                client_socket.close()
                return None
            if not first:
                client_socket.close()
                return None
            ssl_socket = self.wrap_socket(client_socket, **self.ssl_args)
        except (ssl.SSLError, OSError) as exc:
            log.info("TLS handshake with %s failed: %s", peer, tls_problem(exc))
            client_socket.close()
            return None
        try:
            ssl_socket.settimeout(None)  # as a plain connection has it: pywsgi keeps its own pace
            return self.handle(ssl_socket, address)
        finally:
            ssl_socket.close()

    def handle(self, sock, address):
        # Nagle's algorithm holds back the body (pywsgi sends it after the headers, in a second
        # write) until the client ACKs the headers, and a client delays that ACK: ~40 ms for every
        # request on a kept-alive connection. Each answer is written whole, so nothing is gained.
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):  # not TCP
            pass
        super().handle(sock, address)


def make_server(cfg, app, listener=None, ssl_context: ssl.SSLContext | None = None) -> WSGIServer:
    """The gevent server for `app` on cfg.bind:cfg.active_port (or an open `listener` socket),
    over TLS with `ssl_context` (ipc/tlsconf.server_context)."""
    access_log = logging.getLogger("web.access")
    error_log = logging.getLogger("web.error")
    tls = {"ssl_context": ssl_context} if ssl_context is not None else {}
    server = DaemonServer(
        listener or (cfg.bind, cfg.active_port),
        _Application(app),
        handler_class=DaemonHandler,
        log=access_log,
        error_log=error_log,
        **tls,
    )
    server.ws_authorize = app.config.get(WS_AUTHORIZE_KEY)
    return server
