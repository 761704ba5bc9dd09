"""workers/download.run_job against the local fake Civitai (real HTTP on loopback): fresh and
resumed downloads, every fault the fake can play, names on disk, cancel and stall."""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ipc import files
from ipc.files import atomic_write
from tests.fakeciv import FakeCivitai, running_fake
from tests.helpers import wait_until
from workers import download
from workers.civitai import CivitaiClient, CivitaiError
from workers.download import JobContext, run_job

MiB = 1 << 20
KEY = "test-key-0123456789"


class Runner:
    """run_job with a collecting report() and a should_stop() tests can trip."""

    def __init__(self, fake: FakeCivitai, base: Path, **ctx_kw):
        self.fake = fake
        self.base = base
        self.messages: list[dict] = []
        self.stop = threading.Event()
        self.on_message = None
        client = CivitaiClient(fake.api_url, api_key=KEY, timeout_s=5)
        kw = dict(allow_unsafe=False, read_timeout_s=3)
        kw.update(ctx_kw)
        self.ctx = JobContext(client=client, download_dir=base / "models", locks_dir=base / "locks", **kw)

    def report(self, msg: dict) -> None:
        json.dumps(msg)  # must travel over a Pipe as plain data
        self.messages.append(msg)
        if self.on_message:
            self.on_message(msg)

    def run(self, **job) -> dict:
        spec = dict(job_id=1, model_id=None, version_id=None, file_id=None, model_type=None, filename=None,
                    sha256=None, attempt=1)
        spec.update(job)
        return run_job(spec, self.ctx, self.report, self.stop.is_set)

    def fail(self, **job) -> CivitaiError:
        with pytest.raises(CivitaiError) as err:
            self.run(**job)
        assert KEY not in str(err.value) and "sig=" not in str(err.value)
        return err.value

    def types(self) -> list[str]:
        return [m["type"] for m in self.messages]

    def folder(self, model_type: str = "checkpoint") -> Path:
        return self.base / "models" / model_type

    def listing(self, model_type: str = "checkpoint") -> list[str]:
        folder = self.folder(model_type)
        return sorted(os.listdir(folder)) if folder.exists() else []


@pytest.fixture
def fake():
    with running_fake(KEY) as fake:
        yield fake


@pytest.fixture
def runner(fake, tmp_path):
    return Runner(fake, tmp_path)


def add_model(fake, model_id=1, versions=None, type="Checkpoint", **file_kw):  # noqa: A002
    if versions is None:
        spec = dict(id=111, name="model.safetensors", size_bytes=3 * MiB + 123, primary=True)
        spec.update(file_kw)
        versions = [dict(id=11, published_at="2025-01-01T00:00:00.000Z", files=[spec])]
    fake.add_model(model_id, name="Model", type=type, versions=versions)


def sha(fake, file_id) -> str:
    return fake.file_sha256(file_id).lower()


def cdn_requests(fake):
    return fake.requests_to("cdn", method="GET")


# -- the plain path -------------------------------------------------------------------------------

def test_newest_version_by_date_downloaded_verified_and_renamed(fake, runner):
    fake.add_model(1, type="Checkpoint", versions=[
        dict(id=12, published_at="2025-03-01T00:00:00.000Z",
             files=[dict(id=121, name="new.safetensors", size_bytes=2 * MiB + 7, primary=True)]),
        dict(id=13, published_at="2025-05-01T00:00:00.000Z",  # newest, though not first
             files=[dict(id=131, name="newest.safetensors", size_bytes=2 * MiB + 9, primary=True),
                    dict(id=132, name="newest_fp32.safetensors", size_bytes=MiB, fp="fp32")]),
        dict(id=11, published_at="2025-01-01T00:00:00.000Z",
             files=[dict(id=111, name="old.safetensors", size_bytes=MiB, primary=True)]),
    ])
    done = runner.run(model_id=1)
    assert done == {"type": "done", "job_id": 1, "path": "checkpoint/newest.safetensors",
                    "filename": "newest.safetensors", "sha256": sha(fake, 131), "bytes": 2 * MiB + 9,
                    "skipped": False}
    target = runner.folder() / "newest.safetensors"
    assert hashlib.sha256(target.read_bytes()).hexdigest() == sha(fake, 131)
    assert runner.listing() == ["newest.safetensors"]  # no .part, no sidecar
    resolved = runner.messages[0]
    assert resolved == {"type": "resolved", "job_id": 1, "model_id": 1, "version_id": 13, "file_id": 131,
                        "model_type": "checkpoint", "filename": "newest.safetensors", "sha256": sha(fake, 131),
                        "bytes_total": 2 * MiB + 9, "updatedAt": "2025-05-01T00:00:00.000Z",
                        "url": f"{fake.origin}/api/download/models/13?fileId=131", "model_name": "Model",
                        "version_name": "v13", "base_model": "SDXL 1.0"}
    types = runner.types()
    assert types[0] == "resolved" and types[-1] == "verifying" and "progress" in types
    progress = [m for m in runner.messages if m["type"] == "progress"]
    assert progress[-1]["bytes_done"] == progress[-1]["bytes_total"] == 2 * MiB + 9
    # the key went to the API origin only, as a Bearer header
    api_dl = fake.requests_to("api", path_re="/api/download/")
    assert api_dl[0].headers.get("Authorization") == f"Bearer {KEY}"
    assert all(r.headers.get("Authorization") is None and r.headers.get("Cookie") is None
               for r in cdn_requests(fake))
    assert all(KEY not in r.url_path for r in fake.requests)


