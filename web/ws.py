"""The HTTP server and the WebSocket handshake: the only module that imports geventwebsocket.

gevent-websocket upgrades a connection before the application runs, so the token and Host are
checked here, in the handshake: a refused client gets a 401/403 answer and never a WebSocket.
A request the server itself refuses (headers too large, not HTTP) gets a JSON error here too.
"""
from __future__ import annotations

import http.client
import json
import logging
import socket
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

log = logging.getLogger("web.server")


def refusal_bytes(status: int, message: str) -> bytes:
    """A whole HTTP answer with a JSON error, for the moments before any route runs."""
    body = json.dumps({"error": message}).encode("utf-8")
    head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nX-Content-Type-Options: nosniff\r\nCache-Control: no-store\r\n"
            "Connection: close\r\n\r\n")
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
    __slots__ = ()

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
            self.closed = True
            self.stream = None
            self.raw_write = None
            self.raw_read = None


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
        try:
            self.socket.sendall(data)
            self.response_length = len(data)
            self.socket.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_S
            drained = 0
            while drained < LINGER_MAX_BYTES:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.socket.settimeout(left)
                chunk = self.socket.recv(65536)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError:  # socket.timeout is one: the client kept sending, or went away
            pass
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


class DaemonServer(WSGIServer):
    def handle(self, sock, address):
        # Nagle's algorithm holds back the body (pywsgi sends it after the headers, in a second
        # write) until the client ACKs the headers, and a client delays that ACK: ~40 ms for every
        # request on a kept-alive connection. Each answer is written whole, so nothing is gained.
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):  # not TCP
            pass
        super().handle(sock, address)


def make_server(cfg, app, listener=None) -> WSGIServer:
    """The gevent server for `app` on cfg.bind:cfg.active_port (or an open `listener` socket)."""
    access_log = logging.getLogger("web.access")
    error_log = logging.getLogger("web.error")
    server = DaemonServer(
        listener or (cfg.bind, cfg.active_port),
        _Application(app),
        handler_class=DaemonHandler,
        log=access_log,
        error_log=error_log,
    )
    server.ws_authorize = app.config.get(WS_AUTHORIZE_KEY)
    return server
