"""The HTTP server and the WebSocket handshake: the only module that imports geventwebsocket.

gevent-websocket upgrades a connection before the application runs, so the token and Host are
checked here, in the handshake: a refused client gets a 401/403 answer and never a WebSocket.
"""
from __future__ import annotations

import json
import logging
import struct

from gevent.pywsgi import WSGIHandler, WSGIServer
from geventwebsocket.exceptions import WebSocketError
from geventwebsocket.handler import WebSocketHandler
from geventwebsocket.websocket import WebSocket

from web.app import WS_AUTHORIZE_KEY
from web.auth import LOCAL_ADDR_KEY, redact_tokens
from web.errors import REASONS

SUBPROTOCOL = "bearer"


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


def make_server(cfg, app, listener=None) -> WSGIServer:
    """The gevent server for `app` on cfg.bind:cfg.active_port (or an open `listener` socket)."""
    access_log = logging.getLogger("web.access")
    error_log = logging.getLogger("web.error")
    server = WSGIServer(
        listener or (cfg.bind, cfg.active_port),
        _Application(app),
        handler_class=DaemonHandler,
        log=access_log,
        error_log=error_log,
    )
    server.ws_authorize = app.config.get(WS_AUTHORIZE_KEY)
    return server
