"""Beyond the recipe: every training option of job.yaml, with real (tiny) training runs."""

from __future__ import annotations

import csv
import html.parser
import json
import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from conftest import system_tool
from trainer import train_cnn
from trainer.data.demo import draw_shape, make_shapes
from trainer.data.scan import DatasetError, Sample, auto_target_size
from trainer.network.backbones import build_backbone
from trainer.network.networks import build_model


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("opts") / "d", classes=3, per_class=16, size_range=(28, 44), seed=4)


def summary_of(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_auto_target_size_follows_the_images():
    def samples(*sizes):
        return [Sample(f"/x/{i}", 0, True, size) for i, size in enumerate(sizes)]

    assert auto_target_size(samples((28, 28), (28, 28), (30, 26))) == (32, 32)  # rounded to 8, never upscaled
    assert auto_target_size(samples((8, 8), (8, 8))) == (28, 28)  # at least 28
    assert auto_target_size(samples((300, 400), (600, 800), (310, 410))) == (168, 224)  # capped at 224, aspect kept


def test_auto_size_on_small_images_trains_small(tmp_path):
    data = make_shapes(tmp_path / "tiny", classes=2, per_class=6, size_range=(28, 28), modes=("L",))
    out = tmp_path / "out"
    model = train_cnn(data, target_size="auto", num_epochs=1, architecture="cnn", output_dir=out)
    assert model.input_shape == (None, 32, 32, 3)  # 28 rounded up to a multiple of 8, not 200x200
    assert summary_of(out)["config"]["target_size"] == [32, 32]


def test_augmentation_is_inside_the_model_and_only_acts_in_training(tmp_path):
    aug = {"flip": "horizontal", "rotation": 0.1, "zoom": 0.1, "translation": 0.1, "contrast": 0.2}
    model = build_model((32, 32, 3), 3, architecture="cnn", augmentation=aug, seed=1)
    layer = model.get_layer("augmentation")
    assert [step.name for step in layer.steps] == ["flip", "rotation", "zoom", "translation", "contrast"]
    x = np.stack([np.asarray(draw_shape("circle", 32, 32, np.random.default_rng(i))) for i in range(4)])
    x = x.astype("float32")
    np.testing.assert_array_equal(np.asarray(layer(x)), x)  # a plain call never augments
    np.testing.assert_array_equal(np.asarray(layer(x, training=False)), x)
    assert not np.allclose(np.asarray(layer(x, training=True)), x)
    first, second = np.asarray(model(x)), np.asarray(model(x))
    np.testing.assert_array_equal(first, second)
    model.save(tmp_path / "m.keras")
    reloaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_allclose(np.asarray(reloaded(x)), first, atol=1e-6)
    assert reloaded.get_layer("augmentation").options == aug
    assert build_model((32, 32, 3), 3, architecture="cnn", augmentation={"flip": "none"}).layers[1].name != \
        "augmentation"


def test_early_stopping_and_learning_rate_reduction(tmp_path):
    # Noise images with random labels and a learning rate far too high: validation loss has nothing to learn, so it
    # cannot keep improving and both controls must kick in. (On real shapes the halved rate can rescue training.)
    rng = np.random.default_rng(11)
    for c in range(3):
        (tmp_path / "noise" / f"c{c}").mkdir(parents=True)
        for i in range(15):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), np.uint8)).save(tmp_path / "noise" / f"c{c}" / f"{i}.png")
    out = tmp_path / "out"
    train_cnn(tmp_path / "noise", (24, 24), num_epochs=30, architecture="recipe", optimizer="sgd", learning_rate=0.5,
              early_stopping_patience=3, reduce_lr_patience=1, reduce_lr_factor=0.5, output_dir=out, seed=5)
    summary = summary_of(out)
    assert summary["stopped_early"] and summary["epochs_trained"] < 30
    rates = [float(r["learning_rate"]) for r in csv.DictReader((out / "metrics.csv").open())]
    assert rates[0] == pytest.approx(0.5) and min(rates) <= 0.25
    assert summary["best_epoch"] is not None


