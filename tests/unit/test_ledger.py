"""The job ledger's rules, without processes or sockets: a real SQLite store in tmp_path and an
injected clock."""
from __future__ import annotations

import random

import pytest

from ipc.ledger import JobLedger, LedgerError, file_key, may_be_same_file
from ipc.retry import UNHASHED_GIVE_UP_S
from ipc.states import IllegalTransition, JobState
from ipc.store import JobStore


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "daemon.db")
    yield s
    s.close()


@pytest.fixture
def ledger(store, clock):
    led = JobLedger(store, max_attempts=4, clock=clock, rng=random.Random(7))
    led.load()
    return led


def names(outcome):
    return [name for name, _ in outcome.events]


def take_one(ledger, worker="w1"):
    got = ledger.take([worker])
    assert len(got) == 1, got
    return got[0][1]


def run_to_error(ledger, job, **msg):
    msg.setdefault("reason", "connection")
    msg.setdefault("retryable", True)
    msg.setdefault("error", "the connection broke")
    return ledger.on_error(job["id"], msg)


# --- identity and dedupe ------------------------------------------------------------------------

def test_file_keys_and_same_file_rule():
    a = {"id": 1, "model_id": 5, "version_id": 50, "file_id": 500}
    b = {"id": 2, "model_id": 5, "version_id": 50, "file_id": 501}
    c = {"id": 3, "model_id": 5, "version_id": None, "file_id": None}
    d = {"id": 4, "model_id": 6, "version_id": 50, "file_id": None}
    assert file_key(a) == ("file", 50, 500)
    assert file_key(c) == ("model", 5, (None, None, None))
    assert file_key({**c, "file_type": "VAE"}) == ("model", 5, ("vae", None, None))
    assert not may_be_same_file(a, b)  # two files of one version: may run side by side
    assert may_be_same_file(a, c)  # "newest of model 5" may be file 500
    assert may_be_same_file(a, d)  # version 50's primary may be file 500
    assert not may_be_same_file(c, {"id": 9, "model_id": 7, "version_id": None})


def test_the_same_file_is_queued_once(ledger):
    first = ledger.queue({"model_id": 1, "version_id": 10, "file_id": 100, "model_type": "lora"})
    again = ledger.queue({"model_id": 1, "version_id": 10, "file_id": 100, "model_type": "lora"})
    assert first.created and not again.created and again.job["id"] == first.job["id"]
    assert names(first) == ["download_queued"] and again.events == []
    vae = ledger.queue({"model_id": 1, "version_id": 10, "file_id": 101, "model_type": "vae"})
    assert vae.created, "a second file of the same model is its own job"
    sel = ledger.queue({"model_id": 1, "model_type": "vae", "file_type": "VAE"})
    newest = ledger.queue({"model_id": 1, "model_type": "lora"})
    assert sel.created and newest.created and sel.job["id"] != newest.job["id"]
    assert not ledger.queue({"model_id": 1, "model_type": "vae", "file_type": "vae"}).created  # no case


def test_a_version_by_url_is_the_unresolved_newest_of_its_model(ledger):
    newest = ledger.queue({"model_id": 3, "model_type": "checkpoint"})
    by_version = ledger.queue({"model_id": 3, "version_id": 30, "model_type": "checkpoint"})
    assert not by_version.created and by_version.job["id"] == newest.job["id"]
    by_file = ledger.queue({"model_id": 3, "version_id": 30, "file_id": 301, "model_type": "vae"})
    assert by_file.created, "a named file is not assumed to be the primary one"


def test_a_finished_file_is_queued_again_in_its_own_row(ledger, store):
    job = ledger.queue({"model_id": 1, "version_id": 10, "file_id": 100, "model_type": "lora"}).job
    take_one(ledger)
    ledger.on_done(job["id"], {"path": "lora/a.safetensors", "filename": "a.safetensors", "sha256": "ab" * 32,
                               "bytes": 5}, (5, 1))
    again = ledger.queue({"model_id": 1, "version_id": 10, "file_id": 100, "model_type": "lora", "priority": 3},
                         source="manifest", requeue_finished=True)
    assert again.created and again.job["id"] == job["id"]
    row = store.get_job(job["id"])
    assert row["state"] == "queued" and row["attempts"] == 0 and row["priority"] == 3
    assert store.job_counts()["queued"] == 1 and sum(store.job_counts().values()) == 1


