"""Notifications (ipc/notify.py, the webhook process) against real local receivers through
Apprise's json:// (a JSON POST of title, message and type): each URL on its own, in order, retried
and given up, resumed after a stop; the real daemon announcing a real download in words, a dead
notify URL costing the downloads and the webhooks nothing, and no secret in any log."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from ipc import notify
from ipc.config import load_config
from ipc.retry import RetryPolicy
from ipc.store import JobStore
from tests.helpers import REPO, base_config, free_port, wait_until
from tests.webhook_receiver import WebhookReceiver

MiB = 1024 * 1024


@pytest.fixture
def receivers():
    made: list[WebhookReceiver] = []

    def make(mode="ok") -> WebhookReceiver:
        made.append(WebhookReceiver(mode=mode))
        return made[-1]

    yield make
    for r in made:
        r.close()


def json_url(receiver: WebhookReceiver, **args) -> str:
    """Apprise's json:// for a receiver (rto/cto: Apprise's read and connect timeouts)."""
    query = "&".join(f"{k}={v}" for k, v in args.items())
    return receiver.url.replace("http://", "json://") + (f"?{query}" if query else "")


def down_url(token: str = "") -> str:
    """A URL nothing listens on; `token` rides as the password, as a service's would."""
    return f"json://{'user:' + token + '@' if token else ''}127.0.0.1:{free_port()}/down"


def messages(receiver: WebhookReceiver, answered_only: bool = True) -> list[dict]:
    return [d.event for d in receiver.deliveries if not answered_only or d.answered == 204]


def completed(n: int, **extra) -> dict:
    return {"job_id": n, "model_id": 70 + n, "version_id": 700 + n, "model_type": "lora",
            "filename": f"m{n}.safetensors", "path": f"lora/m{n}.safetensors", "sha256": "ab" * 32,
            "bytes": n * MiB, "model_name": f"Model {n}", "version_name": "v1", **extra}


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(notify, "RETRY", RetryPolicy(base_s=0.05, factor=1.0, cap_s=0.05, max_tries=3))


def make_sender(tmp_path, urls, **config) -> tuple[notify.NotifySender, JobStore]:
    (tmp_path / "config.json").write_text(json.dumps({"notify": urls, **config}))
    cfg, _ = load_config(tmp_path / "config.json")
    store = JobStore(cfg.db_path)
    sender = notify.NotifySender(cfg, cfg.db_path)
    sender.load()
    return sender, store


def sink_state(store) -> list[dict]:
    return sorted(store.get_kv(notify.SINKS_KEY, {}).values(), key=lambda s: s["index"])


# --- the sender in-process ------------------------------------------------------------------------


def test_a_hung_url_holds_up_neither_the_other_url_nor_its_own_order(receivers, tmp_path, fast_retries):
    hung, good = receivers("stall"), receivers()
    sender, store = make_sender(tmp_path, [json_url(hung, rto=60), json_url(good)])
    store.add_event("daemon_started", {"version": "x"})
    sender.start()
    try:
        for n in (1, 2, 3):
            store.add_event("download_completed", completed(n))
        sender.notify()
        wait_until(lambda: len(messages(good)) == 3, 10, message="three notifications at the good URL")
        assert [m["title"] for m in messages(good)] == ["Downloaded Model 1 v1", "Downloaded Model 2 v1",
                                                         "Downloaded Model 3 v1"]
        assert messages(good)[0]["message"] == "lora/m1.safetensors, 1.0 MB, verified"
        assert messages(good)[0]["type"] == "success"
        # Meanwhile the hung URL is still in its first try of the first one.
        assert len(hung.deliveries) == 1 and hung.deliveries[0].answered is None
        hung.mode = "ok"
        hung.release()  # the hung try ends unanswered (a failed try), the next ones are answered
        wait_until(lambda: len(messages(hung)) == 3, 15, message="the hung URL catching up")
        assert [m["title"] for m in messages(hung)] == [m["title"] for m in messages(good)]
        wait_until(lambda: [s["last_event_id"] for s in sink_state(store)] == [4, 4], 5, message="both marked")
        assert [s["sent"] for s in sink_state(store)] == [3, 3]
    finally:
        sender.stop()
        store.close()


