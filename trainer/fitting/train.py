"""`train_cnn`: scan a class-per-folder dataset, build the input pipeline and the network, train, write the results.

The steps, in order: `trainer.data.dataset.load` (scan, audit, split), `_resolve` (what is left on ``auto``: by the
data, and under a ``time_budget`` by measurement, `trainer.fitting.budget`), `_pipelines` (tf.data, cached), `_build`
(network and phases), `_fit` (phase by phase, resumable from ``work_dir``, on the budget's schedule), `_for_inference`
(the model users get), `_evaluate` (held-out images; the temperature fitted and built in,
`trainer.fitting.calibration`), `_summary`; then `trainer.outputs.results.write_all` writes the artifacts.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import keras

from contract.options import TrainOptions, resolve_augmentation
from trainer.data import dataset
from trainer.data.dataset import Dataset
from trainer.data.pipeline import DecodeFailures, make_dataset, plan_cache
from trainer.data.scan import auto_target_size, shuffled
from trainer.fitting import budget, calibration
from trainer.fitting.callbacks import (
    AtomicBackupAndRestore,
    BestWeights,
    EpochRecorder,
    EventHook,
    StopOnRequest,
    TrainingInterrupted,
    load_json,
)
from trainer.fitting.hardware import Runtime, configure
from trainer.network.backbones import has_backbone, set_backbone_trainable
from trainer.network.networks import CNN_FILTERS, RECIPE_FILTERS, build_model, compile_model
from trainer.outputs import artifacts, results
from trainer.outputs.report import classification_report
from trainer.prediction.api import labels_and_predictions

log = logging.getLogger(__name__)
# A held-out image is a label suspect when the calibrated model gives another class at least this probability.
SUSPECT_CONFIDENCE = 0.9

__all__ = ["TrainOptions", "TrainingInterrupted", "train_cnn"]

_RECIPE_DEFAULTS = ((200, 200), None, 32, 20, None)


@dataclass
class Phase:
    name: str
    epochs: int  # epochs in this phase
    learning_rate: float
    backbone_trainable: bool
    fine_tune_layers: int | None = None


@dataclass
class _Fit:
    """How training went."""

    rows: list[dict]
    phases: list[Phase]
    resumed_from: int
    stopped_early: bool
    best: BestWeights | None
    seconds: float
    class_weights: dict[int, float] | None
    budget: object | None = None  # the BudgetSchedule callback, when there is a time budget


def train_cnn(train_directory, target_size=(200, 200), classes=None, batch_size=32, num_epochs=20, num_classes=None,
              verbose=0, *, options: TrainOptions | None = None, callbacks: Sequence | None = None, output_dir=None,
              work_dir=None, on_event: EventHook | None = None, stop_event: threading.Event | None = None,
              metadata: dict | None = None, started_at: float | None = None, **kwargs) -> keras.Model:
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
        options: a `TrainOptions` with every setting below at once (what a job.yaml gives); then leave the
            arguments above and below at their defaults.
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
            while training. ``rotation``/``zoom`` may be ``"auto"`` (the default): 0.05/0.1, or 0 for a
            ``time_budget`` job with 1,000+ training images per class.
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
        output_dir: if given, every artifact is written there (see `trainer.outputs.results`).
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
        started_at: ``time.monotonic()`` when the run really began (the command line's start), for ``time_budget``;
            default: now.

    Returns:
        The trained ``keras.Model``. ``model.class_names`` lists the class of each output, in order.

    Raises:
        ValueError: for invalid arguments, and `trainer.data.scan.DatasetError` (a ``ValueError``) for unusable data.
        TrainingInterrupted: when ``stop_event`` was set.
    """
    options = _options(options, (target_size, classes, batch_size, num_epochs, num_classes), kwargs)
    _check_call(options, verbose, callbacks, output_dir)
    emit = on_event or (lambda name, payload: None)
    started = time.time()
    work = Path(work_dir) if work_dir is not None else None
    clock = budget.Clock.start(options.time_budget, started_at, work) if options.time_budget else None
    data = dataset.load(train_directory, options)
    keras.utils.set_random_seed(options.seed)
    runtime = configure(options.precision, options.jit_compile, options.multi_gpu)
    options, plan = _resolve(options, data, runtime, clock)
    failures = DecodeFailures(data.scan.root)
    with _cache_folder(work_dir, options.cache) as cache_folder:
        train_ds, val_ds, cache_mode = _pipelines(data, options, failures, cache_folder)
        model, phases = _build(data, options, runtime)
        fit = _fit(model, phases, train_ds, val_ds, data, options, runtime, work_dir, output_dir, emit, stop_event,
                   callbacks, verbose, clock, plan)
    model = _for_inference(model, data, options, runtime, phases)
    if failures.items:
        data.info["skipped"].extend({"file": s.path, "reason": s.reason} for s in failures.items)
    report, errors, model = _evaluate(model, data, options)
    model.class_names = list(data.class_names)
    summary = _summary(data, options, runtime, model, fit, report, cache_mode, started, metadata, clock, plan)
    def stamp(summary: dict) -> None:
        summary["durations"]["total_seconds"] = time.time() - started
        if clock is not None:
            summary["budget"]["used_seconds"] = round(clock.used(), 1)

    paths = {}
    if output_dir is not None:
        paths = results.write_all(Path(output_dir), model, data.class_names, data.target_size, options.color_mode,
                                  fit.rows, report, errors, data.info, summary, options.exports,
                                  export_data=_export_data(data, options), stamp=stamp)
    else:
        stamp(summary)
    if clock is not None:
        clock.save(work)
        log.info("time budget: %.0f of %.0f s used", clock.used(), clock.budget)
    emit("finished", {"artifacts": {k: str(v) for k, v in paths.items()}, "final": summary["final"],
                      "warnings": summary.get("warnings", []),
                      "epochs_trained": summary["epochs_trained"],
                      "best_val_accuracy": summary["best_val_accuracy"], "evaluation": summary["evaluation"],
                      "seconds": summary["durations"]["total_seconds"]})
    return model


