"""The job spec: what a ``job.yaml`` may say, validated with errors that name the file, line and field.

This module is deliberately free of TensorFlow: the daemon imports it to validate a dropped job before queueing it.

A ``job.yaml`` can be empty: every field has a default, and the defaults are dropfit's best general choice
(``examples/job.yaml`` lists them all). A job that trains the classic recipe network instead::

    model: {architecture: recipe}
    optimizer: {name: rmsprop, learning_rate: 0.001}
    augmentation: {enabled: false}
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    Strict,
    ValidationError,
    WithJsonSchema,
)

from contract.files import EXPORT_FILES, JOB_FILE

__all__ = ["ARCHITECTURES", "CACHE_MODES", "COLOR_MODES", "EXPORT_FILES", "EXPORT_FORMATS", "JOB_FILE",
           "MAX_SPEC_BYTES", "OPTIMIZERS", "PRECISIONS", "DataSpec", "JobSpec", "ModelSpec", "OptimizerSpec",
           "SpecError", "json_schema", "load_spec", "load_yaml_model", "parse_spec", "parse_yaml_model", "resolve_path",
           "resolved_yaml"]

M = TypeVar("M", bound=BaseModel)

# A job.yaml is a few hundred bytes; anything this large is a mistake or an attack, not a spec.
MAX_SPEC_BYTES = 256 * 1024

# Every choice a job can make, defined here once; the spec's fields, `train_cnn`'s checks and the command line's
# choices are derived from these.
ARCHITECTURES = ("cnn", "recipe", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "resnet50")
BACKBONES = ARCHITECTURES[2:]
OPTIMIZERS = ("rmsprop", "adam", "sgd")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
CACHE_MODES = ("auto", "memory", "disk", "none")
EXPORT_FORMATS = ("savedmodel", "tflite", "tflite_int8", "onnx", "openvino")
COLOR_MODES = ("auto", "rgb", "grayscale")
FLIPS = ("none", "horizontal", "vertical", "both")
CLASS_WEIGHTS = ("balanced", "none")


@dataclass(frozen=True)
class Problem:
    """One located problem in a spec."""

    field: str
    message: str
    line: int | None = None

    def render(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line else source
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class SpecError(ValueError):
    """A job spec that cannot be used; ``str()`` lists every problem, one per line, with file, line and field."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(p.render(source) for p in problems))


# --- field types -------------------------------------------------------------------------------------------------

def _relative_path(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    if value.strip() == "":
        raise ValueError("must not be empty (use '.' for the job folder itself)")
    p = PurePosixPath(value.replace("\\", "/"))
    if p.is_absolute() or value.startswith("~") or (len(value) > 1 and value[1] == ":"):
        raise ValueError("must be a path relative to the job folder, not an absolute path")
    if ".." in p.parts:
        raise ValueError("must stay inside the job folder ('..' is not allowed)")
    return value


def _target_size(value: Any) -> Any:
    if value == "auto":
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]  # `target_size: 64` is the natural way to ask for a square input
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and 8 <= v <= 4096 for v in value)):
        return tuple(value)
    raise ValueError("must be auto, one number, or [height, width], each from 8 to 4096")


def _time_budget(value: Any) -> Any:
    if value is None:
        return None
    from contract.duration import parse_duration

    return parse_duration(value)


def _batch_size(value: Any) -> Any:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 8192):
        return value
    raise ValueError("must be auto or an integer from 1 to 8192")


def _patience(value: Any) -> Any:
    if value is None or value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    raise ValueError("must be auto, null or a positive integer")


def _warp(upper: float, inclusive: bool):
    """``auto`` or a number from 0 to ``upper``, as one check with one message (not a union's two)."""
    expected = f"must be auto or a number from 0 to {upper}" + ("" if inclusive else " (exclusive)")

    def check(value: Any) -> Any:
        if value == "auto":
            return value
        if isinstance(value, str):  # a quoted number, as a float field would take it
            try:
                value = float(value)
            except ValueError:
                raise ValueError(expected) from None
        if (isinstance(value, (int, float)) and not isinstance(value, bool)
                and value >= 0 and (value <= upper if inclusive else value < upper)):
            return float(value)
        raise ValueError(expected)

    bound = {"maximum" if inclusive else "exclusiveMaximum": upper}
    return Annotated[Any, PlainValidator(check), WithJsonSchema({"anyOf": [
        {"const": "auto"}, {"type": "number", "minimum": 0, **bound}]})]


