"""Transfer learning: `keras.applications` backbones under a small classification head.

The backbone is the layer named ``backbone``; training freezes it first (head only) and then fine-tunes it (see
`trainer.fitting.train`). Each backbone gets its own expected preprocessing inside the model, so the model still takes
raw 0-255 pixels. Weights: ``None`` (random), ``"imagenet"`` (downloaded by Keras on first use) or a path to a
``.weights.h5``/``.h5`` file of the backbone without its top.
"""

from __future__ import annotations

import os

import keras
import numpy as np

from trainer.data.scan import DatasetError
from trainer.network.layers import augmentation_layers

MIN_SIZE = 32

_APPS = {
    "mobilenet_v3_small": ("MobileNetV3Small", {"include_preprocessing": True, "minimalistic": False}),
    "mobilenet_v3_large": ("MobileNetV3Large", {"include_preprocessing": True, "minimalistic": False}),
    "efficientnet_b0": ("EfficientNetB0", {}),
    "resnet50": ("ResNet50", {}),
}


def caffe_preprocess(name: str = "caffe_preprocess") -> keras.layers.Layer:
    """ResNet50's ImageNet preprocessing (RGB to BGR, then subtract the BGR means) as a frozen 1x1 convolution:
    a built-in layer, so the saved model loads anywhere in Keras' safe mode."""
    layer = keras.layers.Conv2D(3, 1, name=name, trainable=False)
    layer.build((None, None, None, 3))
    swap = np.zeros((1, 1, 3, 3), "float32")
    for rgb, bgr in ((0, 2), (1, 1), (2, 0)):
        swap[0, 0, rgb, bgr] = 1.0
    layer.set_weights([swap, -np.asarray([103.939, 116.779, 123.68], "float32")])
    return layer


def build_backbone(architecture: str, input_shape: tuple[int, int, int], weights=None,
                   name: str = "backbone") -> keras.Model:
    """The named application without its top, global-average pooled."""
    class_name, extra = _APPS[architecture]
    app = getattr(keras.applications, class_name)
    load_file = weights is not None and weights != "imagenet"
    backbone = app(include_top=False, weights=None if load_file else weights, input_shape=input_shape,
                   pooling="avg", name=name, **extra)
    if load_file:
        if not os.path.isfile(weights):
            raise DatasetError(f"model.weights: no such file {weights!r}")
        try:
            backbone.load_weights(weights)
        except (ValueError, OSError) as exc:
            raise DatasetError(f"model.weights: {weights!r} does not hold {class_name} weights without the top "
                             f"for input {input_shape}: {exc}") from None
    return backbone


def build_transfer(architecture: str, input_shape: tuple[int, int, int], num_classes: int, *, weights=None,
                   dropout: float = 0.2, augmentation: dict | None = None, seed: int | None = None) -> keras.Model:
    """Backbone + dropout + softmax head, for raw pixels of ``input_shape``."""
    height, width, channels = input_shape
    if min(height, width) < MIN_SIZE:
        raise ValueError(f"{architecture} needs images of at least {MIN_SIZE}x{MIN_SIZE}; "
                         f"target_size is {height}x{width}")
    backbone = build_backbone(architecture, (height, width, 3), weights)
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    for layer in augmentation_layers(augmentation, seed):
        x = layer(x)
    if channels == 1:
        x = keras.layers.Concatenate(name="gray_to_rgb")([x, x, x])
    if architecture == "resnet50":
        x = caffe_preprocess()(x)
    # Pretrained batch-norm statistics stay frozen even when the backbone is fine-tuned; random ones must learn.
    x = backbone(x, training=False) if weights is not None else backbone(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=f"dropfit_{architecture}")


def set_backbone_trainable(model: keras.Model, trainable: bool, fine_tune_layers: int | None = None) -> None:
    """Freeze or unfreeze the backbone; with ``fine_tune_layers``, only its last N layers become trainable."""
    try:
        backbone = model.get_layer("backbone")
    except ValueError:
        return
    backbone.trainable = trainable
    if trainable and fine_tune_layers:
        for layer in backbone.layers[:-fine_tune_layers]:
            layer.trainable = False


def has_backbone(model: keras.Model) -> bool:
    return any(layer.name == "backbone" for layer in model.layers)