def test_a_failing_url_is_tried_three_times_per_event_then_given_up(receivers, tmp_path, fast_retries):
    failing = receivers("fail")
    sender, store = make_sender(tmp_path, [json_url(failing)])
    sender.start()
    try:
        store.add_event("download_failed", {"job_id": 1, "error": "Civitai answered 404: the file is gone",
                                            "model_id": 5, "version_id": 50, "filename": "x.safetensors"})
        store.add_event("download_completed", completed(2))
        sender.notify()
        wait_until(lambda: len(failing.deliveries) == 6, 10, message="3 tries of 2 events")
        titles = [json.loads(d.body)["title"] for d in failing.deliveries]
        assert titles == ["Download failed: model 5 version 50"] * 3 + ["Downloaded Model 2 v1"] * 3
        wait_until(lambda: sink_state(store)[0].get("gave_up") == 2, 5, message="both given up")
        state = sink_state(store)[0]
        assert state["last_event_id"] == 2 and "error=500" in state["last_error"]
    finally:
        sender.stop()
        store.close()


def test_what_a_stop_interrupts_goes_out_after_the_next_start(receivers, tmp_path, fast_retries, monkeypatch):
    monkeypatch.setattr(notify, "RETRY", RetryPolicy(base_s=30.0, factor=1.0, cap_s=30.0, max_tries=3))
    receiver = receivers("fail")
    sender, store = make_sender(tmp_path, [json_url(receiver)])
    sender.start()
    store.add_event("download_completed", completed(1))
    sender.notify()
    wait_until(lambda: receiver.deliveries, 10, message="the first try")
    sender.stop(timeout_s=1.0)  # in its 30 s wait before the second try
    assert sink_state(store)[0]["last_event_id"] == 0
    receiver.mode = "ok"
    again, _ = make_sender(tmp_path, [json_url(receiver)])
    again.start()
    again.notify()
    try:
        wait_until(lambda: messages(receiver), 10, message="the notification after the restart")
        assert messages(receiver)[0]["title"] == "Downloaded Model 1 v1"
    finally:
        again.stop()
        store.close()


def test_only_the_named_events_of_this_run_are_sent(receivers, tmp_path):
    receiver = receivers()
    (tmp_path / "data").mkdir()
    store = JobStore(tmp_path / "data" / "daemon.db")
    store.add_event("download_completed", completed(1))  # an earlier run's: never announced
    urls = [json_url(receiver)]
    notify.prepare_sinks(store, urls)  # the supervisor, at its start
    store.add_event("daemon_started", {"version": "x"})
    store.add_event("download_queued", {"job_id": 2, "model_id": 72})  # not in notify_events
    store.add_event("download_completed", completed(2))
    store.add_event("download_failed", {"job_id": 3, "error": "boom", "model_id": 73})
    sender, _ = make_sender(tmp_path, urls, notify_events=["download_completed", "download_queued_typo"])
    sender.start()
    try:
        sender.notify()
        wait_until(lambda: sink_state(store)[0]["last_event_id"] == 5, 10, message="the log read to its end")
        assert [m["title"] for m in messages(receiver)] == ["Downloaded Model 2 v1"]
        # A URL taken out of the config loses its place; put back later, it starts afresh.
        notify.prepare_sinks(store, [])
        assert store.get_kv(notify.SINKS_KEY) == {}
    finally:
        sender.stop()
        store.close()


def test_names_missing_from_an_event_come_from_the_job_store(receivers, tmp_path):
    receiver = receivers()
    sender, store = make_sender(tmp_path, [json_url(receiver)], notify_events=["download_cancelled"])
    job = store.add_job(model_id=77, version_id=770, model_type="lora", filename="zxq.safetensors")
    store.set_fields(job["id"], {"model_name": "Zxq Ink Style", "version_name": "v2"})
    sender.start()
    try:
        store.add_event("download_cancelled", {"job_id": job["id"]})
        sender.notify()
        wait_until(lambda: messages(receiver), 10, message="the notification")
        assert messages(receiver)[0]["title"] == "Cancelled Zxq Ink Style v2"
        assert messages(receiver)[0]["message"] == "lora/zxq.safetensors"
    finally:
        sender.stop()
        store.close()