class FolderSyncs:
    """Records each fsync of a folder (through ipc.files, the one copy) with whether finalize.lock
    was free then and what the folder held."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.events: list[tuple] = []

    def fsync_dir(self, folder) -> None:
        (self.tmp_path / "locks").mkdir(exist_ok=True)
        lock = os.open(self.tmp_path / "locks" / "finalize.lock", os.O_RDWR | os.O_CREAT)
        try:
            free = files.try_lock_fd(lock)  # another open file: refused while the job holds it
            if free:
                files.unlock_fd(lock)
        finally:
            os.close(lock)
        self.events.append(("fsync_dir", Path(folder), free, sorted(os.listdir(folder))))

    def on_verified(self, res, path) -> None:
        self.events.append(("verified", path.name))
        atomic_write(path.with_name(path.stem + ".civitai.info"), b"{}")


def test_the_file_and_its_sidecar_are_durable_before_done_by_one_folder_sync_outside_the_lock(fake, tmp_path,
                                                                                            monkeypatch):
    """The verified file's rename and its .civitai.info's (written by ctx.on_verified) are made
    durable together, after the finalize lock (which the other workers wait for) is released and
    before run_job returns the `done`: one fsync of the folder, not one inside the lock and one
    for the sidecar."""
    add_model(fake)
    syncs = FolderSyncs(tmp_path)
    monkeypatch.setattr(files.OS, "fsync_dir", syncs.fsync_dir)
    runner = Runner(fake, tmp_path, on_verified=syncs.on_verified)
    done = runner.run(model_id=1)
    folder = runner.folder()
    after = syncs.events[syncs.events.index(("verified", "model.safetensors")):]
    assert after == [("verified", "model.safetensors"),
                     ("fsync_dir", folder, True, ["model.civitai.info", "model.safetensors"])]
    assert not any(e[0] == "fsync_dir" and not e[2] for e in syncs.events)  # none under the lock
    assert done["path"] == "checkpoint/model.safetensors"


def test_a_file_found_in_place_is_made_durable_before_its_done_too(fake, tmp_path, monkeypatch):
    """Another job's rename of the same file may still wait for its fsync: a job that finds the
    file there (skipped) syncs the folder itself before it reports `done`, sidecar or not."""
    add_model(fake)
    syncs = FolderSyncs(tmp_path)
    monkeypatch.setattr(files.OS, "fsync_dir", syncs.fsync_dir)
    runner = Runner(fake, tmp_path)  # no sidecar writer: nothing else would sync the folder
    runner.folder().mkdir(parents=True)
    (runner.folder() / "model.safetensors").write_bytes(fake.file_bytes(111))
    done = runner.run(model_id=1)
    assert done["skipped"] is True
    assert syncs.events[-1:] == [("fsync_dir", runner.folder(), True, ["model.safetensors"])]


def test_manifest_filename_and_model_type_are_used_and_made_safe(fake, runner):
    add_model(fake, type="LORA")
    done = runner.run(model_id=1, version_id=11, file_id=111, model_type="loras",
                      filename="../../escape/My Model.safetensors", sha256=sha(fake, 111).upper())
    assert done["path"] == "loras/My Model.safetensors"
    assert (runner.base / "models" / "loras" / "My Model.safetensors").is_file()
    assert not (runner.base / "escape").exists()


def test_invalid_model_type_is_refused(fake, runner):
    add_model(fake)
    err = runner.fail(model_id=1, model_type="../etc")
    assert err.reason == "path_conflict" and "model_type" in str(err)


@pytest.mark.parametrize("model_type", ["models/Stable-diffusion", "Lora/SDXL/characters", "Lora"])
def test_a_folder_as_the_users_ui_names_it_is_used_as_written(fake, runner, model_type):
    add_model(fake)
    done = runner.run(model_id=1, model_type=model_type)
    assert done["path"] == f"{model_type}/model.safetensors"
    assert (runner.base / "models" / model_type / "model.safetensors").is_file()


@pytest.mark.parametrize("model_type, words", [
    ("models/../../etc", "'..' is not allowed"), ("Lora/CON", "reserved device name"),
    ("Lora/trailing.", "ends in a dot"), ("/abs", "relative to download_dir"),
])
def test_a_folder_the_rules_refuse_says_why(fake, runner, model_type, words):
    add_model(fake)
    err = runner.fail(model_id=1, model_type=model_type)
    assert err.reason == "path_conflict" and "model_type" in str(err) and words in str(err)
    assert fake.requests == []


def test_a_symlink_inside_a_nested_folder_is_not_followed(fake, runner, tmp_path):
    add_model(fake)
    outside = tmp_path / "outside"
    outside.mkdir()
    (runner.base / "models" / "models").mkdir(parents=True)
    os.symlink(outside, runner.base / "models" / "models" / "Stable-diffusion")
    err = runner.fail(model_id=1, model_type="models/Stable-diffusion/sdxl")
    assert err.reason == "path_conflict" and "symlink" in str(err)
    assert os.listdir(outside) == []


def test_model_type_folder_symlinked_outside_is_refused(fake, runner, tmp_path):
    add_model(fake)
    outside = tmp_path / "outside"
    outside.mkdir()
    (runner.base / "models").mkdir()
    os.symlink(outside, runner.base / "models" / "checkpoint")
    err = runner.fail(model_id=1)
    assert err.reason == "path_conflict"
    assert os.listdir(outside) == []


def test_a_file_civitai_has_not_hashed_waits_and_is_never_placed_unverified(fake, runner):
    add_model(fake, hashed=False)  # just uploaded: no hashes, scans Pending
    before = time.time()
    err = runner.fail(model_id=1)
    assert (err.reason, err.wait, err.retryable) == ("unhashed", True, True)
    assert before + 850 <= err.wait_until <= time.time() + 950  # asked again in about 15 min
    assert "has not hashed the file of model version 11 (model.safetensors) yet (its scan is pending)" in str(err)
    assert "not placed unverified" in str(err)
    assert runner.messages[0]["type"] == "resolved" and runner.messages[0]["sha256"] is None
    assert cdn_requests(fake) == [] and fake.requests_to("api", path_re="/api/download/") == []
    assert runner.listing() == []
    fake.hash_file(111)  # Civitai's scan is done: the next try downloads and verifies
    assert runner.run(model_id=1)["sha256"] == sha(fake, 111)


def test_an_unhashed_file_with_a_hash_from_the_manifest_is_verified_with_it(fake, runner):
    add_model(fake, hashed=False)
    done = runner.run(model_id=1, sha256=sha(fake, 111).upper())
    assert done["sha256"] == sha(fake, 111)


def test_unsafe_file_is_refused_unless_allowed(fake, runner, tmp_path):
    add_model(fake, pickle_scan="Danger")
    err = runner.fail(model_id=1)
    assert err.reason == "unsafe" and "allow_unsafe" in str(err) and not err.retryable
    assert cdn_requests(fake) == [] and runner.listing() == []
    allowed = Runner(fake, tmp_path / "b", allow_unsafe=True)
    assert allowed.run(model_id=1)["bytes"] == 3 * MiB + 123


# -- names on disk -------------------------------------------------------------------------------

def test_existing_identical_file_is_skipped_without_downloading(fake, runner):
    add_model(fake)
    runner.folder().mkdir(parents=True)
    (runner.folder() / "model.safetensors").write_bytes(fake.file_bytes(111))
    done = runner.run(model_id=1)
    assert done["skipped"] is True and done["path"] == "checkpoint/model.safetensors"
    assert done["bytes"] == 3 * MiB + 123 and done["sha256"] == sha(fake, 111)
    assert cdn_requests(fake) == []
    assert fake.requests_to("api", path_re="/api/download/") == []


def test_different_file_at_target_is_never_overwritten(fake, runner):
    add_model(fake)
    runner.folder().mkdir(parents=True)
    mine = runner.folder() / "model.safetensors"
    mine.write_bytes(b"the user's own file")
    done = runner.run(model_id=1)
    assert done["filename"] == "model_11.safetensors" and done["path"] == "checkpoint/model_11.safetensors"
    assert runner.messages[0]["filename"] == "model_11.safetensors"
    assert mine.read_bytes() == b"the user's own file"
    # the alternate is taken too: version and file id
    (runner.folder() / "model_11.safetensors").write_bytes(b"another")
    mine.write_bytes(b"still mine")
    assert runner.run(model_id=1)["filename"] == "model_11_111.safetensors"


def test_symlink_at_target_is_not_followed(fake, runner, tmp_path):
    add_model(fake)
    runner.folder().mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"keep me")
    os.symlink(victim, runner.folder() / "model.safetensors")
    done = runner.run(model_id=1)
    assert done["filename"] == "model_11.safetensors"
    assert victim.read_bytes() == b"keep me"
    assert (runner.folder() / "model.safetensors").is_symlink()


def test_symlink_at_part_path_is_not_followed(fake, runner, tmp_path):
    add_model(fake)
    runner.folder().mkdir(parents=True)
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"keep me")
    os.symlink(victim, runner.folder() / ".model.safetensors.part")
    runner.run(model_id=1)
    assert victim.read_bytes() == b"keep me"


def test_name_taken_while_downloading_goes_to_the_alternate(fake, runner):
    add_model(fake)

    def squat(msg):
        if msg["type"] == "verifying":
            (runner.folder() / "model.safetensors").write_bytes(b"a concurrent job won the name")

    runner.on_message = squat
    done = runner.run(model_id=1)
    assert done["filename"] == "model_11.safetensors"
    assert (runner.folder() / "model.safetensors").read_bytes() == b"a concurrent job won the name"
    assert sorted(runner.listing()) == ["model.safetensors", "model_11.safetensors"]


def test_two_jobs_wanting_the_same_name_never_share_a_partial_file(fake, tmp_path):
    fake.add_model(1, versions=[
        dict(id=11, files=[dict(id=111, name="same.safetensors", size_bytes=2 * MiB, primary=True)]),
        dict(id=12, files=[dict(id=121, name="same.safetensors", size_bytes=2 * MiB + 1, primary=True)]),
    ])
    for fid in (111, 121):
        fake.set_fault(fid, "drip", bps=4 * MiB, after_bytes=MiB)  # both are mid-download at once
    runners = [Runner(fake, tmp_path), Runner(fake, tmp_path)]
    results: dict = {}

    def go(i, vid):
        try:
            results[vid] = runners[i].run(job_id=i, version_id=vid)
        except Exception as exc:  # noqa: BLE001 - reported below
            results[vid] = exc

    threads = [threading.Thread(target=go, args=(0, 11)), threading.Thread(target=go, args=(1, 12))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert {r["sha256"] for r in results.values()} == {sha(fake, 111), sha(fake, 121)}, results
    names = sorted(r["filename"] for r in results.values())
    assert names[0] == "same.safetensors" and names[1] in ("same_11.safetensors", "same_12.safetensors")
    assert sorted(runners[0].listing()) == names


class Holder:
    """Another job's claim on a partial file: the file open and locked, as _claim_part leaves it."""

    def __init__(self, part: Path):
        part.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
        assert files.try_lock_fd(self.fd)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # drops the lock
            self.fd = -1


