"""The networks and their optimizer. Every model takes raw 0-255 pixels: scaling (and augmentation, active only in
training) are layers inside it, so the saved model needs no preprocessing by its callers. Pure Keras 3.

- ``recipe``: the classic network kept exactly — five blocks of 3x3 Conv2D + ReLU and 2x2 MaxPool (16, 32, 64, 64,
  64 filters), Flatten, Dense 512 ReLU, Dense softmax; RMSprop at 1e-3.
- ``cnn``: dropfit's default for training from scratch — blocks of two 3x3 convolutions with batch normalisation,
  global average pooling and dropout (chosen by measurement: see bench/compare_models.py and docs/training.md).
- ``mobilenet_v3_small``, ``mobilenet_v3_large``, ``efficientnet_b0``, ``resnet50``: `keras.applications` backbones
  for transfer learning (see `trainer.network.backbones`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import keras

from contract.spec import ARCHITECTURES, BACKBONES, OPTIMIZERS
from trainer.network.backbones import build_transfer
from trainer.network.layers import FusedBatchNormalization, augmentation_layers

log = logging.getLogger(__name__)

RECIPE_FILTERS = (16, 32, 64, 64, 64)
CNN_FILTERS = (16, 32, 64, 128, 256)

def fitting_blocks(size: int, blocks: int, padding: str = "valid") -> int:
    """How many conv(3x3) + pool(2x2) blocks fit in ``size`` pixels before the feature map would vanish."""
    fit = 0
    while fit < blocks:
        after_conv = size - 2 if padding == "valid" else size
        if after_conv < 2:
            break
        size = after_conv // 2
        fit += 1
    return fit


def _stem(input_shape, augmentation, seed):
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    # Augmentation works on 0-255 pixels, before scaling; both are part of the model.
    for layer in augmentation_layers(augmentation, seed):
        x = layer(x)
    return inputs, x


def _norm(fused: bool):
    """The batch-normalisation layer class: Keras' own, or the same trained with TensorFlow's fused kernel."""
    return FusedBatchNormalization if fused else keras.layers.BatchNormalization


def build_recipe(input_shape, num_classes, *, filters=RECIPE_FILTERS, dense_units=512, dropout=0.0,
                 batch_norm=False, augmentation=None, seed=None) -> keras.Model:
    """The recipe CNN; small inputs get fewer blocks instead of pooling below 1x1 (28x28 keeps three of five)."""
    height, width, _ = input_shape
    blocks = fitting_blocks(min(height, width), len(filters))
    if blocks == 0:
        raise ValueError(f"target_size {height}x{width} is too small for a 3x3 convolution and 2x2 pooling; "
                         f"use at least 4x4")
    if blocks < len(filters):
        log.info("input %dx%d fits %d of the %d conv blocks; using filters %s", height, width, blocks, len(filters),
                 list(filters[:blocks]))
    inputs, x = _stem(input_shape, augmentation, seed)
    x = keras.layers.Rescaling(1.0 / 255, name="rescale")(x)
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
    # float32 output keeps softmax stable under a mixed-precision policy.
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="dropfit_recipe")


def build_cnn(input_shape, num_classes, *, filters=CNN_FILTERS, dropout=0.3, augmentation=None,
              seed=None, fused_norm=False) -> keras.Model:
    """dropfit's from-scratch default: [Conv-BN-ReLU x2, MaxPool] blocks, global average pooling, dropout."""
    height, width, _ = input_shape
    blocks = max(1, min(len(filters), fitting_blocks(min(height, width), len(filters), "same")))
    inputs, x = _stem(input_shape, augmentation, seed)
    x = keras.layers.Rescaling(1.0 / 255, name="rescale")(x)
    for i, f in enumerate(filters[:blocks]):
        for j in (1, 2):
            x = keras.layers.Conv2D(f, 3, padding="same", use_bias=False, name=f"block{i + 1}_conv{j}")(x)
            # momentum 0.9, not Keras' 0.99: small datasets give few steps per epoch, and with 0.99 the moving
            # statistics lag so far behind that inference (validation, predict) sees garbage for many epochs.
            x = _norm(fused_norm)(momentum=0.9, name=f"block{i + 1}_bn{j}")(x)
            x = keras.layers.Activation("relu", name=f"block{i + 1}_relu{j}")(x)
        x = keras.layers.MaxPooling2D(2, name=f"block{i + 1}_pool")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="dropfit_cnn")


