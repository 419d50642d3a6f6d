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
from collections.abc import Callable

from contract.files import CANCEL_FILE
from contract.protocol import ErrorKind, read_finished
from daemon.ledger import Job, JobState
from daemon.repair import status_problem
from daemon.retention import unfinished
from daemon.runners.base import EngineError
from daemon.runners.local import stop_left_over
from daemon.scheduling import Scheduler
from daemon.store import JobStore

log = logging.getLogger(__name__)
UNRESOLVED_RETRY_SECONDS = 10.0  # an attempt the engine could not be asked about at start-up: asked again after this


def recover(store: JobStore, scheduler: Scheduler, finish_claim: Callable[[Job], None],
            unfinished_claims: set[str]) -> None:
    """Bring every unfinished job of ``store``'s ledger to a state the loop can carry on from. ``finish_claim``
    takes a half-claimed job in; the ids of claims the ledger could not record go into ``unfinished_claims``."""
    ledger, outbox = store.ledger, scheduler.outbox
    for job in ledger.jobs():
        problem = status_problem(outbox, job) if job.state != JobState.CLAIMING else None
        if problem:
            _jlog(job.id).warning("outbox/%s/status.json was %s; rewritten from the ledger", job.id, problem)
            store.publish(job)
    for job in ledger.jobs(JobState.CLAIMING):
        _jlog(job.id).info("finishing an interrupted claim of inbox/%s", job.name)
        _isolated(store, job, finish_claim, unfinished_claims)
    for job in ledger.jobs(JobState.RUNNING, JobState.INTERRUPTED):
        if job.id not in scheduler.running:  # (a second pass after the ledger could not be written: adopted already)
            _isolated(store, job, lambda job: _resume(store, scheduler, job))
    for job in ledger.jobs(JobState.QUEUED):
        if (outbox / job.id / CANCEL_FILE).exists():
            _isolated(store, job, lambda job: scheduler.cancel(job.id))
        else:  # queued by a version that wrote no resolved spec
            _isolated(store, job, scheduler.resolve_spec)
    for job in ledger.jobs(JobState.SUCCEEDED):
        # A crash during (or just before) the clean-up after success leaves it unfinished: finish it as it began.
        policy = unfinished(scheduler.jobs_dir / job.id)
        if policy is not None:
            try:
                scheduler.after_success(job, policy or None)
            except sqlite3.OperationalError:
                raise
            except Exception:
                _jlog(job.id).exception("could not finish the clean-up after its success; carrying on")


def _resume(store: JobStore, scheduler: Scheduler, job: Job) -> None:
    jl = _jlog(job.id)
    runner, engine, grace = scheduler.runner, job.engine or "local", scheduler.config.stop_grace_seconds
    if engine == "local":
        stop_left_over(job, scheduler.state, grace)
    elif not runner.ran(job):
        store.fail(job.id, ErrorKind.ENGINE,
                   f"attempt {job.attempt} was handed to {engine} as {job.engine_ref}, but this daemon now runs "
                   f"jobs on {runner.kind}; cancel it in {engine} if it still runs, then drop the dataset again "
                   f"(it is kept in {job.path}), or set runner.kind back to {engine}")
        return
    elif job.state == JobState.RUNNING and runner.attempts_outlive_daemon:
        try:
            attempt = runner.reattach(job, grace)
        except EngineError as exc:
            # Whether the engine runs it cannot be told now; submitting again could run it twice. Asked again later.
            jl.warning("cannot ask %s about attempt %d (%s); asking again in %.0f s", engine, job.attempt, exc,
                       UNRESOLVED_RETRY_SECONDS)
            scheduler.unresolved[job.id] = time.monotonic() + UNRESOLVED_RETRY_SECONDS
            return
        scheduler.unresolved.pop(job.id, None)
        if attempt is not None:
            if attempt.ref != job.engine_ref:
                # Found by its name after a crash between submitting and recording (runner.lookup): recorded now,
                # so a later restart, a cancel and `dropfit status` all know it.
                job = store.update(job.id, engine_ref=attempt.ref)
            jl.info("re-attached to %s %s (%s); not submitting it again; events from epoch %d", engine, attempt.ref,
                    job.engine_state or "state unknown", job.epoch)
            scheduler.adopt(job, attempt)
            return
    finished = read_finished(scheduler.outbox / job.id)
    if finished is not None:
        jl.info("its trainer finished while the daemon was down; not running it again")
        # The last epochs' events may have been lost with the daemon: the marker has the final count.
        job = store.update(job.id, epoch=int(finished.get("epochs_trained") or job.epoch), pid=None)
        scheduler.succeed(job, time.time() - job.started_at if job.started_at else None)
        return
    jl.info("re-queued after a restart; resumes from its last completed epoch (%d)", job.epoch)
    store.set(job.id, JobState.QUEUED, pid=None)


def retry_unresolved(store: JobStore, scheduler: Scheduler, now: float) -> None:
    """Ask the engine again about the attempts recovery could not resolve (see `_resume`), those whose time came."""
    for job_id, at in list(scheduler.unresolved.items()):
        if now < at:
            continue
        job = store.ledger.get(job_id)
        if job is None or job.state != JobState.RUNNING or job_id in scheduler.running:
            scheduler.unresolved.pop(job_id, None)
            continue
        _isolated(store, job, lambda job: _resume(store, scheduler, job))


def _isolated(store: JobStore, job: Job, step, unfinished_claims: set[str] | None = None) -> None:
    try:
        step(job)
    except sqlite3.OperationalError:
        if job.state == JobState.CLAIMING and unfinished_claims is not None:
            unfinished_claims.add(job.id)
        raise  # the ledger cannot be written: the daemon pauses and tries again (not a bug in this job)
    except Exception:
        store.fail_with_traceback(job, "recovering this job after a restart")


def _jlog(job_id: str) -> logging.LoggerAdapter:
    return logging.LoggerAdapter(log, {"job_id": job_id})
