"""Keras models from the one layer description (`harness.architecture.ModelLayout`): one copy, or
K independent copies fused into one program (`build_fused`) so that K seeds train in one step.

Imports Keras inside its functions only (the parent process of a sweep never imports it).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from harness.architecture import (
    ActivationSpec,
    BatchNormSpec,
    Conv2DSpec,
    DenseSpec,
    DropoutSpec,
    FlattenSpec,
    GlobalAveragePoolSpec,
    LayerSpec,
    ModelLayout,
    PoolSpec,
    model_layout,
)
from harness.spec import ModelConfig


def copy_name(index: int) -> str:
    """The name of fused copy `index`: its output and its keys in Keras' logs (`c0_loss`...)."""
    return f"c{index}"


def _regularizer(layout: ModelLayout) -> Any:
    import keras

    if layout.regularizer is None:
        return None
    kind, factor = layout.regularizer
    return (keras.regularizers.L1 if kind == "l1" else keras.regularizers.L2)(factor)


def plain_sigmoid(x: Any) -> Any:
    """A sigmoid and nothing more. Keras' TensorFlow backend tags the output of its sigmoid with the
    logits, and its categorical cross-entropy then computes softmax cross-entropy of those logits:
    on TensorFlow a `sigmoid` output with `categorical_crossentropy` trained a softmax classifier,
    while JAX and PyTorch compute the loss as written (sigmoids normalised to sum 1). The sum makes
    a new tensor without the tag, so the vocabulary means the same model on every backend (and
    what Keras 2, which the source notebooks ran on, computed)."""
    from keras import ops

    return ops.add(ops.sigmoid(x), 0.0)


def _activation(name: str | None) -> Any:
    return plain_sigmoid if name == "sigmoid" else name


def keras_layer(spec: LayerSpec, layout: ModelLayout, *, regularize: bool = True) -> Any:
    """The Keras layer of one layer spec (`regularize=False`: kernels without their regularizer,
    for a fused copy whose penalty is part of its own loss, `copy_loss`)."""
    from keras import layers

    regularize = regularize and layout.regularizer is not None
    if isinstance(spec, Conv2DSpec):
        return layers.Conv2D(
            spec.filters,
            spec.kernel_size,
            padding=spec.padding,
            activation=_activation(spec.activation),
            kernel_regularizer=_regularizer(layout) if spec.regularized and regularize else None,
        )
    if isinstance(spec, DenseSpec):
        return layers.Dense(
            spec.units,
            activation=_activation(spec.activation),
            kernel_regularizer=_regularizer(layout) if spec.regularized and regularize else None,
        )
    if isinstance(spec, BatchNormSpec):
        return layers.BatchNormalization(momentum=spec.momentum, epsilon=spec.epsilon)
    if isinstance(spec, ActivationSpec):
        return layers.Activation(_activation(spec.activation))
    if isinstance(spec, PoolSpec):
        return (layers.MaxPooling2D if spec.kind == "max" else layers.AveragePooling2D)(spec.size)
    if isinstance(spec, DropoutSpec):
        return layers.Dropout(spec.rate)
    if isinstance(spec, FlattenSpec):
        return layers.Flatten()
    if isinstance(spec, GlobalAveragePoolSpec):
        return layers.GlobalAveragePooling2D()
    raise TypeError(f"no Keras layer for {spec!r}")


def build_layout(layout: ModelLayout, *, name: str | None = None, regularize: bool = True):
    """A `keras.Sequential` of a layout, its weights created now (from Keras' current seed)."""
    import keras

    stack = [keras.Input(shape=layout.input_shape)]
    stack += [keras_layer(spec, layout, regularize=regularize) for spec in layout.layers]
    return keras.Sequential(stack, name=name)


def build_model(config: ModelConfig, *, input_shape: tuple[int, ...], num_classes: int):
    """The Keras model a `ModelConfig` describes (the layout `architecture.summarize_model` walks)."""
    return build_layout(model_layout(config, input_shape=input_shape, num_classes=num_classes))


def build_fused(layout: ModelLayout, seeds: Sequence[int], *, seed_fn: Callable[[int], None]):
    """K independent copies of a layout in one functional model: input k feeds copy k, output k
    (named `copy_name(k)`) is copy k's prediction. Copy k is built right after `seed_fn(seeds[k])`,
    so its initial weights (and its dropout layers' seed generators) are those a single run with
    that seed builds. No weight, statistic or activation is shared between copies; with the loss a
    sum of the copies' losses, each copy's gradients are exactly its own. A regularizer's penalty
    is not a layer loss here but part of each copy's own loss (`copy_loss`), so that Keras logs it
    per copy."""
    import keras

    copies = []
    for index, seed in enumerate(seeds):
        seed_fn(seed)
        copies.append(build_layout(layout, name=copy_name(index), regularize=False))
    inputs = [keras.Input(shape=layout.input_shape, name=f"x{index}") for index in range(len(seeds))]
    outputs = [copy(x) for copy, x in zip(copies, inputs)]
    return keras.Model(inputs, outputs, name=f"fused_{len(seeds)}"), copies


def copy_loss(loss: str, copy: Any, layout: ModelLayout) -> Callable[[Any, Any], Any]:
    """Copy `copy`'s loss: the variant's loss plus the penalty of the copy's own regularized
    kernels (what a single model's total loss is; its gradients reach only this copy)."""
    import keras

    base = keras.losses.get(loss)
    regularizer = _regularizer(layout)
    kernels = [
        layer.kernel
        for spec, layer in zip(layout.layers, copy.layers, strict=True)
        if isinstance(spec, (Conv2DSpec, DenseSpec)) and spec.regularized and regularizer is not None
    ]

    def fn(y_true: Any, y_pred: Any) -> Any:
        value = base(y_true, y_pred)
        for kernel in kernels:
            value = value + regularizer(kernel)
        return value

    fn.__name__ = f"{copy.name}_{loss}"
    return fn