def sidecar_writes(monkeypatch) -> list[Path]:
    written: list[Path] = []
    real = download._Job._write_sidecar

    def spy(job, path, data):
        written.append(Path(path))
        real(job, path, data)

    monkeypatch.setattr(download._Job, "_write_sidecar", spy)
    return written


def test_a_small_file_that_arrives_at_once_makes_no_resume_record(fake, runner, monkeypatch):
    """Two of a download's three temporary files are its resume record and that record's own
    temporary file: a body that is all there within RECORD_AFTER_S needs neither."""
    monkeypatch.setattr(download, "RECORD_AFTER_S", 30.0)  # however slow the machine
    written = sidecar_writes(monkeypatch)
    add_model(fake, size_bytes=256 * 1024)
    assert runner.run(model_id=1)["sha256"] == sha(fake, 111)
    assert written == [] and runner.listing() == ["model.safetensors"]


def test_a_body_that_takes_a_while_is_recorded_while_it_streams(fake, runner, monkeypatch):
    """A worker killed mid-body runs no clean-up: the record must already be there."""
    monkeypatch.setattr(download, "RECORD_AFTER_S", 0.2)
    add_model(fake)
    fake.set_fault(111, "stall", times=1, after_bytes=MiB)  # holds the body until the client lets go
    side = runner.folder() / ".model.safetensors.part.json"
    thread = threading.Thread(target=lambda: pytest.raises(CivitaiError, runner.run, model_id=1), daemon=True)
    thread.start()
    try:
        wait_until(side.exists, 5, message="the resume record, while the body is still coming")
        assert thread.is_alive()
        record = json.loads(side.read_text())
        assert (record["version_id"], record["file_id"], record["total"]) == (11, 111, 3 * MiB + 123)
    finally:
        runner.stop.set()
        thread.join(10)
    runner.stop.clear()
    done = runner.run(model_id=1, attempt=2)
    assert done["sha256"] == sha(fake, 111)
    assert cdn_requests(fake)[-1].headers.get("Range")  # resumed from the record


