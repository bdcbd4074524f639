"""A small residual CNN built with the Keras functional API: a builder for `harness sweep`.

Used by `resnet_mnist.yaml` (`model: {builder: "residual_cnn:small_resnet", args: {...}}`). The
harness passes `input_shape` and `num_classes` from the data set; the other arguments come from
the variant's `args` (and grid axes such as `model.args.width`).
"""

import keras
from keras import layers


def residual_block(x, filters: int, *, downsample: bool, batchnorm: bool, bn_momentum: float):
    """conv-BN-ReLU-conv-BN, added to a (projected when the shape changes) shortcut, then ReLU."""
    stride = 2 if downsample else 1
    shortcut = x
    y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=not batchnorm)(x)
    if batchnorm:
        y = layers.BatchNormalization(momentum=bn_momentum)(y)
    y = layers.Activation("relu")(y)
    y = layers.Conv2D(filters, 3, padding="same", use_bias=not batchnorm)(y)
    if batchnorm:
        y = layers.BatchNormalization(momentum=bn_momentum)(y)
    if downsample or shortcut.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=stride, padding="same")(shortcut)
    return layers.Activation("relu")(layers.Add()([y, shortcut]))


def small_resnet(
    input_shape,
    num_classes,
    width: int = 16,
    blocks: int = 2,
    batchnorm: bool = True,
    bn_momentum: float = 0.9,
    dropout: float = 0.0,
):
    """Stem conv, `blocks` residual blocks (width doubling and stride 2 from the second on),
    global average pooling, optional dropout, softmax. Returned uncompiled: the variant's
    optimizer and loss compile it.

    `bn_momentum` 0.9 rather than Keras' 0.99: on a short budget the moving statistics that
    evaluation uses must forget their initial values within a few hundred steps."""
    inputs = keras.Input(shape=input_shape)
    x = layers.Conv2D(width, 3, padding="same", activation="relu")(inputs)
    filters = width
    for i in range(blocks):
        if i > 0:
            filters *= 2
        x = residual_block(x, filters, downsample=i > 0, batchnorm=batchnorm, bn_momentum=bn_momentum)
    x = layers.GlobalAveragePooling2D()(x)
    if dropout:
        x = layers.Dropout(dropout)(x)
    outputs = layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs, name=f"resnet_w{width}_b{blocks}")
