"""Confidence users can trust: temperature scaling, fitted on the validation images after training and built into
the saved model, and the measures that show how far to trust it.

A network trained with cross-entropy is usually over-confident: "0.99" is right far less than 99% of the time.
Temperature scaling divides the logits by one number ``T`` fitted to minimise the negative log-likelihood on held-out
images (Guo et al., 2017). Dividing never changes which class is largest, so top-1 predictions stay exactly as they
were. `calibrated` builds ``T`` into the model with Keras' own layers (the output layer's logits, a ``Rescaling`` by
``1/T``, a softmax), so ``model.keras`` loads in plain Keras without dropfit, and every export answers with calibrated
probabilities.

The NumPy functions here (fitting ``T``, expected calibration error, reliability, coverage) import no TensorFlow.
"""

from __future__ import annotations

import math

import numpy as np

EPS = 1e-12
BINS = 15
OUTPUT_LAYER = "probabilities"  # the softmax layer every dropfit network ends with
TARGET_ACCURACY = 0.99  # labels.json suggests the confidence threshold that reaches this on held-out images


def scale(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities with temperature ``T`` applied: ``softmax(log p / T)`` (softmax outputs are ``softmax(z)``, so
    this is ``softmax(z / T)`` exactly)."""
    logits = np.log(np.clip(np.asarray(probs, np.float64), EPS, 1.0)) / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=-1, keepdims=True)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true labels."""
    if len(labels) == 0:
        return float("nan")
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], EPS, 1.0))))


T_MIN, T_MAX = 0.25, 20.0


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The ``T`` (from 0.25 to 20) that minimises the NLL of ``labels`` under ``probs`` (a grid on log T, then a
    golden-section refinement; NLL is smooth and unimodal in log T).

    With no mistake among the validation images there is nothing to measure over-confidence against (the NLL would
    only ask for ever sharper probabilities): such a model keeps ``T = 1``.
    """
    if len(labels) < 2 or bool(np.all(probs.argmax(axis=-1) == labels)):
        return 1.0
    grid = np.exp(np.linspace(math.log(T_MIN), math.log(T_MAX), 61))
    losses = [nll(scale(probs, t), labels) for t in grid]
    best = int(np.argmin(losses))
    lo, hi = math.log(grid[max(0, best - 1)]), math.log(grid[min(len(grid) - 1, best + 1)])
    golden = (math.sqrt(5) - 1) / 2
    a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
    fa, fb = nll(scale(probs, math.exp(a)), labels), nll(scale(probs, math.exp(b)), labels)
    for _ in range(40):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - golden * (hi - lo)
            fa = nll(scale(probs, math.exp(a)), labels)
        else:
            lo, a, fa = a, b, fb
            b = lo + golden * (hi - lo)
            fb = nll(scale(probs, math.exp(b)), labels)
    return float(math.exp((lo + hi) / 2))


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> list[dict]:
    """Per confidence bin: mean confidence, accuracy and count (the reliability diagram)."""
    confidence = probs.max(axis=-1)
    correct = probs.argmax(axis=-1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    out = []
    for i in range(bins):
        inside = (confidence > edges[i]) & (confidence <= edges[i + 1]) if i else (confidence <= edges[1])
        n = int(inside.sum())
        out.append({"low": float(edges[i]), "high": float(edges[i + 1]), "count": n,
                    "confidence": float(confidence[inside].mean()) if n else None,
                    "accuracy": float(correct[inside].mean()) if n else None})
    return out


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error: the count-weighted gap between confidence and accuracy, over confidence bins."""
    n = len(labels)
    if n == 0:
        return float("nan")
    return float(sum(b["count"] / n * abs(b["confidence"] - b["accuracy"]) for b in reliability(probs, labels, bins)
                     if b["count"]))


def coverage(probs: np.ndarray, labels: np.ndarray, points: int = 50) -> list[dict]:
    """"Answer only above confidence t": for thresholds t, the share of images answered and their accuracy."""
    if len(labels) == 0:
        return []
    confidence = probs.max(axis=-1)
    correct = probs.argmax(axis=-1) == labels
    order = np.argsort(-confidence, kind="stable")
    hits = np.cumsum(correct[order])
    out = []
    for k in sorted({max(1, round(len(order) * q)) for q in np.linspace(0.02, 1.0, points)}):
        out.append({"threshold": float(confidence[order[k - 1]]), "coverage": k / len(order),
                    "accuracy": float(hits[k - 1] / k)})
    return out


def suggested_threshold(probs: np.ndarray, labels: np.ndarray, target: float = TARGET_ACCURACY) -> dict:
    """The smallest confidence threshold whose answers reach ``target`` accuracy on these images (and how many it
    answers), or ``threshold: None`` when no threshold does."""
    if len(labels) == 0:
        return {"target_accuracy": target, "threshold": None, "coverage": 0.0, "images": 0}
    confidence = probs.max(axis=-1)
    correct = probs.argmax(axis=-1) == labels
    order = np.argsort(-confidence, kind="stable")
    accuracy = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    ok = np.flatnonzero(accuracy >= target)
    if len(ok) == 0:
        return {"target_accuracy": target, "threshold": None, "coverage": 0.0, "images": len(labels)}
    k = int(ok[-1]) + 1  # the most answers that still reach the target
    return {"target_accuracy": target, "threshold": round(float(confidence[order[k - 1]]), 6),
            "coverage": round(k / len(order), 4), "images": len(labels)}


def measures(probs: np.ndarray, labels: np.ndarray) -> dict:
    return {"ece": ece(probs, labels), "nll": nll(probs, labels),
            "accuracy": float((probs.argmax(axis=-1) == labels).mean()) if len(labels) else None}


def calibrated(model, temperature: float):
    """``model`` answering ``softmax(logits / T)``: a new model sharing its layers up to the output layer, whose
    softmax is split into the same Dense without activation, a `Rescaling` by ``1/T`` (named ``calibration``) and a
    softmax. Built-in layers only, so the saved model loads in plain Keras without dropfit; ``T = 1`` gives the
    model's own probabilities, a different ``T`` the same top-1 answers."""
    import keras

    head = model.get_layer(OUTPUT_LAYER)
    logits_layer = keras.layers.Dense(head.units, dtype="float32", name="logits")
    logits = logits_layer(head.input)
    logits_layer.set_weights(head.get_weights())
    scaled = keras.layers.Rescaling(1.0 / temperature, dtype="float32", name="calibration")(logits)
    outputs = keras.layers.Activation("softmax", dtype="float32", name=OUTPUT_LAYER)(scaled)
    return keras.Model(model.inputs, outputs, name=model.name)

