"""Pure-Python shape walk of a `ModelConfig`: parameter count and training FLOPs, no TensorFlow.

The same walk drives `harness sweep --dry-run` (parameter counts in a fraction of a second) and the
scheduler's longest-first ordering; a test checks it against Keras' own `count_params()`.
"""

from __future__ import annotations

import dataclasses

from harness.spec import ModelConfig


@dataclasses.dataclass(frozen=True)
class LayerShape:
    kind: str
    output_shape: tuple[int, ...]
    params: int
    flops: int  # forward FLOPs per example (multiply-add counted as 2)


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    layers: tuple[LayerShape, ...]

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def forward_flops(self) -> int:
        return sum(layer.flops for layer in self.layers)

    def train_flops(self, *, examples: int, epochs: int) -> int:
        """Estimated training FLOPs: forward + backward (about 3x forward) per example per epoch."""
        return 3 * self.forward_flops * examples * epochs


def uses_images(model: ModelConfig) -> bool:
    """Conv models see (H, W, C) images; dense-only models see flat vectors."""
    return bool(model.conv)


def summarize_model(model: ModelConfig, *, input_shape: tuple[int, ...], num_classes: int) -> ModelSummary:
    """Walk the layers `harness.train.build_model` builds and count parameters and FLOPs."""
    layers: list[LayerShape] = []
    if uses_images(model):
        if len(input_shape) == 2:
            input_shape = (*input_shape, 1)
        height, width, channels = input_shape
        for block in model.conv:
            for filters in block.filters:
                k = block.kernel_size
                if block.padding == "valid":
                    height, width = height - k + 1, width - k + 1
                if height <= 0 or width <= 0:
                    raise ValueError(f"conv kernel {k} shrinks the image below 1 pixel")
                params = k * k * channels * filters + filters
                flops = 2 * height * width * k * k * channels * filters
                channels = filters
                layers.append(LayerShape("conv2d", (height, width, channels), params, flops))
                if block.batchnorm:
                    layers.append(LayerShape("batchnorm", (height, width, channels), 4 * channels, 4 * height * width * channels))
            if block.pool != "none":
                p = block.pool_size
                height, width = height // p, width // p
                if height <= 0 or width <= 0:
                    raise ValueError(f"pooling {p} shrinks the image below 1 pixel")
                layers.append(LayerShape(f"{block.pool}_pool", (height, width, channels), 0, height * width * channels * p * p))
        features = height * width * channels if model.head == "flatten" else channels
        layers.append(LayerShape(model.head, (features,), 0, 0))
    else:
        features = 1
        for dim in input_shape:
            features *= dim
    for units in model.dense.units:
        layers.append(LayerShape("dense", (units,), features * units + units, 2 * features * units))
        if model.dense.batchnorm:
            layers.append(LayerShape("batchnorm", (units,), 4 * units, 4 * units))
        features = units
    layers.append(LayerShape("dense", (num_classes,), features * num_classes + num_classes, 2 * features * num_classes))
    return ModelSummary(tuple(layers))
