"""`train_cnn`: scan a class-per-folder dataset, build the input pipeline and the CNN, train, write the artifacts."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np

from trainer import artifacts
from trainer.callbacks import (
    AtomicBackupAndRestore,
    BestWeights,
    EpochRecorder,
    EventHook,
    StopOnRequest,
    TrainingInterrupted,
    completed_epochs,
    load_json,
)
from trainer.data import DecodeFailures, make_dataset
from trainer.model import OPTIMIZERS, build_model, compile_model
from trainer.predict import labels_and_predictions
from trainer.report import classification_report
from trainer.scan import DatasetError, Scan, relative, scan_csv, scan_directory, shuffled, split

log = logging.getLogger(__name__)

def train_cnn(train_directory, target_size=(200, 200), classes=None, batch_size=32, num_epochs=20, num_classes=None,
              verbose=0, *, validation_split=0.2, validation_directory=None, labels_csv=None, color_mode="rgb",
              seed=1337, optimizer="rmsprop", learning_rate=1e-3, momentum=0.0, filters=(16, 32, 64, 64, 64),
              dense_units=512, dropout=0.0, batch_norm=False, callbacks: Sequence | None = None, output_dir=None,
              work_dir=None, restore_best_weights=True, cache=True, on_event: EventHook | None = None,
              stop_event: threading.Event | None = None, metadata: dict | None = None) -> keras.Model:
    """Train a CNN image classifier on a folder with one subfolder of images per class.

    The classic two lines still work::

        model = train_cnn("data/train", target_size=(200, 200), num_epochs=20)
        probabilities = model.predict(raw_pixels)   # raw 0-255 pixels: rescaling is inside the model

    Expected layout (hidden files and folders are ignored; class folders are searched recursively)::

        train_directory/
        ├── class_a/
        │   ├── a_001.jpg
        │   └── a_002.png
        └── class_b/
            └── b_001.webp

    Args:
        train_directory: dataset root with one subfolder per class (or the image folder for ``labels_csv``).
        target_size: ``(height, width)`` images are resized to.
        classes: train on these classes only, in this order; default every subfolder, sorted by name.
        batch_size: images per training step; the last batch of an epoch may be smaller, none is dropped.
        num_epochs: passes over the training images.
        num_classes: optional check; derived from the data, and a different value raises ``ValueError``.
        verbose: Keras ``fit`` verbosity (0 silent, 1 progress bar, 2 one line per epoch).
        validation_split: fraction of each class held out (stratified, deterministic by ``seed``); 0 for none.
        validation_directory: a separate folder of validation images; takes precedence over ``validation_split``.
        labels_csv: CSV with columns ``filename,label`` (paths relative to ``train_directory``) instead of folders.
        color_mode: ``"rgb"`` (3 channels) or ``"grayscale"`` (1 channel).
        seed: fixes the split, the shuffling and the weight initialisation.
        optimizer: ``"rmsprop"`` (the recipe), ``"adam"`` or ``"sgd"``, or a ``keras.optimizers.Optimizer``.
        learning_rate: the optimizer's learning rate (recipe: 1e-3).
        momentum: momentum for ``sgd`` and ``rmsprop``.
        filters: filters of each Conv2D/MaxPool block; blocks that do not fit a small input are dropped.
        dense_units: units of the hidden Dense layer.
        dropout: dropout rate before the output layer.
        batch_norm: batch normalisation after each convolution.
        callbacks: extra ``keras.callbacks.Callback`` objects for ``fit``.
        output_dir: if given, every artifact is written there (see `trainer.artifacts`).
        work_dir: if given, training state is backed up there after each epoch and a rerun resumes from it.
        restore_best_weights: with validation data, return the weights of the epoch with the lowest validation
            loss rather than those of the last epoch.
        cache: cache decoded images in memory (True), in files under this path prefix (str), or not at all.
        on_event: called as ``on_event(name, payload)`` for ``started``, ``epoch_end`` and ``finished``.
        stop_event: when set, training stops at the next batch and raises `TrainingInterrupted`.
        metadata: extra JSON-ready fields recorded in ``summary.json`` (the command line records the job spec).

    Returns:
        The trained ``keras.Model``. ``model.class_names`` lists the class of each output, in order.

    Raises:
        ValueError: for invalid arguments, and `trainer.scan.DatasetError` (a ``ValueError``) for unusable data.
        TrainingInterrupted: when ``stop_event`` was set.
    """
    target_size = _validate(target_size=target_size, batch_size=batch_size, num_epochs=num_epochs,
                            num_classes=num_classes, verbose=verbose, validation_split=validation_split,
                            color_mode=color_mode, seed=seed, optimizer=optimizer, learning_rate=learning_rate,
                            filters=filters, dense_units=dense_units, dropout=dropout, callbacks=callbacks,
                            classes=classes)
    emit = on_event or (lambda name, payload: None)
    started = time.time()
    channels = 1 if color_mode == "grayscale" else 3

    # Data.
    if labels_csv is not None:
        scan = scan_csv(train_directory, labels_csv, classes)
    else:
        scan = scan_directory(train_directory, classes)
    if num_classes is not None and num_classes != len(scan.class_names):
        raise DatasetError(f"num_classes={num_classes} does not match the {len(scan.class_names)} classes found in "
                           f"{str(train_directory)!r}: {scan.class_names}. Leave num_classes out to derive it.")
    val_scan = None
    if validation_directory is not None:
        val_scan = scan_directory(validation_directory, scan.class_names, allow_missing=True,
                                  what="validation_directory")
        if not val_scan.samples:
            raise DatasetError(f"validation_directory {str(validation_directory)!r} holds no usable image of the "
                               f"classes {scan.class_names}")
        train_samples, val_samples = scan.samples, val_scan.samples
    else:
        train_samples, val_samples = split(scan.samples, validation_split, seed)
    class_names = scan.class_names
    dataset_info = _dataset_info(scan, val_scan, train_samples, val_samples)
    log.info("%d classes, %d training and %d validation images, %d file(s) skipped", len(class_names),
             len(train_samples), len(val_samples), len(dataset_info["skipped"]))

    keras.utils.set_random_seed(seed)
    failures = DecodeFailures(scan.root)
    train_ds = make_dataset(shuffled(train_samples, seed), num_classes=len(class_names), target_size=target_size,
                            batch_size=batch_size, channels=channels, shuffle=True, seed=seed,
                            cache=_cache_arg(cache, "train"), failures=failures)
    val_ds = None
    if val_samples:
        val_ds = make_dataset(val_samples, num_classes=len(class_names), target_size=target_size,
                              batch_size=batch_size, channels=channels, cache=_cache_arg(cache, "val"),
                              failures=failures)

    # Model.
    model = build_model((*target_size, channels), len(class_names), filters=tuple(filters), dense_units=dense_units,
                        dropout=dropout, batch_norm=batch_norm)
    if isinstance(optimizer, str):
        compile_model(model, optimizer, learning_rate, momentum)
    else:
        model.compile(optimizer=optimizer, loss="categorical_crossentropy", metrics=["accuracy"])

    # Training, resumable.
    history_rows: list[dict] = []
    fit_callbacks: list = []
    resumed_from = 0
    if work_dir is not None:
        work = Path(work_dir)
        work.mkdir(parents=True, exist_ok=True)
        resumed_from = completed_epochs(work / "backup")
        if resumed_from:
            history_rows = [r for r in load_json(work / "history.json", []) if r.get("epoch", 0) <= resumed_from]
            log.info("resuming after epoch %d of %d", resumed_from, num_epochs)
    recorder = EpochRecorder(len(train_samples), num_epochs, history_rows, work_dir, output_dir, emit)
    fit_callbacks.append(recorder)
    if work_dir is not None:
        # After the recorder has saved the epoch's row, before the epoch is announced as done.
        fit_callbacks.append(AtomicBackupAndRestore(str(Path(work_dir) / "backup"), double_checkpoint=True))
    best = None
    if restore_best_weights and val_ds is not None:
        best = BestWeights("val_loss", work_dir, resumed_from)
        fit_callbacks.append(best)
    fit_callbacks.append(recorder.announcer)
    if stop_event is not None:
        fit_callbacks.append(StopOnRequest(stop_event, recorder))
    fit_callbacks.extend(callbacks or [])

    emit("started", {"classes": class_names, "counts": dataset_info["counts"], "train_images": len(train_samples),
                     "val_images": len(val_samples), "skipped": len(dataset_info["skipped"]), "epochs": num_epochs,
                     "resumed_from": resumed_from, "target_size": list(target_size), "batch_size": batch_size})
    fit_started = time.time()
    try:
        model.fit(train_ds, validation_data=val_ds, epochs=num_epochs, verbose=verbose, callbacks=fit_callbacks,
                  shuffle=False)
    except TrainingInterrupted:
        raise TrainingInterrupted(recorder.completed) from None
    fit_seconds = time.time() - fit_started
    if failures.items:
        dataset_info["skipped"].extend({"file": s.path, "reason": s.reason} for s in failures.items)

    # Evaluation on held-out data when there is some.
    eval_split = "validation" if val_ds is not None else "train"
    eval_ds = val_ds if val_ds is not None else make_dataset(
        train_samples, num_classes=len(class_names), target_size=target_size, batch_size=batch_size,
        channels=channels, cache=False)
    y_true, y_pred = labels_and_predictions(model, eval_ds)
    report = {"split": eval_split, **classification_report(y_true, y_pred, class_names)}

    model.class_names = list(class_names)
    final = history_rows[-1] if history_rows else {}
    summary = {
        "classes": class_names,
        "num_classes": len(class_names),
        "epochs": num_epochs,
        "resumed_from": resumed_from,
        "final": {k: final.get(k) for k in artifacts.METRIC_COLUMNS},
        "best_epoch": best.best_epoch if best else None,
        "restored_best_weights": bool(best and best.restored),
        "best_val_accuracy": max((r["val_accuracy"] for r in history_rows if r.get("val_accuracy") is not None),
                                 default=None),
        "evaluation": {"split": eval_split, "accuracy": report["accuracy"], "macro_f1": report["macro_f1"],
                       "images": report["images"]},
        "durations": {"total_seconds": time.time() - started, "fit_seconds": fit_seconds,
                      "epoch_seconds": [r.get("seconds") for r in history_rows]},
        "config": {"train_directory": str(train_directory), "target_size": list(target_size), "classes": classes,
                   "batch_size": batch_size, "num_epochs": num_epochs, "validation_split": validation_split,
                   "validation_directory": None if validation_directory is None else str(validation_directory),
                   "labels_csv": None if labels_csv is None else str(labels_csv), "color_mode": color_mode,
                   "seed": seed, "optimizer": optimizer if isinstance(optimizer, str) else type(optimizer).__name__,
                   "learning_rate": learning_rate, "momentum": momentum, "filters": list(filters),
                   "dense_units": dense_units, "dropout": dropout, "batch_norm": batch_norm,
                   "restore_best_weights": restore_best_weights},
        "versions": artifacts.library_versions(),
        **(metadata or {}),
    }
    paths = {}
    if output_dir is not None:
        paths = write_artifacts(Path(output_dir), model, class_names, target_size, color_mode, history_rows,
                                report, dataset_info, summary)
    emit("finished", {"artifacts": {k: str(v) for k, v in paths.items()}, "final": summary["final"],
                      "best_val_accuracy": summary["best_val_accuracy"], "evaluation": summary["evaluation"],
                      "seconds": summary["durations"]["total_seconds"]})
    return model


def write_artifacts(out: Path, model, class_names, target_size, color_mode, history_rows, report, dataset_info,
                    summary) -> dict[str, Path]:
    """Write every artifact of a finished run into ``out``; returns their paths by name."""
    out.mkdir(parents=True, exist_ok=True)
    cm = report["confusion_matrix"]
    paths = {
        "model": artifacts.save_model(out / "model.keras", model),
        "labels": artifacts.write_json(out / "labels.json", {"classes": class_names, "target_size": list(target_size),
                                                             "color_mode": color_mode}),
        "metrics": artifacts.write_metrics_csv(out / "metrics.csv", history_rows),
        "history_plot": artifacts.plot_history(out / "history.png", history_rows),
        "confusion_matrix": artifacts.plot_confusion(out / "confusion_matrix.png", cm["matrix"], cm["labels"],
                                                     f"confusion matrix ({report['split']} images)"),
        "report": artifacts.write_json(out / "report.json", report),
        "dataset": artifacts.write_json(out / "dataset.json", dataset_info),
    }
    paths["summary"] = artifacts.write_json(out / "summary.json", summary)
    return paths


# --- internals ---------------------------------------------------------------------------------------------------

def _validate(*, target_size, batch_size, num_epochs, num_classes, verbose, validation_split, color_mode, seed,
              optimizer, learning_rate, filters, dense_units, dropout, callbacks, classes) -> tuple[int, int]:
    def positive_int(name, value):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive integer. Received: {name}={value!r}")

    if isinstance(target_size, (int, np.integer)) and not isinstance(target_size, bool):
        target_size = (target_size, target_size)
    if (not isinstance(target_size, (tuple, list)) or len(target_size) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 4 for v in target_size)):
        raise ValueError(f"target_size must be a (height, width) pair of integers >= 4. "
                         f"Received: target_size={target_size!r}")
    positive_int("batch_size", batch_size)
    positive_int("num_epochs", num_epochs)
    if num_classes is not None:
        positive_int("num_classes", num_classes)
    if verbose not in (0, 1, 2, "auto"):
        raise ValueError(f"verbose must be 0, 1, 2 or 'auto'. Received: verbose={verbose!r}")
    if not isinstance(validation_split, (int, float)) or not 0 <= validation_split < 1:
        raise ValueError(f"validation_split must be a number in [0, 1). "
                         f"Received: validation_split={validation_split!r}")
    if color_mode not in ("rgb", "grayscale"):
        raise ValueError(f"color_mode must be 'rgb' or 'grayscale'. Received: color_mode={color_mode!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer. Received: seed={seed!r}")
    if isinstance(optimizer, str) and optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS} or a keras optimizer. "
                         f"Received: optimizer={optimizer!r}")
    if not isinstance(learning_rate, (int, float)) or not learning_rate > 0:
        raise ValueError(f"learning_rate must be a positive number. Received: learning_rate={learning_rate!r}")
    if not filters or not all(isinstance(f, (int, np.integer)) and f > 0 for f in filters):
        raise ValueError(f"filters must be a non-empty list of positive integers. Received: filters={filters!r}")
    positive_int("dense_units", dense_units)
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a number in [0, 1). Received: dropout={dropout!r}")
    if callbacks is not None and not all(isinstance(c, keras.callbacks.Callback) for c in callbacks):
        raise ValueError(f"callbacks must be a list of keras.callbacks.Callback. Received: callbacks={callbacks!r}")
    if classes is not None and (isinstance(classes, str) or len(classes) < 2 or len(set(classes)) != len(classes)):
        raise ValueError(f"classes must be a list of at least 2 distinct class names. Received: classes={classes!r}")
    return int(target_size[0]), int(target_size[1])


def _cache_arg(cache, name: str):
    return f"{cache}-{name}" if isinstance(cache, str) else bool(cache)


def _dataset_info(scan: Scan, val_scan: Scan | None, train, val) -> dict:
    info = scan.to_json()
    counts = {name: {"total": 0, "train": 0, "validation": 0} for name in scan.class_names}
    for part, samples in (("train", train), ("validation", val)):
        for s in samples:
            entry = counts[scan.class_names[s.label]]
            entry[part] += 1
            entry["total"] += 1
    info["counts"] = counts
    info["train_images"], info["validation_images"] = len(train), len(val)
    if val_scan is not None:
        info["validation_root"] = val_scan.root
        info["skipped"] += [{"file": relative(val_scan.root, s.path), "reason": s.reason} for s in val_scan.skipped]
        info["warnings"] += val_scan.warnings
    for name, c in counts.items():
        if c["train"] < 5:
            info["warnings"].append(f"class {name!r} has only {c['train']} training image(s)")
    return info


