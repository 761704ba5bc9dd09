"""Who may talk to the web process: the Host check (DNS rebinding) and the bearer JWT, as one Bottle plugin."""
from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from typing import NamedTuple

from bottle import request

from ipc.logsetup import redact
from ipc.tokens import TokenError, verify_token
from web.errors import json_error

MAX_BODY_BYTES = 1024 * 1024
VERIFIED_CACHE_SIZE = 256
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
WILDCARD_BINDS = frozenset({"0.0.0.0", "::", ""})
# environ key the server sets to the address the connection arrived at (see web/ws.py).
LOCAL_ADDR_KEY = "civitai.local_addr"
CLAIMS_KEY = "civitai.claims"

redact_tokens = redact  # the access log uses the one redaction every log line gets


class Refusal(NamedTuple):
    status: int
    error: str
    headers: dict


def host_name(host_header: str) -> str:
    """"Example.COM:8000" -> "example.com", "[::1]:8000" -> "::1"."""
    host = host_header.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Gatekeeper:
    """The checks themselves, on a WSGI environ, so the WebSocket handshake (before any route runs)
    and the Bottle plugin share them."""

    def __init__(self, cfg, secret_fn: Callable[[], str], clock: Callable[[], float] = time.time):
        self._secret_fn = secret_fn
        self._secret = ""
        self._clock = clock
        # Tokens already checked: the signature of a token never changes, only time runs out;
        # expiry is still checked on every request.
        self._verified: dict[str, dict] = {}
        self.bind = cfg.bind.strip().lower()
        allowed = set(LOOPBACK_NAMES) | {h.strip().lower().rstrip(".") for h in cfg.allowed_hosts}
        if self.bind not in WILDCARD_BINDS:
            allowed.add(self.bind)
        self.allowed_hosts = frozenset(allowed)

    def secret(self) -> str:
        if not self._secret:  # the supervisor writes data/jwt_secret before starting us; read once
            self._secret = self._secret_fn() or ""
        return self._secret

    def check_host(self, environ) -> Refusal | None:
        raw = environ.get("HTTP_HOST", "")
        if not raw:
            return Refusal(403, "a Host header is required", {})
        host = host_name(raw)
        if host in self.allowed_hosts or _is_loopback(host):
            return None
        # Bound to every interface: an IP literal equal to the address this connection arrived at
        # is what a LAN user types; a rebinding attack always carries the attacker's DNS name.
        if self.bind in WILDCARD_BINDS and host == str(environ.get(LOCAL_ADDR_KEY, "")).lower():
            return None
        return Refusal(403, f"host '{host}' is not allowed; add it to allowed_hosts in config.json", {})

    @staticmethod
    def bearer_token(environ, websocket: bool = False) -> str | None:
        header = environ.get("HTTP_AUTHORIZATION", "")
        if header:
            scheme, _, value = header.strip().partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                return value.strip()
            return None
        if websocket:
            # A browser cannot set headers on a WebSocket: it offers ["bearer", token] as subprotocols.
            items = [p.strip() for p in environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL", "").split(",")]
            for i, item in enumerate(items[:-1]):
                if item.lower() == "bearer" and items[i + 1]:
                    return items[i + 1]
        return None

    def check_token(self, environ, websocket: bool = False) -> Refusal | None:
        token = self.bearer_token(environ, websocket)
        challenge = {"WWW-Authenticate": 'Bearer realm="civitai-daemon"'}
        if token is None:
            return Refusal(401, "missing bearer token (Authorization: Bearer <jwt>)", challenge)
        now = self._clock()
        claims = self._verified.get(token)
        if claims is not None and claims["exp"] > now:
            environ[CLAIMS_KEY] = claims
            return None
        try:
            claims = verify_token(self.secret(), token, now=now)
        except TokenError as exc:
            self._verified.pop(token, None)
            return Refusal(401, f"invalid token: {exc}", challenge)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            self._verified.clear()
        self._verified[token] = claims
        environ[CLAIMS_KEY] = claims
        return None

    def check_websocket(self, environ) -> Refusal | None:
        """The handshake check: refuse before the upgrade, never after."""
        return self.check_host(environ) or self.check_token(environ, websocket=True)


def _body_too_large(environ) -> bool:
    try:
        return int(environ.get("CONTENT_LENGTH") or 0) > MAX_BODY_BYTES
    except ValueError:
        return False


class AuthPlugin:
    """Every route needs a valid token unless its config says `public=True`; every request,
    matched or not, passes the Host check. Routes marked `websocket=True` also accept the token
    as a subprotocol."""

    name = "auth"
    api = 2

    def __init__(self, gate: Gatekeeper):
        self.gate = gate

    def setup(self, app) -> None:
        for other in app.plugins:
            if isinstance(other, AuthPlugin) and other is not self:
                raise RuntimeError("AuthPlugin installed twice")
        app.add_hook("before_request", self._before_request)

    def _before_request(self) -> None:
        refusal = self.gate.check_host(request.environ)
        if refusal:
            raise json_error(refusal.status, refusal.error, refusal.headers)
        if _body_too_large(request.environ):
            raise json_error(413, f"request body is larger than {MAX_BODY_BYTES} bytes")

    def apply(self, callback, route):
        if route.config.get("public"):
            return callback
        websocket = bool(route.config.get("websocket"))
        gate = self.gate

        def authenticated(*args, **kwargs):
            refusal = gate.check_token(request.environ, websocket=websocket)
            if refusal:
                raise json_error(refusal.status, refusal.error, refusal.headers)
            return callback(*args, **kwargs)

        return authenticated
