"""Is dropfit's default job better than the recipe? Train both on the same data and compare held-out accuracy.

Datasets (generated or bundled, nothing downloaded):
- ``shapes``: the generated benchmark — 6 shape classes, colour jitter, noisy backgrounds, sizes 40-160 px of varied
  aspect ratios, half of them grey, mixed formats;
- ``digits``: scikit-learn's bundled handwritten digits (1,797 8x8 images) written out as image folders.

Both runs use the same held-out test split (20%, stratified, seeded) and the same input size (``target_size: auto``),
so the comparison is about the network and its training: ``recipe`` is the classic network with the recipe's
training (RMSprop 1e-3, no augmentation, no early stopping); ``default`` is an empty job.yaml; ``budget 1m`` is
``time_budget: 1m`` and nothing else (its planner picks the input, channels, width and batch). "Accuracy per minute" is
test accuracy divided by the whole run's minutes (scan to report).

    python bench/compare_models.py [--datasets shapes digits] [--candidates recipe default] [--json out.json]
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

RECIPE = {"model": {"architecture": "recipe"}, "optimizer": {"name": "rmsprop", "learning_rate": 0.001},
          "augmentation": {"enabled": False}, "training": {"early_stopping_patience": None,
                                                            "reduce_lr_patience": None, "class_weight": "none"}}
CANDIDATES = {"recipe": RECIPE, "default": {}, "budget 1m": {"time_budget": "1m"}}
COMMON = {"data": {"test_split": 0.2, "validation_split": 0.15}, "epochs": 40}


def write_digits(root: Path) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = root / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(np.rint(image * (255 / 16)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, "L").save(folder / f"{i:04d}.png")
    return root


def write_shapes(root: Path) -> Path:
    return make_shapes(root, classes=6, per_class=120, size_range=(40, 160), formats=("jpeg", "png", "webp"),
                       modes=("RGB", "L"), seed=7)


DATASETS = {"shapes": write_shapes, "digits": write_digits}


def run(name: str, data: Path, overrides: dict, seed: int) -> dict:
    from trainer import train_cnn

    spec = JobSpec.model_validate(_merge(_merge(COMMON, overrides), {"seed": seed}))
    with tempfile.TemporaryDirectory() as out:
        started = time.monotonic()
        train_cnn(data, options=TrainOptions.from_spec(spec), output_dir=out, verbose=0, started_at=started)
        seconds = time.monotonic() - started
        summary = json.loads((Path(out) / "summary.json").read_text())
    accuracy = summary["evaluations"].get("test", {}).get("accuracy")
    return {"candidate": name, "test_accuracy": accuracy,
            "val_accuracy": summary["evaluations"].get("validation", {}).get("accuracy"),
            "epochs": summary["epochs_trained"], "seconds": round(seconds, 1),
            "accuracy_per_minute": round(accuracy / (seconds / 60), 4) if accuracy is not None else None,
            "input_channels": (summary["budget"]["plan"]["channels"] if summary.get("budget") else None),
            "parameters": summary["parameters"], "target_size": summary["config"]["target_size"]}


def _channels(row: dict) -> str:
    return f"x{row['input_channels']}" if row.get("input_channels") else ""


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--candidates", nargs="*", default=list(CANDIDATES))
    parser.add_argument("--extra", type=json.loads, default={}, help='more candidates: {"name": {spec overrides}}')
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    candidates = {**CANDIDATES, **args.extra}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in args.datasets:
            data = DATASETS[dataset](Path(tmp) / dataset)
            for name in [*args.candidates, *args.extra]:
                result = {"dataset": dataset, **run(name, data, candidates[name], args.seed)}
                rows.append(result)
                print(json.dumps(result), flush=True)
    print("\n| dataset | model | test accuracy | validation accuracy | epochs | seconds | accuracy per minute | "
          "parameters | input |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['dataset']} | {r['candidate']} | {100 * r['test_accuracy']:.1f}% | "
              f"{100 * r['val_accuracy']:.1f}% | {r['epochs']} | {r['seconds']:.0f} | "
              f"{r['accuracy_per_minute']:.2f} | {r['parameters']:,} | "
              f"{r['target_size'][0]}x{r['target_size'][1]}{_channels(r)} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