def test_resolution_reindexes_the_job_under_its_file(ledger):
    job = ledger.queue({"model_id": 4, "model_type": "lora"}).job
    take_one(ledger)
    ledger.on_resolved(job["id"], {"model_id": 4, "version_id": 40, "file_id": 400, "filename": "x.safetensors",
                                   "sha256": "AB" * 32, "model_type": "LORA", "model_name": "Zxq Ink",
                                   "version_name": "v2"})
    assert ledger.find_active({"version_id": 40, "file_id": 400})["id"] == job["id"]
    assert job["model_type"] == "lora", "the entry's folder wins over the API's type"
    assert job["sha256"] == "ab" * 32 and job["model_name"] == "Zxq Ink"
    # ... and is still the answer to "the newest of model 4" it was queued as.
    assert ledger.find_active({"model_id": 4, "model_type": "lora"})["id"] == job["id"]
    assert ledger.find_active({"version_id": 40})["id"] == job["id"]
    assert ledger.find_active({"version_id": 40, "file_id": 401}) is None


# --- dispatch ---------------------------------------------------------------------------------------

def test_priority_then_age_then_not_before(ledger, clock):
    a = ledger.queue({"model_id": 1, "version_id": 1, "file_id": 1}).job
    b = ledger.queue({"model_id": 2, "version_id": 2, "file_id": 2, "priority": 1}).job
    c = ledger.queue({"model_id": 3, "version_id": 3, "file_id": 3}).job
    ledger.set_priority(c["id"], 1)
    got = [job["id"] for _, job, _ in ledger.take(["w1", "w2", "w3"])]
    assert got == [b["id"], c["id"], a["id"]]


def test_a_job_waiting_for_its_time_runs_when_due(ledger, clock):
    job = ledger.queue({"model_id": 1, "version_id": 1, "file_id": 1}).job
    take_one(ledger)
    run_to_error(ledger, job, retry_after_s=30)
    assert ledger.take(["w1"]) == []
    assert ledger.next_due() == pytest.approx(clock() + 30)
    clock.advance(31)
    assert take_one(ledger)["id"] == job["id"]


def test_the_same_file_never_runs_twice_at_once(ledger):
    newest = ledger.queue({"model_id": 7, "model_type": "checkpoint"}).job
    other_file = ledger.queue({"model_id": 7, "version_id": 70, "file_id": 702, "model_type": "vae"}).job
    unrelated = ledger.queue({"model_id": 8, "version_id": 80, "file_id": 800}).job
    got = [job["id"] for _, job, _ in ledger.take(["w1", "w2", "w3"])]
    assert got == [newest["id"], unrelated["id"]], "model 7's other file waits until its newest is resolved"
    ledger.on_resolved(newest["id"], {"version_id": 70, "file_id": 701})
    assert [job["id"] for _, job, _ in ledger.take(["w3"])] == [other_file["id"]]


def test_a_cancelled_then_retried_job_waits_for_its_worker_to_let_go(ledger):
    job = ledger.queue({"model_id": 1, "version_id": 1, "file_id": 1}).job
    take_one(ledger, "w1")
    cancelled = ledger.cancel(job["id"])
    assert not cancelled.remove_partial, "the worker still writes it: removed when it lets go"
    ledger.retry(job["id"])
    assert ledger.take(["w2"]) == [], "never on two workers at once"
    late = run_to_error(ledger, job, reason="cancelled", retryable=False)
    assert late.remove_partial is False and ledger.get(job["id"])["state"] == "queued"
    assert take_one(ledger, "w2")["id"] == job["id"]


