"""Models that leave dropfit: ``model.keras`` opens in plain Keras, and every export answers as it does.

The files are used as a user on another machine would: in a Python that has Keras/TensorFlow (or only onnxruntime
and OpenVINO) and no dropfit at all (``python -I -S`` with only site-packages on the path: neither this checkout nor
the editable install's import hook is reachable).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import time
import zipfile

import numpy as np
import pytest

from conftest import env_for_subprocess
from trainer.data.demo import make_shapes
from trainer.fitting import calibration

FLOAT_FORMATS = ("savedmodel", "tflite", "onnx", "openvino")
ALL_FORMATS = (*FLOAT_FORMATS, "tflite_int8")
SIZE = 32

# Prepended to every script run "without dropfit": only the interpreter's site-packages, and proof of it.
_PLAIN_PYTHON = f"""
import importlib.util, json, sys
sys.path.append({sysconfig.get_paths()["purelib"]!r})
assert importlib.util.find_spec("trainer") is None and importlib.util.find_spec("daemon") is None, sys.path
"""


def plain_python(script: str, cwd, timeout: int = 300) -> dict:
    """Run ``script`` in a Python without dropfit; it prints one JSON object last, which is returned."""
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", _PLAIN_PYTHON + script], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=env_for_subprocess())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _modules(config):
    """The module of every object a Keras config names (a custom class: its own module)."""
    if isinstance(config, dict):
        if "class_name" in config and "module" in config:
            yield config["module"] or ""
        for value in config.values():
            yield from _modules(value)
    elif isinstance(config, list):
        for value in config:
            yield from _modules(value)


def images_for(n: int = 12, seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3)).astype(np.uint8)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A trained job with augmentation, a validation split (so a fitted temperature) and every export."""
    from trainer import train_cnn

    tmp = tmp_path_factory.mktemp("exports")
    data = make_shapes(tmp / "d", classes=3, per_class=30, size_range=(28, 44), seed=4)
    out = tmp / "out"
    started = time.time()
    train_cnn(data, (SIZE, SIZE), num_epochs=3, architecture="cnn", augmentation=True, validation_split=0.3,
              exports=ALL_FORMATS, output_dir=out)
    return out, started


def test_model_keras_loads_and_predicts_in_plain_keras_without_dropfit(job, tmp_path):
    from trainer.prediction.api import predict

    out, _ = job
    with zipfile.ZipFile(out / "model.keras") as z:
        config = json.loads(z.read("config.json"))
    modules = set(_modules(config))
    assert modules and all(m.startswith("keras") for m in modules), modules  # no class of ours in the file
    images = images_for()
    np.save(tmp_path / "images.npy", images)
    got = plain_python(f"""
import keras, numpy as np
model = keras.saving.load_model({str(out / "model.keras")!r}, safe_mode=True)
probs = np.asarray(model.predict(np.load("images.npy"), verbose=0))
print(json.dumps({{"probs": probs.tolist()}}))
""", tmp_path)
    ours = predict(out, list(images), top_k=3)
    plain = np.asarray(got["probs"])
    names = json.loads((out / "labels.json").read_text())["classes"]
    assert [names[i] for i in plain.argmax(-1)] == [r["label"] for r in ours]
    for row, result in zip(plain, ours, strict=True):
        for entry in result["top_k"]:
            assert row[names.index(entry["label"])] == pytest.approx(entry["probability"], abs=1e-5)


