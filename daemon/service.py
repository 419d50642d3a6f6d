"""The daemon's main loop: intake, queue, trainer processes, outbox, metrics, restart recovery and shutdown.

One thread (the loop) makes every decision and every ledger change. Watchdog's thread, the trainers' reader threads
and signal handlers only put messages on a `queue.SimpleQueue` (safe even from a signal handler). When idle, the loop
sleeps in ``get()`` until a message or its next deadline: no polling.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from daemon import outbox
from daemon.config import Config
from daemon.intake import claim_hidden_path, may_be_a_job, new_job_id, take_in
from daemon.ledger import Job, JobState, Ledger
from daemon.metrics import Metrics, MetricsServer
from daemon.repair import open_ledger, status_is_readable
from daemon.retention import put_away
from daemon.runner import EXIT_INTERRUPTED, EXIT_INVALID, TrainerProcess, describe_exit, stop_orphan
from daemon.watch import CANCEL_FILE, Watcher, inbox_entries
from trainer.artifacts import write_json
from trainer.spec import FINISHED_FILE, JOB_FILE

log = logging.getLogger(__name__)
LEDGER_FILE = "ledger.sqlite3"
DAEMON_FILE = "daemon.json"  # pid and metrics URL of the running daemon


def _jlog(job_id: str) -> logging.LoggerAdapter:
    return logging.LoggerAdapter(log, {"job_id": job_id})


class StartupError(RuntimeError):
    """The daemon cannot start (unusable folders); the message says what to do."""


@dataclass
class Running:
    proc: TrainerProcess
    job: Job
    gpu: str | None
    started: float  # monotonic
    deadline: float | None
    kill_at: float | None = None
    cancel: bool = False
    timed_out: bool = False
    finished: dict | None = None
    error: dict | None = None
    first_attempt: bool = True


class Daemon:
    """Run with `run` (blocks until SIGTERM/SIGINT or `request_stop`)."""

    def __init__(self, config: Config, registry=None):
        from importlib import metadata

        self.config = config
        self.inbox, self.outbox = config.path("inbox"), config.path("outbox")
        self.state, self.archive = config.path("state_dir"), config.path("archive_dir")
        try:
            version = metadata.version("dropfit")
        except metadata.PackageNotFoundError:
            version = "0"
        self.metrics = Metrics(registry, version)
        self.messages: queue.SimpleQueue = queue.SimpleQueue()
        self.pending: dict[str, float] = {}  # inbox name -> monotonic time of its last activity
        self.running: dict[str, Running] = {}
        self.gpus = config.gpu_ids()
        self.free_gpus = list(self.gpus)
        self.slots = len(self.gpus) or config.max_concurrent_jobs
        self.stopping = False
        self.stop_deadline: float | None = None
        self.ledger: Ledger | None = None
        self.server: MetricsServer | None = None
        self.watcher: Watcher | None = None
        self.ready = threading.Event()

    # --- lifecycle -------------------------------------------------------------------------------------------

    def run(self, install_signals: bool = True) -> int:
        self._check_folders()
        self.ledger = open_ledger(self.state / LEDGER_FILE, self.outbox, self.state / "jobs")
        self.server = MetricsServer(self.metrics.registry, self.config.metrics.host, self.config.metrics.port,
                                    self.health)
        try:
            self.recover()
            self.server.start()
            self.watcher = Watcher(self.inbox, self.outbox, lambda name: self.messages.put(("activity", name)),
                                   lambda job_id: self.messages.put(("cancel", job_id)),
                                   self.config.observer.kind, self.config.observer.interval)
            self.watcher.start()
            # Whatever arrived while we were down settles like a new drop (a copy may still be going on).
            for name in inbox_entries(self.inbox):
                if may_be_a_job(self.inbox, name):
                    self.pending[name] = time.monotonic()
            if install_signals:
                signal.signal(signal.SIGTERM, self._on_signal)
                signal.signal(signal.SIGINT, self._on_signal)
            write_json(self.state / DAEMON_FILE, {"pid": os.getpid(), "started_at": time.time(),
                                                  "metrics_url": f"http://{self.server.host}:{self.server.port}/metrics",
                                                  "inbox": str(self.inbox), "outbox": str(self.outbox)})
            log.info("dropfit daemon ready: inbox %s, outbox %s, %d slot(s)%s", self.inbox, self.outbox, self.slots,
                     f", GPUs {self.gpus}" if self.gpus else "")
            self.ready.set()
            self.schedule()
            self._loop()
        finally:
            if self.watcher:
                self.watcher.stop()
            self.server.stop()
            self.ledger.close()
            (self.state / DAEMON_FILE).unlink(missing_ok=True)
        log.info("dropfit daemon stopped")
        return 0

    def _check_folders(self) -> None:
        """Create the folders and make sure we can write to them, with a message that says how to fix it."""
        for name, folder in (("inbox", self.inbox), ("outbox", self.outbox), ("state_dir", self.state),
                             ("archive_dir", self.archive), ("state_dir", self.state / "jobs")):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StartupError(f"{name}: cannot create {folder}: {exc.strerror}") from None
            if not os.access(folder, os.W_OK | os.X_OK):
                st = folder.stat()
                raise StartupError(f"{name}: {folder} is not writable by uid {os.getuid()} (owner uid {st.st_uid}, "
                                   f"mode {st.st_mode & 0o777:o}); chown it to this user or run the daemon as "
                                   f"its owner (compose: DROPFIT_UID/DROPFIT_GID)")

    def request_stop(self) -> None:
        self.messages.put(("signal", signal.SIGTERM))

    def _on_signal(self, signum, frame) -> None:
        self.messages.put(("signal", signum))

    def health(self) -> dict:
        ok = not self.stopping and self.ready.is_set()
        return {"status": "ok" if ok else "stopping", "running": len(self.running), "pending": len(self.pending)}

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
        except Exception:
            log.exception("unexpected error in %s%s; carrying on", fn.__name__, args[:1])

    def _timeout(self) -> float | None:
        now = time.monotonic()
        deadlines = [t + self.config.settle_seconds for t in self.pending.values()]
        for r in self.running.values():
            deadlines += [d for d in (r.deadline, r.kill_at) if d is not None]
        if self.stop_deadline is not None:
            deadlines.append(self.stop_deadline)
        expiry = self.metrics.next_expiry()
        if expiry is not None:
            deadlines.append(expiry)
        return max(0.0, min(deadlines) - now) + 0.01 if deadlines else None

    def _dispatch(self, message: tuple) -> None:
        kind = message[0]
        if kind == "activity":
            # Events also come for folders leaving the inbox (our own claims among them): only present ones wait.
            if not self.stopping and may_be_a_job(self.inbox, message[1]):
                self.pending[message[1]] = time.monotonic()
        elif kind == "event":
            self._on_event(message[1], message[2])
        elif kind == "exit":
            self._on_exit(message[1], message[2])
        elif kind == "cancel":
            self.cancel(message[1])
        elif kind == "signal":
            self._shutdown(message[1])

    def _tick(self) -> None:
        now = time.monotonic()
        for name, last in list(self.pending.items()):
            if now - last >= self.config.settle_seconds and not self.stopping:
                del self.pending[name]
                self.intake(name)
        for job_id, r in list(self.running.items()):
            if r.deadline is not None and now >= r.deadline and not r.timed_out:
                r.timed_out = True
                _jlog(job_id).warning("timed out after %.0f s; stopping the trainer", self.config.job_timeout_seconds)
                self._stop_trainer(r)
            if r.kill_at is not None and now >= r.kill_at:
                r.proc.signal(signal.SIGKILL)
                r.kill_at = None
        self.metrics.expire()
        self.schedule()

    def _refresh_gauges(self) -> None:
        self.metrics.queued.set(self.ledger.count(JobState.QUEUED))
        self.metrics.running.set(len(self.running))
        self.metrics.inbox_pending.set(len(self.pending))

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
        self.pending.clear()
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
            _jlog(job.id).error("could not write outbox/%s/status.json: %s", job.id, exc.strerror or exc)

    # --- intake ----------------------------------------------------------------------------------------------

    def intake(self, name: str) -> None:
        """Claim ``inbox/<name>`` as a new job if it is a folder with a job.yaml or an archive (after it settled)."""
        source = self.inbox / name
        if not may_be_a_job(self.inbox, name):
            return
        if source.is_dir() and not (source / JOB_FILE).is_file():
            log.info("inbox/%s has no %s yet; waiting for one", name, JOB_FILE)
            return
        job_id = new_job_id(name)
        job = self.ledger.create(job_id, name, str(source), str(self.state / "jobs" / job_id / "dataset"))
        self._finish_claim(job)

    def _finish_claim(self, job: Job) -> None:
        jl = _jlog(job.id)
        result = take_in(job.name, Path(job.source), claim_hidden_path(self.inbox, job.id), Path(job.path),
                         self.config.job_defaults, self.config.limits)
        if result.outcome == "gone":
            jl.info("inbox/%s disappeared before it could be claimed", job.name)
            self.ledger.delete(job.id)
        elif result.outcome == "queued":
            self._set(job.id, JobState.QUEUED, epochs=result.spec.epochs, multi_gpu=result.spec.hardware.multi_gpu)
            jl.info("queued inbox/%s (%d epochs)", job.name, result.spec.epochs)
        else:
            jl.warning("inbox/%s %s (%s):\n%s", job.name, result.outcome, result.kind, result.message)
            if result.kept is not None:
                self._update(job.id, path=str(result.kept))
            self._fail(job.id, result.kind, result.message, outcome=result.outcome)

    def _fail(self, job_id: str, kind: str, message: str, outcome: str = "failed", seconds: float | None = None):
        job = self._set(job_id, JobState.FAILED, outcome=outcome, error_kind=kind, error=message,
                        finished_at=time.time(), pid=None)
        try:
            outbox.write_error(self.outbox, job)
        except OSError as exc:
            _jlog(job_id).error("could not write outbox/%s/error.txt: %s", job_id, exc.strerror or exc)
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

    def _start(self, job: Job) -> None:
        if job.multi_gpu and self.gpus:
            gpu = ",".join(self.free_gpus)
            self.free_gpus.clear()
        else:
            gpu = self.free_gpus.pop(0) if self.gpus else None
        attempt = job.attempt + 1
        out = self.outbox / job.id
        argv = [*self.config.trainer_argv(), "run", job.path, "--out", str(out), "--work",
                str(self.state / "jobs" / job.id / "work"), "--job-id", job.id]
        env = dict(os.environ, PYTHONUNBUFFERED="1", DROPFIT_PARENT_PID=str(os.getpid()))
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        proc = TrainerProcess(job.id, argv, env, out / "train.log", self.messages.put)
        try:
            proc.start(attempt)
        except OSError as exc:
            if gpu is not None:
                self.free_gpus.extend(gpu.split(","))
            self.ledger.transition(job.id, JobState.RUNNING, attempt=attempt)
            self._fail(job.id, "internal", f"could not start the trainer ({argv[0]}): {exc}")
            return
        timeout = self.config.job_timeout_seconds
        now = time.monotonic()
        job = self._set(job.id, JobState.RUNNING, attempt=attempt, pid=proc.pid, gpu=gpu,
                        started_at=job.started_at or time.time())
        self.running[job.id] = Running(proc, job, gpu, now, now + timeout if timeout else None,
                                       first_attempt=attempt == 1)
        self.metrics.job_started(job.id, job.name, job.epoch, job.epochs)

    def _release(self, r: Running) -> None:
        if r.gpu is not None:
            self.free_gpus.extend(r.gpu.split(","))

    def _on_event(self, job_id: str, event: dict) -> None:
        r = self.running.get(job_id)
        if r is None:
            return
        kind = event["event"]
        if kind == "started":
            job = self._update(job_id, epochs=event.get("epochs"), epoch=event.get("resumed_from") or 0)
            skipped = event.get("skipped") or 0
            if skipped and r.first_attempt and not event.get("resumed_from"):
                self.metrics.invalid_images.inc(skipped)
            self.metrics.job_started(job_id, job.name, job.epoch, job.epochs)
        elif kind == "epoch_end":
            row = {k: v for k, v in event.items() if k not in ("event", "time", "v", "job")}
            best = r.job.best_val_accuracy
            if row.get("val_accuracy") is not None:
                best = max(best or 0.0, row["val_accuracy"])
            r.job = self._update(job_id, epoch=row.get("epoch", 0), epochs=row.get("epochs"), metrics=row,
                                 best_val_accuracy=best)
            self.metrics.epoch(job_id, r.job.name, row)
        elif kind == "finished":
            r.finished = event
        elif kind == "error":
            r.error = event

    def _on_exit(self, job_id: str, rc: int) -> None:
        r = self.running.pop(job_id, None)
        if r is None:
            return
        self._release(r)
        job = self.ledger.get(job_id)
        jl = _jlog(job_id)
        seconds = time.time() - job.started_at if job.started_at else None
        if r.cancel:
            jl.info("cancelled")
            job = self._set(job_id, JobState.CANCELLED, outcome="cancelled", error_kind="cancelled",
                            error="cancelled by request", finished_at=time.time(), pid=None)
            self.metrics.job_ended(job_id, job.name, "cancelled", seconds, self.config.metrics_retention_seconds)
        elif rc == 0 and r.finished is not None:
            self._succeed(job, seconds)
        elif r.timed_out:
            self._fail(job_id, "timeout", f"timed out after {self.config.job_timeout_seconds:.0f} seconds "
                                          f"(job_timeout_seconds); {describe_exit(rc)}", seconds=seconds)
        elif self.stopping:
            jl.info("interrupted at epoch %d; it resumes when the daemon starts again", job.epoch)
            self._set(job_id, JobState.INTERRUPTED, pid=None)
        elif rc == EXIT_INVALID:
            kind = (r.error or {}).get("kind", "data")
            self._fail(job_id, kind, (r.error or {}).get("message") or describe_exit(rc), seconds=seconds)
        else:
            reason = describe_exit(rc)
            if r.error and r.error.get("message") and rc != EXIT_INTERRUPTED:
                reason += f": {r.error['message']}"
            error_kind = (r.error or {}).get("kind")
            # Retrying helps a crash, not a full disk, a spec or data problem, or too little memory for the batch.
            if job.attempt <= self.config.retries and error_kind in (None, "internal"):
                jl.warning("attempt %d failed (%s); retrying from the last checkpoint", job.attempt, reason)
                self._set(job_id, JobState.QUEUED, pid=None, error_kind="retry", error=f"attempt {job.attempt}: "
                                                                                       f"{reason}")
            else:
                kind = error_kind or ("crash" if rc < 0 else "internal")
                if kind == "io":
                    # Whatever the failed write left (checkpoints, disk cache) only takes space the next job needs.
                    shutil.rmtree(self.state / "jobs" / job_id / "work", ignore_errors=True)
                self._fail(job_id, kind, reason, seconds=seconds)
        self.schedule()

    def _succeed(self, job: Job, seconds: float | None) -> None:
        jl = _jlog(job.id)
        job = self._set(job.id, JobState.SUCCEEDED, outcome="succeeded", error_kind=None, error=None,
                        finished_at=time.time(), pid=None)
        self.metrics.job_ended(job.id, job.name, "succeeded", seconds, self.config.metrics_retention_seconds)
        jl.info("succeeded: %s", self.outbox / job.id)
        self._after_success(job)

    def _after_success(self, job: Job) -> None:
        jl = _jlog(job.id)
        policy = self.config.after_success
        try:
            moved = put_away(self.state / "jobs" / job.id, Path(job.path), job.name, self.archive / job.id, policy)
        except OSError as exc:
            jl.error("could not %s the dataset (%s); it stays in %s", policy, exc, job.path)
            return
        if moved is not None:
            self._update(job.id, path=str(moved))
            jl.info("dataset %s", f"archived in {moved}" if moved else "deleted")

    def _finished_marker(self, job: Job) -> dict | None:
        try:
            data = json.loads((self.outbox / job.id / FINISHED_FILE).read_text())
        except (OSError, ValueError):
            return None  # absent, or cut short by the crash: the job runs again (it resumes from its checkpoint)
        return data if isinstance(data, dict) else None

    # --- cancel ----------------------------------------------------------------------------------------------

    def cancel(self, job_id: str) -> None:
        job = self.ledger.get(job_id)
        if job is None or job.state.terminal:
            return
        jl = _jlog(job_id)
        r = self.running.get(job_id)
        if r is not None:
            if not r.cancel:
                jl.info("cancel requested; stopping the trainer")
                r.cancel = True
                self._stop_trainer(r)
        elif job.state in (JobState.QUEUED, JobState.INTERRUPTED):
            jl.info("cancelled before it ran")
            job = self._set(job_id, JobState.CANCELLED, outcome="cancelled", error_kind="cancelled",
                            error="cancelled by request", finished_at=time.time())
            self.metrics.job_ended(job_id, job.name, "cancelled", None, self.config.metrics_retention_seconds)

    # --- recovery --------------------------------------------------------------------------------------------

    def recover(self) -> None:
        """Finish what a crash or stop left half done, before anything new is looked at."""
        for job in self.ledger.jobs():
            if job.state != JobState.CLAIMING and not status_is_readable(self.outbox, job):
                _jlog(job.id).warning("outbox/%s/status.json was missing or unreadable; rewritten from the ledger",
                                      job.id)
                self._publish(job)
        for job in self.ledger.jobs(JobState.CLAIMING):
            _jlog(job.id).info("finishing an interrupted claim of inbox/%s", job.name)
            self._finish_claim(job)
        for job in self.ledger.jobs(JobState.RUNNING, JobState.INTERRUPTED):
            if job.pid and stop_orphan(job.pid, job.id, self.config.stop_grace_seconds):
                _jlog(job.id).warning("stopped trainer pid %d left running by the previous daemon", job.pid)
            finished = self._finished_marker(job)
            if job.state == JobState.RUNNING and finished is not None:
                _jlog(job.id).info("its trainer finished while the daemon was down; not running it again")
                # The last epochs' events may have been lost with the daemon: the marker has the final count.
                job = self._update(job.id, epoch=int(finished.get("epochs_trained") or job.epoch))
                self._succeed(job, time.time() - job.started_at if job.started_at else None)
                continue
            _jlog(job.id).info("re-queued after a restart; resumes from its last completed epoch (%d)", job.epoch)
            self._set(job.id, JobState.QUEUED, pid=None)
        for job in self.ledger.jobs(JobState.QUEUED):
            if (self.outbox / job.id / CANCEL_FILE).exists():
                self.cancel(job.id)
        for job in self.ledger.jobs(JobState.SUCCEEDED):
            # A crash during the clean-up after success leaves the job's state folder behind: finish it.
            if self.config.after_success != "keep" and (self.state / "jobs" / job.id).exists():
                self._after_success(job)
