"""Webhook delivery: every stored event, in order, POSTed to `webhook_url` from a thread of its
own, so a slow or dead receiver costs only its own retries, never a download."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time

from ipc.store import JobStore

log = logging.getLogger("webhooks")

TRIES = 3
TIMEOUT_S = 10.0
BACKOFF_S = (1.0, 4.0)  # waits between the three tries
DELIVERED, GAVE_UP = 1, 2


def signing_key(secret: str) -> bytes:
    """Standard Webhooks secrets look like `whsec_<base64>`; any other string is used as it is."""
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret[len("whsec_"):], validate=True)
        except ValueError:
            pass
    return secret.encode("utf-8")


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value (Standard Webhooks, v1 = HMAC-SHA256)."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(signing_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def build_request(event: dict, secret: str, now: float | None = None) -> tuple[bytes, dict]:
    body = json.dumps(event, separators=(",", ":"), default=str).encode("utf-8")
    headers = {"Content-Type": "application/json", "User-Agent": "civitai-daemon-webhook/1"}
    if secret:
        msg_id = f"evt_{event['id']}"
        timestamp = int(time.time() if now is None else now)
        headers.update({"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
                        "webhook-signature": sign(secret, msg_id, timestamp, body)})
    return body, headers


class WebhookSender:
    def __init__(self, cfg, db_path, sleep=None):
        self.url = cfg.webhook_url
        self.secret = cfg.webhook_secret
        self.db_path = db_path
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sleep = sleep or self._stop.wait

    def start(self) -> None:
        if not self.url:
            return
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        self._wake.set()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        import requests

        store = JobStore(self.db_path)
        session = requests.Session()
        session.trust_env = False  # a proxy from the environment must not see our events
        try:
            while not self._stop.is_set():
                self._wake.wait(5.0)
                self._wake.clear()
                while not self._stop.is_set():
                    batch = store.undelivered_events(limit=100)
                    if not batch:
                        break
                    for event in batch:
                        if self._stop.is_set():
                            return
                        store.mark_delivered(event["id"], self.deliver(session, event))
        except Exception:
            log.exception("webhook thread failed; undelivered events go out after the next start")
        finally:
            store.close()

    def deliver(self, session, event: dict) -> int:
        for attempt in range(1, TRIES + 1):
            body, headers = build_request(event, self.secret)
            try:
                resp = session.post(self.url, data=body, headers=headers, timeout=TIMEOUT_S,
                                    allow_redirects=False)
                if 200 <= resp.status_code < 300:
                    return DELIVERED
                problem = f"HTTP {resp.status_code}"
            except Exception as exc:
                problem = type(exc).__name__
            if attempt < TRIES:
                if self._sleep(BACKOFF_S[attempt - 1]):
                    return 0  # stopping: try again after the next start
        log.warning("webhook: gave up on event %s (%s) after %d tries: %s", event["id"], event["event"], TRIES, problem)
        return GAVE_UP
