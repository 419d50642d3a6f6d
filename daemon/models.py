"""The model catalogue: the succeeded training jobs whose models are still in the outbox — what ``dropfit models``
lists and what a ``predict.yaml``'s ``model:`` names (a job id, ``latest``, or ``latest:<dataset name>``).

Read from the ledger (which jobs succeeded, in which order) and each job's outbox folder (``summary.json``,
``labels.json``, the model files); TensorFlow-free.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from contract.files import EXPORT_FILES, LABELS_FILE, MODEL_FILE, SUMMARY_FILE
from contract.predict_spec import LATEST
from contract.protocol import JobKind
from daemon.ledger import JobState, Ledger


def entries(ledger: Ledger, outbox: Path) -> list[dict]:
    """Every succeeded training job with its model still present, the last to finish first."""
    out = []
    for job in reversed(ledger.jobs(JobState.SUCCEEDED)):
        if job.kind not in (None, JobKind.TRAIN):
            continue
        folder = outbox / job.id
        if not (folder / MODEL_FILE).is_file():
            continue
        summary = _read(folder / SUMMARY_FILE)
        labels = _read(folder / LABELS_FILE)
        evaluation = summary.get("evaluation") or {}
        out.append({
            "id": job.id, "dataset": job.name, "finished_at": job.finished_at,
            "finished": time.strftime("%Y-%m-%d %H:%M", time.gmtime(job.finished_at)) if job.finished_at else None,
            "classes": labels.get("classes") or summary.get("classes") or [],
            "accuracy": evaluation.get("accuracy"), "accuracy_on": evaluation.get("split"),
            "input": labels.get("target_size"), "color_mode": labels.get("color_mode"),
            "exports": [name for name, file in EXPORT_FILES.items() if (folder / file).exists()],
            "path": str(folder)})
    return sorted(out, key=lambda m: m["finished_at"] or 0, reverse=True)  # newest: the last to finish


def resolve(ref: str, ledger: Ledger, outbox: Path) -> tuple[str, Path]:
    """The training job (id, outbox folder) that ``ref`` names.

    Raises:
        LookupError: with what was asked for and what there is to choose from.
    """
    models = entries(ledger, outbox)
    if ref == LATEST or ref.startswith(LATEST + ":"):
        dataset = ref[len(LATEST) + 1:].strip() if ref != LATEST else None
        chosen = [m for m in models if dataset is None or dataset_name(m["dataset"]) == dataset_name(dataset)]
        if chosen:
            return chosen[0]["id"], Path(chosen[0]["path"])
        if not models:
            coming = sum(1 for j in ledger.jobs(JobState.QUEUED, JobState.RUNNING, JobState.INTERRUPTED)
                         if j.kind != JobKind.PREDICT)
            if coming:
                raise LookupError(f"no trained model yet (got {ref!r}); {coming} training job"
                                  f"{' is' if coming == 1 else 's are'} queued or running: drop this again once one "
                                  "has finished (`dropfit models` lists the trained ones)")
            raise LookupError(f"no trained model yet (got {ref!r}); drop a dataset with a job.yaml first")
        names = sorted({dataset_name(m["dataset"]) for m in models})
        raise LookupError(f"no trained model for a dataset named {dataset!r} (got {ref!r}); trained datasets: "
                          f"{', '.join(names)}")
    for m in models:
        if m["id"] == ref:
            return m["id"], Path(m["path"])
    job = ledger.get(ref)
    if job is None:
        newest = ", ".join(m["id"] for m in models[:3]) or "none yet"
        raise LookupError(f"no job with the id {ref!r}; `dropfit models` lists the trained ones (newest: {newest})")
    if job.kind == JobKind.PREDICT:
        raise LookupError(f"job {ref!r} is a prediction job, not a training job")
    if job.state is not JobState.SUCCEEDED:
        raise LookupError(f"job {ref!r} has not succeeded (it is {job.state.value}); expected a trained model")
    raise LookupError(f"job {ref!r} succeeded, but its model is no longer in {outbox / ref} (removed?)")


def dataset_name(name: str) -> str:
    """The name a dataset is known by: its drop's name without an archive suffix (flowers.zip is flowers)."""
    for suffix in (".tar.gz", ".tgz", ".tar", ".zip"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def table(models: list[dict]) -> str:
    """``dropfit models``: one line per model."""
    if not models:
        return "no trained models yet"
    rows = [("ID", "DATASET", "CLASSES", "ACCURACY", "INPUT", "FINISHED", "EXPORTS")]
    for m in models:
        accuracy = f"{m['accuracy']:.1%} ({m['accuracy_on']})" if m["accuracy"] is not None else "-"
        size = "x".join(map(str, m["input"])) if m["input"] else "-"
        rows.append((m["id"], m["dataset"], str(len(m["classes"])), accuracy, size, m["finished"] or "-",
                     ",".join(m["exports"]) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
