"""Exports beside ``model.keras``, each one what people deploy and each one checked:

| format | file | for |
| --- | --- | --- |
| ``savedmodel`` | ``savedmodel/`` | TF Serving, TensorFlow |
| ``tflite`` | ``model.tflite`` | phones and edge devices (float32) |
| ``tflite_int8`` | ``model_int8.tflite`` | microcontrollers, NPUs, Edge TPU: full-integer quantised, uint8 pixels in |
| ``onnx`` | ``model.onnx`` | onnxruntime, TensorRT, anything without TensorFlow |
| ``openvino`` | ``openvino/model.xml`` (+ ``.bin``) | OpenVINO on Intel CPUs, GPUs and NPUs |

Every format takes raw 0-255 pixels (preprocessing, and the calibration temperature, are inside the model) and
returns calibrated probabilities. After writing one, the export is loaded and run on held-out images (the validation
split when there is one) exactly as a user's program would, and measured the same way as ``model.keras``: seconds to
load, images per second, milliseconds for one image, accuracy, top-1 agreement with ``model.keras`` and the largest
probability difference. The table goes into ``exports.json`` and the report. A float format that does not give the
model's answers on at least `FLOAT_AGREEMENT` of the images fails the job (a converter that does not match this
TensorFlow/Keras, named with their versions); an INT8 model that loses more than `INT8_MAX_LOSS` of accuracy is kept,
and the job's warnings, status and report say so. A failed conversion is an `ExportError` naming the format, and
leaves no file behind (everything is written to a temporary folder, then renamed into place). The ONNX and OpenVINO
files are run in a separate process that never imports TensorFlow (`trainer.outputs.export_run`), as a user's service
would.
"""

from __future__ import annotations

import errno
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
from importlib import metadata
from pathlib import Path

import numpy as np
import tensorflow as tf

from contract.files import EXPORT_FILES
from contract.spec import EXPORT_FORMATS
from trainer.outputs import artifacts

log = logging.getLogger(__name__)

