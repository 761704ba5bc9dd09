"""The job store: transitions, attempts before work, recovery, events in order, readers."""
import pytest

from ipc.states import IllegalTransition
from ipc.store import JobStore, StoreUnavailable, utc_now_iso


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "daemon.db")
    yield s
    s.close()


def test_attempt_is_persisted_before_work_and_recovered(store, tmp_path):
    job = store.add_job(model_id=1, version_id=2, file_id=3, model_type="lora", max_attempts=4)
    assert store.begin_attempt(job["id"])["attempts"] == 1
    reopened = JobStore(tmp_path / "daemon.db")  # as after kill -9
    recovered = reopened.recover_unfinished()
    assert [j["id"] for j in recovered] == [job["id"]]
    again = reopened.get_job(job["id"])
    assert again["state"] == "queued" and again["attempts"] == 1
    reopened.close()


def test_illegal_transition_refused(store):
    job = store.add_job(model_id=1)
    with pytest.raises(IllegalTransition):
        store.update_job(job["id"], state="done")


def test_runnable_order_priority_then_age_and_backoff(store):
    a = store.add_job(model_id=1, priority=10)
    b = store.add_job(model_id=2, priority=1)
    c = store.add_job(model_id=3, priority=10)
    store.update_job(c["id"], not_before=10_000)
    assert [j["id"] for j in store.runnable_jobs(now=5_000)] == [b["id"], a["id"]]
    assert [j["id"] for j in store.runnable_jobs(now=20_000)] == [b["id"], a["id"], c["id"]]


def test_find_active_by_file_or_unresolved_model(store):
    j = store.add_job(model_id=1, version_id=2, file_id=3)
    u = store.add_job(model_id=5)
    assert store.find_active(version_id=2, file_id=3)["id"] == j["id"]
    assert store.find_active(version_id=2, file_id=None)["id"] == j["id"]
    assert store.find_active(version_id=2, file_id=4) is None
    assert store.find_active(model_id=5)["id"] == u["id"]
    store.update_job(j["id"], state="cancelled")
    assert store.find_active(version_id=2, file_id=3) is None


def test_events_in_order_and_delivery_marks(store, tmp_path):
    ids = [store.add_event("e", {"n": n})["id"] for n in range(5)]
    assert ids == sorted(ids)
    reader = JobStore(tmp_path / "daemon.db", readonly=True)
    assert [e["n"] for e in reader.events_after(ids[1])] == [2, 3, 4]
    assert reader.last_event_id() == ids[-1]
    store.mark_delivered(ids[0])
    assert [e["id"] for e in store.undelivered_events()] == ids[1:]
    with pytest.raises(StoreUnavailable, match="cannot be written"):
        reader.add_event("x", {})  # the web process cannot write
    reader.close()


def test_counts_and_kv(store):
    store.add_job(model_id=1)
    assert store.job_counts()["queued"] == 1
    assert store.incr_kv("metrics.worker_restarts") == 1 and store.get_kv("metrics.worker_restarts") == 1


def test_prune_forgets_only_old_finished_jobs_and_delivered_events(store):
    old_done = store.add_job(model_id=1)
    store.update_job(old_done["id"], state="cancelled")
    active = store.add_job(model_id=2)
    delivered = store.add_event("e", {}, ts=1000.0)["id"]
    pending = store.add_event("e", {}, ts=1000.0)["id"]
    store.mark_delivered(delivered)
    import time as _time

    assert store.prune(older_than_s=3600, now=_time.time() + 7200) == (1, 1)
    assert store.get_job(old_done["id"]) is None and store.get_job(active["id"]) is not None
    assert [e["id"] for e in store.events_after(0)] == [pending]


def test_latest_finished_by_file_or_by_model_and_source(store):
    a = store.add_job(model_id=1, version_id=2, file_id=3)
    store.update_job(a["id"], state="failed")
    b = store.add_job(model_id=1, version_id=2, file_id=3)
    store.update_job(b["id"], state="cancelled")
    store.add_job(model_id=1, version_id=2, file_id=3)  # active: not finished
    assert store.latest_finished(version_id=2, file_id=3)["id"] == b["id"]
    assert store.latest_finished(version_id=2, file_id=None)["id"] == b["id"]
    assert store.latest_finished(version_id=2, file_id=4) is None
    m = store.add_job(model_id=9, source="manifest")
    store.update_job(m["id"], state="failed")
    assert store.latest_finished(model_id=9, source="manifest")["id"] == m["id"]
    assert store.latest_finished(model_id=9, source="api") is None


def test_owed_previews_outlive_a_restart_until_settled(store, tmp_path):
    store.owe_preview("/models/lora/a.safetensors")
    store.owe_preview("/models/lora/b.safetensors")
    store.owe_preview("/models/lora/a.safetensors")  # owed twice is owed once
    store.close()
    again = JobStore(tmp_path / "daemon.db")
    try:
        assert again.owed_previews() == ["/models/lora/a.safetensors", "/models/lora/b.safetensors"]
        again.preview_settled("/models/lora/a.safetensors")
        again.preview_settled("/models/lora/never-owed.safetensors")  # nothing to do
        assert again.owed_previews() == ["/models/lora/b.safetensors"]
    finally:
        again.close()


def test_timestamps_read_as_datetime_writes_them_also_across_seconds_and_at_rounding_edges():
    from datetime import UTC, datetime

    def slow(ts):
        dt = datetime.fromtimestamp(ts, tz=UTC)
        return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"

    # in order, back and forth (the cached second changes both ways), and fractions that round up
    stamps = [1_700_000_000 + i * 0.0137 for i in range(300)] + [5.9999996, 1.0000004, 1_700_000_000.9999996,
                                                                1_699_999_999.5, 0.0, 2_000_000_000.123456]
    for ts in stamps:
        assert utc_now_iso(ts) == slow(ts), ts
    assert utc_now_iso(1_700_000_000.9999996) == "2023-11-14T22:13:21.000Z"
