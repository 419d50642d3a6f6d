"""Writing a run's results: every file atomically (temp file in the same folder, then ``os.replace``).

Layout of an output folder::

    model.keras            the trained model (takes raw 0-255 pixels)
    labels.json            class names in output order, input size, colour mode
    metrics.csv            one row per epoch
    history.png            loss and accuracy curves, train and validation
    confusion_matrix.png   on the validation images (training images when there are none)
    report.json            accuracy, per-class precision/recall/F1, confusion matrix
    dataset.json           images per class, split sizes, skipped files with reasons
    summary.json           final metrics, durations, resolved configuration, library versions
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
from pathlib import Path

# Re-exported: the trainer's modules write through `artifacts`; the daemon imports `contract.atomic` itself.
from contract.atomic import atomic_path, clean_json, write_bytes, write_json, write_text  # noqa: F401

THUMBNAIL = (256, 256)  # images in the plots are decoded at least this large (a large JPEG at reduced scale)
METRIC_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds",
                  "images_per_second")


def write_metrics_csv(path: str | os.PathLike, rows: list[dict]) -> Path:
    """One row per epoch with `METRIC_COLUMNS`; absent values (no validation) are left empty."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRIC_COLUMNS})
    return write_text(path, buf.getvalue())


def _figure_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: servers and containers have no display
    import matplotlib.pyplot as plt

    return plt


