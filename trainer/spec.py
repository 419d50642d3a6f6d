"""The job spec: what a ``job.yaml`` may say, validated with errors that name the file, line and field.

This module is deliberately free of TensorFlow: the daemon imports it to validate a dropped job before queueing it.

A minimal ``job.yaml`` can be empty (every field has a default); a full one looks like::

    version: 1
    data:
      train: .                 # folder with one subfolder per class, relative to the job folder
      validation_split: 0.2
    target_size: [128, 128]
    batch_size: 32
    epochs: 20
    model: {architecture: recipe, filters: [16, 32, 64, 64, 64], dense_units: 512}
    optimizer: {name: rmsprop, learning_rate: 0.001}
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
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    WithJsonSchema,
)

__all__ = ["JOB_FILE", "MAX_SPEC_BYTES", "DataSpec", "JobSpec", "ModelSpec", "OptimizerSpec", "SpecError",
           "json_schema", "load_spec", "load_yaml_model", "parse_spec", "parse_yaml_model", "resolve_path"]

M = TypeVar("M", bound=BaseModel)

JOB_FILE = "job.yaml"
# A job.yaml is a few hundred bytes; anything this large is a mistake or an attack, not a spec.
MAX_SPEC_BYTES = 256 * 1024

RECIPE_FILTERS = (16, 32, 64, 64, 64)


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


def _square(value: Any) -> Any:
    # `target_size: 64` is the natural way to ask for a square input.
    return [value, value] if isinstance(value, int) and not isinstance(value, bool) else value


PositiveInt = Annotated[int, Strict(), Field(gt=0)]
RelativePath = Annotated[str, Strict(), AfterValidator(_relative_path)]
Dimension = Annotated[int, Strict(), Field(ge=8, le=4096)]
_DIMENSION_SCHEMA = {"type": "integer", "minimum": 8, "maximum": 4096}
TargetSize = Annotated[
    tuple[Dimension, Dimension],
    BeforeValidator(_square),
    WithJsonSchema({"anyOf": [_DIMENSION_SCHEMA, {"type": "array", "prefixItems": [_DIMENSION_SCHEMA] * 2,
                                                  "minItems": 2, "maxItems": 2}]}),
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class DataSpec(_Section):
    """Where the images are and how to hold out validation data."""

    train: RelativePath = Field(".", description="Folder with one subfolder per class, relative to the job folder.")
    validation: RelativePath | None = Field(
        None, description="Optional folder of validation images (same class subfolders); overrides validation_split.")
    labels_csv: RelativePath | None = Field(
        None, description="Optional CSV with columns filename,label; filenames are relative to `train`.")
    classes: list[Annotated[str, Strict(), Field(min_length=1)]] | None = Field(
        None, min_length=2, description="Train on these classes only (folder names or CSV labels).")
    validation_split: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        0.2, description="Fraction of each class held out for validation (stratified, deterministic by seed).")


class ModelSpec(_Section):
    """The network. `recipe` is the classic 5-block CNN; its sizes can be tuned here."""

    architecture: Literal["recipe"] = "recipe"
    filters: list[PositiveInt] = Field(list(RECIPE_FILTERS), min_length=1, max_length=12,
                                       description="Filters of each Conv2D/MaxPool block.")
    dense_units: PositiveInt = Field(512, description="Units of the hidden Dense layer.")
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(0.0, description="Dropout before the output layer.")
    batch_norm: Annotated[bool, Strict()] = Field(False, description="Batch normalisation after each convolution.")


class OptimizerSpec(_Section):
    """Optimizer and learning rate (the recipe: RMSprop, 1e-3)."""

    name: Literal["rmsprop", "adam", "sgd"] = "rmsprop"
    learning_rate: Annotated[float, Field(gt=0.0, le=10.0)] = 1e-3
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(0.0, description="Momentum (sgd and rmsprop).")


class JobSpec(_Section):
    """A training job: everything `train_cnn` needs, in YAML."""

    model_config = ConfigDict(extra="forbid", validate_default=True, title="dropfit job.yaml")

    version: Literal[1] = Field(1, description="Spec format version.")
    data: DataSpec = Field(default_factory=DataSpec)
    target_size: TargetSize = Field(
        (200, 200), description="Height and width images are resized to (one number for a square).")
    color_mode: Literal["rgb", "grayscale"] = "rgb"
    batch_size: Annotated[int, Strict(), Field(gt=0, le=8192)] = 32
    epochs: Annotated[int, Strict(), Field(gt=0, le=100_000)] = 20
    num_classes: PositiveInt | None = Field(
        None, description="Optional check: the job fails if the data holds a different number of classes.")
    seed: Annotated[int, Strict(), Field(ge=0, lt=2**32)] = 1337
    restore_best_weights: Annotated[bool, Strict()] = Field(
        True, description="Keep the weights of the epoch with the lowest validation loss, not the last epoch's.")
    model: ModelSpec = Field(default_factory=ModelSpec)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)

    def train_kwargs(self) -> dict[str, Any]:
        """The `train_cnn` keyword arguments this spec stands for (paths still relative to the job folder)."""
        return {
            "target_size": tuple(self.target_size),
            "classes": self.data.classes,
            "batch_size": self.batch_size,
            "num_epochs": self.epochs,
            "num_classes": self.num_classes,
            "validation_split": self.data.validation_split,
            "color_mode": self.color_mode,
            "seed": self.seed,
            "restore_best_weights": self.restore_best_weights,
            "optimizer": self.optimizer.name,
            "learning_rate": self.optimizer.learning_rate,
            "momentum": self.optimizer.momentum,
            "filters": tuple(self.model.filters),
            "dense_units": self.model.dense_units,
            "dropout": self.model.dropout,
            "batch_norm": self.model.batch_norm,
        }


# --- loading -----------------------------------------------------------------------------------------------------

def load_spec(path: str | os.PathLike, defaults: dict | None = None) -> JobSpec:
    """Read and validate a ``job.yaml``. ``defaults`` (e.g. the daemon's job defaults) are merged under it.

    Raises:
        SpecError: naming the file, the line and the field of every problem found.
    """
    return load_yaml_model(path, JobSpec, defaults,
                           missing_hint=f"every job folder needs a {JOB_FILE} (it may be empty)")


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
        data = _merge(defaults, data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise SpecError(source, [_problem(err, lines, model) for err in exc.errors()]) from None


def resolve_path(job_dir: str | os.PathLike, relative: str, field: str) -> Path:
    """Turn a spec path into an absolute one, refusing anything (symlinks included) that leaves ``job_dir``."""
    root = Path(job_dir).resolve()
    target = (root / relative).resolve()
    if target != root and root not in target.parents:
        raise SpecError(str(Path(job_dir) / JOB_FILE),
                        [Problem(field, f"resolves to {target}, outside the job folder (via a symlink?), "
                                        f"got {relative!r}")])
    return target


def json_schema() -> dict:
    """The JSON Schema of ``job.yaml`` (the file shipped as ``trainer/schemas/job.schema.json``)."""
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


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) \
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
    # Pydantic adds union/function names to the location (e.g. 'int', 'function-after'); users never wrote those.
    loc = tuple(p for p in err["loc"] if isinstance(p, int) or not (p in {"int", "str", "float", "bool", "none"}
                                                                    or "[" in p or p.startswith("function-")))
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
