"""Is the data enough? The advisor in summary.json (``advisor``) and the report:

- per class: training images, images in duplicate groups (the audit's), its share against the largest class, and the
  smallest image side; warnings below sensible thresholds (`FEW_IMAGES`, `IMBALANCE`, `SMALL_SIDE`);
- a learning curve: how validation accuracy grows with the number of training images, from a softmax classifier
  trained on nested fractions of the training images (as the network sees them: its own penultimate features), fitted
  with a power law ``accuracy(n) = top - scale * n ** -rate`` and extrapolated to "about N more images per class
  would gain about X points". The features were learned from all the images, so the curve is a proxy: its error was
  measured on data held back on purpose (`bench/advisor_check.py`, `CHECKED_ERROR`) and is stated with every answer.

NumPy only.
"""

from __future__ import annotations

import math

import numpy as np

FEW_IMAGES = 10  # training images in a class below which its results are unreliable
IMBALANCE = 3.0  # largest class over smallest
SMALL_SIDE = 32  # pixels: images smaller than this carry little for a CNN
FRACTIONS = (0.125, 0.25, 0.5, 1.0)
# The curve reads the network's features of a random sample of at most this many training and validation images:
# seconds next to training, and the budget's reserve counts them (`images_read`).
MAX_TRAIN, MAX_VAL = 6000, 2000
# How far the curve's "gain from twice the images" was from what training on twice the images really gained, in
# accuracy points: the mean absolute error over the checks in bench/results/advisor_check.json (digits at 30 and 60
# images per class, Fashion-MNIST at 100 and 400; `python bench/advisor_check.py --fashion ...`). In 3 of the 4 it
# predicted less than the real gain (1.6 against 5.2, 0.7 against 2.8, 0.8 against 1.8): read it as a floor.
CHECKED_ERROR: float | None = 2.12


def images_read(train: int, validation: int) -> int:
    """How many images the learning curve passes through the network (none without validation images)."""
    return min(train, MAX_TRAIN) + min(validation, MAX_VAL) if validation else 0


def data_checks(class_names: list[str], counts: dict, sizes: dict[str, int], duplicates: dict[str, int]) -> dict:
    """Per-class figures and the warnings they call for. ``counts``: dataset.json's counts; ``sizes``: the smallest
    image side per class; ``duplicates``: images per class that are in a duplicate group."""
    train = {name: counts[name]["train"] for name in class_names}
    largest = max(train.values(), default=0)
    classes, warnings = {}, []
    for name in class_names:
        n = train[name]
        classes[name] = {"train_images": n, "duplicates": duplicates.get(name, 0),
                         "share_of_largest": round(n / largest, 3) if largest else None,
                         "smallest_side": sizes.get(name)}
        if n < FEW_IMAGES:
            warnings.append(f"class {name!r} has {n} training image(s): fewer than {FEW_IMAGES}, its results are not "
                            "reliable; add images")
        if sizes.get(name) is not None and sizes[name] < SMALL_SIDE:
            warnings.append(f"class {name!r} has images {sizes[name]} pixels on a side (under {SMALL_SIDE}): little "
                            "for a CNN to see; larger images would help")
    smallest = min(train.values(), default=0)
    if smallest and largest / smallest > IMBALANCE:
        warnings.append(f"classes are imbalanced: {largest} against {smallest} training images (over "
                        f"{IMBALANCE:g}x); more images of the small classes would help most")
    return {"classes": classes, "warnings": warnings}


