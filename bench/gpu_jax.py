"""The GPU side of the benchmark, for a GPU machine that has no TensorFlow: Keras 3 on its JAX backend.

dropfit's networks are pure Keras 3 (``trainer.network.networks``), so the same model code runs here unchanged. What
this measures on the GPU, recipe model at 200x200, batch 32, as in bench/training.py:

- ``bound``: training fed from in-memory uint8 arrays (the compute limit; what dropfit's uint8 cache feeds), in
  float32 and in mixed float16 (what dropfit picks on Tensor Core GPUs), XLA-compiled as JAX always is;
- ``recipe``: training fed by ``ImageDataGenerator(rescale=1/255).flow_from_directory``, the recipe's way;
- the input side on this machine's CPUs: the recipe's generator alone and the decode+resize limit on all cores;
- dropfit's default network (``cnn``) at batch 32 and 128, float32 and mixed float16.

dropfit's own tf.data pipeline needs TensorFlow, which cannot travel to that machine (docs/benchmarks.md: GPU).

    KERAS_BACKEND=jax python bench/gpu_jax.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np

TARGET = (200, 200)


def _model(architecture: str, precision: str, num_classes: int = 5):
    import keras

    from trainer.network.networks import build_model, compile_model

    keras.mixed_precision.set_global_policy(precision)
    try:
        model = build_model((*TARGET, 3), num_classes, architecture=architecture)
        return compile_model(model, "rmsprop", 1e-3)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _timed_fit(model, data, steps: int, batch: int, warmup: int = 10) -> float:
    """Images/second over ``steps`` steps of one fit, after ``warmup`` steps (XLA compilation, autotuning).

    Each step's loss is read back, which waits for the device, so the clock sees finished work only.
    """
    import keras

    times = []

    class Timer(keras.callbacks.Callback):
        def on_train_batch_end(self, step, logs=None):
            float(logs["loss"])
            times.append(time.perf_counter())

    model.fit(data, steps_per_epoch=warmup + steps, epochs=1, verbose=0, callbacks=[Timer()])
    return batch * steps / (times[-1] - times[warmup - 1])


def _in_memory(batch: int, steps: int):
    import keras

    n = batch * 32
    x = np.random.default_rng(0).integers(0, 256, (n, *TARGET, 3), dtype=np.uint8)
    y = keras.utils.to_categorical(np.random.default_rng(1).integers(0, 5, n), 5)

    def batches():
        while True:
            for i in range(0, n, batch):
                yield x[i:i + batch], y[i:i + batch]

    return batches()


def bound(architecture: str, precision: str, batch: int, steps: int) -> float:
    return _timed_fit(_model(architecture, precision), _in_memory(batch, steps), steps, batch)


def recipe_training(root: Path, steps: int) -> float:
    from keras.src.legacy.preprocessing.image import ImageDataGenerator  # the recipe's API, benchmark only

    gen = ImageDataGenerator(rescale=1 / 255).flow_from_directory(str(root), target_size=TARGET, batch_size=32,
                                                                   class_mode="categorical")

    def batches():
        while True:
            for i in range(len(gen)):
                yield gen[i]

    return _timed_fit(_model("recipe", "float32"), batches(), steps, 32)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)

    import jax
    import keras
    from datasets import photo_dataset
    from pipeline import files_of, limit_pillow, recipe_generator

    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        gpu = "none"
    result = {"machine": {"gpu": gpu, "devices": [str(d) for d in jax.devices()], "cpus": os.cpu_count(),
                          "python": platform.python_version(), "keras": keras.__version__, "jax": jax.__version__,
                          "backend": keras.backend.backend()},
              "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    def record(name, fn, *a):
        start = time.perf_counter()
        result[name] = round(fn(*a), 1)
        print(f"{name}: {result[name]} ({time.perf_counter() - start:.0f} s)", flush=True)
        args.out.write_text(json.dumps(result, indent=2))

    root = photo_dataset()
    files = files_of(root)
    record("input_limit_all_cores", limit_pillow, files)
    record("input_recipe_generator", recipe_generator, root)
    record("train_recipe_bound_float32", bound, "recipe", "float32", 32, args.steps)
    record("train_recipe_bound_mixed_float16", bound, "recipe", "mixed_float16", 32, args.steps)
    record("train_recipe_with_recipe_generator", recipe_training, root, max(20, args.steps // 3))
    for batch in (32, 128):
        for precision in ("float32", "mixed_float16"):
            record(f"train_cnn_bound_{precision}_batch{batch}", bound, "cnn", precision, batch, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