def test_exports_json_is_one_table_every_format_checked_the_same_way(job):
    out, _ = job
    table = json.loads((out / "exports.json").read_text())
    assert table["split"] == "validation" and table["images"] > 0
    rows = {r["format"]: r for r in table["rows"]}
    assert list(rows) == ["keras", *ALL_FORMATS]
    for fmt, row in rows.items():
        assert (out / row["file"]).exists(), row
        assert row["size_bytes"] > 0 and row["load_seconds"] > 0 and row["images_per_second"] > 0, row
        assert row["latency_ms"] > 0 and row["images"] == table["images"], row
        assert 0 <= row["max_abs_diff"] < (0.05 if fmt == "tflite_int8" else 1e-3), row
    for fmt in FLOAT_FORMATS:
        assert rows[fmt]["agreement"] >= 0.995 and rows[fmt]["ok"], rows[fmt]
    int8 = rows["tflite_int8"]
    assert int8["accuracy_loss"] == pytest.approx(rows["keras"]["accuracy"] - int8["accuracy"])
    assert int8["ok"] == (int8["accuracy_loss"] <= 0.01) and bool(table["warnings"]) != int8["ok"]
    assert int8["size_bytes"] < rows["tflite"]["size_bytes"] / 2  # quantised
    assert table["versions"]["openvino"] and table["versions"]["tf2onnx"]
    assert (out / "openvino" / "model.bin").is_file()
    page = (out / "report.html").read_text()
    assert "Exports" in page and "max prob. diff." in page and "openvino/model.xml" in page
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["exports"]) == set(ALL_FORMATS)


def test_summary_counts_the_whole_job_including_artifacts_and_exports(job):
    out, started = job
    summary = json.loads((out / "summary.json").read_text())
    exports_written = os.stat(out / "exports.json").st_mtime
    assert started + summary["durations"]["total_seconds"] >= exports_written - 0.05


def test_onnx_and_openvino_run_in_a_process_that_never_imports_tensorflow(job, tmp_path):
    import keras

    out, _ = job
    images = images_for()
    np.save(tmp_path / "images.npy", images)
    got = plain_python(f"""
import numpy as np, onnxruntime, openvino
images = np.load("images.npy").astype("float32")
session = onnxruntime.InferenceSession({str(out / "model.onnx")!r}, providers=["CPUExecutionProvider"])
onnx = session.run(None, {{"image": images}})[0]
ir = openvino.Core().compile_model({str(out / "openvino" / "model.xml")!r}, "CPU",
                                  {{"INFERENCE_PRECISION_HINT": "f32"}})(images)[0]
print(json.dumps({{"onnx": onnx.tolist(), "openvino": np.asarray(ir).tolist(),
                  "tensorflow_loaded": "tensorflow" in sys.modules or "keras" in sys.modules}}))
""", tmp_path)
    assert got["tensorflow_loaded"] is False
    expected = keras.saving.load_model(out / "model.keras").predict(images, verbose=0)
    np.testing.assert_allclose(got["onnx"], expected, atol=1e-4)
    np.testing.assert_allclose(got["openvino"], expected, atol=1e-4)


@pytest.fixture(scope="module")
def hot(tmp_path_factory):
    """A model sure of itself (logits scaled up), calibrated with a temperature far from 1, and its exports."""
    from trainer.network.networks import build_model
    from trainer.outputs.exports import export_model

    model = build_model((SIZE, SIZE, 3), 4, architecture="cnn", filters=(8, 16), seed=2)
    head = model.get_layer("probabilities")
    kernel, bias = head.get_weights()
    head.set_weights([kernel * 40, bias])
    raw = np.asarray(model.predict(images_for(64, seed=9), verbose=0))
    temperature = 5.0
    calibrated = calibration.calibrated(model, temperature)
    out = tmp_path_factory.mktemp("hot")
    representative = images_for(64, seed=11)
    paths = {fmt: export_model(calibrated, fmt, out, representative) for fmt in ALL_FORMATS}
    return calibrated, raw, temperature, paths, out