def _weights(value: Any) -> Any:
    if value is None or value == "imagenet":
        return value
    if not isinstance(value, str):
        raise ValueError("must be null, imagenet, or the path of a weights file in the job folder")
    return _relative_path(value)


PositiveInt = Annotated[int, Strict(), Field(gt=0)]
RelativePath = Annotated[str, Strict(), AfterValidator(_relative_path)]
_DIMENSION_SCHEMA = {"type": "integer", "minimum": 8, "maximum": 4096}
TargetSize = Annotated[Any, PlainValidator(_target_size), WithJsonSchema({"anyOf": [
    {"const": "auto"}, _DIMENSION_SCHEMA,
    {"type": "array", "prefixItems": [_DIMENSION_SCHEMA] * 2, "minItems": 2, "maxItems": 2}]})]
TimeBudget = Annotated[Any, PlainValidator(_time_budget), WithJsonSchema({"anyOf": [
    {"type": "null"}, {"type": "number", "exclusiveMinimum": 0},
    {"type": "string", "pattern": r"^\s*(\d+(\.\d+)?\s*h)?\s*(\d+(\.\d+)?\s*m(in)?)?\s*(\d+(\.\d+)?\s*s)?\s*$"}]})]
BatchSize = Annotated[Any, PlainValidator(lambda v: _batch_size(v)), WithJsonSchema({"anyOf": [
    {"const": "auto"}, {"type": "integer", "minimum": 1, "maximum": 8192}]})]
Patience = Annotated[Any, PlainValidator(_patience), WithJsonSchema({"anyOf": [
    {"const": "auto"}, {"type": "null"}, {"type": "integer", "exclusiveMinimum": 0}]})]
Weights = Annotated[Any, PlainValidator(_weights), WithJsonSchema({"anyOf": [
    {"type": "null"}, {"const": "imagenet"}, {"type": "string", "description": "a file in the job folder"}]})]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class AuditSpec(_Section):
    """The dataset audit before training: duplicates, conflicting labels, leakage across the splits."""

    enabled: Annotated[bool, Strict()] = Field(
        True, description="Decode and hash every image before training (about 1-2 s per 10,000 small images).")
    near_threshold: Annotated[int, Strict(), Field(ge=0, le=32)] = Field(
        10, description="Bits (of 64) two perceptual hashes may differ by for a near-duplicate candidate; 0: exact "
                        "duplicates only.")
    conflicts: Literal["exclude", "keep"] = Field(
        "exclude", description="Images that appear under two labels: left out of training and evaluation (listed in "
                               "dataset.json), or kept.")


class DataSpec(_Section):
    """Where the images are and which of them are held out."""

    train: RelativePath = Field(".", description="Folder with one subfolder per class, relative to the job folder.")
    validation: RelativePath | None = Field(
        None, description="Optional folder of validation images (same class subfolders); overrides validation_split.")
    test: RelativePath | None = Field(
        None, description="Optional folder of test images (same class subfolders); overrides test_split.")
    labels_csv: RelativePath | None = Field(
        None, description="Optional CSV with columns filename,label; filenames are relative to `train`.")
    classes: list[Annotated[str, Strict(), Field(min_length=1)]] | None = Field(
        None, min_length=2, description="Train on these classes only (folder names or CSV labels).")
    validation_split: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        0.2, description="Fraction of each class held out for validation (stratified, deterministic by seed).")
    test_split: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        0.0, description="Fraction of each class held out for the final test, never used in training.")
    cache: Literal[CACHE_MODES] = Field(
        "auto", description="Decoded images between epochs: auto (memory, or disk in the work folder when they "
                            "would fill more than half the available memory), memory, disk or none.")
    audit: AuditSpec = Field(default_factory=AuditSpec)


class FineTuneSpec(_Section):
    """Second phase of transfer learning: unfreeze the pretrained backbone and train on at a low learning rate."""

    epochs: Annotated[int, Strict(), Field(ge=0, le=100_000)] = 10
    learning_rate: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-5
    layers: PositiveInt | None = Field(None, description="Unfreeze only the backbone's last N layers (null: all).")


