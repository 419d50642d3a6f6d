"""`TrainOptions`: everything that decides how `train_cnn` trains, in one frozen, self-validating record.

Built by `train_cnn` from its keyword arguments, by `TrainOptions.from_spec` from a job.yaml, and by the command
line; recorded whole in ``summary.json`` (``config``), so what ran is exactly what is written down. TensorFlow-free:
a Keras optimizer object is accepted but only checked for by name.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from contract.spec import (
    ARCHITECTURES,
    CACHE_MODES,
    COLOR_MODES,
    EXPORT_FORMATS,
    OPTIMIZERS,
    PRECISIONS,
    AugmentationSpec,
    JobSpec,
)

# `augmentation=True`: what job.yaml's `augmentation` section gives by default.
DEFAULT_AUGMENTATION = AugmentationSpec().options()
# `rotation`/`zoom: auto`. The geometric warps pay on small datasets, but under a time budget on a large one they
# cost what more epochs would have repaid (a quarter of each CPU epoch): digits (144 training images per class), 60 s:
# 0.993 with them, 0.989 without; Fashion-MNIST (4,800 per class), 15 min: 0.923 with, 0.929 without
# (bench/results/budget_augmentation.json).
AUTO_WARPS = {"rotation": 0.05, "zoom": 0.1}
# `early_stopping_patience: auto`. Under a time budget never: the schedule anneals to the budget's end and the best
# epoch's weights are kept anyway; on 330 small photos, stopping after 10 epochs without a lower validation loss (on
# 66 validation images) cost 2.2 points on average over four seeds, never gained (bench/results/small_photos.json).
EARLY_STOPPING_PATIENCE = 10
WARP_FREE_IMAGES_PER_CLASS = 1000
# Where the warps are off (a budget, 1,000+ images per class), `auto` mirrors instead, with lighter translation, no
# contrast and (the cnn) no dropout: Fashion-MNIST, 48,000 images, 15 epochs, flip-averaged prediction: 93.0% against
# 91.7% for the warp-free settings before (bench/results/flip_ablation.json) -- unless the data's check
# (`trainer.data.handedness`) finds the classes handed (digits, text): then `AUTO_WARP_FREE`, the settings before.
# Elsewhere `auto` is `AUTO_ELSEWHERE`.
AUTO_MIRRORED = {"rotation": 0.0, "zoom": 0.0, "flip": "horizontal", "translation": 0.05, "contrast": 0.0}
AUTO_WARP_FREE = {"rotation": 0.0, "zoom": 0.0, "flip": "none", "translation": 0.1, "contrast": 0.1}
AUTO_ELSEWHERE = {**AUTO_WARPS, "flip": "none", "translation": 0.1, "contrast": 0.1}
_PATHS = ("validation_directory", "test_directory", "labels_csv")


@dataclass(frozen=True)
class TrainOptions:
    """How to train. Defaults are the classic recipe's; an empty job.yaml gives dropfit's better ones
    (``target_size="auto", architecture="cnn", optimizer="adam", augmentation=True, early_stopping_patience=10``
    (``None`` under a ``time_budget``), ``reduce_lr_patience=4, class_weight="balanced"``). Invalid values raise
    ``ValueError`` naming the field, the value received and what was expected.

    Attributes:
        target_size: ``(height, width)`` images are resized to, or ``"auto"`` to choose from the images' median
            size (at most 224, at least 28 pixels a side).
        classes: train on these classes only, in this order; default every subfolder, sorted by name.
        batch_size: images per training step (``"auto"``: 32, or chosen for throughput under a time budget); the
            last batch of an epoch may be smaller, none is dropped.
        num_epochs: passes over the training images (for transfer learning: of the frozen-backbone phase); under a
            ``time_budget``, the most the plan may use.
        num_classes: optional check; derived from the data, and a different value raises ``ValueError``.
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
        learning_rate: the optimizer's learning rate (recipe: 1e-3), or ``"auto"`` (`resolve_learning_rate`).
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
        try_pretrained: also train a pretrained backbone (ImageNet weights found on this host, never downloaded) and
            keep whichever of the two scores better on validation: ``True``, ``False``, or ``"auto"`` (under a
            ``time_budget``, on colour images of 96 px or more); see `trainer.fitting.contender`.
        early_stopping_patience: stop after this many epochs without a lower validation loss (None: never).
        reduce_lr_patience: multiply the learning rate by ``reduce_lr_factor`` after this many epochs without a
            lower validation loss (None: never).
        reduce_lr_factor: that factor (0.5: halve it).
        min_learning_rate: the learning rate never goes below this (also the end of a time budget's schedule).
        class_weight: ``"balanced"`` weighs classes by inverse frequency; ``None`` or a ``{index: weight}`` dict.
        label_smoothing: label smoothing of the cross-entropy loss.
        weight_averaging: keep an exponential moving average of the weights (Keras' ``use_ema``, over about one
            epoch of steps); when training ends it is kept if its validation loss beats the best epoch's.
        restore_best_weights: with validation data, return the weights of the epoch with the lowest validation
            loss rather than those of the last epoch.
        exports: formats to export beside ``model.keras`` (``"savedmodel"``, ``"tflite"``, ``"tflite_int8"``,
            ``"onnx"``, ``"openvino"``), each loaded back and checked against it (exports.json); needs ``output_dir``.
        precision: ``"auto"`` (mixed float16 on Tensor Core GPUs, else float32), ``"float32"``,
            ``"mixed_float16"`` or ``"mixed_bfloat16"``.
        jit_compile: XLA: ``"auto"`` (on GPUs; measured slower on CPU), True or False.
        multi_gpu: train on all visible GPUs with ``MirroredStrategy`` (``batch_size`` is then the global batch).
        cache: where decoded images are kept between epochs: ``"auto"`` (memory, or files in ``work_dir`` when
            they would take more than half the available memory), ``"memory"``, ``"disk"`` or ``"none"``.
        time_budget: seconds the whole run may take, start to end (`trainer.fitting.budget`): the planner fits
            epochs, batch size, width and input size to it.
        audit: look for exact and near duplicates and conflicting labels first (`trainer.data.audit`); job.yaml
            turns it on by default.
        near_threshold: bits two perceptual hashes may differ by and still be near duplicates (0: exact only).
        audit_conflicts: what to do with images filed under two classes: ``"exclude"`` them or ``"keep"`` them.
    """

    target_size: tuple[int, int] | str = (200, 200)
    classes: tuple[str, ...] | None = None
    batch_size: int | str = 32  # or "auto": 32, or chosen for throughput under a time budget
    num_epochs: int = 20
    num_classes: int | None = None
    validation_split: float = 0.2
    validation_directory: str | None = None
    test_split: float = 0.0
    test_directory: str | None = None
    labels_csv: str | None = None
    color_mode: str = "rgb"  # or "auto": rgb, or grayscale for greyscale data under a time budget
    seed: int = 1337
    architecture: str = "recipe"
    optimizer: Any = "rmsprop"  # a name from OPTIMIZERS or a keras.optimizers.Optimizer
    learning_rate: float | str = 1e-3  # or "auto" (job.yaml's default): see `resolve_learning_rate`
    momentum: float = 0.0
    filters: tuple[int, ...] | None = None
    dense_units: int = 512
    dropout: float | None = None
    batch_norm: bool = False
    augmentation: dict | None = None  # True is taken as DEFAULT_AUGMENTATION
    weights: str | None = None
    fine_tune_epochs: int = 0
    fine_tune_learning_rate: float = 1e-5
    fine_tune_layers: int | None = None
    try_pretrained: bool | str = False  # or "auto" (job.yaml's default)
    early_stopping_patience: int | None = None
    reduce_lr_patience: int | None = None
    reduce_lr_factor: float = 0.5
    min_learning_rate: float = 1e-6
    class_weight: str | dict | None = None  # "balanced", None ("none") or {class index: weight}
    label_smoothing: float = 0.0
    weight_averaging: bool = False
    restore_best_weights: bool = True
    exports: tuple[str, ...] = ()
    precision: str = "auto"
    jit_compile: str | bool = "auto"
    multi_gpu: bool = False
    cache: str = "auto"
    time_budget: float | None = None  # seconds the whole run may take (see trainer.fitting.budget)
    audit: bool = False  # the dataset audit (trainer.data.audit); job.yaml turns it on by default
    near_threshold: int = 10
    audit_conflicts: str = "exclude"

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 - frozen: normalise once
        if isinstance(self.target_size, (list, tuple)):
            set_("target_size", tuple(self.target_size))
        for name in ("classes", "filters", "exports"):
            value = getattr(self, name)
            if isinstance(value, list):
                set_(name, tuple(value))
        if self.exports is None:
            set_("exports", ())
        if self.augmentation is True:
            set_("augmentation", dict(DEFAULT_AUGMENTATION))
        elif self.augmentation is False:
            set_("augmentation", None)
        if self.class_weight == "none":
            set_("class_weight", None)
        if self.cache is True or self.cache is False:
            set_("cache", "memory" if self.cache else "none")
        for name in (*_PATHS, "weights"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                set_(name, os.fspath(value))
        _validate(self)

    @classmethod
    def from_spec(cls, spec: JobSpec, paths: dict[str, os.PathLike | str] | None = None) -> TrainOptions:
        """The options a resolved ``job.yaml`` (`contract.spec.JobSpec`) stands for.

        ``paths`` maps the fields of `paths` to where they resolve (`resolve_path`); without it, paths stay relative
        to the job folder.
        """
        paths = {k: os.fspath(v) for k, v in (paths or {}).items()}
        t = spec.training
        return cls(
            target_size=spec.target_size,
            classes=spec.data.classes,
            batch_size=spec.batch_size,
            time_budget=spec.time_budget,
            num_epochs=spec.epochs,
            num_classes=spec.num_classes,
            validation_split=spec.data.validation_split,
            validation_directory=paths.get("data.validation", spec.data.validation),
            test_split=spec.data.test_split,
            test_directory=paths.get("data.test", spec.data.test),
            labels_csv=paths.get("data.labels_csv", spec.data.labels_csv),
            color_mode=spec.color_mode,
            seed=spec.seed,
            architecture=spec.model.architecture,
            filters=spec.model.filters,
            dense_units=spec.model.dense_units,
            dropout=spec.model.dropout,
            batch_norm=spec.model.batch_norm,
            weights=paths.get("model.weights", spec.model.weights),
            fine_tune_epochs=spec.model.fine_tune.epochs if spec.model.weights else 0,
            fine_tune_learning_rate=spec.model.fine_tune.learning_rate,
            fine_tune_layers=spec.model.fine_tune.layers,
            try_pretrained=spec.model.try_pretrained,
            optimizer=spec.optimizer.name,
            learning_rate=spec.optimizer.learning_rate,
            momentum=spec.optimizer.momentum,
            augmentation=spec.augmentation.options(),
            early_stopping_patience=(EARLY_STOPPING_PATIENCE if spec.time_budget is None else None)
            if t.early_stopping_patience == "auto" else t.early_stopping_patience,
            reduce_lr_patience=t.reduce_lr_patience,
            reduce_lr_factor=t.reduce_lr_factor,
            min_learning_rate=t.min_learning_rate,
            class_weight=t.class_weight,
            label_smoothing=t.label_smoothing,
            weight_averaging=spec.time_budget is None if t.weight_averaging == "auto" else t.weight_averaging,
            restore_best_weights=t.restore_best_weights,
            exports=spec.exports,
            precision=spec.hardware.precision,
            jit_compile=spec.hardware.jit_compile,
            multi_gpu=spec.hardware.multi_gpu,
            cache=spec.data.cache,
            audit=spec.data.audit.enabled,
            near_threshold=spec.data.audit.near_threshold if spec.data.audit.near_threshold else 0,
            audit_conflicts=spec.data.audit.conflicts,
        )

    def replace(self, **changes) -> TrainOptions:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def channels(self) -> int:
        """Input channels (once ``color_mode`` is resolved: ``auto`` counts as rgb)."""
        return 1 if self.color_mode == "grayscale" else 3

    @property
    def resolved(self) -> bool:
        """No ``auto`` left that the data or the time budget decide."""
        return "auto" not in (self.target_size, self.color_mode, self.batch_size)

    def to_json(self) -> dict:
        """What ``summary.json`` records under ``config``."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}
        out["target_size"] = list(self.target_size) if isinstance(self.target_size, tuple) else self.target_size
        if not isinstance(self.optimizer, str):
            out["optimizer"] = type(self.optimizer).__name__
        if isinstance(self.class_weight, dict):
            out["class_weight"] = {str(k): v for k, v in self.class_weight.items()}
        for name in ("classes", "filters", "exports"):
            out[name] = list(out[name]) if out[name] is not None else None
        return out


def _is_int(value) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or getattr(getattr(value, "dtype", None), "kind", "") in ("i", "u")


class _Check:
    """Checks of one `TrainOptions` field each, raising ``ValueError`` with the field, the value and the expectation."""

    def __init__(self, options: TrainOptions):
        self.o = options

    def positive_int(self, name, zero_ok=False):
        value = getattr(self.o, name)
        if not _is_int(value) or value < (0 if zero_ok else 1):
            kind = "a non-negative" if zero_ok else "a positive"
            raise ValueError(f"{name} must be {kind} integer. Received: {name}={value!r}")

    def fraction(self, name):
        value = getattr(self.o, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"{name} must be a number in [0, 1). Received: {name}={value!r}")

    def one_of(self, name, allowed):
        value = getattr(self.o, name)
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}. Received: {name}={value!r}")

    def optional(self, name, check, *args):
        if getattr(self.o, name) is not None:
            check(name, *args)


