"""Generated, learnable image datasets: the demo job and the test suite's data (no downloads needed).

Each class is a shape with its own colour family, drawn at a random place and scale on a noisy background, in
images of varied sizes and aspect ratios, saved in a mix of formats.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar")
_HUES = {"circle": (220, 50, 50), "square": (40, 170, 60), "triangle": (50, 80, 220), "cross": (230, 190, 30),
         "ring": (170, 60, 200), "bar": (30, 190, 200)}
_SAVE = {"jpeg": ("JPEG", ".jpg"), "png": ("PNG", ".png"), "bmp": ("BMP", ".bmp"), "gif": ("GIF", ".gif"),
         "webp": ("WEBP", ".webp"), "tiff": ("TIFF", ".tif")}


def draw_shape(shape: str, width: int, height: int, rng: np.random.Generator, mode: str = "RGB") -> Image.Image:
    """One image of ``shape`` in its colour family (jittered) on a noisy light background."""
    background = rng.integers(150, 256, size=3)
    noise = rng.normal(0, 12, size=(height, width, 3))
    pixels = np.clip(background + noise, 0, 255).astype(np.uint8)
    im = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(im)
    colour = tuple(int(c) for c in np.clip(np.array(_HUES[shape]) + rng.integers(-30, 31, size=3), 0, 255))
    side = min(width, height)
    r = side * rng.uniform(0.22, 0.38)
    cx = rng.uniform(r, width - r)
    cy = rng.uniform(r, height - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "cross":
        w = r / 3
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(r / 3)))
    else:
        draw.rectangle((cx - r, cy - r / 4, cx + r, cy + r / 4), fill=colour)
    return im if mode == "RGB" else im.convert(mode)


def make_shapes(root: str | os.PathLike, *, classes: int | list[str] = 3, per_class: int = 30,
                size_range: tuple[int, int] = (48, 96), formats=("png", "jpeg"), modes=("RGB",), seed: int = 0,
                job: dict | None = None) -> Path:
    """Write a class-per-folder dataset of shapes under ``root`` and return it.

    Args:
        classes: how many classes (taken from `SHAPES`) or their names.
        per_class: images per class.
        size_range: smallest and largest side in pixels; width and height are drawn independently.
        formats: image formats to cycle through (``jpeg png bmp gif webp tiff``).
        modes: Pillow modes to cycle through (``RGB``, ``L``, ``P``, ``RGBA``...).
        job: if given, written as ``job.yaml`` beside the class folders.
    """
    root = Path(root)
    names = list(SHAPES[:classes]) if isinstance(classes, int) else list(classes)
    rng = np.random.default_rng(seed)
    lo, hi = size_range
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            width, height = (int(v) for v in rng.integers(lo, hi + 1, size=2))
            fmt, ext = _SAVE[formats[i % len(formats)]]
            mode = modes[(i // len(formats)) % len(modes)]
            if fmt == "JPEG" and mode not in ("RGB", "L", "CMYK"):
                mode = "RGB"
            im = draw_shape(name if name in _HUES else SHAPES[names.index(name) % len(SHAPES)], width, height, rng,
                            mode)
            im.save(root / name / f"{name}_{i:04d}{ext}", fmt)
    if job is not None:
        (root / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False), encoding="utf-8")
    return root


DEMO_JOB = {"target_size": [64, 64], "epochs": 30, "batch_size": 16,
            "data": {"validation_split": 0.2}}


def make_demo(root: str | os.PathLike, seed: int = 0) -> Path:
    """The demo job: four shape classes in mixed formats and sizes, with a small, fast ``job.yaml``."""
    return make_shapes(root, classes=4, per_class=60, size_range=(48, 160), formats=("jpeg", "png", "webp", "bmp"),
                       modes=("RGB", "L"), seed=seed, job=DEMO_JOB)
