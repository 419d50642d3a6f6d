"""Generated benchmark data: photo-like JPEGs (gradients, shapes, texture, noise) of varied sizes and aspect ratios.

Cached under bench/.data (ignored by git) so repeated runs do not regenerate it.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

DATA = Path(__file__).resolve().parent / ".data"
CLASSES = ("beach", "forest", "city", "snow", "desert")
_PALETTES = {"beach": ((250, 220, 160), (40, 120, 200)), "forest": ((30, 90, 40), (120, 170, 80)),
             "city": ((110, 110, 120), (200, 190, 170)), "snow": ((235, 240, 250), (150, 170, 200)),
             "desert": ((220, 170, 90), (250, 210, 140))}


def _photo(args) -> None:
    path, cls, seed = args
    rng = np.random.default_rng(seed)
    width = int(rng.integers(260, 380))
    height = int(width * rng.uniform(0.6, 0.95))
    top, bottom = (np.array(c, float) + rng.integers(-25, 26, 3) for c in _PALETTES[cls])
    ramp = np.linspace(0, 1, height)[:, None, None]
    pixels = top * (1 - ramp) + bottom * ramp + rng.normal(0, 9, (height, width, 3))
    im = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(4, 12))):
        x, y = rng.integers(0, width), rng.integers(0, height)
        r = int(rng.integers(5, 40))
        colour = tuple(int(v) for v in np.clip(bottom + rng.integers(-60, 61, 3), 0, 255))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x - r, y - r, x + r, y + r), fill=colour)
    im = im.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.2))))
    im.save(path, "JPEG", quality=88)


def photo_dataset(per_class: int = 800, name: str = "photos") -> Path:
    """5 classes x ``per_class`` JPEGs around 320x240 (260-380 px wide, aspect 0.6-0.95)."""
    root = DATA / f"{name}-{per_class}"
    done = root / ".complete"
    if done.exists():
        return root
    jobs = []
    for c, cls in enumerate(CLASSES):
        (root / cls).mkdir(parents=True, exist_ok=True)
        jobs += [(root / cls / f"{cls}_{i:05d}.jpg", cls, c * 100_000 + i) for i in range(per_class)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_photo, jobs, chunksize=32))
    done.write_text("ok\n")
    return root


def many_files(count: int = 100_000, name: str = "many") -> Path:
    """``count`` tiny PNGs in 10 class folders, for scan speed (written once, then reused)."""
    root = DATA / f"{name}-{count}"
    done = root / ".complete"
    if done.exists():
        return root
    png = (Path(__file__).resolve().parent / ".data" / "tiny.png")
    png.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (120, 30, 200)).save(png)
    data = png.read_bytes()
    for i in range(count):
        folder = root / f"class_{i % 10}"
        if i < 10:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:06d}.png").write_bytes(data)
    (root / "job.yaml").write_text("epochs: 1\n")
    done.write_text("ok\n")
    return root