def test_an_unrecorded_partial_file_of_another_job_is_waited_for_not_shared(fake, runner, monkeypatch):
    """Another job holds the partial file and has no record yet: this job waits a moment for it,
    then treats it as the same file on its way (busy), never as free and never as someone
    else's, which would fetch the same file twice under another name."""
    monkeypatch.setattr(download, "HOLDER_WAIT_S", 0.3)
    add_model(fake)
    holder = Holder(runner.folder() / ".model.safetensors.part")
    try:
        started = time.monotonic()
        err = runner.fail(model_id=1)
        assert err.reason == "busy" and err.retryable and time.monotonic() - started >= 0.3
        assert cdn_requests(fake) == []
    finally:
        holder.release()


def test_a_waiting_job_takes_the_holders_file_once_it_is_in_place(fake, runner, monkeypatch):
    monkeypatch.setattr(download, "HOLDER_WAIT_S", 10.0)
    add_model(fake)
    part = runner.folder() / ".model.safetensors.part"
    holder = Holder(part)

    def finish():  # the other job's last steps: its verified file renamed into place, claim gone
        time.sleep(0.3)
        part.write_bytes(fake.file_bytes(111))
        os.replace(part, runner.folder() / "model.safetensors")
        holder.release()

    threading.Thread(target=finish, daemon=True).start()
    done = runner.run(model_id=1)
    assert done["skipped"] and done["filename"] == "model.safetensors"
    assert cdn_requests(fake) == []


def test_a_waiting_job_goes_to_another_name_once_the_holder_records_another_file(fake, runner, monkeypatch):
    monkeypatch.setattr(download, "HOLDER_WAIT_S", 10.0)
    add_model(fake)
    part = runner.folder() / ".model.safetensors.part"
    holder = Holder(part)
    try:
        def record():
            time.sleep(0.3)
            part.with_name(part.name + ".json").write_text(json.dumps({"version_id": 99, "file_id": 999}))

        threading.Thread(target=record, daemon=True).start()
        assert runner.run(model_id=1)["filename"] == "model_11.safetensors"
    finally:
        holder.release()


# -- resume ------------------------------------------------------------------------------------------

def test_reset_is_retryable_and_leaves_no_final_file(fake, runner):
    add_model(fake)
    fake.set_fault(111, "reset", times=1, after_bytes=2 * MiB + 100)
    err = runner.fail(model_id=1)
    assert (err.reason, err.retryable) == ("connection", True)
    assert "broke" in str(err) or "ended after" in str(err)
    # a RST may discard what the socket had buffered: the part holds at most what was sent
    part = runner.folder() / ".model.safetensors.part"
    assert not part.exists() or part.stat().st_size <= 2 * MiB + 100
    assert not (runner.folder() / "model.safetensors").exists()
    assert runner.run(model_id=1)["sha256"] == sha(fake, 111)


