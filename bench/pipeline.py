"""Input pipeline throughput (images/second) on the photo-like dataset, target 200x200, batch 32.

- ``limit``: the machine's raw decode+resize rate with every core busy and nothing else (the best of Pillow in one
  process per core and TensorFlow's native decoder in a bare parallel map);
- ``dropfit first epoch``: our pipeline decoding (scan included), ``dropfit cached``: later epochs from the uint8
  cache;
- ``recipe``: ``ImageDataGenerator(rescale=1/255).flow_from_directory`` (the legacy API, benchmark only).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

TARGET = (200, 200)
BATCH = 32


def _pil_decode_resize(paths: list[str]) -> int:
    for p in paths:
        with Image.open(p) as im:
            im.convert("RGB").resize((TARGET[1], TARGET[0]), Image.BILINEAR)
    return len(paths)


def limit_pillow(files: list[str]) -> float:
    cores = os.cpu_count() or 1
    chunks = [files[i::cores * 4] for i in range(cores * 4)]
    with ProcessPoolExecutor(cores) as pool:
        list(pool.map(_pil_decode_resize, [c[:8] for c in chunks]))  # warm the workers
        start = time.perf_counter()
        n = sum(pool.map(_pil_decode_resize, chunks))
    return n / (time.perf_counter() - start)


def limit_tensorflow(files: list[str]) -> float:
    import tensorflow as tf

    def load(path):
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        return tf.cast(tf.image.resize(image, TARGET), tf.uint8)

    ds = tf.data.Dataset.from_tensor_slices(files).map(load, num_parallel_calls=tf.data.AUTOTUNE,
                                                      deterministic=False).batch(BATCH).prefetch(tf.data.AUTOTUNE)
    for _ in ds.take(2):
        pass
    start = time.perf_counter()
    n = sum(int(b.shape[0]) for b in ds)
    return n / (time.perf_counter() - start)


def dropfit_pipeline(root: Path, epochs: int = 3) -> tuple[float, float, int]:
    """(first epoch images/s including the scan, cached epochs images/s, images)."""
    from trainer.data.pipeline import Batches, make_dataset
    from trainer.data.scan import scan_directory, shuffled

    start = time.perf_counter()
    scan = scan_directory(root)
    ds = make_dataset(shuffled(scan.samples, 1), Batches(len(scan.class_names), TARGET, BATCH), shuffle_seed=1)
    n = sum(int(x.shape[0]) for x, _ in ds)
    first = n / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(epochs):
        for _batch in ds:
            pass
    cached = epochs * n / (time.perf_counter() - start)
    return first, cached, n


def recipe_generator(root: Path) -> float:
    from keras.src.legacy.preprocessing.image import ImageDataGenerator  # the recipe's API, benchmark only

    gen = ImageDataGenerator(rescale=1 / 255).flow_from_directory(str(root), target_size=TARGET, batch_size=BATCH,
                                                                   class_mode="categorical")
    start = time.perf_counter()
    n = 0
    for i in range(len(gen)):
        n += len(gen[i][0])
    return n / (time.perf_counter() - start)


def files_of(root: Path) -> list[str]:
    return sorted(str(p) for p in root.glob("*/*.jpg"))
