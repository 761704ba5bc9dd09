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

# Imported here, in the main thread, never lazily in the delivery thread: the supervisor forks
# its children while that thread runs, and a child forked while another thread holds a
# module's import lock deadlocks at its own `import requests` (it happened: workers that never
# became ready whenever webhook_url was set).
import requests

from ipc.store import JobStore

log = logging.getLogger("webhooks")

# Seconds between looks at the event log when no wake-up came: the first after an event, the
# last (and the most an idle process waits) after nothing came for a while.
POLL_S = (0.5, 5.0)
TRIES = 3
TIMEOUT_S = 10.0
BACKOFF_S = (1.0, 4.0)  # waits between the three tries
DELIVERED, GAVE_UP = 1, 2


def signing_key(secret: str) -> bytes:
    """Standard Webhooks secrets look like `whsec_<base64>` (padding optional, as the reference
    libraries accept it); any other string is used as its UTF-8 bytes."""
    if secret.startswith("whsec_"):
        encoded = secret[len("whsec_"):].strip()
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
            if key:
                return key
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
    def __init__(self, cfg, db_path, sleep=None, poll_s: tuple[float, float] = POLL_S):
        self.url = cfg.webhook_url
        self.secret = cfg.webhook_secret
        self.db_path = db_path
        self.poll_min_s, self.poll_max_s = poll_s
        self._wake = threading.Event()
        self._finish = threading.Event()  # stopping: send what is queued, then end
        self._stop = threading.Event()  # stop now (between tries and events)
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
        """Send what is queued (daemon_stopping included) for most of `timeout_s`, then stop.
        What is left (a dead receiver) stays undelivered and goes out after the next start."""
        if self._thread is not None:
            self._finish.set()
            self._wake.set()
            self._thread.join(max(0.0, timeout_s - 0.3))
            self._stop.set()
            self._wake.set()
            self._thread.join(0.3)
        elif not self.url:
            # Without a receiver nothing is owed: a webhook_url set later must not get this
            # run's history (the supervisor marks older events at start).
            try:
                store = JobStore(self.db_path)
                try:
                    store.mark_all_delivered()
                finally:
                    store.close()
            except Exception:
                log.debug("could not mark events delivered", exc_info=True)

    def _run(self) -> None:
        store = JobStore(self.db_path)
        session = requests.Session()
        session.trust_env = False  # a proxy from the environment must not see our events
        interval = self.poll_min_s
        try:
            while not self._stop.is_set():
                # Read before the drain: a stop asked for during a drain gets one more full drain
                # (the supervisor stores daemon_stopping just before it asks).
                finishing = self._finish.is_set()
                self._wake.clear()  # before the drain: a notify() during it means "look again"
                try:
                    sent = self._drain(store, session)
                except Exception:  # e.g. the database busy past its timeout: try again shortly
                    log.exception("webhook delivery failed; trying again in 5 s")
                    self._stop.wait(5.0)
                    sent = 0
                if finishing:
                    return
                # Without a wake-up, look again soon after events (they come in bursts: queued,
                # started, completed), then less and less often while nothing comes.
                interval = self.poll_min_s if sent else min(interval * 2, self.poll_max_s)
                self._wake.wait(interval)
        finally:
            store.close()

    def _drain(self, store: JobStore, session) -> int:
        """Deliver every undelivered event in order; how many were handled."""
        handled = 0
        while not self._stop.is_set():
            batch = store.undelivered_events(limit=100)
            if not batch:
                return handled
            for event in batch:
                if self._stop.is_set():
                    return handled
                status = self.deliver(session, event)
                if status:
                    store.mark_delivered(event["id"], status)
                    handled += 1
        return handled

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
            if attempt < TRIES and self._sleep(BACKOFF_S[attempt - 1]):
                return 0  # stopping: try again after the next start
        log.warning("webhook: gave up on event %s (%s) after %d tries: %s", event["id"], event["event"], TRIES, problem)
        return GAVE_UP

