"""report.html: one self-contained page (plots embedded as data URIs, no scripts, no external files) that shows
whether a model is good and why: learning curves, confusion matrix, per-class metrics, the most confused pairs,
misclassified images, how far to trust its confidence (calibration), label suspects, the dataset audit
(duplicates, conflicts), the time budget's plan, the dataset and its skipped files, and the resolved job spec."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 0; color: #1d2330;
       background: #f6f7f9; }
main { max-width: 1100px; margin: 0 auto; padding: 24px; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 10px; }
.sub { color: #5b6475; margin-bottom: 18px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: #fff; border: 1px solid #e2e5ea; border-radius: 8px; padding: 12px 16px; min-width: 150px; }
.card b { display: block; font-size: 22px; } .card span { color: #5b6475; font-size: 12px; }
section { background: #fff; border: 1px solid #e2e5ea; border-radius: 8px; padding: 16px 20px; margin-top: 16px; }
table { border-collapse: collapse; width: 100%; } th, td { text-align: left; padding: 5px 10px;
        border-bottom: 1px solid #eef0f3; } th { background: #fafbfc; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; } .warn { color: #9a5b00; } .bad { color: #b42318; }
pre { background: #f3f4f6; padding: 12px; border-radius: 6px; overflow-x: auto; font-size: 12.5px; }
"""


def _e(value) -> str:
    return html.escape(str(value))


def _img(path: Path, alt: str) -> str:
    if not path.exists():
        return f"<p><i>{_e(alt)}: not available</i></p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _table(headers: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    head = "".join(f'<th class="num">{_e(h)}</th>' if i in numeric else f"<th>{_e(h)}</th>"
                   for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f'<td class="num">{_e(c)}</td>' if i in numeric else f"<td>{_e(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_report(out: Path, report: dict, dataset: dict, summary: dict, history: list[dict]) -> str:
    """The page's HTML; images are read from ``out`` (history.png, confusion_matrix.png, errors.png)."""
    split_name = {"test": "test", "validation": "validation",
                  "train": "training (not held out)"}[summary["evaluation"]["split"]]
    parts = _head(summary, dataset, split_name)
    warnings = list(dict.fromkeys([*dataset.get("warnings", []), *summary.get("warnings", [])]))
    if warnings:
        parts.append("<section><h2>Warnings</h2><ul>" + "".join(f"<li class='warn'>{_e(w)}</li>" for w in warnings)
                     + "</ul></section>")
    parts += _learning_curves(out, summary, history)
    parts += _results(out, report, dataset, split_name)
    parts += _advisor(summary.get("advisor"))
    parts += _calibration(out, report.get("calibration"))
    parts += _suspects(out, report.get("suspects") or [], dataset.get("root"))
    parts += _exports(report.get("exports"))
    parts += _audit(out, dataset.get("audit"))
    parts += _budget(summary.get("budget"))
    parts += _pretrained(summary.get("pretrained"))
    parts += _dataset(dataset)
    spec = summary.get("spec") or summary.get("config")
    parts.append("<section><h2>Resolved job spec</h2><pre>" + _e(json.dumps(spec, indent=2)) + "</pre>"
                 "<h2>Versions</h2><pre>" + _e(json.dumps(summary.get("versions", {}), indent=2)) + "</pre>"
                 + "</section>")
    parts.append("</main></body></html>\n")
    return "\n".join(parts)


