"""After training: the inputs of the advisor (`trainer.outputs.advisor`), which says whether the data is enough.

The learning curve needs the network's own view of the images: the features its last layer classifies (the input of
the final ``Dense``), read for a random sample of at most ``advisor.MAX_TRAIN`` training and ``advisor.MAX_VAL``
validation images (classes in proportion, on average), so the step costs seconds next to training; the curve's points
are then counted in images of the whole training set.
"""

from __future__ import annotations

import logging
import time

import keras
import numpy as np

from contract.options import TrainOptions
from trainer.data.dataset import Dataset
from trainer.data.pipeline import Batches, make_dataset
from trainer.outputs import advisor

log = logging.getLogger(__name__)


def advise(model: keras.Model, data: Dataset, o: TrainOptions) -> dict:
    """summary.json's ``advisor``: per-class checks with warnings, and (with validation images) the learning curve
    and what more images would buy."""
    started = time.monotonic()
    names = data.class_names
    smallest = {}
    for s in (*data.train, *data.val, *data.test):
        if s.size:
            side = min(s.size)
            smallest[names[s.label]] = min(side, smallest.get(names[s.label], side))
    duplicates: dict[str, int] = {}
    for group in (data.info.get("audit") or {}).get("groups", []):
        for label in group["labels"]:
            duplicates[label] = duplicates.get(label, 0) + 1
    out = advisor.data_checks(names, data.info["counts"], smallest, duplicates)
    out["learning_curve"] = _curve(model, data, o)
    out["seconds"] = round(time.monotonic() - started, 2)
    return out


def _curve(model: keras.Model, data: Dataset, o: TrainOptions) -> dict:
    if not data.val:
        return {"text": "no validation images: no learning curve (set validation_split above 0)", "gain_points": None}
    if len(data.train) < 4 * len(data.class_names):
        return {"text": "too few training images to draw a learning curve", "gain_points": None}
    extractor = _feature_model(model)
    if extractor is None:
        return {"text": "this network has no final Dense layer to read features from", "gain_points": None}
    rng = np.random.default_rng(o.seed)
    train = _sample(data.train, advisor.MAX_TRAIN, rng)
    val = _sample(data.val, advisor.MAX_VAL, rng)
    batches = Batches(len(data.class_names), data.target_size, o.batch_size, o.channels)
    tx, ty = _features(extractor, train, batches)
    vx, vy = _features(extractor, val, batches)
    points = advisor.learning_curve(tx, ty, vx, vy, len(data.class_names), seed=o.seed)
    scale = len(data.train) / len(train)
    for p in points:  # in images of the whole training set: the sample stands for it
        p["images"] = round(p["images"] * scale)
    result = advisor.advice(points, len(data.class_names), len(val))
    result["sampled"] = {"train": len(train), "validation": len(val)}
    return result


def _feature_model(model: keras.Model) -> keras.Model | None:
    dense = next((layer for layer in reversed(model.layers) if isinstance(layer, keras.layers.Dense)), None)
    if dense is None:
        return None
    return keras.Model(model.inputs, dense.input)


def _sample(samples: list, limit: int, rng: np.random.Generator) -> list:
    """At most ``limit`` of ``samples``, drawn at random (seeded)."""
    if len(samples) <= limit:
        return list(samples)
    chosen = sorted(rng.choice(len(samples), limit, replace=False))
    return [samples[i] for i in chosen]


def _features(extractor: keras.Model, samples: list, batches: Batches) -> tuple[np.ndarray, np.ndarray]:
    ds = make_dataset(samples, batches, cache=False, with_index=True)
    xs, ys = [], []
    for x, y, _ in ds:
        xs.append(np.asarray(extractor.predict_on_batch(x), np.float32).reshape(len(y), -1))
        ys.append(np.argmax(y.numpy(), axis=-1))
    return np.concatenate(xs), np.concatenate(ys)
