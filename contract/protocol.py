"""The contract between the daemon and ``python -m trainer run``: one module, imported by both sides and by the
stand-in trainer of the tests. TensorFlow-free (pydantic and the standard library only).

The daemon starts a trainer with `run_argv`; the trainer parses the same options with `add_run_arguments`::

    python -m trainer run JOB_DIR --spec SPEC_JSON --out OUT --work WORK --job-id ID [--events-file FILE]
        [--log-file FILE]

``JOB_DIR`` holds the images (spec paths are relative to it); ``SPEC_JSON`` is the resolved spec the daemon
validated at intake (``job.yaml`` with the config's ``job_defaults`` merged), and the trainer does not read
``job.yaml`` again; a resolved prediction job (``"kind": "predict"``, `contract.predict_spec.PredictRun`) runs the same
way. It answers with JSON-lines events (`Started`, `EpochEnd`, `Progress`, `Finished`, `Interrupted`, `Error`) on
stdout and, with ``--events-file``, appended to that file too (for runners that cannot read the process' stdout);
its exit status is an `ExitCode`; and just before it reports success it writes `FINISHED_FILE` into ``OUT``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from enum import Enum, IntEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from contract.atomic import clean_json, write_json
from contract.files import FINISHED_FILE

__all__ = ["ENV_JOB_ID", "ENV_PARENT_PID", "ENV_STATE_DIR", "FINISHED_FILE", "PROTOCOL_VERSION", "EpochEnd", "Error",
           "ErrorKind", "Event", "ExitCode", "Finished", "Interrupted", "Progress", "ProtocolError", "Started",
           "add_run_arguments", "event_line", "parse_event", "read_finished", "run_argv", "write_finished"]

# Raised whenever an event's fields change incompatibly; the daemon refuses a trainer that speaks another version.
PROTOCOL_VERSION = 3  # 3: prediction jobs (Started.kind, the Progress event, Finished.warnings)
# Versions this daemon reads: 3 only adds to 2, so a version-2 trainer still running on a cluster when the daemon is
# upgraded finishes its job.
SUPPORTED_VERSIONS = (2, 3)
# Written by the trainer into its output folder just before it reports success: the daemon's proof, after a crash,
# that the job finished (so it is not run a second time).
# Environment the daemon gives a trainer: its pid (the trainer stops if it dies), and who the trainer belongs to, so
# a restarted daemon can prove that a process it finds is its own before it signals it.
ENV_PARENT_PID = "DROPFIT_PARENT_PID"
ENV_JOB_ID = "DROPFIT_JOB_ID"
ENV_STATE_DIR = "DROPFIT_STATE_DIR"


class JobKind(str, Enum):
    """What a job does: trains a model (job.yaml) or labels images with one (predict.yaml). The values are what the
    ledger, status.json, the webhooks and the events carry."""

    TRAIN = "train"
    PREDICT = "predict"

    def __str__(self) -> str:
        # As StrEnum (Python 3.11+) does: text made of it (metric labels, f-strings) is the value, not "JobKind.TRAIN".
        return self.value


class ExitCode(IntEnum):
    """How ``trainer run`` ends."""

    OK = 0
    FAILED = 1  # anything else; an `Error` event says why
    INVALID = 2  # invalid spec or unusable data: running it again cannot help
    INTERRUPTED = 75  # stopped on request at a safe point (EX_TEMPFAIL); rerun with the same --work to resume


class ErrorKind(str, Enum):
    """Why a job failed: the first six come from the trainer's `Error` event, the rest are decided by the daemon."""

    SPEC = "spec"
    DATA = "data"
    OOM = "oom"
    IO = "io"
    INTERNAL = "internal"
    EXPORT = "export"  # an export that could not be converted or does not predict like the model: not retried
    ARCHIVE = "archive"  # a dropped archive that cannot or must not be extracted
    TIMEOUT = "timeout"  # job_timeout_seconds
    CRASH = "crash"  # the trainer died by a signal without saying why
    PROTOCOL = "protocol"  # the trainer speaks another protocol version
    ENGINE = "engine"  # the cluster engine (Slurm, Kubernetes) refused or lost the job
    CANCELLED = "cancelled"
    RETRY = "retry"  # not an end: the reason a job was queued again

    @property
    def rejects_input(self) -> bool:
        """The drop itself is unusable (outcome ``rejected``), as opposed to a failure while running it."""
        return self in (ErrorKind.SPEC, ErrorKind.DATA, ErrorKind.ARCHIVE)


class _Event(BaseModel):
    # Newer trainers may add fields; the daemon reads what it knows.
    model_config = ConfigDict(extra="allow")

    time: float = Field(default_factory=lambda: round(time.time(), 3))
    v: int = PROTOCOL_VERSION
    job: str | None = None


class Started(_Event):
    event: Literal["started"] = "started"
    kind: JobKind = JobKind.TRAIN
    classes: list[str]
    counts: dict[str, int] = Field(default_factory=dict)
    train_images: int
    val_images: int
    test_images: int = 0
    skipped: int = 0
    epochs: int
    resumed_from: int = 0
    target_size: list[int] | None = None
    batch_size: int | None = None
    architecture: str | None = None
    warnings: list[str] = Field(default_factory=list)  # about the data (duplicates, conflicts, tiny classes...)
    time_budget: float | None = None  # seconds, when the job has one
    deadline: float | None = None  # Unix time the job will have ended by, when it has a time budget
    images: int | None = None  # a prediction job: how many images it labels
    model_job: str | None = None  # a prediction job: the training job whose model it uses


