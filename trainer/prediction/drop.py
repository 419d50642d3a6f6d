"""A prediction job (a ``predict.yaml`` drop, resolved by the daemon into a `PredictRun`): label every image of the
drop with a trained model and write, into the job's output folder:

- ``predictions.csv``: ``file`` (relative to the ``images`` folder), ``label`` (``unknown`` below ``min_confidence``),
  ``probability``, then ``label_1, probability_1 ... label_k, probability_k`` (the best guesses, calibrated);
- ``predictions.json``: the same, with the model used and the files that could not be read (``unreadable``, each with
  its reason; also in ``unreadable.csv``);
- for a drop whose images all lie in folders named after the model's classes: ``report.json`` (accuracy, per-class
  table, confusion matrix), ``confusion_matrix.png``, ``errors.png`` and ``report.html`` — training's machinery;
- with ``sort: true``: a copy of every image in ``sorted/<label>/`` (the drop's own sub-folders kept below it).

Images stream through the model in batches from the training pipeline's parallel decoders (`trainer.data.pipeline`): the
images in memory are bounded by ``batch_size``, not by the size of the drop (the predictions, about a kilobyte per
image, are kept until they are written).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contract.atomic import atomic_path, clean_json
from contract.files import PREDICT_FILE
from contract.predict_spec import PredictRun
from trainer.data.scan import DatasetError, Scan, relative, scan_images, valid_class_name
from trainer.outputs import artifacts

log = logging.getLogger(__name__)

PREDICTIONS_CSV = "predictions.csv"
PREDICTIONS_JSON = "predictions.json"
UNREADABLE_CSV = "unreadable.csv"
SORTED_DIR = "sorted"
PROGRESS_SECONDS = 1.0  # at most one progress event a second: the daemon records each one


class PredictionStopped(Exception):
    """Stopped on request; a prediction job simply runs again from the start (nothing to resume)."""


class PredictionRejected(Exception):
    """The job asks for something this model cannot do (e.g. a threshold it does not record): not retried."""


@dataclass(frozen=True)
class Labelling:
    """How each image is labelled: the model's classes, the files by position, how many guesses, the threshold
    below which the answer is unknown, whether the drop is labelled (its probabilities kept for the evaluation)."""

    names: list[str]
    files: list[str]
    top_k: int
    cut: float | None
    labelled: bool
    started: float


def _model(run: PredictRun):
    """The model a prediction job names, and its threshold; a clear rejection if either cannot be used."""
    from trainer.prediction.api import UNKNOWN, load_model, threshold

    try:
        model = load_model(run.model_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise DatasetError(f"model: the model of job {run.model_job!r} cannot be loaded from {run.model_dir} "
                           f"({exc}); was its outbox folder removed?") from None
    try:
        cut = threshold(model, run.spec.min_confidence)
    except ValueError as exc:
        raise PredictionRejected(f"min_confidence: {exc}") from None
    if cut is not None and UNKNOWN in model.class_names:
        raise PredictionRejected(f"min_confidence: this model has a class named {UNKNOWN!r}, which the answer "
                                 "below the threshold would be confused with; leave min_confidence out")
    return model, cut


def _stream(ds, model, how: Labelling, rows: dict, probs_of: dict, emit, stop_event) -> float:
    """Label every batch of ``ds`` into ``rows`` (by position), reporting progress; the seconds spent in the model."""
    from trainer.prediction.api import UNKNOWN

    names, k, cut = how.names, how.top_k, how.cut
    done, reported, predicting = 0, how.started, 0.0
    for images, _, index in ds:
        if stop_event is not None and stop_event.is_set():
            raise PredictionStopped(f"stopped on request after {done} of {len(how.files)} image(s)")
        t = time.perf_counter()
        probs = np.asarray(model.predict_on_batch(images))
        predicting += time.perf_counter() - t
        # One vectorised top-k per batch: per-image Python is what a tiny fast model waits on.
        order = np.argsort(-probs, axis=1)[:, :k]
        top = np.round(np.take_along_axis(probs, order, axis=1), 6).tolist()
        for i, o, t_k, p in zip(index.numpy().tolist(), order.tolist(), top, probs, strict=True):
            best = t_k[0]
            rows[i] = {"file": how.files[i], "label": UNKNOWN if cut is not None and best < cut else names[o[0]],
                       "probability": best,
                       "top_k": [{"label": names[j], "probability": q} for j, q in zip(o, t_k, strict=True)]}
            if how.labelled:
                probs_of[i] = p
        done += len(probs)
        now = time.monotonic()
        if now - reported >= PROGRESS_SECONDS:
            reported = now
            emit("progress", {"done": done, "total": len(how.files),
                              "images_per_second": round(done / max(now - how.started, 1e-9), 1)})
    return predicting


def run_prediction(root: str | os.PathLike, run: PredictRun, out: str | os.PathLike, *, emit, stop_event=None,
                   job_id: str | None = None) -> dict:
    """Run one prediction job on the images below ``root``; ``emit(event, payload)`` reports progress.

    Raises:
        DatasetError: no usable image in the drop, or the model is gone.
        ValueError: ``min_confidence: suggested`` for a model that records no threshold.
        PredictionStopped: ``stop_event`` was set.
    """
    from trainer.data.pipeline import Batches, DecodeFailures, make_dataset
    from trainer.prediction.api import UNKNOWN

    started = time.monotonic()
    spec, out = run.spec, Path(out)
    model, cut = _model(run)
    names = list(model.class_names)
    height, width, channels = model.input_shape[1:]
    scan = scan_images(root, names, exclude=(PREDICT_FILE,), what="images")
    if not scan.samples:
        raise DatasetError(f"images: {spec.images!r} holds no usable image "
                           f"({len(scan.skipped)} other file(s) passed over)")
    labelled = bool(scan.class_names)
    emit("started", {"kind": "predict", "classes": names, "train_images": 0, "val_images": 0, "epochs": 0,
                     "images": len(scan.samples), "skipped": len(scan.skipped), "model_job": run.model_job,
                     "warnings": [f"{len(scan.skipped)} file(s) are not usable images (listed in {UNREADABLE_CSV})"]
                     if scan.skipped else []})
    log.info("predicting %d image(s) with the model of %s%s", len(scan.samples), run.model_job,
             " (a labelled drop: evaluating too)" if labelled else "")
    failures = DecodeFailures(scan.root)
    ds = make_dataset(scan.samples, Batches(len(names), (height, width), spec.batch_size, channels),
                      cache=False, failures=failures, with_index=True)
    k = min(spec.top_k, len(names))
    files = [relative(scan.root, sample.path) for sample in scan.samples]
    rows: dict[int, dict] = {}
    probs_of: dict[int, np.ndarray] = {}
    streaming = time.monotonic()
    predicting = _stream(ds, model, Labelling(names, files, k, cut, labelled, started), rows, probs_of, emit,
                         stop_event)
    streaming = time.monotonic() - streaming
    emit("progress", {"done": len(rows), "total": len(scan.samples),
                      "images_per_second": round(len(rows) / max(streaming, 1e-9), 1)})
    unreadable = [{"file": s.path, "reason": s.reason} for s in scan.skipped]
    unreadable += [{"file": files[i], "reason": _reason(failures, files[i])}
                   for i in range(len(scan.samples)) if i not in rows]
    ordered = [rows[i] for i in sorted(rows, key=lambda i: rows[i]["file"])]
    seconds = time.monotonic() - started
    summary = {"model_job": run.model_job, "model_dir": run.model_dir, "classes": names, "images": len(ordered),
               "unreadable": len(unreadable), "seconds": round(seconds, 2),
               # Decoding and predicting, streamed (the scan and the model's loading are not in it); and the time
               # in the model alone, for the ratio make bench reports.
               "images_per_second": round(len(ordered) / streaming, 1) if streaming else None,
               "model_images_per_second": round(len(ordered) / predicting, 1) if predicting else None,
               "min_confidence": cut, "top_k": k, "labels": _counts(ordered, names, UNKNOWN)}
    paths = _write(out, spec, ordered, unreadable, summary, k)
    if labelled:
        summary["evaluation"] = _evaluate(out, scan, rows, probs_of, names, channels, paths)
    if spec.sort:
        paths["sorted"] = _sort(scan.root, out / SORTED_DIR, ordered)
    # The process' peak so far, taken once every output is written (predictions.json of a large drop is built in
    # memory): the whole job's peak, not only the streaming's.
    summary["peak_memory_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    paths["summary"] = artifacts.write_json(out / "summary.json", summary)
    log.info("%d image(s) labelled in %.1f s (%.0f/s), %d unreadable", len(ordered), seconds,
             summary["images_per_second"] or 0, len(unreadable))
    emit("finished", {"artifacts": {name: str(p) for name, p in paths.items()}, "epochs_trained": 0,
                      "final": {k2: summary[k2] for k2 in ("images", "unreadable", "images_per_second")},
                      "evaluation": summary.get("evaluation"), "seconds": round(seconds, 2)})
    return summary


def _reason(failures, rel: str) -> str:
    return next((s.reason for s in failures.items if s.path == rel), "could not be decoded")


def _counts(rows: list[dict], names: list[str], unknown: str) -> dict[str, int]:
    counts = {name: 0 for name in names}
    for r in rows:
        counts[r["label"]] = counts.get(r["label"], 0) + 1
    return {name: n for name, n in counts.items() if n or name != unknown}


def _write(out: Path, spec, rows: list[dict], unreadable: list[dict], summary: dict, k: int) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["file", "label", "probability", *[f"{c}_{i}" for i in range(1, k + 1)
                                                        for c in ("label", "probability")]])
    for r in rows:
        writer.writerow([r["file"], r["label"], f"{r['probability']:.6f}",
                         *[v for t in r["top_k"] for v in (t["label"], f"{t['probability']:.6f}")]])
    problems = io.StringIO()
    w = csv.writer(problems, lineterminator="\n")
    w.writerow(["file", "reason"])
    w.writerows([u["file"], u["reason"]] for u in unreadable)
    return {"predictions_csv": artifacts.write_text(out / PREDICTIONS_CSV, text.getvalue()),
            "unreadable_csv": artifacts.write_text(out / UNREADABLE_CSV, problems.getvalue()),
            "predictions_json": _write_predictions_json(out / PREDICTIONS_JSON, {
                **{key: summary[key] for key in ("model_job", "classes", "min_confidence", "top_k")},
                "spec": spec.model_dump(mode="json")}, rows, {"unreadable": unreadable})}


def _write_predictions_json(path: Path, head: dict, rows: list[dict], tail: dict) -> Path:
    """``{**head, "predictions": rows, **tail}`` as JSON, one prediction a line, written as it goes: serialising a
    large drop's predictions whole (a cleaned copy of them, then one string) took four times their own memory at
    once, 78 MB for 20,000 images."""
    def item(key: str, value) -> str:
        return f"  {json.dumps(key)}: {json.dumps(clean_json(value), ensure_ascii=False)}"

    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write("{\n" + "".join(item(k, v) + ",\n" for k, v in head.items()) + '  "predictions": [')
        for i, row in enumerate(rows):
            f.write(("," if i else "") + "\n    " + json.dumps(clean_json(row), ensure_ascii=False))
        f.write("\n  ]" + "".join(",\n" + item(k, v) for k, v in tail.items()) + "\n}\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def _evaluate(out: Path, scan: Scan, rows: dict[int, dict], probs_of: dict[int, np.ndarray], names: list[str],
              channels: int, paths: dict) -> dict:
    """A labelled drop: how the model does on it, with training's report machinery."""
    from trainer.outputs.report import classification_report
    from trainer.outputs.report_page import render_prediction_report

    seen = sorted(rows)
    y_true = np.asarray([scan.samples[i].label for i in seen])
    probs = np.stack([probs_of[i] for i in seen])
    y_pred = probs.argmax(axis=1)
    report = classification_report(y_true, y_pred, names)
    errors = [{"file": scan.samples[i].path, "true": names[t], "predicted": names[p],
               "probability": float(probs[n, p])}
              for n, (i, t, p) in enumerate(zip(seen, y_true, y_pred, strict=True)) if t != p]
    errors.sort(key=lambda e: -e["probability"])
    report["misclassified"] = [{**e, "file": relative(scan.root, e["file"])} for e in errors]
    cm = report["confusion_matrix"]
    paths["confusion_matrix"] = artifacts.plot_confusion(out / "confusion_matrix.png", cm["matrix"], cm["labels"],
                                                         "confusion matrix (the dropped images)")
    paths["errors_plot"] = artifacts.plot_errors(out / "errors.png", errors[:25],
                                                 "grayscale" if channels == 1 else "rgb")
    paths["report"] = artifacts.write_json(out / "report.json", report)
    paths["report_html"] = artifacts.write_text(out / "report.html", render_prediction_report(out, report))
    log.info("evaluation on the dropped labels: accuracy %.4f on %d image(s)", report["accuracy"], report["images"])
    return {k: report[k] for k in ("accuracy", "macro_f1", "images")}


def _sort(root: str, target: Path, rows: list[dict]) -> Path:
    """Copy (never move) each image to ``target/<label>/<its path in the drop>``; a rerun overwrites the copies."""
    inside = target.resolve()
    for r in rows:
        dst = target / r["label"] / r["file"]
        if not valid_class_name(r["label"]) or inside not in dst.resolve().parents:
            raise DatasetError(f"sort: {r['label']!r}/{r['file']!r} would be written outside {target}")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(root, r["file"]), dst)
    return target