class ModelSpec(_Section):
    """The network: `cnn` (dropfit's default), `recipe` (the classic network) or a pretrained backbone."""

    architecture: Literal[ARCHITECTURES] = "cnn"
    filters: list[PositiveInt] | None = Field(
        None, min_length=1, max_length=12,
        description="Filters of each conv block (recipe: 16 32 64 64 64; cnn: 16 32 64 128 256).")
    dense_units: PositiveInt = Field(512, description="Units of the recipe's hidden Dense layer.")
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] | None = Field(
        None, description="Dropout before the output layer (null: 0 for recipe, 0.3 for cnn, 0.2 for backbones).")
    batch_norm: Annotated[bool, Strict()] = Field(False, description="Batch normalisation in the recipe's blocks.")
    weights: Weights = Field(
        None, description="Backbone weights: null (random), imagenet (downloaded by Keras on this host) or a "
                          ".weights.h5 file relative to the job folder.")
    fine_tune: FineTuneSpec = Field(default_factory=FineTuneSpec)
    try_pretrained: Literal["auto"] | Annotated[bool, Strict()] = Field(
        "auto", description="Also train a pretrained backbone (mobilenet_v3_small with ImageNet weights found on this "
                            "host: DROPFIT_WEIGHTS_DIR or Keras' cache; never downloaded) and keep whichever scores "
                            "better on validation. auto: for cnn jobs with a time_budget on colour images of 96 px "
                            "or more.")


class OptimizerSpec(_Section):
    """Optimizer and learning rate (the recipe used RMSprop at 1e-3)."""

    name: Literal[OPTIMIZERS] = "adam"
    learning_rate: Literal["auto"] | Annotated[float, Field(gt=0.0, le=10.0)] = Field(
        "auto", description="auto: 3e-3 for the cnn with adam under a time_budget on 10,000+ training images (its "
                            "warm-up and cosine schedule take the larger step: bench/results/budget_tricks.json), "
                            "else 1e-3.")
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(0.0, description="Momentum (sgd and rmsprop).")


class TrainingSpec(_Section):
    """How training adapts: early stopping, learning-rate reduction, class weights (all on validation loss)."""

    early_stopping_patience: Patience = Field(
        "auto", description="Stop after this many epochs without a lower validation loss (null: never). auto: 10, "
                            "or never under a time_budget (its schedule takes the learning rate down to the budget's "
                            "end; stopping sooner on a few hundred images' noisy validation loss cost points: "
                            "bench/results/small_photos.json).")
    reduce_lr_patience: PositiveInt | None = Field(
        4, description="Halve the learning rate after this many epochs without improvement (null: never).")
    reduce_lr_factor: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.5
    min_learning_rate: Annotated[float, Field(ge=0.0)] = 1e-6
    class_weight: Literal[CLASS_WEIGHTS] = Field(
        "balanced", description="balanced: weigh each class by its inverse frequency in the training images.")
    label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        0.1, description="Train towards 0.9 rather than 1 for the true class (0: off); measured in bench/results/"
                         "tricks.json.")
    weight_averaging: Literal["auto"] | Annotated[bool, Strict()] = Field(
        "auto", description="Keep a moving average of the weights over about the last epoch; at the end it replaces "
                            "the best epoch's weights when its validation loss is lower. auto: on, except under a "
                            "time_budget (there it cost epochs and did not pay: bench/results/tricks.json).")
    restore_best_weights: Annotated[bool, Strict()] = Field(
        True, description="Keep the weights of the epoch with the lowest validation loss, not the last epoch's.")


