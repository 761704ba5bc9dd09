"""Job and child-process states, the transitions that are legal for each, and the string enums
for reasons and kinds that cross process boundaries."""
from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "queued"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    PAUSED = "paused"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


RUNNING_STATES = (JobState.DOWNLOADING, JobState.VERIFYING)
ACTIVE_STATES = (JobState.QUEUED, JobState.DOWNLOADING, JobState.VERIFYING, JobState.PAUSED)
FINAL_STATES = (JobState.DONE, JobState.FAILED, JobState.CANCELLED)

JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.DOWNLOADING, JobState.PAUSED, JobState.CANCELLED, JobState.FAILED}),
    JobState.DOWNLOADING: frozenset({JobState.QUEUED, JobState.VERIFYING, JobState.PAUSED, JobState.DONE,
                                     JobState.FAILED, JobState.CANCELLED}),
    JobState.VERIFYING: frozenset({JobState.QUEUED, JobState.PAUSED, JobState.DONE, JobState.FAILED,
                                   JobState.CANCELLED}),
    JobState.PAUSED: frozenset({JobState.QUEUED, JobState.CANCELLED}),
    JobState.DONE: frozenset({JobState.QUEUED}),  # file vanished or changed: fetch again
    JobState.FAILED: frozenset({JobState.QUEUED}),  # retry
    JobState.CANCELLED: frozenset({JobState.QUEUED}),  # retry
}


class IllegalTransition(Exception):
    pass


def check_transition(old: str, new: str) -> None:
    old_s, new_s = JobState(old), JobState(new)
    if old_s == new_s:
        return
    if new_s not in JOB_TRANSITIONS[old_s]:
        raise IllegalTransition(f"job cannot go from {old_s} to {new_s}")


class ChildState(StrEnum):
    """supervisord's names for a child's lifecycle."""

    STOPPED = "stopped"  # not started yet, or stopped on purpose
    STARTING = "starting"  # spawned, not yet said it is ready
    RUNNING = "running"
    BACKOFF = "backoff"  # died; waiting to be started again
    STOPPING = "stopping"
    EXITED = "exited"  # died; its exit is being handled
    FATAL = "fatal"  # gave up: failed at boot too often


CHILD_TRANSITIONS: dict[ChildState, frozenset[ChildState]] = {
    ChildState.STOPPED: frozenset({ChildState.STARTING}),
    ChildState.STARTING: frozenset({ChildState.RUNNING, ChildState.STOPPING, ChildState.EXITED}),
    ChildState.RUNNING: frozenset({ChildState.STOPPING, ChildState.EXITED}),
    ChildState.STOPPING: frozenset({ChildState.EXITED, ChildState.STOPPED}),
    ChildState.EXITED: frozenset({ChildState.BACKOFF, ChildState.STOPPED, ChildState.FATAL}),
    ChildState.BACKOFF: frozenset({ChildState.STARTING, ChildState.STOPPED}),
    ChildState.FATAL: frozenset(),
}


class ChildKind(StrEnum):
    WORKER = "worker"
    UPDATER = "updater"
    WEB = "web"
    WEBHOOKS = "webhooks"
    LIBRARY = "library"  # one scan of the library, started on demand, never restarted


class Reason(StrEnum):
    """Why a job attempt ended or waits; the web process counts failures by these."""

    CANCELLED = "cancelled"
    PAUSED = "paused"
    CRASH = "crash"  # the worker died under it
    TIMEOUT = "timeout"
    SHUTDOWN = "shutdown"
    BUSY = "busy"  # the same file is on its way in another job
    CONNECTION = "connection"
    HTTP_ERROR = "http_error"
    RATE_LIMITED = "rate_limited"
    HASH_MISMATCH = "hash_mismatch"
    SIZE_MISMATCH = "size_mismatch"
    BAD_BODY = "bad_body"
    DISK = "disk"
    PATH_CONFLICT = "path_conflict"
    UNSAFE = "unsafe"
    INTERNAL = "internal"
    EARLY_ACCESS = "early_access"
    QUOTA = "quota"
    UNHASHED = "unhashed"
    UNKNOWN = "unknown"


class KillReason(StrEnum):
    """Why the supervisor stopped a child."""

    TIMEOUT = "timeout"
    CANCEL = "cancel"  # the user cancelled or paused its job and it did not let go in time
    SHUTDOWN = "shutdown"
    CRASH = "crash"  # it died by itself, or hung at boot
    RELOAD = "reload"  # restarted to take a reloaded config


class IllegalChildTransition(Exception):
    pass


def check_child_transition(old: ChildState, new: ChildState) -> None:
    if old != new and new not in CHILD_TRANSITIONS[old]:
        raise IllegalChildTransition(f"child cannot go from {old} to {new}")
