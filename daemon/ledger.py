"""The durable job ledger: one SQLite table (WAL mode), the only record of what happened to each dropped dataset.

A job's state changes in one place, `Ledger.transition`, which refuses moves the lifecycle does not allow::

    claiming ──> queued ──> running ──> succeeded
        │          │  ^        │ │ └──> failed      (retries exhausted, invalid data, timeout)
        │          │  └────────┘ └────> cancelled
        │          │  (retry / restart)
        └──> failed└──> cancelled       running ──> interrupted ──> queued  (daemon stopped; resumes on start)
                                                        └──> succeeded, cancelled, failed  (found at start-up)
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path

from contract.protocol import JobKind

log = logging.getLogger(__name__)


class JobState(str, Enum):
    CLAIMING = "claiming"  # being moved out of the inbox
    QUEUED = "queued"
    RUNNING = "running"
    INTERRUPTED = "interrupted"  # stopped with the daemon; resumes on the next start
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


ALLOWED = {
    JobState.CLAIMING: {JobState.QUEUED, JobState.FAILED},
    JobState.QUEUED: {JobState.RUNNING, JobState.CANCELLED, JobState.FAILED},
    JobState.RUNNING: {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.QUEUED,
                       JobState.INTERRUPTED},
    # succeeded: its trainer finished while the daemon was stopping; failed: recovering it failed.
    JobState.INTERRUPTED: {JobState.QUEUED, JobState.CANCELLED, JobState.SUCCEEDED, JobState.FAILED},
    JobState.SUCCEEDED: set(),
    JobState.FAILED: set(),
    JobState.CANCELLED: set(),
}

OUTCOMES = ("succeeded", "failed", "cancelled", "rejected")

_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    source TEXT,
    path TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    epoch INTEGER NOT NULL DEFAULT 0,
    epochs INTEGER,
    metrics TEXT,
    best_val_accuracy REAL,
    outcome TEXT,
    error_kind TEXT,
    error TEXT,
    pid INTEGER,
    pid_start INTEGER,
    host TEXT,
    gpu TEXT,
    multi_gpu INTEGER NOT NULL DEFAULT 0,
    engine TEXT,
    engine_ref TEXT,
    engine_state TEXT,
    running_since REAL,
    ran_seconds REAL,
    events_offset INTEGER NOT NULL DEFAULT 0,
    time_budget REAL,
    deadline REAL,
    warnings TEXT,
    kind TEXT,
    model_job TEXT,
    images_done INTEGER,
    images_total INTEGER
);
"""
_SCHEMA = _TABLE.format(name="jobs") + "CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, seq);\n"


class IllegalTransition(RuntimeError):
    pass


