from __future__ import annotations

import pytest

from harness.architecture import summarize_model
from harness.spec import ModelConfig, load_sweep

from conftest import SWEEPS

# Every vocabulary variant of every shipped sweep (builder models have no layout to check).
SHIPPED = [
    v for path in sorted(SWEEPS.glob("*.yaml")) for v in load_sweep(path).variants if v.model.builder is None
]


def test_seed_notebook_parameter_counts_match_model_summary() -> None:
    spec = load_sweep(SWEEPS / "seed_notebooks.yaml")
    params = {v.name: summarize_model(v.model, input_shape=(28, 28), num_classes=10).params for v in spec.variants}
    # The notebooks' own model.summary() totals.
    assert params["seed001_dnn_25x2"] == 20_535
    assert params["seed001_cnn_12_20"] == 290_585
    assert params["seed002_mlp_256x2_dropout"] == 269_322


def test_flops_scale_with_examples_and_epochs() -> None:
    model = ModelConfig.model_validate({"dense": {"units": [10]}})
    summary = summarize_model(model, input_shape=(28, 28), num_classes=10)
    assert summary.forward_flops == 2 * (784 * 10 + 10 * 10)
    assert summary.train_flops(examples=100, epochs=2) == 3 * summary.forward_flops * 200


def test_kernel_too_large_is_an_error() -> None:
    model = ModelConfig.model_validate({"conv": [{"filters": [4], "kernel_size": 30}]})
    with pytest.raises(ValueError, match="shrinks"):
        summarize_model(model, input_shape=(28, 28), num_classes=10)


@pytest.mark.parametrize("variant", SHIPPED, ids=[v.name for v in SHIPPED])
def test_shape_walk_agrees_with_keras(variant) -> None:
    from harness.models import build_model

    model = build_model(variant.model, input_shape=(28, 28), num_classes=10)
    assert model.count_params() == summarize_model(variant.model, input_shape=(28, 28), num_classes=10).params


def test_batchnorm_momentum_and_epsilon_reach_keras_and_change_no_count() -> None:
    from harness.models import build_model

    config = {
        "conv": [{"filters": [4], "batchnorm": True, "batchnorm_momentum": 0.9, "batchnorm_epsilon": 1e-5}],
        "dense": {"units": [8], "batchnorm": True, "batchnorm_momentum": 0.5},
    }
    model = ModelConfig.model_validate(config)
    default = ModelConfig.model_validate({"conv": [{"filters": [4], "batchnorm": True}], "dense": {"units": [8], "batchnorm": True}})
    norms = [layer for layer in build_model(model, input_shape=(28, 28), num_classes=10).layers
             if type(layer).__name__ == "BatchNormalization"]
    assert [(n.momentum, n.epsilon) for n in norms] == [(0.9, 1e-5), (0.5, 0.001)]
    ours, keras_default = (summarize_model(m, input_shape=(28, 28), num_classes=10) for m in (model, default))
    assert ours.params == keras_default.params and ours.forward_flops == keras_default.forward_flops


def test_fused_model_is_k_independent_copies() -> None:
    import keras
    import numpy as np

    from harness.architecture import model_layout
    from harness.models import build_fused, build_model

    config = load_sweep(SWEEPS / "seed_notebooks.yaml").variants[2].model  # seed001_dnn_25x2
    layout = model_layout(config, input_shape=(28, 28), num_classes=10)
    fused, copies = build_fused(layout, [3, 7], seed_fn=keras.utils.set_random_seed)
    single = summarize_model(config, input_shape=(28, 28), num_classes=10).params
    assert fused.count_params() == 2 * single
    keras.utils.set_random_seed(7)
    alone = build_model(config, input_shape=(28, 28), num_classes=10)
    for mine, theirs in zip(copies[1].get_weights(), alone.get_weights()):
        np.testing.assert_array_equal(mine, theirs)  # copy 1 starts where a single run of seed 7 starts
    assert not np.array_equal(copies[0].get_weights()[0], copies[1].get_weights()[0])


def test_layout_is_the_one_description_the_walk_uses() -> None:
    from harness.architecture import (
        ActivationSpec,
        BatchNormSpec,
        Conv2DSpec,
        DenseSpec,
        DropoutSpec,
        FlattenSpec,
        PoolSpec,
        model_layout,
        summarize_layout,
    )

    model = ModelConfig.model_validate(
        {
            "conv": [{"filters": [4], "kernel_size": 3, "batchnorm": True, "pool": "avg", "dropout": 0.25}],
            "dense": {"units": [8], "dropout": 0.5},
            "regularizer": {"kind": "l2", "factor": 0.01},
        }
    )
    layout = model_layout(model, input_shape=(28, 28), num_classes=10)
    assert layout.input_shape == (28, 28, 1) and layout.images
    assert layout.regularizer == ("l2", 0.01)
    assert layout.layers == (
        Conv2DSpec(4, 3, "valid", None, regularized=True),
        BatchNormSpec(),
        ActivationSpec("relu"),
        PoolSpec("avg", 2),
        DropoutSpec(0.25),
        FlattenSpec(),
        DenseSpec(8, "relu", regularized=True),
        DropoutSpec(0.5),
        DenseSpec(10, "softmax", regularized=True),
    )
    summary = summarize_layout(layout)
    assert [layer.output_shape for layer in summary.layers][:4] == [(26, 26, 4)] * 3 + [(13, 13, 4)]
    assert summary.params == (9 * 4 + 4) + 4 * 4 + (13 * 13 * 4 * 8 + 8) + (8 * 10 + 10)
    assert summary == summarize_model(model, input_shape=(28, 28), num_classes=10)


def test_memory_estimate_counts_weights_slots_and_activations() -> None:
    model = ModelConfig.model_validate({"dense": {"units": [10]}})
    summary = summarize_model(model, input_shape=(28, 28), num_classes=10)
    params = 784 * 10 + 10 + 10 * 10 + 10
    assert summary.activations_per_example == 784 + 10 + 10
    assert summary.train_memory_bytes(batch_size=32) == 4 * (params * 4 + 2 * 32 * (784 + 20))
    assert summary.train_memory_bytes(batch_size=64) > summary.train_memory_bytes(batch_size=32)


def test_builder_model_has_no_layout() -> None:
    from harness.architecture import model_layout

    model = ModelConfig.model_validate({"builder": "pkg.mod:build"})
    with pytest.raises(ValueError, match="builder"):
        model_layout(model, input_shape=(28, 28), num_classes=10)
