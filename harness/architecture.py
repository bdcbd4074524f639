"""The model vocabulary as one description: `ModelConfig` -> `ModelLayout` (a tuple of small frozen
layer specs), consumed by both the Keras builder (`harness.models`, single and fused) and the pure
shape walk here (parameters, FLOPs, a memory estimate), so the two cannot drift apart.

No Keras here: `harness sweep --dry-run`, planning and the scheduler's ordering stay fast; a test
checks the walk against Keras' own `count_params()` for every variant of every shipped sweep.

To add a layer kind: a frozen dataclass with `walk(shape) -> (output_shape, params, flops)`, a case
in `model_layout`, and one in `harness.models.keras_layer`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Union

from harness.spec import BATCHNORM_EPSILON, BATCHNORM_MOMENTUM, ModelConfig

BYTES_PER_FLOAT = 4


@dataclasses.dataclass(frozen=True)
class Conv2DSpec:
    filters: int
    kernel_size: int
    padding: str  # "valid" | "same"
    activation: str | None  # None: linear (batch norm and an Activation follow)
    regularized: bool = False

    def walk(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int, int]:
        height, width, channels = shape
        k = self.kernel_size
        if self.padding == "valid":
            height, width = height - k + 1, width - k + 1
        if height <= 0 or width <= 0:
            raise ValueError(f"conv kernel {k} shrinks the image below 1 pixel")
        params = k * k * channels * self.filters + self.filters
        flops = 2 * height * width * k * k * channels * self.filters
        return (height, width, self.filters), params, flops


@dataclasses.dataclass(frozen=True)
class BatchNormSpec:
    momentum: float = BATCHNORM_MOMENTUM
    epsilon: float = BATCHNORM_EPSILON

    def walk(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int, int]:
        return shape, 4 * shape[-1], 4 * math.prod(shape)


@dataclasses.dataclass(frozen=True)
class ActivationSpec:
    activation: str

    def walk(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int, int]:
        return shape, 0, 0


@dataclasses.dataclass(frozen=True)
class PoolSpec:
    kind: str  # "max" | "avg"
    size: int

    def walk(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int, int]:
        height, width, channels = shape
        p = self.size
        height, width = height // p, width // p
        if height <= 0 or width <= 0:
            raise ValueError(f"pooling {p} shrinks the image below 1 pixel")
        return (height, width, channels), 0, height * width * channels * p * p


@dataclasses.dataclass(frozen=True)
class DropoutSpec:
    rate: float

    def walk(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int, int]:
        return shape, 0, 0


@dataclasses.dataclass(frozen=True)
class FlattenSpec:
    def walk(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int, int]:
        return (math.prod(shape),), 0, 0


@dataclasses.dataclass(frozen=True)
class GlobalAveragePoolSpec:
    def walk(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int, int]:
        return (shape[-1],), 0, 0


@dataclasses.dataclass(frozen=True)
class DenseSpec:
    units: int
    activation: str | None
    regularized: bool = False

    def walk(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int, int]:
        features = shape[-1]
        return (self.units,), features * self.units + self.units, 2 * features * self.units


LayerSpec = Union[
    Conv2DSpec, BatchNormSpec, ActivationSpec, PoolSpec, DropoutSpec, FlattenSpec, GlobalAveragePoolSpec, DenseSpec
]

# Names in the shape walk (and `--dry-run`), as before the layout existed.
_KIND = {
    Conv2DSpec: "conv2d",
    BatchNormSpec: "batchnorm",
    ActivationSpec: "activation",
    DropoutSpec: "dropout",
    FlattenSpec: "flatten",
    GlobalAveragePoolSpec: "global_average",
    DenseSpec: "dense",
}


def layer_kind(spec: LayerSpec) -> str:
    if isinstance(spec, PoolSpec):
        return f"{spec.kind}_pool"
    return _KIND[type(spec)]


@dataclasses.dataclass(frozen=True)
class ModelLayout:
    """What a vocabulary model is, layer by layer: the input it is fed, its layers, its weight
    regularizer (applied to every kernel marked `regularized`)."""

    input_shape: tuple[int, ...]
    layers: tuple[LayerSpec, ...]
    regularizer: tuple[str, float] | None = None  # ("l1" | "l2", factor)
    images: bool = False  # fed (H, W, C) images rather than flat vectors


@dataclasses.dataclass(frozen=True)
class LayerShape:
    kind: str
    output_shape: tuple[int, ...]
    params: int
    flops: int  # forward FLOPs per example (multiply-add counted as 2)


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    layers: tuple[LayerShape, ...]
    input_shape: tuple[int, ...] = ()

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def forward_flops(self) -> int:
        return sum(layer.flops for layer in self.layers)

    @property
    def activations_per_example(self) -> int:
        """Floats per example held for the backward pass: the input and every layer's output."""
        return math.prod(self.input_shape) + sum(math.prod(layer.output_shape) for layer in self.layers)

    def train_flops(self, *, examples: int, epochs: int) -> int:
        """Estimated training FLOPs: forward + backward (about 3x forward) per example per epoch."""
        return 3 * self.forward_flops * examples * epochs

    def train_memory_bytes(self, *, batch_size: int, optimizer_slots: int = 2) -> int:
        """Estimated device memory of one copy in training: weights, gradients and optimizer
        slots (Adam: 2), plus the batch's activations and their gradients. A lower bound: the
        backend's workspace and the data set are not in it."""
        weights = self.params * (2 + optimizer_slots)
        activations = 2 * batch_size * self.activations_per_example
        return BYTES_PER_FLOAT * (weights + activations)