FORMATS, FILES = EXPORT_FORMATS, EXPORT_FILES  # defined once, with the spec
OPENVINO_XML = "model.xml"  # inside FILES["openvino"], beside its model.bin
FLOAT_AGREEMENT = 0.995
INT8_MAX_LOSS = 0.01
CHECK_IMAGES = 1000  # held-out images each export is checked on (a seeded sample when there are more)
REPRESENTATIVE_IMAGES = 200  # training images the INT8 quantiser calibrates its ranges on
BATCH = 64  # images per call when measuring throughput
LATENCY_RUNS = 30
# The packages an export's correctness depends on, named in every export error (a converter that no longer matches
# TensorFlow/Keras is the usual cause) and recorded in exports.json.
PACKAGES = ("tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "openvino")


class ExportError(RuntimeError):
    """An export that could not be written, or that does not predict like the model."""


def versions() -> dict[str, str | None]:
    """Installed versions of `PACKAGES` (None: not installed)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _versions_text() -> str:
    return ", ".join(f"{k} {v}" for k, v in versions().items() if v)


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
            if _disk_full(exc):  # our disk, not the converter: a full disk, as for any other file
                raise OSError(errno.ENOSPC, "No space left on device", str(target)) from exc
            raise ExportError(f"the {fmt} export failed ({_versions_text()}): {type(exc).__name__}: "
                              f"{str(exc).strip()[:500]}") from exc
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(written, target)  # a folder (SavedModel, OpenVINO) or a file: in place in one rename, once complete
    return target


def _disk_full(exc: BaseException | None) -> bool:
    """Whether a converter's error (or one it was raised from) is a full disk or quota: TensorFlow and the ONNX and
    OpenVINO writers say so in their own exception types, often with no errno."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc).lower()
        if "no space left on device" in text or "disk quota exceeded" in text:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def check_export(fmt: str, path: Path, images: np.ndarray, labels: np.ndarray | None, expected: np.ndarray,
                 reference: dict | None = None) -> dict:
    """Load an export as a user would, run it on ``images`` (uint8) and compare it with ``expected`` (the Keras
    model's probabilities); ``reference`` is the Keras row, for the accuracy an INT8 model loses.

    Raises:
        ExportError: a float format that disagrees with the Keras model (the export is removed).
    """
    runner = {"savedmodel": _run_savedmodel, "tflite": _run_tflite, "tflite_int8": _run_tflite,
              "onnx": _run_elsewhere, "openvino": _run_elsewhere}[fmt]
    got, timings = runner(path, images, fmt)
    row = _row(fmt, path, got, expected, labels, timings, reference)
    if fmt != "tflite_int8" and row["agreement"] is not None and row["agreement"] < FLOAT_AGREEMENT:
        _remove(path)
        raise ExportError(f"the {fmt} export gives the Keras model's top answer on only {row['agreement']:.1%} of "
                          f"{len(images)} held-out images (at least {FLOAT_AGREEMENT:.1%} expected); not kept. "
                          f"Is a converter out of step with TensorFlow/Keras? ({_versions_text()})")
    return row


def keras_row(path: Path, images: np.ndarray, labels: np.ndarray | None) -> tuple[dict, np.ndarray]:
    """The reference row: ``model.keras`` loaded from its file as a user would (plain Keras, safe mode), and its
    probabilities on ``images``."""
    import keras

    started = time.perf_counter()
    model = keras.saving.load_model(path, safe_mode=True)
    load_seconds = time.perf_counter() - started
    run = model.predict_on_batch
    probs, timings = _timed(lambda batch: np.asarray(run(batch)), images.astype(np.float32), load_seconds)
    return _row("keras", path, probs, probs, labels, timings, None), probs


def export_all(model, formats, out: Path, keras_file: Path, data) -> dict:
    """Write and check every export in ``formats``; ``data()`` gives (held-out uint8 images, their labels,
    representative training images, the held-out split's name). Returns the table exports.json holds."""
    images, labels, representative, split = data()
    reference, expected = keras_row(keras_file, images, labels)
    rows = [reference]
    for fmt in formats:
        path = export_model(model, fmt, out, representative)
        rows.append(check_export(fmt, path, images, labels, expected, reference))
        log.info("exported %s: %s, agreement %.4f, %.0f images/s, %.2f ms per image", fmt, path,
                 rows[-1]["agreement"], rows[-1]["images_per_second"] or 0, rows[-1]["latency_ms"])
    return {"split": split, "images": len(images), "float_agreement_required": FLOAT_AGREEMENT,
            "int8_max_accuracy_loss": INT8_MAX_LOSS, "rows": rows, "warnings": [w for w in [int8_warning(rows)] if w],
            "versions": versions()}


def int8_warning(rows: list[dict]) -> str | None:
    """The warning for an INT8 export that lost more than `INT8_MAX_LOSS` of accuracy, if it did."""
    by = {r["format"]: r for r in rows}
    int8, ref = by.get("tflite_int8"), by.get("keras")
    if int8 and ref and int8["accuracy"] is not None and ref["accuracy"] - int8["accuracy"] > INT8_MAX_LOSS:
        return (f"the tflite_int8 export loses {100 * (ref['accuracy'] - int8['accuracy']):.1f} points of accuracy "
                f"({int8['accuracy']:.1%} against {ref['accuracy']:.1%} on {int8['images']} held-out images; at most "
                f"{100 * INT8_MAX_LOSS:.0f} expected); prefer tflite (float) where that matters")
    return None


def load_arrays(samples, target_size, channels: int, limit: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``limit`` of ``samples`` (a seeded sample), decoded as the model sees them: (uint8 images, labels)."""
    from trainer.data.pipeline import Batches, make_dataset

    if not samples:
        return np.zeros((0, *target_size, channels), np.uint8), np.zeros(0, np.int64)
    rng = np.random.default_rng(seed)
    chosen = [samples[i] for i in sorted(rng.choice(len(samples), min(limit, len(samples)), replace=False))]
    num_classes = max(s.label for s in chosen) + 1
    images, labels = [], []
    for x, y in make_dataset(chosen, Batches(num_classes, target_size, 64, channels), cache=False):
        images.append(x.numpy())
        labels.append(np.argmax(y.numpy(), axis=-1))
    return np.concatenate(images).astype(np.uint8), np.concatenate(labels)


# --- writing -----------------------------------------------------------------------------------------------------

def _write(model, fmt: str, tmp: Path, representative: np.ndarray) -> Path:
    if fmt in ("onnx", "openvino"):
        path = tmp / FILES["onnx"]
        spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="image")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.export(str(path), format="onnx", verbose=False, input_signature=[spec])
        return path if fmt == "onnx" else _openvino_from_onnx(path, tmp / FILES["openvino"])
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


def _openvino_from_onnx(onnx_file: Path, folder: Path) -> Path:
    """The OpenVINO IR of the (checked) ONNX graph, read by OpenVINO's own ONNX front end. Not through ``ovc`` /
    ``openvino.convert_model``: those report usage to Intel unless opted out, and a trainer sends nothing anywhere.
    Weights stay float32 (OpenVINO's default would halve them to float16), so the IR answers as the model does."""
    import openvino as ov

    folder.mkdir()
    ov.save_model(ov.Core().read_model(str(onnx_file)), str(folder / OPENVINO_XML), compress_to_fp16=False)
    return folder


def _export_savedmodel(model, path: Path) -> None:
    """A SavedModel whose ``serve`` signature always runs the model in inference mode."""
    import keras

    archive = keras.export.ExportArchive()
    archive.track(model)
    spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="image")
    archive.add_endpoint(name="serve", fn=lambda images: model(images, training=False), input_signature=[spec])
    archive.write_out(str(path), verbose=False)


# --- running -----------------------------------------------------------------------------------------------------

def _timed(run, images: np.ndarray, load_seconds: float) -> tuple[np.ndarray, dict]:
    """``run`` (a batch to probabilities) over ``images`` in batches of `BATCH`, with the row's timings."""
    started = time.perf_counter()
    probs = [np.asarray(run(images[i:i + BATCH]), np.float32) for i in range(0, len(images), BATCH)]
    elapsed = time.perf_counter() - started
    one = images[:1]
    for _ in range(3):
        run(one)
    times = []
    for _ in range(LATENCY_RUNS):
        started = time.perf_counter()
        run(one)
        times.append(time.perf_counter() - started)
    return (np.concatenate(probs) if probs else np.zeros((0, 0), np.float32),
            {"load_seconds": round(load_seconds, 4),
             "images_per_second": round(len(images) / elapsed, 1) if elapsed > 0 else None,
             "latency_ms": round(1000 * statistics.median(times), 3)})


def _run_savedmodel(path: Path, images: np.ndarray, fmt: str) -> tuple[np.ndarray, dict]:
    started = time.perf_counter()
    loaded = tf.saved_model.load(str(path))
    load_seconds = time.perf_counter() - started
    return _timed(lambda batch: loaded.serve(tf.constant(batch, tf.float32)), images, load_seconds)


def _interpreter(path: Path, shape):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(model_path=str(path))
    inp = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inp["index"], list(shape))
    interpreter.allocate_tensors()
    return interpreter, inp, interpreter.get_output_details()[0]


def _run_tflite(path: Path, images: np.ndarray, fmt: str) -> tuple[np.ndarray, dict]:
    started = time.perf_counter()
    interpreter, inp, outp = _interpreter(path, (BATCH, *images.shape[1:]))
    load_seconds = time.perf_counter() - started
    shape = [BATCH]

    def run(batch):
        if len(batch) != shape[0]:  # the interpreter's tensors have a fixed batch: resized when it changes
            interpreter.resize_tensor_input(inp["index"], list(batch.shape))
            interpreter.allocate_tensors()
            shape[0] = len(batch)
        interpreter.set_tensor(inp["index"], batch.astype(inp["dtype"]))
        interpreter.invoke()
        return interpreter.get_tensor(outp["index"])

    return _timed(run, images, load_seconds)


def _run_elsewhere(path: Path, images: np.ndarray, fmt: str) -> tuple[np.ndarray, dict]:
    """ONNX (onnxruntime) and OpenVINO in a fresh interpreter that must not load TensorFlow (what a user's service
    has): `trainer.outputs.export_run`."""
    model = path / OPENVINO_XML if fmt == "openvino" else path
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "images.npy", Path(tmp) / "probs.npy"
        np.save(src, images)
        proc = subprocess.run([sys.executable, "-m", "trainer.outputs.export_run", fmt, str(model), str(src), str(dst)],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise ExportError(f"the {fmt} export does not run ({_versions_text()}): {proc.stderr.strip()[-800:]}")
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        if report.pop("tensorflow_loaded"):
            raise ExportError(f"checking the {fmt} export loaded TensorFlow; it must run without it")
        if "default_precision" in report:
            report["default_precision"] = {"precision": report["default_precision"],
                                           "probabilities": np.load(Path(tmp) / "probs.default.npy")}
        return np.load(dst), report


def _row(fmt: str, path: Path, got: np.ndarray, expected: np.ndarray, labels, timings: dict,
         reference: dict | None) -> dict:
    n = len(got)
    top = got.argmax(-1) if n else got
    other = timings.pop("default_precision", None)
    if other is not None:  # OpenVINO where the CPU's own default precision is not float32 (bfloat16 units)
        probs = other.pop("probabilities")
        timings["default_precision"] = {**other, "agreement": float((probs.argmax(-1) == expected.argmax(-1)).mean()),
                                        "max_abs_diff": float(np.max(np.abs(probs - expected)))}
    accuracy = float((top == labels).mean()) if labels is not None and len(labels) else None
    loss = (reference["accuracy"] - accuracy if reference is not None and accuracy is not None
            and reference.get("accuracy") is not None else None)
    agreement = float((top == expected.argmax(-1)).mean()) if n else None
    ok = (loss is None or loss <= INT8_MAX_LOSS) if fmt == "tflite_int8" else (agreement is None or
                                                                               agreement >= FLOAT_AGREEMENT)
    file = f"{path.name}/{OPENVINO_XML}" if fmt == "openvino" else path.name
    return {"format": fmt, "file": file, "size_bytes": _size(path), **timings,
            "accuracy": accuracy, "accuracy_loss": None if loss is None else round(loss, 6),
            "agreement": agreement, "max_abs_diff": float(np.max(np.abs(got - expected))) if n else None,
            "images": n, "ok": ok}


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
