"""The network and its optimizer: the classic recipe CNN, with the rescaling built in and a depth that fits the input.

The recipe: five blocks of 3x3 Conv2D + ReLU and 2x2 MaxPool (16, 32, 64, 64, 64 filters), Flatten, Dense 512 ReLU,
Dense softmax, RMSprop at 1e-3. Pure Keras 3, so it runs on any Keras backend.
"""

from __future__ import annotations

import logging

import keras

log = logging.getLogger(__name__)

OPTIMIZERS = ("rmsprop", "adam", "sgd")


def fitting_blocks(size: int, blocks: int) -> int:
    """How many conv(3x3, valid) + pool(2x2) blocks fit in ``size`` pixels before the feature map would vanish."""
    fit = 0
    while fit < blocks and size - 2 >= 2:
        size = (size - 2) // 2
        fit += 1
    return fit


def build_model(input_shape: tuple[int, int, int], num_classes: int, *, filters=(16, 32, 64, 64, 64),
                dense_units: int = 512, dropout: float = 0.0, batch_norm: bool = False,
                name: str = "dropfit_recipe") -> keras.Model:
    """The recipe CNN for raw 0-255 pixels of ``input_shape`` (height, width, channels).

    Small inputs get fewer blocks instead of pooling below 1x1: a 28x28 image keeps three of the five.

    Raises:
        ValueError: if not even one block fits the input.
    """
    height, width, _ = input_shape
    blocks = fitting_blocks(min(height, width), len(filters))
    if blocks == 0:
        raise ValueError(f"target_size {height}x{width} is too small for a 3x3 convolution and 2x2 pooling; "
                         f"use at least 4x4")
    if blocks < len(filters):
        log.info("input %dx%d fits %d of the %d conv blocks; using filters %s", height, width, blocks, len(filters),
                 list(filters[:blocks]))
    inputs = keras.Input(shape=input_shape, name="image")
    # Scaling inside the model: callers (and the saved model) feed raw pixels, exactly what image files hold.
    x = keras.layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    for i, f in enumerate(filters[:blocks]):
        if batch_norm:
            x = keras.layers.Conv2D(f, 3, use_bias=False, name=f"conv{i + 1}")(x)
            x = keras.layers.BatchNormalization(name=f"bn{i + 1}")(x)
            x = keras.layers.Activation("relu", name=f"relu{i + 1}")(x)
        else:
            x = keras.layers.Conv2D(f, 3, activation="relu", name=f"conv{i + 1}")(x)
        x = keras.layers.MaxPooling2D(2, name=f"pool{i + 1}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(dense_units, activation="relu", name="dense")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    # float32 output keeps softmax stable should a mixed-precision policy be active.
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name)


def make_optimizer(name: str = "rmsprop", learning_rate: float = 1e-3, momentum: float = 0.0):
    """A fresh Keras optimizer by name."""
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=learning_rate, momentum=momentum)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=learning_rate)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=learning_rate, momentum=momentum)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}. Received: optimizer={name!r}")


def compile_model(model: keras.Model, optimizer: str = "rmsprop", learning_rate: float = 1e-3,
                  momentum: float = 0.0) -> keras.Model:
    """Compile for one-hot labels with categorical cross-entropy and accuracy, as the recipe does."""
    model.compile(optimizer=make_optimizer(optimizer, learning_rate, momentum), loss="categorical_crossentropy",
                  metrics=["accuracy"])
    return model
