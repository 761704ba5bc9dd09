"""The control socket: how the web process asks the supervisor to change things and hears events.

TCP on 127.0.0.1 (works on Windows too), one JSON object per line. Every connection first proves
it knows the token the supervisor gave its web process through the environment. A request is
`{"token", "op", "args"}`; the answer `{"ok": true, "result": …}` or `{"ok": false, "status", "error"}`.
The op "subscribe" turns the connection into a stream of event lines.
"""
from __future__ import annotations

import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import Callable

log = logging.getLogger("control")

ENV_ADDR = "CIVITAI_DAEMON_CONTROL_ADDR"
ENV_TOKEN = "CIVITAI_DAEMON_CONTROL_TOKEN"
MAX_LINE_BYTES = 4 * 1024 * 1024
SUBSCRIBER_BACKLOG_BYTES = 16 * 1024 * 1024  # a subscriber this far behind is dropped (it catches up from the log)
# Sent at once by the publishing thread when the socket takes it (the usual case: a few hundred bytes
# into an empty loopback buffer), without waking the subscriber's thread. Windows has no per-call
# non-blocking flag: there every line goes through the thread.
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
# Events are sent to subscribers at most this often, gathered: under a stream of small downloads
# that is a few writes a second instead of two a file, and each write wakes the web process (on a
# VM, a wake-up on another CPU costs far more than the bytes). A WebSocket client sees an event at
# most this much later.
PUBLISH_EVERY_S = 0.05
SUBSCRIBED = "_subscribed"  # the first item subscribe() yields: not an event, a confirmation


class ControlError(Exception):
    def __init__(self, status: int, error: str):
        super().__init__(error)
        self.status = status
        self.error = error


def _dumps(obj) -> bytes:
    return (json.dumps(obj, separators=(",", ":"), default=str) + "\n").encode("utf-8")


