from __future__ import annotations

import pytest

from harness.architecture import summarize_model
from harness.spec import ModelConfig, load_sweep

from conftest import SWEEPS

SHIPPED = [v for name in ("seed_notebooks", "conv_table", "quickstart") for v in load_sweep(SWEEPS / f"{name}.yaml").variants]


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
    from harness.train import build_model

    model = build_model(variant.model, input_shape=(28, 28), num_classes=10)
    assert model.count_params() == summarize_model(variant.model, input_shape=(28, 28), num_classes=10).params


def test_batchnorm_momentum_and_epsilon_reach_keras_and_change_no_count() -> None:
    from harness.train import build_model

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
