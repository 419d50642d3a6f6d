"""job.yaml: located errors, safe loading, path confinement, the published JSON Schema. No TensorFlow needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from contract.options import TrainOptions
from contract.spec import JobSpec, SpecError, json_schema, load_spec, parse_spec, resolve_path

ROOT = Path(__file__).resolve().parent.parent


def errors(text: str) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(text, source="job.yaml")
    return str(info.value).splitlines()


def test_empty_spec_means_dropfit_defaults():
    spec = parse_spec("")
    assert spec.epochs == 50 and spec.batch_size == "auto" and spec.target_size == "auto" and spec.time_budget is None
    assert spec.color_mode == "auto" and spec.data.audit.enabled
    assert spec.model.architecture == "cnn" and spec.optimizer.name == "adam"
    assert spec.optimizer.learning_rate == "auto" and spec.data.validation_split == pytest.approx(0.2)
    assert spec.augmentation.enabled and spec.augmentation.flip == "auto"
    assert spec.training.early_stopping_patience == "auto" and spec.training.class_weight == "balanced"
    options = TrainOptions.from_spec(spec)
    assert options.augmentation["rotation"] == "auto" and options.class_weight == "balanced"
    assert options.fine_tune_epochs == 0  # no pretrained weights, no fine-tuning phase
    assert options.early_stopping_patience == 10


def test_a_time_budget_trains_to_its_schedules_end_unless_the_job_asks_for_early_stopping():
    budgeted = TrainOptions.from_spec(parse_spec("time_budget: 2m\n"))
    assert budgeted.early_stopping_patience is None
    asked = TrainOptions.from_spec(parse_spec("time_budget: 2m\ntraining: {early_stopping_patience: 6}\n"))
    assert asked.early_stopping_patience == 6
    with pytest.raises(SpecError) as bad:
        parse_spec("training: {early_stopping_patience: 0}\n")
    assert str(bad.value) == ("job.yaml:1: training.early_stopping_patience: must be auto, null or a positive integer, "
                              "got 0")


def test_example_lists_exactly_the_defaults_and_every_option_is_one_train_cnn_takes():
    spec = load_spec(ROOT / "examples" / "job.yaml")
    assert spec.model_dump() == JobSpec().model_dump(), "examples/job.yaml must show the defaults"
    import dataclasses
    import inspect

    from trainer.fitting import train

    options = TrainOptions.from_spec(spec)
    recipe = {"target_size", "classes", "batch_size", "num_epochs", "num_classes"}
    params = set(inspect.signature(train.train_cnn).parameters)
    assert recipe <= params  # the recipe's signature is kept
    # Every option is recorded whole in summary.json (one list, not six that disagree).
    assert set(options.to_json()) == {f.name for f in dataclasses.fields(TrainOptions)}
    assert options.to_json()["fine_tune_layers"] is None
    # Every option is documented in one place, TrainOptions (train_cnn's docstring points there): none drifts away.
    documented = {line.strip().split(":")[0] for line in TrainOptions.__doc__.splitlines()
                  if line.startswith("        ") and not line.startswith("         ") and ":" in line}
    assert {f.name for f in dataclasses.fields(TrainOptions)} <= documented


def test_recipe_job_and_paths():
    spec = parse_spec("model: {architecture: recipe, weights: w/backbone.weights.h5}\n"
                      "data: {test: held_out, validation: val}\naugmentation: {enabled: false}\n"
                      "training: {class_weight: none, early_stopping_patience: null}\nexports: [tflite]")
    options = TrainOptions.from_spec(spec)
    assert options.architecture == "recipe" and options.augmentation is None
    assert options.class_weight is None and options.early_stopping_patience is None
    assert options.exports == ("tflite",)
    assert spec.paths() == {"data.train": ".", "data.validation": "val", "data.test": "held_out",
                            "model.weights": "w/backbone.weights.h5"}


@pytest.mark.parametrize("text, expected", [
    ("epochs: 0", "job.yaml:1: epochs: must be a positive integer, got 0"),
    ("epochs: -3", "job.yaml:1: epochs: must be a positive integer, got -3"),
    ("epochs: '5'", "job.yaml:1: epochs: must be an integer, got '5'"),
    ("batch_size: 2.5", "job.yaml:1: batch_size: must be auto or an integer from 1 to 8192, got 2.5"),
    ("time_budget: soon", "job.yaml:1: time_budget: must be a duration such as 90s, 15m or 1h30m, or a number of "
                          "seconds, got 'soon'"),
    ("time_budget: 5s", "job.yaml:1: time_budget: must be from 10 seconds to 30 days, got '5s'"),
    ("data: {audit: {conflicts: drop}}", "data.audit.conflicts: must be one of 'exclude' or 'keep', got 'drop'"),
    ("seed: 1\nepoch: 3", "job.yaml:2: epoch: unknown key (did you mean 'epochs'?)"),
    ("model:\n  filters: [16, 0]", "job.yaml:2: model.filters[1]: must be a positive integer, got 0"),
    ("optimizer: {name: adamw}", "optimizer.name: must be one of 'rmsprop', 'adam' or 'sgd', got 'adamw'"),
    ("target_size: [4, 300]", "target_size: must be auto, one number, or [height, width], each from 8 to 4096, got"),
    ("target_size: big", "target_size: must be auto, one number, or [height, width]"),
    ("model: {weights: /etc/passwd}", "model.weights: must be a path relative to the job folder"),
    ("model: {architecture: vgg}", "model.architecture: must be one of 'cnn', 'recipe', 'mobilenet_v3_small'"),
    ("augmentation: {flip: diagonal}", "augmentation.flip: must be one of 'none', 'horizontal', 'vertical', 'both' or"),
    ("exports: [coreml]",
     "exports[0]: must be one of 'savedmodel', 'tflite', 'tflite_int8', 'onnx' or 'openvino', got 'coreml'"),
    ("training: {early_stoping_patience: 3}", "training.early_stoping_patience: unknown key (did you mean "),
    ("data:\n  validation_split: 1.5", "job.yaml:2: data.validation_split: must be < 1.0, got 1.5"),
    ("model: {batch_norm: 'yes'}", "model.batch_norm: must be true or false, got 'yes'"),
    ("model: 3", "job.yaml:1: model: must be a mapping of keys to values, got 3"),
    ("data: {classes: [cats]}", "data.classes: must have at least 2 items"),
])
def test_field_errors_name_line_field_value_and_expectation(text, expected):
    assert any(expected in line for line in errors(text)), errors(text)


def test_every_problem_is_reported_at_once():
    lines = errors("epochs: 0\nbatch_size: 0\ncolour_mode: rgb\n")
    assert len(lines) == 3
    assert lines[2].startswith("job.yaml:3: colour_mode: unknown key (did you mean 'color_mode'?)")


@pytest.mark.parametrize("text, expected", [
    ("epochs: [", "invalid YAML"),
    ("- a\n- b", "the top level must be a mapping of keys to values, got a list"),
    ("just text", "the top level must be a mapping of keys to values, got a string"),
    ("epochs: 3\nepochs: 4", "job.yaml:2: epochs: duplicate key"),
    ("a: &x [1, 2]\nb: *x", "YAML anchors and aliases"),
    ("epochs: !!python/object/apply:os.system ['echo hacked']", "invalid YAML"),
])
def test_unsafe_or_malformed_yaml_is_refused(text, expected):
    assert any(expected in line for line in errors(text)), errors(text)


@pytest.mark.parametrize("path, expected", [
    ("../elsewhere", "must stay inside the job folder"),
    ("a/../../b", "must stay inside the job folder"),
    ("/etc", "must be a path relative to the job folder"),
    ("~/data", "must be a path relative to the job folder"),
])
def test_spec_paths_cannot_leave_the_job_folder(path, expected):
    for key in ("train", "validation", "labels_csv"):
        assert any(f"data.{key}: {expected}" in line for line in errors(f"data: {{{key}: '{path}'}}"))


def test_symlink_escape_is_caught_when_resolving(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, job / "images")
    (job / "inside").mkdir()
    assert resolve_path(job, "inside", "data.train") == (job / "inside").resolve()
    with pytest.raises(SpecError, match=r"data\.train: resolves to .*outside the job folder"):
        resolve_path(job, "images", "data.train")


def test_file_level_errors(tmp_path):
    with pytest.raises(SpecError, match=r"file not found; every job folder needs a job\.yaml"):
        load_spec(tmp_path / "job.yaml")
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * 300_000)
    with pytest.raises(SpecError, match="file is too large"):
        load_spec(big)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"epochs: \xff\xfe")
    with pytest.raises(SpecError, match="is not UTF-8"):
        load_spec(binary)


def test_time_budgets_as_people_write_them():
    for text, seconds in (("90s", 90), ("15m", 900), ("1h30m", 5400), ("2h", 7200), ("600", 600), ("1.5h", 5400)):
        assert parse_spec(f"time_budget: {text}").time_budget == seconds
    assert TrainOptions.from_spec(parse_spec("time_budget: 900")).time_budget == 900


def test_square_target_size_and_defaults_merge():
    assert parse_spec("target_size: 64").target_size == (64, 64)
    assert TrainOptions.from_spec(parse_spec("target_size: [64, 48]")).target_size == (64, 48)
    spec = parse_spec("model: {dropout: 0.5}", defaults={"epochs": 3, "model": {"dense_units": 64}})
    assert (spec.epochs, spec.model.dense_units, spec.model.dropout) == (3, 64, 0.5)


def check_jsonschema(schema: str, document: Path) -> subprocess.CompletedProcess:
    """The published schema ``schema`` applied to ``document`` by check-jsonschema, as an editor would."""
    checker = Path(sys.executable).with_name("check-jsonschema")
    return subprocess.run([checker, "--schemafile", ROOT / "contract" / "schemas" / schema, document],
                          capture_output=True, text=True)


def test_published_json_schema_is_current_and_checks_files(tmp_path):
    shipped = json.loads((ROOT / "contract" / "schemas" / "job.schema.json").read_text())
    assert shipped == json_schema(), "run `python -m trainer schema > contract/schemas/job.schema.json`"
    assert shipped["additionalProperties"] is False
    ok = check_jsonschema("job.schema.json", ROOT / "examples" / "job.yaml")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = tmp_path / "job.yaml"
    bad.write_text("epochs: 0\nfoo: 1\ntarget_size: auto\n")
    res = check_jsonschema("job.schema.json", bad)
    assert res.returncode == 1
    assert "epochs" in res.stdout and "foo" in res.stdout


def test_spec_module_does_not_import_tensorflow():
    code = ("import sys, trainer, contract.spec, trainer.data.scan, trainer.data.images, trainer.events, "
            "trainer.data.demo; contract.spec.parse_spec('epochs: 3'); "
            "print('tensorflow' in sys.modules, 'keras' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_spec_model_rejects_unknown_keys_directly():
    with pytest.raises(Exception, match="extra"):
        JobSpec.model_validate({"surprise": 1})


def test_predict_yaml_example_schema_and_errors(tmp_path):
    from contract import predict_spec
    from contract.predict_spec import PredictSpec, load_predict_spec

    assert load_predict_spec(ROOT / "examples" / "predict.yaml") == PredictSpec()
    shipped = json.loads((ROOT / "contract" / "schemas" / "predict.schema.json").read_text())
    assert shipped == predict_spec.json_schema(), "run `make schemas`"
    ok = check_jsonschema("predict.schema.json", ROOT / "examples" / "predict.yaml")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = tmp_path / "predict.yaml"
    bad.write_text("version: 1\ntop_k: 0\nmodel: 'a b'\nmin_confidence: 1.5\nsortt: true\n")
    with pytest.raises(SpecError) as info:
        load_predict_spec(bad)
    assert str(info.value).splitlines() == [
        f"{bad}:3: model: must be a training job's id (letters, digits, '.', '_' and '-'), latest, or "
        "latest:<dataset name>, got 'a b'",
        f"{bad}:2: top_k: must be >= 1, got 0",
        f"{bad}:4: min_confidence: must be a probability from 0 to 1, suggested (the threshold the model's "
        "labels.json records), or null, got 1.5",
        f"{bad}:5: sortt: unknown key (did you mean 'sort'?); expected one of: version, model, images, top_k, "
        "min_confidence, batch_size, sort"]
    res = check_jsonschema("predict.schema.json", bad)
    assert res.returncode == 1 and "top_k" in res.stdout


def test_auto_warps_are_off_only_for_budgeted_jobs_with_many_images_per_class():
    from contract.options import TrainOptions, resolve_augmentation

    auto = TrainOptions.from_spec(JobSpec()).augmentation
    safe = {"num_classes": 10, "mirror_safe": True}
    small = resolve_augmentation(auto, budgeted=True, train_images=999 * 10, **safe)
    large = resolve_augmentation(auto, budgeted=True, train_images=1000 * 10, **safe)
    unbudgeted = resolve_augmentation(auto, budgeted=False, train_images=48_000, **safe)
    assert (small["rotation"], small["zoom"]) == (unbudgeted["rotation"], unbudgeted["zoom"]) == (0.05, 0.1)
    assert (large["rotation"], large["zoom"]) == (0.0, 0.0)
    assert large["translation"] == 0.05 and small["translation"] == unbudgeted["translation"] == 0.1
    explicit = TrainOptions.from_spec(parse_spec("time_budget: 15m\naugmentation: {rotation: 0.2}\n")).augmentation
    assert resolve_augmentation(explicit, budgeted=True, train_images=48_000, **safe)["rotation"] == 0.2
    handed = resolve_augmentation(auto, budgeted=True, train_images=48_000, num_classes=10, mirror_safe=False)
    assert handed == {"rotation": 0.0, "zoom": 0.0, "flip": "none", "translation": 0.1, "contrast": 0.1}
    with pytest.raises(ValueError, match=r"augmentation sharpness must be a number .*Received: sharpness='auto'"):
        TrainOptions(augmentation={"sharpness": "auto"})
    with pytest.raises(SpecError) as bad:
        parse_spec("augmentation: {rotation: sometimes}\n")
    # One located line, not a union's two with pydantic's internal type names in the path.
    assert str(bad.value) == ("job.yaml:1: augmentation.rotation: must be auto or a number from 0 to 0.5, "
                              "got 'sometimes'")
    assert parse_spec("augmentation: {zoom: 0}\n").augmentation.zoom == 0.0


def test_the_tricks_a_job_yaml_turns_on_and_how_each_turns_off():
    plain, budgeted = TrainOptions.from_spec(JobSpec()), TrainOptions.from_spec(JobSpec(time_budget=300))
    assert plain.label_smoothing == budgeted.label_smoothing == 0.1
    assert plain.weight_averaging is True and budgeted.weight_averaging is False  # auto: not under a budget
    off = TrainOptions.from_spec(parse_spec("training: {label_smoothing: 0, weight_averaging: false}"))
    assert off.label_smoothing == 0 and off.weight_averaging is False
    forced = TrainOptions.from_spec(parse_spec("time_budget: 5m\ntraining: {weight_averaging: true}"))
    assert forced.weight_averaging is True
    with pytest.raises(SpecError, match="weight_averaging"):
        parse_spec("training: {weight_averaging: sometimes}")
    assert TrainOptions().label_smoothing == 0 and TrainOptions().weight_averaging is False  # train_cnn: the recipe's


def test_learning_rate_auto_is_larger_only_for_the_budgeted_cnn_with_adam():
    from contract.options import TrainOptions, resolve_learning_rate

    large = {"budgeted": True, "train_images": 48_000}
    assert resolve_learning_rate("auto", architecture="cnn", optimizer="adam", **large) == pytest.approx(3e-3)
    smaller_step = [("cnn", "adam", False, 48_000), ("recipe", "adam", True, 48_000), ("cnn", "sgd", True, 48_000),
                    ("mobilenet_v3_small", "adam", True, 48_000), ("cnn", "adam", True, 264)]
    for architecture, optimizer, budgeted, images in smaller_step:
        assert resolve_learning_rate("auto", architecture=architecture, optimizer=optimizer, budgeted=budgeted,
                                     train_images=images) == pytest.approx(1e-3)
    assert resolve_learning_rate(0.02, architecture="cnn", optimizer="adam", **large) == pytest.approx(0.02)
    with pytest.raises(ValueError, match=r"learning_rate must be a positive number\. Received: learning_rate='fast'"):
        TrainOptions(learning_rate="fast")