def test_cut_connection_keeps_the_part_and_the_next_attempt_resumes_with_if_range(fake, runner):
    size = 4 * MiB + 5
    add_model(fake, size_bytes=size)
    fake.set_fault(111, "short", times=1, after_bytes=2 * MiB + 100)
    err = runner.fail(model_id=1)
    assert (err.reason, err.retryable) == ("connection", True)
    part = runner.folder() / ".model.safetensors.part"
    kept = part.stat().st_size
    assert kept == 2 * MiB + 100
    sidecar = json.loads((runner.folder() / ".model.safetensors.part.json").read_text())
    assert (sidecar["version_id"], sidecar["file_id"], sidecar["total"]) == (11, 111, size)
    assert not (runner.folder() / "model.safetensors").exists()
    done = runner.run(model_id=1, attempt=2)
    assert done["sha256"] == sha(fake, 111) and done["bytes"] == size
    last = cdn_requests(fake)[-1]
    resumed_at = int(last.headers.get("Range").removeprefix("bytes=").removesuffix("-"))
    assert kept - 4096 < resumed_at <= kept  # direct I/O resumes from a 4 KiB boundary
    assert last.headers.get("If-Range") == sidecar["etag"]
    assert fake.bytes_served(111) == size + kept - resumed_at
    assert runner.listing() == ["model.safetensors"]


def test_part_of_another_version_is_discarded(fake, runner):
    add_model(fake)
    runner.folder().mkdir(parents=True)
    (runner.folder() / ".model.safetensors.part").write_bytes(b"x" * 1000)
    (runner.folder() / ".model.safetensors.part.json").write_text(
        json.dumps({"version_id": 10, "file_id": 100, "sha256": None, "etag": '"old"', "total": 5000}))
    assert runner.run(model_id=1)["sha256"] == sha(fake, 111)
    assert all(r.headers.get("Range") is None for r in cdn_requests(fake))


def test_200_to_a_range_request_restarts_from_zero(fake, runner):
    add_model(fake)
    fake.set_fault(111, "short", times=1, after_bytes=MiB + 10)
    runner.fail(model_id=1)
    fake.set_fault(111, "ignore_range", times=1)
    assert runner.run(model_id=1)["sha256"] == sha(fake, 111)
    assert cdn_requests(fake)[-1].headers.get("Range") is not None


def test_changed_file_with_stale_etag_comes_back_whole(fake, runner):
    old_bytes, new_bytes = os.urandom(2 * MiB), os.urandom(2 * MiB)
    new_sha = hashlib.sha256(new_bytes).hexdigest()
    # Civitai already lists the new file's hash while the CDN still serves the old bytes.
    add_model(fake, data=old_bytes, sha256=new_sha)
    fake.set_fault(111, "short", times=1, after_bytes=MiB + 10)
    runner.fail(model_id=1)
    fake.replace_file(111, data=new_bytes, sha256=new_sha)  # new ETag: If-Range brings all of it
    done = runner.run(model_id=1)
    assert done["sha256"] == new_sha
    resumed = cdn_requests(fake)[-1]
    assert resumed.headers.get("Range") and resumed.headers.get("If-Range")
    assert fake.bytes_served(111) == MiB + 10 + len(new_bytes)


def test_complete_part_and_416_goes_straight_to_verify(fake, runner):
    add_model(fake)
    data = fake.file_bytes(111)
    runner.folder().mkdir(parents=True)
    (runner.folder() / ".model.safetensors.part").write_bytes(data)
    (runner.folder() / ".model.safetensors.part.json").write_text(json.dumps(
        {"version_id": 11, "file_id": 111, "sha256": sha(fake, 111), "etag": None, "total": len(data)}))
    done = runner.run(model_id=1)
    assert done["bytes"] == len(data) and not done["skipped"]
    assert fake.bytes_served(111) == 0


# -- bad bytes and refusals ------------------------------------------------------------------------

def test_a_complete_part_is_verified_even_if_the_host_once_declared_more(fake, runner):
    add_model(fake)
    data = fake.file_bytes(111)
    runner.folder().mkdir(parents=True)
    (runner.folder() / ".model.safetensors.part").write_bytes(data)
    (runner.folder() / ".model.safetensors.part.json").write_text(json.dumps(
        {"version_id": 11, "file_id": 111, "sha256": sha(fake, 111), "etag": None, "total": len(data) + 40000}))
    done = runner.run(model_id=1)
    assert done["bytes"] == len(data)
    assert fake.bytes_served(111) == 0  # the 416 says the file has no more; not fetched again


def test_wrong_bytes_delete_the_part_and_fail_retryable(fake, runner):
    add_model(fake)
    fake.set_fault(111, "wrong_bytes", times=1)
    err = runner.fail(model_id=1)
    assert (err.reason, err.retryable) == ("hash_mismatch", True)
    assert runner.listing() == []  # neither a final file nor a part
    assert "verifying" in runner.types()
    assert runner.run(model_id=1)["sha256"] == sha(fake, 111)


def test_size_far_from_civitai_estimate_is_refused_before_writing(fake, runner):
    add_model(fake, size_kb=10 * 1024.0)  # Civitai says 10 MiB, the CDN sends 3 MiB
    err = runner.fail(model_id=1)
    assert (err.reason, err.retryable) == ("size_mismatch", True)
    assert not (runner.folder() / "model.safetensors").exists()


