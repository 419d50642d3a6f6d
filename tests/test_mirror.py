"""Test-time mirroring (`trainer.fitting.mirror`): the averaged model is exact, loads in plain Keras, exports, and is
only chosen when validation says so."""

import json
import time
import zipfile

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from contract.options import TrainOptions  # noqa: E402
from contract.spec import JobSpec  # noqa: E402
from trainer.data.demo import make_shapes  # noqa: E402
from trainer.fitting.calibration import calibrated  # noqa: E402
from trainer.fitting.mirror import mirrored  # noqa: E402
from trainer.network.networks import build_model  # noqa: E402


def _images(n=6, shape=(12, 10, 3), seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape)).astype("float32")


def test_the_mirrored_model_averages_the_features_of_the_image_and_its_mirror_exactly():
    model = build_model((12, 10, 3), 4, architecture="cnn", seed=1)
    x = _images()
    got = mirrored(model).predict(x, verbose=0)
    features = keras.Model(model.inputs, model.get_layer("probabilities").input)
    average = (features.predict(x, verbose=0) + features.predict(x[:, :, ::-1], verbose=0)) / 2
    kernel, bias = model.get_layer("probabilities").get_weights()
    expected = keras.ops.softmax(average @ kernel + bias).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # An image whose halves mirror each other gives one pass's answer: the average of two equal features.
    symmetric = np.concatenate([x[:, :, :5], x[:, :, :5][:, :, ::-1]], axis=2)
    np.testing.assert_allclose(mirrored(model).predict(symmetric, verbose=0), model.predict(symmetric, verbose=0),
                               atol=1e-6)


def test_the_mirrored_model_saves_with_keras_layers_only_and_exports(tmp_path):
    from trainer.outputs import exports

    model = calibrated(mirrored(build_model((12, 10, 1), 3, architecture="cnn", seed=2)), 0.7)
    path = tmp_path / "model.keras"
    model.save(path)
    x = _images(32, (12, 10, 1), seed=3).astype("uint8")
    _, expected = exports.keras_row(path, x, None)  # plain keras.saving.load_model, safe_mode on
    with zipfile.ZipFile(path) as archive:
        assert "dropfit>" not in archive.read("config.json").decode()  # no class registered by dropfit
    np.testing.assert_allclose(expected, model.predict(x.astype("float32"), verbose=0), atol=1e-6)
    for fmt in ("onnx", "tflite"):
        written = exports.export_model(model, fmt, tmp_path, x)
        assert exports.check_export(fmt, written, x, None, expected)["agreement"] == 1.0


def test_a_budgeted_job_with_many_images_per_class_mirrors_and_records_the_choice(tmp_path):
    from trainer import train_cnn

    data = make_shapes(tmp_path / "many", classes=2, per_class=1300, size_range=(16, 16), formats=("png",),
                       modes=("L",), seed=3)
    options = TrainOptions.from_spec(JobSpec.model_validate({"time_budget": 25, "epochs": 2}))
    model = train_cnn(data, options=options, output_dir=tmp_path / "out", verbose=0, started_at=time.monotonic())
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    augmentation, record = summary["config"]["augmentation"], summary["test_time_mirroring"]
    assert augmentation["flip"] == "horizontal" and augmentation["translation"] == 0.05
    assert augmentation["contrast"] == 0.0 and summary["config"]["dropout"] == 0.0
    assert summary["resolved"]["dropout"]["value"] == 0.0
    assert record["images"] == summary["evaluations"]["validation"]["images"]
    # Chosen only for a strictly higher validation accuracy, and then it is what model.keras holds.
    assert record["used"] == (record["val_accuracy_mirrored"] > record["val_accuracy_single"])
    names = {layer.name for layer in model.layers}
    assert ("mirror_average" in names) == record["used"]


def test_jobs_with_few_images_per_class_or_no_budget_do_not_mirror():
    from contract.options import resolve_augmentation

    auto = TrainOptions.from_spec(JobSpec()).augmentation
    assert auto["flip"] == "auto"
    for budgeted, images in ((True, 999 * 10), (False, 6000 * 10)):
        settled = resolve_augmentation(auto, budgeted=budgeted, train_images=images, num_classes=10,
                                       mirror_safe=True)
        assert settled["flip"] == "none" and settled["translation"] == 0.1 and settled["contrast"] == 0.1
    # Asked for, it is kept: mirroring is off for digits with `flip: none`.
    explicit = dict(auto, flip="none")
    # ... and the translation and contrast left on auto are those of a job that does not mirror.
    kept = resolve_augmentation(explicit, budgeted=True, train_images=48_000, num_classes=10, mirror_safe=True)
    assert (kept["flip"], kept["translation"], kept["contrast"]) == ("none", 0.1, 0.1)
