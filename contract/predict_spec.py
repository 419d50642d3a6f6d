"""``predict.yaml``: a prediction job. A folder dropped into the inbox with a ``predict.yaml`` (instead of a
``job.yaml``) and images in any layout is labelled by a model the daemon trained before::

    photos-to-label/
        predict.yaml          # model: latest
        2026-11-27/IMG_0001.jpg
        2026-11-27/IMG_0002.jpg
        ...

TensorFlow-free, like `contract.spec` (whose YAML rules and located errors it shares): the daemon validates the file
at intake and resolves ``model:`` to a trained job's outbox folder, writing a `PredictRun` as the job's resolved spec;
the trainer runs that (`trainer.prediction.drop`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, Strict, WithJsonSchema

from contract.protocol import JobKind
from contract.spec import RelativePath, check_spec_file, load_yaml_model

LATEST = "latest"
_JOB_ID = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


def _model_ref(value: Any) -> Any:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a training job's id, latest, or latest:<dataset name>")
    value = value.strip()
    if value == LATEST:
        return value
    if value.startswith(LATEST + ":"):
        if not value[len(LATEST) + 1:].strip():
            raise ValueError("latest: needs a dataset name after the colon (the folder name the training data was "
                             "dropped as), e.g. latest:flowers")
        return value
    if not _JOB_ID.match(value):
        raise ValueError("must be a training job's id (letters, digits, '.', '_' and '-'), latest, or "
                         "latest:<dataset name>")
    return value


def _min_confidence(value: Any) -> Any:
    if value is None or value == "suggested":
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0:
        return float(value)
    raise ValueError("must be a probability from 0 to 1, suggested (the threshold the model's labels.json records), "
                     "or null")


ModelRef = Annotated[Any, PlainValidator(_model_ref), WithJsonSchema({"type": "string", "anyOf": [
    {"const": "latest"}, {"pattern": "^latest:.+$"}, {"pattern": _JOB_ID.pattern}]})]
MinConfidence = Annotated[Any, PlainValidator(_min_confidence), WithJsonSchema({"anyOf": [
    {"type": "null"}, {"const": "suggested"}, {"type": "number", "minimum": 0, "maximum": 1}]})]


class PredictSpec(BaseModel):
    """What a ``predict.yaml`` may say. An empty file labels every image in the folder with the newest model."""

    model_config = ConfigDict(extra="forbid", validate_default=True, title="dropfit predict.yaml")

    version: Literal[1] = Field(1, description="Spec format version.")
    model: ModelRef = Field(
        LATEST, description="The model: a succeeded training job's id (see `dropfit models`), latest (the newest), "
                            "or latest:<dataset name> (the newest trained on a dataset dropped under that name).")
    images: RelativePath = Field(".", description="Folder with the images, searched recursively (relative to this "
                                                  "file; archives are extracted first).")
    top_k: Annotated[int, Strict(), Field(ge=1, le=100)] = Field(
        1, description="How many of the most likely classes to list per image.")
    min_confidence: MinConfidence = Field(
        None, description="Below this calibrated probability the label is 'unknown' (the best guess is kept beside "
                          "it); suggested: the threshold recorded for 99% held-out accuracy.")
    batch_size: Annotated[int, Strict(), Field(ge=1, le=4096)] = Field(
        64, description="Images per batch through the model (the images in memory are bounded by it, not by the "
                        "drop's size).")
    sort: Annotated[bool, Strict()] = Field(
        False, description="Also copy (never move) every image into sorted/<label>/ in the outbox.")


class PredictRun(BaseModel):
    """The resolved prediction job the daemon writes at intake and the trainer runs: the spec, and the model
    ``model:`` named at that moment (a later training job does not change what a queued prediction uses)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["predict"] = "predict"  # JobKind.PREDICT; a literal, so the resolved spec's schema says which
    spec: PredictSpec
    model_job: str = Field(description="The training job whose model labels the images.")
    model_dir: str = Field(description="Its outbox folder (model.keras, labels.json), absolute.")


def read_run(path: str | os.PathLike) -> PredictRun | None:
    """The resolved prediction job in a daemon-written spec file, or None when the file is a training spec.

    Raises:
        SpecError: a prediction job whose resolved spec does not validate.
    """
    import json

    from pydantic import ValidationError

    from contract.spec import SpecError, explain

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # not ours to judge: loading it as a training spec reports the problem
    if not isinstance(data, dict) or data.get("kind") != JobKind.PREDICT:
        return None
    try:
        return PredictRun.model_validate(data)
    except ValidationError as exc:
        raise SpecError(str(path), explain(exc, PredictRun)) from None


def load_predict_spec(path: str | os.PathLike) -> PredictSpec:
    """Read and validate a ``predict.yaml``.

    Raises:
        SpecError: naming the file, the line and the field of every problem found.
    """
    return load_yaml_model(check_spec_file(path), PredictSpec)


def json_schema() -> dict:
    """The JSON Schema of ``predict.yaml`` (shipped as ``contract/schemas/predict.schema.json``)."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": "https://dropfit.dev/schemas/predict.schema.json", **PredictSpec.model_json_schema()}
