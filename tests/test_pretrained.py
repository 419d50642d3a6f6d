"""A pretrained backbone tried against the job's own network (`trainer.fitting.contender`), with weights made here.

No ImageNet weights can be downloaded in tests: the "ImageNet" file is a MobileNetV3Small without its top, saved in
the legacy HDF5 format under the name Keras' own download has, with random values. What is real: the lookup in the
folders, the loading of that file into the backbone, the two trainings within one budget, the choice by validation
and the artifacts of the network kept.
"""

from __future__ import annotations

import json
import time
import types

import h5py
import keras
import pytest

from trainer import train_cnn
from trainer.data.demo import make_shapes
from trainer.fitting import budget, contender
from trainer.fitting.contender import _not_eligible
from trainer.network.pretrained import KERAS_FILES, find_weights


def keras_download_alike(folder, name=KERAS_FILES["mobilenet_v3_small"]):
    """A file shaped like Keras' ImageNet download for MobileNetV3Small without its top (legacy HDF5 weights)."""
    from keras.src.legacy.saving import legacy_h5_format

    folder.mkdir(parents=True, exist_ok=True)
    backbone = keras.applications.MobileNetV3Small(include_top=False, weights=None, input_shape=(96, 96, 3),
                                                   pooling="avg")
    with h5py.File(folder / name, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, backbone)
    return folder / name


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("photos") / "d", classes=3, per_class=14, size_range=(100, 130),
                       seed=11)


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """This host has no ImageNet weights: both folders searched are empty."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    monkeypatch.setenv("DROPFIT_WEIGHTS_DIR", str(tmp_path / "mounted"))
    return tmp_path


def test_weights_are_found_in_the_mounted_folder_first_then_in_keras_cache(no_weights):
    assert find_weights() is None
    cached = keras_download_alike(no_weights / "keras-home" / "models")
    assert find_weights() == cached
    mounted = keras_download_alike(no_weights / "mounted")
    assert find_weights() == mounted
    (no_weights / "mounted" / KERAS_FILES["mobilenet_v3_small"]).write_bytes(b"")  # an empty file is no weights
    assert find_weights() == cached


def test_a_budgeted_job_on_colour_photos_tries_the_backbone_and_keeps_the_better(photos, no_weights, tmp_path):
    weights = keras_download_alike(no_weights / "mounted")
    out, work, seconds = tmp_path / "out", tmp_path / "work", 125
    train_cnn(photos, target_size="auto", batch_size="auto", num_epochs=50, architecture="cnn", optimizer="adam",
              time_budget=seconds, try_pretrained="auto", output_dir=out, work_dir=work, seed=2)
    summary = json.loads((out / "summary.json").read_text())
    trial = summary["pretrained"]
    assert trial["tried"] and trial["weights"] == str(weights)
    rival, own = trial["candidates"]
    assert rival["network"] == "mobilenet_v3_small (ImageNet)" and own["network"] == "cnn"
    assert rival["epochs"] >= 1 and own["epochs"] >= 1 and 0 <= rival["accuracy"] <= 1
    wins = (rival["accuracy"], -rival["loss"]) > (own["accuracy"], -own["loss"])
    assert trial["kept"] == (rival["network"] if wins else "cnn")
    assert summary["architecture"] == ("mobilenet_v3_small" if wins else "cnn")
    model = keras.models.load_model(out / "model.keras", safe_mode=True)
    assert any(layer.name == "backbone" for layer in model.layers) == wins
    # Both trainings and everything after them fit the one budget; the backbone had its share, not more.
    assert summary["budget"]["used_seconds"] <= seconds + 3
    assert rival["seconds"] < 0.6 * seconds and summary["budget"]["seconds"] == seconds
    assert json.loads((work / "pretrained" / "trial.json").read_text())["ends_at"] < seconds
    assert "Pretrained backbone" in (out / "report.html").read_text()


def test_a_backbone_that_wins_is_exported_as_the_job_asked(photos, no_weights, tmp_path, monkeypatch):
    # Random "ImageNet" weights rarely beat the cnn on validation; real ones would on real photos. The comparison is
    # tested above; here the backbone is made to win, and what follows is real.
    def backbone_wins(trial):
        trial.kept = trial.candidates[0]["network"]
        return True

    monkeypatch.setattr(contender.Trial, "rival_wins", backbone_wins)
    keras_download_alike(no_weights / "mounted")
    out = tmp_path / "out"
    train_cnn(photos, target_size=(96, 96), num_epochs=1, architecture="cnn", try_pretrained=True,
              exports=["onnx"], output_dir=out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["architecture"] == "mobilenet_v3_small" and summary["config"]["exports"] == ["onnx"]
    assert (out / "model.onnx").is_file()
    rows = {r["format"]: r for r in json.loads((out / "exports.json").read_text())["rows"]}
    assert rows["onnx"]["agreement"] >= 0.99 and set(rows) == {"keras", "onnx"}


def test_without_weights_the_job_trains_from_scratch_and_says_where_it_looked(photos, no_weights, tmp_path):
    out = tmp_path / "out"
    train_cnn(photos, target_size=(96, 96), num_epochs=1, architecture="cnn", try_pretrained=True, output_dir=out)
    trial = json.loads((out / "summary.json").read_text())["pretrained"]
    assert not trial["tried"] and trial["candidates"] == []
    assert "no ImageNet weights for mobilenet_v3_small" in trial["why"]
    assert str(no_weights / "mounted") in trial["why"] and str(no_weights / "keras-home" / "models") in trial["why"]
    report = (out / "report.html").read_text()
    assert "no ImageNet weights for mobilenet_v3_small" in report


def test_unusable_weights_fall_back_to_scratch_and_name_the_file(photos, no_weights, tmp_path):
    bad = keras_download_alike(no_weights / "mounted")
    with h5py.File(bad, "w") as f:  # a valid HDF5 file holding another network's weights
        from keras.src.legacy.saving import legacy_h5_format

        legacy_h5_format.save_weights_to_hdf5_group(f, keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]))
    out = tmp_path / "out"
    train_cnn(photos, target_size=(96, 96), num_epochs=1, architecture="cnn", try_pretrained=True, output_dir=out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["architecture"] == "cnn"
    assert not summary["pretrained"]["tried"] and str(bad) in summary["pretrained"]["why"]
    assert "could not be used" in summary["pretrained"]["why"]


@pytest.mark.parametrize(("change", "reason"), [
    ({"try_pretrained": False}, "try_pretrained is false"),
    ({"time_budget": None}, "no time_budget"),
    ({"architecture": "recipe"}, "architecture 'recipe'"),
    ({"color_mode": "grayscale"}, "greyscale"),
    ({"target_size": (64, 64)}, "images of 64 px"),
])
def test_auto_tries_a_backbone_only_for_budgeted_cnn_jobs_on_colour_photos(change, reason):
    from contract.options import TrainOptions

    data = types.SimpleNamespace(val=["an image"], train=["an image"], grey_fraction=0.0)
    eligible = {"architecture": "cnn", "target_size": (128, 128), "color_mode": "rgb", "try_pretrained": "auto",
                "time_budget": 60.0}
    clock = budget.Clock(budget=300.0, started=time.monotonic())
    assert _not_eligible(TrainOptions(**eligible), data, clock) is None
    options = TrainOptions(**{**eligible, **change})
    assert reason in _not_eligible(options, data, clock if options.time_budget else None)


def test_auto_does_not_try_a_backbone_with_too_little_time_left():
    from contract.options import TrainOptions

    data = types.SimpleNamespace(val=["an image"], train=["an image"], grey_fraction=0.0)
    options = TrainOptions(architecture="cnn", target_size=(128, 128), try_pretrained="auto", time_budget=100.0)
    clock = budget.Clock(budget=100.0, started=time.monotonic())
    assert "too little for two networks" in _not_eligible(options, data, clock)
    assert _not_eligible(options.replace(try_pretrained=True), data, clock) is None
