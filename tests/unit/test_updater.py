"""The update check against the fake Civitai (workers/updater.py): what counts as an update,
which version and file are chosen, batching, errors per model, backoff, and the updater
process's protocol with the supervisor (ready, schedule, check at start, check_now, stop)."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from tests.fakeciv import FakeCivitai
from workers import updater as updater_mod
from workers.civitai import CivitaiClient
from workers.updater import CountingSession, UpdateChecker, check_due_at_start, find_update

OLD = "2024-01-01T00:00:00.000Z"
NEW = "2024-06-01T00:00:00.000Z"
NEWER = "2024-09-01T00:00:00.000Z"


@pytest.fixture
def fake():
    with FakeCivitai() as f:
        yield f


def make_client(fake) -> CivitaiClient:
    client = CivitaiClient(fake.api_url, throttle=None, session=CountingSession(), timeout_s=5)
    client._sleep = lambda s: None  # the client's quick 5xx retries: no waiting in tests
    return client


def run_check(fake, entries, **kw):
    messages = []
    checker = UpdateChecker(make_client(fake), messages.append, **kw)
    summary = checker.run(entries)
    updates = [m for m in messages if m["type"] == "update_found"]
    errors = [m for m in messages if m["type"] == "update_error"]
    return summary, updates, errors


def add_model(fake, model_id, versions):
    """versions: [(version_id, published_at, [file dicts])]"""
    fake.add_model(model_id, name=f"Model {model_id}", type="Checkpoint", versions=[
        dict(id=vid, published_at=pub, files=files) for vid, pub, files in versions])


def simple_file(file_id, **kw):
    kw.setdefault("size_bytes", 2048)
    kw.setdefault("primary", True)
    return dict(id=file_id, name=kw.pop("name", f"file{file_id}.safetensors"), **kw)


def entry_for(fake, model_id, version_id, file_id, **extra) -> dict:
    """The manifest entry as the daemon records it after a download."""
    version = fake.version_json(version_id)
    f = next(f for f in version["files"] if f["id"] == file_id)
    entry = {"modelId": model_id, "modelVersionId": version_id, "fileId": file_id, "model_type": "checkpoint",
             "sha256": f["hashes"]["SHA256"], "url": f"{fake.origin}/api/download/models/{version_id}?fileId={file_id}",
             "filename": f["name"], "updatedAt": version["updatedAt"]}
    entry.update(extra)
    return entry


# --- what is an update --------------------------------------------------------------------------


def test_a_newer_version_is_found_with_everything_the_manifest_needs(fake):
    add_model(fake, 100, [(1000, OLD, [simple_file(5000)])])
    entries = [entry_for(fake, 100, 1000, 5000, my_note="keep")]
    fake.add_version(100, dict(id=1001, published_at=NEW, files=[simple_file(5001, name="v2.safetensors")]))
    summary, updates, errors = run_check(fake, entries)
    assert errors == []
    assert len(updates) == 1
    up = updates[0]
    assert (up["model_id"], up["previous_version_id"]) == (100, 1000)
    entry = up["entry"]
    assert entry["modelVersionId"] == 1001 and entry["fileId"] == 5001
    assert entry["sha256"] == fake.file_sha256(5001)  # as Civitai gives it: upper-case
    assert entry["sha256"] == entry["sha256"].upper()
    assert entry["filename"] == "v2.safetensors"
    assert entry["updatedAt"] == fake.version_json(1001)["updatedAt"]
    assert entry["url"].endswith("/api/download/models/1001?fileId=5001")
    assert up["changes"] == ["version"]
    assert summary["ok"] and (summary["models"], summary["updates"], summary["errors"]) == (1, 1, 0)
    assert summary["requests"] == 1  # one batched /models?ids= request


def test_nothing_changed_means_no_update_and_hash_case_does_not_matter(fake):
    add_model(fake, 100, [(1000, OLD, [simple_file(5000)])])
    entry = entry_for(fake, 100, 1000, 5000)
    entry["sha256"] = entry["sha256"].lower()
    entry["updatedAt"] = entry["updatedAt"].replace(".000Z", "Z")  # the same instant, written differently
    summary, updates, errors = run_check(fake, [entry])
    assert (updates, errors) == ([], [])
    assert summary == {**summary, "ok": True, "models": 1, "updates": 0, "errors": 0}


def test_the_newest_version_is_found_when_the_api_lists_an_older_one_first(fake):
    # Array order: old, middle, newest-but-listed-last... and another old one listed first.
    add_model(fake, 200, [(2002, NEW, [simple_file(6002)]), (2001, OLD, [simple_file(6001)]),
                          (2003, NEWER, [simple_file(6003)]), (2000, "2023-01-01T00:00:00.000Z", [simple_file(6000)])])
    fake.add_version(200, dict(id=1999, published_at="2022-01-01T00:00:00.000Z", files=[simple_file(5999)]), index=0)
    summary, updates, errors = run_check(fake, [entry_for(fake, 200, 2001, 6001)])
    assert errors == []
    assert [u["entry"]["modelVersionId"] for u in updates] == [2003]


def test_an_unpublished_newer_version_is_not_an_update(fake):
    add_model(fake, 100, [(1000, OLD, [simple_file(5000)])])
    fake.add_version(100, dict(id=1001, published_at=NEWER, status="Draft", files=[simple_file(5001)]))
    _, updates, errors = run_check(fake, [entry_for(fake, 100, 1000, 5000)])
    assert (updates, errors) == ([], [])


def test_a_file_replaced_in_place_with_a_new_hash_counts_as_an_update(fake):
    add_model(fake, 100, [(1000, OLD, [simple_file(5000)])])
    entry = entry_for(fake, 100, 1000, 5000)
    time.sleep(0.01)
    fake.replace_file(5000, seed=4242)  # same version, same file id, new content (and updatedAt)
    _, updates, errors = run_check(fake, [entry])
    assert errors == []
    assert len(updates) == 1
    up = updates[0]
    assert (up["previous_version_id"], up["entry"]["modelVersionId"], up["entry"]["fileId"]) == (1000, 1000, 5000)
    assert up["entry"]["sha256"] == fake.file_sha256(5000) != entry["sha256"]
    assert "sha256" in up["changes"]


def test_a_file_replaced_in_place_under_a_new_id_counts_as_an_update(fake):
    add_model(fake, 100, [(1000, OLD, [simple_file(5000, name="model.safetensors")])])
    entry = entry_for(fake, 100, 1000, 5000)
    fake.remove_version(1000)
    fake.add_version(100, dict(id=1000, published_at=OLD, files=[simple_file(5009, name="model.safetensors", seed=5000)]))
    _, updates, errors = run_check(fake, [entry])
    assert errors == []
    assert [(u["entry"]["modelVersionId"], u["entry"]["fileId"]) for u in updates] == [(1000, 5009)]
    assert "file" in updates[0]["changes"]


def test_only_updated_at_changed_counts(fake):
    add_model(fake, 100, [(1000, OLD, [simple_file(5000)])])
    entry = entry_for(fake, 100, 1000, 5000, updatedAt="2024-01-01T00:00:00.000Z")
    fake._versions[1000]["updated_at"] = "2024-02-02T00:00:00.000Z"
    _, updates, _ = run_check(fake, [entry])
    assert len(updates) == 1 and updates[0]["changes"] == ["updatedAt"]


def test_the_matching_file_has_the_same_format_and_precision_else_the_primary(fake):
    add_model(fake, 100, [(1000, OLD, [simple_file(5000, fp="fp32", primary=True),
                                       simple_file(5001, fp="fp16", primary=False, name="m-fp16.safetensors")])])
    fp16_entry = entry_for(fake, 100, 1000, 5001)
    fake.add_version(100, dict(id=1001, published_at=NEW, files=[
        simple_file(5010, fp="fp32", primary=True), simple_file(5011, fp="fp16", primary=False, name="n-fp16.safetensors")]))
    _, updates, _ = run_check(fake, [fp16_entry])
    assert [u["entry"]["fileId"] for u in updates] == [5011]
    # A version without that precision: the primary file.
    fake.add_version(100, dict(id=1002, published_at=NEWER, files=[
        simple_file(5020, fp="bf16", primary=False), simple_file(5021, fp="fp8", primary=True)]))
    _, updates, _ = run_check(fake, [fp16_entry])
    assert [u["entry"]["fileId"] for u in updates] == [5021]


def test_append_mode_entries_compare_against_the_newest_version_among_them(fake):
    add_model(fake, 100, [(1000, OLD, [simple_file(5000)]), (1001, NEW, [simple_file(5001)])])
    entries = [entry_for(fake, 100, 1000, 5000), entry_for(fake, 100, 1001, 5001)]
    summary, updates, errors = run_check(fake, entries)
    assert (updates, errors) == ([], [])
    assert summary["models"] == 1
    fake.add_version(100, dict(id=1002, published_at=NEWER, files=[simple_file(5002)]))
    _, updates, _ = run_check(fake, entries)
    assert [(u["previous_version_id"], u["entry"]["modelVersionId"]) for u in updates] == [(1001, 1002)]


def test_entries_without_a_version_are_left_to_their_download(fake):
    summary, updates, errors = run_check(fake, [{"modelId": 100, "model_type": "checkpoint"}])
    assert (updates, errors) == ([], [])
    assert summary == {**summary, "ok": True, "models": 0, "requests": 0}
    assert fake.requests == []


def test_an_entry_not_yet_downloaded_is_compared_on_its_version_only(fake):
    add_model(fake, 100, [(1000, OLD, [simple_file(5000)])])
    _, updates, _ = run_check(fake, [{"modelId": 100, "modelVersionId": 1000, "model_type": "checkpoint"}])
    assert updates == []


# --- errors, batching, backoff ------------------------------------------------------------------


def test_a_model_gone_from_civitai_is_an_error_while_another_updates(fake):
    add_model(fake, 100, [(1000, OLD, [simple_file(5000)])])
    gone = {"modelId": 101, "modelVersionId": 1010, "fileId": 5100, "model_type": "lora", "sha256": "AB" * 32}
    entries = [entry_for(fake, 100, 1000, 5000), gone]  # 101 is not on Civitai (any more)
    fake.add_version(100, dict(id=1001, published_at=NEW, files=[simple_file(5001)]))
    summary, updates, errors = run_check(fake, entries)
    assert [u["model_id"] for u in updates] == [100]
    assert [e["model_id"] for e in errors] == [101]
    assert "not found" in errors[0]["error"] and "101" in errors[0]["error"]
    assert summary["ok"] and summary["errors"] == 1 and summary["updates"] == 1
    # Missing from the batch answer, so asked for alone: 2 requests.
    assert [r.url_path.split("?")[0] for r in fake.requests] == ["/api/v1/models", "/api/v1/models/101"]


def test_a_failing_batch_falls_back_to_one_request_per_model(fake, monkeypatch):
    monkeypatch.setattr(updater_mod, "TRANSIENT_DELAY_S", 0.01)
    add_model(fake, 100, [(1000, OLD, [simple_file(5000)])])
    add_model(fake, 101, [(1010, OLD, [simple_file(5100)])])
    entries = [entry_for(fake, 100, 1000, 5000), entry_for(fake, 101, 1010, 5100)]
    fake.add_version(100, dict(id=1001, published_at=NEW, files=[simple_file(5001)]))
    fake.set_api_fault(r"ids=", 500)
    fake.set_api_fault(r"/models/101$", 503)
    summary, updates, errors = run_check(fake, entries)
    assert [u["model_id"] for u in updates] == [100]
    assert [e["model_id"] for e in errors] == [101]
    assert "server error" in errors[0]["error"] and "503" in errors[0]["error"]
    assert summary["ok"]  # one model answered: the check says something


def test_an_answer_that_is_not_json_is_an_error_for_that_model(fake, monkeypatch):
    monkeypatch.setattr(updater_mod, "TRANSIENT_DELAY_S", 0.01)
    add_model(fake, 100, [(1000, OLD, [simple_file(5000)])])
    entries = [entry_for(fake, 100, 1000, 5000), {"modelId": 102, "modelVersionId": 1020, "model_type": "lora"}]
    fake.set_api_fault(r"/models/102$", 200, body="<html><body>Just a moment...</body></html>")
    _, updates, errors = run_check(fake, entries)
    assert updates == []
    assert [e["model_id"] for e in errors] == [102]
    assert "web page" in errors[0]["error"]


def test_an_unexpected_shape_is_an_error_for_that_model_only(fake):
    add_model(fake, 100, [(1000, OLD, [simple_file(5000)])])
    add_model(fake, 103, [(1030, OLD, [simple_file(5300)])])
    fake.add_version(100, dict(id=1001, published_at=NEW, files=[simple_file(5001)]))
    fake._versions[1030]["extra"] = {"files": "not a list", "id": "x"}
    entries = [entry_for(fake, 100, 1000, 5000), {"modelId": 103, "modelVersionId": 1030, "model_type": "lora"}]
    _, updates, errors = run_check(fake, entries)
    assert [u["model_id"] for u in updates] == [100]
    assert [e["model_id"] for e in errors] == [103]


def test_civitai_down_fails_the_check_without_asking_for_every_model(fake, monkeypatch):
    monkeypatch.setattr(updater_mod, "TRANSIENT_DELAY_S", 0.01)
    for mid in range(300, 310):
        add_model(fake, mid, [(mid * 10, OLD, [simple_file(mid * 100)])])
    entries = [entry_for(fake, mid, mid * 10, mid * 100) for mid in range(300, 310)]
    fake.set_api_fault(r"/api/v1/", 502)
    summary, updates, errors = run_check(fake, entries)
    assert updates == [] and len(errors) == 10
    assert not summary["ok"]
    assert any("not checked" in e["error"] for e in errors)
    # batch: 2 tries x 3 quick tries; then 3 models alone, 2 x 3 each; the rest not asked.
    assert summary["requests"] == len(fake.requests) <= 6 + 3 * 6


def test_rate_limited_batch_waits_for_retry_after(fake):
    add_model(fake, 100, [(1000, OLD, [simple_file(5000)])])
    fake.add_version(100, dict(id=1001, published_at=NEW, files=[simple_file(5001)]))
    fake.set_api_fault(r"ids=", 429, headers={"Retry-After": "1"}, times=1)
    started = time.monotonic()
    summary, updates, errors = run_check(fake, [entry_for(fake, 100, 1000, 5000)])
    assert time.monotonic() - started >= 0.95
    assert errors == [] and len(updates) == 1
    assert summary["requests"] == 2
    batch = [r for r in fake.requests if "ids=" in r.query]
    assert len(batch) == 2 and batch[1].time - batch[0].time >= 0.95


def test_more_than_a_hundred_models_go_in_batches_of_a_hundred(fake):
    entries = []
    for mid in range(1, 151):
        add_model(fake, mid, [(mid * 10, OLD, [simple_file(mid * 10)])])
        entries.append({"modelId": mid, "modelVersionId": mid * 10, "fileId": mid * 10, "model_type": "lora"})
    fake.add_version(150, dict(id=99999, published_at=NEW, files=[simple_file(99999)]))
    summary, updates, errors = run_check(fake, entries)
    assert errors == [] and [u["model_id"] for u in updates] == [150]
    assert summary["requests"] == 2 and summary["models"] == 150


def test_a_check_holds_one_batch_of_models_at_a_time(fake):
    """A library's models are not all kept until the check ends: when the next batch is asked
    for, no model of an earlier batch is alive (each is hundreds of KB on the real Civitai)."""
    import gc
    import weakref

    class Model(dict):  # a dict that can be watched with a weak reference
        pass

    entries = []
    for mid in range(1, 251):
        add_model(fake, mid, [(mid * 10, OLD, [simple_file(mid * 10)])])
        entries.append({"modelId": mid, "modelVersionId": mid * 10, "fileId": mid * 10, "model_type": "lora"})
    fake.add_version(7, dict(id=99999, published_at=NEW, files=[simple_file(99999)]))
    client = make_client(fake)
    real_get_models = client.get_models
    watched: list[weakref.ref] = []
    alive_at_ask: list[int] = []

    def get_models(ids):
        gc.collect()
        alive_at_ask.append(sum(ref() is not None for ref in watched))
        got = {mid: Model(model) for mid, model in real_get_models(ids).items()}
        watched.extend(weakref.ref(model) for model in got.values())
        return got

    client.get_models = get_models
    messages: list[dict] = []
    summary = UpdateChecker(client, messages.append).run(entries)
    assert summary["requests"] == 3 and summary["errors"] == 0 and summary["updates"] == 1
    assert len(watched) == 250 and alive_at_ask == [0, 0, 0]
    assert [m["model_id"] for m in messages if m["type"] == "update_found"] == [7]


def test_the_throttle_spaces_the_requests(fake, tmp_path):
    from ipc.throttle import Throttle

    add_model(fake, 100, [(1000, OLD, [simple_file(5000)])])
    entries = [entry_for(fake, 100, 1000, 5000), {"modelId": 9, "modelVersionId": 90, "model_type": "lora"},
               {"modelId": 8, "modelVersionId": 80, "model_type": "lora"}]
    client = CivitaiClient(fake.api_url, throttle=Throttle(tmp_path / "t", 0.3), session=CountingSession())
    UpdateChecker(client, lambda m: None).run(entries)
    times = [r.time for r in fake.requests]
    assert len(times) == 3
    assert all(b - a >= 0.28 for a, b in zip(times, times[1:]))


def test_stopping_ends_the_check(fake):
    add_model(fake, 100, [(1000, OLD, [simple_file(5000)])])
    with pytest.raises(updater_mod.CheckStopped):
        UpdateChecker(make_client(fake), lambda m: None, should_stop=lambda: True).run(
            [entry_for(fake, 100, 1000, 5000)])


def test_find_update_without_a_published_version_raises_a_sentence():
    from workers.civitai import CivitaiError

    with pytest.raises(CivitaiError, match="no published version"):
        find_update({"modelId": 1, "modelVersionId": 2}, {"id": 1, "modelVersions": []}, lambda v, f: "")


def test_check_at_start_is_due_after_24_hours_or_never():
    now = 1_700_000_000.0
    assert check_due_at_start(None, now)
    assert not check_due_at_start(now - 3600, now)
    assert not check_due_at_start(now - 23.9 * 3600, now)
    assert check_due_at_start(now - 24.1 * 3600, now)
    assert check_due_at_start(now + 3 * 24 * 3600, now)  # a record from the future: don't trust it


# --- the process ------------------------------------------------------------------------------


class Updater:
    """updater_main in a forked child, as the supervisor runs it, with this test as the supervisor."""

    def __init__(self, folder, fake, last_success_ts=None, update_time="04:00", patch=None):
        self.folder = folder
        self.last_success_ts = last_success_ts  # what the supervisor keeps in the job store
        config = {"civitai_url": fake.api_url, "throttle": 0, "update_time": update_time}
        (folder / "config.json").write_text(json.dumps(config))
        ctx = multiprocessing.get_context("fork")
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_run_updater, args=(child_conn, self.conn, str(folder / "config.json"), patch),
                                daemon=True)
        self.proc.start()
        child_conn.close()
        self.messages: list[dict] = []

    def recv_until(self, kind, timeout=10.0, predicate=lambda m: True) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.conn.poll(0.05):
                msg = self.conn.recv()
                self.messages.append(msg)
                if msg["type"] == kind and predicate(msg):
                    return msg
        raise AssertionError(f"no {kind!r} message within {timeout} s; got {self.messages}")

    def received(self, kind, wait=0.0) -> list[dict]:
        deadline = time.monotonic() + wait
        while True:
            try:
                while self.conn.poll(0):
                    self.messages.append(self.conn.recv())
            except EOFError:  # the updater has exited
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        return [m for m in self.messages if m["type"] == kind]

    def send(self, msg) -> None:
        if msg["type"] == "manifest":  # as the supervisor sends it
            msg = {"last_success_ts": self.last_success_ts, **msg}
        self.conn.send(msg)

    def close(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()


def _run_updater(conn, parent_end, config_path, patch):
    parent_end.close()  # as the supervisor's _child_entry does: our copy would hide its EOF
    if patch == "crash":
        def boom(self, entries):
            raise RuntimeError("a bug in the check")
        UpdateChecker.run = boom
    updater_mod.updater_main("updater", conn, config_path, None)


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.fixture
def spawn_updater(tmp_path, fake):
    made = []

    def make(**kw) -> Updater:
        folder = tmp_path / f"u{len(made)}"
        folder.mkdir()
        u = Updater(folder, fake, **kw)
        made.append(u)
        return u

    yield make
    for u in made:
        u.close()


def test_the_updater_never_opens_the_job_store(fake, spawn_updater):
    # It is forked while the supervisor's threads use SQLite: a mutex inherited locked would
    # deadlock its first sqlite3.connect. The supervisor hands it the last check's time instead.
    u = spawn_updater(last_success_ts=time.time() - 48 * 3600)
    u.recv_until("ready")
    u.send({"type": "manifest", "entries": []})
    assert u.recv_until("check_started")["why"] == "start"
    assert not (u.folder / "data" / "daemon.db").exists()
    assert "JobStore" not in Path(updater_mod.__file__).read_text()


def test_the_updater_checks_at_start_when_it_never_checked(fake, spawn_updater):
    add_model(fake, 100, [(1000, OLD, [simple_file(5000)])])
    fake.add_version(100, dict(id=1001, published_at=NEW, files=[simple_file(5001)]))
    u = spawn_updater()
    ready = u.recv_until("ready")
    assert ready["pid"] == u.proc.pid
    u.send({"type": "manifest", "entries": [entry_for(fake, 100, 1000, 5000)]})
    started = u.recv_until("check_started")
    assert started["why"] == "start"
    found = u.recv_until("update_found")
    assert found["entry"]["modelVersionId"] == 1001
    done = u.recv_until("check_done")
    assert done["ok"] and done["updates"] == 1 and done["requests"] == 1
    assert abs(done["unix_ts"] - time.time()) < 10
    assert datetime.fromisoformat(done["ts"].replace("Z", "+00:00"))
    u.send({"type": "stop"})
    u.proc.join(5)
    assert u.proc.exitcode == 0


def test_no_check_at_start_within_24_hours_but_on_demand_and_daily(fake, spawn_updater):
    add_model(fake, 100, [(1000, OLD, [simple_file(5000)])])
    soon = datetime.now() + timedelta(seconds=4)
    if soon.date() != datetime.now().date():
        pytest.skip("too close to midnight for a daily time a few seconds ahead")
    u = spawn_updater(last_success_ts=time.time() - 3600, update_time=soon.strftime("%H:%M:%S"))
    u.recv_until("ready")
    u.send({"type": "manifest", "entries": [entry_for(fake, 100, 1000, 5000)]})
    schedule_msg = u.recv_until("schedule")
    expected = soon.replace(microsecond=0).astimezone().timestamp()
    got = datetime.fromisoformat(schedule_msg["next_check"].replace("Z", "+00:00")).timestamp()
    assert abs(got - expected) < 1.5
    assert u.received("check_started", wait=1.0) == []
    assert fake.requests == []
    u.send({"type": "check_now"})
    assert u.recv_until("check_started")["why"] == "asked"
    assert u.recv_until("check_done")["ok"]
    daily = u.recv_until("check_started", timeout=10, predicate=lambda m: m["why"] == "daily")
    assert daily
    u.recv_until("check_done")
    # The next daily run is a day later.
    nxt = wait_for(lambda: u.received("schedule")[-1]["next_check"] != schedule_msg["next_check"]
                   and u.received("schedule")[-1])
    got = datetime.fromisoformat(nxt["next_check"].replace("Z", "+00:00")).timestamp()
    assert abs(got - (expected + 24 * 3600)) < 3700  # a DST change may shift it by an hour
    os.kill(u.proc.pid, signal.SIGTERM)
    u.proc.join(5)
    assert u.proc.exitcode == 0


def test_a_crash_inside_the_check_is_reported_and_the_updater_goes_on(fake, spawn_updater):
    u = spawn_updater(patch="crash")
    u.recv_until("ready")
    u.send({"type": "manifest", "entries": [{"modelId": 1, "modelVersionId": 2, "model_type": "lora"}]})
    done = u.recv_until("check_done")
    assert not done["ok"] and "a bug in the check" in done["error"]
    u.send({"type": "check_now"})
    assert not u.recv_until("check_done")["ok"]
    assert u.proc.is_alive()
    schedule_msgs = u.received("schedule")
    assert schedule_msgs  # a failed check schedules a retry (within the hour)
    u.send({"type": "stop"})
    u.proc.join(5)
    assert u.proc.exitcode == 0


def test_the_updater_ignores_sigint_and_exits_when_the_supervisor_is_gone(fake, spawn_updater):
    u = spawn_updater(last_success_ts=time.time())
    u.recv_until("ready")
    u.send({"type": "manifest", "entries": []})
    os.kill(u.proc.pid, signal.SIGINT)
    time.sleep(0.3)
    assert u.proc.is_alive()
    u.conn.close()  # EOF on its end of the pipe
    u.proc.join(5)
    assert u.proc.exitcode == 0


def test_stop_is_prompt_even_while_a_check_waits_on_civitai(fake, spawn_updater):
    add_model(fake, 100, [(1000, OLD, [simple_file(5000)])])
    fake.set_api_fault(r"ids=", "stall")  # Civitai never answers the batch
    for how in ("stop", "sigterm"):
        u = spawn_updater()
        u.recv_until("ready")
        u.send({"type": "manifest", "entries": [entry_for(fake, 100, 1000, 5000)]})
        u.recv_until("check_started")
        wait_for(lambda: any("ids=" in r.query for r in fake.requests))
        started = time.monotonic()
        if how == "stop":
            u.send({"type": "stop"})
        else:
            os.kill(u.proc.pid, signal.SIGTERM)
        u.proc.join(5)
        assert u.proc.exitcode == 0, how
        assert time.monotonic() - started < 2.5, how
        assert u.received("check_done") == []  # an unfinished check is not a success
