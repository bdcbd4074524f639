"""Keras models from the one layer description (`harness.architecture.ModelLayout`): one copy, or
K independent copies fused into one program (`build_fused`) so that K seeds train in one step.

Imports Keras inside its functions only (the parent process of a sweep never imports it).
"""

from __future__ import annotations

import math
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


def penalized_weights(copy: Any, layout: ModelLayout | None) -> list[tuple[Any, Any]]:
    """(weight, regularizer) of each penalized weight of a copy: the layout's regularizer on its
    regularized kernels (a vocabulary copy, built without layer regularizers), or each weight's
    own regularizer (a builder's copy, `layout` None)."""
    if layout is None:
        return [(v, v.regularizer) for v in copy.trainable_weights if getattr(v, "regularizer", None) is not None]
    regularizer = _regularizer(layout)
    return [
        (layer.kernel, regularizer)
        for spec, layer in zip(layout.layers, copy.layers, strict=True)
        if isinstance(spec, (Conv2DSpec, DenseSpec)) and spec.regularized and regularizer is not None
    ]


def copy_loss(loss: str, copy: Any, layout: ModelLayout) -> Callable[[Any, Any], Any]:
    """Copy `copy`'s loss: the variant's loss plus the penalty of the copy's own regularized
    kernels (what a single model's total loss is; its gradients reach only this copy)."""
    import keras

    base = keras.losses.get(loss)
    penalized = penalized_weights(copy, layout)

    def fn(y_true: Any, y_pred: Any) -> Any:
        value = base(y_true, y_pred)
        for kernel, regularizer in penalized:
            value = value + regularizer(kernel)
        return value

    fn.__name__ = f"{copy.name}_{loss}"
    return fn


def fuse_models(models: Sequence[Any], *, input_shape: tuple[int, ...]):
    """K independent Keras models (a builder's, each built right after its own seed) in one
    functional model, as `build_fused` does for the vocabulary: input k feeds copy k, output k is
    named `copy_name(k)`. Each model is wrapped in a model of that name, so copies of a builder
    that names its own layers or model do not clash. One input to one output only
    (`harness.fused.builder_trains_alone`)."""
    import keras

    copies = []
    for index, model in enumerate(models):
        x = keras.Input(shape=input_shape)
        # one output, even if the model nests it (`[out]`, `{"probs": out}`)
        copies.append(keras.Model(x, keras.tree.flatten(model(x))[0], name=copy_name(index)))
    inputs = [keras.Input(shape=input_shape, name=f"x{index}") for index in range(len(models))]
    outputs = [copy(x) for copy, x in zip(copies, inputs)]
    return keras.Model(inputs, outputs, name=f"fused_{len(models)}"), copies


def row_input_name(index: int) -> str:
    """The name of fused copy `index`'s index input in a model fed by row number (`fed_by_rows`)."""
    return f"rows{index}"


def fed_by_rows(copies: Sequence[Any], data: Any):
    """The training model of a group whose inputs stay on the device: `data` (the scaled training
    inputs, N x ...) is held once, as a non-trainable Keras variable (on the backend's device),
    and copy k is fed the rows whose numbers arrive on int32 input k (`row_input_name(k)`; its
    epoch's order, batch by batch). The same batches as feeding `data[order]`, with neither a
    copy of the data per copy and epoch on the host nor its transfer to the device. Output k is
    copy k's prediction, named like the copy (`copy_name(k)`), as in `build_fused`."""
    import keras
    from keras import ops

    class Rows(keras.layers.Layer):
        """Rows of a fixed array by row number; no weight to train."""

        def __init__(self, array: Any, **kwargs: Any) -> None:
            # its own dtype: under a mixed-precision policy (a builder may set one) Keras would
            # cast the whole array to the compute dtype at every step, not the rows taken
            super().__init__(trainable=False, dtype=str(array.dtype), **kwargs)
            self.rows = keras.Variable(array, trainable=False, name="rows", dtype=str(array.dtype))

        def call(self, index: Any) -> Any:
            return ops.take(self.rows, index, axis=0)

        def compute_output_shape(self, shape: Any) -> tuple:
            return tuple(shape) + tuple(self.rows.shape[1:])

    rows = Rows(data, name="inputs_on_device")
    inputs = [keras.Input(shape=(), dtype="int32", name=row_input_name(index)) for index in range(len(copies))]
    outputs = [copy(rows(index)) for copy, index in zip(copies, inputs)]
    return keras.Model(inputs, outputs, name=f"fused_{len(copies)}_by_rows")


def data_loss(loss: str, name: str) -> Callable[[Any, Any], Any]:
    """The variant's loss alone, named for one copy: what a builder's copy is compiled with (Keras
    adds its layers' penalties to the total itself, each penalty's gradient reaching only its own
    copy), and what every copy's logged loss metric averages per example (`fused.LOSS_METRIC`)."""
    import keras

    base = keras.losses.get(loss)

    def fn(y_true: Any, y_pred: Any) -> Any:
        return base(y_true, y_pred)

    fn.__name__ = f"{name}_{loss}_data"
    return fn


def copy_penalty(copy: Any, layout: ModelLayout | None) -> Callable[[], float]:
    """The weight penalty of a copy as its weights stand now (read between epochs, outside any
    train step): the layout's regularizer on its regularized kernels (a vocabulary copy), or each
    weight's own regularizer (a builder's copy). The logged loss of a copy is its per-example data
    loss plus this; a metric cannot read weights inside JAX's stateless train and test steps.
    NaN when any of its weights is not finite: a NaN weight does not always show in the data loss
    (TensorFlow's relu turns NaN into 0), and a model with NaN weights has diverged."""
    pairs = penalized_weights(copy, layout)

    def penalty() -> float:
        import numpy as np

        if not all(np.isfinite(np.asarray(w)).all() for w in copy.get_weights()):
            return math.nan
        return float(sum(float(regularizer(variable)) for variable, regularizer in pairs))

    return penalty