# --- the steps ---------------------------------------------------------------------------------------------------

def _options(options: TrainOptions | None, recipe_args: tuple, kwargs: dict) -> TrainOptions:
    if options is None:
        names = ("target_size", "classes", "batch_size", "num_epochs", "num_classes")
        try:
            return TrainOptions(**dict(zip(names, recipe_args, strict=True)), **kwargs)
        except TypeError as exc:
            raise TypeError(str(exc).replace("TrainOptions.__init__()", "train_cnn()")) from None
    if kwargs or recipe_args != _RECIPE_DEFAULTS:
        raise ValueError("train_cnn takes either options= or individual training arguments, not both. "
                         f"Received: options and {sorted(kwargs) or 'positional arguments'}")
    return options


def _check_call(options: TrainOptions, verbose, callbacks, output_dir) -> None:
    """The arguments `TrainOptions` cannot check: they are about this call, not about how to train."""
    if verbose not in (0, 1, 2, "auto"):
        raise ValueError(f"verbose must be 0, 1, 2 or 'auto'. Received: verbose={verbose!r}")
    if callbacks is not None and not all(isinstance(c, keras.callbacks.Callback) for c in callbacks):
        raise ValueError(f"callbacks must be a list of keras.callbacks.Callback. Received: callbacks={callbacks!r}")
    if not isinstance(options.optimizer, (str, keras.optimizers.Optimizer)):
        raise ValueError(f"optimizer must be a name or a keras optimizer. Received: optimizer={options.optimizer!r}")
    if options.exports and output_dir is None:
        raise ValueError("exports need an output_dir to write to")