@pytest.mark.parametrize("params, reason, retryable", [
    ({}, "bad_body", False),  # a 200 login page where the file should be
    ({"via_redirect": True}, "auth_required", False),  # a redirect to /login
])
def test_login_page_is_never_saved_as_the_file(fake, tmp_path, params, reason, retryable):
    add_model(fake)
    fake.set_fault(111, "html_login", **params)
    runner = Runner(fake, tmp_path)
    runner.ctx.client = CivitaiClient(fake.api_url, api_key="", timeout_s=5)
    err = runner.fail(model_id=1)
    assert (err.reason, err.retryable) == (reason, retryable)
    assert "civitai_api_key" in str(err)
    assert runner.listing() == []


def test_html_from_the_cdn_with_octet_stream_type_is_sniffed(fake, runner):
    add_model(fake)
    fake.set_fault(111, "status", where="cdn", code=500, times=1,
                   body="<!DOCTYPE html><html>oops</html>")  # 5xx first: retryable server error
    err = runner.fail(model_id=1)
    assert err.reason == "server_error" and err.retryable
    fake.set_fault(111, "json_error", where="cdn", times=1)
    err = runner.fail(model_id=1)
    assert err.reason == "bad_body" and "Unauthorized" in str(err)
    assert not (runner.folder() / "model.safetensors").exists()


@pytest.mark.parametrize("code, body, reason, retryable, wait", [
    (401, None, "auth_required", False, False),
    (403, None, "early_access", True, True),
    (404, None, "not_found", True, False),  # transient storage failures give 404 too
    (410, None, "gone", False, False),
    (429, {"error": "We've noticed an unusual amount of downloading from your account. Contact "
                    "support@civitai.com or come back later."}, "quota", True, True),
    (429, None, "rate_limited", True, False),
    (503, None, "server_error", True, False),
])
def test_download_endpoint_statuses(fake, runner, code, body, reason, retryable, wait):
    add_model(fake)
    fake.set_fault(111, "status", code=code, retry_after=7 if code == 429 else None, body=body,
                   deadline="2031-01-02T03:04:05.000Z")
    err = runner.fail(model_id=1)
    assert (err.reason, err.retryable, err.wait, err.status) == (reason, retryable, wait, code)
    if reason == "rate_limited":
        assert err.retry_after_s == 7
    if reason == "quota":
        assert err.retry_after_s >= 3600 - 5  # an hour at least, whatever Retry-After says
    if code == 403:
        assert "until 2031-01-02 03:04 UTC; the download starts then" in str(err)
    assert runner.listing() == []


def test_wrong_api_key_is_reported(fake, tmp_path):
    add_model(fake)
    runner = Runner(fake, tmp_path)
    runner.ctx.client = CivitaiClient(fake.api_url, api_key="wrong", timeout_s=5)
    err = runner.fail(model_id=1)
    assert err.reason == "auth_required" and "did not accept the API key" in str(err)


def test_early_access_version(fake, runner):
    add_model(fake, versions=[dict(id=11, early_access_ends_at="2031-06-01T00:00:00.000Z",
                                   files=[dict(id=111, name="ea.safetensors", size_bytes=MiB, primary=True)])])
    err = runner.fail(version_id=11)
    assert err.reason == "early_access" and "2031-06-01" in str(err)


def test_a_creators_disabled_downloads_reach_the_user_in_civitais_words(fake, runner):
    add_model(fake)
    fake.set_fault(111, "status", code=401, message="The creator of this asset has disabled downloads on this file")
    err = runner.fail(model_id=1)
    assert (err.reason, err.retryable, err.wait) == ("downloads_disabled", False, False)
    assert "The creator of this asset has disabled downloads on this file" in str(err)
    assert "civitai_api_key" not in str(err)
    # A version that says so in its metadata is refused before any download starts.
    add_model(fake, versions=[dict(id=11, usage_control="Generation",
                                   files=[dict(id=111, name="gen.safetensors", size_bytes=MiB, primary=True)])])
    fake.clear_requests()
    err = runner.fail(model_id=1)
    assert err.reason == "downloads_disabled" and "usageControl: Generation" in str(err)
    assert fake.requests_to("api", path_re="/api/download/") == []


def test_early_access_without_a_deadline_in_the_answer_takes_the_versions_date(fake, runner):
    add_model(fake, versions=[dict(id=11, early_access_ends_at="2031-06-01T12:30:00.000Z",
                                   files=[dict(id=111, name="ea.safetensors", size_bytes=MiB, primary=True)])])
    fake.set_fault(111, "status", code=403, body={"error": "Early Access"})
    err = runner.fail(version_id=11)
    assert (err.reason, err.wait) == ("early_access", True)
    assert "until 2031-06-01 12:30 UTC; the download starts then" in str(err)
    assert err.wait_until == datetime(2031, 6, 1, 12, 31, tzinfo=UTC).timestamp()


def test_the_daily_quota_is_a_wait_of_an_hour(fake, runner):
    add_model(fake)
    fake.download_quota = 0
    before = time.time()
    err = runner.fail(model_id=1)
    assert (err.reason, err.wait, err.status) == ("quota", True, 429)
    assert err.wait_until >= before + 3600 and "unusual amount of downloading" in str(err)
    assert runner.listing() == []


@pytest.mark.parametrize("kind", ["404", "html_403", "500", "503"])
def test_one_transient_metadata_answer_does_not_fail_the_attempt(fake, runner, kind):
    add_model(fake)
    runner.ctx.client._sleep = lambda s: None
    fake.metadata_fault(kind, times=1)
    assert runner.run(model_id=1)["sha256"] == sha(fake, 111)


