"""Prediction jobs at scale: images per second streamed from disk through the model (decode, resize, predict: what a
``predict.yaml`` drop does) against the model's own in-memory throughput (the same batches, already decoded), and
the trainer's peak memory — each run in a fresh process, so its peak is its own.

    python bench/predict_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def make_model(folder: Path, input_shape: tuple[int, int, int], classes: int) -> Path:
    """An (untrained: speed does not depend on the weights) default network, saved as a dropfit output folder."""
    from trainer.network.networks import build_model
    from trainer.outputs import artifacts

    folder.mkdir(parents=True, exist_ok=True)
    model = build_model(input_shape, classes, architecture="cnn", seed=0)
    artifacts.save_model(folder / "model.keras", model)
    artifacts.write_json(folder / "labels.json", {"classes": [f"c{i}" for i in range(classes)],
                                                  "target_size": list(input_shape[:2]),
                                                  "color_mode": "grayscale" if input_shape[2] == 1 else "rgb"})
    return folder


def small_images(root: Path, count: int) -> Path:
    """``count`` 28x28 greyscale PNGs (the size of the digit and clothing datasets), in folders of 1,000."""
    import numpy as np
    from PIL import Image

    done = root / ".complete"
    if done.exists():
        return root
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"part-{i // 1000:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L").save(folder / f"{i:06d}.png")
    done.touch()
    return root


def one_run(images: str, model_dir: str, batch: int) -> dict:
    """In this process: the streamed prediction job, then the model alone on the same images held in memory."""
    import numpy as np
    import tensorflow as tf

    from contract.predict_spec import PredictRun, PredictSpec
    from trainer.prediction.api import load_model
    from trainer.prediction.drop import run_prediction

    with tempfile.TemporaryDirectory() as out:
        run = PredictRun(spec=PredictSpec(batch_size=batch), model_job="bench", model_dir=model_dir)
        summary = run_prediction(images, run, out, emit=lambda event, payload: None)
    model = load_model(model_dir)
    shape = model.input_shape[1:]
    x = tf.constant(np.random.default_rng(0).integers(0, 256, (batch, *shape), dtype=np.uint8))
    model.predict_on_batch(x)
    steps = max(10, summary["images"] // batch)
    started = time.perf_counter()
    for _ in range(steps):
        model.predict_on_batch(x)
    in_memory = steps * batch / (time.perf_counter() - started)
    return {"images": summary["images"], "streamed_images_per_second": summary["images_per_second"],
            "model_in_memory_images_per_second": round(in_memory, 1),
            "ratio": round(summary["images_per_second"] / in_memory, 3),
            "peak_memory_mb": summary["peak_memory_mb"], "batch": batch, "input": list(shape)}


def measure(images: Path, model_dir: Path, batch: int = 64) -> dict:
    code = (f"import sys, json; sys.path[:0] = [{str(HERE)!r}, {str(HERE.parent)!r}]; import predict_bench; "
            f"print(json.dumps(predict_bench.one_run({str(images)!r}, {str(model_dir)!r}, {batch})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_all(quick: bool) -> dict:
    from datasets import DATA, photo_dataset

    photos = photo_dataset(100 if quick else 800)
    small = small_images(DATA / f"small-{2_000 if quick else 20_000}", 2_000 if quick else 20_000)
    with tempfile.TemporaryDirectory() as tmp:
        photo_model = make_model(Path(tmp) / "photo-model", (128, 128, 3), 5)
        small_model = make_model(Path(tmp) / "small-model", (28, 28, 1), 10)
        return {"photos": measure(photos, photo_model), "small": measure(small, small_model)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(run_all(args.quick), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
