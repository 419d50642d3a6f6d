"""train_cnn end to end with real TensorFlow: it learns, writes every artifact, and handles awkward data."""

from __future__ import annotations

import csv
import json
import tempfile
import threading

import keras
import numpy as np
import pytest
from PIL import Image

from trainer import TrainingInterrupted, train_cnn
from trainer.data.demo import draw_shape, make_shapes
from trainer.data.pipeline import Batches, make_dataset
from trainer.data.scan import DatasetError, Sample
from trainer.prediction.api import evaluate, load_model, predict

ARTIFACTS = ["model.keras", "labels.json", "metrics.csv", "history.png", "confusion_matrix.png", "errors.png",
             "report.json", "report.html", "dataset.json", "summary.json"]


def test_default_model_learns_the_shapes(trained):
    model, out = trained
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert max(float(r["val_accuracy"]) for r in rows) >= 0.90, rows
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluation"]["split"] == "validation"
    assert summary["evaluation"]["accuracy"] >= 0.75
    assert model.class_names == ["circle", "square", "triangle"]


def test_every_artifact_is_written_and_well_formed(trained):
    _, out = trained
    for name in ARTIFACTS:
        assert (out / name).stat().st_size > 0, name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert list(rows[0]) == ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds",
                             "images_per_second"]
    assert [int(r["epoch"]) for r in rows] == list(range(1, 11))
    assert all(float(r["images_per_second"]) > 0 and float(r["learning_rate"]) == pytest.approx(1e-3) for r in rows)
    labels = json.loads((out / "labels.json").read_text())
    calibration = labels.pop("calibration")
    assert labels == {"classes": ["circle", "square", "triangle"], "target_size": [48, 48], "color_mode": "rgb"}
    assert calibration["temperature"] > 0 and calibration["measured_on"] == "validation"
    assert calibration["target_accuracy"] == 0.99 and 0 < calibration["coverage_at_min_confidence"] <= 1
    report = json.loads((out / "report.json").read_text())
    assert report["split"] == "validation" and set(report["per_class"]) == set(labels["classes"])
    assert {"precision", "recall", "f1", "support"} <= set(report["per_class"]["circle"])
    assert np.asarray(report["confusion_matrix"]["matrix"]).sum() == report["images"] == 36
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["counts"]["circle"] == {"total": 60, "train": 48, "validation": 12, "test": 0}
    skipped = {s["file"]: s["reason"] for s in dataset["skipped"]}
    assert set(skipped) == {f"circle/{n}" for n in ("zero.jpg", "notes.txt", "truncated.jpg", "truncated.png",
                                                     "garbage.png")}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["target_size"] == [48, 48] and summary["config"]["seed"] == 3
    assert summary["versions"]["tensorflow"].startswith("2.21") and summary["versions"]["keras"].startswith("3.")
    assert summary["final"]["epoch"] == 10 and summary["durations"]["total_seconds"] > 0
    for png in ("history.png", "confusion_matrix.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size[0] > 300


def test_saved_model_takes_raw_pixels_and_matches_the_trained_one(trained):
    model, out = trained
    loaded = load_model(out)
    assert loaded.class_names == model.class_names
    assert isinstance(loaded.layers[1], keras.layers.Rescaling)
    rng = np.random.default_rng(5)
    batch = np.stack([np.asarray(draw_shape(s, 48, 48, rng)) for s in ("circle", "square", "triangle")])
    np.testing.assert_allclose(loaded.predict(batch, verbose=0), model.predict(batch, verbose=0), atol=1e-5)
    assert batch.max() > 1  # raw 0-255 pixels, no caller-side scaling


def test_predict_handles_any_size_mode_and_format(trained, tmp_path):
    model, out = trained
    rng = np.random.default_rng(11)
    files = []
    for name, im, fmt in [
        ("big_circle.jpg", draw_shape("circle", 400, 300, rng), "JPEG"),
        ("cmyk_square.jpg", draw_shape("square", 90, 90, rng).convert("CMYK"), "JPEG"),
        ("gray16.png", Image.fromarray(np.asarray(draw_shape("triangle", 60, 60, rng).convert("L"), np.uint16)
                                        * 257), "PNG"),
        ("tiny.png", draw_shape("circle", 3, 3, rng), "PNG"),
        ("strip.webp", draw_shape("square", 500, 20, rng), "WEBP"),
        ("alpha.png", draw_shape("triangle", 70, 50, rng).convert("RGBA"), "PNG"),
        ("palette.gif", draw_shape("circle", 64, 64, rng).convert("P"), "GIF"),
    ]:
        im.save(tmp_path / name, fmt)
        files.append(tmp_path / name)
    (tmp_path / "notes.txt").write_text("hello")
    results = predict(out, [*files, tmp_path / "notes.txt"], top_k=3)
    assert [r["file"] for r in results] == [str(f) for f in [*files, tmp_path / "notes.txt"]]
    for r in results[:-1]:
        assert r["label"] in model.class_names and len(r["top_k"]) == 3
        assert sum(t["probability"] for t in r["top_k"]) == pytest.approx(1.0, abs=1e-4)
        assert r["top_k"][0]["probability"] >= r["top_k"][1]["probability"]
    assert results[0]["label"] == "circle" and results[1]["label"] == "square"
    assert results[-1]["error"] == "not an image Pillow can read"
    arrays = predict(model, [np.asarray(draw_shape("circle", 48, 48, rng))])
    assert arrays[0]["label"] == "circle"


def test_evaluate_on_a_labelled_folder(trained, shapes_dir, tmp_path):
    _, out = trained
    report = evaluate(out, shapes_dir)
    assert report["images"] == 180 and report["accuracy"] >= 0.8
    assert len(report["skipped"]) == 5
    make_shapes(tmp_path / "other", classes=["circle", "dogs"], per_class=2)
    with pytest.raises(DatasetError, match="folder 'dogs' that is not one of the model's classes"):
        evaluate(out, tmp_path / "other")


def test_pipeline_keeps_every_image_and_the_last_partial_batch(tmp_path):
    root = make_shapes(tmp_path / "d", classes=2, per_class=19, size_range=(10, 30), formats=("png", "bmp"))
    samples = [Sample(str(p), i, p.suffix == ".png") for i, c in enumerate(["circle", "square"])
               for p in sorted((root / c).iterdir())]
    assert len(samples) == 38
    ds = make_dataset(samples, Batches(2, (16, 16), 8), shuffle_seed=1)
    for _ in range(2):  # the cached second epoch too
        sizes = [int(images.shape[0]) for images, _ in ds]
        assert sizes == [8, 8, 8, 8, 6]
    images, labels = next(iter(ds))
    assert images.dtype == np.uint8 and tuple(images.shape[1:]) == (16, 16, 3) and tuple(labels.shape) == (8, 2)


class _CountSteps(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.steps = []

    def on_epoch_begin(self, epoch, logs=None):
        self.steps.append(0)

    def on_train_batch_end(self, batch, logs=None):
        self.steps[-1] += 1


def test_dataset_smaller_than_one_batch_still_trains(tmp_path):
    root = make_shapes(tmp_path / "d", classes=2, per_class=3, size_range=(20, 40))
    counter = _CountSteps()
    model = train_cnn(root, (32, 32), None, 32, 2, callbacks=[counter], validation_split=0.0, num_classes=2)
    assert counter.steps == [1, 1]  # the recipe's steps_per_epoch = 6 // 32 = 0 would not train at all
    assert model.output_shape == (None, 2)


def test_small_grayscale_images_get_a_shallower_network(tmp_path):
    root = make_shapes(tmp_path / "mnistish", classes=2, per_class=8, size_range=(28, 28), modes=("L",))
    model = train_cnn(root, target_size=(28, 28), num_epochs=1, batch_size=8, color_mode="grayscale",
                      validation_split=0.25)
    assert model.input_shape == (None, 28, 28, 1)
    assert len([layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]) == 3
    rgb = train_cnn(root, target_size=(28, 28), num_epochs=1, batch_size=8)
    assert rgb.input_shape == (None, 28, 28, 3)


def test_class_subset_csv_labels_and_validation_directory(shapes_dir, tmp_path):
    subset = train_cnn(shapes_dir, (32, 32), ["triangle", "square"], 16, 1)
    assert subset.class_names == ["triangle", "square"] and subset.output_shape == (None, 2)

    rows = ["filename,label"] + [f"{p.relative_to(shapes_dir)},{'round' if p.parent.name == 'circle' else 'corner'}"
                                 for p in sorted(shapes_dir.glob("*/*_00[0-1]?.*"))]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    by_csv = train_cnn(shapes_dir, (32, 32), num_epochs=1, labels_csv=tmp_path / "labels.csv")
    assert by_csv.class_names == ["corner", "round"]

    val = make_shapes(tmp_path / "val", classes=2, per_class=4, seed=5)
    out = tmp_path / "out"
    model = train_cnn(shapes_dir, (32, 32), ["circle", "square"], 16, 1, validation_directory=val, output_dir=out)
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["validation_images"] == 8 and dataset["train_images"] == 120
    assert model.class_names == ["circle", "square"]


@pytest.mark.parametrize("kwargs, message", [
    ({"num_epochs": 0}, "num_epochs must be a positive integer. Received: num_epochs=0"),
    ({"batch_size": -1}, "batch_size must be a positive integer. Received: batch_size=-1"),
    ({"target_size": (200,)}, "target_size must be 'auto' or a (height, width) pair of integers >= 4"),
    ({"architecture": "vgg"}, "architecture must be one of ('cnn', 'recipe',"),
    ({"test_split": 0.5, "validation_split": 0.5}, "validation_split + test_split must be below 1"),
    ({"exports": ("coreml",)},
     "exports must be a list of formats from 'savedmodel', 'tflite', 'tflite_int8', 'onnx', 'openvino'"),
    ({"class_weight": "auto"}, "class_weight must be 'balanced', None or a dict"),
    ({"validation_split": 1.0}, "validation_split must be a number in [0, 1). Received: validation_split=1.0"),
    ({"optimizer": "adamw"}, "optimizer must be one of ('rmsprop', 'adam', 'sgd')"),
    ({"classes": ["only"]}, "classes must be a list of at least 2 distinct class names"),
    ({"verbose": 5}, "verbose must be 0, 1, 2 or 'auto'"),
])
def test_arguments_are_validated_up_front(shapes_dir, kwargs, message):
    with pytest.raises(ValueError) as info:
        train_cnn(shapes_dir, **kwargs)
    assert message in str(info.value)


def test_num_classes_must_agree_with_the_data(shapes_dir):
    with pytest.raises(ValueError, match=r"num_classes=5 does not match the 3 classes found .*\['circle', 'square'"):
        train_cnn(shapes_dir, num_classes=5)


class _SetAfter(keras.callbacks.Callback):
    def __init__(self, event, epochs):
        super().__init__()
        self.event, self.epochs = event, epochs

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epochs:
            self.event.set()


def test_stop_request_interrupts_safely_and_work_dir_resumes(tmp_path):
    root = make_shapes(tmp_path / "d", classes=2, per_class=10, size_range=(20, 40))
    out, work = tmp_path / "out", tmp_path / "work"
    stop = threading.Event()
    seen = []
    with pytest.raises(TrainingInterrupted) as info:
        train_cnn(root, (24, 24), num_epochs=4, batch_size=4, output_dir=out, work_dir=work, stop_event=stop,
                  callbacks=[_SetAfter(stop, 2)], on_event=lambda name, payload: seen.append(name))
    assert info.value.completed_epochs == 2
    assert seen == ["started", "epoch_end", "epoch_end"]
    assert not (out / "model.keras").exists()
    events = []
    train_cnn(root, (24, 24), num_epochs=4, batch_size=4, output_dir=out, work_dir=work,
              on_event=lambda name, payload: events.append((name, payload)))
    assert events[0][0] == "started" and events[0][1]["resumed_from"] == 2
    assert [p["epoch"] for n, p in events if n == "epoch_end"] == [3, 4]
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == 2


def test_a_temporary_disk_cache_is_removed_however_training_ends(tmp_path, monkeypatch):
    root = make_shapes(tmp_path / "d", classes=2, per_class=6, size_range=(20, 30))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where tempfile puts the cache (stdlib setting)
    stop = threading.Event()
    with pytest.raises(TrainingInterrupted) as info:
        train_cnn(root, (16, 16), num_epochs=3, batch_size=4, cache="disk", stop_event=stop,
                  callbacks=[_SetAfter(stop, 1)])
    # Removed when train_cnn raised, not whenever the garbage collector gets to it: the caller still holds the
    # exception (a notebook keeps the last traceback, and with it every frame and the cache folder).
    assert info.value.completed_epochs == 1
    assert list(scratch.glob("dropfit-cache-*")) == []


def test_the_advisor_says_whether_the_data_is_enough(trained):
    _, out = trained
    summary = json.loads((out / "summary.json").read_text())
    dataset = json.loads((out / "dataset.json").read_text())
    advice = summary["advisor"]
    for name, figures in advice["classes"].items():
        assert figures["train_images"] == dataset["counts"][name]["train"] == 48
        assert figures["share_of_largest"] == 1.0
        assert 36 <= figures["smallest_side"] <= 110  # the shapes were drawn 36 to 110 px on a side
    assert advice["warnings"] == []  # 48 balanced images per class of 36 px or more: nothing to warn of
    curve = advice["learning_curve"]
    images = [p["images"] for p in curve["curve"]]
    assert images == sorted(images) and images[-1] == 3 * 48
    assert all(0 <= p["accuracy"] <= 1 for p in curve["curve"])
    assert curve["gain_points"] is not None and curve["gain_points"] >= 0
    assert curve["uncertainty_points"] >= 100 / 36  # never finer than one of the 36 validation images
    assert "48 more images per class" in curve["text"]
    page = (out / "report.html").read_text()
    assert "Is the data enough?" in page and "48 more images per class" in page
