"""The training loop: the network trained phase by phase (a transfer job trains its head, then fine-tunes its
backbone), backed up after every epoch and resumed from there, on the time budget's schedule when there is one."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras

from contract.options import TrainOptions
from trainer.data.dataset import Dataset
from trainer.fitting import budget
from trainer.fitting.callbacks import (
    AtomicBackupAndRestore,
    BestWeights,
    BudgetCallback,
    EpochRecorder,
    EventHook,
    StopOnRequest,
    TrainingInterrupted,
    load_json,
)
from trainer.fitting.hardware import Runtime
from trainer.network.backbones import set_backbone_trainable
from trainer.network.networks import compile_model
from trainer.outputs import artifacts

log = logging.getLogger(__name__)


@dataclass
class Phase:
    name: str
    epochs: int  # epochs in this phase
    learning_rate: float
    backbone_trainable: bool
    fine_tune_layers: int | None = None


@dataclass
class Fitting:
    """Everything one training needs: the model and its phases, the data and its pipelines, the settings, where to
    back up and report, and the budget's clock and plan when there is a time budget."""

    model: keras.Model
    phases: list[Phase]
    train_ds: object
    val_ds: object | None
    data: Dataset
    options: TrainOptions
    runtime: Runtime
    work_dir: Path | None = None
    output_dir: Path | None = None
    emit: EventHook = lambda name, payload: None
    stop_event: threading.Event | None = None
    callbacks: Sequence = ()
    verbose: int | str = 0
    clock: budget.Clock | None = None
    plan: budget.Plan | None = None


@dataclass
class Fit:
    """How training went."""

    rows: list[dict]
    phases: list[Phase]
    resumed_from: int
    stopped_early: bool
    best: BestWeights | None
    seconds: float
    class_weights: dict[int, float] | None
    budget: BudgetCallback | None = None


