"""Start-up recovery: finish what a crash, a ``kill -9`` or a stop left half done, before anything new is looked at.

- half-done claims are finished (moved, extracted, validated) or recorded as gone;
- jobs handed to Slurm or Kubernetes are re-attached to (followed again from where their events were last read),
  never submitted twice: an attempt whose engine id the ledger did not get to record is found by its name, and
  while the engine cannot be asked the job waits (asked again every `UNRESOLVED_RETRY_SECONDS`);
- local jobs that were running are re-queued and resume from their last completed epoch — unless their trainer wrote
  ``finished.json`` meanwhile, then they succeed without running again; a trainer still alive from the previous
  daemon is stopped first, but only when it is provably ours (same host, same process start time, our job id and
  state folder in its environment);
- queued jobs with a ``CANCEL`` file are cancelled; the clean-up after a success is finished.

A failure recovering one job fails that job (kind ``internal``, the traceback in its error.txt) and recovery goes on
with the others: one bad record must never keep the daemon from serving the rest.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path
from typing import Protocol

from contract.files import CANCEL_FILE
from contract.protocol import ErrorKind, read_finished
from daemon.config import Config
from daemon.ledger import Job, JobState, Ledger
from daemon.repair import status_is_readable
from daemon.retention import unfinished
from daemon.runners.base import Attempt, EngineError, Runner
from daemon.runners.local import stop_left_over


class Daemon(Protocol):
    """What recovery needs of `daemon.service.Daemon` (declared here, not imported: the daemon imports recovery)."""

    config: Config
    ledger: Ledger
    runner: Runner
    outbox: Path
    state: Path
    jobs_dir: Path
    running: dict
    unresolved: dict[str, float]
    unfinished_claims: set[str]

    def finish_claim(self, job: Job) -> None: ...
    def resolve_spec(self, job: Job) -> bool: ...
    def adopt(self, job: Job, attempt: Attempt) -> None: ...
    def cancel(self, job_id: str) -> None: ...
    def succeed(self, job: Job, seconds: float | None) -> None: ...
    def after_success(self, job: Job, policy: str | None = None) -> None: ...
    def fail(self, job_id: str, kind: ErrorKind, message: str, seconds: float | None = None) -> None: ...
    def fail_with_traceback(self, job: Job, doing: str) -> None: ...
    def _publish(self, job: Job) -> None: ...
    def _update(self, job_id: str, **changes) -> Job: ...
    def _set(self, job_id: str, state: JobState, **changes) -> Job: ...

log = logging.getLogger(__name__)
UNRESOLVED_RETRY_SECONDS = 10.0  # an attempt the engine could not be asked about at start-up: asked again after this


def recover(daemon: Daemon) -> None:
    """Bring every unfinished job of ``daemon``'s ledger to a state the loop can carry on from."""
    ledger = daemon.ledger
    for job in ledger.jobs():
        if job.state != JobState.CLAIMING and not status_is_readable(daemon.outbox, job):
            _jlog(job.id).warning("outbox/%s/status.json was missing or unreadable; rewritten from the ledger", job.id)
            daemon._publish(job)
    for job in ledger.jobs(JobState.CLAIMING):
        _jlog(job.id).info("finishing an interrupted claim of inbox/%s", job.name)
        _isolated(daemon, job, daemon.finish_claim)
    for job in ledger.jobs(JobState.RUNNING, JobState.INTERRUPTED):
        if job.id not in daemon.running:  # (a second pass after the ledger could not be written: adopted already)
            _isolated(daemon, job, lambda job: _resume(daemon, job))
    for job in ledger.jobs(JobState.QUEUED):
        if (daemon.outbox / job.id / CANCEL_FILE).exists():
            _isolated(daemon, job, lambda job: daemon.cancel(job.id))
        else:  # queued by a version that wrote no resolved spec
            _isolated(daemon, job, daemon.resolve_spec)
    for job in ledger.jobs(JobState.SUCCEEDED):
        # A crash during (or just before) the clean-up after success leaves it unfinished: finish it as it began.
        policy = unfinished(daemon.jobs_dir / job.id)
        if policy is not None:
            try:
                daemon.after_success(job, policy or None)
            except sqlite3.OperationalError:
                raise
            except Exception:
                _jlog(job.id).exception("could not finish the clean-up after its success; carrying on")


def _resume(daemon: Daemon, job: Job) -> None:
    jl = _jlog(job.id)
    runner, engine, grace = daemon.runner, job.engine or "local", daemon.config.stop_grace_seconds
    if engine == "local":
        stop_left_over(job, daemon.state, grace)
    elif engine != runner.kind:
        daemon.fail(job.id, ErrorKind.ENGINE,
                    f"attempt {job.attempt} was handed to {engine} as {job.engine_ref}, but this daemon now runs "
                    f"jobs on {runner.kind}; cancel it in {engine} if it still runs, then drop the dataset again "
                    f"(it is kept in {job.path}), or set runner.kind back to {engine}")
        return
    elif job.state == JobState.RUNNING:
        try:
            attempt = runner.reattach(job, grace)
        except EngineError as exc:
            # Whether the engine runs it cannot be told now; submitting again could run it twice. Asked again later.
            jl.warning("cannot ask %s about attempt %d (%s); asking again in %.0f s", engine, job.attempt, exc,
                       UNRESOLVED_RETRY_SECONDS)
            daemon.unresolved[job.id] = time.monotonic() + UNRESOLVED_RETRY_SECONDS
            return
        daemon.unresolved.pop(job.id, None)
        if attempt is not None:
            if attempt.ref != job.engine_ref:
                # Found by its name after a crash between submitting and recording (runner.lookup): recorded now,
                # so a later restart, a cancel and `dropfit status` all know it.
                job = daemon._update(job.id, engine_ref=attempt.ref)
            jl.info("re-attached to %s %s (%s); not submitting it again; events from epoch %d", engine, attempt.ref,
                    job.engine_state or "state unknown", job.epoch)
            daemon.adopt(job, attempt)
            return
    finished = read_finished(daemon.outbox / job.id)
    if finished is not None:
        jl.info("its trainer finished while the daemon was down; not running it again")
        # The last epochs' events may have been lost with the daemon: the marker has the final count.
        job = daemon._update(job.id, epoch=int(finished.get("epochs_trained") or job.epoch), pid=None)
        daemon.succeed(job, time.time() - job.started_at if job.started_at else None)
        return
    jl.info("re-queued after a restart; resumes from its last completed epoch (%d)", job.epoch)
    daemon._set(job.id, JobState.QUEUED, pid=None)


def retry_unresolved(daemon: Daemon, now: float) -> None:
    """Ask the engine again about the attempts recovery could not resolve (see `_resume`), those whose time came."""
    for job_id, at in list(daemon.unresolved.items()):
        if now < at:
            continue
        job = daemon.ledger.get(job_id)
        if job is None or job.state != JobState.RUNNING or job_id in daemon.running:
            daemon.unresolved.pop(job_id, None)
            continue
        _isolated(daemon, job, lambda job: _resume(daemon, job))


def _isolated(daemon: Daemon, job: Job, step) -> None:
    try:
        step(job)
    except sqlite3.OperationalError:
        if job.state == JobState.CLAIMING:
            daemon.unfinished_claims.add(job.id)
        raise  # the ledger cannot be written: the daemon pauses and tries again (not a bug in this job)
    except Exception:
        daemon.fail_with_traceback(job, "recovering this job after a restart")


def _jlog(job_id: str) -> logging.LoggerAdapter:
    return logging.LoggerAdapter(log, {"job_id": job_id})
