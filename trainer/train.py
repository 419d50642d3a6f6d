"""`train_cnn`: scan a class-per-folder dataset, build the input pipeline and the network, train, write the results."""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from trainer import artifacts, results
from trainer.backbones import has_backbone, set_backbone_trainable
from trainer.callbacks import (
    AtomicBackupAndRestore,
    BestWeights,
    EpochRecorder,
    EventHook,
    StopOnRequest,
    TrainingInterrupted,
    load_json,
)
from trainer.data import DecodeFailures, make_dataset, plan_cache
from trainer.hardware import PRECISIONS, configure
from trainer.model import ARCHITECTURES, DEFAULT_AUGMENTATION, OPTIMIZERS, build_model, compile_model
from trainer.predict import labels_and_predictions
from trainer.report import classification_report
from trainer.scan import DatasetError, auto_target_size, scan_csv, scan_directory, shuffled, split

log = logging.getLogger(__name__)

__all__ = ["TrainingInterrupted", "train_cnn"]


@dataclass
class Phase:
    name: str
    epochs: int  # epochs in this phase
    learning_rate: float
    backbone_trainable: bool
    fine_tune_layers: int | None = None


def train_cnn(train_directory, target_size=(200, 200), classes=None, batch_size=32, num_epochs=20, num_classes=None,
              verbose=0, *, validation_split=0.2, validation_directory=None, test_split=0.0, test_directory=None,
              labels_csv=None, color_mode="rgb", seed=1337, architecture="recipe", optimizer="rmsprop",
              learning_rate=1e-3, momentum=0.0, filters=None, dense_units=512, dropout=None, batch_norm=False,
              augmentation=None, weights=None, fine_tune_epochs=0, fine_tune_learning_rate=1e-5,
              fine_tune_layers=None, early_stopping_patience=None, reduce_lr_patience=None, reduce_lr_factor=0.5,
              min_learning_rate=1e-6, class_weight=None, label_smoothing=0.0, restore_best_weights=True,
              exports=(), precision="auto", jit_compile="auto", multi_gpu=False,
              callbacks: Sequence | None = None, output_dir=None, work_dir=None, cache="auto",
              on_event: EventHook | None = None, stop_event: threading.Event | None = None,
              metadata: dict | None = None) -> keras.Model:
    """Train an image classifier on a folder with one subfolder of images per class.

    The classic two lines still work, and with no other arguments train the classic network::

        model = train_cnn("data/train", target_size=(200, 200), num_epochs=20)
        probabilities = model.predict(raw_pixels)   # raw 0-255 pixels: rescaling is inside the model

    dropfit's better defaults (what an empty job.yaml gives) are ``target_size="auto", architecture="cnn",
    optimizer="adam", augmentation=True, early_stopping_patience=10, reduce_lr_patience=4,
    class_weight="balanced"``.

    Expected layout (hidden files and folders are ignored; class folders are searched recursively)::

        train_directory/
        ├── class_a/
        │   ├── a_001.jpg
        │   └── a_002.png
        └── class_b/
            └── b_001.webp

    Args:
        train_directory: dataset root with one subfolder per class (or the image folder for ``labels_csv``).
        target_size: ``(height, width)`` images are resized to, or ``"auto"`` to choose from the images' median
            size (at most 224, at least 28 pixels a side).
        classes: train on these classes only, in this order; default every subfolder, sorted by name.
        batch_size: images per training step; the last batch of an epoch may be smaller, none is dropped.
        num_epochs: passes over the training images (for transfer learning: of the frozen-backbone phase).
        num_classes: optional check; derived from the data, and a different value raises ``ValueError``.
        verbose: Keras ``fit`` verbosity (0 silent, 1 progress bar, 2 one line per epoch).
        validation_split: fraction of each class held out for validation (stratified, by ``seed``); 0 for none.
        validation_directory: a separate folder of validation images; takes precedence over ``validation_split``.
        test_split: fraction of each class held out for the final test (never seen in training or model choice).
        test_directory: a separate folder of test images; takes precedence over ``test_split``.
        labels_csv: CSV with columns ``filename,label`` (paths relative to ``train_directory``) instead of folders.
        color_mode: ``"rgb"`` (3 channels) or ``"grayscale"`` (1 channel).
        seed: fixes the splits, the shuffling, the augmentation and the weight initialisation.
        architecture: ``"recipe"``, ``"cnn"`` or a backbone (``"mobilenet_v3_small"``, ``"mobilenet_v3_large"``,
            ``"efficientnet_b0"``, ``"resnet50"``).
        optimizer: ``"rmsprop"`` (the recipe), ``"adam"`` or ``"sgd"``, or a ``keras.optimizers.Optimizer``.
        learning_rate: the optimizer's learning rate (recipe: 1e-3).
        momentum: momentum for ``sgd`` and ``rmsprop``.
        filters: filters of each conv block (``recipe``, ``cnn``); blocks that do not fit a small input are dropped.
        dense_units: units of the recipe's hidden Dense layer.
        dropout: dropout before the output layer (default: 0 for ``recipe``, 0.3 for ``cnn``, 0.2 for backbones).
        batch_norm: batch normalisation after each convolution (``recipe``; ``cnn`` always has it).
        augmentation: ``True`` for the defaults, or a dict with ``flip`` (``none``/``horizontal``/``vertical``/
            ``both``), ``rotation``, ``zoom``, ``translation``, ``contrast``; layers inside the model, active only
            while training.
        weights: backbone weights: ``None``, ``"imagenet"`` (downloaded by Keras) or a weights file path.
        fine_tune_epochs: with pretrained ``weights``, epochs of a second phase that unfreezes the backbone.
        fine_tune_learning_rate: learning rate of that phase.
        fine_tune_layers: unfreeze only the backbone's last N layers (default all).
        early_stopping_patience: stop after this many epochs without a lower validation loss (None: never).
        reduce_lr_patience: divide the learning rate by ``1/reduce_lr_factor`` after this many epochs without a
            lower validation loss (None: never), down to ``min_learning_rate``.
        class_weight: ``"balanced"`` weighs classes by inverse frequency; ``None`` or a ``{index: weight}`` dict.
        label_smoothing: label smoothing of the cross-entropy loss.
        restore_best_weights: with validation data, return the weights of the epoch with the lowest validation
            loss rather than those of the last epoch.
        exports: formats to export beside ``model.keras`` (``"savedmodel"``, ``"tflite"``), each loaded back and
            checked to predict like the Keras model; needs ``output_dir``.
        callbacks: extra ``keras.callbacks.Callback`` objects for ``fit``.
        output_dir: if given, every artifact is written there (see `trainer.results`).
        work_dir: if given, training state is backed up there after each epoch and a rerun resumes from it.
        precision: ``"auto"`` (mixed float16 on Tensor Core GPUs, else float32), ``"float32"``,
            ``"mixed_float16"`` or ``"mixed_bfloat16"``.
        jit_compile: XLA: ``"auto"`` (on GPUs; measured slower on CPU), True or False.
        multi_gpu: train on all visible GPUs with ``MirroredStrategy`` (``batch_size`` is then the global batch).
        cache: where decoded images are kept between epochs: ``"auto"`` (memory, or files in ``work_dir`` when
            they would take more than half the available memory), ``"memory"``, ``"disk"`` or ``"none"``.
        on_event: called as ``on_event(name, payload)`` for ``started``, ``epoch_end`` and ``finished``.
        stop_event: when set, training stops at the next batch and raises `TrainingInterrupted`.
        metadata: extra JSON-ready fields recorded in ``summary.json`` (the command line records the job spec).

    Returns:
        The trained ``keras.Model``. ``model.class_names`` lists the class of each output, in order.

    Raises:
        ValueError: for invalid arguments, and `trainer.scan.DatasetError` (a ``ValueError``) for unusable data.
        TrainingInterrupted: when ``stop_event`` was set.
    """
    _validate(target_size=target_size, batch_size=batch_size, num_epochs=num_epochs, num_classes=num_classes,
              verbose=verbose, validation_split=validation_split, test_split=test_split, color_mode=color_mode,
              seed=seed, architecture=architecture, optimizer=optimizer, learning_rate=learning_rate,
              filters=filters, dense_units=dense_units, dropout=dropout, callbacks=callbacks, classes=classes,
              class_weight=class_weight, fine_tune_epochs=fine_tune_epochs, exports=exports, output_dir=output_dir,
              precision=precision, cache=cache)
    emit = on_event or (lambda name, payload: None)
    started = time.time()
    channels = 1 if color_mode == "grayscale" else 3
    if augmentation is True:
        augmentation = dict(DEFAULT_AUGMENTATION)

    # --- data --------------------------------------------------------------------------------------------------
    scan = scan_csv(train_directory, labels_csv, classes) if labels_csv is not None \
        else scan_directory(train_directory, classes)
    class_names = scan.class_names
    if num_classes is not None and num_classes != len(class_names):
        raise DatasetError(f"num_classes={num_classes} does not match the {len(class_names)} classes found in "
                           f"{str(train_directory)!r}: {class_names}. Leave num_classes out to derive it.")
    pool = scan.samples
    extra_scans = {}
    if test_directory is not None:
        extra_scans["test"] = _side_scan(test_directory, class_names, "test_directory")
        test_samples = extra_scans["test"].samples
    else:
        pool, test_samples = split(pool, test_split, seed, salt="test/")
    if validation_directory is not None:
        extra_scans["validation"] = _side_scan(validation_directory, class_names, "validation_directory")
        train_samples, val_samples = pool, extra_scans["validation"].samples
    else:
        train_samples, val_samples = split(pool, validation_split, seed)
    if target_size == "auto":
        target_size = auto_target_size(train_samples)
        log.info("target_size auto: %dx%d from the images' median size", *target_size)
    target_size = (int(target_size[0]), int(target_size[1]))
    dataset_info = results.dataset_info(scan, extra_scans, train_samples, val_samples, test_samples)
    log.info("%d classes; %d training, %d validation, %d test images; %d file(s) skipped", len(class_names),
             len(train_samples), len(val_samples), len(test_samples), len(dataset_info["skipped"]))

    keras.utils.set_random_seed(seed)
    runtime = configure(precision, jit_compile, multi_gpu)
    failures = DecodeFailures(scan.root)
    scratch = None
    if work_dir is None and cache in ("auto", "disk"):
        scratch = tempfile.TemporaryDirectory(prefix="dropfit-cache-")
    cache_mode, cache_dir = plan_cache(cache, len(train_samples) + len(val_samples), target_size, channels,
                                       Path(work_dir) / "cache" if work_dir is not None else
                                       (scratch.name if scratch else None))

    def dataset(samples, name, shuffle=False):
        where = {"memory": True, "none": False}.get(cache_mode) or str(Path(cache_dir) / name)
        return make_dataset(shuffled(samples, seed) if shuffle else samples, num_classes=len(class_names),
                            target_size=target_size, batch_size=batch_size, channels=channels, shuffle=shuffle,
                            seed=seed, cache=where, failures=failures)

    train_ds = dataset(train_samples, "train", shuffle=True)
    val_ds = dataset(val_samples, "val") if val_samples else None

    # --- model -------------------------------------------------------------------------------------------------
    with runtime.building():
        model = build_model((*target_size, channels), len(class_names), architecture=architecture,
                            filters=filters, dense_units=dense_units, dropout=dropout, batch_norm=batch_norm,
                            augmentation=augmentation, weights=weights, seed=seed)
    pretrained = has_backbone(model) and weights is not None
    phases = [Phase("train" if not pretrained else "head", num_epochs, learning_rate, not pretrained)]
    if pretrained and fine_tune_epochs:
        phases.append(Phase("fine_tune", fine_tune_epochs, fine_tune_learning_rate, True, fine_tune_layers))
    total_epochs = sum(p.epochs for p in phases)
    weights_by_class = _class_weights(class_weight, train_samples, len(class_names))

    # --- training, phase by phase, resumable -------------------------------------------------------------------
    work = Path(work_dir) if work_dir is not None else None
    done_phases, first_epoch, resumed_from, history_rows = 0, 0, 0, []
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
        done_phases, first_epoch, resumed_from = _resume_point(work, phases)
        if resumed_from:
            history_rows = [r for r in load_json(work / "history.json", []) if r.get("epoch", 0) <= resumed_from]
            log.info("resuming after epoch %d of %d", resumed_from, total_epochs)
        if done_phases:
            model.load_weights(work / f"phase{done_phases}.weights.h5")
    recorder = EpochRecorder(len(train_samples), total_epochs, history_rows, work_dir, output_dir, emit)
    best = BestWeights("val_loss", work_dir, resumed_from) if restore_best_weights and val_ds is not None else None
    emit("started", {"classes": class_names, "counts": {n: c["total"] for n, c in dataset_info["counts"].items()},
                     "train_images": len(train_samples), "val_images": len(val_samples),
                     "test_images": len(test_samples), "skipped": len(dataset_info["skipped"]),
                     "epochs": total_epochs, "resumed_from": resumed_from, "target_size": list(target_size),
                     "batch_size": batch_size, "architecture": architecture})
    fit_started = time.time()
    stopped_early = False
    for index, phase in enumerate(phases[done_phases:], start=done_phases):
        set_backbone_trainable(model, phase.backbone_trainable, phase.fine_tune_layers)
        with runtime.building():
            compile_model(model, optimizer, phase.learning_rate, momentum, label_smoothing, runtime.jit_compile)
        end_epoch = first_epoch + phase.epochs
        fit_callbacks = [recorder]
        if work is not None:
            # After the recorder has saved the epoch's row, before the epoch is announced as done.
            fit_callbacks.append(AtomicBackupAndRestore(str(work / f"backup{index + 1}"), double_checkpoint=True))
        if best is not None:
            fit_callbacks.append(best)
        fit_callbacks.append(recorder.announcer)
        early = None
        if val_ds is not None and early_stopping_patience:
            early = keras.callbacks.EarlyStopping("val_loss", patience=early_stopping_patience, min_delta=1e-4)
            fit_callbacks.append(early)
        if val_ds is not None and reduce_lr_patience:
            fit_callbacks.append(keras.callbacks.ReduceLROnPlateau("val_loss", factor=reduce_lr_factor,
                                                                   patience=reduce_lr_patience,
                                                                   min_lr=min_learning_rate))
        if stop_event is not None:
            fit_callbacks.append(StopOnRequest(stop_event, recorder))
        fit_callbacks.extend(callbacks or [])
        log.info("phase %s: epochs %d-%d, learning rate %g", phase.name, first_epoch + 1, end_epoch,
                 phase.learning_rate)
        try:
            model.fit(train_ds, validation_data=val_ds, epochs=end_epoch, initial_epoch=first_epoch,
                      verbose=verbose, callbacks=fit_callbacks, shuffle=False, class_weight=weights_by_class)
        except TrainingInterrupted:
            raise TrainingInterrupted(recorder.completed) from None
        stopped_early = stopped_early or bool(early and early.stopped_epoch)
        if work is not None and index + 1 < len(phases):
            with artifacts.atomic_path(work / f"phase{index + 1}.weights.h5") as tmp:
                model.save_weights(tmp)
            artifacts.write_json(work / "phases.json", {"completed": index + 1, "epoch": recorder.completed})
        # An early-stopped phase ends before end_epoch; the next one continues the epoch count from there.
        first_epoch = recorder.completed
    fit_seconds = time.time() - fit_started
    if scratch is not None:
        scratch.cleanup()
    if augmentation or runtime.precision != "float32" or runtime.replicas > 1:
        # The model users get (and model.keras) is the same network without the training-only augmentation, in
        # float32 and on one device: built-in layers only, so plain keras.models.load_model() reads it anywhere,
        # and nothing random at inference. It is left uncompiled: it is for predicting.
        trained = model
        model = build_model((*target_size, channels), len(class_names), architecture=architecture, filters=filters,
                            dense_units=dense_units, dropout=dropout, batch_norm=batch_norm, augmentation=None,
                            weights=weights, seed=seed)
        model.set_weights(trained.get_weights())
        set_backbone_trainable(model, phases[-1].backbone_trainable, phases[-1].fine_tune_layers)
    if failures.items:
        dataset_info["skipped"].extend({"file": s.path, "reason": s.reason} for s in failures.items)
    model.class_names = list(class_names)

    # --- evaluation on held-out data ---------------------------------------------------------------------------
    evaluations = {}
    for name, samples in (("test", test_samples), ("validation", val_samples)):
        if samples:
            eval_ds = make_dataset(samples, num_classes=len(class_names), target_size=target_size,
                                   batch_size=batch_size, channels=channels, cache=False, with_index=True)
            y_true, y_pred, probs, idx = labels_and_predictions(model, eval_ds, with_details=True)
            evaluations[name] = (classification_report(y_true, y_pred, class_names),
                                 results.misclassified(samples, y_true, y_pred, probs, idx, class_names))
    main_split = next(iter(evaluations), None)
    if main_split is None:
        dataset_info["warnings"].append("no held-out images (validation_split and test_split are 0): the model "
                                        "was not evaluated; the confusion matrix shows training images")
        train_eval = make_dataset(train_samples, num_classes=len(class_names), target_size=target_size,
                                  batch_size=batch_size, channels=channels, cache=False, with_index=True)
        y_true, y_pred, probs, idx = labels_and_predictions(model, train_eval, with_details=True)
        evaluations["train"] = (classification_report(y_true, y_pred, class_names), [])
        main_split = "train"
    report = {"split": main_split, "held_out": main_split != "train", **evaluations[main_split][0],
              "splits": {name: {k: r[k] for k in ("accuracy", "macro_f1", "images")}
                         for name, (r, _) in evaluations.items()}}
    errors = evaluations[main_split][1]
    report["misclassified"] = errors[:100]

    final = history_rows[-1] if history_rows else {}
    summary = {
        "classes": class_names,
        "num_classes": len(class_names),
        "architecture": architecture,
        "epochs": total_epochs,
        "epochs_trained": final.get("epoch", 0),
        "stopped_early": stopped_early,
        "resumed_from": resumed_from,
        "final": {k: final.get(k) for k in artifacts.METRIC_COLUMNS},
        "best_epoch": best.best_epoch if best else None,
        "restored_best_weights": bool(best and best.restored),
        "best_val_accuracy": max((r["val_accuracy"] for r in history_rows if r.get("val_accuracy") is not None),
                                 default=None),
        "evaluation": {"split": main_split, "held_out": report["held_out"], "accuracy": report["accuracy"],
                       "macro_f1": report["macro_f1"], "images": report["images"]},
        "evaluations": report["splits"],
        "durations": {"total_seconds": time.time() - started, "fit_seconds": fit_seconds,
                      "epoch_seconds": [r.get("seconds") for r in history_rows]},
        "seed": seed,
        "config": {"train_directory": str(train_directory), "target_size": list(target_size), "classes": classes,
                   "batch_size": batch_size, "num_epochs": num_epochs, "validation_split": validation_split,
                   "validation_directory": _str(validation_directory), "test_split": test_split,
                   "test_directory": _str(test_directory), "labels_csv": _str(labels_csv), "color_mode": color_mode,
                   "seed": seed, "architecture": architecture,
                   "optimizer": optimizer if isinstance(optimizer, str) else type(optimizer).__name__,
                   "learning_rate": learning_rate, "momentum": momentum,
                   "filters": list(filters) if filters else None, "dense_units": dense_units, "dropout": dropout,
                   "batch_norm": batch_norm, "augmentation": augmentation, "weights": _str(weights),
                   "fine_tune_epochs": fine_tune_epochs, "fine_tune_learning_rate": fine_tune_learning_rate,
                   "early_stopping_patience": early_stopping_patience, "reduce_lr_patience": reduce_lr_patience,
                   "class_weight": class_weight if isinstance(class_weight, (str, type(None))) else "custom",
                   "class_weights": {class_names[i]: w for i, w in (weights_by_class or {}).items()},
                   "label_smoothing": label_smoothing, "restore_best_weights": restore_best_weights,
                   "exports": list(exports), "precision": precision, "jit_compile": jit_compile,
                   "multi_gpu": multi_gpu, "cache": cache if isinstance(cache, (str, bool)) else str(cache)},
        "parameters": int(model.count_params()),
        "runtime": {**runtime.to_json(), "cache": cache_mode},
        "versions": artifacts.library_versions(),
        **(metadata or {}),
    }
    paths = {}
    if output_dir is not None:
        paths = results.write_all(Path(output_dir), model, class_names, target_size, color_mode, history_rows,
                                  report, errors, dataset_info, summary, exports,
                                  sample_images=[s.path for s in (test_samples or val_samples or train_samples)[:8]])
    emit("finished", {"artifacts": {k: str(v) for k, v in paths.items()}, "final": summary["final"],
                      "epochs_trained": summary["epochs_trained"],
                      "best_val_accuracy": summary["best_val_accuracy"], "evaluation": summary["evaluation"],
                      "seconds": summary["durations"]["total_seconds"]})
    return model


