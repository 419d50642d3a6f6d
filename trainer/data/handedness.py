"""Whether the classes have a handedness: would training on mirror images teach the network something false?

A mirrored shirt is a shirt, a mirrored "b" is a "d", and a mirrored 3 is no digit at all. ``augmentation.flip: auto``
mirrors only where this check, run on the training images before anything is trained, finds no sign of handedness.

The check compares two nearest-neighbour classifiers on 16x16 colour thumbnails (the audit's, or read here when the
audit is off): one that knows the training sample as it is, one that also knows its mirror images. Scored on held-back
training images, each image that the first gets right and the second wrong is *lost* to mirroring, the reverse *won*.
Handed data loses more than it wins: overall (a McNemar z of at least `OVERALL_Z`: digits, where every class suffers a
little), or in one class (`CLASS_Z`: letters, arrows, where a few classes become one another). Nearest neighbours,
not a linear model, because they have no capacity to run out of: what they lose is what the mirror images say, not the
cost of learning both orientations of a shoe.

Measured on 600 + 300 images per class, five draws (bench/handedness.py, bench/results/handedness.json): overall z
from -1.9 to -0.4 on Fashion-MNIST and -2.4 to 0.3 on generated photos (mirror-safe); 4.6 to 6.6 on MNIST digits,
12.4 to 12.9 on printed letters, 17 on arrows among symmetric shapes (handed). The cnn trained 15 epochs with flips
against without lost 0.75 points on MNIST (99.35% to 98.60%) and 4.0 on the letters (97.5% to 93.5%): the harm this
check prevents.

TensorFlow-free; about a second for 9,000 thumbnails on two cores.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import numpy as np

from trainer.data.scan import Sample

log = logging.getLogger(__name__)

FIT_PER_CLASS, HELD_PER_CLASS = 600, 300
MAX_IMAGES = 9_000  # fewer per class beyond 10 classes: the check stays about a second, with less power per class
NEIGHBOURS = 5
OVERALL_Z, CLASS_Z = 2.5, 4.0
THUMB = 16


@dataclass(frozen=True)
class Verdict:
    """The check's answer, as summary.json records it."""

    mirror_safe: bool
    why: str
    images: int
    lost: int  # held-back images right without the mirror images, wrong with them
    won: int
    z: float
    worst_class: str | None
    worst_class_lost: int
    worst_class_won: int
    worst_class_z: float
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)


def sample(train: list[Sample], num_classes: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Per class, up to `FIT_PER_CLASS` images to know and `HELD_PER_CLASS` to score (2:1 where fewer), drawn by
    ``seed``; at most `MAX_IMAGES` in all."""
    scale = min(1.0, MAX_IMAGES / ((FIT_PER_CLASS + HELD_PER_CLASS) * max(1, num_classes)))
    rng = np.random.default_rng(seed)
    by_class: list[list[Sample]] = [[] for _ in range(num_classes)]
    for s in train:
        by_class[s.label].append(s)
    fit, held = [], []
    for mine in by_class:
        order = rng.permutation(len(mine))
        n_held = min(int(HELD_PER_CLASS * scale), len(mine) // 3)
        n_fit = min(int(FIT_PER_CLASS * scale), len(mine) - n_held)
        held += [mine[i] for i in order[:n_held]]
        fit += [mine[i] for i in order[n_held:n_held + n_fit]]
    return fit, held


def thumbnail(path: str) -> np.ndarray:
    """The image as the audit's thumbnail: EXIF-oriented, RGB, box-filtered to 16x16 (zeros if unreadable)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im.seek(0)
            if im.format in ("JPEG", "MPO"):
                im.draft(im.mode if im.mode in ("L", "RGB", "CMYK") else None, (4 * THUMB, 4 * THUMB))
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB").resize((THUMB, THUMB), Image.BOX),
                              dtype=np.uint8)
    except Exception:  # the training pipeline reports unreadable files; here they are just blank
        return np.zeros((THUMB, THUMB, 3), np.uint8)