class AugmentationSpec(_Section):
    """Random changes to training images, as layers inside the model (on the GPU; inactive at inference)."""

    enabled: Annotated[bool, Strict()] = True
    flip: Literal[(*FLIPS, "auto")] = Field(
        "auto", description="Mirroring; only for images whose mirror image is the same class (not digits or text). "
                            "auto: horizontal where the warps are off (a time budget with 1,000 or more training "
                            "images per class) and a check of the training images finds that mirror images stay in "
                            "their class (digits and text do not); the mirrored prediction is then averaged in when "
                            "validation says it pays. Else none.")
    rotation: _warp(0.5, inclusive=True) = Field(
        "auto", description="Fraction of a full turn; auto: 0.05, or 0 for a time-budgeted job with 1,000 or more "
                            "training images per class (the warp costs CPU time that more epochs repay).")
    zoom: _warp(1.0, inclusive=False) = Field(
        "auto", description="auto: 0.1, or 0 as for rotation.")
    translation: _warp(1.0, inclusive=False) = Field(
        "auto", description="Fraction of width/height; auto: 0.1, or 0.05 where the warps are off and the "
                            "job mirrors.")
    contrast: _warp(1.0, inclusive=False) = Field(
        "auto", description="auto: 0.1, or 0 where the warps are off and the job mirrors.")

    def options(self) -> dict | None:
        return self.model_dump(exclude={"enabled"}) if self.enabled else None


class HardwareSpec(_Section):
    """How the job uses the machine; `auto` picks what measured fastest for the device."""

    precision: Literal[PRECISIONS] = Field(
        "auto", description="auto: mixed float16 on Tensor Core GPUs (compute capability 7.0+), else float32.")
    jit_compile: Literal["auto"] | Annotated[bool, Strict()] = Field(
        "auto", description="XLA compilation; auto: on GPUs, off on CPUs (measured slower there).")
    multi_gpu: Annotated[bool, Strict()] = Field(
        False, description="Train this one job on all GPUs (MirroredStrategy) instead of one job per GPU; "
                           "batch_size is then the global batch.")