def uses_images(model: ModelConfig) -> bool:
    """Conv models see (H, W, C) images; dense-only models see flat vectors."""
    return bool(model.conv)


def model_layout(model: ModelConfig, *, input_shape: tuple[int, ...], num_classes: int) -> ModelLayout:
    """The one description of a vocabulary model's layers (what `harness.models` builds and
    `summarize_layout` walks)."""
    if model.builder is not None:
        raise ValueError("a builder model has no layout: its layers are the user's code")
    images = uses_images(model)
    if images:
        shape = (*input_shape, 1) if len(input_shape) == 2 else tuple(input_shape)
    else:
        shape = (math.prod(input_shape),)
    regularized = model.regularizer is not None
    layers: list[LayerSpec] = []

    def batchnorm(section: Any) -> BatchNormSpec:
        return BatchNormSpec(momentum=section.batchnorm_momentum, epsilon=section.batchnorm_epsilon)

    for block in model.conv:
        for filters in block.filters:
            layers.append(
                Conv2DSpec(
                    filters=filters,
                    kernel_size=block.kernel_size,
                    padding=block.padding,
                    activation=None if block.batchnorm else block.activation,
                    regularized=regularized,
                )
            )
            if block.batchnorm:
                layers += [batchnorm(block), ActivationSpec(block.activation)]
        if block.pool in ("max", "avg"):
            layers.append(PoolSpec(block.pool, block.pool_size))
        if block.dropout > 0:
            layers.append(DropoutSpec(block.dropout))
    if images:
        layers.append(FlattenSpec() if model.head == "flatten" else GlobalAveragePoolSpec())
    dense = model.dense
    for units, rate in zip(dense.units, dense.dropout_rates()):
        layers.append(DenseSpec(units, None if dense.batchnorm else dense.activation, regularized=regularized))
        if dense.batchnorm:
            layers += [batchnorm(dense), ActivationSpec(dense.activation)]
        if rate > 0:
            layers.append(DropoutSpec(rate))
    layers.append(DenseSpec(num_classes, model.output_activation, regularized=regularized))
    regularizer = (model.regularizer.kind, model.regularizer.factor) if model.regularizer is not None else None
    return ModelLayout(input_shape=shape, layers=tuple(layers), regularizer=regularizer, images=images)


def summarize_layout(layout: ModelLayout) -> ModelSummary:
    """Walk a layout's shapes: output shape, parameters and forward FLOPs of every layer."""
    shape = layout.input_shape
    walked = []
    for spec in layout.layers:
        shape, params, flops = spec.walk(shape)
        walked.append(LayerShape(layer_kind(spec), shape, params, flops))
    return ModelSummary(tuple(walked), input_shape=layout.input_shape)


def summarize_model(model: ModelConfig, *, input_shape: tuple[int, ...], num_classes: int) -> ModelSummary:
    """Parameters and FLOPs of the model `harness.models.build_model` builds (the same layout)."""
    return summarize_layout(model_layout(model, input_shape=input_shape, num_classes=num_classes))