@dataclass
class Job:
    seq: int
    id: str
    name: str
    state: JobState
    attempt: int  # attempts started (a restart of the daemon starts one more)
    source: str | None  # where the dataset was dropped (None: not known, e.g. rebuilt from the outbox)
    path: str | None  # where the dataset is now (None: nowhere, it was deleted)
    created_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None
    epoch: int = 0
    epochs: int | None = None
    metrics: dict | None = None
    best_val_accuracy: float | None = None
    outcome: str | None = None
    error_kind: str | None = None
    error: str | None = None
    pid: int | None = None
    pid_start: int | None = None  # the trainer's start time (clock ticks since boot), with pid its identity
    host: str | None = None  # where the trainer runs
    gpu: str | None = None
    multi_gpu: bool = False
    engine: str | None = None  # the runner of the current (or last) attempt: local, slurm, kubernetes
    engine_ref: str | None = None  # the engine's name for that attempt: a Slurm job id, a Kubernetes Job name
    engine_state: str | None = None  # pending (waiting in the engine) or running
    running_since: float | None = None  # when the engine started this attempt (Unix time): the timeout counts from it
    ran_seconds: float | None = None  # what earlier runs of this attempt used of the timeout (requeued, preempted)
    events_offset: int = 0  # how far the trainer's events file has been read and applied (remote runners)
    failures: int = 0  # attempts that failed and were retried: what `retries` limits (a daemon restart is none)
    time_budget: float | None = None  # seconds (job.yaml's time_budget), once the trainer has started
    deadline: float | None = None  # Unix time the trainer will have ended by, under a time budget
    warnings: list | None = None  # the trainer's warnings about the data
    # A `contract.protocol.JobKind` value: train (job.yaml) or predict (predict.yaml); None until intake has read the
    # spec. A prediction job has no epochs: it counts images labelled and to label (images_done, images_total), and
    # model_job is the training job whose model it uses.
    kind: str | None = None
    model_job: str | None = None
    images_done: int | None = None
    images_total: int | None = None

    @property
    def progress(self) -> tuple[int, int | None]:
        """(done, planned): images for a prediction job, epochs for a training job."""
        if self.kind == JobKind.PREDICT:
            return self.images_done or 0, self.images_total
        return self.epoch, self.epochs

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        data = dict(row)
        data["state"] = JobState(data["state"])
        data["metrics"] = json.loads(data["metrics"]) if data["metrics"] else None
        data["warnings"] = json.loads(data["warnings"]) if data.get("warnings") else None
        data["multi_gpu"] = bool(data.get("multi_gpu"))
        for key in PATH_COLUMNS:  # ledgers before 0.2 wrote "" for "none"
            value = data.get(key) or None
            data[key] = os.fsdecode(value) if isinstance(value, bytes) else value
        return cls(**data)

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["state"] = self.state.value
        return out


_COLUMNS = {f.name for f in fields(Job)} - {"seq", "id", "created_at"}
# Where a dataset was dropped and is now. A file name may hold bytes that are not UTF-8 (old archives, Samba shares),
# which Python keeps as surrogates and SQLite's text cannot hold: such a path is stored as its bytes (a BLOB) and read
# back as the same name.
PATH_COLUMNS = ("source", "path")


def _db_value(key: str, value):
    if key in PATH_COLUMNS and isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return os.fsencode(value)
    return value