def _resolve(o: TrainOptions, data: Dataset, runtime: Runtime, clock: budget.Clock | None):
    """Settle what is left on ``auto``: input size and channels by the data; under a time budget also the batch
    size, and (by measuring this machine) the network's width and the input size, so that enough epochs fit."""
    grey = data.grey_fraction is not None and data.grey_fraction >= 0.95
    color_mode = o.color_mode if o.color_mode != "auto" else ("grayscale" if clock is not None and grey else "rgb")
    channels = 1 if color_mode == "grayscale" else 3
    target = o.target_size
    if target == "auto":
        # Under a budget small images train at their own size: blowing 28-pixel images up to 32 costs time, not
        # accuracy (measured: bench/budget_choices.py).
        target = auto_target_size(data.train, floor=16, multiple=4, upscale=False) if clock is not None \
            else auto_target_size(data.train)
        log.info("target_size auto: %dx%d from the images' median size", *target)
    target = (int(target[0]), int(target[1]))
    augmentation = resolve_augmentation(o.augmentation, budgeted=clock is not None, train_images=len(data.train),
                                        num_classes=len(data.class_names))
    if augmentation != o.augmentation:
        log.info("augmentation auto: rotation %s, zoom %s", augmentation.get("rotation"), augmentation.get("zoom"))
        o = o.replace(augmentation=augmentation)
    plan = None
    if clock is None:
        o = o.replace(color_mode=color_mode, target_size=target, batch_size=32 if o.batch_size == "auto"
                      else o.batch_size)
    else:
        defaults = {"cnn": CNN_FILTERS, "recipe": RECIPE_FILTERS}.get(o.architecture)

        def build(size, ch, filters):
            with runtime.building():
                model = build_model((*size, ch), len(data.class_names), architecture=o.architecture,
                                    filters=filters, dense_units=o.dense_units, dropout=o.dropout,
                                    batch_norm=o.batch_norm, augmentation=o.augmentation, weights=o.weights,
                                    seed=o.seed)
                compile_model(model, o.optimizer, o.learning_rate, o.momentum, o.label_smoothing,
                              runtime.jit_compile)
            return model

        plan = budget.choose(clock, train_images=len(data.train), held_out=len(data.val) + len(data.test),
                             exports=len(o.exports), num_classes=len(data.class_names), target_size=target,
                             channels=channels, batch_size=o.batch_size, filters=o.filters or defaults,
                             can_shrink_width=o.filters is None and defaults is not None,
                             can_shrink_input=o.target_size == "auto", max_epochs=o.num_epochs, build=build)
        keras.backend.clear_session()
        keras.utils.set_random_seed(o.seed)
        o = o.replace(color_mode=color_mode, target_size=plan.target_size, batch_size=plan.batch_size,
                      filters=plan.filters if plan.filters != (o.filters or defaults) else o.filters)
    data.target_size = o.target_size
    return o, plan


@contextlib.contextmanager
def _cache_folder(work_dir, cache: str) -> Iterator[Path | None]:
    """Where a disk cache may go: the work folder, or a temporary folder removed however training ends."""
    if work_dir is not None:
        yield Path(work_dir) / "cache"
    elif cache in ("auto", "disk"):
        with tempfile.TemporaryDirectory(prefix="dropfit-cache-") as scratch:
            yield Path(scratch)
    else:
        yield None


def _pipelines(data: Dataset, o: TrainOptions, failures: DecodeFailures, cache_folder: Path | None):
    cache_mode, cache_dir = plan_cache(o.cache, len(data.train) + len(data.val), data.target_size, o.channels,
                                       cache_folder)

    def dataset(samples, name, shuffle=False):
        where = {"memory": True, "none": False}.get(cache_mode) or str(Path(cache_dir) / name)
        return make_dataset(shuffled(samples, o.seed) if shuffle else samples, num_classes=len(data.class_names),
                            target_size=data.target_size, batch_size=o.batch_size, channels=o.channels,
                            shuffle=shuffle, seed=o.seed, cache=where, failures=failures)

    return dataset(data.train, "train", shuffle=True), dataset(data.val, "val") if data.val else None, cache_mode


def _network(data: Dataset, o: TrainOptions, augmentation) -> keras.Model:
    return build_model((*data.target_size, o.channels), len(data.class_names), architecture=o.architecture,
                       filters=o.filters, dense_units=o.dense_units, dropout=o.dropout, batch_norm=o.batch_norm,
                       augmentation=augmentation, weights=o.weights, seed=o.seed)


