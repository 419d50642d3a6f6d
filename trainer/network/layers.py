"""dropfit's own Keras layers, registered so that ``safe_mode`` loading (no code in model files) knows them:

- `Augmentation`: training-time augmentation inside the *training* model, active only while training, on 0-255
  pixels. The model users get (``model.keras``) is rebuilt without it (`trainer.fitting.train`).
- `FusedBatchNormalization`: Keras' batch normalisation, trained with TensorFlow's fused kernel; only in the training
  model, like `Augmentation` (``model.keras`` has Keras' own layer, with the same weights).
- `Calibration`: how dropfit 0.1 built the temperature into ``model.keras``. No longer used (the temperature is now
  Keras' own layers, `trainer.fitting.calibration.calibrated`, so the file loads without dropfit); kept so that models
  written then still load through `trainer.load_model`.
"""

from __future__ import annotations

import keras

_RANDOM_STEPS = ("rotation", "zoom", "translation", "contrast")


@keras.saving.register_keras_serializable(package="dropfit")
class Augmentation(keras.layers.Layer):
    """Random flip/rotation/zoom/translation/contrast, applied only when ``training`` is explicitly true.

    Keras' own random layers augment whenever they are called without ``training=False``; wrapped here, a plain
    ``model(images)`` or a SavedModel export can never augment at inference.
    """

    def __init__(self, options: dict, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.options, self.seed = dict(options), seed
        self.steps = []
        flip = options.get("flip", "none")
        if flip and flip != "none":
            mode = {"both": "horizontal_and_vertical"}.get(flip, flip)
            self.steps.append(keras.layers.RandomFlip(mode, seed=seed, name="flip"))
        if options.get("rotation"):
            self.steps.append(keras.layers.RandomRotation(options["rotation"], fill_mode="reflect", seed=seed,
                                                          name="rotation"))
        if options.get("zoom"):
            self.steps.append(keras.layers.RandomZoom(options["zoom"], fill_mode="reflect", seed=seed, name="zoom"))
        if options.get("translation"):
            t = options["translation"]
            self.steps.append(keras.layers.RandomTranslation(t, t, fill_mode="reflect", seed=seed,
                                                             name="translation"))
        if options.get("contrast"):
            self.steps.append(keras.layers.RandomContrast(options["contrast"], value_range=(0, 255), seed=seed,
                                                          name="contrast"))

    def call(self, inputs, training=None):
        if not training:
            return inputs
        x = inputs
        for step in self.steps:
            x = step(x, training=True)
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "options": self.options, "seed": self.seed}


def augmentation_layers(options: dict | None, seed: int | None = None) -> list[keras.layers.Layer]:
    """The augmentation layer for ``options`` (none if augmentation is off); it works on 0-255 pixels."""
    if not options:
        return []
    unresolved = sorted(key for key, value in options.items() if value == "auto")
    if unresolved:
        raise ValueError(f"augmentation {' and '.join(unresolved)} must be numbers when a model is built ('auto' is "
                         f"settled by train_cnn). Received: {options!r}")
    if options.get("flip", "none") == "none" and not any(options.get(k) for k in _RANDOM_STEPS):
        return []
    return [Augmentation(options, seed, name="augmentation")]


@keras.saving.register_keras_serializable(package="dropfit")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` whose training step is one fused TensorFlow kernel instead of Keras 3's
    moments-then-normalise (as Keras 2 did by default): 1.4-1.5x faster training of the cnn on a 2-core CPU
    (bench/results/fused_norm.json). Inference, the weights and the moving statistics are Keras' own, so the
    model users get is rebuilt with the plain layer and these weights (`trainer.fitting.evaluate.for_inference`)."""

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable) or mask is not None or self.axis not in (-1, len(inputs.shape) - 1) \
                or len(inputs.shape) != 4 or not (self.center and self.scale) or self.renorm:
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        dtype = inputs.dtype
        x = tf.cast(inputs, "float32")
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(x, tf.cast(self.gamma, "float32"),
                                                             tf.cast(self.beta, "float32"), epsilon=self.epsilon,
                                                             is_training=True)
        # The kernel returns the unbiased variance; Keras averages the biased one into its moving statistics.
        n = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), "float32")
        variance = variance * (n - 1.0) / tf.maximum(n, 2.0)
        m = self.momentum
        self.moving_mean.assign(self.moving_mean * m + tf.cast(mean, self.moving_mean.dtype) * (1 - m))
        self.moving_variance.assign(self.moving_variance * m + tf.cast(variance, self.moving_variance.dtype) * (1 - m))
        return tf.cast(y, dtype)


@keras.saving.register_keras_serializable(package="dropfit")
class Calibration(keras.layers.Layer):
    """Temperature scaling of softmax probabilities: ``softmax(log p / T)`` (dropfit 0.1's models; see the module's
    doc)."""

    def __init__(self, temperature: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.temperature = float(temperature)

    def call(self, probabilities):
        ops = keras.ops
        logits = ops.log(ops.clip(probabilities, 1e-12, 1.0)) / self.temperature
        return ops.softmax(logits, axis=-1)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}
