"""dropfit's trainer: turn a folder of class-sorted images into a trained Keras CNN.

``import trainer`` stays light (no TensorFlow); the heavy names load on first use::

    from trainer import train_cnn
    model = train_cnn("data/train", target_size=(200, 200), num_epochs=20)
"""

from __future__ import annotations

import importlib
import os

# oneDNN's CPU kernels: TensorFlow leaves them off on some CPUs (this machine's AMD among them); on, the recipe model
# trained 1.8x faster here with the same results. Set before TensorFlow loads, which importing any trainer module
# that needs it does after this runs; a value set by the user wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

__all__ = ["TrainingInterrupted", "evaluate", "load_model", "predict", "train_cnn"]

_LAZY = {
    "train_cnn": "trainer.fitting.train",
    "TrainingInterrupted": "trainer.fitting.train",
    "predict": "trainer.prediction.api",
    "evaluate": "trainer.prediction.api",
    "load_model": "trainer.prediction.api",
}


def __getattr__(name: str):
    # TensorFlow takes seconds to import; the daemon imports contract.spec and must never pay for it.
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
