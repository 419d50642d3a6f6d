"""`JobStore`: the one owner of every change to a job. A change is written to the ledger (the truth), then to the job's
``outbox/<id>/status.json``, and then told to the listeners: the metrics and the webhook notifier.

Everything else in the daemon reads jobs freely (``store.ledger``) but changes them only through a store, so the
outbox and the webhooks can never disagree with the ledger about what happened.
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path

from contract.protocol import ErrorKind
from daemon import outbox
from daemon.ledger import Job, JobState, Ledger
from daemon.metrics import Metrics
from daemon.notify import Notifier

# Lines about one job carry its id, and keep the logger name they had before the daemon was split into modules:
# operators (and tests) grep for "[<job-id>] daemon.service:".
_JOB_LOG = logging.getLogger("daemon.service")
# The states a webhook hears of when entered (besides "queued" once, at intake, and "started" from the trainer).
_ENDS = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


def jlog(job_id: str) -> logging.LoggerAdapter:
    """A logger whose lines carry ``[job-id]``."""
    return logging.LoggerAdapter(_JOB_LOG, {"job_id": job_id})


class JobStore:
    """Records job changes: see the module's doc. ``retention_seconds``: how long an ended job's metrics stay."""

    def __init__(self, ledger: Ledger, outbox_dir: Path, metrics: Metrics, retention_seconds: float,
                 notifier: Notifier | None = None):
        self.ledger, self.outbox, self.metrics, self.notifier = ledger, outbox_dir, metrics, notifier
        self.retention_seconds = retention_seconds

    def set(self, job_id: str, state: JobState, **changes) -> Job:
        """Move a job to ``state`` (the ledger refuses moves its lifecycle does not allow), with ``changes``."""
        before = self.ledger.get(job_id) if self.notifier is not None and state is JobState.QUEUED else None
        job = self.ledger.transition(job_id, state, **changes)
        self.publish(job)
        # Webhooks: "queued" once, when taken in (not for a retry or a submission the engine refused for now);
        # "started" when the trainer says so (`started`); and how the job ended.
        if self.notifier is not None and (state in _ENDS or (before is not None and before.state is JobState.CLAIMING)):
            self.notifier.job_changed(job)
        return job

    def update(self, job_id: str, **changes) -> Job:
        """Change a job's fields, not its state."""
        job = self.ledger.update(job_id, **changes)
        self.publish(job)
        return job

    def publish(self, job: Job) -> None:
        """Rewrite the job's status.json from its record."""
        # The ledger is the truth and is already written; a full or broken outbox must not stop the state change
        # that follows (failing the job, freeing its GPU): status.json is rewritten at the next change.
        try:
            outbox.write_status(self.outbox, job)
        except OSError as exc:
            jlog(job.id).error("could not write outbox/%s/status.json: %s", job.id, exc.strerror or exc)

    def started(self, job: Job) -> None:
        """Tell the webhooks the trainer started (its state did not change: it was running for the engine)."""
        if self.notifier is not None:
            self.notifier.job_changed(job, "started")

    def write_resolved(self, job_id: str, spec) -> None:
        """Write the job's resolved spec into its outbox folder; a failure is logged (the job runs without it)."""
        try:
            outbox.write_resolved_spec(self.outbox, job_id, spec)
        except OSError as exc:
            jlog(job_id).error("could not write outbox/%s/%s: %s", job_id, outbox.RESOLVED_FILE, exc.strerror or exc)

    def end(self, job_id: str, state: JobState, outcome: str, seconds: float | None, **changes) -> Job:
        """End a job in ``state`` with ``outcome`` (counted in the metrics); ``seconds``: how long it ran, if it did."""
        job = self.set(job_id, state, outcome=outcome, **changes)
        self.metrics.job_ended(job.id, job.name, outcome, seconds, self.retention_seconds, job.kind)
        return job

    def fail(self, job_id: str, kind: ErrorKind, message: str, seconds: float | None = None) -> Job:
        """End a job ``failed`` (outcome ``rejected`` when the drop itself is unusable), with ``error.txt``."""
        outcome = "rejected" if kind.rejects_input else "failed"
        job = self.set(job_id, JobState.FAILED, outcome=outcome, error_kind=kind.value, error=message,
                       finished_at=time.time(), pid=None)
        try:
            outbox.write_error(self.outbox, job)
        except OSError as exc:
            jlog(job_id).error("could not write outbox/%s/error.txt: %s", job_id, exc.strerror or exc)
        self.metrics.job_ended(job.id, job.name, outcome, seconds, self.retention_seconds, job.kind)
        return job

    def fail_with_traceback(self, job: Job, doing: str) -> None:
        """A bug (ours) while ``doing`` something for one job: that job fails with the traceback, the rest go on.
        (Not for a ledger that cannot be written: that is no bug, and failing the job could not be recorded either.)"""
        text = traceback.format_exc()
        jlog(job.id).error("%s failed; failing the job and carrying on:\n%s", doing, text)
        try:
            self.fail(job.id, ErrorKind.INTERNAL, f"{doing} failed (a bug in dropfit; please report it):\n{text}")
        except Exception:
            jlog(job.id).exception("could not record the failure either; it stays %s", job.state.value)