def test_a_metadata_api_that_stays_unavailable_fails_the_attempt_retryable(fake, runner):
    add_model(fake)
    runner.ctx.client._sleep = lambda s: None
    fake.metadata_fault("html_403", times=None)
    err = runner.fail(model_id=1, attempt=2)
    assert (err.reason, err.retryable, err.wait, err.retry_after_s) == ("metadata_unavailable", True, False, 60)
    assert "web page" in str(err)
    assert runner.listing() == []


def test_unknown_version_is_retried_with_backoff_before_it_fails(fake, runner):
    add_model(fake)
    runner.ctx.client._sleep = lambda s: None
    err = runner.fail(model_id=1, version_id=999)
    assert (err.reason, err.retryable, err.wait) == ("metadata_unavailable", True, False)
    assert "model version 999 was not found on Civitai (deleted, a wrong id, or published moments ago" in str(err)
    assert err.retry_after_s == 15
    assert len(fake.requests_to("api", path_re="/model-versions/999")) == 2  # asked once more at once
    assert runner.fail(model_id=1, version_id=999, attempt=3).retry_after_s == 240


def test_expired_cdn_link_is_resolved_again(fake, runner):
    add_model(fake)
    fake.set_fault(111, "expire_cdn", times=1)
    assert runner.run(model_id=1)["sha256"] == sha(fake, 111)
    assert len(fake.requests_to("api", path_re="/api/download/")) == 2


def test_cdn_redirect_chain_is_followed_without_the_key(fake, runner):
    add_model(fake)
    fake.set_fault(111, "redirect_chain", times=1, n=3)
    assert runner.run(model_id=1)["sha256"] == sha(fake, 111)
    assert all(r.headers.get("Authorization") is None for r in fake.requests_to("cdn"))


# -- bodies longer than the file --------------------------------------------------------------------

