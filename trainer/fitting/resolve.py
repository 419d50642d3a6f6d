"""Every setting left on ``auto``, settled in one place before training, each decision recorded once (``resolved`` in
summary.json: what was asked for, what was chosen, and why):

- ``target_size``: from the images' median size (under a time budget small images train at their own size, and
  photos at most `BUDGET_CAP` px, or `SMALL_DATA_CAP` px with few images per class);
- ``color_mode`` (channels): one channel for greyscale data under a time budget;
- ``augmentation``: what is left on ``auto`` by the data and the budget (`contract.options.resolve_augmentation`),
  mirroring only where the training images show no handedness (`trainer.data.handedness`);
- ``learning_rate``: larger for the cnn under a budget (`contract.options.resolve_learning_rate`);
- ``batch_size``, and under a budget the network's width and the input size, by measuring this machine
  (`trainer.fitting.budget.choose`);
- ``cache``: memory, or files in the work folder when the decoded images would not fit in half the free memory;
- ``precision`` and ``jit_compile``: by the devices TensorFlow sees (`trainer.fitting.hardware.configure`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import keras

from contract.options import TrainOptions, resolve_augmentation, resolve_learning_rate, warp_free
from trainer.data import handedness
from trainer.data.dataset import Dataset
from trainer.data.pipeline import plan_cache
from trainer.data.scan import auto_target_size
from trainer.fitting import budget
from trainer.fitting.hardware import Runtime
from trainer.network.networks import CNN_FILTERS, RECIPE_FILTERS, Network, build_model, compile_model
from trainer.outputs import advisor

log = logging.getLogger(__name__)

# Under a budget, photos train at most 128 px on their longer side: at 224 a from-scratch cnn trains 30 images/s on a
# 2-core CPU, too slow for the planner even to measure a smaller candidate within its share (bench/small_photos.py).
BUDGET_CAP = 128
# ... and at most 64 px with fewer than 1,000 training images per class (`warp_free`'s line): on 330 photos of
# 150-480 px, 2 minutes, the cnn at 64x64 scored 71.8 / 72.2 / 68.8% on 500 held-out images (three seeds), at 48 px
# 63.8 / 65.0%, at 96 px 63.4 / 70.0%, at 124x128 59.8 / 63.4 / 59.6%: few images teach no fine detail, and the
# whole object fits the network's view (bench/results/small_photos.json). Not measured between a few hundred and
# 1,000 images per class.
SMALL_DATA_CAP = 64


@dataclass
class Resolved:
    """The run's settings with nothing left on ``auto`` (``options``), the budget's plan, the cache, and the record of
    every decision."""

    options: TrainOptions
    plan: budget.Plan | None = None
    cache_mode: str = "none"
    cache_dir: str | None = None
    decisions: dict[str, dict] = field(default_factory=dict)

    def decide(self, setting: str, requested, value, why: str) -> None:
        self.decisions[setting] = {"requested": _plain(requested), "value": _plain(value), "why": why}


def resolve(o: TrainOptions, data: Dataset, runtime: Runtime, clock: budget.Clock | None,
            cache_folder: Path | None, export_floor: float = 0.0) -> Resolved:
    """Settle what ``o`` leaves on ``auto`` for ``data`` on this machine (see the module's doc); sets
    ``data.target_size``. ``export_floor``: seconds the exports take at least, whichever network is planned (a
    pretrained backbone that may win its trial and be exported instead)."""
    r = Resolved(o)
    _runtime(r, o, runtime)
    target, channels = _input(r, o, data, clock)
    o = _augmentation(r, o, data, clock is not None)
    rate = resolve_learning_rate(o.learning_rate, architecture=o.architecture, optimizer=o.optimizer,
                                 budgeted=clock is not None, train_images=len(data.train))
    r.decide("learning_rate", o.learning_rate, rate, "as asked" if rate == o.learning_rate else
             "the cnn with adam under a time budget, on 10,000+ images" if rate != 1e-3 else "the recipe's 1e-3")
    o = o.replace(learning_rate=rate)
    if clock is None:
        batch = 32 if o.batch_size == "auto" else o.batch_size
        r.decide("batch_size", o.batch_size, batch, "the recipe's 32" if o.batch_size == "auto" else "as asked")
        o = o.replace(color_mode="grayscale" if channels == 1 else "rgb", target_size=target, batch_size=batch)
    else:
        o = _plan(r, o, data, runtime, clock, (target, channels), export_floor)
    data.target_size = o.target_size
    r.options = o
    r.cache_mode, r.cache_dir = plan_cache(o.cache, len(data.train) + len(data.val), data.target_size, o.channels,
                                           cache_folder)
    r.decide("cache", o.cache, r.cache_mode, "decoded images kept between epochs (files when memory is short)")
    return r


def _augmentation(r: Resolved, o: TrainOptions, data: Dataset, budgeted: bool) -> TrainOptions:
    """``augmentation`` (`contract.options.resolve_augmentation`), with ``flip: auto`` decided by the training images
    (`trainer.data.handedness`) where the warps are off; and the cnn's dropout, which mirroring replaces."""
    many = warp_free(budgeted, len(data.train), len(data.class_names))
    flip, safe = (o.augmentation or {}).get("flip"), False
    if (many and flip == "auto") or (flip in ("horizontal", "both") and data.thumbs):
        # Asked-for mirroring is kept, but checked too when the audit's thumbnails are at hand: a user who mirrors
        # digits should hear of it before the epochs are spent.
        verdict = handedness.judge(data.train, data.class_names, o.seed, data.thumbs)
        r.decide("mirroring", flip, verdict.to_json(), verdict.why)
        safe = verdict.mirror_safe
        if flip != "auto" and not safe:
            data.info["warnings"].append(f"augmentation.flip is {flip!r}, but {verdict.why}: consider flip: none")
            log.warning("augmentation.flip is %r, but %s", flip, verdict.why)
    augmentation = resolve_augmentation(o.augmentation, budgeted=budgeted, train_images=len(data.train),
                                        num_classes=len(data.class_names), mirror_safe=safe)
    mirrors = (augmentation or {}).get("flip") in ("horizontal", "both")
    r.decide("augmentation", o.augmentation, augmentation,
             "as asked" if augmentation == o.augmentation else "the warps for a small or unbudgeted dataset"
             if not many else "mirrored, no warps: a time budget with 1,000+ training images per class" if mirrors
             else "no warps (a time budget with 1,000+ training images per class), and no mirroring")
    if o.dropout is None and o.architecture == "cnn" and many and mirrors:
        # Mirroring regularises enough: on 4,800 images per class dropout cost accuracy (bench/results/flip_ablation).
        r.decide("dropout", None, 0.0, "the cnn mirrored on 1,000+ training images per class: no dropout")
        o = o.replace(dropout=0.0)
    return o.replace(augmentation=augmentation)


def _runtime(r: Resolved, o: TrainOptions, runtime: Runtime) -> None:
    r.decide("precision", o.precision, runtime.precision, "mixed float16 on Tensor Core GPUs, else float32"
             if o.precision == "auto" else "as asked")
    r.decide("jit_compile", o.jit_compile, runtime.jit_compile, "XLA on GPUs (slower on CPUs, measured)"
             if o.jit_compile == "auto" else "as asked")


def _input(r: Resolved, o: TrainOptions, data: Dataset, clock) -> tuple[tuple[int, int], int]:
    grey = data.grey_fraction is not None and data.grey_fraction >= 0.95
    color_mode = o.color_mode if o.color_mode != "auto" else ("grayscale" if clock is not None and grey else "rgb")
    r.decide("color_mode", o.color_mode, color_mode, "greyscale data under a time budget: one channel"
             if o.color_mode == "auto" and color_mode == "grayscale" else "as asked" if o.color_mode != "auto"
             else "three channels")
    target = o.target_size
    if target == "auto":
        # Under a budget small images train at their own size: blowing 28-pixel images up to 32 costs time, not
        # accuracy (measured: bench/budget_choices.py).
        cap = budget_cap(len(data.train), len(data.class_names), o.architecture)
        target = auto_target_size(data.train, cap=cap, floor=16, multiple=4, upscale=False) \
            if clock is not None else auto_target_size(data.train)
        if clock is not None and cap == SMALL_DATA_CAP and max(target) >= SMALL_DATA_CAP - 4:
            # Sides in multiples of 32 for the networks' five 2x2 poolings, whose floors otherwise drop the edge
            # rows: the small photos at 60x64 scored 67.2 / 66.4 / 64.4%, at 64x64 71.8 / 72.2 / 68.8% (same seeds).
            target = tuple(max(32, 32 * round(side / 32)) for side in target)
        log.info("target_size auto: %dx%d from the images' median size", *target)
    target = (int(target[0]), int(target[1]))
    r.decide("target_size", o.target_size, target, "as asked" if o.target_size != "auto" else
             "from the images' median size" if clock is None else
             f"from the images' median size, at most {cap} px under a time budget"
             + (" with fewer than 1,000 training images per class" if cap == SMALL_DATA_CAP else ""))
    return target, 1 if color_mode == "grayscale" else 3


def budget_cap(train_images: int, num_classes: int, architecture: str) -> int:
    """The most pixels on a side that ``target_size: auto`` picks under a time budget: `BUDGET_CAP`, or
    `SMALL_DATA_CAP` for a network trained from scratch on fewer than 1,000 training images per class (a pretrained
    backbone keeps `BUDGET_CAP`: its ImageNet features want the detail)."""
    small = not warp_free(True, train_images, num_classes) and architecture in ("cnn", "recipe")
    return SMALL_DATA_CAP if small else BUDGET_CAP


def _plan(r: Resolved, o: TrainOptions, data: Dataset, runtime: Runtime, clock, shape,
          export_floor: float) -> TrainOptions:
    """Under a time budget: batch size, width and input size by measuring this machine (`budget.choose`)."""
    (target, channels), defaults = shape, {"cnn": CNN_FILTERS, "recipe": RECIPE_FILTERS}.get(o.architecture)

    def build(size, ch, filters):
        with runtime.building():
            model = build_model((*size, ch), len(data.class_names),
                                dataclasses.replace(Network.of(o, o.augmentation), filters=filters,
                                                    fused_norm=runtime.fused_norm))
            compile_model(model, o.optimizer, o.learning_rate, o.momentum, o.label_smoothing, runtime.jit_compile,
                          0.99 if o.weight_averaging else None)  # its cost per step is part of the measure
        return model

    request = budget.Request(
        train_images=len(data.train), exports=tuple(o.exports), mirrors=mirrors(o), export_floor=export_floor,
        held_out=len(data.val) * (1 + o.weight_averaging) + len(data.test)  # the average is scored once more
        + advisor.images_read(len(data.train), len(data.val))
        # test-time mirroring: one pass and a mirrored (double) pass to choose, then double passes when evaluating
        + (4 * len(data.val) + len(data.test)) * mirrors(o),
        num_classes=len(data.class_names), target_size=target, channels=channels, batch_size=o.batch_size,
        filters=o.filters or defaults, can_shrink_width=o.filters is None and defaults is not None,
        can_shrink_input=o.target_size == "auto", max_epochs=o.num_epochs)
    plan = r.plan = budget.choose(clock, request, build)
    keras.backend.clear_session()
    keras.utils.set_random_seed(o.seed)
    why = f"measured: {plan.images_per_second:.0f} images/s, {plan.epochs} epoch(s) fit the budget"
    r.decide("batch_size", o.batch_size, plan.batch_size, why if o.batch_size == "auto" else "as asked")
    r.decide("filters", o.filters, plan.filters, why if plan.filters != (o.filters or defaults) else "as asked")
    if plan.target_size != target:
        r.decide("target_size", o.target_size, plan.target_size, why + " at this smaller input")
    return o.replace(color_mode="grayscale" if channels == 1 else "rgb", target_size=plan.target_size,
                     batch_size=plan.batch_size,
                     filters=plan.filters if plan.filters != (o.filters or defaults) else o.filters)


def mirrors(o: TrainOptions) -> bool:
    """Whether training mirrors, so the model may end up averaging each image with its mirror image (two passes)."""
    return bool(o.augmentation) and o.augmentation.get("flip") in ("horizontal", "both")


def _plain(value):
    """JSON-ready: tuples as lists, dicts as they are."""
    if isinstance(value, tuple):
        return list(value)
    return value