def test_every_format_gives_the_calibrated_probabilities_at_a_temperature_far_from_one(hot, tmp_path):
    import tensorflow as tf

    model, raw, temperature, paths, _ = hot
    images = images_for(64, seed=9)
    expected = calibration.scale(raw, temperature)
    assert np.abs(expected - raw).max() > 0.2  # T = 5 moves these probabilities a lot: a test that can fail
    np.testing.assert_allclose(model.predict(images, verbose=0), expected, atol=1e-5)
    served = tf.saved_model.load(str(paths["savedmodel"]))
    np.testing.assert_allclose(np.asarray(served.serve(tf.constant(images, tf.float32))), expected, atol=1e-5)
    for fmt, atol in (("tflite", 1e-4), ("tflite_int8", 0.06)):
        interpreter = tf.lite.Interpreter(model_path=str(paths[fmt]))
        inp = interpreter.get_input_details()[0]
        interpreter.resize_tensor_input(inp["index"], list(images.shape))
        interpreter.allocate_tensors()
        interpreter.set_tensor(inp["index"], images.astype(inp["dtype"]))
        interpreter.invoke()
        got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
        np.testing.assert_allclose(got, expected, atol=atol, err_msg=fmt)
    np.save(tmp_path / "images.npy", images)
    got = plain_python(f"""
import numpy as np, onnxruntime, openvino
images = np.load("images.npy").astype("float32")
onnx = onnxruntime.InferenceSession({str(paths["onnx"])!r}).run(None, {{"image": images}})[0]
core = openvino.Core()
xml = {str(paths["openvino"] / "model.xml")!r}
ir = core.compile_model(xml, "CPU", {{"INFERENCE_PRECISION_HINT": "f32"}})(images)[0]
default = core.compile_model(xml, "CPU")(images)[0]  # bfloat16 on CPUs that have it
print(json.dumps({{"onnx": onnx.tolist(), "openvino": np.asarray(ir).tolist(),
                  "openvino_default": np.asarray(default).tolist()}}))
""", tmp_path)
    np.testing.assert_allclose(got["onnx"], expected, atol=1e-4)
    np.testing.assert_allclose(got["openvino"], expected, atol=1e-4)
    np.testing.assert_allclose(got["openvino_default"], expected, atol=0.02)


def test_an_export_that_disagrees_with_the_model_is_removed_and_names_the_versions(hot):
    from trainer.outputs.exports import ExportError, check_export, export_model

    model, _, _, _, out = hot
    images = images_for(40, seed=3)
    expected = np.asarray(model.predict(images, verbose=0))
    (out / "other").mkdir()
    path = export_model(model, "onnx", out / "other", images)
    # The file of another model (what a converter out of step with Keras produces): it must not be kept.
    wrong = np.roll(expected, 1, axis=-1)
    with pytest.raises(ExportError, match=r"onnx export gives the Keras model's top answer on only .* tf2onnx "):
        check_export("onnx", path, images, None, wrong)
    assert not path.exists()
    row = check_export("tflite_int8", export_model(model, "tflite_int8", out / "other", images), images, None,
                       expected)
    assert row["accuracy"] is None and row["ok"]


def test_models_written_by_dropfit_0_1_with_its_own_layers_still_load_through_dropfit(tmp_path):
    """Before 0.2, model.keras held dropfit's `Calibration` layer (and could hold `Augmentation`)."""
    import keras

    from trainer.network.layers import Augmentation, Calibration
    from trainer.prediction.api import load_model

    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    x = Augmentation({"flip": "horizontal", "rotation": 0.1}, seed=1, name="augmentation")(inputs)
    x = keras.layers.Rescaling(1 / 255)(x)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(x))
    x = keras.layers.Dense(3, activation="softmax", name="probabilities")(x)
    old = keras.Model(inputs, Calibration(2.5, name="calibration")(x))
    old.save(tmp_path / "model.keras")
    (tmp_path / "labels.json").write_text(json.dumps({"classes": ["a", "b", "c"]}))
    loaded = load_model(tmp_path)
    images = images_for(4)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), old.predict(images, verbose=0), atol=1e-6)
    assert loaded.class_names == ["a", "b", "c"]


def test_the_models_page_quotes_the_measured_exports_table():
    # bench/exports_bench.py writes bench/results/exports.md and quotes it between these markers in
    # docs/using-models.md.
    from conftest import ROOT

    table = (ROOT / "bench" / "results" / "exports.md").read_text()
    page = (ROOT / "docs" / "using-models.md").read_text()
    assert "<!-- exports:begin -->\n" + table + "<!-- exports:end -->" in page
    assert "| photos96 | openvino |" in table and "| digits28 | tflite_int8 |" in table