def _head(summary: dict, dataset: dict, split_name: str) -> list[str]:
    ev = summary["evaluation"]
    title = summary.get("job_id") or Path(dataset.get("root", "")).name or "dropfit run"
    cards = [
        (_pct(ev["accuracy"]), f"{split_name} accuracy ({ev['images']} images)"),
        (f"{ev['macro_f1']:.3f}", "macro F1"),
        (_pct(summary.get("best_val_accuracy")), "best validation accuracy"),
        (f"{summary['epochs_trained']}/{summary['epochs']}", "epochs" + (" (stopped early)"
                                                                         if summary.get("stopped_early") else "")),
        (f"{summary['durations']['total_seconds']:.0f} s", "training time"),
        (str(summary["architecture"]), f"{summary.get('parameters', 0):,} parameters"),
    ]
    return [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>dropfit report: {_e(title)}</title>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{_CSS}</style></head>"
            f"<body><main><h1>dropfit report: {_e(title)}</h1>"
            f"<div class='sub'>{len(summary['classes'])} classes · target size "
            f"{'×'.join(map(str, summary['config']['target_size']))} · seed {_e(summary['seed'])} · "
            f"TensorFlow {_e(summary['versions'].get('tensorflow', '?'))}, "
            f"Keras {_e(summary['versions'].get('keras', '?'))}</div>",
            "<div class='cards'>" + "".join(f"<div class='card'><b>{_e(v)}</b><span>{_e(k)}</span></div>"
                                            for v, k in cards) + "</div>"]


def _learning_curves(out: Path, summary: dict, history: list[dict]) -> list[str]:
    parts = [f"<section><h2>Learning curves</h2>{_img(out / 'history.png', 'learning curves')}"]
    if history:
        best = summary.get("best_epoch")
        parts.append(_table(["epoch", "loss", "accuracy", "val loss", "val accuracy", "learning rate", "seconds"],
                            [[f"{r['epoch']}{' ★' if r['epoch'] == best else ''}", _f(r.get("loss")),
                              _f(r.get("accuracy")), _f(r.get("val_loss")), _f(r.get("val_accuracy")),
                              f"{r.get('learning_rate', 0):.2g}", _f(r.get("seconds"), 1)] for r in history],
                            numeric={1, 2, 3, 4, 5, 6}))
        if summary.get("restored_best_weights"):
            parts.append(f"<p>The model keeps the weights of epoch {best} (★), the lowest validation loss.</p>")
    parts.append("</section>")
    return parts


def _results(out: Path, report: dict, dataset: dict, split_name: str) -> list[str]:
    """Per class, the confusion matrix and the misclassified images."""
    per_class = report["per_class"]
    parts = [f"<section><h2>Per class ({_e(split_name)} images)</h2>" + _table(
        ["class", "precision", "recall", "F1", "images"],
        [[name, _f(m["precision"]), _f(m["recall"]), _f(m["f1"]), m["support"]] for name, m in per_class.items()],
        numeric={1, 2, 3, 4})]
    if report.get("splits"):
        parts.append("<p>" + " · ".join(f"{_e(name)}: accuracy {_pct(s['accuracy'])} on {s['images']} images"
                                        for name, s in report["splits"].items()) + "</p>")
    parts.append("</section>")
    parts.append(f"<section><h2>Confusion matrix</h2>{_img(out / 'confusion_matrix.png', 'confusion matrix')}")
    if report.get("most_confused"):
        parts.append("<h2>Most confused pairs</h2>" + _table(
            ["true class", "predicted as", "images"],
            [[c["true"], c["predicted"], c["count"]] for c in report["most_confused"]], numeric={2}))
    parts.append("</section>")
    errors = report.get("misclassified", [])
    parts.append(f"<section><h2>Misclassified images ({len(errors)}{'+' if len(errors) >= 100 else ''})</h2>"
                 f"{_img(out / 'errors.png', 'misclassified images')}")
    if errors:
        parts.append(_table(["file", "true", "predicted", "probability"],
                            [[_short(e["file"], dataset.get("root")), e["true"], e["predicted"],
                              _f(e["probability"])] for e in errors[:50]], numeric={3}))
    parts.append("</section>")
    return parts


def _suspects(out: Path, suspects: list[dict], root) -> list[str]:
    if not suspects:
        return []
    return [f"<section><h2>Label suspects ({len(suspects)})</h2><p>Held-out images whose given label the "
            "calibrated model contradicts with 90% confidence or more: check their folders (the full list "
            "is suspects.csv).</p>" + _img(out / "suspects.png", "label suspects") + _table(
                ["file", "given label", "predicted", "confidence"],
                [[_short(e["file"], root), e["true"], e["predicted"], _f(e["probability"])]
                 for e in suspects[:50]], numeric={3}) + "</section>"]


