"""A real local webhook receiver for tests and benchmarks: records every POST, and answers at
once (`mode="ok"`), with 500 (`"fail"`), or never (`"stall"`: holds the request until `release()`
or `close()`). Standard library only."""
from __future__ import annotations

import http.server
import json
import threading
import time
from dataclasses import dataclass


@dataclass
class Delivery:
    headers: dict  # lower-case names
    body: bytes
    time: float
    answered: int | None  # status sent back (None: stalled)

    @property
    def event(self) -> dict:
        return json.loads(self.body)


class WebhookReceiver:
    def __init__(self, mode: str = "ok", fail_first: int = 0):
        self.mode = mode
        self.fail_first = fail_first  # this many requests answer 500 before `mode` applies
        self.deliveries: list[Delivery] = []
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._closing = threading.Event()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                receiver._handle(self, body)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="webhook-receiver", daemon=True)
        self._thread.start()

    def _handle(self, handler, body: bytes) -> None:
        headers = {k.lower(): v for k, v in handler.headers.items()}
        with self._lock:
            failing = self.fail_first > 0
            if failing:
                self.fail_first -= 1
            mode = "fail" if failing else self.mode
            delivery = Delivery(headers, body, time.time(), None if mode == "stall" else (500 if mode == "fail" else 204))
            self.deliveries.append(delivery)
        if mode == "stall":
            while not (self._release.wait(0.1) or self._closing.is_set()):
                pass
            handler.close_connection = True
            return  # never answered: the sender's timeout decides
        handler.send_response(delivery.answered)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def release(self) -> None:
        """Let stalled requests go (unanswered) and answer the next ones per `mode`."""
        self._release.set()

    def events(self, answered_only: bool = False) -> list[dict]:
        with self._lock:
            return [d.event for d in self.deliveries if not answered_only or d.answered == 204]

    def delivered_ids(self) -> list[int]:
        """Ids of events acknowledged with 2xx, in arrival order."""
        return [e["id"] for e in self.events(answered_only=True)]

    def close(self) -> None:
        self._closing.set()
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(2)