def _validate(o: TrainOptions) -> None:
    check = _Check(o)
    _validate_data(o, check)
    _validate_model(o, check)
    _validate_run(o, check)


def _validate_data(o: TrainOptions, check: _Check) -> None:
    if o.target_size != "auto" and (
            not isinstance(o.target_size, tuple) or len(o.target_size) != 2
            or not all(_is_int(v) and v >= 4 for v in o.target_size)):
        raise ValueError(f"target_size must be 'auto' or a (height, width) pair of integers >= 4. "
                         f"Received: target_size={o.target_size!r}")
    if o.batch_size != "auto":
        check.positive_int("batch_size")
    check.optional("num_classes", check.positive_int)
    check.fraction("validation_split")
    check.fraction("test_split")
    if o.validation_split + o.test_split >= 1:
        raise ValueError(f"validation_split + test_split must be below 1. "
                         f"Received: {o.validation_split} + {o.test_split}")
    check.one_of("color_mode", COLOR_MODES)
    check.positive_int("seed", zero_ok=True)
    if o.classes is not None and (isinstance(o.classes, str) or len(o.classes) < 2
                                  or len(set(o.classes)) != len(o.classes)):
        raise ValueError(f"classes must be a list of at least 2 distinct class names. Received: classes={o.classes!r}")
    check.one_of("cache", CACHE_MODES)
    check.one_of("audit_conflicts", ("exclude", "keep"))
    if not _is_int(o.near_threshold) or not 0 <= o.near_threshold <= 32:
        raise ValueError(f"near_threshold must be an integer from 0 to 32. "
                         f"Received: near_threshold={o.near_threshold!r}")
    if o.augmentation is not None and not isinstance(o.augmentation, dict):
        raise ValueError(f"augmentation must be True, None or a dict of options. "
                         f"Received: augmentation={o.augmentation!r}")
    for key, value in (o.augmentation or {}).items():
        if value == "auto" and key not in AUTO_ELSEWHERE:
            raise ValueError(f"augmentation {key} must be a number ('auto' only for {', '.join(AUTO_ELSEWHERE)}). "
                             f"Received: {key}={value!r}")


