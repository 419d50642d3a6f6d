"""What the Slurm and Kubernetes runners share: a thread that follows each attempt's events file on the shared
storage and asks the engine how its attempts are doing, and posts both to the daemon's loop in order.

The trainer appends its events to ``--events-file`` (flushed and fsync'd per line); the follower reads complete
lines from the offset the ledger last recorded, so a restarted daemon neither loses nor repeats an epoch. An
attempt's exit is posted only after every event it wrote has been read.
"""

from __future__ import annotations

import logging
import threading
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from contract.protocol import Error
from daemon.ledger import Job
from daemon.messages import EngineUpdate, Message, TrainerEvent, TrainerExit
from daemon.runners.base import Attempt, EngineError, Launch, Runner
from daemon.runners.events import read_event_line

log = logging.getLogger(__name__)
_CHUNK = 1 << 20


class EventsFile:
    """The complete lines of a trainer's events file, from an offset on."""

    def __init__(self, path: Path, offset: int = 0):
        self.path, self.offset = Path(path), offset

    def read(self) -> list[tuple[str, int]]:
        """New complete lines, each with the offset just after it. A half-written last line waits for the next read;
        a file shorter than the offset (replaced) is read again from its start."""
        try:
            with open(self.path, "rb") as f:
                size = f.seek(0, 2)
                if size < self.offset:
                    self.offset = 0
                f.seek(self.offset)
                data = f.read(_CHUNK)
        except FileNotFoundError:
            return []
        out, at = [], self.offset
        while (end := data.find(b"\n")) != -1:
            line, data = data[:end], data[end + 1:]
            at += end + 1
            out.append((line.decode("utf-8", "replace").strip(), at))
        if out:
            self.offset = out[-1][1]
        return out


@dataclass(frozen=True)
class EngineStatus:
    """How the engine sees an attempt: ``pending``, ``running`` or ``ended`` (then with its exit)."""

    state: str
    detail: str | None = None
    status: int | None = None  # exit status (negative: the signal), once ended
    timed_out: bool = False  # ended at the engine's time limit
    cancelled: bool = False  # cancelled in the engine (by us or by someone else)
    started_at: float | None = None  # running: when the engine started this run of it (Unix time), if it says
    # What the engine knows about why it ended that the trainer could not say (its container was OOMKilled, or
    # never started): posted as the attempt's last event, so `daemon.decision` weighs it like the trainer's own.
    error: Error | None = None


@dataclass
class RemoteAttempt(Attempt):
    runner: RemoteRunner | None = None
    events: EventsFile | None = None
    last_state: str | None = None
    last_started_at: float | None = None  # the engine's start time of its current run, as last posted
    unknown_polls: int = 0  # consecutive polls the engine did not know it
    ended: bool = False  # its exit has been posted
    cancel_sent: bool = False  # the runner asked the engine to stop it

    def terminate(self) -> None:
        self.runner.cancel(self, graceful=True)

    def kill(self) -> None:
        self.runner.cancel(self, graceful=False)