def _dataset(dataset: dict) -> list[str]:
    counts = dataset.get("counts", {})
    parts = ["<section><h2>Dataset</h2>" + _table(
        ["class", "train", "validation", "test", "total"],
        [[name, c["train"], c["validation"], c.get("test", 0), c["total"]] for name, c in counts.items()],
        numeric={1, 2, 3, 4})]
    sizes = dataset.get("image_sizes")
    if sizes:
        parts.append(f"<p>Image sizes (height × width): median {_size(sizes['median'])}, smallest "
                     f"{_size(sizes['min'])}, largest {_size(sizes['max'])}.</p>")
    skipped = dataset.get("skipped", [])
    parts.append(f"<h2>Skipped files ({len(skipped)})</h2>")
    parts.append(_table(["file", "reason"], [[s["file"], s["reason"]] for s in skipped[:200]]) if skipped
                 else "<p>None: every file was a usable image.</p>")
    parts.append("</section>")
    return parts


def render_prediction_report(out: Path, report: dict, title: str = "dropped images") -> str:
    """The page of a prediction job whose drop was labelled (class folders): how the model did on it."""
    cards = [(_pct(report["accuracy"]), f"accuracy ({report['images']} images)"),
             (f"{report['macro_f1']:.3f}", "macro F1")]
    errors = report.get("misclassified", [])
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>dropfit evaluation: {_e(title)}"
             f"</title><meta name='viewport' content='width=device-width, initial-scale=1'><style>{_CSS}</style>"
             f"</head><body><main><h1>dropfit evaluation: {_e(title)}</h1>"
             "<div class='sub'>a prediction job whose images were in class folders: the folders are the truth</div>",
             "<div class='cards'>" + "".join(f"<div class='card'><b>{_e(v)}</b><span>{_e(k)}</span></div>"
                                             for v, k in cards) + "</div>",
             "<section><h2>Per class</h2>" + _table(
                 ["class", "precision", "recall", "F1", "images"],
                 [[name, _f(m["precision"]), _f(m["recall"]), _f(m["f1"]), m["support"]]
                  for name, m in report["per_class"].items()], numeric={1, 2, 3, 4}) + "</section>",
             f"<section><h2>Confusion matrix</h2>{_img(out / 'confusion_matrix.png', 'confusion matrix')}</section>",
             f"<section><h2>Misclassified images ({len(errors)})</h2>{_img(out / 'errors.png', 'misclassified')}"
             + (_table(["file", "true", "predicted", "probability"],
                       [[e["file"], e["true"], e["predicted"], _f(e["probability"])] for e in errors[:50]],
                       numeric={3}) if errors else "") + "</section>",
             "</main></body></html>\n"]
    return "\n".join(parts)


def _advisor(advice: dict | None) -> list[str]:
    """Is the data enough: per-class figures, warnings, and the learning curve's answer with its uncertainty."""
    if not advice:
        return []
    rows = [[name, c["train_images"], c["duplicates"], _pct(c["share_of_largest"]),
             "–" if c["smallest_side"] is None else f"{c['smallest_side']} px"]
            for name, c in advice["classes"].items()]
    warnings = "".join(f"<p class='warn'>{_e(w)}</p>" for w in advice.get("warnings", []))
    curve = advice.get("learning_curve") or {}
    points = curve.get("curve") or []
    drawn = _table(["training images", "validation accuracy"],
                   [[f"{p['images']:,}", _pct(p["accuracy"])] for p in points], numeric={0, 1}) if points else ""
    return ["<section><h2>Is the data enough?</h2>" + _table(
        ["class", "training images", "in duplicate groups", "share of the largest class", "smallest side"], rows,
        numeric={1, 2, 3, 4}) + warnings + f"<p><b>More data:</b> {_e(curve.get('text', ''))}.</p>"
        + ("<p>The learning curve: a linear classifier on the trained network's features, trained on nested "
           "fractions of the training images and scored on validation images.</p>" + drawn if points else "")
        + "</section>"]


