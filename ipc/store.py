"""The job store (SQLite, WAL): jobs, events, downloaded files and small state. The source of truth.

The supervisor is the only process that changes jobs; the web process opens it read-only, the
webhook process writes only delivery marks. A database that is locked by another program or on
a full disk raises StoreUnavailable (the caller backs off and tries again); one that cannot be
opened at all raises StoreOpenError with a sentence for the user.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from ipc.states import ACTIVE_STATES, FINAL_STATES, JobState, check_transition

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    model_id INTEGER,
    version_id INTEGER,
    file_id INTEGER,
    model_type TEXT,
    filename TEXT,
    state TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 10,
    bytes_done INTEGER NOT NULL DEFAULT 0,
    bytes_total INTEGER,
    speed_bps REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL DEFAULT 4,
    error TEXT,
    reason TEXT,
    sha256 TEXT,
    path TEXT,
    url TEXT,
    updated_at_civitai TEXT,
    source TEXT NOT NULL DEFAULT 'manifest',
    not_before REAL NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, priority, id);
CREATE INDEX IF NOT EXISTS jobs_version ON jobs(version_id, file_id);
CREATE INDEX IF NOT EXISTS jobs_model ON jobs(model_id, version_id);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event TEXT NOT NULL,
    ts TEXT NOT NULL,
    data TEXT NOT NULL,
    delivered INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS events_undelivered ON events(delivered, id);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    version_id INTEGER,
    recorded_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS previews_owed (
    path TEXT PRIMARY KEY,
    since REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS manifest_pending (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL
);
"""

# Columns added after schema 1, added to an older database at open (ALTER TABLE ADD COLUMN).
_ADDED_COLUMNS = {
    "jobs": (
        ("model_name", "TEXT"), ("version_name", "TEXT"), ("base_model", "TEXT"),
        ("file_type", "TEXT"), ("format", "TEXT"), ("fp", "TEXT"),  # selectors of an entry
        ("waiting_since", "REAL"),  # first of a run of waits that are no failure (unhashed file)
        ("asked", "TEXT"),  # what it was queued for before it resolved: model, version or file
    ),
}

PUBLIC_JOB_FIELDS = (
    "id", "model_id", "version_id", "file_id", "model_type", "filename", "model_name", "version_name",
    "base_model", "state", "priority", "bytes_done", "bytes_total", "speed_bps", "attempts", "error",
    "not_before", "created_at", "updated_at", "max_attempts", "reason", "sha256", "path", "source",
)
_WRITABLE = set(PUBLIC_JOB_FIELDS) - {"id", "created_at", "updated_at"} | {
    "url", "updated_at_civitai", "not_before", "file_type", "format", "fp", "waiting_since",
}
_UNAVAILABLE_WORDS = ("locked", "busy", "disk is full", "disk i/o error", "database or disk is full",
                      "unable to open", "readonly database")


class StoreUnavailable(Exception):
    """The database cannot be written right now (locked by another program, disk full): try
    again later. str() is a sentence for /health and the log."""


class StoreOpenError(Exception):
    """The database cannot be opened or is not a database: one sentence naming the file."""


_SECOND: tuple[int, str] = (-1, "")  # the last whole second formatted, its text up to the "." (one object: threads)


