"""What the daemon's loop is told, by the threads that watch and read for it (and by signal handlers).

Each is a small frozen dataclass put on the loop's ``queue.SimpleQueue``; the loop alone acts on them.
"""

from __future__ import annotations

from dataclasses import dataclass

from contract.protocol import Event


@dataclass(frozen=True)
class InboxActivity:
    """Something changed at the top of the inbox under ``name``."""

    name: str


@dataclass(frozen=True)
class InboxEventsLost:
    """The watcher lost events (the kernel's queue overflowed): the inbox's top level must be looked at again."""


@dataclass(frozen=True)
class TrainerEvent:
    job_id: str
    event: Event
    offset: int | None = None  # for a followed events file: where the next line starts (kept in the ledger)


@dataclass(frozen=True)
class TrainerProtocolMismatch:
    """The trainer speaks another protocol version: the job cannot be run by it."""

    job_id: str
    message: str


@dataclass(frozen=True)
class TrainerExit:
    job_id: str
    status: int  # negative: killed by that signal
    timed_out: bool = False  # the engine stopped it at its time limit
    detail: str | None = None  # the engine's own words on how it ended (e.g. "NODE_FAIL"), for the reason
    cancelled: bool = False  # cancelled in the engine (by the daemon, or by someone else there)


@dataclass(frozen=True)
class EngineUpdate:
    """A cluster engine moved an attempt: ``pending`` (waiting for resources) or ``running``."""

    job_id: str
    state: str
    detail: str | None = None  # e.g. Slurm's reason "Resources"
    started_at: float | None = None  # running: when the engine started it (Unix time), what job_timeout counts from


@dataclass(frozen=True)
class CancelRequest:
    job_id: str


@dataclass(frozen=True)
class StopSignal:
    signum: int


Message = (InboxActivity | InboxEventsLost | TrainerEvent | TrainerProtocolMismatch | TrainerExit | EngineUpdate
           | CancelRequest | StopSignal)