def judge(train: list[Sample], class_names: list[str], seed: int, thumbs: dict[str, np.ndarray] | None = None
          ) -> Verdict:
    """Whether mirroring is safe for these classes (see the module doc). ``thumbs`` maps paths to the audit's
    thumbnails; images missing from it are read here."""
    started = time.perf_counter()
    fit, held = sample(train, len(class_names), seed)
    thumbs = thumbs or {}

    def stack(samples):
        return np.stack([thumbs[s.path] if s.path in thumbs else thumbnail(s.path) for s in samples]) \
            if samples else np.zeros((0, THUMB, THUMB, 3), np.uint8)

    fit_x, held_x = stack(fit), stack(held)
    fit_y, held_y = np.array([s.label for s in fit], int), np.array([s.label for s in held], int)
    if len(held) < 2 * len(class_names) or not len(fit):
        return _verdict(False, "too few images to tell whether mirror images stay in their class", held_y,
                        (held_y, held_y), class_names, time.perf_counter() - started)
    plain = _nearest(fit_x, fit_y, held_x, len(class_names))
    mirrored = _nearest(np.concatenate([fit_x, fit_x[:, :, ::-1]]), np.concatenate([fit_y, fit_y]), held_x,
                        len(class_names))
    verdict = _verdict(None, "", held_y, (plain, mirrored), class_names, time.perf_counter() - started)
    log.info("handedness: %s", verdict.why)
    return verdict


def _nearest(fit_x: np.ndarray, fit_y: np.ndarray, query_x: np.ndarray, num_classes: int) -> np.ndarray:
    """The majority label of each query's `NEIGHBOURS` nearest fit images (cosine similarity of the thumbnails with
    their mean removed: brightness and contrast do not count)."""

    def unit(x):
        v = x.reshape(len(x), -1).astype(np.float32)
        v -= v.mean(axis=1, keepdims=True)
        return v / (np.linalg.norm(v, axis=1, keepdims=True) + 1e-6)

    k = min(NEIGHBOURS, len(fit_x))
    known, out = unit(fit_x), []
    for start in range(0, len(query_x), 1024):  # bounded memory: 1,024 x 12,000 similarities at a time
        sim = unit(query_x[start:start + 1024]) @ known.T
        idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        votes = np.zeros((len(sim), num_classes), np.int32)
        np.add.at(votes, (np.arange(len(sim))[:, None], fit_y[idx]), 1)
        out.append(votes.argmax(axis=1))
    return np.concatenate(out) if out else np.zeros(0, int)


def _z(lost: int, won: int) -> float:
    return (lost - won) / max(1.0, (lost + won) ** 0.5)


def _verdict(safe: bool | None, why: str, truth: np.ndarray, predictions, class_names: list[str],
             seconds: float) -> Verdict:
    plain, mirrored = predictions
    lost_mask, won_mask = (plain == truth) & (mirrored != truth), (plain != truth) & (mirrored == truth)
    lost, won = int(lost_mask.sum()), int(won_mask.sum())
    per_class = [(int(lost_mask[truth == c].sum()), int(won_mask[truth == c].sum())) for c in range(len(class_names))]
    worst = max(range(len(class_names)), key=lambda c: _z(*per_class[c]))
    z, worst_z = _z(lost, won), _z(*per_class[worst])
    if safe is None:
        safe = z < OVERALL_Z and worst_z < CLASS_Z
        why = (f"mirror images stay in their class: {len(truth)} held-back images, {lost} lost and {won} won by "
               f"knowing the mirror images (z {z:.1f}; class {class_names[worst]!r}: z {worst_z:.1f})" if safe else
               f"the classes have a handedness: knowing the mirror images lost {lost} and won {won} of "
               f"{len(truth)} held-back images (z {z:.1f}, limit {OVERALL_Z}); class {class_names[worst]!r}: "
               f"{per_class[worst][0]} lost, {per_class[worst][1]} won (z {worst_z:.1f}, limit {CLASS_Z})")
    return Verdict(safe, why, len(truth), lost, won, round(z, 2), class_names[worst], *per_class[worst],
                   round(worst_z, 2), round(seconds, 2))
