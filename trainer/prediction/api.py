"""Using a trained model: load it, predict labels for image files, evaluate it on a labelled folder."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import trainer.network.layers  # noqa: F401 - registers dropfit's layers, so safe_mode loading knows them
from contract.files import LABELS_FILE, MODEL_FILE
from trainer.data.images import BadImage, load_rgb, probe
from trainer.data.pipeline import Batches, decode_native, make_dataset, resize
from trainer.data.scan import DatasetError, scan_directory
from trainer.outputs.report import classification_report


def load_model(model_dir: str | os.PathLike) -> keras.Model:
    """Load ``model.keras`` and ``labels.json`` from an output folder (or a ``.keras`` file beside its labels).

    Models are loaded with Keras' ``safe_mode``: a model file can never run code. ``model.class_names`` is set.
    """
    path = Path(model_dir)
    model_file = path if path.suffix == ".keras" else path / MODEL_FILE
    labels_file = model_file.with_name(LABELS_FILE)
    if not model_file.is_file():
        raise FileNotFoundError(f"no {MODEL_FILE} in {str(model_dir)!r}; expected a dropfit output folder")
    model = keras.models.load_model(model_file, safe_mode=True)
    try:
        labels = json.loads(labels_file.read_text(encoding="utf-8"))
        model.class_names = list(labels["classes"])
        model.calibration = labels.get("calibration")
    except FileNotFoundError:
        model.class_names = [str(i) for i in range(model.output_shape[-1])]
    return model


def threshold(model, min_confidence) -> float | None:
    """The probability below which an answer is "unknown": ``min_confidence`` checked, or the model's suggested one."""
    if min_confidence is None:
        return None
    if min_confidence == "suggested":
        value = (getattr(model, "calibration", None) or {}).get("min_confidence")
        if value is None:
            raise ValueError("min_confidence='suggested': this model's labels.json records no threshold (it was not "
                             "calibrated, or no threshold reached the target accuracy)")
        return float(value)
    try:
        value = float(min_confidence)
    except (TypeError, ValueError):
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"min_confidence must be a probability from 0 to 1 or 'suggested'. "
                         f"Received: min_confidence={min_confidence!r}")
    return value


def _as_model(model) -> keras.Model:
    return model if isinstance(model, keras.Model) else load_model(model)


def _class_names(model: keras.Model) -> list[str]:
    names = getattr(model, "class_names", None)
    return list(names) if names else [str(i) for i in range(model.output_shape[-1])]


def decode_file(path: str | os.PathLike, channels: int = 3, target_size: tuple[int, int] | None = None) -> tf.Tensor:
    """Decode an image file to a uint8 tensor the way the training pipeline does (native decoders when it can;
    with ``target_size``, large JPEGs are decoded at reduced scale as in training).

    Raises:
        BadImage: if the file is not a readable image.
    """
    if probe(path).native:
        data = tf.io.read_file(os.fsencode(path))
        try:
            return decode_native(data, channels, target_size or (1, 1))
        except tf.errors.OpError as exc:
            raise BadImage(f"cannot decode: {exc.message}") from None
    return tf.convert_to_tensor(load_rgb(path, channels, target_size))


UNKNOWN = "unknown"