@dataclass(frozen=True)
class Network:
    """Which network, and how: every setting `build_model` takes besides the input shape and the classes."""

    architecture: str = "recipe"
    filters: tuple[int, ...] | list[int] | None = None
    dense_units: int = 512
    dropout: float | None = None
    batch_norm: bool = False
    augmentation: dict | None = None
    weights: str | None = None
    seed: int | None = None
    fused_norm: bool = False  # the cnn's training model only (`trainer.network.layers.FusedBatchNormalization`)

    @classmethod
    def of(cls, options, augmentation=None) -> Network:
        """The network a `contract.options.TrainOptions` asks for (``augmentation`` in the model, or None)."""
        return cls(options.architecture, options.filters, options.dense_units, options.dropout, options.batch_norm,
                   augmentation, options.weights, options.seed)


def build_model(input_shape: tuple[int, int, int], num_classes: int, network: Network | None = None,
                **settings) -> keras.Model:
    """Build a network for raw pixels of ``input_shape`` (height, width, channels): ``network``, or the `Network`
    fields as keywords (``architecture="cnn", seed=1``).

    Raises:
        ValueError: for an unknown architecture or an input too small for it.
    """
    n = network or Network(**settings)
    if n.architecture == "recipe":
        return build_recipe(input_shape, num_classes, filters=tuple(n.filters or RECIPE_FILTERS),
                            dense_units=n.dense_units, dropout=n.dropout or 0.0, batch_norm=n.batch_norm,
                            augmentation=n.augmentation, seed=n.seed)
    if n.architecture == "cnn":
        return build_cnn(input_shape, num_classes, filters=tuple(n.filters or CNN_FILTERS),
                         dropout=0.3 if n.dropout is None else n.dropout, augmentation=n.augmentation, seed=n.seed,
                         fused_norm=n.fused_norm)
    if n.architecture in BACKBONES:
        return build_transfer(n.architecture, input_shape, num_classes, weights=n.weights,
                              dropout=0.2 if n.dropout is None else n.dropout, augmentation=n.augmentation,
                              seed=n.seed)
    raise ValueError(f"architecture must be one of {ARCHITECTURES}. Received: architecture={n.architecture!r}")


def make_optimizer(name: str = "rmsprop", learning_rate: float = 1e-3, momentum: float = 0.0,
                   ema_momentum: float | None = None):
    """A fresh Keras optimizer by name; with ``ema_momentum``, one that keeps a moving average of the weights and
    swaps it in when ``fit`` ends (Keras' ``use_ema``)."""
    ema = {"use_ema": True, "ema_momentum": ema_momentum} if ema_momentum else {}
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=learning_rate, momentum=momentum, **ema)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=learning_rate, **ema)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=learning_rate, momentum=momentum, **ema)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}. Received: optimizer={name!r}")


def compile_model(model: keras.Model, optimizer="rmsprop", learning_rate: float = 1e-3, momentum: float = 0.0,
                  label_smoothing: float = 0.0, jit_compile: bool = False,
                  ema_momentum: float | None = None) -> keras.Model:
    """Compile for one-hot labels with categorical cross-entropy and accuracy, as the recipe does."""
    opt = make_optimizer(optimizer, learning_rate, momentum, ema_momentum) if isinstance(optimizer, str) \
        else optimizer
    model.compile(optimizer=opt, loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
                  metrics=["accuracy"], jit_compile=jit_compile)
    return model
