"""Webhooks (ipc/webhooks.py): Standard Webhooks signatures (checked against the spec's own test
vector and the receiver code in docs/webhooks.md), order, retries, persistence across a restart,
and a receiver that stalls or fails never slowing a download (the real daemon)."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from types import SimpleNamespace

import pytest

from ipc import webhooks
from ipc.store import JobStore
from ipc.webhooks import GAVE_UP, WebhookSender, build_request, sign, signing_key
from tests.helpers import REPO, base_config, wait_until
from tests.webhook_receiver import WebhookReceiver

MiB = 1024 * 1024


def docs_receiver_code() -> dict:
    """The verification code of docs/webhooks.md, run as a receiver would copy it."""
    text = (REPO / "docs" / "webhooks.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "docs/webhooks.md", "exec"), namespace)  # noqa: S102 - our own docs
    return namespace


@pytest.fixture
def receiver():
    r = WebhookReceiver()
    yield r
    r.close()


# --- signatures ---------------------------------------------------------------------------------


def test_signature_matches_the_standard_webhooks_test_vector():
    # From the reference library's tests (standard-webhooks/standard-webhooks, libraries/python).
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    assert sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == \
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_secret_forms():
    raw = b"\x01\x02" * 16
    encoded = base64.b64encode(raw).decode()
    assert signing_key("whsec_" + encoded) == raw
    assert signing_key("whsec_" + encoded.rstrip("=")) == raw  # unpadded, as the reference accepts
    assert signing_key("my plain secret") == b"my plain secret"
    assert signing_key("whsec_!!not base64!!") == b"whsec_!!not base64!!"


@pytest.mark.parametrize("secret", ["whsec_" + base64.b64encode(b"k" * 32).decode(), "a plain string secret"])
def test_the_receiver_code_in_the_docs_verifies_our_deliveries(secret):
    verify = docs_receiver_code()["verify_webhook"]
    event = {"id": 7, "event": "model_update", "ts": "2024-01-01T00:00:00.000Z", "model_id": 1, "filename": "ü.bin"}
    body, headers = build_request(event, secret)
    assert headers["webhook-id"] == "evt_7"
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 5
    assert re.fullmatch(r"v1,[A-Za-z0-9+/]{43}=", headers["webhook-signature"])
    assert verify(secret, headers, body) == event
    # The signature is over id, timestamp and the exact body.
    expected = hmac.new(signing_key(secret), f"evt_7.{headers['webhook-timestamp']}.".encode() + body,
                        hashlib.sha256).digest()
    assert headers["webhook-signature"] == "v1," + base64.b64encode(expected).decode()
    with pytest.raises(ValueError):
        verify(secret, headers, body.replace(b"model_update", b"model_updatE"))
    with pytest.raises(ValueError):
        verify("whsec_" + base64.b64encode(b"w" * 32).decode(), headers, body)
    with pytest.raises(ValueError):
        verify("another plain secret", headers, body)
    with pytest.raises(ValueError):
        verify(secret, {**headers, "webhook-id": "evt_8"}, body)
    old_body, old_headers = build_request(event, secret, now=time.time() - 600)
    with pytest.raises(ValueError, match="too old"):
        verify(secret, old_headers, old_body)


def test_without_a_secret_there_are_no_signature_headers():
    body, headers = build_request({"id": 1, "event": "daemon_started", "ts": "x"}, "")
    assert json.loads(body)["event"] == "daemon_started"
    assert headers["Content-Type"] == "application/json"
    assert not any(k.startswith("webhook-") for k in headers)


# --- the sender against a real receiver ---------------------------------------------------------


def make_store(tmp_path, n_events: int) -> JobStore:
    store = JobStore(tmp_path / "daemon.db")
    for i in range(n_events):
        store.add_event("download_queued", {"job_id": i + 1})
    return store


def sender_for(receiver, tmp_path, secret="") -> WebhookSender:
    cfg = SimpleNamespace(webhook_url=receiver.url, webhook_secret=secret)
    return WebhookSender(cfg, tmp_path / "daemon.db")


def undelivered(store) -> list[int]:
    return [e["id"] for e in store.undelivered_events(limit=1000)]


def test_events_go_out_in_order_and_are_marked(receiver, tmp_path):
    store = make_store(tmp_path, 30)
    sender = sender_for(receiver, tmp_path, secret="whsec_" + base64.b64encode(b"s" * 24).decode())
    sender.start()
    sender.notify()
    try:
        wait_until(lambda: len(receiver.delivered_ids()) == 30, 10, message="30 deliveries")
        wait_until(lambda: undelivered(store) == [], 5, message="all marked delivered")
        assert receiver.delivered_ids() == list(range(1, 31))
        verify = docs_receiver_code()["verify_webhook"]
        for d in receiver.deliveries:
            assert verify(sender.secret, d.headers, d.body)["id"] == int(d.headers["webhook-id"][4:])
        store.add_event("download_completed", {"job_id": 1})
        sender.notify()
        wait_until(lambda: receiver.delivered_ids()[-1:] == [31], 5, message="the new event")
    finally:
        sender.stop()
        store.close()


def test_a_failing_delivery_is_tried_three_times_in_order_then_given_up(receiver, tmp_path, monkeypatch):
    monkeypatch.setattr(webhooks, "BACKOFF_S", (0.05, 0.1))
    store = make_store(tmp_path, 3)
    receiver.fail_first = 2  # event 1: 500, 500, then 204
    sender = sender_for(receiver, tmp_path)
    sender.start()
    sender.notify()
    try:
        wait_until(lambda: receiver.delivered_ids() == [1, 2, 3], 10, message="events 1-3")
        assert [e["id"] for e in receiver.events()] == [1, 1, 1, 2, 3]
        hook_ids = [d.headers.get("webhook-id") for d in receiver.deliveries]
        assert hook_ids == [None] * 5  # no secret, no signature headers
        # A receiver that always fails: three tries per event, then the next event.
        receiver.mode = "fail"
        for _ in range(2):
            store.add_event("download_failed", {"job_id": 9, "error": "x"})
        sender.notify()
        wait_until(lambda: len(receiver.events()) == 11, 10, message="3 tries of events 4 and 5")
        assert [e["id"] for e in receiver.events()][5:] == [4, 4, 4, 5, 5, 5]
        wait_until(lambda: undelivered(store) == [], 5, message="both given up")
        rows = store._query("SELECT id, delivered FROM events WHERE id > 3")
        assert [r["delivered"] for r in rows] == [GAVE_UP, GAVE_UP]
    finally:
        sender.stop()
        store.close()


def test_a_receiver_that_never_answers_costs_only_its_own_timeouts(receiver, tmp_path, monkeypatch):
    monkeypatch.setattr(webhooks, "TIMEOUT_S", 0.3)
    monkeypatch.setattr(webhooks, "BACKOFF_S", (0.05, 0.05))
    store = make_store(tmp_path, 2)
    receiver.mode = "stall"
    sender = sender_for(receiver, tmp_path)
    sender.start()
    sender.notify()
    try:
        wait_until(lambda: len(receiver.events()) == 6, 10, message="3 tries of 2 events")
        assert [e["id"] for e in receiver.events()] == [1, 1, 1, 2, 2, 2]
        wait_until(lambda: undelivered(store) == [], 5, message="given up")
    finally:
        sender.stop()
        store.close()


def test_undelivered_events_survive_a_stop_and_go_out_after_it(receiver, tmp_path):
    store = make_store(tmp_path, 3)
    receiver.mode = "stall"
    first = sender_for(receiver, tmp_path)
    first.start()
    first.notify()
    wait_until(lambda: len(receiver.events()) == 1, 5, message="the first try")
    started = time.monotonic()
    first.stop(timeout_s=1.0)
    assert time.monotonic() - started < 1.5  # a hung receiver does not hold up the stop
    assert undelivered(store) == [1, 2, 3]
    receiver.mode = "ok"
    receiver.release()
    second = sender_for(receiver, tmp_path)
    second.start()
    second.notify()
    try:
        wait_until(lambda: receiver.delivered_ids() == [1, 2, 3], 10, message="events 1-3 after the restart")
        wait_until(lambda: undelivered(store) == [], 5, message="marked")
    finally:
        second.stop()
        store.close()


def test_stop_sends_what_is_queued_first(receiver, tmp_path):
    store = make_store(tmp_path, 0)
    sender = sender_for(receiver, tmp_path)
    sender.start()
    store.add_event("daemon_stopping", {"version": "x"})
    sender.stop(timeout_s=2.0)  # no notify(): stop itself flushes
    assert receiver.delivered_ids() == [1]
    store.close()


def test_without_a_url_nothing_is_owed_after_the_run(tmp_path):
    store = make_store(tmp_path, 3)
    sender = WebhookSender(SimpleNamespace(webhook_url="", webhook_secret=""), tmp_path / "daemon.db")
    sender.start()
    sender.stop()
    assert undelivered(store) == []
    store.close()


# --- the real daemon ----------------------------------------------------------------------------


def add_model(fake, model_id=100, version_id=1000, file_id=5000, size=8 * MiB):
    fake.add_model(model_id, name=f"Model {model_id}", type="Checkpoint", versions=[
        dict(id=version_id, published_at="2024-05-01T00:00:00.000Z",
             files=[dict(id=file_id, name=f"m{model_id}.safetensors", size_bytes=size, primary=True)])])


def download_seconds(daemon) -> float:
    def ts(e):
        from datetime import datetime

        return datetime.fromisoformat(e["ts"].replace("Z", "+00:00")).timestamp()

    started = daemon.wait_event("download_started", timeout=30)
    done = daemon.wait_event("download_completed", timeout=30)
    return ts(done) - ts(started)


@pytest.mark.parametrize("mode", ["stall", "fail"])
def test_a_stalled_or_failing_receiver_does_not_slow_a_download(fake_civitai, daemon_factory, receiver, mode):
    add_model(fake_civitai)
    receiver.mode = mode
    daemon = daemon_factory(base_config(fake_civitai, webhook_url=receiver.url, workers=1),
                            [{"modelId": 100, "modelVersionId": 1000, "model_type": "checkpoint"}])
    daemon.start()
    seconds = download_seconds(daemon)
    assert seconds < 5, f"an 8 MiB download took {seconds:.1f} s"
    if mode == "stall":
        # The webhook process is stuck in the first try of the first event (10 s timeout):
        # the download finished all the same.
        wait_until(lambda: receiver.deliveries, 10, message="the first (stalled) delivery")
        time.sleep(0.5)
        assert len(receiver.deliveries) == 1 and receiver.events()[0]["event"] == "daemon_started"
    else:
        assert receiver.delivered_ids() == []
    status = daemon.api("GET", "/api/status", timeout=2)
    assert status.status_code == 200
    started = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - started < 8  # the hung delivery does not hold up the stop


def test_events_undelivered_at_a_stop_go_out_in_order_after_the_restart(fake_civitai, daemon_factory, receiver):
    add_model(fake_civitai, size=256 * 1024)
    secret = "whsec_" + base64.b64encode(b"r" * 32).decode()
    receiver.mode = "stall"
    daemon = daemon_factory(base_config(fake_civitai, webhook_url=receiver.url, webhook_secret=secret),
                            [{"modelId": 100, "modelVersionId": 1000, "model_type": "checkpoint"}])
    daemon.start()
    daemon.wait_event("download_completed", timeout=30)
    assert daemon.stop() == 0
    first_run = [e["id"] for e in daemon.events()]
    assert receiver.delivered_ids() == []
    receiver.mode = "ok"
    receiver.release()
    daemon.start()
    wait_until(lambda: daemon.events("daemon_started")[1:], 20, message="the second start")
    wait_until(lambda: set(first_run) <= set(receiver.delivered_ids()), 20, message="the first run's events")
    delivered = receiver.delivered_ids()
    assert delivered == sorted(delivered) and len(set(delivered)) == len(delivered)
    assert delivered[:len(first_run)] == first_run
    verify = docs_receiver_code()["verify_webhook"]
    for d in receiver.deliveries:
        if d.answered == 204:
            assert verify(secret, d.headers, d.body)["id"] == d.event["id"]
    assert daemon.stop() == 0


def test_no_webhook_means_no_backlog_for_a_later_one(fake_civitai, daemon_factory, receiver):
    daemon = daemon_factory(base_config(fake_civitai))
    daemon.start()
    assert daemon.stop() == 0
    config = json.loads(daemon.config_path.read_text())
    config["webhook_url"] = receiver.url
    daemon.config_path.write_text(json.dumps(config))
    daemon.start()
    daemon.wait_event("daemon_started", predicate=lambda e: e["id"] > 2)
    wait_until(lambda: receiver.delivered_ids(), 10, message="a delivery")
    time.sleep(0.5)
    second_run_first_id = daemon.events("daemon_started")[1]["id"]
    assert min(receiver.delivered_ids()) == second_run_first_id
    assert daemon.stop() == 0


def test_the_webhook_process_stops_cleanly_with_the_daemon(fake_civitai, daemon_factory, receiver):
    daemon = daemon_factory(base_config(fake_civitai, webhook_url=receiver.url))
    daemon.start()
    wait_until(lambda: receiver.delivered_ids(), 10, message="daemon_started delivered")
    assert daemon.stop() == 0
    stopping = daemon.events("daemon_stopping")[0]["id"]
    assert stopping in receiver.delivered_ids()  # flushed before it exited
    for text in (daemon.log_text(), daemon.stderr()):
        assert "Fatal Python error" not in text and "_enter_buffered_busy" not in text, text