def _validate_model(o: TrainOptions, check: _Check) -> None:
    check.one_of("architecture", ARCHITECTURES)
    if isinstance(o.optimizer, str):
        check.one_of("optimizer", OPTIMIZERS)
    elif not hasattr(o.optimizer, "apply_gradients"):
        raise ValueError(f"optimizer must be one of {OPTIMIZERS} or a keras optimizer. Received: "
                         f"optimizer={o.optimizer!r}")
    for name in ("learning_rate", "fine_tune_learning_rate"):
        value = getattr(o, name)
        if name == "learning_rate" and value == "auto":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a positive number. Received: {name}={value!r}")
    if o.filters is not None and (not o.filters or not all(_is_int(f) and f > 0 for f in o.filters)):
        raise ValueError(f"filters must be a non-empty list of positive integers. Received: filters={o.filters!r}")
    check.positive_int("dense_units")
    check.optional("dropout", check.fraction)
    check.fraction("momentum")
    check.fraction("label_smoothing")
    check.optional("fine_tune_layers", check.positive_int)
    if o.try_pretrained not in (True, False, "auto"):
        raise ValueError(f"try_pretrained must be true, false or 'auto'. Received: try_pretrained={o.try_pretrained!r}")


def _validate_run(o: TrainOptions, check: _Check) -> None:
    if not isinstance(o.weight_averaging, bool):
        raise ValueError(f"weight_averaging must be True or False. Received: weight_averaging={o.weight_averaging!r}")
    check.positive_int("num_epochs")
    check.positive_int("fine_tune_epochs", zero_ok=True)
    check.optional("early_stopping_patience", check.positive_int)
    check.optional("reduce_lr_patience", check.positive_int)
    if not 0 < o.reduce_lr_factor < 1:
        raise ValueError(f"reduce_lr_factor must be in (0, 1). Received: reduce_lr_factor={o.reduce_lr_factor!r}")
    if not (o.class_weight in (None, "balanced") or isinstance(o.class_weight, dict)):
        raise ValueError(f"class_weight must be 'balanced', None or a dict. Received: class_weight={o.class_weight!r}")
    if isinstance(o.exports, str) or any(e not in EXPORT_FORMATS for e in o.exports):
        raise ValueError(f"exports must be a list of formats from {', '.join(map(repr, EXPORT_FORMATS))}. "
                         f"Received: exports={o.exports!r}")
    check.one_of("precision", PRECISIONS)
    if o.jit_compile not in ("auto", True, False):
        raise ValueError(f"jit_compile must be 'auto', True or False. Received: jit_compile={o.jit_compile!r}")
    if o.time_budget is not None and (isinstance(o.time_budget, bool) or not isinstance(o.time_budget, (int, float))
                                      or not 10 <= o.time_budget <= 30 * 86400):
        raise ValueError(f"time_budget must be a number of seconds from 10 to 30 days (or None). "
                         f"Received: time_budget={o.time_budget!r}")