class EpochEnd(_Event):
    event: Literal["epoch_end"] = "epoch_end"
    epoch: int
    epochs: int | None = None
    loss: float | None = None
    accuracy: float | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    learning_rate: float | None = None
    seconds: float | None = None
    images_per_second: float | None = None

    def metrics(self) -> dict[str, Any]:
        """The epoch's row as the ledger and ``status.json`` keep it (everything but the envelope)."""
        return self.model_dump(exclude={"event", "time", "v", "job"})


class Progress(_Event):
    """A prediction job's progress (at most about once a second)."""

    event: Literal["progress"] = "progress"
    done: int
    total: int
    images_per_second: float | None = None


class Finished(_Event):
    event: Literal["finished"] = "finished"
    artifacts: dict[str, str] = Field(default_factory=dict)
    final: dict[str, Any] = Field(default_factory=dict)
    epochs_trained: int = 0
    best_val_accuracy: float | None = None
    evaluation: dict[str, Any] | None = None
    seconds: float | None = None
    warnings: list[str] = Field(default_factory=list)  # found after training (e.g. an INT8 export that lost accuracy)


class Interrupted(_Event):
    event: Literal["interrupted"] = "interrupted"
    completed_epochs: int
    message: str = ""


class Error(_Event):
    event: Literal["error"] = "error"
    kind: ErrorKind
    message: str


Event = Annotated[Started | EpochEnd | Progress | Finished | Interrupted | Error, Field(discriminator="event")]
_EVENT = TypeAdapter(Event)
EVENT_TYPES = {cls.model_fields["event"].default: cls
               for cls in (Started, EpochEnd, Progress, Finished, Interrupted, Error)}


class ProtocolError(ValueError):
    """A line from the trainer that is not a valid event; ``version`` is set when it is another protocol version."""

    def __init__(self, message: str, version: int | None = None):
        super().__init__(message)
        self.version = version


def event_line(event: _Event) -> str:
    """One event as the single JSON line the trainer writes (strict JSON: no NaN, names made valid UTF-8)."""
    return json.dumps(clean_json(event.model_dump(mode="json")), ensure_ascii=False, allow_nan=False)


def parse_event(line: str | bytes) -> Event:
    """Parse one line of a trainer's event stream.

    Raises:
        ProtocolError: not JSON, not an event, an unknown event, bad fields, or another protocol version.
    """
    try:
        data = json.loads(line)
    except ValueError as exc:
        raise ProtocolError(f"not JSON ({exc.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("event"), str):
        raise ProtocolError("not an event object (expected a JSON object with an 'event' field)")
    version = data.get("v")
    if version not in SUPPORTED_VERSIONS:
        raise ProtocolError(f"the trainer speaks event protocol version {version!r}; this daemon speaks version "
                            f"{PROTOCOL_VERSION} (are the daemon and the trainer from the same dropfit release?)",
                            version=version if isinstance(version, int) else -1)
    if data["event"] not in EVENT_TYPES:
        raise ProtocolError(f"unknown event {data['event']!r}; expected one of {', '.join(EVENT_TYPES)}")
    try:
        return _EVENT.validate_python(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in exc.errors())
        raise ProtocolError(f"invalid {data['event']} event: {problems}") from None


# --- the command line ------------------------------------------------------------------------------------------

def add_run_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``trainer run`` (the trainer's parser and the tests' stand-in trainer both use these)."""
    parser.add_argument("job_dir", help="the job folder: the images, and the files the spec names")
    parser.add_argument("--spec", help="the resolved spec (JSON) to run; default: JOB_DIR/job.yaml as it is")
    parser.add_argument("--out", required=True, help="output folder for the artifacts")
    parser.add_argument("--work", help="work folder for checkpoints; rerunning with it resumes")
    parser.add_argument("--job-id", help="id shown in logs and events (default: the job folder's name)")
    parser.add_argument("--events-file", help="also append every event line to this file (flushed per line)")
    parser.add_argument("--log-file", help="also append the log to this file (where stderr is not kept)")
    return parser


def run_argv(trainer: list[str], job_dir: str | os.PathLike, *, spec: str | os.PathLike, out: str | os.PathLike,
             work: str | os.PathLike, job_id: str, events_file: str | os.PathLike | None = None,
             log_file: str | os.PathLike | None = None) -> list[str]:
    """The command line that runs one job: ``trainer`` is the trainer's own argv prefix (``python -m trainer``)."""
    argv = [*trainer, "run", os.fspath(job_dir), "--spec", os.fspath(spec), "--out", os.fspath(out), "--work",
            os.fspath(work), "--job-id", job_id]
    if events_file is not None:
        argv += ["--events-file", os.fspath(events_file)]
    if log_file is not None:
        argv += ["--log-file", os.fspath(log_file)]
    return argv


# --- the finished marker ---------------------------------------------------------------------------------------

def write_finished(out: str | os.PathLike, job: str, epochs_trained: int, **extra) -> Path:
    """Record in ``out`` that the job succeeded, before the `Finished` event is sent."""
    return write_json(Path(out) / FINISHED_FILE, {"job": job, "time": time.time(), "epochs_trained": epochs_trained,
                                                  "v": PROTOCOL_VERSION, **extra})


def read_finished(out: str | os.PathLike) -> dict | None:
    """The marker's content, or None when absent or cut short (then the job runs again and resumes)."""
    try:
        data = json.loads((Path(out) / FINISHED_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