def test_attempts_are_persisted_before_the_work(ledger, store, clock):
    job = ledger.queue({"model_id": 1, "version_id": 1, "file_id": 1}).job
    take_one(ledger)
    assert store.get_job(job["id"])["attempts"] == 1 and store.get_job(job["id"])["state"] == "downloading"
    fresh = JobLedger(store, clock=clock)  # as after kill -9
    recovered = fresh.load()
    assert [j["id"] for j in recovered] == [job["id"]]
    assert fresh.get(job["id"])["state"] == "queued" and fresh.get(job["id"])["attempts"] == 1
    assert take_one(fresh)["attempts"] == 2


def test_give_back_returns_the_attempt(ledger, store):
    job = ledger.queue({"model_id": 1, "version_id": 1, "file_id": 1}).job
    take_one(ledger)
    ledger.give_back(job["id"])
    assert store.get_job(job["id"])["attempts"] == 0 and take_one(ledger)["attempts"] == 1


# --- retry policy -----------------------------------------------------------------------------------

def test_retries_back_off_then_fail_with_the_reason(ledger, clock):
    job = ledger.queue({"model_id": 1, "version_id": 1, "file_id": 1}).job
    delays = []
    for _ in range(3):
        take_one(ledger)
        out = run_to_error(ledger, job)
        assert names(out) == ["download_retry"]
        delays.append(out.events[0][1]["delay_s"])
        clock.advance(1000)
    assert delays[0] < delays[1] < delays[2] and 2 <= delays[0] <= 2.4
    take_one(ledger)
    out = run_to_error(ledger, job)
    assert names(out) == ["download_failed"] and out.finished
    assert "gave up after 4 attempts" in out.events[0][1]["error"]
    assert ledger.get(job["id"])["state"] == "failed" and ledger.get(job["id"])["reason"] == "connection"


def test_retry_after_is_honoured_and_a_final_error_fails_at_once(ledger):
    job = ledger.queue({"model_id": 1, "version_id": 1, "file_id": 1}).job
    take_one(ledger)
    out = run_to_error(ledger, job, reason="rate_limited", retry_after_s=120)
    assert out.events[0][1]["delay_s"] == 120
    other = ledger.queue({"model_id": 2, "version_id": 2, "file_id": 2}).job
    take_one(ledger)
    out = run_to_error(ledger, other, reason="http_error", retryable=False, error="not found (404)")
    assert names(out) == ["download_failed"] and out.events[0][1]["error"] == "not found (404)"


def test_busy_waits_without_using_an_attempt(ledger, clock):
    job = ledger.queue({"model_id": 1, "version_id": 1, "file_id": 1}).job
    for _ in range(10):
        take_one(ledger)
        out = run_to_error(ledger, job, reason="busy", retry_after_s=10)
        # The start it had gets its end: a listener never sees one job start twice.
        assert names(out) == ["download_retry"]
        assert out.events[0][1] | {"error": ""} == {"job_id": job["id"], "attempt": 1, "delay_s": 10.0,
                                                    "waiting": True, "reason": "busy", "error": ""}
        clock.advance(11)
    assert ledger.get(job["id"])["attempts"] == 0 and ledger.get(job["id"])["state"] == "queued"


def test_a_job_that_never_reached_its_worker_is_given_back_with_an_end_to_its_start(ledger):
    job = ledger.queue({"model_id": 1, "version_id": 1, "file_id": 1}).job
    take_one(ledger)
    out = ledger.not_delivered(job["id"])
    assert names(out) == ["download_retry"] and out.events[0][1]["attempt"] == 1
    assert out.events[0][1]["delay_s"] == 0
    assert (ledger.get(job["id"])["state"], ledger.get(job["id"])["attempts"]) == ("queued", 0)
    assert job["id"] not in ledger.held
    assert take_one(ledger, "w2")["id"] == job["id"]  # at once, by the next worker
    ledger.cancel(job["id"])
    assert ledger.not_delivered(job["id"]).events == []  # no longer running: nothing to end


