"""Fusion width: forced, off, auto from the device and the model's memory estimate (no Keras)."""

from __future__ import annotations

from pathlib import Path

from harness.fusion import CPU_AUTO_WIDTH, GPU_MAX_WIDTH, copy_memory_bytes, fuse_width, shared_memory_bytes
from harness.spec import load_sweep
from harness.sweep import prepare_sweep

from conftest import tiny_sweep_text, write_sweep


def _runs(tmp_path: Path, data_dir: Path):
    spec = load_sweep(write_sweep(tmp_path / "s.yaml", tiny_sweep_text(seeds=3, train=1000, test=100)))
    return [r for r in prepare_sweep(spec, data_dir=data_dir).runs if r.variant.name == "cnn_8"]


def test_forced_off_and_auto(tmp_path: Path, data_dir: Path) -> None:
    runs = _runs(tmp_path, data_dir)
    assert fuse_width(4, runs) == 4 and fuse_width(1, runs) == 1
    assert fuse_width(None, runs) == CPU_AUTO_WIDTH
    assert fuse_width(None, runs, device_kind="gpu") == GPU_MAX_WIDTH


def test_memory_limits_the_auto_width(tmp_path: Path, data_dir: Path) -> None:
    runs = _runs(tmp_path, data_dir)
    per_copy, shared = copy_memory_bytes(runs[0]), shared_memory_bytes(runs[0])
    # the inputs (900 training images of 28x28x1 floats) are held once for the whole group;
    # each copy adds its weights, optimizer state, activations and permuted one-hot targets
    assert shared == 4 * 900 * 784
    assert per_copy > 4 * runs[0].summary.params + 4 * 900 * 10
    assert fuse_width(None, runs, device_kind="gpu", memory_bytes=shared + 3 * per_copy + 1) == 3
    assert fuse_width(None, runs, device_kind="gpu", memory_bytes=3 * per_copy + 1) == 2  # the inputs count once
    assert fuse_width(None, runs, memory_bytes=per_copy // 2) == 1  # never 0


def test_inputs_too_large_for_the_device_count_per_copy(tmp_path: Path, data_dir: Path, monkeypatch) -> None:
    import harness.fused

    runs = _runs(tmp_path, data_dir)
    on_device = copy_memory_bytes(runs[0])
    monkeypatch.setattr(harness.fused, "DEVICE_INPUTS_MAX_BYTES", 1000)
    assert shared_memory_bytes(runs[0]) == 0
    assert copy_memory_bytes(runs[0]) == on_device + 4 * 900 * 784  # each copy's own permuted inputs


def test_a_gpu_workers_share_decides_where_its_inputs_live(tmp_path: Path, data_dir: Path) -> None:
    """On a GPU worker the inputs are held on the device only if they take at most half its share
    of the device (`fused.DEVICE_INPUTS_SHARE`), the rule the worker applies to the figure it is
    told: several workers per GPU each hold their own copy of the inputs."""
    from harness.fused import DEVICE_INPUTS_MAX_BYTES, device_inputs_limit
    from harness.fusion import input_bytes, inputs_on_device

    run = _runs(tmp_path, data_dir)[0]
    inputs = input_bytes(run)
    assert inputs == 4 * 900 * 784
    assert device_inputs_limit(None) == DEVICE_INPUTS_MAX_BYTES and device_inputs_limit(2**40) == DEVICE_INPUTS_MAX_BYTES
    assert inputs_on_device(run) and inputs_on_device(run, 2 * inputs)
    assert not inputs_on_device(run, 2 * inputs - 2)
    assert shared_memory_bytes(run, 2 * inputs - 2) == 0
    assert copy_memory_bytes(run, 2 * inputs - 2) == copy_memory_bytes(run) + inputs
    # the width: inputs fed from the host count per copy (a GPU share too small to hold them twice)
    small = 2 * inputs - 2
    assert fuse_width(None, [run], device_kind="gpu", memory_bytes=small) == max(1, small // copy_memory_bytes(run, small))
    # a CPU worker is told nothing: the memory figure sizes the width but never moves its inputs
    assert fuse_width(None, [run], memory_bytes=small) == max(1, (small - inputs) // copy_memory_bytes(run))


def test_tensorflow_copies_count_the_flat_update(tmp_path: Path, data_dir: Path) -> None:
    """On TensorFlow each copy also holds the flat optimizer update's three copies of its
    parameters (`harness.tf_update`); JAX has no such update."""
    import dataclasses

    from harness.backends import BackendChoice

    run = _runs(tmp_path, data_dir)[0]
    tensorflow = dataclasses.replace(run, backend=BackendChoice("tensorflow", "2", "tensorflow"))
    jax = dataclasses.replace(run, backend=BackendChoice("jax", "0.1", "jax"))
    assert copy_memory_bytes(tensorflow) - copy_memory_bytes(jax) == 3 * 4 * run.summary.params
    # an optimizer it does not flatten keeps Keras' own update: nothing more than on JAX
    from harness.spec import Optimizer

    for name in ("sgd", "rmsprop"):
        model = run.variant.model.model_copy(update={"optimizer": Optimizer(name=name)})
        other = dataclasses.replace(tensorflow, variant=dataclasses.replace(run.variant, model=model))
        on_jax = dataclasses.replace(other, backend=jax.backend)
        assert copy_memory_bytes(other) == copy_memory_bytes(on_jax), name


def test_builder_models_fuse_only_when_forced(tmp_path: Path, data_dir: Path) -> None:
    """Whether a builder's model can fuse, and its memory, are known only when a worker builds it:
    auto keeps its seeds on separate workers; `--fuse K` groups them."""
    import dataclasses

    from harness.architecture import ModelSummary
    from harness.spec import ModelConfig

    run = _runs(tmp_path, data_dir)[0]
    builder = dataclasses.replace(
        run,
        variant=dataclasses.replace(run.variant, model=ModelConfig.model_validate({"builder": "pkg.mod:build"})),
        summary=ModelSummary(()),
    )
    assert fuse_width(None, [builder]) == 1 and fuse_width(None, [builder], device_kind="gpu") == 1
    assert fuse_width(8, [builder], device_kind="gpu") == 8 and fuse_width(1, [builder]) == 1