def predict(model, images, *, top_k: int = 1, batch_size: int = 32, min_confidence=None) -> list[dict]:
    """Predict the class of each image.

    Args:
        model: a ``keras.Model`` (with ``class_names``) or the path of a dropfit output folder.
        images: image file paths (any format, size or colour mode Pillow reads) or uint8 arrays (H, W, C).
        top_k: how many of the most likely classes to list per image.
        min_confidence: a probability from 0 to 1 (the model's are calibrated), or ``"suggested"`` for the threshold
            the training recorded in labels.json: below it, ``label`` is ``"unknown"`` (``best`` keeps the guess).

    Returns:
        One dict per image, in order: ``file``, ``label``, ``probability`` and ``top_k`` (a list of
        ``{label, probability}``), or ``file`` and ``error`` for a file that could not be read.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer. Received: top_k={top_k!r}")
    model = _as_model(model)
    cut = threshold(model, min_confidence)
    names = _class_names(model)
    height, width, channels = model.input_shape[1:]
    top_k = min(top_k, len(names))
    results: list[dict | None] = []
    batch: list[tf.Tensor] = []
    slots: list[int] = []

    def flush():
        if not batch:
            return
        probs = np.asarray(model.predict_on_batch(tf.stack(batch)))
        for slot, p in zip(slots, probs, strict=True):
            order = np.argsort(-p)[:top_k]
            ranked = [{"label": names[i], "probability": float(p[i])} for i in order]
            results[slot].update(label=ranked[0]["label"], probability=ranked[0]["probability"], top_k=ranked)
            if cut is not None and ranked[0]["probability"] < cut:
                results[slot].update(label=UNKNOWN, best=ranked[0]["label"])
        batch.clear()
        slots.clear()

    for i, item in enumerate(images):
        name = f"<array {i}>" if isinstance(item, np.ndarray) else str(item)
        results.append({"file": name})
        try:
            if isinstance(item, np.ndarray):
                image = tf.convert_to_tensor(item.astype(np.uint8) if item.ndim == 3 else item[..., None])
                if image.shape[-1] != channels:
                    image = tf.image.rgb_to_grayscale(image) if channels == 1 else tf.image.grayscale_to_rgb(image)
            else:
                image = decode_file(item, channels, (height, width))
        except (BadImage, OSError) as exc:
            results[i]["error"] = str(exc)
            continue
        batch.append(resize(image, (height, width)))
        slots.append(i)
        if len(batch) >= batch_size:
            flush()
    flush()
    return results


def evaluate(model, data_dir: str | os.PathLike, *, batch_size: int = 32) -> dict:
    """Accuracy, per-class precision/recall/F1 and confusion matrix of a model on a class-per-folder dataset.

    Every class folder in ``data_dir`` must be one of the model's classes; the model's other classes may be absent.
    """
    model = _as_model(model)
    names = _class_names(model)
    scan = scan_directory(data_dir, allow_missing=True, what="data_dir")
    unknown = [c for c in scan.class_names if c not in names]
    if unknown:
        raise DatasetError(f"data_dir {str(data_dir)!r} has a folder {unknown[0]!r} that is not one of the model's "
                           f"classes {names}")
    if not scan.samples:
        raise DatasetError(f"data_dir {str(data_dir)!r} holds no usable image")
    index = {c: names.index(c) for c in scan.class_names}
    samples = [replace(s, label=index[scan.class_names[s.label]]) for s in scan.samples]
    height, width, channels = model.input_shape[1:]
    ds = make_dataset(samples, Batches(len(names), (height, width), batch_size, channels),
                      cache=False)
    report = classification_report(*labels_and_predictions(model, ds), names)
    report["skipped"] = [{"file": s.path, "reason": s.reason} for s in scan.skipped]
    return report


def labels_and_predictions(model: keras.Model, ds: tf.data.Dataset, with_details: bool = False):
    """True and predicted class indices over a dataset of ``(images, one-hot labels[, index])`` batches.

    With ``with_details`` (and a dataset made ``with_index``) also the probabilities and each image's index.
    """
    y_true, y_pred, probs, index = [], [], [], []
    for batch in ds:
        p = np.asarray(model.predict_on_batch(batch[0]))
        probs.append(p)
        y_pred.append(np.argmax(p, axis=-1))
        y_true.append(np.argmax(batch[1].numpy(), axis=-1))
        if len(batch) > 2:
            index.append(batch[2].numpy())
    if not y_true:
        empty = np.zeros(0, np.int64)
        return (empty, empty, np.zeros((0, model.output_shape[-1])), empty) if with_details else (empty, empty)
    y_true, y_pred = np.concatenate(y_true), np.concatenate(y_pred)
    if not with_details:
        return y_true, y_pred
    return y_true, y_pred, np.concatenate(probs), np.concatenate(index) if index else np.arange(len(y_true))