# --- internals ---------------------------------------------------------------------------------------------------

def _str(value):
    return None if value is None else str(value)


def _side_scan(directory, class_names, what):
    side = scan_directory(directory, class_names, allow_missing=True, what=what)
    if not side.samples:
        raise DatasetError(f"{what} {str(directory)!r} holds no usable image of the classes {class_names}")
    return side


def _class_weights(class_weight, samples, num_classes) -> dict[int, float] | None:
    if class_weight is None or class_weight == "none":
        return None
    if isinstance(class_weight, dict):
        return {int(k): float(v) for k, v in class_weight.items()}
    counts = Counter(s.label for s in samples)
    total = sum(counts.values())
    return {i: round(total / (num_classes * counts[i]), 6) if counts.get(i) else 1.0 for i in range(num_classes)}


def _resume_point(work: Path, phases: list[Phase]) -> tuple[int, int, int]:
    """From the work dir of an interrupted run: (phases fully done, epoch the next phase starts at, epochs done)."""
    meta = load_json(work / "phases.json", {})
    done = min(int(meta.get("completed", 0)), len(phases) - 1)
    phase_start = int(meta.get("epoch", 0)) if done else 0
    completed = phase_start
    backup = work / f"backup{done + 1}"
    if (backup / "latest.weights.h5").exists():
        completed = max(completed, int(load_json(backup / "training_metadata.json", {}).get("epoch", 0)))
    return done, phase_start, completed