def test_early_access_waits_until_its_date(ledger, clock):
    job = ledger.queue({"model_id": 1, "version_id": 1, "file_id": 1}).job
    for _ in range(6):
        take_one(ledger)
        ends = clock() + 3 * 86400
        out = run_to_error(ledger, job, reason="early_access", wait=True, wait_until=ends, retryable=True,
                           error="early access until 2026-12-04 12:00 UTC; the download starts then")
        assert out.events[0][0] == "download_retry" and out.events[0][1]["waiting"] is True
        row = ledger.get(job["id"])
        assert row["state"] == "queued" and row["not_before"] == ends and row["attempts"] == 0
        assert "early access until" in row["error"]
        clock.t = ends + 1
    assert ledger.get(job["id"])["state"] == "queued"


def test_the_daily_quota_backs_off_an_hour_or_more(ledger):
    job = ledger.queue({"model_id": 1, "version_id": 1, "file_id": 1}).job
    take_one(ledger)
    out = run_to_error(ledger, job, reason="quota", wait=True, retry_after_s=2, error="daily download limit")
    assert out.events[0][1]["delay_s"] >= 3600 and ledger.get(job["id"])["attempts"] == 0
    # The quota is the account's: no other download starts before it is over, even after a restart.
    other = ledger.queue({"model_id": 2, "version_id": 2, "file_id": 2}).job
    assert ledger.take(["w1"]) == [] and not ledger.has_ready()
    again = JobLedger(ledger.store, clock=ledger.clock)
    again.load()
    assert again.take(["w1"]) == [] and again.next_due() == pytest.approx(ledger.quota_until)
    ledger.clock.t = ledger.quota_until + 1
    assert {j["id"] for _, j, _ in ledger.take(["w1", "w2"])} == {job["id"], other["id"]}


def test_an_unhashed_file_waits_up_to_a_day_then_fails_saying_so(ledger, clock):
    job = ledger.queue({"model_id": 1, "version_id": 1, "file_id": 1}).job
    start = clock()
    while True:
        take_one(ledger)
        out = run_to_error(ledger, job, reason="unhashed", wait=True, error="Civitai has not hashed the file yet")
        if out.finished:
            break
        assert 600 <= out.events[0][1]["delay_s"] <= 3600
        clock.t = ledger.get(job["id"])["not_before"] + 1
    assert clock() - start >= UNHASHED_GIVE_UP_S
    assert names(out) == ["download_failed"] and "after 24 h" in out.events[0][1]["error"]
    assert "not downloaded" in out.events[0][1]["error"]


def test_a_lost_worker_counts_by_its_cause(ledger, store):
    a = ledger.queue({"model_id": 1, "version_id": 1, "file_id": 1}).job
    b = ledger.queue({"model_id": 2, "version_id": 2, "file_id": 2}).job
    c = ledger.queue({"model_id": 3, "version_id": 3, "file_id": 3}).job
    ledger.take(["w1", "w2", "w3"])
    out = ledger.job_lost(a["id"], "timeout", -15, timeout_s=4)
    assert "timeout = 4 s" in out.events[0][1]["error"] and store.get_job(a["id"])["reason"] == "timeout"
    out = ledger.job_lost(b["id"], "crash", -9, timeout_s=4)
    assert "died (exit code -9)" in out.events[0][1]["error"]
    out = ledger.job_lost(c["id"], "shutdown", 0, timeout_s=4)
    assert out.events == [] and store.get_job(c["id"])["attempts"] == 0


def test_a_late_message_about_a_finished_job_changes_nothing(ledger):
    job = ledger.queue({"model_id": 1, "version_id": 1, "file_id": 1}).job
    take_one(ledger)
    ledger.on_error(job["id"], {"reason": "http_error", "retryable": False, "error": "x"})
    assert ledger.on_done(job["id"], {"path": "a/b", "filename": "b", "sha256": "0" * 64, "bytes": 1}, None).events == []
    assert ledger.on_resolved(job["id"], {"version_id": 9}).events == []