def utc_now_iso(ts: float | None = None) -> str:
    """`ts` (default now) as 2026-01-31T12:00:00.123Z. Stamped on every job change and event, a
    few per download: the second's text is formatted once (strftime costs more than the rest)."""
    global _SECOND
    ts = time.time() if ts is None else ts
    whole = int(ts // 1)
    micro = round((ts - whole) * 1e6)  # as datetime.fromtimestamp rounds
    if micro >= 1_000_000:
        whole, micro = whole + 1, micro - 1_000_000
    second, text = _SECOND
    if second != whole:
        text = datetime.fromtimestamp(whole, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        _SECOND = (whole, text)
    return f"{text}{micro // 1000:03d}Z"


def public_job(row: dict, now: float | None = None) -> dict:
    out = {k: row.get(k) for k in PUBLIC_JOB_FIELDS}
    # not_before is shown only while the job really waits for a time.
    not_before = row.get("not_before") or 0
    waiting = row.get("state") == JobState.QUEUED and not_before > (time.time() if now is None else now)
    out["not_before"] = utc_now_iso(not_before) if waiting else None
    return out


def _unavailable(exc: sqlite3.Error, path: Path) -> StoreUnavailable | None:
    text = str(exc).lower()
    if isinstance(exc, sqlite3.OperationalError) and any(w in text for w in _UNAVAILABLE_WORDS):
        if "full" in text:
            return StoreUnavailable(f"the disk holding {path} is full: free some space")
        if "locked" in text or "busy" in text:
            return StoreUnavailable(f"{path} is locked by another program")
        return StoreUnavailable(f"{path} cannot be written: {exc}")
    return None


class JobStore:
    def __init__(self, path: str | Path, readonly: bool = False, timeout_s: float = 10.0):
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.RLock()
        self._depth = 0  # nesting of transaction()
        try:
            if readonly:
                # mode=ro still sees the writer's WAL; it cannot create the file.
                uri = f"file:{self.path.as_posix()}?mode=ro"
                self._conn = sqlite3.connect(uri, uri=True, timeout=timeout_s, check_same_thread=False,
                                             isolation_level=None)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._conn = sqlite3.connect(str(self.path), timeout=timeout_s, check_same_thread=False,
                                             isolation_level=None)
            self._conn.row_factory = sqlite3.Row
            self._conn.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
            if not readonly:
                self._open_for_writing()
            else:
                self._conn.execute("SELECT 1 FROM jobs LIMIT 1").fetchall()
        except sqlite3.DatabaseError as exc:
            busy = _unavailable(exc, self.path)
            if busy is not None and "locked" in str(busy):
                raise StoreUnavailable(str(busy)) from None
            raise StoreOpenError(self._open_problem(exc)) from None

    def _open_for_writing(self) -> None:
        conn = self._conn
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode loses at most the last commits on power loss, never consistency.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            for table, columns in _ADDED_COLUMNS.items():  # before the indexes that may use them
                have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
                for name, kind in columns:
                    if have and name not in have:
                        conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            for table, columns in _ADDED_COLUMNS.items():  # a new database
                have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
                for name, kind in columns:
                    if name not in have:
                        conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _open_problem(self, exc: sqlite3.Error) -> str:
        text = str(exc)
        if "not a database" in text or "malformed" in text or "file is encrypted" in text:
            return (f"{self.path} is damaged or not a database ({text}); move it away (the daemon then "
                    f"starts with an empty job list and queues the manifest again) or restore it from a backup")
        if "unable to open" in text:
            return f"{self.path} cannot be opened ({text}); check that its folder exists and is writable"
        return f"{self.path} cannot be used: {text}"

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Everything in the block commits together or not at all (nested blocks join the outer
        one). Raises StoreUnavailable when the database is locked or the disk full."""
        with self._lock:
            outer = self._depth == 0
            if outer:
                self._guard(lambda: self._conn.execute("BEGIN IMMEDIATE"))
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if outer and self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            self._depth -= 1
            if outer:
                try:
                    self._guard(lambda: self._conn.execute("COMMIT"))
                except StoreUnavailable:
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise

    def _guard(self, fn):
        try:
            return fn()
        except sqlite3.Error as exc:
            busy = _unavailable(exc, self.path)
            if busy is not None:
                raise busy from None
            raise

    def _query(self, sql: str, args=()) -> list[dict]:
        with self._lock:
            return self._guard(lambda: [dict(r) for r in self._conn.execute(sql, args).fetchall()])

    def _write(self, sql: str, args=()) -> sqlite3.Cursor:
        with self._lock, self.transaction():
            return self._guard(lambda: self._conn.execute(sql, args))

    # --- jobs -----------------------------------------------------------------------------

    def add_job(self, *, model_id, version_id=None, file_id=None, model_type=None, filename=None,
                priority=10, max_attempts=4, sha256=None, source="manifest", bytes_total=None,
                url=None, updated_at_civitai=None, file_type=None, format=None, fp=None,
                state=JobState.QUEUED) -> dict:
        now = utc_now_iso()
        row = {"model_id": model_id, "version_id": version_id, "file_id": file_id, "model_type": model_type,
               "filename": filename, "state": str(state), "priority": priority, "max_attempts": max_attempts,
               "sha256": sha256.lower() if sha256 else None, "source": source, "bytes_total": bytes_total,
               "url": url, "updated_at_civitai": updated_at_civitai, "file_type": file_type, "format": format,
               "fp": fp, "created_at": now, "updated_at": now,
               "asked": "model" if version_id is None else "version" if file_id is None else "file"}
        cur = self._write(f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                          list(row.values()))
        return self._job(cur.lastrowid)

    def _job(self, job_id) -> dict:
        """A job that must exist (just written)."""
        job = self.get_job(job_id)
        if job is None:
            raise KeyError(job_id)
        return job

    def set_fields(self, job_id: int, fields: dict) -> str:
        """Write columns of a job without reading it back (the ledger keeps its own copy and
        checks transitions itself). Returns the updated_at it wrote."""
        bad = set(fields) - _WRITABLE
        if bad:
            raise KeyError(f"not writable: {sorted(bad)}")
        stamp = utc_now_iso()
        values = [str(v) if isinstance(v, JobState) else v for v in fields.values()]
        cols = ", ".join(f"{k} = ?" for k in fields)
        self._write(f"UPDATE jobs SET {cols}, updated_at = ? WHERE id = ?", [*values, stamp, job_id])
        return stamp

    def get_job(self, job_id: int) -> dict | None:
        if not isinstance(job_id, int) or not 0 < job_id < 2**63:
            return None  # no such row can exist (SQLite ids are signed 64-bit)
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return rows[0] if rows else None

    def list_jobs(self, state: str | None = None, limit: int = 100) -> list[dict]:
        if state:
            return self._query("SELECT * FROM jobs WHERE state = ? ORDER BY id DESC LIMIT ?", (state, limit))
        return self._query("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,))

    def active_jobs(self) -> list[dict]:
        marks = ",".join("?" * len(ACTIVE_STATES))
        return self._query(
            f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY priority, id",
            [s.value for s in ACTIVE_STATES],
        )

    def find_active(self, *, model_id=None, version_id=None, file_id=None) -> dict | None:
        """The queued or running job for the same file (or, unresolved, the same model)."""
        marks = ",".join("?" * len(ACTIVE_STATES))
        states = [s.value for s in ACTIVE_STATES]
        if version_id is not None:
            rows = self._query(
                f"SELECT * FROM jobs WHERE state IN ({marks}) AND version_id = ? "
                "AND (file_id IS ? OR file_id IS NULL OR ? IS NULL) ORDER BY id LIMIT 1",
                [*states, version_id, file_id, file_id],
            )
        else:
            rows = self._query(
                f"SELECT * FROM jobs WHERE state IN ({marks}) AND model_id = ? AND version_id IS NULL "
                "ORDER BY id LIMIT 1",
                [*states, model_id],
            )
        return rows[0] if rows else None

    def latest_finished(self, *, model_id=None, version_id=None, file_id=None, source=None) -> dict | None:
        """The newest finished job for the same file (or, unresolved, the same model from the same
        source): queuing that one again keeps the history to one row per file."""
        finished = [s.value for s in FINAL_STATES]
        marks = ",".join("?" * len(finished))
        if version_id is not None:
            rows = self._query(
                f"SELECT * FROM jobs WHERE state IN ({marks}) AND version_id = ? "
                "AND (? IS NULL OR file_id IS NULL OR file_id = ?) ORDER BY id DESC LIMIT 1",
                [*finished, version_id, file_id, file_id],
            )
        else:
            rows = self._query(
                f"SELECT * FROM jobs WHERE state IN ({marks}) AND model_id = ? AND source = ? ORDER BY id DESC LIMIT 1",
                [*finished, model_id, source],
            )
        return rows[0] if rows else None

    def runnable_jobs(self, now: float, limit: int = 64) -> list[dict]:
        return self._query(
            "SELECT * FROM jobs WHERE state = ? AND not_before <= ? ORDER BY priority, id LIMIT ?",
            (JobState.QUEUED.value, now, limit),
        )

    def next_wakeup(self) -> float | None:
        rows = self._query("SELECT MIN(not_before) AS t FROM jobs WHERE state = ?", (JobState.QUEUED.value,))
        return rows[0]["t"] if rows and rows[0]["t"] is not None else None

    def update_job(self, job_id: int, **fields) -> dict:
        bad = set(fields) - _WRITABLE
        if bad:
            raise KeyError(f"not writable: {sorted(bad)}")
        with self._lock, self.transaction():
            if "state" in fields:
                current = self.get_job(job_id)
                if current is None:
                    raise KeyError(job_id)
                check_transition(current["state"], str(fields["state"]))
                fields["state"] = str(fields["state"])
            fields["updated_at"] = utc_now_iso()
            cols = ", ".join(f"{k} = ?" for k in fields)
            self._write(f"UPDATE jobs SET {cols} WHERE id = ?", [*fields.values(), job_id])
            return self._job(job_id)

    def begin_attempt(self, job_id: int) -> dict:
        """Persist the attempt before the work starts: a crash right after still counts it."""
        with self._lock, self.transaction():
            job = self._job(job_id)
            check_transition(job["state"], JobState.DOWNLOADING)
            self._write(
                "UPDATE jobs SET state = ?, attempts = attempts + 1, error = NULL, speed_bps = 0, "
                "updated_at = ? WHERE id = ?",
                (JobState.DOWNLOADING.value, utc_now_iso(), job_id),
            )
            return self._job(job_id)

    def recover_unfinished(self) -> list[dict]:
        """After any stop: jobs that were running go back to the queue, attempts kept."""
        with self.transaction():
            rows = self._query(
                "SELECT * FROM jobs WHERE state IN (?, ?)",
                (JobState.DOWNLOADING.value, JobState.VERIFYING.value),
            )
            self._write(
                "UPDATE jobs SET state = ?, speed_bps = 0, updated_at = ? WHERE state IN (?, ?)",
                (JobState.QUEUED.value, utc_now_iso(), JobState.DOWNLOADING.value, JobState.VERIFYING.value),
            )
        return rows

    def job_counts(self) -> dict[str, int]:
        counts = {s.value: 0 for s in JobState}
        for row in self._query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
            counts[row["state"]] = row["n"]
        return counts

    def failure_counts(self) -> dict[str, int]:
        rows = self._query(
            "SELECT COALESCE(reason, 'unknown') AS reason, COUNT(*) AS n FROM jobs WHERE state = ? GROUP BY 1",
            (JobState.FAILED.value,),
        )
        return {r["reason"]: r["n"] for r in rows}

    def bytes_downloaded(self) -> int:
        rows = self._query("SELECT COALESCE(SUM(bytes_total), 0) AS n FROM jobs WHERE state = ?",
                           (JobState.DONE.value,))
        return int(rows[0]["n"])

    def prune(self, older_than_s: float = 30 * 86400, now: float | None = None) -> tuple[int, int]:
        """Forget finished jobs and delivered events older than `older_than_s`, so months of
        running do not grow the database without end. Returns (jobs, events) removed."""
        cutoff = utc_now_iso((time.time() if now is None else now) - older_than_s)
        finished = [s.value for s in FINAL_STATES]
        jobs = self._write(
            f"DELETE FROM jobs WHERE state IN ({','.join('?' * len(finished))}) AND updated_at < ?",
            (*finished, cutoff),
        ).rowcount
        events = self._write("DELETE FROM events WHERE delivered != 0 AND ts < ?", (cutoff,)).rowcount
        return jobs, events

    # --- events ---------------------------------------------------------------------------

    def add_event(self, name: str, fields: dict, ts: float | None = None) -> dict:
        ts_iso = utc_now_iso(ts)
        data = json.dumps(fields, separators=(",", ":"), default=str)
        cur = self._write("INSERT INTO events (event, ts, data) VALUES (?,?,?)", (name, ts_iso, data))
        return {"id": cur.lastrowid, "event": name, "ts": ts_iso, **fields}

    @staticmethod
    def _event(row: dict) -> dict:
        return {"id": row["id"], "event": row["event"], "ts": row["ts"], **json.loads(row["data"])}

    def events_after(self, after_id: int = 0, limit: int = 100) -> list[dict]:
        rows = self._query("SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit))
        return [self._event(r) for r in rows]

    def recent_events(self, limit: int = 100) -> list[dict]:
        rows = self._query("SELECT * FROM events ORDER BY id DESC LIMIT ?", (limit,))
        return [self._event(r) for r in reversed(rows)]

    def last_event_id(self) -> int:
        rows = self._query("SELECT COALESCE(MAX(id), 0) AS n FROM events")
        return int(rows[0]["n"])

    def undelivered_events(self, limit: int = 100) -> list[dict]:
        rows = self._query("SELECT * FROM events WHERE delivered = 0 ORDER BY id LIMIT ?", (limit,))
        return [self._event(r) for r in rows]

    def mark_delivered(self, event_id: int, status: int = 1) -> None:
        """status 1: delivered; 2: given up after its retries (kept for the log)."""
        self._write("UPDATE events SET delivered = ? WHERE id = ?", (status, event_id))

    def mark_all_delivered(self) -> None:
        self._write("UPDATE events SET delivered = 1 WHERE delivered = 0")

    # --- files the daemon wrote -----------------------------------------------------------

    def record_file(self, path: str, sha256: str, size: int, mtime_ns: int, version_id=None) -> None:
        self._write(
            "INSERT OR REPLACE INTO files (path, sha256, size, mtime_ns, version_id, recorded_at) "
            "VALUES (?,?,?,?,?,?)",
            (path, sha256.lower(), size, mtime_ns, version_id, utc_now_iso()),
        )

    def get_file(self, path: str) -> dict | None:
        rows = self._query("SELECT * FROM files WHERE path = ?", (path,))
        return rows[0] if rows else None

    def all_files(self) -> dict[str, dict]:
        """Every recorded file by path: one query for a whole manifest sync."""
        return {row["path"]: row for row in self._query("SELECT * FROM files")}

    # --- manifest changes not yet written to manifest.json -------------------------------------

    # A preview a worker still owes a verified file (its sidecar thread had not fetched it yet):
    # kept until the worker says it is settled, so a worker that stops first does not lose it.
    def owe_preview(self, path: str) -> None:
        self._write("INSERT OR IGNORE INTO previews_owed (path, since) VALUES (?, ?)", (path, time.time()))

    def preview_settled(self, path: str) -> None:
        self._write("DELETE FROM previews_owed WHERE path = ?", (path,))

    def owed_previews(self) -> list[str]:
        return [row["path"] for row in self._query("SELECT path FROM previews_owed ORDER BY since, path")]

    def add_manifest_op(self, op: dict) -> int:
        return int(self._write("INSERT INTO manifest_pending (op) VALUES (?)",
                               (json.dumps(op, default=str),)).lastrowid or 0)

    def manifest_ops(self) -> list[tuple[int, dict]]:
        return [(r["id"], json.loads(r["op"])) for r in self._query("SELECT * FROM manifest_pending ORDER BY id")]

    def clear_manifest_ops(self, up_to_id: int) -> None:
        self._write("DELETE FROM manifest_pending WHERE id <= ?", (up_to_id,))

    # --- small state ----------------------------------------------------------------------

    def get_kv(self, key: str, default=None):
        rows = self._query("SELECT value FROM kv WHERE key = ?", (key,))
        return json.loads(rows[0]["value"]) if rows else default

    def set_kv(self, key: str, value) -> None:
        self._write("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def incr_kv(self, key: str, by: int = 1) -> int:
        """Add `by` to a counter (0 if absent) in one statement; returns the new value."""
        sql = ("INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE "
               "SET value = CAST(CAST(value AS INTEGER) + excluded.value AS TEXT) RETURNING value")
        with self._lock, self.transaction():
            return int(self._guard(lambda: self._conn.execute(sql, (key, str(int(by)))).fetchone()[0]))