def softmax_probe(features: np.ndarray, labels: np.ndarray, num_classes: int, steps: int = 200,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A multinomial logistic regression fitted by full-batch gradient descent (weights, bias), L2-regularised."""
    rng = np.random.default_rng(seed)
    x = features.astype(np.float64)
    w = rng.normal(0, 0.01, (x.shape[1], num_classes))
    b = np.zeros(num_classes)
    onehot = np.eye(num_classes)[labels]
    lr, l2 = 0.5, 1e-4
    for _ in range(steps):
        z = x @ w + b
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        g = (p - onehot) / len(x)
        w -= lr * (x.T @ g + l2 * w)
        b -= lr * g.sum(axis=0)
    return w, b


def learning_curve(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                   num_classes: int, seed: int = 0) -> list[dict]:
    """Validation accuracy of `softmax_probe` trained on nested fractions of the training features (the same
    images in every larger fraction), each fraction stratified by class."""
    mean, std = train_x.mean(axis=0), train_x.std(axis=0) + 1e-6
    tx, vx = (train_x - mean) / std, (val_x - mean) / std
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(np.flatnonzero(train_y == c)) for c in range(num_classes)])
    rank = np.empty(len(order), np.int64)
    for c in range(num_classes):  # a class's k-th image ranks k/size: every fraction holds each class in proportion
        members = order[train_y[order] == c]
        rank[members] = np.arange(len(members)) * len(train_y) // max(1, len(members))
    points = []
    for fraction in FRACTIONS:
        chosen = np.flatnonzero(rank < max(num_classes, fraction * len(train_y)))
        w, b = softmax_probe(tx[chosen], train_y[chosen], num_classes, seed=seed)
        accuracy = float(((vx @ w + b).argmax(axis=1) == val_y).mean())
        points.append({"fraction": fraction, "images": len(chosen), "accuracy": round(accuracy, 4)})
    return points


def power_law(points: list[dict]) -> tuple[float, float, float] | None:
    """``(top, scale, rate)`` of ``accuracy = top - scale * images ** -rate`` fitted to ``points`` (least squares on a
    grid of ``top``), or None when there are too few distinct points."""
    n = np.array([p["images"] for p in points], float)
    acc = np.array([p["accuracy"] for p in points], float)
    if len(set(n)) < 3:
        return None
    best = None
    for top in np.linspace(acc.max() + 1e-3, 1.0, 60):
        gap = top - acc
        if (gap <= 0).any():
            continue
        slope, intercept = np.polyfit(np.log(n), np.log(gap), 1)  # log gap = log scale - rate log n
        residual = float(np.sum((np.log(gap) - (intercept + slope * np.log(n))) ** 2))
        if best is None or residual < best[0]:
            best = (residual, float(top), float(math.exp(intercept)), float(-slope))
    return None if best is None else best[1:]


def advice(points: list[dict], num_classes: int, validation_images: int | None = None) -> dict:
    """From a learning curve: the gain expected from twice the images, and a sentence saying it with its
    uncertainty: the larger of the error measured on held-back data (`CHECKED_ERROR`), the fit's own misses, and one
    validation image's worth of accuracy (a gain smaller than that cannot be seen on these images)."""
    fit = power_law(points)
    last = points[-1]
    per_class = last["images"] / num_classes
    if fit is None:
        return {"curve": points, "gain_points": None, "text": "too few images to draw a learning curve"}
    top, scale, rate = fit
    now = top - scale * last["images"] ** -rate
    doubled = top - scale * (2 * last["images"]) ** -rate
    gain = max(0.0, 100 * (doubled - now))
    resolution = 100 / validation_images if validation_images else 0.0
    error = max(CHECKED_ERROR or 0.0, _spread(points, fit), resolution)
    checked = ("its mean error against real training on data held back; it has mostly underestimated the gain"
               if CHECKED_ERROR is not None
               else "the curve's own fit; this estimate has not been checked on data held back")
    text = (f"about {per_class:,.0f} more images per class would gain about {gain:.1f} points of accuracy "
            f"(± {error:.1f}: {checked})")
    if last["accuracy"] >= 0.995:
        text = (f"the validation images are already all but all right: about {per_class:,.0f} more images per class "
                f"would not show a gain these {validation_images or 'few'} validation images can measure "
                f"(± {error:.1f} points); more varied validation images would tell more")
    return {"curve": points, "fit": {"top": round(top, 4), "scale": round(scale, 4), "rate": round(rate, 4)},
            "more_images_per_class": round(per_class), "gain_points": round(gain, 2),
            "uncertainty_points": round(error, 2), "text": text}


def _spread(points: list[dict], fit) -> float:
    """The fit's largest miss on its own points, in accuracy points: a floor for its uncertainty."""
    top, scale, rate = fit
    return max(100 * abs(p["accuracy"] - (top - scale * p["images"] ** -rate)) for p in points)
