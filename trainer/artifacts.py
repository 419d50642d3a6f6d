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

# Re-exported: the trainer's modules write through `artifacts`; the daemon imports `trainer.atomic` itself.
from trainer.atomic import atomic_path, clean_json, write_bytes, write_json, write_text  # noqa: F401

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
    from trainer.images import BadImage, load_rgb

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
                image = load_rgb(e["file"], 1 if color_mode == "grayscale" else 3)
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
    """Save a Keras model atomically."""
    with atomic_path(path) as tmp:
        model.save(tmp)
    return Path(path)


def library_versions() -> dict[str, str]:
    """Versions of the libraries a result depends on, for summary.json."""
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("dropfit", "tensorflow", "keras", "numpy", "pillow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out