def _build(data: Dataset, o: TrainOptions, runtime: Runtime) -> tuple[keras.Model, list[Phase]]:
    with runtime.building():
        model = _network(data, o, o.augmentation)
    pretrained = has_backbone(model) and o.weights is not None
    phases = [Phase("train" if not pretrained else "head", o.num_epochs, o.learning_rate, not pretrained)]
    if pretrained and o.fine_tune_epochs:
        phases.append(Phase("fine_tune", o.fine_tune_epochs, o.fine_tune_learning_rate, True, o.fine_tune_layers))
    return model, phases


def _fit(model, phases: list[Phase], train_ds, val_ds, data: Dataset, o: TrainOptions, runtime: Runtime, work_dir,
         output_dir, emit: EventHook, stop_event, callbacks, verbose, clock: budget.Clock | None = None,
         plan: budget.Plan | None = None) -> _Fit:
    """Train phase by phase; with ``work_dir``, back up every epoch and resume from where a previous run stopped."""
    total_epochs = sum(p.epochs for p in phases)
    work = Path(work_dir) if work_dir is not None else None
    done_phases, first_epoch, resumed_from, rows = 0, 0, 0, []
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
        done_phases, first_epoch, resumed_from = _resume_point(work, phases)
        if resumed_from:
            rows = [r for r in load_json(work / "history.json", []) if r.get("epoch", 0) <= resumed_from]
            log.info("resuming after epoch %d of %d", resumed_from, total_epochs)
        if done_phases:
            model.load_weights(work / f"phase{done_phases}.weights.h5")
    # Under a time budget the events announce the planned epochs (re-planned as training goes).
    shares = [p.epochs / total_epochs for p in phases]
    planned = [max(1, round(plan.epochs * share)) for share in shares] if plan else [p.epochs for p in phases]
    recorder = EpochRecorder(len(data.train), sum(planned), rows, work_dir, output_dir, emit)
    best = BestWeights("val_loss", work_dir, resumed_from) if o.restore_best_weights and val_ds is not None else None
    emit("started", {"classes": data.class_names,
                     "counts": {n: c["total"] for n, c in data.info["counts"].items()},
                     "train_images": len(data.train), "val_images": len(data.val), "test_images": len(data.test),
                     "skipped": len(data.info["skipped"]), "epochs": sum(planned), "resumed_from": resumed_from,
                     "target_size": list(data.target_size), "batch_size": o.batch_size,
                     "architecture": o.architecture, "warnings": list(data.info["warnings"]),
                     "time_budget": clock.budget if clock else None, "deadline": clock.deadline() if clock else None})
    steps_per_epoch = -(-len(data.train) // o.batch_size)
    schedule = None
    weights_by_class = _class_weights(o.class_weight, data.train, len(data.class_names))
    fit_started = time.time()
    stopped_early = False
    for index, phase in enumerate(phases[done_phases:], start=done_phases):
        set_backbone_trainable(model, phase.backbone_trainable, phase.fine_tune_layers)
        with runtime.building():
            compile_model(model, o.optimizer, phase.learning_rate, o.momentum, o.label_smoothing, runtime.jit_compile)
        phase_start = first_epoch  # (a resumed run starts the phase again here; the backup restores its epoch)
        resumes_at = max(first_epoch, resumed_from) if index == done_phases else first_epoch
        end_epoch = phase_start + phase.epochs
        fit_callbacks = [recorder]
        if work is not None:
            # After the recorder has saved the epoch's row, before the epoch is announced as done.
            fit_callbacks.append(AtomicBackupAndRestore(str(work / f"backup{index + 1}"), double_checkpoint=True))
        if best is not None:
            fit_callbacks.append(best)
        if plan is not None:
            # Before the announcer: an epoch's event carries the plan as re-made after that epoch.
            ends = plan.used_before_training + plan.training_seconds * sum(shares[:index + 1])
            schedule = budget.schedule_callback(
                clock, plan, base_lr=phase.learning_rate, min_lr=o.min_learning_rate, steps_per_epoch=steps_per_epoch,
                phase_start=phase_start, first_epoch=resumes_at, planned_end=phase_start + planned[index],
                max_end=end_epoch, training_ends=ends, recorder=recorder, work=work, held_out=len(data.val))
            fit_callbacks.append(schedule)
        fit_callbacks.append(recorder.announcer)
        early = None
        if val_ds is not None and o.early_stopping_patience:
            early = keras.callbacks.EarlyStopping("val_loss", patience=o.early_stopping_patience, min_delta=1e-4)
            fit_callbacks.append(early)
        if val_ds is not None and o.reduce_lr_patience and plan is None:  # a budget has its own schedule
            fit_callbacks.append(keras.callbacks.ReduceLROnPlateau("val_loss", factor=o.reduce_lr_factor,
                                                                   patience=o.reduce_lr_patience,
                                                                   min_lr=o.min_learning_rate))
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
    return _Fit(rows, phases, resumed_from, stopped_early, best, time.time() - fit_started, weights_by_class,
                schedule)


def _for_inference(model, data: Dataset, o: TrainOptions, runtime: Runtime, phases: list[Phase]) -> keras.Model:
    """The model users get (and model.keras): the same network without the training-only augmentation, in float32
    and on one device: built-in layers only, so plain keras.models.load_model() reads it anywhere, and nothing random
    at inference. It is left uncompiled: it is for predicting."""
    if not (o.augmentation or runtime.precision != "float32" or runtime.replicas > 1):
        return model
    plain = _network(data, o, None)
    plain.set_weights(model.get_weights())
    set_backbone_trainable(plain, phases[-1].backbone_trainable, phases[-1].fine_tune_layers)
    return plain


def _evaluate(model, data: Dataset, o: TrainOptions) -> tuple[dict, list[dict], keras.Model]:
    """The report on held-out images (test, else validation; training images when none are held out), with the
    temperature fitted on the validation images and built into the returned model (`trainer.fitting.calibration`)."""
    def predictions(samples):
        ds = make_dataset(samples, num_classes=len(data.class_names), target_size=data.target_size,
                          batch_size=o.batch_size, channels=o.channels, cache=False, with_index=True)
        return labels_and_predictions(model, ds, with_details=True)

    raw = {name: (samples, *predictions(samples)) for name, samples in (("test", data.test), ("validation", data.val))
           if samples}
    temperature, cal = 1.0, None
    if "validation" in raw:
        _, y_val, _, p_val, _ = raw["validation"]
        temperature = round(calibration.fit_temperature(p_val, y_val), 4)  # as recorded, so all forms agree
        model = calibration.calibrated(model, temperature)
        log.info("calibration: temperature %.3f fitted on %d validation images", temperature, len(y_val))
    evaluations = {}
    for name, (samples, y_true, y_pred, probs, idx) in raw.items():
        scaled = calibration.scale(probs, temperature)
        evaluations[name] = (classification_report(y_true, y_pred, data.class_names),
                             results.misclassified(samples, y_true, y_pred, scaled, idx, data.class_names),
                             probs, scaled, y_true)
    main_split = next(iter(evaluations), None)
    if main_split is None:
        data.info["warnings"].append("no held-out images (validation_split and test_split are 0): the model "
                                     "was not evaluated or calibrated; the confusion matrix shows training images")
        y_true, y_pred, _, _ = predictions(data.train)
        evaluations["train"] = (classification_report(y_true, y_pred, data.class_names), [], None, None, None)
        main_split = "train"
    report = {"split": main_split, "held_out": main_split != "train", **evaluations[main_split][0],
              "splits": {name: {k: e[0][k] for k in ("accuracy", "macro_f1", "images")}
                         for name, e in evaluations.items()}}
    errors = evaluations[main_split][1]
    report["misclassified"] = errors[:100]
    _, _, before, after, labels = evaluations[main_split]
    if "validation" in raw:
        cal = {"temperature": round(temperature, 4), "fitted_on": "validation", "split": main_split,
               "images": len(labels),
               "before": calibration.measures(before, labels), "after": calibration.measures(after, labels),
               "reliability_before": calibration.reliability(before, labels),
               "reliability_after": calibration.reliability(after, labels),
               "coverage": calibration.coverage(after, labels),
               "suggested": calibration.suggested_threshold(after, labels)}
        if main_split == "validation":
            cal["note"] = ("measured on the validation images the temperature was fitted on (set test_split for "
                           "an independent measure)")
    report["calibration"] = cal
    # The images whose given label the calibrated model contradicts most confidently: worth a look.
    report["suspects"] = [e for e in errors if e["probability"] >= SUSPECT_CONFIDENCE][:200]
    return report, errors, model


def _summary(data: Dataset, o: TrainOptions, runtime: Runtime, model, fit: _Fit, report: dict, cache_mode: str,
             started: float, metadata: dict | None, clock: budget.Clock | None = None,
             plan: budget.Plan | None = None) -> dict:
    final = fit.rows[-1] if fit.rows else {}
    cal = report.get("calibration")
    return {
        "classes": data.class_names,
        "num_classes": len(data.class_names),
        "architecture": o.architecture,
        "epochs": sum(p.epochs for p in fit.phases),
        "epochs_trained": final.get("epoch", 0),
        "stopped_early": fit.stopped_early,
        "resumed_from": fit.resumed_from,
        "final": {k: final.get(k) for k in artifacts.METRIC_COLUMNS},
        "best_epoch": fit.best.best_epoch if fit.best else None,
        "restored_best_weights": bool(fit.best and fit.best.restored),
        "best_val_accuracy": max((r["val_accuracy"] for r in fit.rows if r.get("val_accuracy") is not None),
                                 default=None),
        "evaluation": {"split": report["split"], "held_out": report["held_out"], "accuracy": report["accuracy"],
                       "macro_f1": report["macro_f1"], "images": report["images"]},
        "evaluations": report["splits"],
        "durations": {"total_seconds": time.time() - started, "fit_seconds": fit.seconds,
                      "epoch_seconds": [r.get("seconds") for r in fit.rows]},
        "seed": o.seed,
        "config": {"train_directory": data.scan.root, **o.to_json(), "target_size": list(data.target_size),
                   "requested_target_size": o.to_json()["target_size"],
                   "class_weights": {data.class_names[i]: w for i, w in (fit.class_weights or {}).items()}},
        "parameters": int(model.count_params()),
        "calibration": {k: cal[k] for k in ("temperature", "before", "after", "suggested")} if cal else None,
        "budget": None if plan is None else {
            "seconds": plan.budget, "plan": plan.to_json(),
            "stopped_by": getattr(fit.budget, "stopped_by", None) or ("early stopping" if fit.stopped_early
                                                                      else "epochs"),
            "used_seconds": round(clock.used(), 1)},
        "runtime": {**runtime.to_json(), "cache": cache_mode},
        "versions": artifacts.library_versions(),
        **(metadata or {}),
    }


# --- internals ---------------------------------------------------------------------------------------------------

def _export_data(data: Dataset, o: TrainOptions):
    """What the exports are checked on (held-out images) and INT8 is calibrated on (training images), decoded
    only when there are exports."""
    def load():
        from trainer.outputs import exports

        # The validation images first: the held-out split nearly every job has, so exports.json means the same thing
        # from job to job.
        held, split = ((data.val, "validation") if data.val else (data.test, "test") if data.test
                       else (data.train, "training (not held out)"))
        channels = 1 if o.color_mode == "grayscale" else 3
        images, labels = exports.load_arrays(held, data.target_size, channels, exports.CHECK_IMAGES, o.seed)
        representative, _ = exports.load_arrays(data.train, data.target_size, channels,
                                                exports.REPRESENTATIVE_IMAGES, o.seed + 1)
        return images, labels, representative, split

    return load


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
