"""Exports beside ``model.keras``, each one what people deploy and each one checked:

| format | file | for |
| --- | --- | --- |
| ``savedmodel`` | ``savedmodel/`` | TF Serving, TensorFlow |
| ``tflite`` | ``model.tflite`` | phones and edge devices (float32) |
| ``tflite_int8`` | ``model_int8.tflite`` | microcontrollers, NPUs, Edge TPU: full-integer quantised, uint8 pixels in |
| ``onnx`` | ``model.onnx`` | onnxruntime, TensorRT, OpenVINO, anything without TensorFlow |

Every format takes raw 0-255 pixels (preprocessing, and the calibration temperature, are inside the model) and
returns calibrated probabilities. After writing one, the export is run on held-out images: its accuracy, its top-1
agreement with ``model.keras``, its file size and its per-image latency here go into the report. A float format
that does not give the model's answers on at least `FLOAT_AGREEMENT` of them fails the job; an INT8 model that loses
more than `INT8_MAX_LOSS` of accuracy is kept with a warning. A failed conversion is an `ExportError` naming the
format, and leaves no file behind (everything is written to a temporary folder, then renamed into place). The ONNX
file is run by onnxruntime in a separate process that never imports TensorFlow (`trainer.onnx_run`), as a user's
service would.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import tensorflow as tf

from trainer import artifacts

log = logging.getLogger(__name__)

FORMATS = ("savedmodel", "tflite", "tflite_int8", "onnx")
FILES = {"savedmodel": "savedmodel", "tflite": "model.tflite", "tflite_int8": "model_int8.tflite",
         "onnx": "model.onnx"}
FLOAT_AGREEMENT = 0.995
INT8_MAX_LOSS = 0.01
CHECK_IMAGES = 1000  # held-out images each export is checked on (a seeded sample when there are more)
REPRESENTATIVE_IMAGES = 200  # training images the INT8 quantiser calibrates its ranges on
LATENCY_RUNS = 30


class ExportError(RuntimeError):
    """An export that could not be written, or that does not predict like the model."""


def export_model(model, fmt: str, out: Path, representative: np.ndarray) -> Path:
    """Write ``fmt`` into ``out``, atomically; ``representative`` (uint8 training images) calibrates INT8.

    Raises:
        ExportError: naming the format and why; nothing is left at the target.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    target = out / FILES[fmt]
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp:
        try:
            written = _write(model, fmt, Path(tmp), representative)
        except ExportError:
            raise
        except Exception as exc:  # converters raise anything from ConverterError to AttributeError
            raise ExportError(f"the {fmt} export failed: {type(exc).__name__}: {str(exc).strip()[:500]}") from exc
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(written, target)  # a folder (SavedModel) or a file: in place in one rename, once complete
    return target


def check_export(model, fmt: str, path: Path, images: np.ndarray, labels: np.ndarray | None,
                 expected: np.ndarray) -> dict:
    """Run an export on ``images`` (uint8) and compare it with ``expected`` (the Keras model's probabilities)."""
    runner = {"savedmodel": _run_savedmodel, "tflite": _run_tflite, "tflite_int8": _run_tflite,
              "onnx": _run_onnx}[fmt]
    got, latency = runner(path, images)
    row = _row(fmt, path, got, expected, labels, latency, len(images))
    if fmt != "tflite_int8" and row["agreement"] < FLOAT_AGREEMENT:
        _remove(path)
        raise ExportError(f"the {fmt} export gives the Keras model's top answer on only {row['agreement']:.1%} of "
                          f"{len(images)} held-out images (at least {FLOAT_AGREEMENT:.1%} expected); not kept")
    return row


def keras_row(model, path: Path, images: np.ndarray, labels: np.ndarray | None) -> tuple[dict, np.ndarray]:
    """The reference row (``model.keras``) and its probabilities on ``images``."""
    probs = np.asarray(model.predict(images, batch_size=64, verbose=0))
    one = tf.constant(images[:1])
    latency = _latency(lambda: model(one, training=False))
    return _row("keras", path, probs, probs, labels, latency, len(images)), probs


def int8_warning(rows: list[dict]) -> str | None:
    """The warning for an INT8 export that lost more than `INT8_MAX_LOSS` of accuracy, if it did."""
    by = {r["format"]: r for r in rows}
    int8, ref = by.get("tflite_int8"), by.get("keras")
    if int8 and ref and int8["accuracy"] is not None and ref["accuracy"] - int8["accuracy"] > INT8_MAX_LOSS:
        return (f"the tflite_int8 export loses {100 * (ref['accuracy'] - int8['accuracy']):.1f} points of accuracy "
                f"({int8['accuracy']:.1%} against {ref['accuracy']:.1%} on {int8['images']} held-out images); "
                "prefer tflite (float) where that matters")
    return None


