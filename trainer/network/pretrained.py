"""Where ImageNet weights for a backbone are found on this host — never downloaded by a job.

A job that tries a pretrained backbone on its own (``model.try_pretrained``) must not wait on, or fail for, a network
it may not have: it looks only in local folders, in this order, for the file Keras itself would download:

1. ``DROPFIT_WEIGHTS_DIR`` (one folder, or several separated by ``:``): a mounted folder of weight files;
2. Keras' own cache, ``$KERAS_HOME/models`` (``~/.keras/models`` without ``KERAS_HOME``), which
   ``keras.applications.MobileNetV3Small(weights="imagenet", include_top=False)`` fills on a machine that is online,
   and which the Docker image fills at build time (``docker/Dockerfile``, build argument ``PRETRAINED_WEIGHTS``).

Pure standard library: asking needs no TensorFlow.
"""

from __future__ import annotations

import os
from pathlib import Path

# The backbone a job tries: the smallest `keras.applications` network, so that it fits a CPU's time budget.
TRIAL_ARCHITECTURE = "mobilenet_v3_small"

# The file names Keras' applications download (keras/src/applications/*.py), without their classification top.
KERAS_FILES = {
    "mobilenet_v3_small": "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
    "mobilenet_v3_large": "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5",
    "efficientnet_b0": "efficientnetb0_notop.h5",
    "resnet50": "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
}

WEIGHTS_DIR_VARIABLE = "DROPFIT_WEIGHTS_DIR"


def weight_folders() -> list[Path]:
    """The folders searched, in order."""
    folders = [Path(p).expanduser() for p in os.environ.get(WEIGHTS_DIR_VARIABLE, "").split(os.pathsep) if p]
    keras_home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    folders.append(Path(keras_home) / "models")
    return folders


def find_weights(architecture: str = TRIAL_ARCHITECTURE) -> Path | None:
    """The first local ImageNet weights file for ``architecture`` (without its top), or None."""
    name = KERAS_FILES.get(architecture)
    if name is None:
        return None
    for folder in weight_folders():
        candidate = folder / name
        if candidate.is_file() and candidate.stat().st_size > 0:
            return candidate
    return None


def missing_weights_message(architecture: str = TRIAL_ARCHITECTURE) -> str:
    """What a user reads when no weights were found: where they were looked for, and how to provide them."""
    where = ", ".join(str(f) for f in weight_folders())
    return (f"no ImageNet weights for {architecture} on this host (looked for {KERAS_FILES[architecture]} in {where}); "
            f"trained from scratch only. To let the job try a pretrained backbone, put that file in one of those "
            f"folders (or set {WEIGHTS_DIR_VARIABLE}): see docs/training.md, 'Pretrained backbones'.")
