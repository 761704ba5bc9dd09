"""The job ledger: every rule about jobs (queue and dedupe by file, which job runs next, attempts,
retries and waits, cancel, retry, pause), over the job store, with an injected clock.

The store is the truth; the ledger keeps an in-memory copy of the active jobs (queued, running,
paused) so that dedupe and dispatch cost no query and no scan: a queue is a dict lookup, the next
job a heap pop. Every method returns the events to emit as (name, fields) pairs; the caller
stores them in the same transaction and publishes them after it commits. Nothing here touches a
process, a socket or a file other than the database.
"""
from __future__ import annotations

import heapq
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ipc.retry import JOB_RETRY, QUOTA_WAIT, UNHASHED_GIVE_UP_S, UNHASHED_WAIT, RetryPolicy
from ipc.states import ACTIVE_STATES, RUNNING_STATES, JobState, KillReason, Reason, check_transition
from ipc.store import JobStore

log = logging.getLogger("ledger")

Event = tuple[str, dict]
SELECTORS = ("file_type", "format", "fp")
DEFAULT_PRIORITY = 10
BUSY_RETRY_S = 10.0  # the same file on its way in another job: look again this soon
PAUSED_KEY = "paused"  # kv: everything paused (survives restarts)
QUOTA_KEY = "quota_until"  # kv: Civitai's daily download quota is used up until then (per account)


def _norm(value) -> str | None:
    return str(value).strip().lower() if value not in (None, "") else None


def selectors_of(job: dict) -> tuple:
    return tuple(_norm(job.get(k)) for k in SELECTORS)


def file_key(job: dict) -> tuple:
    """What a job is a job *for*: one file. Resolved: the version's file; half resolved: a
    version's primary (or selected) file; unresolved: the newest version's primary (or selected)
    file of a model."""
    if job.get("version_id") is not None and job.get("file_id") is not None:
        return ("file", job["version_id"], job["file_id"])
    if job.get("version_id") is not None:
        return ("version", job["version_id"], selectors_of(job))
    return ("model", job.get("model_id"), selectors_of(job))


def asked_key(job: dict) -> tuple | None:
    """The key a job had when it was queued, once it has resolved to a file ("newest of model N"
    is still what a model-only entry asks for after a restart); None when it asked for the file
    itself, or for a row from before the column."""
    kind = job.get("asked")
    if kind == "model":
        return ("model", job.get("model_id"), selectors_of(job))
    if kind == "version" and job.get("version_id") is not None:
        return ("version", job["version_id"], selectors_of(job))
    return None


def may_be_same_file(a: dict, b: dict) -> bool:
    """Whether two jobs could turn out to fetch the same file: never run such two at once."""
    if a["id"] == b["id"]:
        return True
    av, bv = a.get("version_id"), b.get("version_id")
    if av is not None and bv is not None:
        if av != bv:
            return False
        af, bf = a.get("file_id"), b.get("file_id")
        return af is None or bf is None or af == bf
    am, bm = a.get("model_id"), b.get("model_id")
    return am is not None and am == bm


@dataclass
class Outcome:
    """What a ledger call did: the job as it is now (None if unknown), whether a job was created
    or changed, and the events to emit. `remove_partial`: the job's partial file must go (a
    cancel took effect)."""

    job: dict | None = None
    events: list[Event] = field(default_factory=list)
    created: bool = False
    remove_partial: bool = False
    finished: bool = False  # reached done, failed or cancelled in this call


