"""Run an ONNX export with onnxruntime, as a service without TensorFlow would: the export check's other process.

    python -m trainer.onnx_run MODEL.onnx IMAGES.npy PROBS.npy

reads uint8 images (N, H, W, C), writes the probabilities, and prints one JSON line: the median milliseconds of one
image (batch of one) and whether TensorFlow was loaded (it must not be). Imports numpy and onnxruntime only.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np


def main(argv: list[str]) -> int:
    import onnxruntime as ort

    model, src, dst = argv
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    images = np.load(src).astype(np.float32)  # raw 0-255 pixels: the preprocessing is inside the model
    probs = [session.run(None, {name: images[i:i + 256]})[0] for i in range(0, len(images), 256)]
    np.save(dst, np.concatenate(probs) if probs else np.zeros((0, 0), np.float32))
    one = {name: images[:1]}
    for _ in range(3):
        session.run(None, one)
    times = []
    for _ in range(30):
        started = time.perf_counter()
        session.run(None, one)
        times.append(time.perf_counter() - started)
    print(json.dumps({"latency_ms": round(1000 * statistics.median(times), 3),
                      "tensorflow_loaded": "tensorflow" in sys.modules}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
