"""The dataset audit, before training: duplicates, conflicting labels, leakage across splits, and the data's shape.

- **Exact duplicates**: the same decoded pixels (SHA-1 of the image as RGB at its own size), so a PNG re-saved from a
  JPEG, or a copy under another name, still matches.
- **Near duplicates**: resized, re-encoded or slightly edited copies. Candidates are images whose perceptual hashes
  (``imagehash.phash``, 64 bits: a DCT of the image shrunk to 32x32) are within `NEAR_HAMMING` bits of each other —
  found without comparing every pair: two hashes within ``t`` bits agree exactly on at least one of ``t + 1`` bands,
  so only images sharing a band value are compared, and of those only the ones whose thumbnails' mean brightness is
  close enough for a confirmation (60,000 photos of similar clothes otherwise make millions of candidates). A
  candidate is confirmed when the 16x16 colour thumbnails of the two differ by at most `NEAR_MEAN` levels on average
  and `NEAR_MAX` at any pixel (and at most half their contrast): the hash alone pairs distinct but similar images (two
  handwritten 1s, two orange crosses on pastel noise), the thumbnails tell them apart.
- Images linked by either become one **group**. A group holding more than one label is a **conflict** (one image,
  two answers): excluded from training and evaluation by default. The splits keep every group on one side, so no copy
  of a held-out image is trained on.
- Also: class imbalance, tiny classes, image sizes and aspect ratios, and how many images are greyscale by content
  (an RGB file whose channels are equal is greyscale).

Decoding every image is the cost (the scan reads headers only): done in worker processes, a few seconds per 10,000
small images and about 7 s per 10,000 320x240 JPEGs on two cores (``make bench`` measures it). TensorFlow-free.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import multiprocessing
import os
import statistics
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

# Chosen by measurement (bench/audit_threshold.py, bench/results/audit_threshold.json). Precision first: a false pair
# costs the user data (a false conflict is left out) and trust, a missed copy only a little leakage. With at most 10
# bits between the hashes, 4 levels on average and 48 (and half the contrast) at any pixel between the thumbnails,
# 99.2-99.8% of resized (0.5x-2x) and re-encoded (JPEG 75/95) copies of photo-sized images are found, with no false
# pair among 2,400 generated 96 px shapes (2.9 million pairs), no false conflict in any set, and none among real
# digits (scikit-learn's, and 6,000 MNIST digits). Tiny images are another matter: re-encoded 28 px copies are all
# found, resized ones mostly not (resampling moves thin strokes as much as two different writers do).
NEAR_HAMMING = 10
NEAR_MEAN = 4.0
NEAR_MAX = 48
DRAFT_PIXELS, DRAFT_SIDE = 16_000_000, 2048  # JPEGs above this many pixels are hashed at reduced scale (>= this side)
NEAR_CONTRAST_SHARE = 0.5  # ... and at most half the contrast of the flatter thumbnail (low-contrast images)
THUMB = 16
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
CHUNK = 256


@dataclass
class Fingerprint:
    digest: str | None  # SHA-1 of the decoded pixels; None if the file could not be decoded here
    phash: int
    thumb: np.ndarray  # THUMB x THUMB x 3, uint8: confirms a perceptual-hash match
    grey: bool
    size: tuple[int, int]  # (height, width)


def fingerprint_image(im) -> Fingerprint:
    """Hash a decoded Pillow image (see `fingerprint`)."""
    import imagehash
    from PIL import Image

    grey = im.mode in _GREY_MODES
    rgb = im.convert("RGB")
    pixels = np.asarray(rgb)
    if not grey:
        small = pixels[:: max(1, pixels.shape[0] // 32), :: max(1, pixels.shape[1] // 32)].astype(np.int16)
        grey = int(np.abs(small[..., 0] - small[..., 1]).max(initial=0)) <= 2 and \
            int(np.abs(small[..., 1] - small[..., 2]).max(initial=0)) <= 2
    digest = hashlib.sha1(np.ascontiguousarray(pixels))  # the buffer itself: no copy of a large image
    digest.update(bytes(str(pixels.shape), "ascii"))
    digest = digest.hexdigest()
    thumb = np.asarray(rgb.resize((THUMB, THUMB), Image.BOX), dtype=np.uint8)
    return Fingerprint(digest, int(str(imagehash.phash(rgb)), 16), thumb, grey, pixels.shape[:2])


def fingerprint(path: str) -> Fingerprint:
    """Decode one image (EXIF orientation applied, as training sees it) and hash it."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im.seek(0)
            if im.format in ("JPEG", "MPO") and im.width * im.height > DRAFT_PIXELS:
                # A huge photo is hashed as decoded at reduced scale (the same file gives the same pixels): a full
                # decode of 100 megapixels would take ~1 GB in each worker.
                im.draft(im.mode if im.mode in ("L", "RGB", "CMYK") else None, (DRAFT_SIDE, DRAFT_SIDE))
            return fingerprint_image(ImageOps.exif_transpose(im))
    except Exception:  # the training pipeline skips and reports unreadable files; here they just hash to nothing
        return Fingerprint(None, 0, np.zeros((THUMB, THUMB, 3), np.uint8), False, (0, 0))


