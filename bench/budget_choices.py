"""What should a time budget spend its time on? Held-out accuracy within the same budget, for the choices the
planner makes on its own (trainer/fitting/budget.py), against the alternatives, on 28x28 greyscale data like the
datasets users bring (nothing downloaded):

- ``digits28``: scikit-learn's real handwritten digits (1,797), blown up to 28x28 greyscale PNGs;
- ``shapes28``: 10 generated shape classes, 500 each, 28x28 greyscale (noisy backgrounds, varied sizes).

Each row trains once within ``--budget`` seconds and reports test accuracy (20% held out, stratified).

    python bench/budget_choices.py [--budget 60] [--json bench/results/budget_choices.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from PIL import Image

from contract.options import TrainOptions
from contract.spec import JobSpec
from trainer.data.demo import make_shapes

CHOICES = {
    "planner (grey 28x28, batch auto, width auto)": {},
    "rgb 32x32 (no-budget defaults)": {"color_mode": "rgb", "target_size": 32, "batch_size": 32},
    "grey 28x28, batch 32": {"batch_size": 32},
    "grey 28x28, half width": {"model": {"filters": [8, 16, 32, 64]}},
    "grey 28x28, double width": {"model": {"filters": [32, 64, 128, 256]}},
    "recipe network": {"model": {"architecture": "recipe"}},
}


def digits28(root: Path) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = root / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(np.rint(image * (255 / 16)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, "L").resize((28, 28), Image.BILINEAR).save(folder / f"{i:04d}.png")
    return root


def shapes28(root: Path) -> Path:
    make_shapes(root, classes=10, per_class=500, size_range=(28, 28), formats=("png",), modes=("L",), seed=5)
    return root


def run(data: Path, overrides: dict, budget: float) -> dict:
    from trainer import train_cnn

    spec = JobSpec.model_validate({"time_budget": budget, "data": {"test_split": 0.2, "validation_split": 0.1},
                                   **overrides})
    with tempfile.TemporaryDirectory() as out:
        started = time.monotonic()
        train_cnn(data, options=TrainOptions.from_spec(spec), output_dir=out, verbose=0, started_at=started)
        seconds = time.monotonic() - started
        summary = json.loads((Path(out) / "summary.json").read_text())
    plan = summary["budget"]["plan"]
    return {"test_accuracy": summary["evaluations"]["test"]["accuracy"], "seconds": round(seconds, 1),
            "epochs": summary["epochs_trained"], "input": f"{plan['target_size'][0]}x{plan['target_size'][1]}"
            f"x{plan['channels']}", "batch": plan["batch_size"], "filters": plan["filters"],
            "images_per_second": plan["images_per_second"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=60.0)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in (("digits28", digits28), ("shapes28", shapes28)):
            data = make(Path(tmp) / name)
            for choice, overrides in CHOICES.items():
                row = {"dataset": name, "choice": choice, "budget": args.budget, **run(data, overrides, args.budget)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n| dataset | choice (budget {args.budget:.0f} s) | test accuracy | seconds | epochs | input | batch |")
    print("| --- | --- | ---: | ---: | ---: | --- | ---: |")
    for r in rows:
        print(f"| {r['dataset']} | {r['choice']} | {100 * r['test_accuracy']:.1f}% | {r['seconds']:.0f} | "
              f"{r['epochs']} | {r['input']} | {r['batch']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