class JobSpec(_Section):
    """A training job: everything `train_cnn` needs, in YAML. An empty file gives dropfit's defaults."""

    model_config = ConfigDict(extra="forbid", validate_default=True, title="dropfit job.yaml")

    version: Literal[1] = Field(1, description="Spec format version.")
    data: DataSpec = Field(default_factory=DataSpec)
    target_size: TargetSize = Field(
        "auto", description="auto (from the images' median size, 28 to 224 px), [height, width], or one number.")
    color_mode: Literal[COLOR_MODES] = Field(
        "auto", description="auto: rgb, or one channel for greyscale data when the job has a time_budget.")
    batch_size: BatchSize = Field(
        "auto", description="auto: 32, or what trains fastest per image under a time_budget (64 to 256).")
    time_budget: TimeBudget = Field(
        None, description="The whole job (scan, training, evaluation, artifacts) ends within 5% of this: "
                          "90s, 15m, 1h30m "
                          "or seconds. Training is planned to fit, and the input size, channels, network width and "
                          "batch size left on auto are chosen to fit it. null: no limit.")
    epochs: Annotated[int, Strict(), Field(gt=0, le=100_000)] = Field(
        50, description="Most epochs to train (without a time_budget, early stopping usually ends sooner); for "
                          "backbones, the head phase.")
    num_classes: PositiveInt | None = Field(
        None, description="Optional check: the job fails if the data holds a different number of classes.")
    seed: Annotated[int, Strict(), Field(ge=0, lt=2**32)] = Field(
        1337, description="Fixes the splits, shuffling, augmentation and initialisation.")
    model: ModelSpec = Field(default_factory=ModelSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    augmentation: AugmentationSpec = Field(default_factory=AugmentationSpec)
    hardware: HardwareSpec = Field(default_factory=HardwareSpec)
    exports: list[Literal[EXPORT_FORMATS]] = Field(
        default_factory=list, description="Also export the model: savedmodel (TF Serving), tflite, tflite_int8 "
                                          "(full-integer, uint8 pixels in), onnx and/or openvino; each is loaded and "
                                          "checked against model.keras on held-out images (agreement, accuracy, "
                                          "size, load time, speed: exports.json and the report).")

    def paths(self) -> dict[str, str]:
        """Spec fields that name files or folders in the job folder, by field name (for `resolve_path`)."""
        fields = {"data.train": self.data.train, "data.validation": self.data.validation,
                  "data.test": self.data.test, "data.labels_csv": self.data.labels_csv}
        if self.model.weights not in (None, "imagenet"):
            fields["model.weights"] = self.model.weights
        return {k: v for k, v in fields.items() if v is not None}


# --- loading -----------------------------------------------------------------------------------------------------

def load_spec(path: str | os.PathLike, defaults: dict | None = None) -> JobSpec:
    """Read and validate a ``job.yaml``. ``defaults`` (e.g. the daemon's job defaults) are merged under it.

    Raises:
        SpecError: naming the file, the line and the field of every problem found.
    """
    path = check_spec_file(path)
    return load_yaml_model(path, JobSpec, defaults,
                           missing_hint=f"every job folder needs a {JOB_FILE} (it may be empty)")


def check_spec_file(path: str | os.PathLike) -> Path:
    """Refuse a spec file that is a link out of its folder, or not a file (a job's content must not make us read
    anything outside it: a link to someone's secrets)."""
    path = Path(path)
    if path.is_symlink():
        target = path.resolve()
        if not target.is_relative_to(path.parent.resolve()):
            raise SpecError(str(path), [Problem("", f"is a symbolic link to {target}, outside the job folder; "
                                                    "expected a regular file")])
    if path.exists() and not path.is_file():
        raise SpecError(str(path), [Problem("", "is not a regular file; expected a YAML file")])
    return path


def parse_spec(text: str, source: str = JOB_FILE, defaults: dict | None = None) -> JobSpec:
    """Validate spec text (YAML). See `load_spec`."""
    return parse_yaml_model(text, JobSpec, source, defaults)


def load_yaml_model(path: str | os.PathLike, model: type[M], defaults: dict | None = None, *,
                    max_bytes: int = MAX_SPEC_BYTES, missing_hint: str = "") -> M:
    """Read a YAML file safely and validate it against a pydantic ``model`` (job specs, the daemon's config).

    Raises:
        SpecError: naming the file, the line and the field of every problem found.
    """
    path = Path(path)
    source = str(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise SpecError(source, [Problem("", f"file is too large ({size} bytes); expected at most {max_bytes}")])
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(source, [Problem("", "file not found" + (f"; {missing_hint}" if missing_hint else ""))])\
            from None
    except IsADirectoryError:
        raise SpecError(source, [Problem("", "is a directory, expected a YAML file")]) from None
    except OSError as exc:
        raise SpecError(source, [Problem("", f"cannot be read: {exc.strerror or exc}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(source, [Problem("", f"is not UTF-8 text (byte {exc.start})")]) from None
    return parse_yaml_model(text, model, source, defaults)


def parse_yaml_model(text: str, model: type[M], source: str, defaults: dict | None = None) -> M:
    """Validate YAML text against a pydantic ``model``; see `load_yaml_model`."""
    data, lines = _parse_yaml(text, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(source, [Problem("", f"the top level must be a mapping of keys to values, "
                                             f"got {_type_name(data)}", 1)])
    if defaults:
        data = deep_merge(defaults, data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise SpecError(source, [_problem(err, lines, model) for err in exc.errors()]) from None


def explain(exc: ValidationError, model: type[BaseModel]) -> list[Problem]:
    """The problems of a pydantic error in the words job.yaml errors use (field, message, value), without lines."""
    return [_problem(err, {}, model) for err in exc.errors()]


def resolve_path(job_dir: str | os.PathLike, relative: str, field: str, spec_file: str = JOB_FILE) -> Path:
    """Turn a spec path into an absolute one, refusing anything (symlinks included) that leaves ``job_dir``."""
    root = Path(job_dir).resolve()
    target = (root / relative).resolve()
    if target != root and root not in target.parents:
        raise SpecError(str(Path(job_dir) / spec_file),
                        [Problem(field, f"resolves to {target}, outside the job folder (via a symlink?), "
                                        f"got {relative!r}")])
    return target


def resolved_yaml(spec: JobSpec, origin: str = "job.yaml") -> str:
    """The spec as the YAML a user reads (``outbox/<id>/job.resolved.yaml``, ``dropfit validate``): every field,
    defaults included, exactly as the trainer receives it."""
    header = (f"# The resolved spec: {origin}, with the daemon's job_defaults merged under it and every default\n"
              "# filled in. This is exactly what the trainer runs.\n")
    return header + yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def json_schema() -> dict:
    """The JSON Schema of ``job.yaml`` (the file shipped as ``contract/schemas/job.schema.json``)."""
    schema = JobSpec.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": "https://dropfit.dev/schemas/job.schema.json", **schema}


# --- helpers -----------------------------------------------------------------------------------------------------

def _parse_yaml(text: str, source: str) -> tuple[Any, dict[tuple, int]]:
    """Safe-load YAML, refusing aliases and duplicate keys, and map every key path to its line number."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        lines: dict[tuple, int] = {}
        _walk(node, (), lines, source)
        return loader.construct_document(node), lines
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        problem = exc.problem or exc.context or "invalid YAML"
        raise SpecError(source, [Problem("", f"invalid YAML: {problem}", line)]) from None
    except yaml.YAMLError as exc:
        raise SpecError(source, [Problem("", f"invalid YAML: {exc}")]) from None
    except RecursionError:
        raise SpecError(source, [Problem("", "invalid YAML: nested too deeply")]) from None
    finally:
        loader.dispose()


def _walk(node: yaml.Node, path: tuple, lines: dict[tuple, int], source: str, seen: set | None = None) -> None:
    seen = set() if seen is None else seen
    if id(node) in seen or getattr(node, "anchor", None):
        # Aliases make "billion laughs" expansion possible and a job spec never needs them.
        raise SpecError(source, [Problem(_dotted(path), "YAML anchors and aliases (&, *) are not allowed",
                                         lines.get(path, node.start_mark.line + 1))])
    seen.add(id(node))
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        keys = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key in keys:
                raise SpecError(source, [Problem(_dotted((*path, key)), "duplicate key", key_node.start_mark.line + 1)])
            keys.add(key)
            lines[(*path, key)] = key_node.start_mark.line + 1
            _walk(value_node, (*path, key), lines, source, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*path, i)] = item.start_mark.line + 1
            _walk(item, (*path, i), lines, source, seen)


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` on top of ``base``, mapping by mapping (job defaults under a job.yaml, options over a spec)."""
    merged = dict(base)
    for key, value in override.items():
        merged[key] = deep_merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) \
            else value
    return merged


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "nothing (null)"}.get(type(value), type(value).__name__)


def _allowed_keys(loc: tuple, model: type[BaseModel]) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _problem(err: dict, lines: dict[tuple, int], model: type[BaseModel]) -> Problem:
    # Pydantic adds union/function/type names to the location (e.g. 'int', 'function-after', 'constrained-float');
    # users never wrote those.
    tags = ("function-", "constrained-")
    loc = tuple(p for p in err["loc"] if isinstance(p, int) or not (p in {"int", "str", "float", "bool", "none"}
                                                                    or "[" in p or p.startswith(tags)))
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    line = next((lines[loc[:i]] for i in range(len(loc), -1, -1) if loc[:i] in lines), None)
    got = f", got {value!r}"
    if kind == "missing":
        message, got = "is required", ""
    elif kind == "extra_forbidden":
        allowed = _allowed_keys(loc, model)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        message = "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
        message += f"; expected one of: {', '.join(allowed)}" if allowed else ""
        got = ""
    elif kind == "greater_than" and ctx.get("gt") == 0 and isinstance(value, int):
        message = "must be a positive integer"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()))
        message = f"must be {op} {bound}"
    elif kind in ("int_type", "int_parsing", "int_from_float"):
        message = "must be an integer"
    elif kind in ("float_type", "float_parsing"):
        message = "must be a number"
    elif kind in ("bool_type", "bool_parsing"):
        message = "must be true or false"
    elif kind in ("string_type",):
        message = "must be a string"
    elif kind in ("list_type", "tuple_type"):
        message = "must be a list"
    elif kind == "model_type" or kind == "dict_type":
        message = "must be a mapping of keys to values"
    elif kind in ("too_short", "too_long"):
        bound = ctx.get("min_length") if kind == "too_short" else ctx.get("max_length")
        message = f"must have at {'least' if kind == 'too_short' else 'most'} {bound} item{'s' * (bound != 1)}"
    elif kind == "literal_error":
        message = f"must be one of {ctx.get('expected')}"
    elif kind == "value_error":
        message = str(ctx.get("error", err["msg"]))
    else:
        message = err["msg"][:1].lower() + err["msg"][1:]
    if isinstance(value, (dict, list)) and len(repr(value)) > 80:
        got = f", got {_type_name(value)}"
    return Problem(_dotted(loc), message + got, line)