def _calibration(out: Path, cal: dict | None) -> list[str]:
    if not cal:
        return ["<section><h2>Confidence</h2><p>Not calibrated: no validation images to fit a temperature on.</p>"
                "</section>"]
    suggested = cal["suggested"]
    rows = [[name, _f(cal[key]["ece"]), _f(cal[key]["nll"])] for key, name in (("before", "before"),
                                                                                ("after", "after scaling"))]
    answer = (f"<p>For {_pct(suggested['target_accuracy'])} accuracy, answer only at confidence "
              f"{suggested['threshold']:.3f} or more: that answers {_pct(suggested['coverage'])} of the "
              f"{_e(cal['split'])} images (labels.json: <code>calibration.min_confidence</code>; "
              f"<code>predict --min-confidence</code>).</p>" if suggested["threshold"] is not None
              else f"<p>No confidence threshold reaches {_pct(suggested['target_accuracy'])} accuracy on the "
                   f"{_e(cal['split'])} images.</p>")
    return [f"<section><h2>Confidence (temperature {cal['temperature']:.3f})</h2><p>The model's probabilities are "
            f"calibrated by temperature scaling fitted on the validation images and built into the saved model. "
            f"Expected calibration error and negative log-likelihood on {cal['images']} {_e(cal['split'])} "
            f"images:</p>" + _table(["", "ECE", "NLL"], rows, numeric={1, 2})
            + (f"<p class='warn'>{_e(cal['note'])}.</p>" if cal.get("note") else "") + answer
            + _img(out / "calibration.png", "reliability and coverage") + "</section>"]


def _exports(exports: dict | None) -> list[str]:
    if not exports:
        return []

    def num(value, fmt):
        return "–" if value is None else format(value, fmt)

    rows = [[r["format"], r["file"], f"{r['size_bytes'] / 1e6:.2f} MB", num(r.get("load_seconds"), ".2f"),
             num(r.get("images_per_second"), ",.0f"), f"{r['latency_ms']:.2f}", _pct(r["accuracy"]),
             _pct(r["agreement"]), num(r.get("max_abs_diff"), ".1e"), "yes" if r.get("ok", True) else "NO"]
            for r in exports["rows"]]
    warnings = "".join(f"<p class='warn'>{_e(w)}</p>" for w in exports.get("warnings", []))
    notes = "".join(f"<p>{_e(r['format'])} is checked in float32; left at this CPU's default precision "
                    f"({_e(d['precision'])}) it agrees on {_pct(d['agreement'])} (largest probability difference "
                    f"{d['max_abs_diff']:.1e}).</p>"
                    for r in exports["rows"] if (d := r.get("default_precision")))
    return [f"<section><h2>Exports</h2><p>Each file loaded and run on {exports['images']} {_e(exports['split'])} "
            "images on this machine, as a user's program would: seconds to load, images per second (batches of "
            "64), milliseconds for one image, accuracy, how often its top answer is model.keras's, and the largest "
            "difference in any probability. Float formats must agree on "
            f"{_pct(exports.get('float_agreement_required', 0.995))} of the answers; tflite_int8 may lose "
            f"{100 * exports.get('int8_max_accuracy_loss', 0.01):.0f} point of accuracy.</p>" + warnings
            + _table(["format", "file", "size", "load s", "images/s", "ms per image", "accuracy", "agreement",
                      "max prob. diff.", "ok"], rows, numeric={2, 3, 4, 5, 6, 7, 8}) + notes + "</section>"]


