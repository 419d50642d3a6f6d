"""The ``tf.data`` input pipeline: parallel decode, resize, cache as uint8, shuffle, batch, prefetch.

JPEG and PNG go through TensorFlow's native decoders inside the graph; other formats through Pillow
(`trainer.data.images.load_rgb`) in a ``numpy_function``. Images stay ``uint8`` until the model's own ``Rescaling``
layer, so the cache is 4x smaller than float32 and the saved model takes raw 0-255 pixels.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from trainer.data.images import BadImage, load_rgb
from trainer.data.scan import Sample, Skipped

log = logging.getLogger(__name__)

PARALLEL = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
PREFETCH = 2  # batches: from the in-memory cache a batch is ready long before the model wants it
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
    """Resize a uint8 HxWxC image to ``target_size`` (bilinear) and return uint8, rounded.

    Antialiasing (a proper low-pass filter) is applied only when shrinking by more than 2x, where plain bilinear
    sampling would alias; below that it costs half the throughput for no visible difference. Used by training and
    by `trainer.prediction.api`, so a model sees the same pixels at both times.
    """
    height, width = target_size
    shape = tf.shape(image)
    shrink_a_lot = tf.logical_or(shape[0] > 2 * height, shape[1] > 2 * width)
    resized = tf.cond(shrink_a_lot, lambda: tf.image.resize(image, target_size, antialias=True),
                      lambda: tf.image.resize(image, target_size))
    return tf.saturate_cast(resized + 0.5, tf.uint8)


def decode_native(data: tf.Tensor, channels: int, target_size: tuple[int, int]) -> tf.Tensor:
    """Decode JPEG or PNG bytes with TensorFlow's own decoders.

    Large JPEGs are decoded at 1/2, 1/4 or 1/8 scale straight from the DCT coefficients (libjpeg's scaled decoding:
    much faster, and a proper low-pass filter), as far as the result stays at least ``target_size``.
    """
    height, width = target_size

    def jpeg():
        shape = tf.io.extract_jpeg_shape(data)
        factor = tf.minimum(shape[0] // height, shape[1] // width)
        index = tf.cast(factor >= 2, tf.int32) + tf.cast(factor >= 4, tf.int32) + tf.cast(factor >= 8, tf.int32)
        branches = [lambda r=r: tf.io.decode_jpeg(data, channels=channels, ratio=r) for r in (1, 2, 4, 8)]
        return tf.switch_case(index, branches)

    image = tf.cond(tf.io.is_jpeg(data), jpeg, lambda: tf.io.decode_png(data, channels=channels))
    image.set_shape([None, None, channels])
    return image


@dataclass(frozen=True)
class Batches:
    """What the batches look like: one-hot labels over ``num_classes``, images resized to ``target_size`` with
    ``channels`` channels, ``batch_size`` at a time."""

    num_classes: int
    target_size: tuple[int, int]
    batch_size: int
    channels: int = 3


def make_dataset(samples: list[Sample], batches: Batches, *, shuffle_seed: int | None = None,
                 cache: bool | str = True, failures: DecodeFailures | None = None,
                 with_index: bool = False) -> tf.data.Dataset:
    """Build a batched dataset of ``(uint8 images, one-hot labels)`` from scanned samples.

    Every sample is used each epoch; the last batch may be smaller than ``batch_size`` (and a dataset smaller than
    one batch still gives one batch).

    Args:
        shuffle_seed: shuffle every epoch, seeded (None: keep the order).
        cache: True caches decoded images in memory, a string caches to that file prefix, False decodes every epoch.
        failures: collects files that fail to decode; they are dropped instead of stopping training.
        with_index: add a third element, each image's position in ``samples`` (to name misclassified files).
    """
    num_classes, target_size, batch_size, channels = (batches.num_classes, batches.target_size, batches.batch_size,
                                                      batches.channels)
    if not samples:
        raise ValueError("make_dataset needs at least one sample")
    height, width = target_size

    def native(path, label, index):
        return resize(decode_native(tf.io.read_file(path), channels, target_size), target_size), label, index

    def pillow(path: bytes) -> np.ndarray:
        name = path.decode("utf-8", "surrogateescape")
        try:
            return load_rgb(name, channels, target_size)
        except BadImage as exc:
            if failures is not None:
                failures.add(name, str(exc))
            return np.zeros((0, 0, channels), np.uint8)

    def slow(path, label, index):
        image = tf.numpy_function(pillow, [path], tf.uint8, stateful=False)
        image.set_shape([None, None, channels])
        return image, label, index

    def decoded(positions: list[int], fn) -> tf.data.Dataset:
        # As bytes: a name that is not valid UTF-8 (an old archive, a Samba share) cannot become a string tensor.
        paths = [os.fsencode(samples[i].path) for i in positions]
        labels = np.asarray([samples[i].label for i in positions], np.int32)
        indices = np.asarray(positions, np.int64)
        return tf.data.Dataset.from_tensor_slices((paths, labels, indices)).map(fn, num_parallel_calls=PARALLEL)

    parts = []
    fast = [i for i, s in enumerate(samples) if s.native]
    if fast:
        # The scan catches truncated files cheaply; ignore_errors is the backstop for the rare corrupt body.
        parts.append(decoded(fast, native).ignore_errors(log_warning=True))
    other = [i for i, s in enumerate(samples) if not s.native]
    if other:
        slow_ds = decoded(other, slow).filter(lambda image, label, index: tf.size(image) > 0)
        parts.append(slow_ds.map(lambda image, label, index: (resize(image, target_size), label, index),
                                 num_parallel_calls=PARALLEL))
    ds = parts[0] if len(parts) == 1 else parts[0].concatenate(parts[1])
    ds = ds.map(lambda image, label, index: (tf.ensure_shape(image, [height, width, channels]), label, index))
    if cache:
        ds = ds.cache(cache if isinstance(cache, str) else "")
    if shuffle_seed is not None:
        ds = ds.shuffle(min(len(samples), SHUFFLE_BUFFER), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if with_index:
        ds = ds.map(lambda images, labels, index: (images, tf.one_hot(labels, num_classes), index),
                    num_parallel_calls=PARALLEL)
    else:
        ds = ds.map(lambda images, labels, index: (images, tf.one_hot(labels, num_classes)),
                    num_parallel_calls=PARALLEL)
    ds = ds.prefetch(PREFETCH)
    # tf.data's autotuner re-tunes on a background thread whenever an epoch's iterator starts; on a 2-core CPU that
    # made whole epochs take twice as long, at random: 2 of 12 epochs at 20-21 s against 10-12 s, 151 s in all;
    # fixed settings, none, 123 s (the budget's network, bench/results/pipeline_autotune.json).
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


def available_memory() -> int:
    """Bytes of memory the system can still give (MemAvailable), or a conservative guess."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 4 << 30


def plan_cache(cache, images: int, target_size: tuple[int, int], channels: int, folder: str | os.PathLike | None,
               memory_fraction: float = 0.5) -> tuple[str, str | None]:
    """Decide where decoded images are cached: ``("memory", None)``, ``("disk", folder)`` or ``("none", None)``.

    ``auto`` keeps them in memory while they take at most ``memory_fraction`` of the available memory, and
    otherwise writes them (as uint8) to ``folder`` — a dataset larger than RAM is decoded once, not every epoch.
    Incomplete cache files (a run killed during its first epoch) are removed, since TensorFlow refuses them.
    """
    if cache is True or cache == "memory":
        return "memory", None
    if cache is False or cache == "none":
        return "none", None
    needed = images * target_size[0] * target_size[1] * channels
    if cache == "auto" and needed <= memory_fraction * available_memory():
        return "memory", None
    if folder is None:
        return "none", None
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        prefix = name.split(".")[0].rsplit("_", 1)[0] if "_" in name else name.split(".")[0]
        if not os.path.exists(os.path.join(folder, prefix + ".index")):
            os.unlink(os.path.join(folder, name))
    log.info("caching %.1f GB of decoded images on disk in %s", needed / 1e9, folder)
    return "disk", folder
