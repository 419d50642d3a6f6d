"""The daemon's main loop: intake, queue, outbox, metrics and shutdown. Running jobs through the configured runner is
`daemon.scheduling.Scheduler`, recovery after a restart `daemon.recovery`; both record every job change through the
`daemon.store.JobStore` the daemon gives them.

Intake of settled drops is `daemon.claims.Claims`, and the checks made at start-up are in `daemon.startup`.

One thread (the loop) makes every decision and every ledger change. Watchdog's thread, the trainers' reader threads
and signal handlers only put `daemon.messages` on a `queue.SimpleQueue` (safe even from a signal handler). When idle,
the loop sleeps in ``get()`` until a message or its next deadline: no polling.
"""

from __future__ import annotations

import logging
import queue
import signal
import socket
import sqlite3
import threading
import time

from daemon import recovery
from daemon.claims import Claims
from daemon.config import Config
from daemon.intake import may_be_a_job
from daemon.ledger import JobState, Ledger
from daemon.lock import StateLock, StateLocked
from daemon.messages import (
    CancelRequest,
    EngineUpdate,
    InboxActivity,
    InboxEventsLost,
    Message,
    StopSignal,
    TrainerEvent,
    TrainerExit,
    TrainerProtocolMismatch,
)
from daemon.metrics import Metrics, MetricsServer
from daemon.notify import Notifier
from daemon.repair import LedgerLocationError, open_ledger
from daemon.runners import make_runner
from daemon.scheduling import Scheduler
from daemon.startup import DAEMON_FILE, StartupError, check_folders, metrics_server, write_daemon_file
from daemon.store import JobStore
from daemon.watch import Settler, Watcher, inbox_entries

