"""`daemon.decision.decide`: what a trainer's end means for its job, as a pure function (no processes)."""

from __future__ import annotations

import signal

import pytest

from contract.protocol import Error, ErrorKind, ExitCode
from daemon.decision import Action, Ending, RetryPolicy, decide

POLICY = RetryPolicy(retries=1)


def error(kind: str, message: str = "why") -> Error:
    return Error(kind=kind, message=message)


@pytest.mark.parametrize("status, err, attempt, flags, action, kind, outcome", [
    (0, None, 1, {"finished": True}, Action.SUCCEED, None, "succeeded"),
    # Success wins over everything the daemon was doing meanwhile: the model is there.
    (0, None, 1, {"finished": True, "stopping": True, "timed_out": True}, Action.SUCCEED, None, "succeeded"),
    (0, None, 1, {"finished": True, "cancelled": True}, Action.CANCEL, ErrorKind.CANCELLED, "cancelled"),
    (75, None, 1, {"cancelled": True}, Action.CANCEL, ErrorKind.CANCELLED, "cancelled"),
    (-signal.SIGKILL, None, 1, {"timed_out": True}, Action.FAIL, ErrorKind.TIMEOUT, "failed"),
    (75, None, 1, {"stopping": True}, Action.INTERRUPT, None, None),
    (-signal.SIGKILL, None, 1, {"stopping": True}, Action.INTERRUPT, None, None),
    (2, error("spec"), 1, {}, Action.FAIL, ErrorKind.SPEC, "rejected"),
    (2, error("data"), 1, {}, Action.FAIL, ErrorKind.DATA, "rejected"),
    (2, None, 1, {}, Action.FAIL, ErrorKind.DATA, "rejected"),
    (1, error("internal"), 1, {}, Action.RETRY, ErrorKind.RETRY, None),
    (1, error("internal"), 2, {}, Action.FAIL, ErrorKind.INTERNAL, "failed"),
    (-signal.SIGKILL, None, 1, {}, Action.RETRY, ErrorKind.RETRY, None),
    (-signal.SIGKILL, None, 2, {}, Action.FAIL, ErrorKind.CRASH, "failed"),
    (-signal.SIGSEGV, error("io", "no space left on device: /x"), 1, {}, Action.FAIL, ErrorKind.IO, "failed"),
    (1, error("oom"), 1, {}, Action.FAIL, ErrorKind.OOM, "failed"),
    (0, None, 1, {}, Action.RETRY, ErrorKind.RETRY, None),  # exit 0 without `finished`: not a success
    (75, error("protocol", "speaks version 1"), 1, {"stopping": True}, Action.FAIL, ErrorKind.PROTOCOL, "failed"),
    # A runner's verdict that the container never started (kubernetes: ImagePullBackOff): not retried.
    (1, error("engine", "could not pull the image"), 1, {}, Action.FAIL, ErrorKind.ENGINE, "failed"),
])
def test_decide(status, err, attempt, flags, action, kind, outcome):
    decision = decide(status, err, attempt, POLICY, Ending(timeout_seconds=60, **flags))
    assert (decision.action, decision.kind) == (action, kind)
    # The outcome the daemon records and counts (daemon.service.Daemon.fail): "rejected" when the drop is unusable.
    recorded = {Action.SUCCEED: "succeeded", Action.CANCEL: "cancelled"}.get(decision.action)
    if decision.action == Action.FAIL:
        recorded = "rejected" if decision.kind.rejects_input else "failed"
    assert recorded == outcome


def test_reasons_are_readable():
    assert decide(-9, None, 2, POLICY).reason == \
        "the trainer was killed by SIGKILL (out of memory? the kernel's OOM killer sends SIGKILL)"
    assert decide(1, error("internal", "ValueError: x"), 2, POLICY).reason == \
        "the trainer exited with code 1: ValueError: x"
    assert decide(-9, None, 1, POLICY, Ending(timed_out=True, timeout_seconds=7200)).reason.startswith(
        "timed out after 7200 seconds (job_timeout_seconds); the trainer was killed by SIGKILL")
    assert decide(2, error("data", "needs at least 2 classes"), 1, POLICY).reason == "needs at least 2 classes"
    # The engine's own verdict on a trainer that never ran is not dressed up as an exit of the trainer.
    assert decide(1, error("engine", "its image cannot be pulled"), 1, POLICY).reason == "its image cannot be pulled"


def test_the_retry_policy():
    assert RetryPolicy(retries=0).allows(1, None) is False
    assert RetryPolicy(retries=3).allows(3, ErrorKind.INTERNAL) and not RetryPolicy(retries=3).allows(4, None)
    assert not RetryPolicy(retries=3).allows(1, ErrorKind.IO)
    assert decide(ExitCode.FAILED, None, 1, RetryPolicy(retries=0)).action == Action.FAIL
