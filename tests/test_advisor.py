"""The advisor's numbers (NumPy only): the per-class checks, the learning curve and its power-law extrapolation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import ROOT
from trainer.outputs import advisor


def test_data_checks_warn_below_each_threshold():
    counts = {"cat": {"train": 40}, "dog": {"train": 9}, "fox": {"train": 30}}
    checks = advisor.data_checks(["cat", "dog", "fox"], counts, {"cat": 64, "dog": 20, "fox": 32}, {"cat": 4})
    assert checks["classes"]["dog"] == {"train_images": 9, "duplicates": 0, "share_of_largest": 0.225,
                                        "smallest_side": 20}
    assert checks["classes"]["cat"]["duplicates"] == 4
    text = "\n".join(checks["warnings"])
    assert "'dog' has 9 training image(s)" in text  # under 10
    assert "'dog' has images 20 pixels" in text and "'fox'" not in text  # 32 px is enough
    assert "imbalanced: 40 against 9" in text  # 4.4x, over 3x
    balanced = advisor.data_checks(["a", "b"], {"a": {"train": 30}, "b": {"train": 10}}, {}, {})
    assert balanced["warnings"] == []  # exactly 3x and 10 images: at the thresholds, not below


def test_the_power_law_fit_recovers_a_known_curve_and_its_extrapolation():
    top, scale, rate = 0.95, 2.0, 0.5
    points = [{"images": n, "accuracy": top - scale * n ** -rate} for n in (100, 200, 400, 800)]
    fit = advisor.power_law(points)
    assert fit is not None
    assert fit[0] == pytest.approx(top, abs=0.01) and fit[2] == pytest.approx(rate, abs=0.05)
    advice = advisor.advice(points, num_classes=10)
    truth = 100 * ((top - scale * 1600 ** -rate) - (top - scale * 800 ** -rate))
    assert advice["gain_points"] == pytest.approx(truth, abs=0.2)
    assert advice["more_images_per_class"] == 80


def test_a_flat_curve_promises_nothing_and_too_few_points_say_so():
    flat = [{"images": n, "accuracy": 0.9} for n in (100, 200, 400, 800)]
    assert advisor.advice(flat, 2)["gain_points"] == pytest.approx(0, abs=0.1)
    assert advisor.advice(flat[:2], 2)["gain_points"] is None


def test_the_learning_curve_grows_with_data_on_features_that_need_many_examples():
    # 10 classes in 64 dimensions, heavily overlapping: a linear classifier keeps improving with more examples.
    rng = np.random.default_rng(0)
    means = rng.normal(0, 0.35, (10, 64))
    y = rng.integers(0, 10, 6000)
    x = means[y] + rng.normal(0, 1, (6000, 64))
    points = advisor.learning_curve(x[:4000], y[:4000], x[4000:], y[4000:], 10)
    assert [p["images"] for p in points] == pytest.approx([500, 1000, 2000, 4000], rel=0.02)
    accuracies = [p["accuracy"] for p in points]
    assert accuracies[-1] > accuracies[0] + 0.03 and accuracies[-1] > 0.5


def test_the_error_stated_with_every_answer_is_the_one_measured_on_held_back_data():
    measured = json.loads((ROOT / "bench" / "results" / "advisor_check.json").read_text())
    assert measured["mean_abs_error_points"] == advisor.CHECKED_ERROR
    assert len(measured["checks"]) >= 4 and {c["dataset"] for c in measured["checks"]} == {"digits", "fashion-mnist"}
    points = [{"images": n, "accuracy": 0.9 - 3 * n ** -0.5} for n in (100, 200, 400, 800)]  # fits exactly
    answer = advisor.advice(points, 10, validation_images=5000)
    assert answer["uncertainty_points"] == advisor.CHECKED_ERROR
    assert f"± {advisor.CHECKED_ERROR:.1f}" in answer["text"] and "underestimated" in answer["text"]