# --- the webhook process --------------------------------------------------------------------------


def run_process(tmp_path, config: dict) -> subprocess.Popen:
    (tmp_path / "config.json").write_text(json.dumps(config))
    proc = subprocess.Popen([sys.executable, "-m", "workers.webhooks", "--config", str(tmp_path / "config.json")],
                            cwd=str(REPO), env=dict(os.environ, PYTHONUNBUFFERED="1"), stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    return proc


def test_the_process_with_only_notify_set_sends_and_a_dead_url_leaves_webhooks_alone(receivers, tmp_path):
    hook, good = receivers(), receivers()
    token = "tok_" + "x" * 24
    api_key = "civ_" + "k" * 28
    (tmp_path / "data").mkdir()
    store = JobStore(tmp_path / "data" / "daemon.db")
    store.add_event("daemon_started", {"version": "x"})
    proc = run_process(tmp_path, {"webhook_url": hook.url, "civitai_api_key": api_key,
                                  "notify": [down_url(token), json_url(good)]})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(raw.decode() for raw in proc.stderr), daemon=True)
    reader.start()
    try:
        wait_until(lambda: any("@ready" in line for line in lines) or proc.poll() is not None, 20, message="@ready")
        store.add_event("download_completed", completed(1))
        store.add_event("download_failed", {"job_id": 2, "error": f"refused with key {api_key}", "model_id": 72})
        proc.stdin.write(b"\n")
        proc.stdin.flush()
        wait_until(lambda: len(messages(good)) == 2, 10, message="two notifications")
        assert messages(good)[1]["message"] == "refused with key ***"
        wait_until(lambda: hook.delivered_ids() == [1, 2, 3], 10, message="every event as a webhook")
        # The dead URL: 3 tries of each, 1 s and 4 s apart, then given up, one warning each.
        wait_until(lambda: sum("gave up" in line for line in lines) == 2, 20, message="two give-ups")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
        store.close()
    reader.join(5)
    text = "".join(lines)
    assert "notify[0] json://: gave up on event 2 (download_completed) after 3 tries: A Connection error" in text
    assert token not in text and api_key not in text and "127.0.0.1:" not in text.split("gave up")[1][:80]


# --- supervisor.py notify-test --------------------------------------------------------------------


def notify_test(tmp_path, config: dict) -> subprocess.CompletedProcess:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return subprocess.run([sys.executable, str(REPO / "supervisor.py"), "notify-test", "--config",
                           str(tmp_path / "config.json")], cwd=str(REPO), capture_output=True, text=True, timeout=60)


def test_notify_test_says_which_urls_took_it_by_scheme_only(receivers, tmp_path):
    good = receivers()
    token = "tok_" + "t" * 24
    out = notify_test(tmp_path, {"notify": [json_url(good), down_url(token), "nosuchscheme://secret-part-here"]})
    assert out.returncode == 1, out.stderr
    assert out.stdout.splitlines() == ["notify[0] json://: sent", "1 of 3 sent"]
    errors = out.stderr.splitlines()
    assert errors[0] == "notify[1] json://: FAILED: A Connection error occurred sending JSON notification to 127.0.0.1."
    assert errors[1].startswith("notify[2] nosuchscheme://: FAILED: Apprise cannot use this URL")
    assert token not in out.stdout + out.stderr and "secret-part-here" not in out.stdout + out.stderr
    [note] = messages(good)
    assert note["title"] == "civitai-daemon: test notification" and "download completed" in note["message"]
    assert notify_test(tmp_path, {"notify": [json_url(good)]}).returncode == 0
    empty = notify_test(tmp_path, {})
    assert empty.returncode == 1 and "'notify' has no URLs" in empty.stderr
    assert notify_test(tmp_path, {"notify": 5}).returncode == 78


# --- the real daemon ------------------------------------------------------------------------------


