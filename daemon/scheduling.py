"""The running half of the daemon: queued jobs handed to the runner in order, their events and ends recorded, their
cancels, timeouts and clean-up. `Scheduler` is given the `JobStore` to record with; `daemon.service.Daemon` owns the
loop and intake, and passes it what the runner reports.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from contract.atomic import write_json
from contract.files import CANCEL_FILE, EVENTS_FILE, SPEC_FILE, TRAIN_LOG
from contract.predict_spec import PredictRun
from contract.protocol import EpochEnd, Error, ErrorKind, Finished, JobKind, Progress, Started, run_argv
from daemon import models
from daemon.config import Config
from daemon.decision import Action, Ending, RetryPolicy, decide
from daemon.intake import validate
from daemon.ledger import Job, JobState
from daemon.metrics import Metrics
from daemon.retention import Retained, finish, put_away, unfinished
from daemon.runners.base import Attempt, Launch, Runner, SubmitError
from daemon.runners.local import trainer_env
from daemon.store import JobStore, jlog

log = logging.getLogger(__name__)
SUBMIT_RETRY_SECONDS = 10.0  # after an engine refused a submission for now (it may be down)


@dataclass
class Running:
    """What the daemon keeps about a job whose attempt is in the runner's hands."""

    attempt: Attempt
    job: Job
    deadline: float | None = None  # when job_timeout_seconds runs out: only while it runs (see `_clock`)
    kill_at: float | None = None
    cancel: bool = False
    timed_out: bool = False
    finished: Finished | None = None
    error: Error | None = None
    first_attempt: bool = True
    exited: int | None = None  # its exit status, once it ended
    engine_timed_out: bool = False  # the engine stopped it at its own time limit
    detail: str | None = None  # the engine's words on how it ended
    stopped_by_daemon: bool = False  # terminate() or kill() came from us (a cancel, a timeout, a protocol error)


