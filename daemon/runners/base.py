"""Where a job's trainer runs: the `Runner` interface, and what it hands the daemon's loop.

The daemon stays the one front door (inbox, claim, validation, ledger, outbox, metrics) and decides what every end
means (`daemon.decision`); a runner only starts trainers, stops them, and reports what they say and how they end,
by posting `daemon.messages` to the loop:

- `TrainerEvent` for each event line (with the events file offset after it, for runners that follow a file),
- `EngineUpdate` when the engine moves the attempt between ``pending`` and ``running``,
- `TrainerExit` once, when the attempt has ended (after its last events).

Runners: ``local`` (a child process per job, per GPU), ``slurm`` (one ``sbatch`` per attempt) and ``kubernetes``
(one ``batch/v1`` Job per attempt), chosen by the config's ``runner.kind``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from daemon.ledger import Job
from daemon.messages import Message


@dataclass(frozen=True)
class Launch:
    """One attempt of one job, as the daemon asks for it."""

    job_id: str
    attempt: int
    argv: list[str]  # the trainer's whole command line (`contract.protocol.run_argv`)
    env: dict[str, str]  # what the trainer must find in its environment, besides the engine's own
    log_path: Path  # train.log: the trainer's stderr
    multi_gpu: bool = False
    timeout: float | None = None  # job_timeout_seconds, for engines that enforce it themselves
    grace: float = 30.0  # stop_grace_seconds: SIGTERM to SIGKILL
    events_file: Path | None = None  # where the trainer appends its events, for runners that follow a file


@dataclass
class Attempt(ABC):
    """A handle on one running (or engine-pending) attempt."""

    job_id: str
    ref: str  # the engine's name for it: a pid, a Slurm job id, a Kubernetes Job name
    recorded: dict = field(default_factory=dict)  # ledger fields describing it (pid, gpu, engine_ref, ...)

    @abstractmethod
    def terminate(self) -> None:
        """Ask the trainer to checkpoint and stop (SIGTERM, or the engine's graceful cancel)."""

    @abstractmethod
    def kill(self) -> None:
        """Stop it now (SIGKILL, or the engine's hard cancel)."""


class SubmitError(RuntimeError):
    """The engine would not take the attempt. ``permanent``: it never will (the job fails); otherwise the job stays
    queued and is submitted again later (the engine may be down)."""

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


class Runner(ABC):
    """Starts, stops and follows trainers somewhere; see the module's doc."""

    kind: str = "?"  # the config's runner.kind, and the ledger's `engine` of the attempts it runs
    follows_events_file: bool = False  # the trainer is given --events-file and the runner follows it
    # An attempt runs as soon as it is submitted (its timeout counts from then). Otherwise it waits in the engine's
    # queue (``pending``) until an `EngineUpdate` says it runs.
    runs_when_submitted: bool = True
    # The engine runs the attempts, not the daemon's process: they carry on while the daemon is stopped, and the
    # next daemon follows them again (`reattach`). Otherwise a stopping daemon stops its trainers.
    attempts_outlive_daemon: bool = False
    trainer_command: list[str] | None = None  # how the engine's nodes run the trainer, if not the config's
    writes_own_log = False  # the trainer appends its log to train.log itself (--log-file): its stderr goes elsewhere

    def __init__(self, post: Callable[[Message], None]):
        self.post = post

    def start(self) -> None:  # noqa: B027 - a hook: only runners that watch an engine need it
        """Start whatever the runner watches the engine with (threads); called once the daemon is ready."""

    def stop(self) -> None:  # noqa: B027 - a hook, as start
        """Stop watching (the trainers themselves are not touched)."""

    @abstractmethod
    def describe(self) -> str:
        """One phrase for the start-up log line (e.g. ``2 slot(s), GPUs ['0', '1']``)."""

    @abstractmethod
    def can_start(self, multi_gpu: bool) -> bool:
        """Whether one more attempt (of that kind) may be handed over now."""

    @abstractmethod
    def submit(self, launch: Launch) -> Attempt:
        """Start ``launch``; raises `SubmitError` (or OSError) if it cannot."""

    def release(self, job_id: str) -> None:  # noqa: B027 - a hook, as start
        """The attempt of ``job_id`` has ended and its end is recorded: free what it held."""

    def ran(self, job: Job) -> bool:
        """Whether ``job``'s current (or last) attempt was handed to this runner's engine."""
        return (job.engine or "local") == self.kind

    @abstractmethod
    def reattach(self, job: Job, grace: float) -> Attempt | None:
        """After a daemon restart: a handle on ``job``'s attempt if it still lives in the engine (its events and end
        will be posted from ``job.events_offset`` on), else None. Never starts anything. Raises `EngineError` when
        the engine cannot be asked (the daemon asks again later rather than risk running the attempt twice)."""


class EngineError(RuntimeError):
    """The engine could not be asked (its controller is down, the API unreachable)."""
