"""What a trainer's end means for its job: one pure function, `decide`, and the retry policy it applies.

No processes, files or clocks here, so every case is a plain unit test (tests/test_decision.py).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from enum import Enum

from contract.protocol import Error, ErrorKind, ExitCode


class Action(str, Enum):
    SUCCEED = "succeed"
    FAIL = "fail"
    RETRY = "retry"
    INTERRUPT = "interrupt"  # the daemon is stopping: the job resumes on its next start
    CANCEL = "cancel"


@dataclass(frozen=True)
class Decision:
    action: Action
    kind: ErrorKind | None = None  # why it failed, for FAIL
    reason: str | None = None  # readable, for FAIL and RETRY


@dataclass(frozen=True)
class RetryPolicy:
    """A crashed trainer is started again (it resumes from its checkpoint) up to ``retries`` times. A full disk, a
    spec or data problem, too little memory or a protocol mismatch would fail the same way again: not retried."""

    retries: int = 1
    retryable: frozenset = frozenset({None, ErrorKind.INTERNAL, ErrorKind.CRASH})

    def allows(self, attempt: int, kind: ErrorKind | None) -> bool:
        return attempt <= self.retries and kind in self.retryable


def describe_exit(status: int) -> str:
    """A readable reason for a trainer's exit status (negative: killed by that signal)."""
    if status < 0:
        name = signal.Signals(-status).name if -status in signal.valid_signals() else f"signal {-status}"
        hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if -status == signal.SIGKILL else ""
        return f"the trainer was killed by {name}{hint}"
    return f"the trainer exited with code {status}"


@dataclass(frozen=True)
class Ending:
    """How an attempt ended, as the daemon saw it, besides its exit status and last error (see `decide`).

    Attributes:
        finished: whether the trainer sent its `Finished` event.
        cancelled, timed_out, stopping: whether the daemon stopped it because of a cancel, the job timeout or its
            own shutdown (in that order of precedence, after success).
        timeout_seconds: the job timeout, for the reason of a timed-out job.
        detail: a cluster engine's own words on how the attempt ended (e.g. ``NODE_FAIL``), added to the reason.
    """

    finished: bool = False
    cancelled: bool = False
    timed_out: bool = False
    stopping: bool = False
    timeout_seconds: float | None = None
    detail: str | None = None


def decide(status: int, error: Error | None, attempt: int, policy: RetryPolicy, how: Ending = Ending()) -> Decision:
    """Decide what becomes of a job whose trainer ended with exit ``status``.

    Args:
        error: the trainer's last `Error` event, if it sent one (or one the daemon recorded, e.g. a protocol error).
        attempt: which failure this would be (1 for the first): the policy allows ``retries`` of them. Attempts
            that a daemon restart cut short do not count.
        how: what else the daemon knows of the attempt's end (see `Ending`).
    """
    ended = describe_exit(status) + (f" ({how.detail})" if how.detail else "")
    if how.cancelled:
        return Decision(Action.CANCEL, ErrorKind.CANCELLED, "cancelled by request")
    if status == ExitCode.OK and how.finished:
        return Decision(Action.SUCCEED)
    if how.timed_out:
        return Decision(Action.FAIL, ErrorKind.TIMEOUT, f"timed out after {how.timeout_seconds or 0:.0f} seconds "
                                                        f"(job_timeout_seconds); {ended}")
    if error is not None and error.kind in (ErrorKind.PROTOCOL, ErrorKind.ENGINE):
        # The trainer never sends ENGINE: a runner does, when the engine could not run it at all (a container
        # that never started). Its message is the whole story; the exit status is the engine's, not the trainer's.
        return Decision(Action.FAIL, error.kind, error.message)
    if how.stopping:
        return Decision(Action.INTERRUPT)
    if status == ExitCode.INVALID:
        kind = error.kind if error is not None else ErrorKind.DATA
        return Decision(Action.FAIL, kind, error.message if error is not None else ended)
    reason = ended + (f": {error.message}" if error is not None and error.message else "")
    kind = error.kind if error is not None else None
    if policy.allows(attempt, kind):
        return Decision(Action.RETRY, ErrorKind.RETRY, reason)
    if kind is None:
        kind = ErrorKind.CRASH if status < 0 else ErrorKind.INTERNAL
    return Decision(Action.FAIL, kind, reason)
