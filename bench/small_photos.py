"""Small photo-like data: does dropfit's default beat the recipe network, in the same minutes?

The data: a few hundred JPEGs of varied sizes (180-420 px, aspect 0.6-1.4), each one object — the class: circle,
triangle, square, star or cross, in a colour that leans to the class's own (widely spread), a random size, place and
angle — on a busy background (a random colour gradient, texture noise and 6-16 clutter lines and blobs), imbalanced
120/80/60/40/30 images per class. 40 more per
class, drawn the same way, are held out. Generated here (seeded), since no such set can be downloaded at test time.

Both jobs get the same ``time_budget`` and nothing else besides what makes the second the recipe: its network
(``architecture: recipe``), RMSprop at 1e-3, no augmentation, no label smoothing.

    python bench/small_photos.py [--budget 2m] [--json bench/results/small_photos.json]
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
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"circle": 120, "triangle": 80, "square": 60, "star": 40, "cross": 30}
# Each class's objects lean to a colour, as real objects do (with a spread wide enough that colour alone is not enough).
TINTS = {"circle": (200, 60, 60), "triangle": (60, 170, 70), "square": (60, 90, 200), "star": (220, 190, 50),
         "cross": (160, 70, 190)}
HELD_OUT = 40
RECIPE = ("model: {architecture: recipe}\noptimizer: {name: rmsprop, learning_rate: 0.001}\n"
          "augmentation: {enabled: false}\ntraining: {label_smoothing: 0}\n")


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        points = [(1, a) for a in (0, 2.094, 4.189)]
    elif shape == "square":
        points = [(1, a) for a in (0.785, 2.356, 3.927, 5.498)]
    elif shape == "star":
        points = [(1 if i % 2 == 0 else 0.45, i * np.pi / 5) for i in range(10)]
    else:  # cross: a plus sign of width 0.35 r
        w = 0.35
        corners = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1), (-w, -1), (-w, -w), (-1, -w), (-1, w),
                   (-w, w), (-w, 1)]
        points = [(np.hypot(x, y), np.arctan2(y, x)) for x, y in corners]
    return [(cx + r * d * np.cos(a + angle), cy + r * d * np.sin(a + angle)) for d, a in points]


def photo(shape: str, seed: int) -> Image.Image:
    """One JPEG-bound picture of ``shape`` on a busy background."""
    rng = np.random.default_rng(seed)
    width = int(rng.integers(180, 421))
    height = int(np.clip(width * rng.uniform(0.6, 1.4), 150, 480))
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0, 1, height)[:, None, None]
    pixels = top * (1 - ramp) + bottom * ramp + rng.normal(0, 22, (height, width, 3))
    im = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(6, 17))):  # clutter: lines and blobs, never the class's shape
        x, y, r = rng.integers(0, width), rng.integers(0, height), int(rng.integers(4, 30))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.line((x, y, x + rng.integers(-60, 61), y + rng.integers(-60, 61)), fill=colour,
                      width=int(rng.integers(1, 5)))
        else:
            draw.ellipse((x - r, y - r // 3, x + r, y + r // 3), fill=colour)
    side = min(width, height)
    r = side * rng.uniform(0.15, 0.32)
    cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
    colour = tuple(int(v) for v in np.clip(np.array(TINTS[shape]) + rng.integers(-70, 71, 3), 0, 255))
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, rng.uniform(0, 2 * np.pi)), fill=colour)
    return im.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.2, 1.0))))


def write_sets(drop: Path, held_out: Path, held_out_per_class: int = HELD_OUT) -> None:
    for c, (shape, count) in enumerate(SHAPES.items()):
        for folder, n, base in ((drop, count, 0), (held_out, held_out_per_class, 50_000)):
            (folder / shape).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                photo(shape, c * 100_000 + base + i).save(folder / shape / f"{shape}_{i:04d}.jpg", quality=85)


def run_job(drop: Path, held_out: Path, out: Path, job: str) -> dict:
    (drop / "job.yaml").write_text(job)
    started = time.time()
    subprocess.run([sys.executable, "-m", "trainer", "run", str(drop), "--out", str(out), "--work",
                    str(out.parent / f"{out.name}-work")], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    wall = time.time() - started
    scored = subprocess.run([sys.executable, "-m", "trainer", "evaluate", str(out), str(held_out), "--json"],
                            cwd=ROOT, check=True, capture_output=True, text=True)
    summary = json.loads((out / "summary.json").read_text())
    evaluation = json.loads(scored.stdout)
    return {"held_out_accuracy": evaluation["accuracy"], "held_out_macro_f1": evaluation.get("macro_f1"),
            "wall_seconds": round(wall, 1), "epochs_trained": summary["epochs_trained"],
            "architecture": summary["architecture"], "target_size": summary["config"]["target_size"],
            "pretrained": (summary.get("pretrained") or {}).get("why")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", default="2m")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--job", default="", help="more job.yaml text for the default job, e.g. 'target_size: 64'")
    parser.add_argument("--default-only", action="store_true", help="skip the recipe's job")
    parser.add_argument("--held-out", type=int, default=HELD_OUT, help="held-out images per class (more: less noise)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_sets(tmp / "drop", tmp / "held_out", args.held_out)
        budget = f"time_budget: {args.budget}\n"
        result = {"dataset": f"generated shapes on busy backgrounds, {sum(SHAPES.values())} JPEGs "
                             f"({'/'.join(map(str, SHAPES.values()))} per class), "
                             f"{args.held_out * len(SHAPES)} held out",
                  "time_budget": args.budget, "cpu": os.cpu_count(),
                  "job_yaml_extra": args.job or None,
                  "default": run_job(tmp / "drop", tmp / "held_out", tmp / "default", budget + args.job)}
        if not args.default_only:
            result["recipe"] = run_job(tmp / "drop", tmp / "held_out", tmp / "recipe", budget + RECIPE)
            result["margin_points"] = round(100 * (result["default"]["held_out_accuracy"]
                                                   - result["recipe"]["held_out_accuracy"]), 1)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
