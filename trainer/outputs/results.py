"""The results of a run in ``output_dir``: what goes in each file, and writing them all.

Layout (every file written atomically)::

    model.keras            the trained model (takes raw 0-255 pixels)
    labels.json            class names in output order, input size, colour mode
    metrics.csv            one row per epoch
    history.png            loss and accuracy curves, train and validation
    confusion_matrix.png   on the held-out images (test, else validation)
    errors.png             a grid of misclassified held-out images, true and predicted labels
    report.json            accuracy, per-class precision/recall/F1, most confused pairs, misclassified files
    report.html            all of the above on one self-contained page
    dataset.json           images per class and split, image sizes, skipped files with reasons, warnings
    summary.json           final metrics, durations, resolved configuration, seed, library versions
    savedmodel/, model.tflite, model_int8.tflite, model.onnx, openvino/   exports, when asked for
    exports.json           each export checked against model.keras: size, load time, speed, agreement
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from pathlib import Path

from contract.files import DATASET_FILE, EXPORTS_FILE, LABELS_FILE, METRICS_FILE, MODEL_FILE, REPORT_FILE, SUMMARY_FILE
from trainer.data.scan import Sample, Scan, relative
from trainer.outputs import artifacts

log = logging.getLogger(__name__)

TINY_CLASS = 10
IMBALANCE_RATIO = 3.0


def dataset_info(scan: Scan, extra_scans: dict[str, Scan], train: list[Sample], val: list[Sample],
                 test: list[Sample]) -> dict:
    """dataset.json: counts per class and split, image sizes, skipped files and warnings."""
    info = scan.to_json()
    counts = {name: {"total": 0, "train": 0, "validation": 0, "test": 0} for name in scan.class_names}
    for part, samples in (("train", train), ("validation", val), ("test", test)):
        for s in samples:
            entry = counts[scan.class_names[s.label]]
            entry[part] += 1
            entry["total"] += 1
    info["counts"] = counts
    info["train_images"], info["validation_images"], info["test_images"] = len(train), len(val), len(test)
    sizes = [s.size for s in (*train, *val, *test) if s.size]
    if sizes:
        heights, widths = [h for h, _ in sizes], [w for _, w in sizes]
        info["image_sizes"] = {"median": [statistics.median(heights), statistics.median(widths)],
                               "min": [min(heights), min(widths)], "max": [max(heights), max(widths)]}
    for name, side in extra_scans.items():
        info[f"{name}_root"] = side.root
        info["skipped"] += [{"file": relative(side.root, s.path), "reason": s.reason} for s in side.skipped]
        info["warnings"] += side.warnings
    train_counts = {name: c["train"] for name, c in counts.items()}
    for name, n in train_counts.items():
        if n < TINY_CLASS:
            info["warnings"].append(f"class {name!r} has only {n} training image(s); expect unreliable results "
                                    f"for it (aim for 50 or more)")
    smallest, largest = min(train_counts.values(), default=0), max(train_counts.values(), default=0)
    if smallest and largest / smallest > IMBALANCE_RATIO:
        info["warnings"].append(f"classes are imbalanced: {largest} vs {smallest} training images "
                                f"(class_weight: balanced compensates)")
    return info


def misclassified(samples: list[Sample], y_true, y_pred, probs, index, class_names: list[str]) -> list[dict]:
    """Misclassified images, most confident mistakes first."""
    out = []
    for t, p, prob, i in zip(y_true, y_pred, probs, index, strict=True):
        if t != p:
            out.append({"file": samples[int(i)].path, "true": class_names[int(t)], "predicted": class_names[int(p)],
                        "probability": float(prob[int(p)])})
    out.sort(key=lambda e: -e["probability"])
    return out


@dataclass
class Outcome:
    """What a finished run has to show: its classes and input, the per-epoch rows, the report on held-out images and
    the misclassified ones, dataset.json's content and summary.json's."""

    class_names: list[str]
    target_size: tuple[int, int]
    color_mode: str
    history_rows: list[dict]
    report: dict
    errors: list[dict]
    dataset: dict
    summary: dict


def write_all(out: Path, model, outcome: Outcome, exports=(), export_data=None, stamp=None) -> dict[str, Path]:
    """Write every artifact of a finished run into ``out``; returns their paths by name. ``export_data()`` gives
    what the exports are made from and checked on: (held-out uint8 images, their labels, representative training
    images, the held-out split's name); ``stamp(summary)`` records the final durations just before summary.json and
    the report are written."""
    from trainer.outputs.report_page import render_report

    class_names, target_size, color_mode = outcome.class_names, outcome.target_size, outcome.color_mode
    history_rows, report, errors = outcome.history_rows, outcome.report, outcome.errors
    dataset, summary = outcome.dataset, outcome.summary
    out.mkdir(parents=True, exist_ok=True)
    cm = report["confusion_matrix"]
    split = report["split"] if report["held_out"] else "training, not held out"
    cal = report.get("calibration")
    labels = {"classes": class_names, "target_size": list(target_size), "color_mode": color_mode}
    if cal:
        suggested = cal["suggested"]
        labels["calibration"] = {"temperature": cal["temperature"], "min_confidence": suggested["threshold"],
                                 "target_accuracy": suggested["target_accuracy"],
                                 "coverage_at_min_confidence": suggested["coverage"], "measured_on": cal["split"]}
    paths = {
        "model": artifacts.save_model(out / MODEL_FILE, model),
        "labels": artifacts.write_json(out / LABELS_FILE, labels),
        "metrics": artifacts.write_metrics_csv(out / METRICS_FILE, history_rows),
        "history_plot": artifacts.plot_history(out / "history.png", history_rows),
        "confusion_matrix": artifacts.plot_confusion(out / "confusion_matrix.png", cm["matrix"], cm["labels"],
                                                     f"confusion matrix ({split} images)"),
        "errors_plot": artifacts.plot_errors(out / "errors.png", errors[:25], color_mode),
        "suspects": artifacts.write_suspects_csv(out / "suspects.csv", report.get("suspects", []),
                                                 dataset.get("root")),
    }
    if cal:
        paths["calibration_plot"] = artifacts.plot_calibration(out / "calibration.png", cal)
    if report.get("suspects"):
        paths["suspects_plot"] = artifacts.plot_errors(out / "suspects.png", report["suspects"][:25], color_mode)
    audit = dataset.get("audit")
    if audit and audit["groups"]:
        shown = sorted(audit["groups"], key=lambda g: (not g["conflict"], -len(g["files"])))[:12]
        paths["duplicates_plot"] = artifacts.plot_groups(out / "duplicates.png", shown, dataset["root"], color_mode)
    if exports:
        paths.update(_exports(out, model, exports, export_data, paths["model"], report, summary))
    paths["report"] = artifacts.write_json(out / REPORT_FILE, report)
    paths["dataset"] = artifacts.write_json(out / DATASET_FILE, dataset)
    if stamp is not None:
        stamp(summary)  # the job's time now includes every artifact and export
    paths["report_html"] = artifacts.write_text(out / "report.html", render_report(out, report, dataset, summary,
                                                                                    history_rows))
    paths["summary"] = artifacts.write_json(out / SUMMARY_FILE, summary)  # last: the rest is there when it is
    return paths


def _exports(out: Path, model, formats, export_data, keras_file: Path, report: dict, summary: dict) -> dict:
    """Write and check every export; the per-format table goes into exports.json, report.json (and the page)."""
    from trainer.outputs.exports import FILES, export_all

    table = export_all(model, formats, out, keras_file, export_data)
    paths = {fmt: out / FILES[fmt] for fmt in formats}
    paths["exports"] = artifacts.write_json(out / EXPORTS_FILE, table)
    report["exports"] = table
    summary["exports"] = {r["format"]: {"path": str(out / r["file"]), **r} for r in table["rows"][1:]}
    for warning in table["warnings"]:
        log.warning("%s", warning)
        summary.setdefault("warnings", []).append(warning)
    return paths
