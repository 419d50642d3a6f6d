"""Training speed of dropfit's cnn with Keras 3's batch normalisation against TensorFlow's fused kernel
(`trainer.network.layers.FusedBatchNormalization`), same network, same machine, same run.

    python bench/fused_norm.py [--json bench/results/fused_norm.json]

Images per second of ``train_on_batch`` on random pixels after warm-up (`trainer.fitting.budget.measure`, the
planner's own measure), for the widths the time budget picks between, on a Fashion-MNIST-sized input and a photo-sized
one. Compare ratios only: the CPU model varies between machines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CASES = [((28, 28, 1), (8, 16, 32, 64, 128), 256), ((28, 28, 1), (16, 32, 64, 128, 256), 256),
         ((96, 96, 3), (16, 32, 64, 128, 256), 64)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from trainer.fitting.budget import measure
    from trainer.network.networks import Network, build_model, compile_model

    rows = []
    for shape, filters, batch in CASES:
        speeds = {}
        for fused in (False, True):
            network = Network("cnn", filters=filters, augmentation=None, seed=0, fused_norm=fused)
            model = compile_model(build_model(shape, 10, network), "adam", 1e-3)
            speeds["fused" if fused else "keras"] = round(measure(model, shape, 10, batch, args.seconds), 1)
        rows.append({"input": list(shape), "filters": list(filters), "batch_size": batch,
                     "images_per_second": speeds, "speed_up": round(speeds["fused"] / speeds["keras"], 2)})
        print(json.dumps(rows[-1]), flush=True)
    result = {"cpu": os.cpu_count(), "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