# --- done, cancel, pause ------------------------------------------------------------------------------

def test_done_records_the_file_and_counts_bytes_that_never_go_down(ledger, store):
    job = ledger.queue({"model_id": 1, "version_id": 1, "file_id": 1}).job
    take_one(ledger)
    out = ledger.on_done(job["id"], {"path": "lora/a.safetensors", "filename": "a.safetensors",
                                     "sha256": "AB" * 32, "bytes": 1234}, (1234, 99))
    assert names(out) == ["download_completed"] and out.events[0][1]["sha256"] == "ab" * 32
    assert store.get_file("lora/a.safetensors")["size"] == 1234
    assert store.get_kv("metrics.downloaded_bytes") == 1234
    assert store.prune(older_than_s=0, now=4e9) == (1, 0)
    assert store.get_kv("metrics.downloaded_bytes") == 1234


def test_cancel_of_a_queued_job_removes_its_partial_at_once(ledger):
    job = ledger.queue({"model_id": 1, "version_id": 1, "file_id": 1}).job
    out = ledger.cancel(job["id"])
    assert out.remove_partial and names(out) == ["download_cancelled"]
    with pytest.raises(LedgerError) as err:
        ledger.cancel(job["id"])
    assert err.value.status == 409
    with pytest.raises(LedgerError) as err:
        ledger.cancel(10**12)
    assert err.value.status == 404
    assert ledger.take(["w1"]) == []


def test_cancel_of_a_running_job_removes_its_partial_when_the_worker_lets_go(ledger):
    job = ledger.queue({"model_id": 1, "version_id": 1, "file_id": 1}).job
    take_one(ledger)
    assert not ledger.cancel(job["id"]).remove_partial
    assert run_to_error(ledger, job, reason="cancelled").remove_partial
    other = ledger.queue({"model_id": 2, "version_id": 2, "file_id": 2}).job
    take_one(ledger)
    ledger.cancel(other["id"])
    assert ledger.job_lost(other["id"], "cancel", -9, timeout_s=60).remove_partial


@pytest.mark.parametrize("lets_go", ["error", "killed"])
def test_a_job_cancelled_before_its_worker_resolved_it_still_finds_its_partial(ledger, lets_go):
    """Seen in the soak: a job without a file name yet (a model id only), cancelled just after
    dispatch. Its worker resolves it and writes part of the file before it sees the cancel; the
    partial is found by the name the worker resolved, not left behind."""
    job = ledger.queue({"model_id": 1}).job
    take_one(ledger)
    ledger.cancel(job["id"])
    ledger.on_resolved(job["id"], {"model_id": 1, "version_id": 11, "file_id": 111, "model_type": "checkpoint",
                                   "filename": "m.safetensors", "sha256": "AB" * 32})
    out = (run_to_error(ledger, job, reason="cancelled") if lets_go == "error"
           else ledger.job_lost(job["id"], "cancel", -9, timeout_s=60))
    assert out.remove_partial
    assert (out.job["model_type"], out.job["filename"], out.job["state"]) == ("checkpoint", "m.safetensors",
                                                                              "cancelled")


@pytest.mark.parametrize("asked", [{"model_id": 1}, {"model_id": 1, "version_id": 11}])
def test_a_job_resolved_before_a_restart_is_still_the_job_for_what_it_was_asked(store, clock, asked):
    """Found by test_pause_live: a model-only entry's paused job, resolved to its file, was not
    recognised by the sync after a restart, which queued the file a second time."""
    first = JobLedger(store, max_attempts=4, clock=clock)
    first.load()
    job = first.queue({**asked, "model_type": "checkpoint"}).job
    take_one(first)
    first.on_resolved(job["id"], {"model_id": 1, "version_id": 11, "file_id": 111, "filename": "m.safetensors"})
    first.pause(job["id"])
    again = JobLedger(store, max_attempts=4, clock=clock)  # the next start
    again.load()
    for spec in (asked, {"model_id": 1, "version_id": 11}, {"model_id": 1, "version_id": 11, "file_id": 111}):
        out = again.queue({**spec, "model_type": "checkpoint"})
        assert not out.created and out.job["id"] == job["id"], spec
    if "version_id" in asked:
        other = again.queue({"model_id": 1, "version_id": 12, "model_type": "checkpoint"})
        assert other.created, "another version of the model is another file"