def zxq_model(fake, size=3 * MiB):
    fake.add_model(77, name="Zxq Ink Style", type="LORA", versions=[
        dict(id=770, name="v2", published_at="2024-05-01T00:00:00.000Z",
             files=[dict(id=7700, name="zxq.safetensors", size_bytes=size, primary=True)])])


def test_a_real_download_is_announced_in_words(fake_civitai, daemon_factory, receivers):
    """Needs the supervisor to start the webhook process when `notify` alone is set."""
    receiver = receivers()
    zxq_model(fake_civitai)
    daemon = daemon_factory(base_config(fake_civitai, notify=[json_url(receiver)]),
                            [{"modelId": 77, "modelVersionId": 770, "model_type": "lora"}])
    daemon.start()
    done = daemon.wait_event("download_completed")
    wait_until(lambda: messages(receiver), 20, message="the notification")
    note = messages(receiver)[0]
    # The names ride on the event once the worker reports them on resolve; until then the ids.
    title = "Downloaded Zxq Ink Style v2" if done.get("model_name") else "Downloaded model 77 version 770"
    assert (note["title"], note["message"], note["type"]) == (title, "lora/zxq.safetensors, 3.0 MB, verified",
                                                              "success")
    assert daemon.stop() == 0
    assert len(messages(receiver)) == 1  # daemon_started, download_queued… are not in notify_events


def test_a_dead_notify_url_costs_the_daemon_nothing_and_no_secret_reaches_a_log(fake_civitai, daemon_factory,
                                                                                 receivers):
    hook = receivers()
    token = "tok_" + "n" * 24
    api_key = "civ_" + "a" * 28
    zxq_model(fake_civitai)
    daemon = daemon_factory(base_config(fake_civitai, webhook_url=hook.url, civitai_api_key=api_key,
                                        notify=[down_url(token)]),
                            [{"modelId": 77, "modelVersionId": 770, "model_type": "lora"}])
    daemon.start()
    done = daemon.wait_event("download_completed")
    wait_until(lambda: done["id"] in hook.delivered_ids(), 20, message="the webhook of the download")
    wait_until(lambda: "gave up on event" in daemon.log_text(), 30, message="the notification given up")
    assert daemon.api("GET", "/api/status").status_code == 200
    assert daemon.api("GET", "/api/config").json()["notify"] == ["***"]
    assert daemon.stop() == 0
    logs = daemon.log_text() + daemon.stderr()
    assert f"notify[0] json://: gave up on event {done['id']} (download_completed) after 3 tries" in logs
    assert token not in logs and api_key not in logs
    assert sorted(hook.delivered_ids()) == hook.delivered_ids()


def test_notify_set_by_sighup_starts_announcing_without_the_runs_history(fake_civitai, daemon_factory, receivers):
    """Needs the supervisor to start (or restart) the webhook process when notify changes."""
    receiver = receivers()
    zxq_model(fake_civitai)
    daemon = daemon_factory(base_config(fake_civitai), [{"modelId": 77, "modelVersionId": 770, "model_type": "lora"}])
    daemon.start()
    first = daemon.wait_event("download_completed")
    config = json.loads(daemon.config_path.read_text())
    config["notify"] = [json_url(receiver)]
    daemon.config_path.write_text(json.dumps(config))
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "webhooks" in daemon.children(), 20, message="the webhook process")
    fake_civitai.add_model(78, name="Second", type="LORA", versions=[
        dict(id=780, name="v1", published_at="2024-05-01T00:00:00.000Z",
             files=[dict(id=7800, name="second.safetensors", size_bytes=MiB, primary=True)])])
    assert daemon.api("POST", "/api/jobs", json={"version_id": 780}).status_code == 201
    second = daemon.wait_event("download_completed", lambda e: e["id"] > first["id"])
    wait_until(lambda: messages(receiver), 20, message="the second download's notification")
    titles = [m["title"] for m in messages(receiver)]
    assert titles == [("Downloaded Second v1" if second.get("model_name") else "Downloaded model 78 version 780")]
    assert daemon.stop() == 0
