"""Exports beside ``model.keras``: a TensorFlow SavedModel (for TF Serving) and a TFLite flatbuffer.

Each export is loaded back and run on real images; it must give the Keras model's predictions (same top class,
probabilities within a small tolerance) or the export fails.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import tensorflow as tf

from trainer import artifacts

log = logging.getLogger(__name__)

FORMATS = ("savedmodel", "tflite")
TOLERANCE = {"savedmodel": 1e-5, "tflite": 1e-3}


class ExportError(RuntimeError):
    """An export that could not be written or does not predict like the model."""


def export_model(model, fmt: str, out: Path, images: np.ndarray) -> tuple[Path, dict]:
    """Write ``fmt`` into ``out`` and check it on ``images`` (uint8, as the model takes them)."""
    expected = np.asarray(model.predict(images, verbose=0))
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp:
        saved = Path(tmp) / "savedmodel"
        _export_savedmodel(model, saved)
        if fmt == "savedmodel":
            got = _run_savedmodel(saved, images)
            target = out / "savedmodel"
            _check(fmt, expected, got)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(saved, target)  # a folder: replaced in one rename once complete
        elif fmt == "tflite":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                flatbuffer = tf.lite.TFLiteConverter.from_saved_model(str(saved)).convert()
            got = _run_tflite(flatbuffer, images)
            _check(fmt, expected, got)
            target = artifacts.write_bytes(out / "model.tflite", flatbuffer)
        else:
            raise ExportError(f"unknown export format {fmt!r}; expected one of {FORMATS}")
    diff = float(np.max(np.abs(expected - got)))
    log.info("exported %s to %s (max difference %.2g on %d images)", fmt, target, diff, len(images))
    return target, {"max_abs_diff": diff, "same_top1": True, "images": len(images)}


def _export_savedmodel(model, path: Path) -> None:
    """A SavedModel whose ``serve`` signature always runs the model in inference mode."""
    import keras

    archive = keras.export.ExportArchive()
    archive.track(model)
    spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="image")
    archive.add_endpoint(name="serve", fn=lambda images: model(images, training=False), input_signature=[spec])
    archive.write_out(str(path), verbose=False)


def _check(fmt: str, expected: np.ndarray, got: np.ndarray) -> None:
    diff = float(np.max(np.abs(expected - got)))
    if diff > TOLERANCE[fmt] or not np.array_equal(expected.argmax(-1), got.argmax(-1)):
        raise ExportError(f"the {fmt} export does not predict like the Keras model (max difference {diff:.3g})")


def _run_savedmodel(path: Path, images: np.ndarray) -> np.ndarray:
    loaded = tf.saved_model.load(str(path))
    return np.asarray(loaded.serve(tf.constant(images, tf.float32)))


def _run_tflite(flatbuffer: bytes, images: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(model_content=flatbuffer)
    inp, outp = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(inp["index"], list(images.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], images.astype(inp["dtype"]))
    interpreter.invoke()
    return np.asarray(interpreter.get_tensor(outp["index"]))