class RemoteRunner(Runner):
    """A runner whose trainers run in a cluster engine; subclasses say how to submit, query and cancel."""

    follows_events_file = True
    runs_when_submitted = False
    attempts_outlive_daemon = True
    # After this many polls in which the engine does not know an attempt at all, it is taken as lost.
    LOST_AFTER_POLLS = 3

    def __init__(self, post: Callable[[Message], None], max_submitted: int, poll_interval: float):
        super().__init__(post)
        self.max_submitted, self.poll_interval = max_submitted, poll_interval
        self.active: dict[str, RemoteAttempt] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._complained = False

    # --- what subclasses implement ----------------------------------------------------------------------------

    @abstractmethod
    def _submit(self, launch: Launch) -> tuple[str, dict]:
        """Hand the attempt to the engine: (its reference, ledger fields to record). Raises `SubmitError`."""

    @abstractmethod
    def _statuses(self, attempts: list[RemoteAttempt]) -> dict[str, EngineStatus]:
        """The engine's view of ``attempts``, by reference (absent: the engine does not know it). Raises
        `EngineError` if the engine cannot be asked."""

    @abstractmethod
    def cancel(self, attempt: RemoteAttempt, graceful: bool) -> None:
        """Stop an attempt: gracefully (SIGTERM, time to checkpoint) or at once."""

    def lookup(self, job: Job) -> str | None:
        """Find the engine's reference of ``job``'s current attempt (``job.attempt``) by the name this runner gives
        every attempt, for a daemon that died after recording the start (``engine_state`` ``submitted``) but before
        recording the engine's answer. None: the engine has no such attempt (it was never submitted). Raises
        `EngineError` if the engine cannot be asked. Never starts anything.

        This default finds nothing, so such a job is queued again; a runner whose names are deterministic should
        look the attempt up instead, or it may run twice."""
        return None

    def _lost(self, attempt: RemoteAttempt) -> EngineStatus | None:
        """How an attempt ended that the engine has not known for `LOST_AFTER_POLLS` polls; None: not ended yet
        (ask again next poll)."""
        return EngineStatus("ended", f"{self.kind} no longer knows {attempt.ref}", status=-9)

    # --- the shared part ---------------------------------------------------------------------------------------

    def can_start(self, multi_gpu: bool) -> bool:
        with self._lock:
            return len(self.active) < self.max_submitted

    def submit(self, launch: Launch) -> RemoteAttempt:
        # Lines of earlier attempts were all read before their exit was posted: this attempt's start at the end.
        events = EventsFile(launch.events_file, _size(launch.events_file))
        ref, recorded = self._submit(launch)
        attempt = RemoteAttempt(launch.job_id, ref, recorded, runner=self, events=events, last_state="pending")
        with self._lock:
            self.active[launch.job_id] = attempt
        return attempt

    def reattach(self, job: Job, grace: float) -> RemoteAttempt | None:
        """See `Runner.reattach`. An attempt whose submission was recorded but not the engine's answer is looked up
        by its name (`lookup`) and adopted, never submitted twice; the caller records the reference of the attempt
        it returns. An `EngineError` (the engine cannot be asked) reaches the caller, which asks again later."""
        ref = job.engine_ref
        if not ref and job.engine_state == "submitted":
            # The previous daemon died between handing the attempt over and recording the engine's id: the
            # attempt's name is derived from the job and attempt, so it is found by that, never submitted twice.
            ref = self.lookup(job)  # an EngineError: recovery asks again later (it must not submit twice)
            if ref:
                log.info("found attempt %d of %s in %s as %s, submitted just before the daemon stopped", job.attempt,
                         job.id, self.kind, ref)
        if not ref:
            return None
        # The first poll posts the engine's state and start time afresh: the timeout counts from the engine's start.
        attempt = RemoteAttempt(job.id, ref, runner=self,
                                events=EventsFile(self.events_path(job), job.events_offset))
        try:
            known = self._statuses([attempt]).get(ref)
        except EngineError as exc:
            # Cannot tell now: follow it anyway; if it is really gone, the poller says so after a few polls.
            log.warning("cannot ask %s about %s (%s); following it anyway", self.kind, ref, exc)
            known = EngineStatus(job.engine_state or "pending")
        if known is None:
            return None
        with self._lock:
            self.active[job.id] = attempt
        return attempt

    @abstractmethod
    def events_path(self, job: Job) -> Path:
        """Where ``job``'s trainer appends its events."""

    def release(self, job_id: str) -> None:
        with self._lock:
            self.active.pop(job_id, None)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._follow, name=f"{self.kind}-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_interval):
            try:
                self.poll()
            except Exception:
                log.exception("following %s failed; trying again", self.kind)

    def poll(self) -> None:
        """One round: the engine's states, then each attempt's new events, then the exits."""
        with self._lock:
            attempts = [a for a in self.active.values() if not a.ended]
        if not attempts:
            return
        try:
            statuses = self._statuses(attempts)
        except EngineError as exc:
            if not self._complained:
                log.error("cannot ask %s how its jobs are doing (%s); trying again every %.0f s", self.kind, exc,
                          self.poll_interval)
                self._complained = True
            for attempt in attempts:
                self._drain(attempt)
            return
        if self._complained:
            log.info("%s answers again", self.kind)
            self._complained = False
        for attempt in attempts:
            status = statuses.get(attempt.ref)
            if status is None:
                attempt.unknown_polls += 1
                if attempt.unknown_polls < self.LOST_AFTER_POLLS:
                    continue
                status = self._lost(attempt)
                if status is None:
                    continue
            attempt.unknown_polls = 0
            self._drain(attempt)
            if status.state in ("pending", "running") and (status.state, status.started_at) != (
                    attempt.last_state, attempt.last_started_at):
                attempt.last_state, attempt.last_started_at = status.state, status.started_at
                self.post(EngineUpdate(attempt.job_id, status.state, status.detail, status.started_at))
            elif status.state == "ended":
                attempt.ended = True
                self._drain(attempt)
                if status.error is not None:
                    self.post(TrainerEvent(attempt.job_id, status.error))
                self.post(TrainerExit(attempt.job_id, status.status if status.status is not None else -9,
                                      timed_out=status.timed_out, detail=status.detail,
                                      cancelled=status.cancelled))

    def _drain(self, attempt: RemoteAttempt) -> None:
        for line, offset in attempt.events.read():
            message = read_event_line(line, attempt.job_id, f"a line of {attempt.events.path}", offset)
            if message is not None:
                self.post(message)


def _size(path: Path | None) -> int:
    try:
        return path.stat().st_size if path is not None else 0
    except OSError:
        return 0