class Scheduler:
    """See the module's doc. ``running`` holds the jobs whose attempt is in the runner's hands."""

    def __init__(self, config: Config, store: JobStore, runner: Runner, metrics: Metrics):
        self.config, self.store, self.runner, self.metrics = config, store, runner, metrics
        self.ledger = store.ledger  # for reading: every change goes through the store
        self.outbox, self.state = config.path("outbox"), config.path("state_dir")
        self.archive, self.jobs_dir = config.path("archive_dir"), self.state / "jobs"
        self.policy = RetryPolicy(config.retries)
        self.running: dict[str, Running] = {}
        self.submit_blocked_until: float | None = None  # set while the engine refuses submissions for now
        self.unresolved: dict[str, float] = {}  # jobs whose engine could not be asked at start-up -> when to ask again
        self.stopping = False  # the daemon is stopping: nothing new is started

    def find_model(self, ref: str):
        """A predict.yaml's ``model:`` as (training job id, its outbox folder); LookupError says what there is."""
        return models.resolve(ref, self.ledger, self.outbox)

    def schedule(self) -> None:
        """Hand queued jobs to the runner, oldest first, while it takes them."""
        if self.submit_blocked_until is not None and time.monotonic() < self.submit_blocked_until:
            return
        while not self.stopping:
            job = self.ledger.next_queued()
            # First in, first out: a job the runner cannot take yet (e.g. a multi-GPU one) holds the rest back.
            if job is None or not self.runner.can_start(job.multi_gpu):
                return
            if not self._start(job):
                return

    def resolve_spec(self, job: Job) -> bool:
        """Write the resolved spec of a job queued by an older version (which had none); False if its spec is no
        longer valid (the job has been failed). Called by recovery; intake writes it for every new job."""
        spec_file = self.jobs_dir / job.id / SPEC_FILE
        if spec_file.is_file():
            return True
        if not job.path:
            self.store.fail(job.id, ErrorKind.SPEC, "the job's dataset is not recorded (a ledger rebuilt without it); "
                                                    "drop the dataset again")
            return False
        spec, error = validate(Path(job.path), self.config.job_defaults, display=job.name,
                               max_classes=self.config.limits.max_classes, models=self.find_model)
        if error:
            self.store.fail(job.id, ErrorKind.SPEC, error)
            return False
        write_json(spec_file, spec.model_dump(mode="json"))
        self.store.write_resolved(job.id, spec)
        if isinstance(spec, PredictRun):
            self.store.update(job.id, kind=JobKind.PREDICT, model_job=spec.model_job, epochs=None)
        return True

    def _start(self, job: Job) -> bool:
        """Hand one job to the runner; False if the runner refused it for now (scheduling pauses)."""
        spec_file = self.jobs_dir / job.id / SPEC_FILE
        if not spec_file.is_file():
            self.store.fail(job.id, ErrorKind.INTERNAL, f"its resolved spec {spec_file} is missing (removed by hand?); "
                                                        "drop the dataset again")
            return True
        attempt_no = job.attempt + 1
        work = self.jobs_dir / job.id / "work"
        events_file = work / EVENTS_FILE if self.runner.follows_events_file else None
        log_file = self.outbox / job.id / TRAIN_LOG
        argv = run_argv(self.runner.trainer_command or self.config.trainer_argv(), job.path, spec=spec_file,
                        out=self.outbox / job.id, work=work, job_id=job.id, events_file=events_file,
                        log_file=log_file if self.runner.writes_own_log else None)
        # Recorded before the trainer exists: a start the ledger cannot record (its disk is full) starts nothing,
        # rather than a trainer the daemon would start again at every tick.
        job = self.store.set(job.id, JobState.RUNNING, attempt=attempt_no, pid=None, pid_start=None, host=None,
                             gpu=None, engine=self.runner.kind, engine_ref=None, engine_state="submitted",
                             started_at=job.started_at or time.time())
        timeout = self.config.job_timeout_seconds
        launch = Launch(job.id, attempt_no, argv, trainer_env(job.id, self.state), log_file,
                        multi_gpu=job.multi_gpu, timeout=timeout, grace=self.config.stop_grace_seconds,
                        events_file=events_file)
        try:
            attempt = self.runner.submit(launch)
        except SubmitError as exc:
            self.metrics.submit_errors.labels(self.runner.kind).inc()
            if exc.permanent:
                self.store.fail(job.id, ErrorKind.ENGINE, f"{self.runner.kind} refused the job: {exc}")
                return True
            jlog(job.id).warning("%s did not take the job (%s); trying again in %.0f s", self.runner.kind, exc,
                                 SUBMIT_RETRY_SECONDS)
            self.store.set(job.id, JobState.QUEUED, attempt=job.attempt - 1, engine_state=None,
                           error_kind=ErrorKind.RETRY.value, error=f"not submitted to {self.runner.kind}: {exc}")
            self.submit_blocked_until = time.monotonic() + SUBMIT_RETRY_SECONDS
            return False
        except OSError as exc:
            self.store.fail(job.id, ErrorKind.INTERNAL, f"could not start the trainer ({argv[0]}): {exc}")
            return True
        self.running[job.id] = r = Running(attempt, job, first_attempt=attempt_no == 1)
        at_once = self.runner.runs_when_submitted
        r.job = self.store.update(job.id, engine_ref=attempt.ref, engine_state="running" if at_once else "pending",
                                  running_since=None, ran_seconds=0.0, **attempt.recorded)
        if at_once:  # running from now; an engine says when it starts the attempt (`on_engine_update`)
            self._clock(r, "running", time.time())
        else:
            jlog(job.id).info("submitted to %s as %s", self.runner.kind, attempt.ref)
        self.metrics.job_started(job.id, job.name, *job.progress)
        return True

    def adopt(self, job: Job, attempt: Attempt) -> None:
        """Follow an attempt a previous daemon handed to the engine (after a restart): no second submission. Its
        timeout goes on counting from when the engine started it (the ledger keeps that, and what it ran before)."""
        r = self.running[job.id] = Running(attempt, job, first_attempt=job.attempt == 1)
        if job.running_since is not None and job.engine_state == "running":
            self._clock(r, "running", job.running_since)
        self.metrics.job_started(job.id, job.name, *job.progress)

    def _clock(self, r: Running, state: str, since: float | None = None) -> None:
        """``job_timeout_seconds`` counts the time an attempt runs: waiting in the engine (for a node, held by Kueue,
        requeued, preempted) uses none of it, as ``sbatch --time`` counts. ``since`` (Unix time) is when the engine
        started it running, by its own clock where it says; the ledger keeps it (``running_since``) and the seconds
        earlier runs of the attempt used (``ran_seconds``), so a re-attached daemon goes on with the same clock."""
        job, timeout = r.job, self.config.job_timeout_seconds
        if state == "running":
            since = since or job.running_since or time.time()
            if job.running_since != since:
                r.job = self.store.update(job.id, running_since=since)
            left = timeout - (job.ran_seconds or 0.0) if timeout else None
            r.deadline = time.monotonic() + (since + left - time.time()) if timeout else None
        elif job.running_since is not None:  # back in the engine's queue
            ran = (job.ran_seconds or 0.0) + max(0.0, time.time() - job.running_since)
            r.job = self.store.update(job.id, running_since=None, ran_seconds=ran)
            if not r.timed_out:
                r.deadline = None

    def stop_trainer(self, r: Running) -> None:
        r.stopped_by_daemon = True
        r.attempt.terminate()
        r.kill_at = time.monotonic() + self.config.stop_grace_seconds

    def check_running(self, now: float) -> None:
        """Timeouts, and trainers that did not stop within their grace period."""
        for job_id, r in list(self.running.items()):
            if r.deadline is not None and now >= r.deadline and not r.timed_out:
                r.timed_out = True
                jlog(job_id).warning("timed out after %.0f s; stopping the trainer", self.config.job_timeout_seconds)
                self.stop_trainer(r)
            if r.kill_at is not None and now >= r.kill_at:
                jlog(job_id).warning("the trainer did not stop within %.0f s; killing it",
                                     self.config.stop_grace_seconds)
                r.attempt.kill()
                r.kill_at = None

    # --- what the runner reports -----------------------------------------------------------------------------

    def on_event(self, job_id: str, event, offset: int | None = None) -> None:
        r = self.running.get(job_id)
        if r is None:
            return
        # The events file offset is kept with what the event changed, so a restart neither loses nor repeats an
        # epoch. `finished` and `error` change only memory: they are read again after a restart.
        moved = {"events_offset": offset} if offset is not None else {}
        if isinstance(event, Started):
            # A prediction job counts images where a training job counts epochs.
            progress = ({"images_done": 0, "images_total": event.images} if event.kind == JobKind.PREDICT
                        else {"epoch": event.resumed_from, "epochs": event.epochs})
            self._clock(r, "running")
            job = r.job = self.store.update(job_id, **progress,
                                            engine_state="running", time_budget=event.time_budget,
                                            deadline=event.deadline, warnings=event.warnings or None, **moved)
            if r.deadline is None:  # it runs, though the engine has not said so yet
                self._clock(r, "running")
            self.metrics.budget(job_id, job.name, event.time_budget, event.deadline)
            self.store.started(job)
            if event.skipped and r.first_attempt and not event.resumed_from:
                self.metrics.invalid_images.inc(event.skipped)
            self.metrics.job_started(job_id, job.name, *job.progress)
        elif isinstance(event, EpochEnd):
            row = event.metrics()
            best = r.job.best_val_accuracy
            if event.val_accuracy is not None:
                best = max(best or 0.0, event.val_accuracy)
            r.job = self.store.update(job_id, epoch=event.epoch, epochs=event.epochs or r.job.epochs, metrics=row,
                                      best_val_accuracy=best, **moved)
            self.metrics.epoch(job_id, r.job.name, row)
        elif isinstance(event, Progress):
            r.job = self.store.update(job_id, images_done=event.done, images_total=event.total, **moved)
            self.metrics.predicted(job_id, r.job.name, event.done, event.images_per_second)
        elif isinstance(event, Finished):
            r.finished = event
            # Found after training (an INT8 export that lost accuracy): status.json says so too. (Read again after a
            # restart, hence only the new ones.)
            new = [w for w in event.warnings if w not in (r.job.warnings or [])]
            if new:
                r.job = self.store.update(job_id, warnings=[*(r.job.warnings or []), *new])
        elif isinstance(event, Error):
            r.error = event

    def on_engine_update(self, job_id: str, state: str, detail: str | None, started_at: float | None = None) -> None:
        r = self.running.get(job_id)
        if r is None:
            return
        if r.job.engine_state != state:
            jlog(job_id).info("%s in %s%s", state, self.runner.kind, f" ({detail})" if detail else "")
            r.job = self.store.update(job_id, engine_state=state)
        # Running: from the engine's own start time when it gives one (also after a re-attach), else from now.
        self._clock(r, state, started_at)

    def on_protocol_mismatch(self, job_id: str, message: str) -> None:
        r = self.running.get(job_id)
        if r is None:
            return
        jlog(job_id).error("%s; stopping it", message)
        r.error = Error(kind=ErrorKind.PROTOCOL, message=message)
        self.stop_trainer(r)

    def on_exit(self, job_id: str) -> None:
        """Record what the end of a job's attempt means. It leaves `running` only once that is recorded: if the
        ledger cannot be written now, the next tick tries again."""
        r = self.running[job_id]
        job = self.ledger.get(job_id)
        if job.state != JobState.RUNNING:  # recorded already, by an earlier try that failed after it
            self.forget(job_id)
            return
        jl = jlog(job_id)
        seconds = time.time() - job.started_at if job.started_at else None
        how = Ending(finished=r.finished is not None, cancelled=r.cancel, timed_out=r.timed_out or r.engine_timed_out,
                     stopping=self.stopping, timeout_seconds=self.config.job_timeout_seconds, detail=r.detail)
        decision = decide(r.exited, r.error, job.failures + 1, self.policy, how)
        ended = {"pid": None, "engine_state": None}
        if decision.action == Action.SUCCEED:
            self.succeed(job, seconds)
        elif decision.action == Action.CANCEL:
            jl.info("cancelled")
            self._cancelled(job_id, seconds)
        elif decision.action == Action.INTERRUPT:
            jl.info("interrupted at epoch %d; it resumes when the daemon starts again", job.epoch)
            self.store.set(job_id, JobState.INTERRUPTED, **ended)
        elif decision.action == Action.RETRY:
            jl.warning("attempt %d failed (%s); retrying from the last checkpoint", job.attempt, decision.reason)
            self.store.set(job_id, JobState.QUEUED, error_kind=ErrorKind.RETRY.value, failures=job.failures + 1,
                           error=f"attempt {job.attempt}: {decision.reason}", **ended)
        else:
            if decision.kind == ErrorKind.IO:
                # Whatever the failed write left (checkpoints, disk cache) only takes space the next job needs.
                shutil.rmtree(self.jobs_dir / job_id / "work", ignore_errors=True)
            jl.warning("failed (%s) after %d attempt(s): %s", decision.kind.value, job.attempt,
                       (decision.reason or "").splitlines()[0][:300])
            self.store.fail(job_id, decision.kind, decision.reason, seconds=seconds)
        self.forget(job_id)
        self.schedule()

    def forget(self, job_id: str) -> None:
        self.running.pop(job_id, None)
        self.runner.release(job_id)

    def succeed(self, job: Job, seconds: float | None) -> None:
        """Put a succeeded job's dataset away and record the success and where the dataset went in one change: no
        reader of the ledger (`dropfit status`, a webhook) sees "succeeded" with a dataset about to be deleted."""
        # A crash after the put-away, before the ledger heard of the success, left the policy it began with.
        kept = self._put_away(job, unfinished(self.jobs_dir / job.id) or None)
        where = {"path": str(kept.path) if kept.path else None} if kept is not None and kept.changed else {}
        job = self.store.end(job.id, JobState.SUCCEEDED, "succeeded", seconds, error_kind=None, error=None,
                             finished_at=time.time(), pid=None, engine_state=None, **where)
        jlog(job.id).info("succeeded: %s", self.outbox / job.id)
        self._report(job, kept)

    def after_success(self, job: Job, policy: str | None = None) -> None:
        """Finish putting the dataset of a job recorded as succeeded away (a restart after a crash during its
        clean-up): ``policy`` is the one it began with, default the config's ``after_success``."""
        kept = self._put_away(job, policy)
        if kept is not None and kept.changed:
            self.store.update(job.id, path=str(kept.path) if kept.path else None)
        self._report(job, kept)

    def _put_away(self, job: Job, policy: str | None) -> Retained | None:
        policy = policy or self.config.after_success
        # No recorded path (an older ledger's "" included): where a claim puts it, inside the job's own state folder.
        dataset = Path(job.path) if job.path else self.jobs_dir / job.id / "dataset"
        try:
            return put_away(self.jobs_dir / job.id, dataset, job.name, self.archive / job.id, policy)
        except OSError as exc:
            jlog(job.id).error("could not %s the dataset (%s); it stays in %s", policy, exc, job.path)
            return None

    def _report(self, job: Job, kept: Retained | None) -> None:
        if kept is None:
            return
        finish(self.jobs_dir / job.id)  # only now: the ledger knows where the dataset is
        if kept.changed:
            jlog(job.id).info("dataset %s", f"archived in {kept.path}" if kept.path else "deleted")

    # --- cancel ----------------------------------------------------------------------------------------------

    def poll_cancels(self) -> None:
        # A stat per queued or running job, instead of watching the outbox (whose trainers write all the time).
        for job in [*self.ledger.jobs(JobState.QUEUED), *(r.job for r in self.running.values())]:
            if (self.outbox / job.id / CANCEL_FILE).exists():
                self.cancel(job.id)

    def cancel(self, job_id: str) -> None:
        job = self.ledger.get(job_id)
        if job is None or job.state.terminal:
            return
        r = self.running.get(job_id)
        if r is not None:
            if not r.cancel:
                jlog(job_id).info("cancel requested; stopping the trainer")
                r.cancel = True
                self.stop_trainer(r)
        elif job.state in (JobState.QUEUED, JobState.INTERRUPTED):
            jlog(job_id).info("cancelled before it ran")
            self._cancelled(job_id, None)

    def _cancelled(self, job_id: str, seconds: float | None) -> None:
        self.store.end(job_id, JobState.CANCELLED, "cancelled", seconds, error_kind=ErrorKind.CANCELLED.value,
                       error="cancelled by request", finished_at=time.time(), pid=None, engine_state=None)