def load_arrays(samples, target_size, channels: int, limit: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``limit`` of ``samples`` (a seeded sample), decoded as the model sees them: (uint8 images, labels)."""
    from trainer.data import make_dataset

    if not samples:
        return np.zeros((0, *target_size, channels), np.uint8), np.zeros(0, np.int64)
    rng = np.random.default_rng(seed)
    chosen = [samples[i] for i in sorted(rng.choice(len(samples), min(limit, len(samples)), replace=False))]
    num_classes = max(s.label for s in chosen) + 1
    images, labels = [], []
    for x, y in make_dataset(chosen, num_classes=num_classes, target_size=target_size, batch_size=64,
                             channels=channels, cache=False):
        images.append(x.numpy())
        labels.append(np.argmax(y.numpy(), axis=-1))
    return np.concatenate(images).astype(np.uint8), np.concatenate(labels)


# --- writing -----------------------------------------------------------------------------------------------------

def _write(model, fmt: str, tmp: Path, representative: np.ndarray) -> Path:
    if fmt == "onnx":
        path = tmp / FILES[fmt]
        spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="image")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.export(str(path), format="onnx", verbose=False, input_signature=[spec])
        return path
    saved = tmp / "savedmodel"
    _export_savedmodel(model, saved)
    if fmt == "savedmodel":
        return saved
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
    if fmt == "tflite_int8":
        if len(representative) == 0:
            raise ExportError("the tflite_int8 export needs training images to calibrate on; none were decoded")
        # A black and a white image pin the input's range to 0-255: raw uint8 pixels then go in as they are
        # (scale 1, zero point 0) whatever range the training images happen to span.
        extremes = np.stack([np.zeros_like(representative[0]), np.full_like(representative[0], 255)])
        calibration = np.concatenate([extremes, representative]).astype(np.float32)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([calibration[i:i + 1]] for i in range(len(calibration)))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8  # raw pixels in; calibrated float probabilities out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flatbuffer = converter.convert()
    path = artifacts.write_bytes(tmp / FILES[fmt], flatbuffer)
    if fmt == "tflite_int8":
        scale, zero = _interpreter(path, (1, *model.input_shape[1:]))[1]["quantization"]
        if (scale, zero) != (1.0, 0):
            raise ExportError(f"the tflite_int8 export's input is quantised with scale {scale} and zero point "
                              f"{zero}, not raw 0-255 pixels (scale 1, zero point 0)")
    return path


def _export_savedmodel(model, path: Path) -> None:
    """A SavedModel whose ``serve`` signature always runs the model in inference mode."""
    import keras

    archive = keras.export.ExportArchive()
    archive.track(model)
    spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="image")
    archive.add_endpoint(name="serve", fn=lambda images: model(images, training=False), input_signature=[spec])
    archive.write_out(str(path), verbose=False)


# --- running -----------------------------------------------------------------------------------------------------

def _run_savedmodel(path: Path, images: np.ndarray) -> tuple[np.ndarray, float]:
    loaded = tf.saved_model.load(str(path))
    probs = np.concatenate([np.asarray(loaded.serve(tf.constant(images[i:i + 256], tf.float32)))
                            for i in range(0, len(images), 256)])
    one = tf.constant(images[:1], tf.float32)
    return probs, _latency(lambda: loaded.serve(one))


def _interpreter(path: Path, shape):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(model_path=str(path))
    inp = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inp["index"], list(shape))
    interpreter.allocate_tensors()
    return interpreter, inp, interpreter.get_output_details()[0]


def _run_tflite(path: Path, images: np.ndarray) -> tuple[np.ndarray, float]:
    interpreter, inp, outp = _interpreter(path, images.shape)
    interpreter.set_tensor(inp["index"], images.astype(inp["dtype"]))
    interpreter.invoke()
    probs = np.asarray(interpreter.get_tensor(outp["index"]), np.float32)
    single, inp1, _ = _interpreter(path, (1, *images.shape[1:]))
    single.set_tensor(inp1["index"], images[:1].astype(inp1["dtype"]))
    return probs, _latency(single.invoke)


def _run_onnx(path: Path, images: np.ndarray) -> tuple[np.ndarray, float]:
    """onnxruntime in a fresh interpreter that must not load TensorFlow (what a user's service has)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "images.npy", Path(tmp) / "probs.npy"
        np.save(src, images)
        proc = subprocess.run([sys.executable, "-m", "trainer.onnx_run", str(path), str(src), str(dst)],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise ExportError(f"the onnx export does not run in onnxruntime: {proc.stderr.strip()[-800:]}")
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        if report["tensorflow_loaded"]:
            raise ExportError("checking the onnx export loaded TensorFlow; it must run without it")
        return np.load(dst), report["latency_ms"]


def _latency(fn) -> float:
    """Median milliseconds of one call (batch of one image), after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(LATENCY_RUNS):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return round(1000 * statistics.median(times), 3)


def _row(fmt: str, path: Path, got: np.ndarray, expected: np.ndarray, labels, latency: float, n: int) -> dict:
    top = got.argmax(-1)
    return {"format": fmt, "file": path.name, "size_bytes": _size(path),
            "accuracy": float((top == labels).mean()) if labels is not None and len(labels) else None,
            "agreement": float((top == expected.argmax(-1)).mean()) if n else None,
            "max_abs_diff": float(np.max(np.abs(got - expected))) if n else None,
            "latency_ms": latency, "images": n}


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