def test_balanced_class_weights_and_small_class_warnings(tmp_path):
    data = make_shapes(tmp_path / "imb", classes=["common", "rare"], per_class=4, size_range=(24, 32), seed=2)
    extra = make_shapes(tmp_path / "more", classes=["common"], per_class=16, size_range=(24, 32), seed=3)
    for f in (extra / "common").iterdir():
        shutil.move(f, data / "common" / f"extra_{f.name}")
    out = tmp_path / "out"
    train_cnn(data, (24, 24), num_epochs=1, validation_split=0.25, class_weight="balanced", output_dir=out)
    weights = summary_of(out)["config"]["class_weights"]
    # 15 common and 3 rare training images: N / (classes * n_class)
    assert weights == {"common": pytest.approx(18 / 30), "rare": pytest.approx(18 / 6)}
    warnings = json.loads((out / "dataset.json").read_text())["warnings"]
    assert any("class 'rare' has only 3 training image(s)" in w for w in warnings)
    assert any("imbalanced: 15 vs 3" in w for w in warnings)


def test_test_split_is_held_out_and_reported(small, tmp_path):
    out = tmp_path / "out"
    train_cnn(small, (24, 24), num_epochs=2, validation_split=0.25, test_split=0.25, output_dir=out)
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["test_images"] == 12 and dataset["validation_images"] == 9 and dataset["train_images"] == 27
    assert dataset["counts"]["circle"] == {"total": 16, "train": 9, "validation": 3, "test": 4}
    report = json.loads((out / "report.json").read_text())
    assert report["split"] == "test" and report["held_out"] and report["images"] == 12
    assert set(report["splits"]) == {"test", "validation"}
    assert summary_of(out)["evaluation"]["split"] == "test"


def test_test_directory_and_no_held_out_data(small, tmp_path):
    test_dir = make_shapes(tmp_path / "test", classes=3, per_class=2, size_range=(28, 44), seed=9)
    out = tmp_path / "out"
    train_cnn(small, (24, 24), num_epochs=1, test_directory=test_dir, output_dir=out)
    assert json.loads((out / "report.json").read_text())["images"] == 6
    bare = tmp_path / "bare"
    train_cnn(small, (24, 24), num_epochs=1, validation_split=0.0, output_dir=bare)
    report = json.loads((bare / "report.json").read_text())
    assert report["split"] == "train" and report["held_out"] is False
    assert any("no held-out images" in w for w in json.loads((bare / "dataset.json").read_text())["warnings"])


def test_same_seed_same_split_initialisation_and_first_epoch(small, tmp_path):
    class FirstWeights(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.weights = [w.copy() for w in self.model.get_weights()]

    runs = []
    for i in range(2):
        cb = FirstWeights()
        out = tmp_path / f"run{i}"
        train_cnn(small, (24, 24), num_epochs=1, architecture="cnn", augmentation=True, seed=42, callbacks=[cb],
                  output_dir=out)
        runs.append((cb.weights, json.loads((out / "dataset.json").read_text()),
                     next(iter(csv.DictReader((out / "metrics.csv").open())))))
    (w0, d0, m0), (w1, d1, m1) = runs
    assert all(np.array_equal(a, b) for a, b in zip(w0, w1, strict=True))
    assert d0["counts"] == d1["counts"]
    assert float(m0["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-3)
    assert summary_of(tmp_path / "run0")["seed"] == 42


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("tiny") / "d", classes=2, per_class=6, size_range=(32, 40), seed=5)


@pytest.mark.parametrize("architecture", ["mobilenet_v3_small", "efficientnet_b0", "resnet50"])
def test_backbones_take_raw_pixels_and_reload_in_safe_mode(tmp_path, architecture):
    model = build_model((32, 32, 1), 2, architecture=architecture, weights=None)  # grey input becomes RGB inside
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 1)).astype("float32")
    expected = np.asarray(model(x))
    model.save(tmp_path / "m.keras")
    reloaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_allclose(np.asarray(reloaded(x)), expected, atol=1e-5)
    with pytest.raises(ValueError, match="needs images of at least 32x32"):
        build_model((28, 28, 3), 2, architecture=architecture)