def test_a_pinned_job_is_no_job_for_the_newest_of_its_model_after_a_restart(store, clock):
    first = JobLedger(store, max_attempts=4, clock=clock)
    first.load()
    pinned = first.queue({"model_id": 1, "version_id": 11, "file_id": 111}).job
    again = JobLedger(store, max_attempts=4, clock=clock)
    again.load()
    newest = again.queue({"model_id": 1})
    assert newest.created and newest.job["id"] != pinned["id"]


def test_pause_keeps_the_attempt_and_resume_queues_it(ledger, store):
    job = ledger.queue({"model_id": 1, "version_id": 1, "file_id": 1}).job
    take_one(ledger)
    out = ledger.pause(job["id"])
    assert names(out) == ["download_paused"] and store.get_job(job["id"])["state"] == "paused"
    assert store.get_job(job["id"])["attempts"] == 0
    run_to_error(ledger, job, reason="cancelled")  # its worker stopped
    assert ledger.take(["w1"]) == []
    with pytest.raises(IllegalTransition):
        ledger._set(ledger.get(job["id"]), state=JobState.DONE)
    with pytest.raises(LedgerError) as err:
        ledger.pause(ledger.cancel(ledger.queue({"model_id": 9, "version_id": 9, "file_id": 9}).job["id"]).job["id"])
    assert err.value.status == 409
    assert names(ledger.resume(job["id"])) == ["download_resumed"]
    assert take_one(ledger)["id"] == job["id"]


def test_pause_everything_survives_a_restart(ledger, store, clock):
    ledger.queue({"model_id": 1, "version_id": 1, "file_id": 1})
    assert names(ledger.set_paused_all(True)) == ["daemon_paused"]
    assert ledger.take(["w1"]) == []
    again = JobLedger(store, clock=clock)
    again.load()
    assert again.paused_all and again.take(["w1"]) == []
    assert names(again.set_paused_all(False)) == ["daemon_resumed"]
    assert len(again.take(["w1"])) == 1


def test_a_running_job_stopped_by_pause_all_is_given_back(ledger, store):
    job = ledger.queue({"model_id": 1, "version_id": 1, "file_id": 1}).job
    take_one(ledger)
    ledger.set_paused_all(True)
    run_to_error(ledger, job, reason="cancelled")
    assert store.get_job(job["id"])["state"] == "queued" and store.get_job(job["id"])["attempts"] == 0


def test_a_retry_while_the_same_file_is_active_again_is_that_job(ledger):
    job = ledger.queue({"model_id": 1, "version_id": 1, "file_id": 1}).job
    ledger.cancel(job["id"])
    again = ledger.queue({"model_id": 1, "version_id": 1, "file_id": 1}).job
    out = ledger.retry(job["id"])
    assert out.job["id"] == again["id"] and out.events == [] and ledger.get(job["id"])["state"] == "cancelled"


def test_queueing_thousands_is_one_lookup_each(ledger, store):
    with store.transaction():
        for i in range(1, 3001):
            ledger.queue({"model_id": i, "model_type": "checkpoint"}, source="manifest")
    with store.transaction():
        again = [ledger.queue({"model_id": i, "model_type": "checkpoint"}).created for i in range(1, 3001)]
    assert not any(again) and store.job_counts()["queued"] == 3000
    got = ledger.take([f"w{i}" for i in range(8)])
    assert [job["model_id"] for _, job, _ in got] == list(range(1, 9))
