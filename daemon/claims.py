"""Settled drops become jobs: a drop is claimed (recorded in the ledger, moved out of the inbox), extracted and
validated by `daemon.intake`, and recorded queued or failed through the `JobStore`. A folder without a job.yaml yet
waits for one; a claim the ledger could not finish is finished later (``unfinished``).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

from contract.atomic import display_path
from contract.files import JOB_FILE, PREDICT_FILE
from contract.predict_spec import PredictRun
from contract.protocol import ErrorKind, JobKind
from daemon import models
from daemon.config import Config
from daemon.intake import claim_hidden_path, has_spec, may_be_a_job, new_job_id, take_in
from daemon.ledger import Job, JobState
from daemon.store import JobStore, jlog
from daemon.watch import Settler

# Lines about drops keep the logger name they had before the daemon was split into modules.
log = logging.getLogger("daemon.service")
WAITING_POLL_SECONDS = 2.0  # how often a settled folder without a job.yaml is looked at again


class Claims:
    """Takes settled drops in (`intake`); ``settler`` is told of folders that must settle again."""

    def __init__(self, config: Config, store: JobStore, settler: Settler):
        self.config, self.store, self.settler = config, store, settler
        self.ledger = store.ledger  # for reading: every change goes through the store
        self.inbox, self.outbox = config.path("inbox"), config.path("outbox")
        self.jobs_dir = config.path("state_dir") / "jobs"
        self.waiting: dict[str, float] = {}  # settled folders without a job.yaml -> when to look again
        self.left_in_inbox: set[str] = set()  # drops an intake could not move (they failed): not taken in again
        self.unfinished: set[str] = set()  # claims cut short by a ledger that could not be written

    def intake(self, name: str) -> None:
        """Claim ``inbox/<name>`` as a new job if it is a folder with a job.yaml or an archive (after it settled)."""
        source = self.inbox / name
        if not may_be_a_job(self.inbox, name):
            return
        # A job.yaml that is a folder or a dangling link is a job too: it is rejected with the reason, not waited on.
        if source.is_dir() and not has_spec(source):
            log.info("inbox/%s has no %s (or %s) yet; it becomes a job when one appears", name, JOB_FILE,
                     PREDICT_FILE)
            self.waiting[name] = time.monotonic() + WAITING_POLL_SECONDS
            return
        # The name shown and recorded is valid text (bytes that are not UTF-8 as \xNN); the source keeps the real one.
        display = display_path(name)
        job_id = new_job_id(display)
        job = self.ledger.create(job_id, display, str(source), str(self.jobs_dir / job_id / "dataset"))
        try:
            self.finish_claim(job)
        except sqlite3.OperationalError:
            # The ledger cannot be written (a full disk): the claim is finished once it can (the loop).
            self.unfinished.add(job.id)
            raise
        except Exception:
            self.store.fail_with_traceback(job, "taking this drop in")

    def look_for_spec(self, name: str) -> None:
        """Whether a waiting folder got its job.yaml (then it settles again) or went away."""
        folder = self.inbox / name
        if not folder.is_dir():
            self.waiting.pop(name, None)
        elif has_spec(folder):
            self.waiting.pop(name, None)
            self.settler.touch(name)  # it settles again from now: the rest may still be arriving
        else:
            self.waiting[name] = time.monotonic() + WAITING_POLL_SECONDS

    def finish_claim(self, job: Job) -> None:
        """Take a claimed (or half-claimed) job in: move, extract, validate, record the outcome."""
        jl = jlog(job.id)
        result = take_in(job.name, Path(job.source) if job.source else None, claim_hidden_path(self.inbox, job.id),
                         Path(job.path), self.config.job_defaults, self.config.limits, models=self.find_model)
        if result.outcome == "gone":
            jl.info("inbox/%s disappeared before it could be claimed", job.name)
            self.ledger.delete(job.id)
        elif result.outcome == "queued" and isinstance(result.spec, PredictRun):
            self.store.write_resolved(job.id, result.spec)
            self.store.set(job.id, JobState.QUEUED, kind=JobKind.PREDICT, model_job=result.spec.model_job, epochs=None)
            jl.info("queued inbox/%s: labelling its images with the model of %s", job.name, result.spec.model_job)
        elif result.outcome == "queued":
            self.store.write_resolved(job.id, result.spec)
            self.store.set(job.id, JobState.QUEUED, kind=JobKind.TRAIN, epochs=result.spec.epochs,
                           multi_gpu=result.spec.hardware.multi_gpu)
            jl.info("queued inbox/%s (%d epochs)", job.name, result.spec.epochs)
        else:
            jl.warning("inbox/%s %s (%s):\n%s", job.name, result.outcome, result.kind, result.message)
            if result.kept is not None and job.source and Path(result.kept) == Path(job.source):
                self.left_in_inbox.add(Path(job.source).name)  # not taken in again until it changes
            kind = JobKind.PREDICT if (Path(job.path) / PREDICT_FILE).exists() else JobKind.TRAIN
            self.store.update(job.id, kind=kind, **({"path": str(result.kept)} if result.kept is not None else {}))
            self.store.fail(job.id, ErrorKind(result.kind), result.message)

    def find_model(self, ref: str):
        """A predict.yaml's ``model:`` as (training job id, its outbox folder); LookupError says what there is."""
        return models.resolve(ref, self.ledger, self.outbox)
