"""What the daemon itself writes into ``outbox/<job-id>/``: ``status.json`` (kept current), ``error.txt``, and
``job.resolved.yaml`` (the spec the job runs with).

The trainer writes the model, metrics and plots there too; ``train.log`` holds its stderr.
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from contract.atomic import write_json, write_text
from contract.files import ERROR_FILE, RESOLVED_FILE, RESOLVED_PREDICT_FILE, STATUS_FILE
from contract.predict_spec import PredictRun
from contract.protocol import JobKind
from contract.spec import JobSpec, resolved_yaml
from daemon.ledger import Job


def write_status(outbox: Path, job: Job) -> None:
    """Atomically replace ``status.json`` with the job's current record."""
    data = job.to_json()
    data.pop("seq", None)
    data.pop("source", None)
    data["dataset"] = data.pop("name")
    data["dataset_path"] = data.pop("path")
    data["kind"] = str(job.kind or JobKind.TRAIN)
    done, total = job.progress
    data["progress"] = f"{done}/{total}" if total else None
    data["progress_unit"] = "images" if job.kind == JobKind.PREDICT else "epochs"
    if job.deadline is not None:
        data["time_left_seconds"] = round(max(0.0, job.deadline - time.time()), 1) if not job.state.terminal \
            else None
    for key in ("created_at", "updated_at", "started_at", "finished_at", "deadline"):
        if data.get(key):
            data[key + "_iso"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(data[key]))
    write_json(outbox / job.id / STATUS_FILE, data)


def write_error(outbox: Path, job: Job) -> None:
    """Write ``error.txt``: the exact reason, and where the dataset was kept."""
    lines = [f"job {job.id} {job.state.value}: {job.error_kind}", "", job.error or "", ""]
    if job.path:
        lines.append(f"The dataset was kept in {job.path}")
    write_text(outbox / job.id / ERROR_FILE, "\n".join(lines) + "\n")


def write_resolved_spec(outbox: Path, job_id: str, spec: JobSpec | PredictRun) -> None:
    """Write ``job.resolved.yaml``: job.yaml with job_defaults and every default, as the trainer runs it (for a
    prediction job ``predict.resolved.yaml``: every default, and the model ``model:`` named when it was queued)."""
    if isinstance(spec, PredictRun):
        header = (f"# The resolved prediction job: predict.yaml with every default, and the model it uses\n"
                  f"# (model: {spec.spec.model} named job {spec.model_job} when this job was queued).\n")
        write_text(outbox / job_id / RESOLVED_PREDICT_FILE,
                   header + yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False, allow_unicode=True))
        return
    write_text(outbox / job_id / RESOLVED_FILE, resolved_yaml(spec))
