"""The daemon's main loop: intake, queue, trainer processes, outbox, metrics and shutdown (recovery after a restart
is in `daemon.recovery`).

One thread (the loop) makes every decision and every ledger change. Watchdog's thread, the trainers' reader threads
and signal handlers only put `daemon.messages` on a `queue.SimpleQueue` (safe even from a signal handler). When idle,
the loop sleeps in ``get()`` until a message or its next deadline: no polling.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import shutil
import signal
import socket
import sqlite3
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from daemon import outbox, recovery
from daemon.config import Config
from daemon.decision import Action, RetryPolicy, decide
from daemon.intake import SPEC_FILE, claim_hidden_path, may_be_a_job, new_job_id, take_in, validate
from daemon.ledger import Job, JobState, Ledger
from daemon.lock import StateLock, StateLocked
from daemon.messages import (
    CancelRequest,
    InboxActivity,
    Message,
    StopSignal,
    TrainerEvent,
    TrainerExit,
    TrainerProtocolMismatch,
)
from daemon.metrics import Metrics, MetricsServer
from daemon.repair import open_ledger
from daemon.retention import put_away
from daemon.runner import TrainerProcess, trainer_env
from daemon.watch import CANCEL_FILE, Settler, Watcher, inbox_entries
from trainer.atomic import write_json
from trainer.protocol import EpochEnd, Error, ErrorKind, Finished, Started, run_argv
from trainer.spec import JOB_FILE

log = logging.getLogger(__name__)
LEDGER_FILE = "ledger.sqlite3"
DAEMON_FILE = "daemon.json"  # pid and metrics URL of the running daemon
CANCEL_POLL_SECONDS = 1.0  # how often outbox/<id>/CANCEL is looked for, for queued and running jobs only
LEDGER_RETRY_SECONDS = 5.0  # after the ledger could not be written (a full disk), when to try again
WAITING_POLL_SECONDS = 2.0  # how often a settled folder without a job.yaml is looked at again


def jlog(job_id: str) -> logging.LoggerAdapter:
    """A logger whose lines carry ``[job-id]``."""
    return logging.LoggerAdapter(log, {"job_id": job_id})


class StartupError(RuntimeError):
    """The daemon cannot start (unusable folders, a locked state folder, a busy port); the message says what to do."""


@dataclass
class Running:
    proc: TrainerProcess
    job: Job
    gpu: str | None
    deadline: float | None
    kill_at: float | None = None
    cancel: bool = False
    timed_out: bool = False
    finished: Finished | None = None
    error: Error | None = None
    first_attempt: bool = True
    exited: int | None = None  # its exit status, once it ended


class Daemon:
    """Run with `run` (blocks until SIGTERM/SIGINT or `request_stop`)."""

    def __init__(self, config: Config, registry=None):
        from importlib import metadata

        self.config = config
        self.inbox, self.outbox = config.path("inbox"), config.path("outbox")
        self.state, self.archive = config.path("state_dir"), config.path("archive_dir")
        self.jobs_dir = self.state / "jobs"
        try:
            version = metadata.version("dropfit")
        except metadata.PackageNotFoundError:
            version = "0"
        self.metrics = Metrics(registry, version)
        self.messages: queue.SimpleQueue = queue.SimpleQueue()
        self.settler = Settler(self.inbox, config.settle_seconds)
        self.waiting: dict[str, float] = {}  # settled folders without a job.yaml -> when to look again
        self.running: dict[str, Running] = {}
        self.gpus = config.gpu_ids()
        self.free_gpus = list(self.gpus)
        self.slots = len(self.gpus) or config.max_concurrent_jobs
        self.policy = RetryPolicy(config.retries)
        self.host = socket.gethostname()
        self.stopping = False
        self.next_cancel_poll = 0.0
        self.ledger_blocked_until: float | None = None  # set while the ledger cannot be written
        self.lock = StateLock(self.state)
        self.ledger: Ledger | None = None
        self.server: MetricsServer | None = None
        self.watcher: Watcher | None = None
        self.ready = threading.Event()

    # --- lifecycle -------------------------------------------------------------------------------------------

    def run(self, install_signals: bool = True) -> int:
        """Start, serve until stopped, and clean up. Raises `StartupError` if it cannot start."""
        self._check_folders()
        try:
            self.lock.acquire()
        except StateLocked as exc:
            raise StartupError(str(exc)) from None
        try:
            self.ledger = open_ledger(self.state / LEDGER_FILE, self.outbox, self.jobs_dir)
            self.server = self._metrics_server()
            self.recover()
            self.server.start()
            self.watcher = Watcher(self.inbox, lambda name: self.messages.put(InboxActivity(name)),
                                   self.config.observer.kind, self.config.observer.interval)
            self.watcher.start()
            # Whatever arrived while we were down settles like a new drop (a copy may still be going on).
            for name in inbox_entries(self.inbox):
                if may_be_a_job(self.inbox, name):
                    self.settler.touch(name)
            if install_signals:
                signal.signal(signal.SIGTERM, self._on_signal)
                signal.signal(signal.SIGINT, self._on_signal)
            write_json(self.state / DAEMON_FILE, {"pid": os.getpid(), "host": self.host, "started_at": time.time(),
                                                  "metrics_url": f"http://{self.server.host}:{self.server.port}/metrics",
                                                  "inbox": str(self.inbox), "outbox": str(self.outbox)})
            log.info("dropfit daemon ready: inbox %s, outbox %s, %d slot(s)%s", self.inbox, self.outbox, self.slots,
                     f", GPUs {self.gpus}" if self.gpus else "")
            self.ready.set()
            self.schedule()
            self._loop()
        finally:
            self._close()
        log.info("dropfit daemon stopped")
        return 0

    def recover(self) -> None:
        """Finish what a crash or stop left half done (see `daemon.recovery`)."""
        recovery.recover(self)

    def _close(self) -> None:
        for step in (lambda: self.watcher and self.watcher.stop(), lambda: self.server and self.server.stop(),
                     lambda: self.ledger and self.ledger.close(),
                     lambda: (self.state / DAEMON_FILE).unlink(missing_ok=True), self.lock.release):
            try:
                step()
            except Exception:
                log.exception("while stopping")

    def _check_folders(self) -> None:
        """Create the folders and make sure we can write to them, with a message that says how to fix it."""
        for name, folder in (("inbox", self.inbox), ("outbox", self.outbox), ("state_dir", self.state),
                             ("archive_dir", self.archive), ("state_dir", self.jobs_dir)):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StartupError(f"{name}: cannot create {folder}: {exc.strerror}") from None
            if not os.access(folder, os.W_OK | os.X_OK):
                st = folder.stat()
                raise StartupError(f"{name}: {folder} is not writable by uid {os.getuid()} (owner uid {st.st_uid}, "
                                   f"mode {st.st_mode & 0o777:o}); chown it to this user or run the daemon as "
                                   f"its owner (compose: DROPFIT_UID/DROPFIT_GID)")

    def _metrics_server(self) -> MetricsServer:
        host, port = self.config.metrics.host, self.config.metrics.port
        try:
            return MetricsServer(self.metrics.registry, host, port, self.health)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(f"metrics.port: {host}:{port} is already in use (another dropfit daemon, or "
                                   "another service?); set metrics.port in the config to a free port, or 0 for any"
                                   ) from None
            raise StartupError(f"metrics: cannot listen on {host}:{port}: {exc.strerror or exc}") from None

    def request_stop(self) -> None:
        self.messages.put(StopSignal(signal.SIGTERM))

    def _on_signal(self, signum, frame) -> None:
        self.messages.put(StopSignal(signum))

    def health(self) -> dict:
        ok = not self.stopping and self.ready.is_set()
        return {"status": "ok" if ok else "stopping", "running": len(self.running), "pending": len(self.settler)}

    def _loop(self) -> None:
        while True:
            try:
                message = self.messages.get(timeout=self._timeout())
            except queue.Empty:
                message = None
            while message is not None:
                self._guarded(self._dispatch, message)
                try:
                    message = self.messages.get_nowait()
                except queue.Empty:
                    message = None
            self._guarded(self._tick)
            self._guarded(self._refresh_gauges)
            if self.stopping and not self.running:
                return

    def _guarded(self, fn, *args) -> None:
        # The daemon outlives its own bugs: a failure handling one message is logged, the loop goes on.
        try:
            fn(*args)
        except sqlite3.OperationalError as exc:
            # Most often a full disk under the state folder. Nothing can be recorded, so nothing new is started;
            # the daemon keeps serving and tries again shortly (a trainer already running carries on).
            if self.ledger_blocked_until is None:
                log.error("the ledger %s cannot be written (%s); starting and taking in nothing until it can, "
                          "trying again every %.0f s", self.ledger.path, exc, LEDGER_RETRY_SECONDS)
            self.ledger_blocked_until = time.monotonic() + LEDGER_RETRY_SECONDS
        except Exception:
            log.exception("unexpected error in %s%s; carrying on", fn.__name__, args[:1])

    def _timeout(self) -> float | None:
        deadlines = [self.settler.next_deadline(), self.metrics.next_expiry(), self.ledger_blocked_until,
                     *self.waiting.values()]
        for r in self.running.values():
            deadlines += [r.deadline, r.kill_at]
        if self.running or self.ledger.count(JobState.QUEUED):
            deadlines.append(self.next_cancel_poll)
        deadlines = [d for d in deadlines if d is not None]
        return max(0.0, min(deadlines) - time.monotonic()) + 0.01 if deadlines else None

    def _dispatch(self, message: Message) -> None:
        if isinstance(message, InboxActivity):
            # Events also come for entries leaving the inbox (our own claims among them): only present ones wait.
            if not self.stopping and may_be_a_job(self.inbox, message.name):
                self.waiting.pop(message.name, None)
                self.settler.touch(message.name)
        elif isinstance(message, TrainerEvent):
            self._on_event(message.job_id, message.event)
        elif isinstance(message, TrainerProtocolMismatch):
            self._on_protocol_mismatch(message.job_id, message.message)
        elif isinstance(message, TrainerExit):
            r = self.running.get(message.job_id)
            if r is not None:
                r.exited = message.status
                self._on_exit(message.job_id)
        elif isinstance(message, CancelRequest):
            self.cancel(message.job_id)
        elif isinstance(message, StopSignal):
            self._shutdown(message.signum)

    def _tick(self) -> None:
        now = time.monotonic()
        blocked = self.ledger_blocked_until is not None and now < self.ledger_blocked_until
        if self.ledger_blocked_until is not None and not blocked:
            self.ledger_blocked_until = None
            log.info("trying the ledger again")
        if not blocked:
            for job_id, r in list(self.running.items()):
                if r.exited is not None:  # its end could not be recorded before
                    self._on_exit(job_id)
        if not self.stopping and not blocked:
            for name in self.settler.due():
                try:
                    self.intake(name)
                except sqlite3.OperationalError:
                    self.settler.touch(name)  # not recorded, not claimed: it is taken in once the ledger works
                    raise
            for name, at in list(self.waiting.items()):
                if now >= at:
                    self._look_for_spec(name)
        if now >= self.next_cancel_poll and not blocked:
            self.next_cancel_poll = now + CANCEL_POLL_SECONDS
            self._poll_cancels()
        for job_id, r in list(self.running.items()):
            if r.deadline is not None and now >= r.deadline and not r.timed_out:
                r.timed_out = True
                jlog(job_id).warning("timed out after %.0f s; stopping the trainer", self.config.job_timeout_seconds)
                self._stop_trainer(r)
            if r.kill_at is not None and now >= r.kill_at:
                jlog(job_id).warning("the trainer did not stop within %.0f s; killing it",
                                     self.config.stop_grace_seconds)
                r.proc.signal(signal.SIGKILL)
                r.kill_at = None
        self.metrics.expire()
        if not blocked:
            self.schedule()

    def _refresh_gauges(self) -> None:
        self.metrics.queued.set(self.ledger.count(JobState.QUEUED))
        self.metrics.running.set(len(self.running))
        self.metrics.inbox_pending.set(len(self.settler) + len(self.waiting))

    def _shutdown(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.stopping:
            log.warning("second %s: killing %d trainer(s) now", name, len(self.running))
            for job_id, r in list(self.running.items()):
                r.proc.signal(signal.SIGKILL)
                self.running.pop(job_id)
                self._release(r)
                self._set(job_id, JobState.INTERRUPTED, pid=None)
            return
        log.info("%s: no new jobs; asking %d trainer(s) to checkpoint and stop", name, len(self.running))
        self.stopping = True
        self.settler.clear()
        self.waiting.clear()
        if self.watcher:
            self.watcher.stop()
            self.watcher = None
        for r in self.running.values():
            self._stop_trainer(r)

    def _stop_trainer(self, r: Running) -> None:
        r.proc.signal(signal.SIGTERM)
        r.kill_at = time.monotonic() + self.config.stop_grace_seconds

    # --- state changes ---------------------------------------------------------------------------------------

    def _set(self, job_id: str, state: JobState, **changes) -> Job:
        job = self.ledger.transition(job_id, state, **changes)
        self._publish(job)
        return job

    def _update(self, job_id: str, **changes) -> Job:
        job = self.ledger.update(job_id, **changes)
        self._publish(job)
        return job

    def _publish(self, job: Job) -> None:
        # The ledger is the truth and is already written; a full or broken outbox must not stop the state change
        # that follows (failing the job, freeing its GPU): status.json is rewritten at the next change.
        try:
            outbox.write_status(self.outbox, job)
        except OSError as exc:
            jlog(job.id).error("could not write outbox/%s/status.json: %s", job.id, exc.strerror or exc)

    # --- intake ----------------------------------------------------------------------------------------------

    def intake(self, name: str) -> None:
        """Claim ``inbox/<name>`` as a new job if it is a folder with a job.yaml or an archive (after it settled)."""
        source = self.inbox / name
        if not may_be_a_job(self.inbox, name):
            return
        spec = source / JOB_FILE
        # A job.yaml that is a folder or a dangling link is a job too: it is rejected with the reason, not waited on.
        if source.is_dir() and not (spec.exists() or spec.is_symlink()):
            log.info("inbox/%s has no %s yet; waiting for one", name, JOB_FILE)
            self.waiting[name] = time.monotonic() + WAITING_POLL_SECONDS
            return
        job_id = new_job_id(name)
        job = self.ledger.create(job_id, name, str(source), str(self.jobs_dir / job_id / "dataset"))
        try:
            self.finish_claim(job)
        except Exception:
            self.fail_with_traceback(job, "taking this drop in")

    def _look_for_spec(self, name: str) -> None:
        folder = self.inbox / name
        if not folder.is_dir():
            self.waiting.pop(name, None)
        elif (folder / JOB_FILE).exists() or (folder / JOB_FILE).is_symlink():
            self.waiting.pop(name, None)
            self.settler.touch(name)  # it settles again from now: the rest may still be arriving
        else:
            self.waiting[name] = time.monotonic() + WAITING_POLL_SECONDS

    def finish_claim(self, job: Job) -> None:
        """Take a claimed (or half-claimed) job in: move, extract, validate, record the outcome."""
        jl = jlog(job.id)
        result = take_in(job.name, Path(job.source) if job.source else None, claim_hidden_path(self.inbox, job.id),
                         Path(job.path), self.config.job_defaults, self.config.limits)
        if result.outcome == "gone":
            jl.info("inbox/%s disappeared before it could be claimed", job.name)
            self.ledger.delete(job.id)
        elif result.outcome == "queued":
            self._write_resolved(job.id, result.spec)
            self._set(job.id, JobState.QUEUED, epochs=result.spec.epochs, multi_gpu=result.spec.hardware.multi_gpu)
            jl.info("queued inbox/%s (%d epochs)", job.name, result.spec.epochs)
        else:
            jl.warning("inbox/%s %s (%s):\n%s", job.name, result.outcome, result.kind, result.message)
            if result.kept is not None:
                self._update(job.id, path=str(result.kept))
            self.fail(job.id, ErrorKind(result.kind), result.message)

    def _write_resolved(self, job_id: str, spec) -> None:
        try:
            outbox.write_resolved_spec(self.outbox, job_id, spec)
        except OSError as exc:
            jlog(job_id).error("could not write outbox/%s/%s: %s", job_id, outbox.RESOLVED_FILE, exc.strerror or exc)

    def fail_with_traceback(self, job: Job, doing: str) -> None:
        """A bug (ours) while ``doing`` something for one job: that job fails with the traceback, the rest go on."""
        text = traceback.format_exc()
        jlog(job.id).error("%s failed; failing the job and carrying on:\n%s", doing, text)
        try:
            self.fail(job.id, ErrorKind.INTERNAL, f"{doing} failed (a bug in dropfit; please report it):\n{text}")
        except Exception:
            jlog(job.id).exception("could not record the failure either; it stays %s", job.state.value)

    def fail(self, job_id: str, kind: ErrorKind, message: str, seconds: float | None = None) -> None:
        """End a job ``failed`` (outcome ``rejected`` when the drop itself is unusable), with ``error.txt``."""
        outcome = "rejected" if kind.rejects_input else "failed"
        job = self._set(job_id, JobState.FAILED, outcome=outcome, error_kind=kind.value, error=message,
                        finished_at=time.time(), pid=None)
        try:
            outbox.write_error(self.outbox, job)
        except OSError as exc:
            jlog(job_id).error("could not write outbox/%s/error.txt: %s", job_id, exc.strerror or exc)
        self.metrics.job_ended(job.id, job.name, outcome, seconds, self.config.metrics_retention_seconds)

    # --- running ---------------------------------------------------------------------------------------------

    def schedule(self) -> None:
        """Start queued jobs, oldest first, while slots are free."""
        while not self.stopping and (self.free_gpus if self.gpus else len(self.running) < self.slots):
            job = self.ledger.next_queued()
            if job is None:
                return
            if job.multi_gpu and self.gpus and len(self.free_gpus) < len(self.gpus):
                return  # it waits for every GPU; first in, first out, so the jobs behind it wait too
            self._start(job)

    def _spec_file(self, job: Job) -> Path | None:
        """The job's resolved spec, written at intake; made again (and checked) for a job queued by an older
        version or restored from the outbox. None if its spec is no longer valid (the job has been failed)."""
        spec_file = self.jobs_dir / job.id / SPEC_FILE
        if spec_file.is_file():
            return spec_file
        spec, error = validate(Path(job.path), self.config.job_defaults, display=job.name,
                               max_classes=self.config.limits.max_classes) if job.path else (None, "no dataset")
        if error:
            self.fail(job.id, ErrorKind.SPEC, error)
            return None
        write_json(spec_file, spec.model_dump(mode="json"))
        self._write_resolved(job.id, spec)
        return spec_file

    def _start(self, job: Job) -> None:
        spec_file = self._spec_file(job)
        if spec_file is None:
            return
        if job.multi_gpu and self.gpus:
            gpu = ",".join(self.free_gpus)
            self.free_gpus.clear()
        else:
            gpu = self.free_gpus.pop(0) if self.gpus else None
        attempt = job.attempt + 1
        # Recorded before the trainer exists: a start the ledger cannot record (its disk is full) starts nothing,
        # rather than a trainer the daemon would start again at every tick.
        try:
            job = self._set(job.id, JobState.RUNNING, attempt=attempt, pid=None, host=self.host, gpu=gpu,
                            started_at=job.started_at or time.time())
        except BaseException:
            self.free_gpus.extend(gpu.split(",") if gpu else [])
            raise
        out = self.outbox / job.id
        argv = run_argv(self.config.trainer_argv(), job.path, spec=spec_file, out=out,
                        work=self.jobs_dir / job.id / "work", job_id=job.id)
        proc = TrainerProcess(job.id, argv, trainer_env(job.id, self.state, gpu), out / "train.log",
                              self.messages.put)
        try:
            proc.start(attempt)
        except OSError as exc:
            self.free_gpus.extend(gpu.split(",") if gpu else [])
            self.fail(job.id, ErrorKind.INTERNAL, f"could not start the trainer ({argv[0]}): {exc}")
            return
        timeout = self.config.job_timeout_seconds
        self.running[job.id] = r = Running(proc, job, gpu, time.monotonic() + timeout if timeout else None,
                                           first_attempt=attempt == 1)
        # Without its pid a restarted daemon cannot stop it; it still stops by itself when this daemon dies.
        r.job = self._update(job.id, pid=proc.pid, pid_start=proc.started_ticks)
        self.metrics.job_started(job.id, job.name, job.epoch, job.epochs)

    def _release(self, r: Running) -> None:
        if r.gpu is not None:
            self.free_gpus.extend(r.gpu.split(","))

    def _on_event(self, job_id: str, event) -> None:
        r = self.running.get(job_id)
        if r is None:
            return
        if isinstance(event, Started):
            job = self._update(job_id, epochs=event.epochs, epoch=event.resumed_from)
            if event.skipped and r.first_attempt and not event.resumed_from:
                self.metrics.invalid_images.inc(event.skipped)
            self.metrics.job_started(job_id, job.name, job.epoch, job.epochs)
        elif isinstance(event, EpochEnd):
            row = event.metrics()
            best = r.job.best_val_accuracy
            if event.val_accuracy is not None:
                best = max(best or 0.0, event.val_accuracy)
            r.job = self._update(job_id, epoch=event.epoch, epochs=event.epochs or r.job.epochs, metrics=row,
                                 best_val_accuracy=best)
            self.metrics.epoch(job_id, r.job.name, row)
        elif isinstance(event, Finished):
            r.finished = event
        elif isinstance(event, Error):
            r.error = event

    def _on_protocol_mismatch(self, job_id: str, message: str) -> None:
        r = self.running.get(job_id)
        if r is None:
            return
        jlog(job_id).error("%s; stopping it", message)
        r.error = Error(kind=ErrorKind.PROTOCOL, message=message)
        self._stop_trainer(r)

    def _on_exit(self, job_id: str) -> None:
        """Record what the end of a job's trainer means. It leaves `running` only once that is recorded: if the
        ledger cannot be written now, the next tick tries again."""
        r = self.running[job_id]
        status = r.exited
        job = self.ledger.get(job_id)
        if job.state != JobState.RUNNING:  # recorded already, by an earlier try that failed after it
            self.running.pop(job_id)
            self._release(r)
            return
        jl = jlog(job_id)
        seconds = time.time() - job.started_at if job.started_at else None
        decision = decide(status, r.error, job.attempt, self.policy, finished=r.finished is not None,
                          cancelled=r.cancel, timed_out=r.timed_out, stopping=self.stopping,
                          timeout_seconds=self.config.job_timeout_seconds)
        if decision.action == Action.SUCCEED:
            self.succeed(job, seconds)
        elif decision.action == Action.CANCEL:
            jl.info("cancelled")
            self._cancelled(job_id, seconds)
        elif decision.action == Action.INTERRUPT:
            jl.info("interrupted at epoch %d; it resumes when the daemon starts again", job.epoch)
            self._set(job_id, JobState.INTERRUPTED, pid=None)
        elif decision.action == Action.RETRY:
            jl.warning("attempt %d failed (%s); retrying from the last checkpoint", job.attempt, decision.reason)
            self._set(job_id, JobState.QUEUED, pid=None, error_kind=ErrorKind.RETRY.value,
                      error=f"attempt {job.attempt}: {decision.reason}")
        else:
            if decision.kind == ErrorKind.IO:
                # Whatever the failed write left (checkpoints, disk cache) only takes space the next job needs.
                shutil.rmtree(self.jobs_dir / job_id / "work", ignore_errors=True)
            self.fail(job_id, decision.kind, decision.reason, seconds=seconds)
        self.running.pop(job_id)
        self._release(r)
        self.schedule()

    def succeed(self, job: Job, seconds: float | None) -> None:
        job = self._set(job.id, JobState.SUCCEEDED, outcome="succeeded", error_kind=None, error=None,
                        finished_at=time.time(), pid=None)
        self.metrics.job_ended(job.id, job.name, "succeeded", seconds, self.config.metrics_retention_seconds)
        jlog(job.id).info("succeeded: %s", self.outbox / job.id)
        self.after_success(job)

    def after_success(self, job: Job) -> None:
        """Put the dataset of a succeeded job away (config ``after_success``) and free its state folder."""
        jl = jlog(job.id)
        policy = self.config.after_success
        # No recorded path (an older ledger's "" included): where a claim puts it, inside the job's own state folder.
        dataset = Path(job.path) if job.path else self.jobs_dir / job.id / "dataset"
        try:
            kept = put_away(self.jobs_dir / job.id, dataset, job.name, self.archive / job.id, policy)
        except OSError as exc:
            jl.error("could not %s the dataset (%s); it stays in %s", policy, exc, job.path)
            return
        if kept.changed:
            self._update(job.id, path=str(kept.path) if kept.path else None)
            jl.info("dataset %s", f"archived in {kept.path}" if kept.path else "deleted")

    # --- cancel ----------------------------------------------------------------------------------------------

    def _poll_cancels(self) -> None:
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
                self._stop_trainer(r)
        elif job.state in (JobState.QUEUED, JobState.INTERRUPTED):
            jlog(job_id).info("cancelled before it ran")
            self._cancelled(job_id, None)

    def _cancelled(self, job_id: str, seconds: float | None) -> None:
        job = self._set(job_id, JobState.CANCELLED, outcome="cancelled", error_kind=ErrorKind.CANCELLED.value,
                        error="cancelled by request", finished_at=time.time(), pid=None)
        self.metrics.job_ended(job_id, job.name, "cancelled", seconds, self.config.metrics_retention_seconds)