class _Subscriber:
    """One event stream. The publisher writes straight to the socket while nothing waits before
    it; what the socket cannot take at once goes to `backlog`, which the stream's own thread sends
    (blocking), and everything after it queues behind it, so lines keep their order."""

    def __init__(self, conn: socket.socket, first: bytes):
        self.conn = conn
        self.alive = True
        self.ready = threading.Condition()
        self.backlog = bytearray(first)  # the confirmation goes first, before any event
        self.sending = False  # the thread is in sendall with bytes taken from the backlog

    def offer(self, line: bytes) -> bool:
        """Send or queue `line`; False when the subscriber is gone or too far behind."""
        with self.ready:
            if not self.alive:
                return False
            if _DONTWAIT and not self.backlog and not self.sending:
                try:
                    sent = self.conn.send(line, _DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    return False
                if sent == len(line):
                    return True
                line = line[sent:]
            if len(self.backlog) + len(line) > SUBSCRIBER_BACKLOG_BYTES:
                return False
            self.backlog += line
            self.ready.notify()
            return True

    def take(self) -> bytes | None:
        """For the stream's thread: the backlog once there is one, or None when it ends."""
        with self.ready:
            self.sending = False
            while self.alive and not self.backlog:
                self.ready.wait()
            if not self.alive:
                return None
            data, self.backlog = bytes(self.backlog), bytearray()
            self.sending = True
            return data

    def end(self) -> None:
        with self.ready:
            self.alive = False
            self.ready.notify()


def _listen(host: str, port: int, avoid: int | None) -> socket.socket:
    """A listening socket on `host:port`. With port 0 the kernel picks one from the ephemeral
    range, and it may pick `avoid` (the web port, when the user chose one in that range): the web
    process, started after, could then never listen. Such a pick is closed and another one taken."""
    for _ in range(8):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((host, port))
            if port == 0 and avoid is not None and sock.getsockname()[1] == avoid:
                sock.close()
                continue
            sock.listen(64)
            return sock
        except BaseException:
            sock.close()
            raise
    raise OSError(f"the kernel gave port {avoid} (the web port) to the control socket 8 times")


class ControlServer:
    """Serves requests on threads; `handler(op, args)` is the supervisor's and decides where
    the work happens (it marshals onto the main loop)."""

    def __init__(self, token: str, handler: Callable[[str, dict], object], host: str = "127.0.0.1", port: int = 0,
                 avoid: int | None = None, publish_every_s: float = PUBLISH_EVERY_S):
        self._token = token.encode()
        self._handler = handler
        self._sock = _listen(host, port, avoid)
        self.address = "%s:%d" % self._sock.getsockname()[:2]
        self._subscribers: list[_Subscriber] = []
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="control-accept", daemon=True)
        # Events gathered for the next send (publish_every_s > 0): the publisher only appends, and
        # wakes the sending thread when the first line of a gathering arrives.
        self._every_s = publish_every_s
        self._gathered = bytearray()
        self._gathering = threading.Condition()
        self._sender = threading.Thread(target=self._send_gathered, name="control-publish", daemon=True)

    def fileno(self) -> int:
        return self._sock.fileno()

    def start(self) -> ControlServer:
        self._thread.start()
        if self._every_s > 0:
            self._sender.start()
        return self

    def close(self) -> None:
        with self._gathering:  # set under the lock: the sending thread cannot miss it
            self._closed = True
            self._gathering.notify()
        if self._sender.is_alive():
            self._sender.join(1.0)
        try:
            self._sock.close()
        except OSError:
            pass
        with self._lock:
            subs, self._subscribers = self._subscribers, []
        for sub in subs:
            self._drop(sub)

    def publish(self, event: dict) -> None:
        """Hand an event to every subscriber without ever blocking the caller: a subscriber
        that cannot keep up is dropped (it reconnects and catches up from the event log)."""
        self.publish_many([event])

    def publish_many(self, events: list[dict]) -> None:
        """publish() for the events of one transaction: one write to each subscriber for all of
        them, in their order (on its thread only when its socket is behind)."""
        if not events:
            return
        line = b"".join(_dumps(event) for event in events)
        if self._every_s > 0 and not self._closed:
            with self._gathering:
                if not self._gathered:
                    self._gathering.notify()
                self._gathered += line
            return
        self._offer(line)

    def _send_gathered(self) -> None:
        """The sending thread: asleep until a gathering starts, then sends it `publish_every_s`
        later with everything published meanwhile (and what is left at close)."""
        while True:
            with self._gathering:
                while not self._gathered and not self._closed:
                    self._gathering.wait()
                if not self._gathered:
                    return
                # The gathering's time, cut short by close() (which notifies; later publishes don't).
                deadline = time.monotonic() + self._every_s
                while not self._closed and (left := deadline - time.monotonic()) > 0:
                    self._gathering.wait(left)
                line, self._gathered = bytes(self._gathered), bytearray()
            self._offer(line)

    def _offer(self, line: bytes) -> None:
        with self._lock:
            subs = list(self._subscribers)
        for sub in subs:
            if not sub.offer(line):
                if sub.alive:
                    log.warning("control subscriber too slow; dropping it")
                self._drop(sub)

    def _drop(self, sub: _Subscriber) -> None:
        sub.end()
        with self._lock:
            if sub in self._subscribers:
                self._subscribers.remove(sub)
        try:
            sub.conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._closed:
                    return
                continue
            threading.Thread(target=self._serve, args=(conn,), name="control-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        try:
            while True:
                line = reader.readline(MAX_LINE_BYTES + 1)
                if not line:
                    return
                if len(line) > MAX_LINE_BYTES:
                    conn.sendall(_dumps({"ok": False, "status": 413, "error": "request too large"}))
                    return
                try:
                    req = json.loads(line)
                    token = str(req.get("token", "")).encode()
                    op = str(req["op"])
                    args = req.get("args") or {}
                except (ValueError, KeyError, AttributeError):
                    conn.sendall(_dumps({"ok": False, "status": 400, "error": "bad control request"}))
                    return
                if not hmac.compare_digest(token, self._token):
                    conn.sendall(_dumps({"ok": False, "status": 401, "error": "bad control token"}))
                    return
                if op == "subscribe":
                    self._stream(conn)
                    return
                try:
                    result = self._handler(op, args)
                    reply = {"ok": True, "result": result}
                except ControlError as exc:
                    reply = {"ok": False, "status": exc.status, "error": exc.error}
                except Exception as exc:  # the web process gets a 500-ish answer, we keep serving
                    log.exception("control op %s failed", op)
                    reply = {"ok": False, "status": 500, "error": f"internal error: {type(exc).__name__}"}
                conn.sendall(_dumps(reply))
        except OSError:
            return
        finally:
            try:
                reader.close()
                conn.close()
            except OSError:
                pass

    def _stream(self, conn: socket.socket) -> None:
        sub = _Subscriber(conn, _dumps({"ok": True, "result": "subscribed"}))
        with self._lock:
            self._subscribers.append(sub)
        try:
            while True:
                data = sub.take()
                if data is None:
                    return
                conn.sendall(data)
        except OSError:
            return
        finally:
            self._drop(sub)


class ControlClient:
    """The web process's side. One short connection per call: loopback is cheap and a
    supervisor restart never leaves a stale pooled socket behind."""

    def __init__(self, address: str, token: str, timeout_s: float = 15.0):
        host, _, port = address.rpartition(":")
        self._addr = (host, int(port))
        self._token = token
        self._timeout_s = timeout_s

    def _connect(self) -> socket.socket:
        try:
            return socket.create_connection(self._addr, timeout=self._timeout_s)
        except OSError as exc:
            raise ControlError(503, f"the supervisor is not answering ({exc.strerror or exc})") from None

    def call(self, op: str, _timeout_s: float | None = None, **args):
        sock = self._connect()
        if _timeout_s is not None:
            sock.settimeout(_timeout_s)
        try:
            sock.sendall(_dumps({"token": self._token, "op": op, "args": args}))
            reader = sock.makefile("rb")
            line = reader.readline(MAX_LINE_BYTES + 1)
        except OSError as exc:
            raise ControlError(503, f"the supervisor did not answer ({exc})") from None
        finally:
            sock.close()
        if not line:
            raise ControlError(503, "the supervisor closed the control connection")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise ControlError(int(reply.get("status", 500)), str(reply.get("error", "error")))
        return reply.get("result")

    def subscribe(self):
        """Yield events as the supervisor publishes them, until the connection ends."""
        sock = self._connect()
        sock.settimeout(None)
        try:
            sock.sendall(_dumps({"token": self._token, "op": "subscribe", "args": {}}))
            reader = sock.makefile("rb")
            first = reader.readline(MAX_LINE_BYTES + 1)
            reply = json.loads(first) if first else {}
            if not reply.get("ok"):
                raise ControlError(int(reply.get("status", 503)), str(reply.get("error", "subscribe failed")))
            yield {"event": SUBSCRIBED}  # the stream is open: the reader need not poll the store meanwhile
            for line in reader:
                yield json.loads(line)
        finally:
            sock.close()