def test_resnet_preprocessing_layer_matches_keras_applications():
    from trainer.network.backbones import caffe_preprocess

    x = np.random.default_rng(1).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    expected = keras.applications.resnet50.preprocess_input(x.copy())
    np.testing.assert_allclose(np.asarray(caffe_preprocess()(x)), expected, atol=1e-4)


def test_transfer_learning_freezes_then_fine_tunes_and_resumes_in_either_phase(tiny, tmp_path):
    import threading

    from trainer import TrainingInterrupted

    weights = tmp_path / "mobilenet.weights.h5"
    build_backbone("mobilenet_v3_small", (32, 32, 3), None).save_weights(weights)
    out, work, stop = tmp_path / "out", tmp_path / "work", threading.Event()
    trainable_counts = []

    class Watch(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            trainable_counts.append(len(self.model.trainable_weights))

        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 == 3:  # the first epoch of fine-tuning
                stop.set()

    kwargs = dict(target_size=(32, 32), num_epochs=2, batch_size=8, architecture="mobilenet_v3_small",
                  weights=str(weights), fine_tune_epochs=2, fine_tune_learning_rate=1e-5, optimizer="adam",
                  output_dir=out, work_dir=work)
    with pytest.raises(TrainingInterrupted) as info:
        train_cnn(tiny, **kwargs, stop_event=stop, callbacks=[Watch()])
    assert info.value.completed_epochs == 3
    assert trainable_counts[0] == 2 and trainable_counts[1] > 50  # head only, then the whole backbone
    events = []
    model = train_cnn(tiny, **kwargs, on_event=lambda n, p: events.append((n, p)))
    assert events[0][1]["resumed_from"] == 3 and events[0][1]["epochs"] == 4
    assert [p["epoch"] for n, p in events if n == "epoch_end"] == [4]
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    rates = [float(r["learning_rate"]) for r in rows]
    assert rates[:2] == [pytest.approx(1e-3)] * 2 and rates[2:] == [pytest.approx(1e-5)] * 2
    assert model.get_layer("backbone").trainable
    wrong = tmp_path / "wrong.weights.h5"
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save_weights(wrong)
    with pytest.raises(DatasetError, match=r"model\.weights: .* does not hold MobileNetV3Small weights"):
        train_cnn(tiny, (32, 32), num_epochs=1, architecture="mobilenet_v3_small", weights=str(wrong))


def test_a_failed_export_names_its_format_and_leaves_nothing(small, tmp_path):
    from trainer.network.networks import build_model
    from trainer.outputs.exports import ExportError, export_model, int8_warning

    model = build_model((32, 32, 3), 3, architecture="recipe")
    with pytest.raises(ExportError, match="tflite_int8 export needs training images"):
        export_model(model, "tflite_int8", tmp_path, np.zeros((0, 32, 32, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []  # no model_int8.tflite, no temporary folder
    rows = [{"format": "keras", "accuracy": 0.95, "images": 100},
            {"format": "tflite_int8", "accuracy": 0.93, "images": 100}]
    assert "loses 2.0 points" in int8_warning(rows)
    assert int8_warning([rows[0], {**rows[1], "accuracy": 0.945}]) is None


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links, self.text, self.headings, self._h = [], [], [], [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag in ("a", "link", "script"):
            self.links.append((tag, attrs))
        self._h = tag == "h2"

    def handle_data(self, data):
        self.text.append(data)
        if self._h:
            self.headings.append(data.strip())
            self._h = False


@pytest.fixture(scope="module")
def report_run(small, tmp_path_factory):
    data = tmp_path_factory.mktemp("rep") / "d"
    shutil.copytree(small, data)
    (data / "circle" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    os.rename(data / "triangle", data / "tri<b>angle")  # names come from users: the page must escape them
    out = data.parent / "out"
    train_cnn(data, (24, 24), num_epochs=2, validation_split=0.25, output_dir=out)
    return out


def test_report_html_is_one_self_contained_page_with_everything(report_run):
    page = _Page()
    text = (report_run / "report.html").read_text()
    page.feed(text)
    # Learning curves, confusion matrix, misclassified images, calibration (no duplicates, no suspects here).
    assert len(page.images) == 4 and all(src.startswith("data:image/png;base64,") for src in page.images)
    assert not page.links  # no scripts, stylesheets or links to fetch
    report = json.loads((report_run / "report.json").read_text())
    expected = {"Learning curves", "Per class (validation images)", "Confusion matrix", "Dataset",
                "Skipped files (1)", "Resolved job spec", "Versions"}
    if report["most_confused"]:
        expected.add("Most confused pairs")
    assert expected <= set(page.headings), page.headings
    assert any(h.startswith("Confidence (temperature ") for h in page.headings)
    cells = [t.strip() for t in page.text if t.strip()]
    for name, m in report["per_class"].items():  # each class's row carries its own figures, in order
        row = [name, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", str(m["support"])]
        assert any(cells[i:i + 5] == row for i in range(len(cells))), row
    assert "circle/broken.jpg" in cells
    assert "tri&lt;b&gt;angle" in text and "tri<b>angle" not in text  # escaped, not injected
    spec = text[text.index("Resolved job spec"):]
    assert "&quot;num_epochs&quot;: 2" in spec and "&quot;validation_split&quot;: 0.25" in spec
    errors = report["misclassified"]
    assert all({"file", "true", "predicted", "probability"} <= set(e) for e in errors)
    with Image.open(report_run / "errors.png") as im:
        assert im.size[0] > 200


def test_report_html_renders_in_headless_chromium(report_run, tmp_path):
    chromium = shutil.which("chromium-browser") or system_tool("chromium", "Debian: apt-get install chromium")
    shot = tmp_path / "shot.png"
    proc = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2400",
                           f"--screenshot={shot}", (report_run / "report.html").as_uri()],
                          capture_output=True, text=True, timeout=120)
    # (A page that fails to load still exits 0, without a screenshot: both are checked.)
    assert proc.returncode == 0 and shot.exists(), (proc.returncode, proc.stderr[-2000:])
    with Image.open(shot) as im:
        assert im.size == (1200, 2400)
        rgb = np.asarray(im.convert("RGB"), dtype=float)
    grey = rgb.mean(axis=2)
    assert grey.std() > 10  # not a blank page
    dark = (grey < 128).mean()
    assert 0.005 < dark < 0.5  # text and tables, on a light page
    # The plots are drawn: strongly coloured pixels (curves, the confusion matrix's blues, the images) cover a few
    # percent of the page (measured: 5.7%). A page of text alone has none, and one whose images fail to decode
    # shows only their small broken-image icons (0.09%).
    colourful = (rgb.max(axis=2) - rgb.min(axis=2) > 60).mean()
    assert colourful > 0.01, colourful


def test_weight_averaging_is_scored_against_the_best_epoch_and_the_better_one_kept(tmp_path):
    from trainer import train_cnn
    from trainer.data.demo import make_shapes
    from trainer.fitting.phases import ema_momentum

    assert ema_momentum(1) == 0.9 and ema_momentum(100) == pytest.approx(0.99) and ema_momentum(10**6) == 0.999
    data = make_shapes(tmp_path / "shapes", classes=2, per_class=24, size_range=(24, 32))
    out = tmp_path / "out"
    train_cnn(data, target_size=(24, 24), batch_size=8, num_epochs=6, output_dir=out, seed=1,
              weight_averaging=True, label_smoothing=0.1)
    summary = json.loads((out / "summary.json").read_text())
    average = summary["weight_average"]
    assert average["kept"] == (average["val_loss"] <= average["best_epoch_val_loss"])
    assert summary["restored_best_weights"] == (not average["kept"])
    assert summary["config"]["weight_averaging"] is True and summary["config"]["label_smoothing"] == 0.1
    expected = "weight_averaging must be True or False. Received: weight_averaging='yes'"
    with pytest.raises(ValueError, match=re.escape(expected)):
        train_cnn(data, weight_averaging="yes")


def test_fused_batch_norm_trains_like_keras_own_and_saves_as_it():
    from trainer.network.layers import FusedBatchNormalization

    rng = np.random.default_rng(4)
    x = rng.normal(2.0, 3.0, (16, 5, 5, 4)).astype("float32")
    ours, keras_own = FusedBatchNormalization(momentum=0.9), keras.layers.BatchNormalization(momentum=0.9)
    for layer in (ours, keras_own):
        layer.build(x.shape)
        layer.set_weights([rng.uniform(0.5, 2, 4).astype("float32"), rng.normal(0, 1, 4).astype("float32"),
                           np.zeros(4, "float32"), np.ones(4, "float32")] if layer is ours else ours.get_weights())
    for _ in range(3):  # the moving statistics follow the same (biased) batch variance
        np.testing.assert_allclose(np.asarray(ours(x, training=True)), np.asarray(keras_own(x, training=True)),
                                   atol=2e-4)
    for a, b in zip(ours.get_weights(), keras_own.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ours(x, training=False)), np.asarray(keras_own(x, training=False)),
                               atol=1e-4)


def test_a_cpu_trained_cnn_is_saved_with_keras_own_batch_norm(small, tmp_path):
    from trainer.network.layers import FusedBatchNormalization

    seen = []

    class Watch(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen.extend(type(layer) for layer in self.model.layers)

    train_cnn(small, (32, 32), num_epochs=1, architecture="cnn", output_dir=tmp_path, callbacks=[Watch()])
    assert FusedBatchNormalization in seen  # trained with the fused kernel on this CPU
    text = zipfile.ZipFile(tmp_path / "model.keras").read("config.json").decode()
    assert '"BatchNormalization"' in text and "FusedBatchNormalization" not in text and "dropfit>" not in text


def test_under_a_budget_few_photos_train_small_and_a_backbone_keeps_its_detail(tmp_path):
    from contract.options import TrainOptions
    from trainer.data.dataset import load
    from trainer.fitting.resolve import BUDGET_CAP, SMALL_DATA_CAP, Resolved, _input, budget_cap

    photos = make_shapes(tmp_path / "photos", classes=3, per_class=12, size_range=(240, 240), seed=3)
    for path in photos.rglob("*.*"):  # 240 high, 256 wide: 60x64 at the 64 px cap, before rounding to 32s
        if path.suffix in (".png", ".jpg"):
            with Image.open(path) as im:
                im.load()
            im.resize((256, 240)).save(path)
    options = TrainOptions(architecture="cnn", target_size="auto", time_budget=120.0)
    data = load(photos, options)
    clock = object()  # only whether there is a budget matters here
    r = Resolved(options)
    target, _ = _input(r, options, data, clock)
    assert "fewer than 1,000" in r.decisions["target_size"]["why"]
    assert target == (64, 64), target  # no edge rows lost to the five poolings' floors
    backbone = options.replace(architecture="mobilenet_v3_small")
    assert max(_input(Resolved(backbone), backbone, data, clock)[0]) == 128
    assert max(_input(Resolved(options), options, data, None)[0]) > BUDGET_CAP  # no budget: the images' own size
    assert budget_cap(999 * 3, 3, "cnn") == SMALL_DATA_CAP and budget_cap(1000 * 3, 3, "cnn") == BUDGET_CAP
    assert budget_cap(10, 3, "recipe") == SMALL_DATA_CAP
