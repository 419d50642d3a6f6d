"""Calibrated confidence: temperature scaling fitted after training, built into every saved form of the model, and
the "unknown" answer below a confidence threshold."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_trainer
from trainer.data.demo import make_shapes
from trainer.fitting import calibration


def overconfident(n=2000, classes=5, accuracy=0.7, seed=0, informative=0.0):
    """Probabilities of a model right 70% of the time that says 0.99 (and their labels); with ``informative``, a
    larger margin when it is right (confidence that ranks answers, as a trained model's does)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    predicted = np.where(rng.random(n) < accuracy, labels, (labels + rng.integers(1, classes, n)) % classes)
    logits = rng.normal(0, 0.5, (n, classes))
    logits[np.arange(n), predicted] += 6.0 + informative * (predicted == labels)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True), labels


def test_temperature_scaling_fixes_overconfidence_without_changing_a_single_answer():
    probs, labels = overconfident()
    t = calibration.fit_temperature(probs, labels)
    scaled = calibration.scale(probs, t)
    assert t > 2  # it was far too sure of itself
    assert calibration.ece(scaled, labels) < calibration.ece(probs, labels) / 3
    assert calibration.nll(scaled, labels) < calibration.nll(probs, labels)
    assert (scaled.argmax(axis=1) == probs.argmax(axis=1)).all()
    confidence = scaled.max(axis=1)
    assert abs(confidence.mean() - (scaled.argmax(axis=1) == labels).mean()) < 0.03  # says 70% when right 70%


def test_coverage_and_the_suggested_threshold():
    probs, labels = overconfident(accuracy=0.9, informative=3.0)
    scaled = calibration.scale(probs, calibration.fit_temperature(probs, labels))
    curve = calibration.coverage(scaled, labels)
    assert curve[-1]["coverage"] == 1.0 and curve[0]["accuracy"] >= curve[-1]["accuracy"]
    suggested = calibration.suggested_threshold(scaled, labels, target=0.95)
    kept = scaled.max(axis=1) >= suggested["threshold"]
    assert (scaled.argmax(axis=1)[kept] == labels[kept]).mean() >= 0.95
    assert suggested["coverage"] == pytest.approx(kept.mean(), abs=1e-3)
    assert calibration.suggested_threshold(scaled, labels, target=1.01)["threshold"] is None


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory):
    """A network trained until it is over-confident — a big dense layer, no augmentation, no early stopping, and a
    quarter of the labels wrong, which it learns by heart — with both exports: what calibration is for."""
    tmp = tmp_path_factory.mktemp("cal")
    job = make_shapes(tmp / "job", classes=3, per_class=40, size_range=(20, 28), seed=9,
                      job={"target_size": 24, "epochs": 25, "batch_size": 8, "exports": ["savedmodel", "tflite"],
                           "data": {"validation_split": 0.3, "audit": {"enabled": False}},
                           "model": {"architecture": "recipe", "dense_units": 256},
                           "augmentation": {"enabled": False}, "optimizer": {"learning_rate": 0.003},
                           "training": {"early_stopping_patience": None, "reduce_lr_patience": None,
                                        "restore_best_weights": False}})
    names = ["circle", "square", "triangle"]
    moves = [(path, job / names[(i + 1) % 3] / f"noisy-{path.name}")  # label noise: 10 of each filed under the next
             for i, name in enumerate(names) for path in sorted((job / name).iterdir())[:10]]
    for path, target in moves:
        path.rename(target)
    proc = run_trainer("run", job, "--out", tmp / "out", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "out"


def test_an_overconfident_model_is_calibrated_and_every_export_carries_the_temperature(overfit_run):
    import keras
    import tensorflow as tf

    from trainer.prediction.api import load_model

    summary = json.loads((overfit_run / "summary.json").read_text())
    cal = summary["calibration"]
    assert cal["temperature"] > 1.0, cal
    assert cal["after"]["nll"] < cal["before"]["nll"]
    assert cal["after"]["accuracy"] == cal["before"]["accuracy"]  # top-1 unchanged
    report = json.loads((overfit_run / "report.json").read_text())
    assert len(report["calibration"]["reliability_after"]) == calibration.BINS and report["calibration"]["coverage"]
    labels = json.loads((overfit_run / "labels.json").read_text())
    assert labels["calibration"]["temperature"] == cal["temperature"]

    model = load_model(overfit_run)  # safe_mode: Keras' own layers, no Lambda
    assert 1 / model.get_layer("calibration").scale == pytest.approx(cal["temperature"], rel=1e-6)
    logits = keras.Model(model.inputs, model.get_layer("calibration").input)
    images = np.random.default_rng(1).integers(0, 256, (6, 24, 24, 3)).astype("uint8")
    calibrated = np.asarray(model.predict_on_batch(images))
    raw = np.asarray(keras.ops.softmax(logits.predict_on_batch(images)))
    np.testing.assert_allclose(calibrated, calibration.scale(raw, cal["temperature"]), atol=1e-5)
    served = tf.saved_model.load(str(overfit_run / "savedmodel"))
    np.testing.assert_allclose(np.asarray(served.serve(tf.constant(images.astype("float32")))), calibrated,
                               atol=1e-4)
    interpreter = tf.lite.Interpreter(model_path=str(overfit_run / "model.tflite"))
    inp = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inp["index"], list(images.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], images.astype(inp["dtype"]))
    interpreter.invoke()
    np.testing.assert_allclose(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]), calibrated,
                               atol=1e-3)


def test_predict_answers_unknown_below_a_confidence(overfit_run, tmp_path):
    images = make_shapes(tmp_path / "new", classes=["circle", "square"], per_class=2, seed=99, size_range=(20, 28))
    proc = run_trainer("predict", overfit_run, images, "--json", "--min-confidence", "1.0")
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert results and all(r["label"] == "unknown" and r["best"] in ("circle", "square", "triangle")
                           for r in results)
    proc = run_trainer("predict", overfit_run, images, "--json", "--min-confidence", "0")
    assert all(r["label"] != "unknown" for r in json.loads(proc.stdout))
    suggested = json.loads((overfit_run / "labels.json").read_text())["calibration"]["min_confidence"]
    proc = run_trainer("predict", overfit_run, images, "--json", "--min-confidence", "suggested")
    if suggested is None:  # no threshold reached 99% on these noisy labels: said so, not guessed
        assert proc.returncode == 2 and "records no threshold" in proc.stderr
    else:
        for r in json.loads(proc.stdout):
            assert (r["label"] == "unknown") == (r["probability"] < suggested)
    proc = run_trainer("predict", overfit_run, images, "--min-confidence", "1.5")
    assert proc.returncode == 2 and "min_confidence must be a probability from 0 to 1" in proc.stderr
