"""Job and child-process states, and the job transitions that are legal."""
from __future__ import annotations

from enum import Enum


class JobState(str, Enum):
    QUEUED = "queued"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


ACTIVE_STATES = (JobState.QUEUED, JobState.DOWNLOADING, JobState.VERIFYING)
FINAL_STATES = (JobState.DONE, JobState.FAILED, JobState.CANCELLED)

JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.DOWNLOADING, JobState.CANCELLED, JobState.FAILED}),
    JobState.DOWNLOADING: frozenset(
        {JobState.QUEUED, JobState.VERIFYING, JobState.DONE, JobState.FAILED, JobState.CANCELLED}
    ),
    JobState.VERIFYING: frozenset({JobState.QUEUED, JobState.DONE, JobState.FAILED, JobState.CANCELLED}),
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


class ChildState(str, Enum):
    """supervisord's names for a child's lifecycle."""

    STARTING = "starting"  # spawned, not yet said it is ready
    RUNNING = "running"
    BACKOFF = "backoff"  # died; waiting to be started again
    STOPPING = "stopping"
    STOPPED = "stopped"
    FATAL = "fatal"  # gave up: failed at boot too often

    def __str__(self) -> str:
        return self.value
