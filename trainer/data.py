"""The ``tf.data`` input pipeline: parallel decode, resize, cache as uint8, shuffle, batch, prefetch.

JPEG and PNG go through TensorFlow's native decoders inside the graph; other formats through Pillow
(`trainer.images.load_rgb`) in a ``numpy_function``. Images stay ``uint8`` until the model's own ``Rescaling`` layer,
so the cache is 4x smaller than float32 and the saved model takes raw 0-255 pixels.
"""

from __future__ import annotations

import logging
import os
import threading

import numpy as np
import tensorflow as tf

from trainer.images import BadImage, load_rgb
from trainer.scan import Sample, Skipped

log = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE
# Shuffle buffer cap: samples are already shuffled once before caching, so a window this size mixes well enough
# without holding a second copy of a large dataset in memory.
SHUFFLE_BUFFER = 4096


class DecodeFailures:
    """Files that passed the scan but failed to decode in the pipeline (collected from Pillow's worker threads)."""

    def __init__(self, root: str):
        self.root = root
        self._lock = threading.Lock()
        self.items: list[Skipped] = []

    def add(self, path: str, reason: str) -> None:
        with self._lock:
            rel = os.path.relpath(path, self.root)
            if all(s.path != rel for s in self.items):
                self.items.append(Skipped(rel, reason))
                log.warning("skipped %s: %s", rel, reason)


def resize(image: tf.Tensor, target_size: tuple[int, int]) -> tf.Tensor:
    """Resize a uint8 HxWxC image to ``target_size`` (bilinear, antialiased) and return uint8 again.

    Used by training and by `trainer.predict`, so a model sees the same pixels at both times.
    """
    resized = tf.image.resize(image, target_size, method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def make_dataset(samples: list[Sample], *, num_classes: int, target_size: tuple[int, int], batch_size: int,
                 channels: int = 3, shuffle: bool = False, seed: int | None = None, cache: bool | str = True,
                 failures: DecodeFailures | None = None, with_index: bool = False) -> tf.data.Dataset:
    """Build a batched dataset of ``(uint8 images, one-hot labels)`` from scanned samples.

    Every sample is used each epoch; the last batch may be smaller than ``batch_size`` (and a dataset smaller than
    one batch still gives one batch).

    Args:
        cache: True caches decoded images in memory, a string caches to that file prefix, False decodes every epoch.
        failures: collects files that fail to decode; they are dropped instead of stopping training.
        with_index: add a third element, each image's position in ``samples`` (to name misclassified files).
    """
    if not samples:
        raise ValueError("make_dataset needs at least one sample")
    height, width = target_size

    def native(path, label, index):
        data = tf.io.read_file(path)
        image = tf.io.decode_image(data, channels=channels, expand_animations=False, dtype=tf.uint8)
        image.set_shape([None, None, channels])
        return resize(image, target_size), label, index

    def pillow(path: bytes) -> np.ndarray:
        name = path.decode("utf-8", "surrogateescape")
        try:
            return load_rgb(name, channels)
        except BadImage as exc:
            if failures is not None:
                failures.add(name, str(exc))
            return np.zeros((0, 0, channels), np.uint8)

    def slow(path, label, index):
        image = tf.numpy_function(pillow, [path], tf.uint8, stateful=False)
        image.set_shape([None, None, channels])
        return image, label, index

    def decoded(positions: list[int], fn) -> tf.data.Dataset:
        paths = [samples[i].path for i in positions]
        labels = np.asarray([samples[i].label for i in positions], np.int32)
        indices = np.asarray(positions, np.int64)
        return tf.data.Dataset.from_tensor_slices((paths, labels, indices)).map(fn, num_parallel_calls=AUTOTUNE)

    parts = []
    fast = [i for i, s in enumerate(samples) if s.native]
    if fast:
        # The scan catches truncated files cheaply; ignore_errors is the backstop for the rare corrupt body.
        parts.append(decoded(fast, native).ignore_errors(log_warning=True))
    other = [i for i, s in enumerate(samples) if not s.native]
    if other:
        slow_ds = decoded(other, slow).filter(lambda image, label, index: tf.size(image) > 0)
        parts.append(slow_ds.map(lambda image, label, index: (resize(image, target_size), label, index),
                                 num_parallel_calls=AUTOTUNE))
    ds = parts[0] if len(parts) == 1 else parts[0].concatenate(parts[1])
    ds = ds.map(lambda image, label, index: (tf.ensure_shape(image, [height, width, channels]), label, index))
    if cache:
        ds = ds.cache(cache if isinstance(cache, str) else "")
    if shuffle:
        ds = ds.shuffle(min(len(samples), SHUFFLE_BUFFER), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if with_index:
        ds = ds.map(lambda images, labels, index: (images, tf.one_hot(labels, num_classes), index),
                    num_parallel_calls=AUTOTUNE)
    else:
        ds = ds.map(lambda images, labels, index: (images, tf.one_hot(labels, num_classes)),
                    num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE)
