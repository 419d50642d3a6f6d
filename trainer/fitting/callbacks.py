"""Keras callbacks of a dropfit run: per-epoch records, atomic backups, best-weights restore, stop on request, and the
time budget's schedule."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

from trainer.outputs import artifacts

log = logging.getLogger(__name__)

EventHook = Callable[[str, dict], None]


class TrainingInterrupted(Exception):
    """Training stopped on request at a safe point; with a ``work_dir`` it resumes from ``completed_epochs``."""

    def __init__(self, completed_epochs: int):
        self.completed_epochs = completed_epochs
        super().__init__(f"training stopped on request after {completed_epochs} completed epoch(s)")


def load_json(path: Path, default):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """`BackupAndRestore` whose files are replaced atomically, so a kill during a save never corrupts them."""

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        if self.double_checkpoint and os.path.exists(self._weights_path):
            os.replace(self._weights_path, self._prev_weights_path)
            if os.path.exists(self._training_metadata_path):
                os.replace(self._training_metadata_path, self._prev_training_metadata_path)
        with artifacts.atomic_path(self._weights_path) as tmp:
            self.model.save_weights(tmp, overwrite=True)
        artifacts.write_json(self._training_metadata_path, {"epoch": self._current_epoch,
                                                            "batch": self._last_batch_seen})


class EpochRecorder(keras.callbacks.Callback):
    """Times each epoch and keeps one row of metrics per epoch, saved to the work dir and metrics.csv."""

    def __init__(self, train_images: int, epochs: int, rows: list[dict], work_dir, output_dir, emit: EventHook):
        super().__init__()
        self.train_images, self.epochs, self.rows = train_images, epochs, rows
        self.work_dir = None if work_dir is None else Path(work_dir)
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.emit = emit
        self.completed = rows[-1]["epoch"] if rows else 0
        self._t0 = self._t_train = 0.0
        self._batches = 0
        self.announcer = _Announcer(self)

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()
        self._t_train = 0.0
        self._batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self._batches = batch + 1

    def on_test_begin(self, logs=None):
        if not self._t_train:  # validation inside fit: training time of this epoch ends here
            self._t_train = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        now = time.perf_counter()
        train_seconds = (self._t_train or now) - self._t0
        steps = (self.params or {}).get("steps")  # a budget's last epoch stops part way through
        images = self.train_images * min(1.0, self._batches / steps) if steps and self._batches else self.train_images
        lr = self.model.optimizer.learning_rate
        row = {
            "epoch": epoch + 1,
            "loss": _num(logs.get("loss")),
            "accuracy": _num(logs.get("accuracy")),
            "val_loss": _num(logs.get("val_loss")),
            "val_accuracy": _num(logs.get("val_accuracy")),
            "learning_rate": float(f"{_num(keras.ops.convert_to_numpy(lr)):.6g}"),
            "seconds": round(now - self._t0, 4),
            "images_per_second": round(images / train_seconds, 2) if train_seconds > 0 else None,
        }
        self.rows[:] = [r for r in self.rows if r["epoch"] < row["epoch"]] + [row]
        if self.work_dir is not None:
            artifacts.write_json(self.work_dir / "history.json", self.rows)

    def announce(self):
        self.completed = self.rows[-1]["epoch"]
        if self.output_dir is not None:
            artifacts.write_metrics_csv(self.output_dir / "metrics.csv", self.rows)
        self.emit("epoch_end", {**self.rows[-1], "epochs": self.epochs})


class _Announcer(keras.callbacks.Callback):
    def __init__(self, recorder: EpochRecorder):
        super().__init__()
        self.recorder = recorder

    def on_epoch_end(self, epoch, logs=None):
        self.recorder.announce()


class StopOnRequest(keras.callbacks.Callback):
    """Raise `TrainingInterrupted` at the next batch once ``event`` is set (the epoch's backup stays the last one)."""

    def __init__(self, event: threading.Event, recorder: EpochRecorder):
        super().__init__()
        self.event, self.recorder = event, recorder

    def _check(self, *args, **kwargs):
        if self.event.is_set():
            raise TrainingInterrupted(self.recorder.completed)

    on_train_batch_end = on_test_batch_end = on_epoch_end = _check


def _num(value):
    if value is None:
        return None
    value = float(np.asarray(value))
    return value if np.isfinite(value) else None


class BestWeights(keras.callbacks.Callback):
    """Keep the weights of the epoch with the lowest ``monitor`` and put them back when training ends.

    The recipe returned the last epoch's weights, and on small datasets one noisy final epoch can undo a good model.
    With a ``work_dir`` the best weights are saved there too, so a resumed run still knows them.
    """

    def __init__(self, monitor: str = "val_loss", work_dir=None, resumed_from: int = 0, validation=None):
        super().__init__()
        self.monitor = monitor
        self.validation = validation  # to score the weight average against the best epoch when fit ends
        self.averaged: dict | None = None
        self.dir = None if work_dir is None else Path(work_dir)
        self.best = np.inf
        self.best_epoch = 0
        self.last_epoch = resumed_from
        self.restored = False
        self._weights = None
        if self.dir is not None:
            meta = load_json(self.dir / "best.json", {})
            if 0 < meta.get("epoch", 0) <= resumed_from and (self.dir / "best.weights.h5").exists():
                self.best, self.best_epoch = float(meta["value"]), int(meta["epoch"])

    def on_epoch_end(self, epoch, logs=None):
        self.last_epoch = epoch + 1
        value = (logs or {}).get(self.monitor)
        if value is None or not np.isfinite(value) or value >= self.best:
            return
        self.best, self.best_epoch = float(value), epoch + 1
        self._weights = self.model.get_weights()
        if self.dir is not None:
            with artifacts.atomic_path(self.dir / "best.weights.h5") as tmp:
                self.model.save_weights(tmp)
            artifacts.write_json(self.dir / "best.json", {"epoch": self.best_epoch, "value": self.best,
                                                          "monitor": self.monitor})

    def on_train_end(self, logs=None):
        optimizer = getattr(self.model.optimizer, "inner_optimizer", self.model.optimizer)
        if getattr(optimizer, "use_ema", False) and self.validation is not None and self.monitor == "val_loss":
            # fit has just swapped the weight average in: it stays if it beats the best epoch on validation.
            value = float(self.model.evaluate(self.validation, verbose=0, return_dict=True)["loss"])
            kept = not self.best_epoch or value <= self.best
            self.averaged = {"val_loss": round(value, 5), "best_epoch_val_loss": round(self.best, 5)
                             if self.best_epoch else None, "kept": kept}
            log.info("weight average: validation loss %.4f against %.4f at epoch %d: %s", value, self.best,
                     self.best_epoch, "kept" if kept else "the best epoch's weights restored")
            if kept:
                return
        elif not self.best_epoch or self.best_epoch == self.last_epoch:
            return
        if self._weights is not None:
            self.model.set_weights(self._weights)
        else:
            self.model.load_weights(self.dir / "best.weights.h5")
        self.restored = True


class BudgetCallback(keras.callbacks.Callback):
    """Runs a time budget's `trainer.fitting.budget.Schedule` in training: sets the learning rate before each batch,
    stops at the hard stop and when the plan is done, and keeps the recorder's planned epoch count (what the events
    announce) in step with the plan."""

    def __init__(self, schedule, recorder: EpochRecorder, work_dir=None):
        super().__init__()
        self.schedule, self.recorder = schedule, recorder
        self.work = None if work_dir is None else Path(work_dir)
        self.epoch, self.epoch_started = schedule.span.first_epoch, 0.0

    @property
    def stopped_by(self) -> str | None:
        return self.schedule.stopped_by

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch, self.epoch_started = epoch, time.monotonic()

    def on_train_batch_begin(self, batch, logs=None):
        span = self.schedule.span
        step = (self.epoch - span.phase_start) * span.steps_per_epoch + batch
        self.model.optimizer.learning_rate.assign(self.schedule.learning_rate(step))

    def on_train_batch_end(self, batch, logs=None):
        if not self.model.stop_training and self.schedule.time_is_up():
            # The usual end of a budget: the learning rate has reached its floor, in this epoch.
            log.info("budget: the training time is up after step %d of epoch %d; stopping", batch + 1, self.epoch + 1)
            self.model.stop_training = True
            before, self.schedule.planned_end = self.schedule.planned_end, self.epoch + 1
            self.recorder.epochs += self.schedule.planned_end - before

    def on_epoch_end(self, epoch, logs=None):
        self.schedule.clock.save(self.work)
        if self.model.stop_training:  # stopped by the time: the plan was closed above
            return
        before = self.schedule.planned_end
        if self.schedule.epoch_ended(epoch, time.monotonic() - self.epoch_started):
            self.model.stop_training = True
        self.recorder.epochs += self.schedule.planned_end - before
