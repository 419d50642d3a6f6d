"""Training throughput (images/second) of the recipe model at 200x200, batch 32, fed three ways:

- ``bound``: from uint8 tensors already in memory — the model's own compute limit;
- ``dropfit``: our pipeline, its cache filled (the steady state of every epoch after the first);
- ``recipe``: ``ImageDataGenerator(rescale=1/255).flow_from_directory`` (decoding every epoch, in Python).

Each figure times ``steps`` training steps after warm-up steps (compilation, cache filling) are done.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

TARGET = (200, 200)
BATCH = 32


class _StepTimer:
    def __init__(self, skip: int):
        import keras

        class Timer(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.times = []

            def on_train_batch_end(self, batch, logs=None):
                self.times.append(time.perf_counter())

        self.callback, self.skip = Timer(), skip

    def images_per_second(self) -> float:
        times = self.callback.times[self.skip:]
        return BATCH * (len(times) - 1) / (times[-1] - times[0])


def _model(num_classes: int):
    from trainer.network.networks import build_model, compile_model

    return compile_model(build_model((*TARGET, 3), num_classes, architecture="recipe"), "rmsprop", 1e-3)


def bound(steps: int = 40, warmup: int = 8) -> float:
    import keras
    import tensorflow as tf

    n = BATCH * 16
    x = np.random.default_rng(0).integers(0, 256, (n, *TARGET, 3), dtype=np.uint8)
    y = keras.utils.to_categorical(np.random.default_rng(1).integers(0, 5, n), 5)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).cache().repeat().prefetch(tf.data.AUTOTUNE)
    timer = _StepTimer(warmup)
    _model(5).fit(ds, steps_per_epoch=steps + warmup, epochs=1, verbose=0, callbacks=[timer.callback])
    return timer.images_per_second()


def dropfit(root: Path, steps: int = 40) -> float:
    from trainer.data.pipeline import Batches, make_dataset
    from trainer.data.scan import scan_directory, shuffled

    scan = scan_directory(root)
    samples = shuffled(scan.samples, 1)[: BATCH * 40]
    ds = make_dataset(samples, Batches(len(scan.class_names), TARGET, BATCH), shuffle_seed=1)
    for _ in ds:  # fill the cache: the steady state is every epoch after the first
        pass
    timer = _StepTimer(5)
    _model(len(scan.class_names)).fit(ds.repeat(), steps_per_epoch=steps + 5, epochs=1, verbose=0,
                                      callbacks=[timer.callback])
    return timer.images_per_second()


def recipe(root: Path, steps: int = 40) -> float:
    from keras.src.legacy.preprocessing.image import ImageDataGenerator  # the recipe's API, benchmark only

    gen = ImageDataGenerator(rescale=1 / 255).flow_from_directory(str(root), target_size=TARGET, batch_size=BATCH,
                                                                   class_mode="categorical")
    timer = _StepTimer(5)

    def batches():
        while True:
            for i in range(len(gen)):
                yield gen[i]

    import tensorflow as tf

    ds = tf.data.Dataset.from_generator(batches, output_signature=(
        tf.TensorSpec((None, *TARGET, 3), tf.float32), tf.TensorSpec((None, len(gen.class_indices)), tf.float32)))
    _model(len(gen.class_indices)).fit(ds, steps_per_epoch=steps + 5, epochs=1, verbose=0,
                                       callbacks=[timer.callback])
    return timer.images_per_second()