class Ledger:
    """All jobs, in the order they were dropped. Safe against crashes: every change is one committed transaction."""

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        if readonly:
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
            self._migrate()
        self.db.row_factory = sqlite3.Row

    def check(self) -> None:
        """Raise sqlite3.DatabaseError unless the file is a sound SQLite database with our table."""
        result = self.db.execute("PRAGMA quick_check").fetchone()[0]
        if result != "ok":
            raise sqlite3.DatabaseError(f"integrity check failed: {result}")
        self.db.execute("SELECT COUNT(*) FROM jobs").fetchone()

    def _migrate(self) -> None:
        """Bring a ledger written by an older version to this schema, in one transaction."""
        info = {row[1]: row for row in self.db.execute("PRAGMA table_info(jobs)")}
        if info["path"][3] == 0 and set(_COLUMNS) <= set(info):
            return
        # Older ledgers: `path`/`source` NOT NULL with "" meaning none, and fewer columns. SQLite cannot drop a NOT
        # NULL constraint in place, so the table is copied into the current schema.
        common = [c for c in info if c in _COLUMNS | {"seq", "id", "created_at"}]
        select = ", ".join(f"NULLIF({c}, '')" if c in ("path", "source") else c for c in common)
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute(_TABLE.format(name="jobs_migrated"))
            self.db.execute(f"INSERT INTO jobs_migrated ({', '.join(common)}) SELECT {select} FROM jobs")
            if "images_total" not in info:
                # A ledger from before these columns counted a prediction job's images in the epoch columns.
                self.db.execute("UPDATE jobs_migrated SET images_done = epoch, images_total = epochs, epoch = 0, "
                                "epochs = NULL WHERE kind = ?", (JobKind.PREDICT.value,))
            self.db.execute("DROP TABLE jobs")
            self.db.execute("ALTER TABLE jobs_migrated RENAME TO jobs")
            self.db.execute("CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, seq)")
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        log.info("ledger %s migrated to the current schema", self.path)

    def close(self) -> None:
        self.db.close()

    # --- reads -----------------------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_row(row) if row else None

    def jobs(self, *states: JobState) -> list[Job]:
        """Jobs in drop order, optionally only those in ``states``."""
        if states:
            marks = ",".join("?" * len(states))
            rows = self.db.execute(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY seq",
                                   [s.value for s in states])
        else:
            rows = self.db.execute("SELECT * FROM jobs ORDER BY seq")
        return [Job.from_row(r) for r in rows]

    def count(self, state: JobState) -> int:
        return self.db.execute("SELECT COUNT(*) FROM jobs WHERE state = ?", (state.value,)).fetchone()[0]

    def next_queued(self) -> Job | None:
        row = self.db.execute("SELECT * FROM jobs WHERE state = ? ORDER BY seq LIMIT 1",
                              (JobState.QUEUED.value,)).fetchone()
        return Job.from_row(row) if row else None

    # --- writes ----------------------------------------------------------------------------------------------

    def create(self, job_id: str, name: str, source: str | None, path: str | None) -> Job:
        """Record a new job in state ``claiming``, before its folder is moved (so a crash mid-move is recoverable)."""
        now = time.time()
        self.db.execute(
            "INSERT INTO jobs (id, name, state, attempt, source, path, created_at, updated_at) "
            "VALUES (?, ?, ?, 0, ?, ?, ?, ?)",
            (job_id, name, JobState.CLAIMING.value, _db_value("source", source), _db_value("path", path), now, now))
        return self.get(job_id)

    def transition(self, job_id: str, state: JobState, **changes) -> Job:
        """Move a job to ``state`` (checked against the lifecycle) and record ``changes`` in the same transaction."""
        current = self.get(job_id)
        if current is None:
            raise KeyError(job_id)
        if state not in ALLOWED[current.state]:
            raise IllegalTransition(f"job {job_id}: {current.state.value} -> {state.value} is not allowed")
        return self._write(job_id, {"state": state.value, **changes})

    def update(self, job_id: str, **changes) -> Job:
        """Record progress (epoch, metrics, pid...) without changing the state."""
        if "state" in changes:
            raise ValueError("use transition() to change a job's state")
        return self._write(job_id, changes)

    def _write(self, job_id: str, changes: dict) -> Job:
        unknown = set(changes) - _COLUMNS
        if unknown:
            raise ValueError(f"unknown job fields: {sorted(unknown)}")
        changes = dict(changes, updated_at=time.time())
        for key in ("metrics", "warnings"):
            if changes.get(key) is not None:
                changes[key] = json.dumps(changes[key])
        assignments = ", ".join(f"{k} = ?" for k in changes)
        self.db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?",
                        [*(_db_value(k, v) for k, v in changes.items()), job_id])
        return self.get(job_id)

    def restore(self, record: dict) -> Job:
        """Insert a job as recorded elsewhere (its outbox status.json), when rebuilding a lost ledger."""
        row = {k: v for k, v in record.items() if k in _COLUMNS | {"id", "created_at"}}
        if row.get("kind") == JobKind.PREDICT and "images_total" not in row:  # from when images were counted as epochs
            row.update(images_done=row.pop("epoch", 0), images_total=row.pop("epochs", None))
        for key in ("metrics", "warnings"):
            if row.get(key) is not None:
                row[key] = json.dumps(row[key])
        row.setdefault("updated_at", time.time())
        names = ", ".join(row)
        self.db.execute(f"INSERT INTO jobs ({names}) VALUES ({', '.join('?' * len(row))})",
                        [_db_value(k, v) for k, v in row.items()])
        return self.get(row["id"])

    def delete(self, job_id: str) -> None:
        """Forget a job that never really existed (its folder vanished before it was claimed)."""
        self.db.execute("DELETE FROM jobs WHERE id = ? AND state = ?", (job_id, JobState.CLAIMING.value))
