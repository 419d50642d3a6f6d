"""``time_budget``: the whole job — scan, audit, training, evaluation, artifacts, exports — ends within a time the
user gives, with the best model that fits in it.

1. The clock starts when the trainer starts (a resumed job adds what its earlier attempts used, kept in the work
   folder); what is not training (evaluation, calibration, plots, reports, exports) is estimated and reserved.
2. Before training, the planner measures how fast the network trains on this machine (a few steps on random pixels
   of the real input shape) and chooses what is left on ``auto`` to fit a useful number of epochs: greyscale data
   trains on one channel, small images at their own size (never blown up), a batch size that keeps the CPU or GPU
   busy, and — when even then too few epochs fit — a narrower network or a smaller input, by measurement.
3. Training follows a cosine learning-rate schedule (with a short warm-up) that reaches its floor exactly when the
   training time is up, and training stops there, part way through an epoch if need be (`Schedule`); the epoch
   count the events announce is re-estimated after every epoch. Early stopping still ends sooner; the best
   weights found within the budget are kept.

TensorFlow is imported lazily: the daemon reads nothing here.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# Fewer and the schedule is too short to converge: shrink the network or the input instead. Fashion-MNIST (60,000
# images) with mirroring and no dropout: the full-width cnn's 7 epochs beat the half width's 14 (93.2% against 92.7%
# held out, 4 minutes) and 11 beat 14 (93.7% against 92.3%, 5 minutes); at 12 the planner halved the width
# whenever a measurement came out a little slow (bench/results/fashion_budget_width.json).
MIN_EPOCHS = 7
# ... and at least this many optimizer steps (up to MAX_WANTED_EPOCHS): a few hundred photos make 9 steps an epoch,
# and there the half-width cnn's 37 epochs beat the full width's 16 by 13 points (bench/small_photos.py)
MIN_STEPS, MAX_WANTED_EPOCHS = 300, 40
RESERVE_FIXED = 8.0  # seconds after training: model copy, calibration, plots, report, saving (measured: 3-4 s)
# One export's conversion, by format: seconds at no size, per weight tensor, per million parameters. Fitted on a 2-core
# Xeon to the recipe network (0.14 M parameters, 14 tensors), the cnn (1.18 M, 52), MobileNetV3Small (0.94 M, 208) and
# ResNet50 (23.6 M, 322) at 96 px: ONNX 0.6, 1.0, 3.5, 38 s; TFLite INT8 2.4, 5.9, 9.7, 45 s (each in a fresh process,
# imports included), then given EXPORT_MARGIN.
# Running each export on the check images is counted apart, from the measured speed.
EXPORT_COST = {"savedmodel": (0.5, 0.010, 1.0), "tflite": (1.0, 0.020, 1.5), "tflite_int8": (2.0, 0.035, 1.5),
               "onnx": (1.0, 0.012, 1.5), "openvino": (1.5, 0.015, 1.5)}
EXPORT_MARGIN = 1.5
EXPORT_CHECK_IMAGES = 1200  # decoded once for the exports: trainer.outputs.exports.CHECK_IMAGES + REPRESENTATIVE_IMAGES
SAFETY = 0.04  # of the budget, kept for what no estimate sees
PLANNING_SHARE = 0.06  # of the budget, at most, spent measuring candidates (at least 3 s)
WIDTH_GAIN, INPUT_GAIN = 2.0, 1.5  # typical speed-ups of half the filters, 3/4 of the input side (2-core CPU, 96 px)
USED_FILE = "budget.json"


@dataclass
class Clock:
    """Time used by the job: this run (since ``started``, a ``time.monotonic()``) plus earlier attempts."""

    budget: float
    started: float
    used_before: float = 0.0
    saves_to: Path | None = None  # a part of a job's clock (a tried backbone's) saves into the job's work folder

    def used(self) -> float:
        return self.used_before + time.monotonic() - self.started

    def left(self) -> float:
        return self.budget - self.used()

    def deadline(self) -> float:
        """Wall-clock time (Unix seconds) the job must have ended by."""
        return time.time() + self.left()

    @classmethod
    def start(cls, budget: float, started: float | None, work: Path | None) -> Clock:
        used = 0.0
        if work is not None:
            try:
                used = float(json.loads((work / USED_FILE).read_text())["used"])
            except (OSError, ValueError, KeyError, TypeError):
                used = 0.0
        return cls(budget, started if started is not None else time.monotonic(), used)

    def save(self, work: Path | None) -> None:
        """Record the time used in ``work`` (or in `saves_to`), for a resumed run to add to its own."""
        work = self.saves_to or work
        if work is not None:
            from contract.atomic import write_json

            write_json(work / USED_FILE, {"used": self.used(), "budget": self.budget})


@dataclass
class Plan:
    """What the planner chose, and why (recorded in summary.json and the report)."""

    budget: float
    used_before_training: float
    reserve: float
    training_seconds: float
    batch_size: int
    target_size: tuple[int, int]
    channels: int
    filters: tuple[int, ...] | None
    images_per_second: float
    epoch_seconds: float
    epochs: int
    train_images: int = 0
    candidates: list[dict] = field(default_factory=list)
    replans: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        out = asdict(self)
        out["target_size"] = list(self.target_size)
        out["filters"] = list(self.filters) if self.filters else None
        for key in ("used_before_training", "reserve", "training_seconds", "images_per_second", "epoch_seconds"):
            out[key] = round(out[key], 2)
        return out


def reserve(held_out: int, exports: float, images_per_second: float, budget: float) -> float:
    """Seconds to keep for everything after training; ``exports`` is `export_seconds`."""
    return RESERVE_FIXED + exports + validation_seconds(held_out, images_per_second) + SAFETY * budget


def export_seconds(formats, model, images_per_second: float, passes: int = 1) -> float:
    """Seconds writing ``model`` (built) in each of ``formats`` and checking each against Keras takes. Conversion grows
    with the weight tensors (the graph's ops) and the parameters (the constants folded in); each check runs the check
    images once more. ``passes``: 2 where the model will average an image's and its mirror image's passes (the graph
    holds the network twice; measured: the cnn's INT8 TFLite 5.7 s plain, 10.9 s mirrored)."""
    if not formats:
        return 0.0
    tensors, millions = len(model.weights), model.count_params() / 1e6
    convert = sum(base + passes * (per_tensor * tensors + per_million * millions)
                  for base, per_tensor, per_million in (EXPORT_COST[fmt] for fmt in formats))
    checks = validation_seconds(EXPORT_CHECK_IMAGES * (1 + len(formats)) * passes, images_per_second)
    return convert * EXPORT_MARGIN + checks


def validation_seconds(held_out: int, images_per_second: float) -> float:
    """Seconds one pass over ``held_out`` images takes (predicting runs about three times faster than training)."""
    return held_out / max(3 * images_per_second, 1.0)


def measure(model, input_shape: tuple[int, int, int], num_classes: int, batch_size: int,
            seconds: float = 1.5) -> float:
    """Images per second ``model`` (compiled) trains at on this machine: steps on random pixels, after warm-up."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch_size, *input_shape), dtype=np.uint8)
    y = np.eye(num_classes, dtype="float32")[rng.integers(0, num_classes, batch_size)]
    for _ in range(2):  # tracing and the first allocations
        model.train_on_batch(x, y)
    steps, started = 0, time.perf_counter()
    while steps < 3 or time.perf_counter() - started < seconds:
        model.train_on_batch(x, y)
        steps += 1
    return steps * batch_size / (time.perf_counter() - started)


@dataclass(frozen=True)
class Request:
    """What the planner plans for: the data, the starting point, and what it may change."""

    train_images: int
    held_out: int
    exports: tuple[str, ...]  # formats
    num_classes: int
    target_size: tuple[int, int]
    channels: int
    batch_size: int | str  # "auto": chosen by the number of training images
    filters: tuple[int, ...] | None
    can_shrink_width: bool
    can_shrink_input: bool
    max_epochs: int
    mirrors: bool = False  # the model may average two passes (test-time mirroring): the graph twice, checks twice
    export_floor: float = 0.0  # seconds the exports take at least (another network may be exported instead)


def choose(clock: Clock, request: Request, build) -> Plan:
    """Measure candidates and pick the first that fits `MIN_EPOCHS` (or the cheapest measured): ``build(target_size,
    channels, filters)`` returns a compiled model. Cheaper candidates halve the width and shrink the input by a
    quarter, in turn; from the speed measured, the planner skips straight to the first one predicted to fit, and
    spends at most `PLANNING_SHARE` of the budget measuring."""
    r = request
    batch = r.batch_size if r.batch_size != "auto" else _auto_batch(r.train_images)
    size, width = tuple(r.target_size), r.filters
    seconds = min(1.5, max(0.3, clock.budget * 0.004))
    planning_ends = clock.used() + max(3.0, PLANNING_SHARE * clock.budget)
    wanted = wanted_epochs(r.train_images, batch, r.max_epochs)
    candidates, step = [], 0
    while True:
        model = build(size, r.channels, width)
        ips = measure(model, (*size, r.channels), r.num_classes, batch, seconds)
        epoch = r.train_images / ips * 1.08  # the shuffle, the last partial batch and the validation pass
        exporting = max(export_seconds(r.exports, model, ips, 1 + r.mirrors), r.export_floor if r.exports else 0.0)
        spare = reserve(r.held_out, exporting, ips, clock.budget)
        training = clock.left() - spare
        fits = max(0, math.floor(training / epoch)) if training > 0 else 0
        candidates.append({"target_size": list(size), "channels": r.channels, "batch_size": batch,
                           "filters": list(width) if width else None, "images_per_second": round(ips, 1),
                           "epochs_that_fit": fits, "epoch_seconds": round(epoch, 2)})
        log.info("budget: %dx%dx%d, filters %s, batch %d: %.0f images/s, %d epoch(s) fit in %.0f s", *size,
                 r.channels, width or "default", batch, ips, fits, training)
        if fits >= wanted or clock.used() >= planning_ends:
            break
        nxt, step = _cheaper(size, width, r, needed=wanted * epoch / max(training, 1e-3), step=step)
        if nxt is None:
            break
        size, width = nxt
    best = candidates[-1]
    return Plan(budget=clock.budget, used_before_training=clock.used(), reserve=spare, training_seconds=training,
                batch_size=best["batch_size"], target_size=tuple(best["target_size"]), channels=r.channels,
                filters=tuple(best["filters"]) if best["filters"] else None,
                images_per_second=best["images_per_second"], epoch_seconds=epoch,
                epochs=max(1, min(r.max_epochs, best["epochs_that_fit"])), train_images=r.train_images,
                candidates=candidates)


def wanted_epochs(train_images: int, batch_size: int, max_epochs: int) -> int:
    """The fewest epochs a plan should fit before the planner tries a cheaper candidate: `MIN_EPOCHS`, or on small
    datasets enough epochs for `MIN_STEPS` steps (at most `MAX_WANTED_EPOCHS`)."""
    steps_per_epoch = max(1, math.ceil(train_images / batch_size))
    return min(max_epochs, max(MIN_EPOCHS, min(MAX_WANTED_EPOCHS, math.ceil(MIN_STEPS / steps_per_epoch))))


def _cheaper(size, width, r: Request, needed: float, step: int):
    """The first shrink predicted to be ``needed`` times faster (or the cheapest there is), and the next step."""
    gain, nxt = 1.0, None
    while gain < needed:
        smaller = _shrink(size if nxt is None else nxt[0], width if nxt is None else nxt[1], r.can_shrink_width,
                          r.can_shrink_input, step)
        if smaller is None:
            break
        step += 1
        gain *= WIDTH_GAIN if smaller[1] != (width if nxt is None else nxt[1]) else INPUT_GAIN
        nxt = smaller
    return nxt, step


def _auto_batch(train_images: int) -> int:
    """Larger batches keep a CPU's cores (and a GPU) busy; small datasets need enough steps per epoch."""
    for batch in (128, 64):
        if train_images >= 40 * batch:
            return batch
    return 32


def _shrink(size, width, can_shrink_width: bool, can_shrink_input: bool, step: int):
    """The next cheaper candidate: halve the width and shrink the input by a quarter, alternately (at most 6)."""
    if step >= 6:
        return None
    options = []
    if can_shrink_width and width and min(width) >= 8:
        options.append((size, tuple(max(4, f // 2) for f in width)))
    if can_shrink_input and min(size) >= 48:
        options.append((tuple(max(32, 4 * round(v * 0.75 / 4)) for v in size), width))
    if not options:
        return None
    return options[step % len(options)] if len(options) > 1 else options[0]


@dataclass(frozen=True)
class Span:
    """One phase of training on the plan: epochs ``phase_start`` to at most ``max_end``, planned to end at
    ``planned_end``, resuming at ``first_epoch``, until ``training_ends`` seconds of the budget are used; ``held_out``
    images are validated after each epoch."""

    base_lr: float
    min_lr: float
    steps_per_epoch: int
    phase_start: int
    first_epoch: int
    planned_end: int
    max_end: int
    training_ends: float
    held_out: int = 0


class Schedule:
    """The plan, run: a cosine learning rate (after a short warm-up) that reaches its floor exactly when the training
    time is up, whatever speed the machine has that minute; the planned epoch count made again after every epoch
    (for the events and the report); and the hard stop. No Keras here: `trainer.fitting.callbacks`' `BudgetCallback`
    drives it from training.

    The schedule's progress is the share of the phase's steps done, counting the steps still to come from the time
    left and this run's mean step time, never going back. An epoch-based plan had to guess the epochs from noisy
    epoch times and stop at a whole epoch: on a shared 2-core machine whose epochs took 12 to 41 s, it ended 21 s of
    243 early (bench/results/fashion_budget_5m_epoch_schedule.json; with this schedule, the next run
    used all but 2 s: fashion_budget_5m_time_schedule.json)."""

    def __init__(self, clock: Clock, plan: Plan, span: Span):
        self.clock, self.plan, self.span = clock, plan, span
        self.planned_end = max(span.planned_end, span.first_epoch + 1)
        self.seconds: list[float] = []  # this run's epoch times, after its first
        self.stopped_by: str | None = None
        self.warmup = max(1, min(span.steps_per_epoch,
                                 int(0.05 * (span.planned_end - span.phase_start) * span.steps_per_epoch)))
        # An epoch stopped part way still runs its validation pass, which the reserve does not hold (it holds the
        # evaluation's): the hard stop comes that much sooner (2 s of a 40 s job on 480 images, on a 2-core CPU).
        self.hard_stop = span.training_ends - validation_seconds(span.held_out, plan.images_per_second)
        self.progress = 0.0
        self._run_start: tuple[int, float] | None = None  # (step, clock) of this run's first step

    def learning_rate(self, step: int) -> float:
        """The learning rate of ``step`` (counted from the phase's start), called as that step begins."""
        s = self.span
        if step < self.warmup and s.first_epoch == s.phase_start:
            return s.base_lr * (step + 1) / self.warmup
        self.progress = max(self.progress, self._progress(step))
        return s.min_lr + (s.base_lr - s.min_lr) * 0.5 * (1 + math.cos(math.pi * self.progress))

    def _progress(self, step: int) -> float:
        s, now = self.span, self.clock.used()
        if self._run_start is None:
            self._run_start = (step, now)
        ran, spent = step - self._run_start[0], now - self._run_start[1]
        # This run's mean step time once it has one (an epoch's shuffles, validation passes and a slow minute
        # included, as the time left will have them too); before, the plan's.
        per_step = spent / ran if ran >= min(50, s.steps_per_epoch) else self.plan.epoch_seconds / s.steps_per_epoch
        by_time = max(0.0, self.hard_stop - now) / max(per_step, 1e-9)
        to_come = min(by_time, (s.max_end - s.phase_start) * s.steps_per_epoch - step)
        return min(1.0, step / max(1.0, step + max(0.0, to_come)))

    def time_is_up(self) -> bool:
        """Whether the training time is up (checked after every batch); says so once."""
        if self.clock.used() < self.hard_stop:
            return False
        self.stopped_by = self.stopped_by or "time"
        return True

    def epoch_ended(self, epoch: int, seconds: float) -> bool:
        """Make the planned epoch count again after epoch ``epoch`` (0-based) took ``seconds``; True when training
        should stop (the phase's last allowed epoch: otherwise the time stops it, part way through an epoch)."""
        done, s = epoch + 1, self.span
        left = s.training_ends - self.clock.used()
        # A run's first epoch also fills the cache and traces the graph: trust it only half against the plan. Later,
        # the median of the last three.
        if epoch == s.first_epoch:
            estimate = (seconds + self.plan.epoch_seconds) / 2
        else:
            self.seconds.append(seconds)
            estimate = statistics.median(self.seconds[-3:])
        more = max(0, math.ceil(left / estimate)) if estimate > 0 else 0
        planned = max(done, min(s.max_end, done + more))
        if planned != self.planned_end:
            self.plan.replans.append({"after_epoch": done, "epoch_seconds": round(seconds, 2),
                                      "estimate": round(estimate, 2), "planned_epochs": planned,
                                      "was": self.planned_end})
            log.info("budget: epoch %d took %.1f s; about %d epochs in all (was %d)", done, seconds, planned,
                     self.planned_end)
            self.planned_end = planned
        if done >= s.max_end:
            self.stopped_by = self.stopped_by or "plan"
            return True
        return False