BUDGET_CNN_LEARNING_RATE = 3e-3
LARGER_STEP_FROM_IMAGES = 10_000  # measured at 48,000 (Fashion-MNIST); on 264 photos it did not pay


def resolve_learning_rate(learning_rate, *, architecture: str, optimizer, budgeted: bool,
                          train_images: int) -> float:
    """``auto``: `BUDGET_CNN_LEARNING_RATE` for the cnn (batch-normalised) with Adam under a time budget on
    `LARGER_STEP_FROM_IMAGES` training images or more, whose warm-up and cosine schedule make the larger step safe
    (measured on Fashion-MNIST: see docs/training.md); the recipe's 1e-3 otherwise. A number is kept."""
    if learning_rate != "auto":
        return learning_rate
    larger = budgeted and architecture == "cnn" and optimizer == "adam" and train_images >= LARGER_STEP_FROM_IMAGES
    return BUDGET_CNN_LEARNING_RATE if larger else 1e-3


def resolve_augmentation(augmentation: dict | None, *, budgeted: bool, train_images: int, num_classes: int,
                         mirror_safe: bool) -> dict | None:
    """Settle what ``augmentation`` leaves on ``auto``. Where the warps are off (`warp_free`): `AUTO_MIRRORED` if the
    job mirrors (``flip: auto`` and ``mirror_safe``, the data's check, or ``flip`` asked for), else `AUTO_WARP_FREE`;
    elsewhere `AUTO_ELSEWHERE`. Explicit values are kept."""
    if not augmentation:
        return augmentation
    if warp_free(budgeted, train_images, num_classes):
        flip = augmentation.get("flip", "auto")
        mirrors = mirror_safe if flip == "auto" else flip in ("horizontal", "both")
        chosen = AUTO_MIRRORED if mirrors else AUTO_WARP_FREE
    else:
        chosen = AUTO_ELSEWHERE
    return {key: chosen[key] if value == "auto" else value for key, value in augmentation.items()}


def warp_free(budgeted: bool, train_images: int, num_classes: int) -> bool:
    """Whether ``auto`` trades the warps for mirroring: a time budget and `WARP_FREE_IMAGES_PER_CLASS` per class."""
    return budgeted and train_images >= WARP_FREE_IMAGES_PER_CLASS * max(1, num_classes)