def fit(f: Fitting) -> Fit:
    """Train phase by phase; with a work folder, back up every epoch and resume from where a previous run stopped."""
    o, data, work = f.options, f.data, f.work_dir
    done_phases, first_epoch, resumed_from, rows = _restore(f)
    # Under a time budget the events announce the planned epochs (re-planned as training goes).
    total = sum(p.epochs for p in f.phases)
    shares = [p.epochs / total for p in f.phases]
    planned = [max(1, round(f.plan.epochs * s)) for s in shares] if f.plan else [p.epochs for p in f.phases]
    recorder = EpochRecorder(len(data.train), sum(planned), rows, work, f.output_dir, f.emit)
    best = BestWeights("val_loss", work, resumed_from, validation=f.val_ds) \
        if o.restore_best_weights and f.val_ds is not None else None
    steps = -(-len(data.train) // o.batch_size)
    averaging = ema_momentum(steps) if o.weight_averaging else None
    f.emit("started", _started(f, sum(planned), resumed_from))
    weights_by_class = class_weights(o.class_weight, data.train, len(data.class_names))
    fit_started, stopped_early, schedule = time.time(), False, None
    for index, phase in enumerate(f.phases[done_phases:], start=done_phases):
        set_backbone_trainable(f.model, phase.backbone_trainable, phase.fine_tune_layers)
        with f.runtime.building():
            compile_model(f.model, o.optimizer, phase.learning_rate, o.momentum, o.label_smoothing,
                          f.runtime.jit_compile, averaging)
        resumes_at = max(first_epoch, resumed_from) if index == done_phases else first_epoch
        span = _span(f, phase, first_epoch, resumes_at, planned[index], sum(shares[:index + 1]))
        schedule = BudgetCallback(budget.Schedule(f.clock, f.plan, span), recorder, work) if f.plan else None
        fit_callbacks, early = _callbacks(f, index, recorder, best, schedule)
        log.info("phase %s: epochs %d-%d, learning rate %g", phase.name, first_epoch + 1,
                 first_epoch + phase.epochs, phase.learning_rate)
        try:
            f.model.fit(f.train_ds, validation_data=f.val_ds, epochs=first_epoch + phase.epochs,
                        initial_epoch=first_epoch, verbose=f.verbose, callbacks=fit_callbacks, shuffle=False,
                        class_weight=weights_by_class)
        except TrainingInterrupted:
            raise TrainingInterrupted(recorder.completed) from None
        stopped_early = stopped_early or bool(early and early.stopped_epoch)
        if work is not None and index + 1 < len(f.phases):
            with artifacts.atomic_path(work / f"phase{index + 1}.weights.h5") as tmp:
                f.model.save_weights(tmp)
            artifacts.write_json(work / "phases.json", {"completed": index + 1, "epoch": recorder.completed})
        # An early-stopped phase ends before its last epoch; the next one continues the epoch count from there.
        first_epoch = recorder.completed
    return Fit(rows, f.phases, resumed_from, stopped_early, best, time.time() - fit_started, weights_by_class,
               schedule)


def ema_momentum(steps_per_epoch: int) -> float:
    """The weight average's momentum per step: it spans about one epoch (its weight on a step ``steps_per_epoch``
    back is 1/e), between 0.9 on tiny datasets and 0.999 on large ones. An epoch, as in the ablation that kept it
    (bench/results/tricks.json: 0.99 at 79 steps per epoch); longer, and the random start lingers in short runs."""
    return min(0.999, max(0.9, 1.0 - 1.0 / max(1, steps_per_epoch)))


def _restore(f: Fitting) -> tuple[int, int, int, list[dict]]:
    """Where a previous run of this job stopped: (phases done, the next phase's first epoch, epochs done, rows)."""
    if f.work_dir is None:
        return 0, 0, 0, []
    f.work_dir.mkdir(parents=True, exist_ok=True)
    done_phases, first_epoch, resumed_from = resume_point(f.work_dir, f.phases)
    rows = []
    if resumed_from:
        rows = [r for r in load_json(f.work_dir / "history.json", []) if r.get("epoch", 0) <= resumed_from]
        log.info("resuming after epoch %d of %d", resumed_from, sum(p.epochs for p in f.phases))
    if done_phases:
        f.model.load_weights(f.work_dir / f"phase{done_phases}.weights.h5")
    return done_phases, first_epoch, resumed_from, rows


def _started(f: Fitting, epochs: int, resumed_from: int) -> dict:
    data, o, clock = f.data, f.options, f.clock
    return {"classes": data.class_names, "counts": {n: c["total"] for n, c in data.info["counts"].items()},
            "train_images": len(data.train), "val_images": len(data.val), "test_images": len(data.test),
            "skipped": len(data.info["skipped"]), "epochs": epochs, "resumed_from": resumed_from,
            "target_size": list(data.target_size), "batch_size": o.batch_size, "architecture": o.architecture,
            "warnings": list(data.info["warnings"]), "time_budget": clock.budget if clock else None,
            "deadline": clock.deadline() if clock else None}


def _span(f: Fitting, phase: Phase, phase_start: int, resumes_at: int, planned: int, share: float) -> budget.Span:
    """The budget's span of one phase: its share of the training time, its planned and largest epoch counts."""
    plan = f.plan
    ends = plan.used_before_training + plan.training_seconds * share if plan else 0.0
    return budget.Span(base_lr=phase.learning_rate, min_lr=f.options.min_learning_rate,
                       steps_per_epoch=-(-len(f.data.train) // f.options.batch_size), phase_start=phase_start,
                       first_epoch=resumes_at, planned_end=phase_start + planned, max_end=phase_start + phase.epochs,
                       training_ends=ends, held_out=len(f.data.val))


def _callbacks(f: Fitting, index: int, recorder: EpochRecorder, best, schedule):
    """The callbacks of one phase, in the order they must run after each epoch; and the early stopper, if any."""
    o, callbacks = f.options, [recorder]
    if f.work_dir is not None:
        # After the recorder has saved the epoch's row, before the epoch is announced as done.
        callbacks.append(AtomicBackupAndRestore(str(f.work_dir / f"backup{index + 1}"), double_checkpoint=True))
    if best is not None:
        callbacks.append(best)
    if schedule is not None:  # before the announcer: an epoch's event carries the plan as re-made after that epoch
        callbacks.append(schedule)
    callbacks.append(recorder.announcer)
    early = None
    if f.val_ds is not None and o.early_stopping_patience:
        early = keras.callbacks.EarlyStopping("val_loss", patience=o.early_stopping_patience, min_delta=1e-4)
        callbacks.append(early)
    if f.val_ds is not None and o.reduce_lr_patience and schedule is None:  # a budget has its own schedule
        callbacks.append(keras.callbacks.ReduceLROnPlateau("val_loss", factor=o.reduce_lr_factor,
                                                           patience=o.reduce_lr_patience, min_lr=o.min_learning_rate))
    if f.stop_event is not None:
        callbacks.append(StopOnRequest(f.stop_event, recorder))
    callbacks.extend(f.callbacks or [])
    return callbacks, early


def class_weights(class_weight, samples, num_classes) -> dict[int, float] | None:
    """``balanced``: each class weighed by the inverse of its share of the training images."""
    if class_weight is None or class_weight == "none":
        return None
    if isinstance(class_weight, dict):
        return {int(k): float(v) for k, v in class_weight.items()}
    counts = Counter(s.label for s in samples)
    total = sum(counts.values())
    return {i: round(total / (num_classes * counts[i]), 6) if counts.get(i) else 1.0 for i in range(num_classes)}


def resume_point(work: Path, phases: list[Phase]) -> tuple[int, int, int]:
    """From the work dir of an interrupted run: (phases fully done, epoch the next phase starts at, epochs done)."""
    meta = load_json(work / "phases.json", {})
    done = min(int(meta.get("completed", 0)), len(phases) - 1)
    phase_start = int(meta.get("epoch", 0)) if done else 0
    completed = phase_start
    backup = work / f"backup{done + 1}"
    if (backup / "latest.weights.h5").exists():
        completed = max(completed, int(load_json(backup / "training_metadata.json", {}).get("epoch", 0)))
    return done, phase_start, completed
