"""Every message that crosses a Pipe between the supervisor and a worker or the updater.

Plain dicts on the wire (they pickle on every platform and stay readable in a debugger); these
TypedDicts say what each holds, and the `type` values are the string enum `Msg`. A worker sends
the messages it held back (workers/worker.py, Channel) with the next one as one list: one pickle,
one write and one read for a small file's five messages; `unpack` gives them back in order.
"""
from __future__ import annotations

from enum import StrEnum
from typing import Any, NotRequired, TypedDict


class Msg(StrEnum):
    # supervisor -> worker
    JOB = "job"
    CANCEL = "cancel"
    STOP = "stop"
    CONFIG = "config"  # a reloaded config (SIGHUP): take the live keys
    PREVIEWS = "previews"  # to a ready worker: previews no live worker owes (the last run's, a dead worker's)
    # worker -> supervisor
    READY = "ready"
    FATAL = "fatal"
    ACK = "ack"
    RESOLVED = "resolved"
    PROGRESS = "progress"
    VERIFYING = "verifying"
    DONE = "done"
    ERROR = "error"
    RETURNED = "returned"  # a job held behind the current one, never started: given back
    PREVIEW_OWED = "preview_owed"  # a verified file's preview is queued on the worker's sidecar thread
    PREVIEW_SETTLED = "preview_settled"  # ... and fetched, failed (marked in the info) or not due after all
    # supervisor -> updater
    MANIFEST = "manifest"
    CHECK_NOW = "check_now"
    # updater -> supervisor
    SCHEDULE = "schedule"
    CHECK_STARTED = "check_started"
    CHECK_DONE = "check_done"
    UPDATE_FOUND = "update_found"
    UPDATE_ERROR = "update_error"


class JobSpec(TypedDict):
    """What a worker needs to run one attempt of one job."""

    job_id: int
    model_id: int | None
    version_id: int | None
    file_id: int | None
    model_type: str | None  # the folder, relative to download_dir; None: the layout decides
    filename: str | None
    sha256: str | None
    attempt: int
    file_type: NotRequired[str | None]  # selectors for an entry that names no file yet
    format: NotRequired[str | None]
    fp: NotRequired[str | None]


class JobMsg(TypedDict):
    type: str  # Msg.JOB
    job: JobSpec


class PreviewsMsg(TypedDict):
    type: str
    paths: list[str]  # absolute paths of verified model files, as the worker named them


class PreviewMsg(TypedDict):  # preview_owed, preview_settled
    type: str
    path: str


class CancelMsg(TypedDict):
    type: str  # Msg.CANCEL
    job_id: int


class ReadyMsg(TypedDict):
    type: str
    pid: int


class FatalMsg(TypedDict):
    type: str
    error: str


class AckMsg(TypedDict):
    type: str
    job_id: int


class ResolvedMsg(TypedDict, total=False):
    type: str
    job_id: int
    model_id: int
    version_id: int
    file_id: int
    model_type: str
    filename: str
    sha256: str | None
    bytes_total: int | None
    updatedAt: str | None
    url: str
    model_name: str | None
    version_name: str | None
    base_model: str | None


class ProgressMsg(TypedDict):
    type: str
    job_id: int
    bytes_done: int
    bytes_total: int | None
    speed_bps: float


class DoneMsg(TypedDict):
    type: str
    job_id: int
    path: str  # relative to download_dir
    filename: str
    sha256: str
    bytes: int
    skipped: bool


class ErrorMsg(TypedDict):
    """An attempt that ended without the file. `wait` means it is no failure: the job runs
    again at `wait_until` (or after retry_after_s) and the attempt is not counted."""

    type: str
    job_id: int
    error: str  # a sentence the user can act on
    reason: str  # ipc.states.Reason
    retryable: bool
    retry_after_s: float | None
    wait: NotRequired[bool]
    wait_until: NotRequired[float | None]


class UpdateFoundMsg(TypedDict):
    type: str
    model_id: int
    previous_version_id: int | None
    previous_file_id: NotRequired[int | None]
    entry: dict[str, Any]  # the new version's fields for the manifest entry
    changes: list[str]


class UpdateErrorMsg(TypedDict):
    type: str
    model_id: int
    error: str


class CheckDoneMsg(TypedDict, total=False):
    type: str
    ok: bool
    ts: str
    unix_ts: float
    models: int
    updates: int
    errors: int
    requests: int
    duration_s: float
    error: str


def unpack(received: Any) -> list[dict]:
    """What one recv() gave: one message, or several sent together (a list), in order."""
    return received if isinstance(received, list) else [received]
