"""Whether tf.data's autotuner slows training on a small CPU: the budget's network (half-width cnn, fused batch norm,
flips and translation, Adam) fitted for 12 epochs on 48,000 random 28x28 images through the training pipeline's
shape (cache, shuffle, batch, one-hot, prefetch), once with ``AUTOTUNE`` as the pipeline had it, once with
autotuning off and fixed settings (`trainer.data.pipeline` now). Each in its own process; the epoch times go to
the JSON. No data needed:

    python bench/pipeline_autotune.py [--epochs 12] [--json bench/results/pipeline_autotune.json]
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

ROOT = Path(__file__).resolve().parent.parent


def fit(autotune: bool, epochs: int) -> list[float]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np
    import tensorflow as tf

    from trainer.data.pipeline import PARALLEL, PREFETCH
    from trainer.network.networks import build_model, compile_model

    augmentation = {"flip": "horizontal", "translation": 0.05, "rotation": 0, "zoom": 0, "contrast": 0}
    model = build_model((28, 28, 1), 10, architecture="cnn", filters=[8, 16, 32, 64, 128], dropout=0.0,
                        augmentation=augmentation, fused_norm=True, seed=1)
    compile_model(model, "adam", 3e-3, 0, 0.1)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (48_000, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, 48_000)
    tune = tf.data.AUTOTUNE if autotune else PARALLEL
    ds = tf.data.Dataset.from_tensor_slices((x, y)).cache().shuffle(4096, seed=1, reshuffle_each_iteration=True)
    ds = ds.batch(128).map(lambda a, b: (a, tf.one_hot(b, 10)), num_parallel_calls=tune)
    ds = ds.prefetch(tf.data.AUTOTUNE if autotune else PREFETCH)
    if not autotune:
        options = tf.data.Options()
        options.autotune.enabled = False
        ds = ds.with_options(options)
    seconds = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds.append(round(time.perf_counter() - self.started, 2))

    model.fit(ds, epochs=epochs, verbose=0, callbacks=[Timer()])
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", choices=["autotune", "fixed"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(fit(args.one == "autotune", args.epochs)))
        return 0
    result = {"what": "epoch seconds, 48,000 images 28x28, the budget's half-width cnn", "cpu": os.cpu_count(),
              "processor": platform.processor() or platform.machine(), "epochs": args.epochs}
    for mode in ("autotune", "fixed"):
        out = subprocess.run([sys.executable, __file__, "--one", mode, "--epochs", str(args.epochs)], cwd=ROOT,
                             check=True, capture_output=True, text=True).stdout
        seconds = json.loads(out.strip().splitlines()[-1])
        later = sorted(seconds[1:])
        result[mode] = {"epoch_seconds": seconds, "total": round(sum(seconds), 1),
                        "median_after_first": later[len(later) // 2],
                        "epochs_over_1_5x_median": sum(s > 1.5 * later[len(later) // 2] for s in later)}
        print(mode, result[mode], flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