def _validate(*, target_size, batch_size, num_epochs, num_classes, verbose, validation_split, test_split, color_mode,
              seed, architecture, optimizer, learning_rate, filters, dense_units, dropout, callbacks, classes,
              class_weight, fine_tune_epochs, exports, output_dir, precision, cache) -> None:
    def positive_int(name, value, zero_ok=False):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (0 if zero_ok else 1):
            kind = "a non-negative" if zero_ok else "a positive"
            raise ValueError(f"{name} must be {kind} integer. Received: {name}={value!r}")

    def fraction(name, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"{name} must be a number in [0, 1). Received: {name}={value!r}")

    if target_size != "auto" and (
            not isinstance(target_size, (tuple, list)) or len(target_size) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 4 for v in target_size)):
        raise ValueError(f"target_size must be 'auto' or a (height, width) pair of integers >= 4. "
                         f"Received: target_size={target_size!r}")
    positive_int("batch_size", batch_size)
    positive_int("num_epochs", num_epochs)
    positive_int("fine_tune_epochs", fine_tune_epochs, zero_ok=True)
    if num_classes is not None:
        positive_int("num_classes", num_classes)
    if verbose not in (0, 1, 2, "auto"):
        raise ValueError(f"verbose must be 0, 1, 2 or 'auto'. Received: verbose={verbose!r}")
    fraction("validation_split", validation_split)
    fraction("test_split", test_split)
    if validation_split + test_split >= 1:
        raise ValueError(f"validation_split + test_split must be below 1. Received: {validation_split} + {test_split}")
    if color_mode not in ("rgb", "grayscale"):
        raise ValueError(f"color_mode must be 'rgb' or 'grayscale'. Received: color_mode={color_mode!r}")
    positive_int("seed", seed, zero_ok=True)
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}. Received: architecture={architecture!r}")
    if isinstance(optimizer, str) and optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS} or a keras optimizer. "
                         f"Received: optimizer={optimizer!r}")
    if not isinstance(learning_rate, (int, float)) or not learning_rate > 0:
        raise ValueError(f"learning_rate must be a positive number. Received: learning_rate={learning_rate!r}")
    if filters is not None and (not filters or not all(isinstance(f, (int, np.integer)) and f > 0 for f in filters)):
        raise ValueError(f"filters must be a non-empty list of positive integers. Received: filters={filters!r}")
    positive_int("dense_units", dense_units)
    if dropout is not None:
        fraction("dropout", dropout)
    if callbacks is not None and not all(isinstance(c, keras.callbacks.Callback) for c in callbacks):
        raise ValueError(f"callbacks must be a list of keras.callbacks.Callback. Received: callbacks={callbacks!r}")
    if classes is not None and (isinstance(classes, str) or len(classes) < 2 or len(set(classes)) != len(classes)):
        raise ValueError(f"classes must be a list of at least 2 distinct class names. Received: classes={classes!r}")
    if not (class_weight in (None, "none", "balanced") or isinstance(class_weight, dict)):
        raise ValueError(f"class_weight must be 'balanced', None or a dict. Received: class_weight={class_weight!r}")
    unknown = [e for e in exports if e not in ("savedmodel", "tflite")]
    if unknown or isinstance(exports, str):
        raise ValueError(f"exports must be a list of 'savedmodel' and/or 'tflite'. Received: exports={exports!r}")
    if exports and output_dir is None:
        raise ValueError("exports need an output_dir to write to")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}. Received: precision={precision!r}")
    if cache not in ("auto", "memory", "disk", "none", True, False):
        raise ValueError(f"cache must be 'auto', 'memory', 'disk' or 'none'. Received: cache={cache!r}")