def plot_history(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Loss and accuracy per epoch, train and validation, side by side."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    try:
        for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
            for prefix, style in (("", "-o"), ("val_", "-s")):
                values = [r.get(prefix + metric) for r in rows]
                if any(v is not None for v in values):
                    ax.plot(epochs, [math.nan if v is None else v for v in values], style, markersize=3,
                            label=("validation " if prefix else "train ") + metric)
            ax.set_xlabel("epoch")
            ax.set_title(metric)
            ax.grid(alpha=0.3)
            ax.legend()
        axes[1].set_ylim(0, 1.02)
        return write_bytes(path, _figure_bytes(fig))
    finally:
        plt.close(fig)


def plot_confusion(path: str | os.PathLike, matrix: list[list[int]], labels: list[str], title: str) -> Path:
    """A confusion matrix heat map with counts, true classes as rows."""
    plt = _pyplot()
    n = len(labels)
    size = min(4 + 0.45 * n, 30)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    try:
        im = ax.imshow(matrix, cmap="Blues")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_xticks(range(n), labels, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
        ax.set_yticks(range(n), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
        if n <= 30:
            top = max((max(r) for r in matrix), default=0) or 1
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, str(matrix[i][j]), ha="center", va="center", fontsize=8,
                            color="white" if matrix[i][j] > top / 2 else "black")
        return write_bytes(path, _figure_bytes(fig))
    finally:
        plt.close(fig)


def plot_errors(path: str | os.PathLike, errors: list[dict], color_mode: str = "rgb") -> Path:
    """A grid of misclassified images, each titled with its true and predicted class."""
    from trainer.data.images import BadImage, load_rgb

    plt = _pyplot()
    if not errors:
        fig, ax = plt.subplots(figsize=(5, 1.6))
        ax.axis("off")
        ax.text(0.5, 0.5, "no misclassified held-out images", ha="center", va="center", fontsize=12)
    else:
        cols = min(5, len(errors))
        rows = math.ceil(len(errors) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, e in zip(axes.flat, errors, strict=False):
            try:
                image = load_rgb(e["file"], 1 if color_mode == "grayscale" else 3, THUMBNAIL)
                ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if color_mode == "grayscale"
                          else None)
            except BadImage:
                ax.text(0.5, 0.5, "unreadable", ha="center")
            ax.set_title(f"true: {e['true']}\npred: {e['predicted']} ({e['probability']:.2f})", fontsize=8,
                         color="firebrick")
    try:
        return write_bytes(path, _figure_bytes(fig))
    finally:
        plt.close(fig)


def save_model(path: str | os.PathLike, model) -> Path:
    """Save a Keras model atomically. It must hold Keras' own layers only: the file leaves dropfit, and a layer of
    ours would make ``keras.saving.load_model`` fail anywhere dropfit is not installed.

    Raises:
        ValueError: naming the layers that are not Keras' own.
    """
    foreign = sorted({f"{type(layer).__module__}.{type(layer).__name__}" for layer in _all_layers(model)
                      if not type(layer).__module__.startswith("keras.")})
    if foreign:
        raise ValueError(f"{path}: the model holds layers that are not Keras' own ({', '.join(foreign)}); it would "
                         "not load without dropfit")
    with atomic_path(path) as tmp:
        model.save(tmp)
    return Path(path)


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):  # a nested model (a backbone)
            yield from _all_layers(layer)


def library_versions() -> dict[str, str]:
    """Versions of the libraries a result depends on, for summary.json."""
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("dropfit", "tensorflow", "keras", "numpy", "pillow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def plot_calibration(path: str | os.PathLike, calibration: dict) -> Path:
    """Reliability diagram (confidence against accuracy, before and after temperature scaling) and the
    coverage/accuracy curve ("answer only above confidence t")."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    try:
        ax = axes[0]
        ax.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
        for name, style in (("before", "-o"), ("after", "-s")):
            bins = [b for b in calibration[f"reliability_{name}"] if b["count"]]
            ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], style, markersize=3,
                    label=f"{name}: ECE {calibration[name]['ece']:.3f}")
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"reliability (temperature {calibration['temperature']:.2f})")
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend()
        ax = axes[1]
        curve = calibration["coverage"]
        ax.plot([c["coverage"] for c in curve], [c["accuracy"] for c in curve], "-")
        suggested = calibration.get("suggested") or {}
        if suggested.get("threshold") is not None:
            ax.axhline(suggested["target_accuracy"], linestyle=":", color="grey")
            ax.plot([suggested["coverage"]], [suggested["target_accuracy"]], "o",
                    label=f"confidence >= {suggested['threshold']:.3f}")
            ax.legend()
        ax.set_xlabel("share of images answered")
        ax.set_ylabel("accuracy of those answers")
        ax.set_title("answer only above a confidence")
        ax.grid(alpha=0.3)
        return write_bytes(path, _figure_bytes(fig))
    finally:
        plt.close(fig)


def plot_groups(path: str | os.PathLike, groups: list[dict], root: str, color_mode: str = "rgb",
                per_row: int = 6) -> Path:
    """Duplicate groups of the audit, one per row: each image titled with its label and split."""
    from trainer.data.images import BadImage, load_rgb

    plt = _pyplot()
    rows = max(1, len(groups))
    fig, axes = plt.subplots(rows, per_row, figsize=(1.9 * per_row, 2.2 * rows), squeeze=False)
    try:
        for ax in axes.flat:
            ax.axis("off")
        if not groups:
            axes[0][0].text(0, 0.5, "no duplicates", fontsize=12)
        for r, group in enumerate(groups):
            for c, (file, label) in enumerate(list(zip(group["files"], group["labels"], strict=True))[:per_row]):
                ax = axes[r][c]
                try:
                    image = load_rgb(os.path.join(root, file), 1 if color_mode == "grayscale" else 3, THUMBNAIL)
                    ax.imshow(image[..., 0] if image.shape[-1] == 1 else image,
                              cmap="gray" if image.shape[-1] == 1 else None)
                except BadImage:
                    ax.text(0.5, 0.5, "unreadable", ha="center")
                ax.set_title(label, fontsize=8, color="firebrick" if group["conflict"] else "black")
        return write_bytes(path, _figure_bytes(fig))
    finally:
        plt.close(fig)


def write_suspects_csv(path: str | os.PathLike, suspects: list[dict], root: str | None) -> Path:
    """suspects.csv: file, given label, predicted label, confidence — the held-out images whose label the model
    contradicts most confidently, first."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file", "given_label", "predicted_label", "confidence"])
    for s in suspects:
        file = os.path.relpath(s["file"], root) if root and s["file"].startswith(root) else s["file"]
        writer.writerow([file, s["true"], s["predicted"], f"{s['probability']:.4f}"])
    return write_text(path, buf.getvalue())