def _audit(out: Path, audit: dict | None) -> list[str]:
    if not audit:
        return []
    rows = [["images examined", audit["images"]], ["duplicate groups (exact / near)",
                                                   f"{audit['duplicate_groups']} ({audit['exact_groups']} / "
                                                   f"{audit['near_groups']})"],
            ["copies", f"{audit['duplicate_images']} ({_pct(audit['duplicate_fraction'])})"],
            ["conflicting labels (groups)", audit["conflicts"]],
            ["left out: conflicting / copies of held-out images",
             f"{len(audit['excluded'])} / {len(audit['excluded_as_copies_of_held_out_images'])}"],
            ["groups split across train and held-out", audit["groups_straddling_splits"]],
            ["class imbalance (largest / smallest)", audit["imbalance_ratio"]],
            ["greyscale images", _pct(audit["grey_fraction"])], ["audit time", f"{audit['seconds']:.1f} s"]]
    if audit.get("aspect_ratio"):
        a = audit["aspect_ratio"]
        rows.append(["aspect ratio (width / height: min, median, max)", f"{a['min']}, {a['median']}, {a['max']}"])
    body = _table(["", ""], rows)
    if audit["groups"]:
        body += ("<p>Duplicate groups, conflicts first (a red label is a conflict); every group is in dataset.json. "
                 "Each group is kept on one side of the splits.</p>" + _img(out / "duplicates.png", "duplicates"))
    return [f"<section><h2>Dataset audit</h2>{body}</section>"]


def _budget(budget: dict | None) -> list[str]:
    if not budget:
        return []
    plan = budget["plan"]
    rows = [["time budget", f"{budget['seconds']:.0f} s"], ["used", f"{budget['used_seconds']:.0f} s"],
            ["before training (start-up, scan, audit, planning)", f"{plan['used_before_training']:.0f} s"],
            ["planned for training", f"{plan['training_seconds']:.0f} s"],
            ["kept for evaluation, report and exports", f"{plan['reserve']:.0f} s"
             + (f" (took {budget['after_training_seconds']:.0f} s)" if "after_training_seconds" in budget else "")],
            ["input", f"{'×'.join(map(str, plan['target_size']))}×{plan['channels']}"],
            ["batch size", plan["batch_size"]], ["filters", plan["filters"] or "default"],
            ["measured training speed", f"{plan['images_per_second']:.0f} images/s"],
            ["planned epochs", plan["epochs"]], ["ended by", budget["stopped_by"]]]
    tried = _table(["input", "channels", "filters", "batch", "images/s", "epochs that fit"],
                   [[c["target_size"], c["channels"], c["filters"], c["batch_size"], c["images_per_second"],
                     c["epochs_that_fit"]] for c in plan["candidates"]], numeric={3, 4, 5})
    replans = "".join(f"<li>after epoch {r['after_epoch']} ({r['epoch_seconds']:.1f} s): {r['was']} → "
                      f"{r['planned_epochs']} epochs</li>" for r in plan["replans"])
    return ["<section><h2>Time budget</h2>" + _table(["", ""], rows) + "<p>Configurations measured:</p>" + tried
            + (f"<p>Re-planned:</p><ul>{replans}</ul>" if replans else "") + "</section>"]


def _pretrained(trial: dict | None) -> list[str]:
    """Whether a pretrained backbone was tried against the job's own network, each one's validation scores, and which
    was kept; or why none was tried (only said where it could have been: a budgeted job on colour photos)."""
    if not trial or (not trial["tried"] and not trial["why"].startswith("no ImageNet weights")):
        return []
    if not trial["tried"]:
        return [f"<section><h2>Pretrained backbone</h2><p class='warn'>{_e(trial['why'])}</p></section>"]
    rows = [[c["network"], _pct(c.get("accuracy")), _f(c.get("loss")), c["epochs"], f"{c['seconds']:.0f} s"]
            for c in trial["candidates"]]
    return ["<section><h2>Pretrained backbone</h2><p>Both networks trained within the budget; the one with the better "
            f"validation accuracy is the model: <b>{_e(trial.get('kept') or '–')}</b>.</p>"
            + _table(["network", "validation accuracy", "validation loss", "epochs", "training time"], rows,
                     numeric={1, 2, 3, 4}) + "</section>"]


def _f(value, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _size(hw) -> str:
    return f"{hw[0]:g} × {hw[1]:g}"


def _short(path: str, root: str | None) -> str:
    return path[len(root) + 1:] if root and path.startswith(root + "/") else path