def _fingerprints(paths: list[str]) -> list[Fingerprint]:
    return [fingerprint(p) for p in paths]


def fingerprints(paths: list[str], workers: int | None = None) -> list[Fingerprint]:
    """Fingerprints of ``paths``, in order, decoded in worker processes (spawned: never forked from a process that
    has TensorFlow's threads)."""
    workers = workers or max(1, min(os.cpu_count() or 1, 8))
    if workers == 1 or len(paths) < 2 * CHUNK:
        return _fingerprints(paths)
    chunks = [paths[i:i + CHUNK] for i in range(0, len(paths), CHUNK)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return [fp for part in pool.map(_fingerprints, chunks) for fp in part]


def near_pairs(hashes: list[int], threshold: int, *, means=None, accept=None) -> list[tuple[int, int]]:
    """Index pairs ``(i, j)``, ``i < j``, each once, whose 64-bit hashes differ in at most ``threshold`` bits (banded
    search, see the module doc). ``means`` (optional, per image): only pairs within `NEAR_MEAN` of each other are
    compared, as no pair further apart can be confirmed; ``accept(a, b)`` (optional) filters index arrays."""
    n = len(hashes)
    if threshold <= 0 or n < 2:
        return []
    values = np.asarray(hashes, dtype=np.uint64)
    edges = np.linspace(0, 64, threshold + 2).astype(int)
    keys = np.stack([((values >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)).astype(np.int64)
                     for lo, hi in itertools.pairwise(edges)])
    # Brightness bins NEAR_MEAN wide: two images within NEAR_MEAN of each other share a bin or are neighbours.
    # Without them, a set of similar shapes (60,000 clothes photos) makes millions of candidates to confirm.
    bins = np.zeros(n, np.int64) if means is None else np.floor(np.asarray(means) / NEAR_MEAN).astype(np.int64)
    width = int(bins.max()) + 2  # so that "the next bin" never reaches the next band value
    found_a, found_b = [], []
    for band, key in enumerate(keys):
        cell = key * width + bins
        order = np.argsort(cell, kind="stable")
        cells, starts = np.unique(cell[order], return_index=True)
        ends = np.r_[starts[1:], n]
        where = {int(c): (int(s), int(e)) for c, s, e in zip(cells, starts, ends, strict=True)}
        for c, (start, end) in where.items():
            members = order[start:end]
            nxt = where.get(c + 1)
            others = members if nxt is None else np.r_[members, order[nxt[0]:nxt[1]]]
            for row in range(0, len(members), 1024):  # bounded memory when many images share a cell
                block = members[row:row + 1024]
                distance = np.bitwise_count(values[block][:, None] ^ values[others][None, :])
                a, b = np.nonzero(distance <= threshold)
                keep = b > a + row  # within the cell: each pair once; the next cell's members all lie beyond
                ia, ib = block[a[keep]], others[b[keep]]
                if band:  # a pair that agrees on an earlier band was found there
                    earlier = (keys[:band, ia] == keys[:band, ib]).any(axis=0)
                    ia, ib = ia[~earlier], ib[~earlier]
                if accept is not None and len(ia):
                    ok = accept(ia, ib)
                    ia, ib = ia[ok], ib[ok]
                found_a.append(ia)
                found_b.append(ib)
    if not found_a:
        return []
    a, b = np.concatenate(found_a), np.concatenate(found_b)
    return sorted(zip(np.minimum(a, b).tolist(), np.maximum(a, b).tolist(), strict=True))


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass
class Audit:
    """What the audit found, over every image it was given (indices into that list)."""

    groups: list[list[int]]  # duplicates of one another (exact or near), each group of size >= 2
    exact_groups: int
    near_groups: int  # groups linked only by near duplicates somewhere
    conflicts: list[int]  # indices into `groups`: groups with more than one label
    grey: list[bool]
    sizes: list[tuple[int, int]]
    unreadable: list[int]
    seconds: float
    threshold: int
    group_of: dict[int, int] = field(default_factory=dict)  # image index -> group index
    thumbs: list[np.ndarray] = field(default_factory=list)  # 16x16 RGB, per image (`trainer.data.handedness`)

    def conflicting(self) -> set[int]:
        """Indices of every image in a conflicting group."""
        return {i for g in self.conflicts for i in self.groups[g]}


def coarse(flat: np.ndarray) -> np.ndarray:
    """The thumbnails (``flat``, one uint8 row each) as 4x4 block means, for `confirm`'s cheap first test."""
    blocks = flat.reshape(len(flat), 4, THUMB // 4, 4, THUMB // 4, 3).mean(axis=(2, 4), dtype=np.float32)
    return blocks.reshape(len(flat), -1)


def confirm(flat: np.ndarray, contrast: np.ndarray, a: np.ndarray, b: np.ndarray,
            blocks: np.ndarray | None = None) -> np.ndarray:
    """Which hash-near pairs ``(a[k], b[k])`` are near duplicates by their thumbnails too (``flat``: the thumbnails,
    one uint8 row each; ``contrast``: each one's peak-to-peak; ``blocks``: optionally their `coarse` means)."""
    out = np.zeros(len(a), dtype=bool)
    if blocks is not None:
        # The mean difference of block means never exceeds the mean difference of the pixels they average: pairs
        # this rules out would fail below too, and on 60,000 clothes photos it rules out 99% of 2.9 million.
        maybe = np.flatnonzero(np.abs(blocks[a] - blocks[b]).mean(axis=1) <= NEAR_MEAN + 1e-3)
    else:
        maybe = np.arange(len(a))
    for s in range(0, len(maybe), 8192):
        k = maybe[s:s + 8192]
        pa, pb = a[k], b[k]
        d = np.abs(flat[pa].astype(np.int16) - flat[pb].astype(np.int16))
        largest = d.max(axis=1)
        low = np.maximum(np.minimum(contrast[pa], contrast[pb]), 1)
        out[k] = (d.mean(axis=1) <= NEAR_MEAN) & (largest <= NEAR_MAX) & (largest <= NEAR_CONTRAST_SHARE * low)
    return out


def confirmed(a: Fingerprint, b: Fingerprint) -> bool:
    """Whether two hash-near images are near duplicates by their thumbnails too."""
    flat = np.stack([a.thumb.ravel(), b.thumb.ravel()])
    return bool(confirm(flat, np.ptp(flat, axis=1).astype(np.int32), np.array([0]), np.array([1]))[0])


def audit(paths: list[str], labels: list[int], *, threshold: int = NEAR_HAMMING,
          workers: int | None = None) -> Audit:
    """Fingerprint every image and group duplicates (see the module doc)."""
    started = time.perf_counter()
    prints = fingerprints(paths, workers)
    unreadable = [i for i, fp in enumerate(prints) if fp.digest is None]
    uf = _UnionFind(len(paths))
    by_digest: dict[str, int] = {}
    exact_linked = set()
    for i, fp in enumerate(prints):
        if fp.digest is None:
            continue
        first = by_digest.setdefault(fp.digest, i)
        if first != i:
            uf.union(first, i)
            exact_linked.update((first, i))
    readable = [i for i, fp in enumerate(prints) if fp.digest is not None]
    flat = np.stack([prints[i].thumb.ravel() for i in readable]) if readable else np.zeros((0, 3 * THUMB**2), np.uint8)
    contrast, blocks = np.ptp(flat, axis=1).astype(np.int32), coarse(flat)
    near = near_pairs([prints[i].phash for i in readable], threshold, means=flat.mean(axis=1),
                      accept=lambda a, b: confirm(flat, contrast, a, b, blocks))
    near_linked = set()
    for a, b in near:
        ia, ib = readable[a], readable[b]
        if uf.find(ia) != uf.find(ib):
            near_linked.update((ia, ib))
        uf.union(ia, ib)
    members: dict[int, list[int]] = defaultdict(list)
    for i in readable:
        members[uf.find(i)].append(i)
    groups = sorted((sorted(m) for m in members.values() if len(m) > 1), key=lambda g: g[0])
    group_of = {i: g for g, group in enumerate(groups) for i in group}
    conflicts = [g for g, group in enumerate(groups) if len({labels[i] for i in group}) > 1]
    near_groups = sum(1 for group in groups if any(i in near_linked for i in group))
    result = Audit(groups, len(groups) - near_groups, near_groups, conflicts, [fp.grey for fp in prints],
                   [fp.size for fp in prints], unreadable, time.perf_counter() - started, threshold, group_of,
                   [fp.thumb for fp in prints])
    log.info("audit of %d images in %.1f s: %d duplicate group(s) (%d exact, %d near), %d conflicting label(s)",
             len(paths), result.seconds, len(groups), result.exact_groups, near_groups, len(conflicts))
    return result


def describe(result: Audit, paths: list[str], labels: list[int], class_names: list[str], split_of: dict[int, str],
             relative, excluded: set[int]) -> dict:
    """The audit for dataset.json (every group, with files, labels and splits) and the report."""
    counts = Counter(labels[i] for i in range(len(labels)) if i not in excluded)
    per_class = [counts.get(c, 0) for c in range(len(class_names))]
    sizes = [s for s in result.sizes if s[0]]
    aspects = [w / h for h, w in sizes if h]
    groups = []
    for g, group in enumerate(result.groups):
        groups.append({"files": [relative(paths[i]) for i in group],
                       "labels": [class_names[labels[i]] for i in group],
                       "splits": sorted({split_of.get(i, "excluded") for i in group}),
                       "conflict": g in set(result.conflicts)})
    n = max(1, len(paths))
    duplicates = sum(len(g) - 1 for g in result.groups)
    return {
        "images": len(paths), "seconds": round(result.seconds, 2), "near_threshold_bits": result.threshold,
        "duplicate_groups": len(result.groups), "exact_groups": result.exact_groups, "near_groups": result.near_groups,
        "duplicate_images": duplicates, "duplicate_fraction": round(duplicates / n, 4),
        "conflicts": len(result.conflicts), "excluded_conflicting_images": len(excluded),
        "groups_straddling_splits": sum(1 for g in groups if len(set(g["splits"]) - {"excluded"}) > 1),
        "imbalance_ratio": round(max(per_class) / max(1, min(per_class)), 2) if per_class else None,
        "smallest_class": class_names[int(np.argmin(per_class))] if per_class else None,
        "grey_fraction": round(sum(result.grey) / n, 4),
        "image_sizes": {"median": [statistics.median(h for h, _ in sizes), statistics.median(w for _, w in sizes)],
                        "min": [min(h for h, _ in sizes), min(w for _, w in sizes)],
                        "max": [max(h for h, _ in sizes), max(w for _, w in sizes)]} if sizes else None,
        "aspect_ratio": {"min": round(min(aspects), 3), "median": round(statistics.median(aspects), 3),
                         "max": round(max(aspects), 3)} if aspects else None,
        "groups": groups,
    }