def run_watched(runner, deadline_s: float, part_name: str = ".model.safetensors.part", **job):
    """run_job in a thread while the partial file's size is sampled. Returns (result or the
    CivitaiError, the largest size seen); a job still running at the deadline is stopped."""
    part = runner.folder() / part_name
    box: dict = {}

    def target():
        try:
            box["result"] = runner.run(**job)
        except CivitaiError as exc:
            box["result"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    biggest = 0
    end = time.monotonic() + deadline_s
    while thread.is_alive() and time.monotonic() < end:
        try:
            biggest = max(biggest, part.stat().st_size)
        except FileNotFoundError:
            pass
        time.sleep(0.005)
    if thread.is_alive():
        runner.stop.set()
        thread.join(15)
        try:
            biggest = max(biggest, part.stat().st_size)
        except FileNotFoundError:
            pass
        pytest.fail(f"the job was still running after {deadline_s} s; the partial file had reached "
                    f"{biggest / MiB:.1f} MiB")
    most = max([m["bytes_done"] for m in runner.messages if m["type"] == "progress"] or [0])
    return box["result"], max(biggest, most)


@pytest.mark.parametrize("framing", ["close", "chunked"])
def test_an_endless_body_without_length_ends_at_the_size_civitai_gives(fake, runner, framing):
    size = 4 * MiB + 321
    add_model(fake, size_bytes=size)
    fake.set_fault(111, "endless", framing=framing)  # no Content-Length, then bytes without end
    done, biggest = run_watched(runner, 20, model_id=1)
    assert not isinstance(done, CivitaiError), done
    assert (done["sha256"], done["bytes"]) == (sha(fake, 111), size)
    assert biggest <= size
    assert (runner.folder() / "model.safetensors").stat().st_size == size
    assert runner.listing() == ["model.safetensors"]


def test_an_endless_body_whose_first_bytes_are_wrong_fails_and_never_grows(fake, runner):
    size = 2 * MiB + 5
    add_model(fake, size_bytes=size, sha256="AB" * 32)  # Civitai's hash is not the file's
    fake.set_fault(111, "endless")
    err, biggest = run_watched(runner, 20, model_id=1)
    assert isinstance(err, CivitaiError)
    assert (err.reason, err.retryable) == ("hash_mismatch", True)
    assert "without saying its length" in str(err) and "SHA-256" in str(err)
    assert biggest <= size
    assert runner.listing() == []


@pytest.mark.parametrize("declared", ["file", "body"])
def test_a_body_longer_than_the_file_is_cut_at_its_end(fake, runner, declared):
    size = 3 * MiB + 77
    add_model(fake, size_bytes=size)
    # "file": the body is longer than its Content-Length; "body": the host claims 40 KiB more
    # than Civitai's size (within sizeKB's tolerance) and sends them.
    fake.set_fault(111, "overlong", extra_bytes=40 << 10, declared=declared)
    done, biggest = run_watched(runner, 20, model_id=1)
    assert not isinstance(done, CivitaiError), done
    assert (done["sha256"], done["bytes"]) == (sha(fake, 111), size)
    assert biggest <= size + (40 << 10)
    assert (runner.folder() / "model.safetensors").stat().st_size == size
    assert runner.listing() == ["model.safetensors"]


def test_a_partial_file_longer_than_the_file_is_cut_back(fake, runner):
    """A partial file left by a version without the cap (803 MiB for a 4 MiB model)."""
    size = 2 * MiB + 11
    add_model(fake, size_bytes=size)
    runner.folder().mkdir(parents=True)
    (runner.folder() / ".model.safetensors.part").write_bytes(fake.file_bytes(111) + b"\0" * (3 * MiB))
    (runner.folder() / ".model.safetensors.part.json").write_text(json.dumps(
        {"version_id": 11, "file_id": 111, "sha256": sha(fake, 111), "etag": None, "total": None}))
    done = runner.run(model_id=1)
    assert (done["sha256"], done["bytes"]) == (sha(fake, 111), size)
    assert runner.listing() == ["model.safetensors"]
    assert fake.bytes_served(111) == 0  # the first `size` bytes were the file: nothing to fetch


# -- stall, drip and cancel -----------------------------------------------------------------------

def test_stall_fails_retryable_within_the_read_timeout_and_keeps_the_part(fake, tmp_path):
    add_model(fake)
    fake.set_fault(111, "stall", times=1, after_bytes=MiB + 1)
    runner = Runner(fake, tmp_path, read_timeout_s=1)
    t0 = time.monotonic()
    err = runner.fail(model_id=1)
    elapsed = time.monotonic() - t0
    assert (err.reason, err.retryable) == ("connection", True)
    assert "stalled: no data for 1 s" in str(err)
    assert elapsed < 4
    assert (runner.folder() / ".model.safetensors.part").stat().st_size > 0
    assert runner.run(model_id=1)["sha256"] == sha(fake, 111)


def test_cancel_during_a_slow_download_stops_quickly_and_keeps_the_part(fake, runner):
    add_model(fake)
    fake.set_fault(111, "drip", bps=200_000, after_bytes=MiB)
    t0 = time.monotonic()

    def stop_later(msg):
        if msg["type"] == "progress" and msg["bytes_done"] >= MiB + 50_000:
            threading.Timer(0.3, runner.stop.set).start()

    runner.on_message = stop_later
    err = runner.fail(model_id=1)
    assert err.reason == "cancelled" and not err.retryable
    assert time.monotonic() - t0 < 6
    progress = [m for m in runner.messages if m["type"] == "progress"]
    assert progress[-1]["speed_bps"] > 0
    # a trickle still reports progress at most 4 times a second
    stamps = [m["bytes_done"] for m in progress]
    assert stamps == sorted(stamps)
    assert (runner.folder() / ".model.safetensors.part").stat().st_size >= MiB


def test_progress_is_rate_limited(fake, runner):
    add_model(fake, size_bytes=2 * MiB)
    fake.set_fault(111, "drip", bps=1_000_000, after_bytes=MiB)  # about one second of trickle
    t0 = time.monotonic()
    runner.run(model_id=1)
    elapsed = time.monotonic() - t0
    progress = [m for m in runner.messages if m["type"] == "progress"]
    assert 2 <= len(progress) <= 4 * elapsed + 2


def test_cancel_while_the_api_does_not_answer(fake, runner):
    add_model(fake)
    fake.set_fault(111, "stall", where="api")  # the download endpoint never answers
    threading.Timer(0.5, runner.stop.set).start()
    t0 = time.monotonic()
    err = runner.fail(model_id=1)
    assert err.reason == "cancelled"
    assert time.monotonic() - t0 < 2


def test_cancel_before_start(fake, runner):
    add_model(fake)
    runner.stop.set()
    assert runner.fail(model_id=1).reason == "cancelled"
    assert fake.requests == []


# -- the partial file writer ------------------------------------------------------------------------

@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("offset", [0, 8192])
def test_part_writer_keeps_every_byte_in_order(tmp_path, direct, offset):
    import mmap
    import random

    from workers.download import PartWriter

    rng = random.Random(offset + direct)
    path = tmp_path / "part"
    prefix = os.urandom(offset)
    path.write_bytes(prefix)
    fd = os.open(path, os.O_RDWR)
    expected = bytearray(prefix)
    buf = mmap.mmap(-1, MiB)
    view = memoryview(buf)
    writer = PartWriter(path, fd, offset, direct=direct)
    for size in [MiB, 4096, 1, 3000, MiB, 70_000, 8192, MiB - 5, 12, MiB] + [rng.randint(1, MiB) for _ in range(20)]:
        chunk = os.urandom(size)
        view[:size] = chunk
        writer.write(view[:size])
        expected += chunk
    writer.close()
    os.close(fd)
    view.release()
    buf.close()
    assert path.read_bytes() == bytes(expected)


def test_part_writer_falls_back_when_direct_io_is_refused(tmp_path, monkeypatch):
    import errno
    import mmap

    import workers.download as download

    path = tmp_path / "part"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDWR)
    writer = download.PartWriter(path, fd, 0, direct=True)
    if not writer.direct:
        pytest.skip("no direct I/O here")
    real_write = os.write

    def refusing_write(target, data):
        if target == writer.dfd:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(target, data)

    monkeypatch.setattr(download.os, "write", refusing_write)
    buf = mmap.mmap(-1, MiB)
    buf.write(os.urandom(MiB))
    writer.write(memoryview(buf))
    writer.write(memoryview(buf)[:100])
    assert not writer.direct
    writer.close()
    os.close(fd)
    assert path.read_bytes() == bytes(buf) + bytes(buf[:100])


def test_plain_writes_when_direct_io_is_off(fake, runner, monkeypatch):
    import workers.download as download

    monkeypatch.setattr(download, "USE_DIRECT_IO", False)
    add_model(fake)
    fake.set_fault(111, "short", times=1, after_bytes=MiB + 10)
    runner.fail(model_id=1)
    assert (runner.folder() / ".model.safetensors.part").stat().st_size == MiB + 10
    assert runner.run(model_id=1)["sha256"] == sha(fake, 111)
    assert cdn_requests(fake)[-1].headers.get("Range") == f"bytes={MiB + 10}-"
