"""Run an ONNX or OpenVINO export as a service without TensorFlow would: the export check's other process.

    python -m trainer.outputs.export_run FORMAT MODEL IMAGES.npy PROBS.npy

``FORMAT`` is ``onnx`` (``MODEL``: the .onnx file, run by onnxruntime) or ``openvino`` (``MODEL``: the IR's .xml,
run by OpenVINO on the CPU in float32; where the CPU's default is another precision, e.g. bfloat16, it is run that
way too and those probabilities are written beside, as ``PROBS.default.npy``). Reads uint8 images (N, H, W, C),
writes the probabilities, and prints one JSON line: seconds to load the model, images per second in batches of
`BATCH`, the median milliseconds of one image (batch of one), and whether TensorFlow was loaded (it must not be).
Imports numpy and the format's runtime only."""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np

BATCH = 64
LATENCY_RUNS = 30


def _load(fmt: str, model: str):
    """A function from a float32 batch to probabilities."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda images: session.run(None, {name: images})[0]
    if fmt in ("openvino", "openvino-default"):
        import openvino as ov

        # float32 unless asked for the device's default: on CPUs with bfloat16 units OpenVINO computes in bfloat16
        # by default, which is not the model's arithmetic (measured apart, see `main`).
        config = {} if fmt == "openvino-default" else {"INFERENCE_PRECISION_HINT": "f32"}
        compiled = ov.Core().compile_model(model, "CPU", config)
        return lambda images: compiled(images)[0]
    raise SystemExit(f"unknown format {fmt!r}; expected onnx or openvino")


def measure(fmt: str, model: str, images: np.ndarray) -> tuple[np.ndarray, dict]:
    """The probabilities of ``images`` (raw 0-255 pixels: the preprocessing is inside the model) and the timings."""
    started = time.perf_counter()
    run = _load(fmt, model)
    load_seconds = time.perf_counter() - started
    images = images.astype(np.float32)
    started = time.perf_counter()
    probs = [np.asarray(run(images[i:i + BATCH])) for i in range(0, len(images), BATCH)]
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


def default_precision() -> str:
    """The precision OpenVINO's CPU plugin computes in on this machine unless told otherwise."""
    import openvino as ov

    return ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()  # "f32", "bf16", "f16"


def main(argv: list[str]) -> int:
    fmt, model, src, dst = argv
    images = np.load(src)
    probs, timings = measure(fmt, model, images)
    np.save(dst, probs)
    report = {**timings}
    if fmt == "openvino" and default_precision() != "f32":
        # What a program that leaves the settings alone gets here: recorded beside the float32 check.
        default, _ = measure("openvino-default", model, images)
        np.save(dst.replace(".npy", "") + ".default.npy", default)
        report["default_precision"] = default_precision()
    print(json.dumps({**report, "tensorflow_loaded": "tensorflow" in sys.modules}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