class LedgerError(Exception):
    """A request the rules refuse; `status` is the HTTP status the API answers."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class JobLedger:
    def __init__(self, store: JobStore, *, max_attempts: int = 4, clock: Callable[[], float] = time.time,
                 policy: RetryPolicy = JOB_RETRY, rng: random.Random | None = None):
        self.store = store
        self.max_attempts = max_attempts
        self.clock = clock
        self.policy = policy
        self.rng = rng or random.Random()
        self.active: dict[int, dict] = {}
        self._by_key: dict[tuple, set[int]] = {}
        self._keys: dict[int, set[tuple]] = {}  # job id -> every key it is known by (it keeps the
        # one it was queued under after it resolves: "version V" and "newest of model M" stay it)
        self._ready: list[tuple[int, int]] = []  # (priority, id) of queued jobs due now
        self._delayed: list[tuple[float, int]] = []  # (not_before, id) of queued jobs due later
        self.held: dict[int, str] = {}  # job id -> the worker that holds it (from dispatch to its end)
        self.paused_all = False
        self.quota_until = 0.0  # the account's download quota: no download starts before

    # --- loading --------------------------------------------------------------------------

    def load(self) -> list[dict]:
        """At start: jobs that were running go back to the queue (attempts kept), then every
        active job is indexed. Returns the recovered jobs."""
        recovered = self.store.recover_unfinished()
        self.active.clear()
        self._by_key.clear()
        self._keys.clear()
        self._ready.clear()
        self._delayed.clear()
        self.held.clear()
        for job in self.store.active_jobs():
            self._index(job)
        self.paused_all = bool(self.store.get_kv(PAUSED_KEY, False))
        self.quota_until = float(self.store.get_kv(QUOTA_KEY, 0) or 0)
        return recovered

    def _index(self, job: dict) -> None:
        self.active[job["id"]] = job
        key = file_key(job)
        self._add_key(job, key)
        asked = asked_key(job)
        if asked is not None and asked != key:
            # Resolved before a restart: it is still the job for what it was asked for.
            self._add_key(job, asked)
            if asked[0] == "model" and job.get("version_id") is not None:
                self._add_key(job, ("version", job["version_id"], selectors_of(job)))
        if job["state"] == JobState.QUEUED:
            self._schedule(job)

    def _add_key(self, job: dict, key: tuple) -> None:
        self._by_key.setdefault(key, set()).add(job["id"])
        self._keys.setdefault(job["id"], set()).add(key)

    def _unindex(self, job: dict) -> None:
        for key in self._keys.pop(job["id"], ()):
            ids = self._by_key.get(key)
            if ids is not None:
                ids.discard(job["id"])
                if not ids:
                    del self._by_key[key]

    def _schedule(self, job: dict) -> None:
        not_before = job.get("not_before") or 0
        if not_before > self.clock():
            heapq.heappush(self._delayed, (not_before, job["id"]))
        else:
            heapq.heappush(self._ready, (job["priority"], job["id"]))

    # --- writing --------------------------------------------------------------------------

    def _set(self, job: dict, **fields) -> dict:
        """Change a job in the store and in memory, checking the state transition."""
        if "state" in fields:
            check_transition(job["state"], fields["state"])
            fields["state"] = JobState(fields["state"])
        job["updated_at"] = self.store.set_fields(job["id"], fields)
        job.update(fields)
        if job["state"] in ACTIVE_STATES:
            if job["id"] not in self.active:
                self.active[job["id"]] = job
            if job.get("version_id") is not None and any(k[0] != "file" for k in self._keys.get(job["id"], ())):
                # Queued without naming a file, it resolved to the version's primary (or selected) file.
                self._add_key(job, ("version", job["version_id"], selectors_of(job)))
            self._add_key(job, file_key(job))
            if job["state"] == JobState.QUEUED and ("state" in fields or "not_before" in fields
                                                    or "priority" in fields):
                self._schedule(job)
        elif job["id"] in self.active:
            del self.active[job["id"]]
            self._unindex(job)
        return job

    def get(self, job_id: int) -> dict | None:
        if job_id in self.active:
            return self.active[job_id]
        return self.store.get_job(job_id)

    def _require(self, job_id: int) -> dict:
        job = self.get(job_id)
        if job is None:
            raise LedgerError(404, f"no job with id {job_id}")
        return job

    @staticmethod
    def queued_event(job: dict) -> Event:
        return ("download_queued", {"job_id": job["id"], "model_id": job["model_id"], "version_id": job["version_id"],
                                    "model_type": job["model_type"], "filename": job["filename"],
                                    "priority": job["priority"], "model_name": job.get("model_name"),
                                    "version_name": job.get("version_name")})

    # --- queueing and dedupe --------------------------------------------------------------

    def find_active(self, spec: dict) -> dict | None:
        """The queued, running or paused job for the same file, if any."""
        ids = self._by_key.get(file_key(spec))
        if ids:
            return self.active[min(ids)]
        if spec.get("version_id") is not None and spec.get("file_id") is None and spec.get("model_id") is not None:
            # "Version V's primary file" may be what an unresolved "newest of model N" job fetches.
            ids = self._by_key.get(("model", spec["model_id"], selectors_of(spec)))
            if ids:
                return self.active[min(ids)]
        return None

    def queue(self, spec: dict, *, source: str = "api", requeue_finished: bool = False) -> Outcome:
        """Queue the file `spec` names (model_id / version_id / file_id, model_type, filename,
        sha256, priority, selectors). The same file already queued, running or paused: that job,
        not created. With `requeue_finished`, the newest finished job for the same file is queued
        again instead of a new row (one row per file in the history)."""
        existing = self.find_active(spec)
        if existing is not None:
            return Outcome(job=existing)
        priority = int(spec.get("priority") or DEFAULT_PRIORITY)
        sha = spec.get("sha256")
        fields = {"model_id": spec.get("model_id"), "version_id": spec.get("version_id"),
                  "file_id": spec.get("file_id"), "model_type": spec.get("model_type"),
                  "filename": spec.get("filename") or None, "sha256": sha.lower() if sha else None,
                  "priority": priority, **{k: spec.get(k) or None for k in SELECTORS}}
        if requeue_finished:
            previous = self._latest_finished(fields, source)
            if previous is not None:
                job = self._set(previous, state=JobState.QUEUED, attempts=0, error=None, reason=None, not_before=0,
                                bytes_done=0, speed_bps=0, waiting_since=None, max_attempts=self.max_attempts,
                                **{k: v for k, v in fields.items() if v is not None or k in ("version_id", "file_id")})
                return Outcome(job=job, created=True, events=[self.queued_event(job)])
        job = self.store.add_job(source=source, max_attempts=self.max_attempts, **fields)
        self._index(job)
        return Outcome(job=job, created=True, events=[self.queued_event(job)])

    def _latest_finished(self, fields: dict, source: str) -> dict | None:
        finished = ("done", "failed", "cancelled")
        marks = ",".join("?" * len(finished))
        sel = [fields[k] for k in SELECTORS]
        if fields["version_id"] is not None:
            rows = self.store._query(
                f"SELECT * FROM jobs WHERE state IN ({marks}) AND version_id = ? "
                "AND (? IS NULL OR file_id IS NULL OR file_id = ?) ORDER BY id DESC LIMIT 1",
                [*finished, fields["version_id"], fields["file_id"], fields["file_id"]])
        else:
            rows = self.store._query(
                f"SELECT * FROM jobs WHERE state IN ({marks}) AND model_id = ? AND source = ? "
                "AND model_type IS ? AND file_type IS ? AND format IS ? AND fp IS ? ORDER BY id DESC LIMIT 1",
                [*finished, fields["model_id"], source, fields["model_type"], *sel])
        return rows[0] if rows else None

    # --- dispatch -------------------------------------------------------------------------

    def next_due(self) -> float | None:
        """When the earliest waiting job becomes runnable (wall clock), if any."""
        if self.quota_until > self.clock() and (self._ready or self._delayed):
            return self.quota_until
        while self._delayed:
            not_before, job_id = self._delayed[0]
            job = self.active.get(job_id)
            if job is not None and job["state"] == JobState.QUEUED and (job.get("not_before") or 0) == not_before:
                return not_before
            heapq.heappop(self._delayed)
        return None

    def has_ready(self) -> bool:
        self._promote_due()
        return bool(self._ready) and not self.paused_all and self.quota_until <= self.clock()

    def _promote_due(self) -> None:
        now = self.clock()
        while self._delayed and self._delayed[0][0] <= now:
            _, job_id = heapq.heappop(self._delayed)
            job = self.active.get(job_id)
            if job is not None and job["state"] == JobState.QUEUED and (job.get("not_before") or 0) <= now:
                heapq.heappush(self._ready, (job["priority"], job_id))

    def take(self, workers: list[str]) -> list[tuple[str, dict, Outcome]]:
        """Give each of `workers` in turn the most urgent runnable job (priority, then age) that
        cannot be the same file as one already running, persisting the attempt first; a name
        listed twice gets two jobs (one to run, one ahead). Returns (worker, job, outcome) for
        each assignment, in that order."""
        if self.paused_all or not workers or self.quota_until > self.clock():
            return []
        self._promote_due()
        running = [self.active[j] for j in self.held if j in self.active]
        set_aside: list[tuple[int, int]] = []
        assigned: list[tuple[str, dict, Outcome]] = []
        workers = list(workers)
        seen: set[int] = set()
        while workers and self._ready:
            priority, job_id = heapq.heappop(self._ready)
            job = self.active.get(job_id)
            if (job is None or job_id in seen or job["state"] != JobState.QUEUED or job["priority"] != priority
                    or (job.get("not_before") or 0) > self.clock()):
                continue  # a stale heap entry: the job moved on or was scheduled again
            seen.add(job_id)
            if job_id in self.held or any(may_be_same_file(job, other) for other in running):
                set_aside.append((priority, job_id))  # its worker has not let go, or the same file runs
                continue
            worker = workers.pop(0)
            outcome = self.begin_attempt(job, worker)
            running.append(job)
            assigned.append((worker, job, outcome))
        for entry in set_aside:
            heapq.heappush(self._ready, entry)
        return assigned

    def begin_attempt(self, job: dict, worker: str) -> Outcome:
        """Persist the attempt before the work starts: a crash right after still counts it."""
        self._set(job, state=JobState.DOWNLOADING, attempts=job["attempts"] + 1, error=None, speed_bps=0)
        self.held[job["id"]] = worker
        return Outcome(job=job, events=[("download_started", {"job_id": job["id"], "attempt": job["attempts"]})])

    def give_back(self, job_id: int) -> Outcome:
        """The attempt did not happen (the worker could not be reached, or a clean stop): the job
        is queued again with the attempt returned."""
        self.held.pop(job_id, None)
        job = self.active.get(job_id)
        if job is None or job["state"] not in RUNNING_STATES:
            return Outcome(job=job)
        self._set(job, state=JobState.QUEUED, attempts=max(0, job["attempts"] - 1), speed_bps=0)
        return Outcome(job=job)

    def not_delivered(self, job_id: int) -> Outcome:
        """The job could not be sent to its worker (it had just died): the attempt is given back,
        and its `download_started` gets an end, so no listener sees the job start twice."""
        return self._queued_again_now(job_id, Reason.CRASH, "the download worker had stopped before it got the job; "
                                      "the next worker takes it")

    def _queued_again_now(self, job_id: int, reason: str, error: str) -> Outcome:
        """give_back(), and a `download_retry` at once that ends the attempt's `download_started`."""
        attempt = (self.active.get(job_id) or {}).get("attempts")
        outcome = self.give_back(job_id)
        job = outcome.job
        if job is None or job["state"] != JobState.QUEUED:
            return outcome
        return Outcome(job=job, events=[("download_retry", {
            "job_id": job_id, "attempt": attempt, "delay_s": 0.0, "reason": reason, "error": error})])

    def _let_go(self, job_id: int) -> tuple[dict | None, Outcome | None]:
        """A worker let go of a job (its last message, or its death): (the job, None) while the
        attempt is still running here, or (the job, the outcome) when there is nothing left to
        decide: the job is gone, was cancelled meanwhile (its partial file goes), or was paused,
        or cancelled and retried, meanwhile."""
        self.release(job_id)
        job = self.active.get(job_id) or self.store.get_job(job_id)
        if job is None:
            return None, Outcome()
        if job["state"] == JobState.CANCELLED:
            return job, Outcome(job=job, remove_partial=True)
        if job["state"] not in RUNNING_STATES:
            return job, Outcome(job=job)
        return job, None

    def returned(self, job_id: int) -> Outcome:
        """A worker gives back a job it held behind its current one and never started (SPEC §5
        deviation: prefetch): it waited too long there, or was cancelled or paused meanwhile. The
        attempt is given back and the job is queued again at once for the next free worker; its
        `download_started` gets an end, as for a job that was not delivered."""
        _, settled = self._let_go(job_id)
        if settled is not None:
            return settled  # cancelled or paused meanwhile: it stays so
        return self._queued_again_now(job_id, Reason.BUSY, "its worker was still busy with the job before it; the "
                                      "next free worker takes it")

    def release(self, job_id: int) -> None:
        """The worker let go of the job (its last message, or its death)."""
        self.held.pop(job_id, None)

    # --- what workers report --------------------------------------------------------------

    def on_resolved(self, job_id: int, msg: dict) -> Outcome:
        job = self.active.get(job_id)
        if job is None:
            if job_id in self.held:
                self._note_where(job_id, msg)
            return Outcome()
        fields = {k: msg[k] for k in ("model_id", "version_id", "file_id", "model_type", "filename", "sha256",
                                      "bytes_total", "url", "model_name", "version_name", "base_model")
                  if msg.get(k) is not None}
        if msg.get("updatedAt"):
            fields["updated_at_civitai"] = msg["updatedAt"]
        if "sha256" in fields:
            fields["sha256"] = str(fields["sha256"]).lower()
        if job.get("model_type"):
            fields.pop("model_type", None)  # the user's folder choice wins over the API's type
        if job.get("filename") and msg.get("filename") != job["filename"] and not msg.get("renamed"):
            fields.pop("filename", None)
        fields = {k: v for k, v in fields.items() if job.get(k) != v}
        if fields:
            self._set(job, **fields)
        return Outcome(job=job)

    def _note_where(self, job_id: int, msg: dict) -> None:
        """A job cancelled before its worker resolved it (a model id only): the folder and name
        the worker resolved are where its partial file is, to be removed when the worker lets go."""
        stored = self.store.get_job(job_id)
        if stored is None or stored["state"] != JobState.CANCELLED:
            return
        where = {k: msg[k] for k in ("model_type", "filename") if msg.get(k) and not stored.get(k)}
        if where:
            self.store.update_job(job_id, **where)

    def on_progress(self, job_id: int, bytes_done: int, bytes_total: int | None, speed_bps: float) -> Outcome:
        job = self.active.get(job_id)
        if job is None or job["state"] not in RUNNING_STATES:
            return Outcome()
        fields: dict = {"bytes_done": int(bytes_done or 0), "speed_bps": float(speed_bps or 0)}
        if bytes_total:
            fields["bytes_total"] = int(bytes_total)
        self._set(job, **fields)
        return Outcome(job=job)

    def on_verifying(self, job_id: int) -> Outcome:
        job = self.active.get(job_id)
        if job is not None and job["state"] == JobState.DOWNLOADING:
            self._set(job, state=JobState.VERIFYING)
        return Outcome(job=job)

    def on_done(self, job_id: int, msg: dict, file_stat: tuple[int, int] | None) -> Outcome:
        """The file is at its final path, verified. `file_stat` is (size, mtime_ns) of it as the
        supervisor sees it now (None: gone already)."""
        self.release(job_id)
        job = self.active.get(job_id)
        if job is None or job["state"] not in RUNNING_STATES:
            return Outcome(job=job)
        rel, sha = str(msg["path"]), str(msg["sha256"]).lower()
        if file_stat is not None:
            self.store.record_file(rel, sha, file_stat[0], file_stat[1], job["version_id"])
        size = int(msg["bytes"])
        self._set(job, state=JobState.DONE, filename=msg["filename"], path=rel, sha256=sha, bytes_done=size,
                  bytes_total=size, speed_bps=0, error=None, reason=None, not_before=0, waiting_since=None)
        skipped = bool(msg.get("skipped"))
        if not skipped:
            self.store.incr_kv("metrics.downloaded_bytes", size)
        name = "download_skipped" if skipped else "download_completed"
        return Outcome(job=job, finished=True, events=[(name, {
            "job_id": job_id, "model_id": job["model_id"], "version_id": job["version_id"],
            "model_type": job["model_type"], "filename": job["filename"], "path": rel, "sha256": sha, "bytes": size,
            "model_name": job.get("model_name"), "version_name": job.get("version_name")})])

    def on_error(self, job_id: int, msg: dict, *, stopping: bool = False) -> Outcome:
        """An attempt ended without the file: wait, retry, or fail, by the rules of SPEC §5/§9."""
        job, settled = self._let_go(job_id)
        if settled is not None or job is None:
            return settled or Outcome()
        reason = str(msg.get("reason") or Reason.UNKNOWN)
        if reason == Reason.CANCELLED:
            # Stopped by us (shutdown, everything paused): not the job's fault.
            return self.give_back(job_id)
        if msg.get("wait") or reason == Reason.BUSY:
            return self._wait(job, msg, reason)
        return self.retry_or_fail(job, str(msg.get("error") or "unknown error"), reason,
                                  bool(msg.get("retryable")), msg.get("retry_after_s"))

    def _wait(self, job: dict, msg: dict, reason: str) -> Outcome:
        """Waiting is not failing (SPEC §9): early access until its date, the daily quota, a
        file Civitai has not hashed yet, the same file on its way in another job. The attempt is
        given back."""
        now = self.clock()
        error = str(msg.get("error") or "waiting")
        since = job.get("waiting_since") or now
        if reason == Reason.UNHASHED and now - since >= UNHASHED_GIVE_UP_S:
            error = (f"{error}; Civitai has still not hashed this file after "
                     f"{UNHASHED_GIVE_UP_S / 3600:.0f} h, so it cannot be verified and was not downloaded")
            return self._fail(job, error, reason)
        until = msg.get("wait_until")
        if not until:
            retry_after = msg.get("retry_after_s")
            if reason == Reason.QUOTA:
                delay = QUOTA_WAIT.delay(1, retry_after, self.rng)
            elif reason == Reason.UNHASHED:  # look again less often the longer it takes
                delay = min(UNHASHED_WAIT.cap_s, max(UNHASHED_WAIT.delay(1, retry_after, self.rng), (now - since) / 2))
            elif reason == Reason.BUSY:
                delay = float(retry_after or BUSY_RETRY_S)
            else:
                delay = float(retry_after or 60)
            until = now + delay
        attempt = job["attempts"]  # the one that ended; given back, the next start is the same number
        self._set(job, state=JobState.QUEUED, attempts=max(0, attempt - 1), speed_bps=0, error=error,
                  reason=reason, not_before=float(until), waiting_since=since)
        if reason == Reason.QUOTA and until > self.quota_until:
            # The quota is the account's: every further start would only count against it.
            self.quota_until = float(until)
            self.store.set_kv(QUOTA_KEY, self.quota_until)
        log.info("job %s waits until %s UTC: %s", job["id"], time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(until)),
                 error)
        return Outcome(job=job, events=[("download_retry", {
            "job_id": job["id"], "attempt": attempt, "error": error, "delay_s": round(until - now, 3),
            "waiting": True, "reason": reason})])

    def job_lost(self, job_id: int, kill_reason: str | None, exitcode, *, timeout_s: float,
                 stopping: bool = False) -> Outcome:
        """The worker died holding the job: put it back while attempts remain."""
        job, settled = self._let_go(job_id)
        if settled is not None or job is None:
            return settled or Outcome()
        if kill_reason == KillReason.SHUTDOWN or stopping or (kill_reason == KillReason.CANCEL and self.paused_all):
            return self.give_back(job_id)
        if kill_reason == KillReason.TIMEOUT:
            return self.retry_or_fail(job, f"the download took longer than timeout = {timeout_s:g} s; raise `timeout` "
                                      "in config.json for large files on slow lines", Reason.TIMEOUT, True, None)
        return self.retry_or_fail(job, f"the download worker died (exit code {exitcode})", Reason.CRASH, True, None)

    def retry_or_fail(self, job: dict, error: str, reason: str, retryable: bool, retry_after_s) -> Outcome:
        if retryable and job["attempts"] < job["max_attempts"]:
            delay = self.policy.delay(max(1, job["attempts"]), float(retry_after_s) if retry_after_s else None,
                                      self.rng)
            self._set(job, state=JobState.QUEUED, error=error, reason=reason, speed_bps=0,
                      not_before=self.clock() + delay)
            log.warning("job %s attempt %s failed (%s); retrying in %.1f s", job["id"], job["attempts"], error, delay)
            return Outcome(job=job, events=[("download_retry", {"job_id": job["id"], "attempt": job["attempts"],
                                                                "error": error, "delay_s": round(delay, 3)})])
        if retryable:
            error = f"{error} (gave up after {job['attempts']} attempts)"
        return self._fail(job, error, reason)

    def _fail(self, job: dict, error: str, reason: str) -> Outcome:
        self._set(job, state=JobState.FAILED, error=error, reason=reason, speed_bps=0, not_before=0)
        log.error("job %s (%s) failed: %s", job["id"], job.get("model_name") or f"model {job.get('model_id')}", error)
        return Outcome(job=job, finished=True, events=[("download_failed", {
            "job_id": job["id"], "error": error, "model_id": job["model_id"], "version_id": job["version_id"],
            "filename": job.get("filename"), "model_name": job.get("model_name"),
            "version_name": job.get("version_name")})])

    # --- what users ask -------------------------------------------------------------------

    def set_priority(self, job_id: int, priority: int) -> Outcome:
        job = self._require(job_id)
        if job["id"] in self.active:
            self._set(job, priority=int(priority))
        else:
            job = self.store.update_job(job["id"], priority=int(priority))
        return Outcome(job=job)

    def cancel(self, job_id: int) -> Outcome:
        """Cancel a queued, running or paused job. A running one is marked at once; its worker is
        told to stop by the caller (`held` says which), and its partial file goes when it lets go."""
        job = self._require(job_id)
        if job["state"] not in ACTIVE_STATES:
            raise LedgerError(409, f"job {job_id} is {job['state']}; only queued, running or paused jobs can be "
                                   "cancelled")
        self._set(job, state=JobState.CANCELLED, speed_bps=0, error="cancelled by the user",
                  reason=Reason.CANCELLED, not_before=0)
        return Outcome(job=job, finished=True, remove_partial=job_id not in self.held,
                       events=[("download_cancelled", {"job_id": job_id})])

    def retry(self, job_id: int) -> Outcome:
        job = self._require(job_id)
        if job["state"] not in (JobState.FAILED, JobState.CANCELLED):
            raise LedgerError(409, f"job {job_id} is {job['state']}; only failed or cancelled jobs can be retried")
        clash = self.find_active(job)
        if clash is not None:
            return Outcome(job=clash)  # the same file is on its way already: that job is the retry
        job = dict(job)
        self._set(job, state=JobState.QUEUED, attempts=0, error=None, reason=None, not_before=0, waiting_since=None,
                  max_attempts=max(job["max_attempts"], self.max_attempts))
        return Outcome(job=job, events=[self.queued_event(job)])

    def pause(self, job_id: int, bytes_done: int | None = None) -> Outcome:
        """Pause one job: queued ones at once; a running one stops (the caller tells its worker)
        and keeps its partial file (`bytes_done`: what it has, as last reported)."""
        job = self._require(job_id)
        if job["state"] == JobState.PAUSED:
            return Outcome(job=job)
        if job["state"] not in (JobState.QUEUED, *RUNNING_STATES):
            raise LedgerError(409, f"job {job_id} is {job['state']}; only queued or running jobs can be paused")
        attempts = job["attempts"] - 1 if job["state"] in RUNNING_STATES else job["attempts"]
        kept = {"bytes_done": int(bytes_done)} if bytes_done else {}
        self._set(job, state=JobState.PAUSED, speed_bps=0, attempts=max(0, attempts), **kept)
        return Outcome(job=job, events=[("download_paused", {"job_id": job_id})])

    def resume(self, job_id: int) -> Outcome:
        job = self._require(job_id)
        if job["state"] != JobState.PAUSED:
            raise LedgerError(409, f"job {job_id} is {job['state']}; only paused jobs can be resumed")
        self._set(job, state=JobState.QUEUED, not_before=0)
        return Outcome(job=job, events=[("download_resumed", {"job_id": job_id})])

    def set_paused_all(self, paused: bool) -> Outcome:
        if paused == self.paused_all:
            return Outcome()
        self.paused_all = paused
        self.store.set_kv(PAUSED_KEY, paused)
        return Outcome(events=[("daemon_paused" if paused else "daemon_resumed", {})])

    # --- views ----------------------------------------------------------------------------

    def running(self) -> Iterable[dict]:
        return (self.active[j] for j in self.held if j in self.active)

    def counts(self) -> dict[str, int]:
        return self.store.job_counts()
