"""Picking the fastest correct settings for the machine a job runs on.

- CPU: oneDNN's optimised kernels (``TF_ENABLE_ONEDNN_OPTS=1``, set in `trainer/__init__.py` before TensorFlow
  loads; measured 1.8x on the recipe model here) and no XLA (measured slower on CPU: 45 vs 75 images/s).
- NVIDIA GPU: memory growth (jobs do not grab memory they do not use), mixed float16 precision on Tensor Core GPUs
  (compute capability 7.0+; the softmax output stays float32), XLA compilation.
- Several GPUs: one job per GPU is the daemon's default; ``multi_gpu`` trains one job on all of them with
  ``tf.distribute.MirroredStrategy``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import keras
import tensorflow as tf

from contract.spec import PRECISIONS

log = logging.getLogger(__name__)



@dataclass
class Runtime:
    """Resolved settings for one run."""

    devices: list[str]
    precision: str
    jit_compile: bool
    strategy: tf.distribute.Strategy
    notes: list[str] = field(default_factory=list)

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    @property
    def fused_norm(self) -> bool:
        """Train batch normalisation with TensorFlow's fused kernel (`trainer.network.layers.FusedBatchNormalization`):
        on the CPU, where it was measured (1.4-1.5x faster training of the cnn on 2 cores); GPUs keep Keras' layer."""
        return self.devices == ["CPU"] and self.replicas == 1

    def to_json(self) -> dict:
        return {"devices": self.devices, "precision": self.precision, "jit_compile": self.jit_compile,
                "replicas": self.replicas, "onednn": _onednn(), "notes": self.notes}

    @contextlib.contextmanager
    def building(self) -> Iterator[None]:
        """Build (and compile) models inside this: the distribution scope and the precision policy apply."""
        previous = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy(self.precision)
        try:
            with self.strategy.scope():
                yield
        finally:
            keras.mixed_precision.set_global_policy(previous)


def _onednn() -> bool:
    import os

    return os.environ.get("TF_ENABLE_ONEDNN_OPTS", "") == "1"


def configure(precision: str = "auto", jit_compile: bool | str = "auto", multi_gpu: bool = False) -> Runtime:
    """Resolve ``auto`` settings for the GPUs TensorFlow sees (``CUDA_VISIBLE_DEVICES`` decides which)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}. Received: precision={precision!r}")
    gpus = tf.config.list_physical_devices("GPU")
    notes = []
    for gpu in gpus:
        with contextlib.suppress(RuntimeError, ValueError):  # already initialised: keep what is set
            tf.config.experimental.set_memory_growth(gpu, True)
    names = [_describe(g) for g in gpus] or ["CPU"]
    if precision == "auto":
        capable = bool(gpus) and all(_compute_capability(g) >= (7, 0) for g in gpus)
        precision = "mixed_float16" if capable else "float32"
    if jit_compile == "auto":
        jit_compile = bool(gpus)
    if multi_gpu and len(gpus) > 1:
        strategy = tf.distribute.MirroredStrategy()
    else:
        if multi_gpu:
            notes.append(f"multi_gpu asked for, but {len(gpus)} GPU(s) visible: training on one device")
        strategy = tf.distribute.get_strategy()
    runtime = Runtime(names, precision, bool(jit_compile), strategy, notes)
    log.info("devices %s; precision %s; XLA %s; %d replica(s)", ", ".join(names), precision,
             "on" if runtime.jit_compile else "off", runtime.replicas)
    return runtime


def _compute_capability(gpu) -> tuple[int, int]:
    try:
        return tuple(tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0)))
    except (RuntimeError, ValueError):
        return (0, 0)


def _describe(gpu) -> str:
    try:
        details = tf.config.experimental.get_device_details(gpu)
    except (RuntimeError, ValueError):
        details = {}
    return details.get("device_name") or gpu.name