log = logging.getLogger(__name__)
__all__ = ["DAEMON_FILE", "Daemon", "StartupError"]  # `dropfit` (daemon.cli) imports them from here
CANCEL_POLL_SECONDS = 1.0  # how often outbox/<id>/CANCEL is looked for, for queued and running jobs only
LEDGER_RETRY_SECONDS = 5.0  # after the ledger could not be written (a full disk), when to try again


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
        self.next_rescan = 0.0  # when the inbox's top level is looked at in full again (`_look_at_inbox`)
        self.runner = make_runner(config, self.messages.put)
        self.host = socket.gethostname()
        self.next_cancel_poll = 0.0
        self.ledger_blocked_until: float | None = None  # set while the ledger cannot be written
        self.ledger_complained = False  # the error was logged (once, until the ledger works again)
        self.recovery_pending = False  # start-up recovery was cut short (the ledger could not be written)
        self.lock = StateLock(self.state)
        self.ledger: Ledger | None = None
        self.server: MetricsServer | None = None
        self.watcher: Watcher | None = None
        self.ready = threading.Event()
        self.notifier: Notifier | None = None
        # Made once the ledger is open (`run`): every job change goes through the store.
        self.store: JobStore | None = None
        self.scheduler: Scheduler | None = None
        self.claims: Claims | None = None

    @property
    def stopping(self) -> bool:
        """Whether a stop was asked for (the loop ends once the running jobs have stopped or been let go)."""
        return self.scheduler is not None and self.scheduler.stopping

    @property
    def running(self) -> dict:
        """The jobs whose attempt is in the runner's hands (see `Scheduler.running`)."""
        return self.scheduler.running if self.scheduler is not None else {}

    # --- lifecycle -------------------------------------------------------------------------------------------

    def run(self, install_signals: bool = True) -> int:
        """Start, serve until stopped, and clean up. Raises `StartupError` if it cannot start."""
        check_folders([("inbox", self.inbox), ("outbox", self.outbox), ("state_dir", self.state),
                       ("archive_dir", self.archive), ("state_dir", self.jobs_dir)])
        try:
            self.lock.acquire()
        except StateLocked as exc:
            raise StartupError(str(exc)) from None
        try:
            try:
                self.ledger = open_ledger(self.config.ledger_path(), self.outbox, self.jobs_dir)
            except LedgerLocationError as exc:
                raise StartupError(str(exc)) from None
            self.server = metrics_server(self.config, self.metrics, self.health)
            self.notifier = Notifier(self.config.notify, self.outbox, self.metrics) if self.config.notify else None
            self.store = JobStore(self.ledger, self.outbox, self.metrics, self.config.metrics_retention_seconds,
                                  self.notifier)
            self.scheduler = Scheduler(self.config, self.store, self.runner, self.metrics)
            self.claims = Claims(self.config, self.store, self.settler)
            try:
                self.recover()
            except sqlite3.OperationalError as exc:  # retried from the loop once the ledger can be written
                self._ledger_trouble(exc)
            self.runner.start()
            self.server.start()
            self._start_watcher()
            # Whatever arrived while we were down settles like a new drop (a copy may still be going on).
            self._rescan()
            if install_signals:
                signal.signal(signal.SIGTERM, self._on_signal)
                signal.signal(signal.SIGINT, self._on_signal)
            write_daemon_file(self.config, self.server, self.host)
            log.info("dropfit daemon ready: inbox %s, outbox %s, %s runner: %s", self.inbox, self.outbox,
                     self.runner.kind, self.runner.describe())
            self.ready.set()
            self.scheduler.schedule()
            self._loop()
        finally:
            self._close()
        log.info("dropfit daemon stopped")
        return 0

    def _start_watcher(self) -> None:
        self.watcher = Watcher(self.inbox, lambda name: self.messages.put(InboxActivity(name)),
                               self.config.observer.kind, self.config.observer.interval,
                               on_lost=lambda: self.messages.put(InboxEventsLost()))
        self.watcher.start()
        self.next_rescan = time.monotonic() + self.config.observer.rescan_seconds

    def _rescan(self, why: str | None = None) -> None:
        """Look at the inbox's whole top level: every entry that may be a job and is not already waiting (to settle,
        for its job.yaml, or left there by an intake that could not move it) settles like a new drop."""
        found = [name for name in inbox_entries(self.inbox)
                 if name not in self.settler.pending and name not in self.claims.waiting
                 and name not in self.claims.left_in_inbox
                 and may_be_a_job(self.inbox, name)]
        for name in found:
            self.settler.touch(name)
        if why and found:
            log.warning("%s: found %d drop(s) in the inbox the watcher had not reported", why, len(found))

    def _look_at_inbox(self, now: float) -> None:
        """Every ``observer.rescan_seconds``: a watcher that no longer sees the inbox is replaced, and the whole top
        level is looked at (a drop whose event was lost is found within that time)."""
        self.next_rescan = now + self.config.observer.rescan_seconds
        trouble = self.watcher.trouble()
        if trouble:
            log.warning("%s; watching %s again", trouble, self.inbox)
            self.watcher.stop()
            self._start_watcher()
        self._rescan(trouble or "periodic look at the inbox")

    def recover(self) -> None:
        """Finish what a crash or stop left half done (see `daemon.recovery`); safe to call again."""
        self.recovery_pending = True
        recovery.recover(self.store, self.scheduler, self.claims.finish_claim, self.claims.unfinished)
        self.recovery_pending = False

    def _close(self) -> None:
        for step in (lambda: self.watcher and self.watcher.stop(), self.runner.stop,
                     lambda: self.notifier and self.notifier.close(),
                     lambda: self.server and self.server.stop(),
                     lambda: self.ledger and self.ledger.close(),
                     lambda: (self.state / DAEMON_FILE).unlink(missing_ok=True), self.lock.release):
            try:
                step()
            except Exception:
                log.exception("while stopping")

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
            self._ledger_trouble(exc)
        except Exception:
            log.exception("unexpected error in %s%s; carrying on", fn.__name__, args[:1])

    def _ledger_trouble(self, exc: sqlite3.OperationalError) -> None:
        # Most often a full disk under the state folder. Nothing can be recorded, so nothing new is started; the
        # daemon keeps serving and tries again shortly (a trainer already running carries on).
        if not self.ledger_complained:
            log.error("the ledger %s cannot be written (%s); starting and taking in nothing until it can, trying "
                      "again every %.0f s", self.ledger.path, exc, LEDGER_RETRY_SECONDS)
            self.ledger_complained = True
        self.ledger_blocked_until = time.monotonic() + LEDGER_RETRY_SECONDS

    def _timeout(self) -> float | None:
        deadlines = [self.settler.next_deadline(), self.metrics.next_expiry(), self.ledger_blocked_until,
                     self.scheduler.submit_blocked_until, *self.claims.waiting.values(),
                     *self.scheduler.unresolved.values(),
                     self.next_rescan if self.watcher is not None and not self.stopping else None]
        for r in self.running.values():
            deadlines += [r.deadline, r.kill_at]
        if self.running or self.ledger.count(JobState.QUEUED):
            deadlines.append(self.next_cancel_poll)
        deadlines = [d for d in deadlines if d is not None]
        return max(0.0, min(deadlines) - time.monotonic()) + 0.01 if deadlines else None

    def _dispatch(self, message: Message) -> None:
        if isinstance(message, InboxActivity):
            # Events also come for entries leaving the inbox (our own claims among them): only present ones wait.
            self.claims.left_in_inbox.discard(message.name)  # changed since: worth another try
            if not self.stopping and may_be_a_job(self.inbox, message.name):
                self.claims.waiting.pop(message.name, None)
                self.settler.touch(message.name)
        elif isinstance(message, InboxEventsLost):
            if not self.stopping:
                self._rescan("the watcher lost events (its queue overflowed)")
        elif isinstance(message, TrainerEvent):
            self.scheduler.on_event(message.job_id, message.event, message.offset)
        elif isinstance(message, EngineUpdate):
            self.scheduler.on_engine_update(message.job_id, message.state, message.detail, message.started_at)
        elif isinstance(message, TrainerProtocolMismatch):
            self.scheduler.on_protocol_mismatch(message.job_id, message.message)
        elif isinstance(message, TrainerExit):
            r = self.running.get(message.job_id)
            if r is not None:
                r.exited, r.engine_timed_out, r.detail = message.status, message.timed_out, message.detail
                # Cancelled in the engine by someone else (an admin's scancel) is a cancel; when the daemon stopped it
                # (a timeout, a protocol error), the engine calls that "cancelled" too, and it is not.
                r.cancel = r.cancel or (message.cancelled and not r.stopped_by_daemon)
                self.scheduler.on_exit(message.job_id)
        elif isinstance(message, CancelRequest):
            self.scheduler.cancel(message.job_id)
        elif isinstance(message, StopSignal):
            self._shutdown(message.signum)

    def _tick(self) -> None:
        now = time.monotonic()
        blocked = self.ledger_blocked_until is not None and now < self.ledger_blocked_until
        if self.ledger_blocked_until is not None and not blocked:
            self.ledger_blocked_until = None
        if not blocked and self.recovery_pending:
            self.recover()
        if not blocked and self.scheduler.unresolved:
            recovery.retry_unresolved(self.store, self.scheduler, now)
        if not blocked:
            for job_id, r in list(self.running.items()):
                if r.exited is not None:  # its end could not be recorded before
                    self.scheduler.on_exit(job_id)
            for job_id in list(self.claims.unfinished):
                self.claims.unfinished.discard(job_id)
                job = self.ledger.get(job_id)
                if job is not None and job.state == JobState.CLAIMING:
                    self.claims.unfinished.add(job_id)
                    self.claims.finish_claim(job)
                    self.claims.unfinished.discard(job_id)
            if self.ledger_complained:
                log.info("the ledger can be written again")
                self.ledger_complained = False
        if not self.stopping and not blocked:
            for name in self.settler.due():
                try:
                    self.claims.intake(name)
                except sqlite3.OperationalError:
                    self.settler.touch(name)  # not recorded, not claimed: it is taken in once the ledger works
                    raise
            for name, at in list(self.claims.waiting.items()):
                if now >= at:
                    self.claims.look_for_spec(name)
        if not self.stopping and self.watcher is not None and now >= self.next_rescan:
            self._look_at_inbox(now)
        if now >= self.next_cancel_poll and not blocked:
            self.next_cancel_poll = now + CANCEL_POLL_SECONDS
            self.scheduler.poll_cancels()
        self.scheduler.check_running(now)
        self.metrics.expire()
        if not blocked:
            self.scheduler.schedule()

    def _refresh_gauges(self) -> None:
        self.metrics.queued.set(self.ledger.count(JobState.QUEUED))
        pending = sum(1 for r in self.running.values() if r.job.engine_state in ("pending", "submitted"))
        self.metrics.pending_in_engine.set(pending)
        self.metrics.running.set(len(self.running) - pending)
        self.metrics.inbox_pending.set(len(self.settler))

    def _shutdown(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.stopping:
            log.warning("second %s: killing %d trainer(s) now", name, len(self.running))
            for job_id, r in list(self.running.items()):
                r.attempt.kill()
                self.scheduler.forget(job_id)
                self.store.set(job_id, JobState.INTERRUPTED, pid=None, engine_state=None)
            return
        self.scheduler.stopping = True
        self.settler.clear()
        self.claims.waiting.clear()
        if self.watcher:
            self.watcher.stop()
            self.watcher = None
        if self.runner.attempts_outlive_daemon:
            # The engine runs them, not this process: they carry on, and the next start re-attaches to them.
            log.info("%s: no new jobs; %d job(s) carry on in %s", name, len(self.running), self.runner.kind)
            self.running.clear()
            return
        log.info("%s: no new jobs; asking %d trainer(s) to checkpoint and stop", name, len(self.running))
        for r in self.running.values():
            self.scheduler.stop_trainer(r)
