"""Real training on small real MNIST subsets, under every installed Keras backend (each in a real
process of its own: KERAS_BACKEND is read once, when Keras is imported)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import train
from harness.health import Cause, Health
from harness.records import RunFlag, RunStatus
from harness.spec import load_sweep
from harness.sweep import prepare_sweep

from conftest import backend_params, tiny_sweep_text, write_sweep


def prepared_for(tmp_path: Path, data_dir: Path, text: str | None = None, *, backend: str = "tensorflow"):
    spec = load_sweep(write_sweep(tmp_path / "s.yaml", text or tiny_sweep_text(seeds=2)))
    return prepare_sweep(spec.with_overrides(keras_backend=backend), data_dir=data_dir)


@pytest.mark.parametrize("backend", backend_params())
def test_real_run_records_everything(backend: str, tmp_path: Path, data_dir: Path, train_on) -> None:
    prepared = prepared_for(tmp_path, data_dir, backend=backend)
    run = prepared.runs[2]  # cnn_8, seed 0
    record = train_on(backend, run, prepared)
    assert record.status is RunStatus.DONE, record.error
    assert record.run_id == run.run_id and record.variant == "cnn_8" and record.seed == 0
    # it learned (chance: 0.1); PyTorch's seed 0 draws other initial weights and ends at 0.43
    assert (0.3 if backend == "torch" else 0.5) < record.test_accuracy <= 1.0
    assert record.metrics["params"] == run.summary.params
    assert record.metrics["estimated_train_flops"] > 0 and record.metrics["examples_per_s"] > 0
    assert set(record.history) >= {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert len(record.history["loss"]) == 1
    assert record.timings["train_s"] > 0 and record.timings["wall_s"] >= record.timings["train_s"]
    assert record.versions["keras_backend"] == backend and record.versions[backend] == run.backend.version
    assert record.versions["keras"].startswith("3")
    assert record.device.startswith("cpu") or "GPU" in record.device
    assert record.dataset["fingerprint"] == prepared.dataset.fingerprint and record.dataset["n_train"] == 2000
    assert record.budget == {
        "epochs": 1, "batch_size": 64, "validation_split": 0.1, "deterministic": False, "keras_backend": backend
    }
    # 1800 examples, batches of 64: one execution an epoch (Keras' PyTorch trainer takes only 1)
    assert record.metrics["steps_per_execution"] == (1 if backend == "torch" else 29)


@pytest.mark.parametrize("backend", backend_params())
def test_same_seed_same_result_other_seed_differs(backend: str, tmp_path: Path, data_dir: Path, train_on) -> None:
    """Initialisation and data order are a pure function of the seed (determinism on, CPU)."""
    text = tiny_sweep_text(seeds=2).replace("validation_split: 0.1", "validation_split: 0.1\n  deterministic: true")
    prepared = prepared_for(tmp_path, data_dir, text, backend=backend)
    seed0, seed1 = prepared.runs[0], prepared.runs[1]
    first = train_on(backend, seed0, prepared)
    again = train_on(backend, seed0, prepared)
    other = train_on(backend, seed1, prepared)
    assert first.status is RunStatus.DONE, first.error
    assert first.history == again.history and first.test_accuracy == again.test_accuracy
    assert other.history["loss"] != first.history["loss"]


DIVERGING = """
schema_version: 1
name: wild
dataset: mnist
subset: {train: 1000, test: 200}
budget: {epochs: 2, batch_size: 32, seeds: 1}
variants:
  - name: huge_lr
    model:
      preprocess: none
      dense: {units: [64]}
      optimizer: {name: sgd, learning_rate: 1.0e+30}
  - name: frozen            # a one-unit bottleneck that cannot learn: predicts ~one class
    model:
      dense: {units: [1]}
      optimizer: {name: sgd, learning_rate: 1.0e-9}
"""


@pytest.mark.parametrize("backend", backend_params())
def test_nan_loss_is_diverged_and_chance_accuracy_is_flagged(backend: str, tmp_path: Path, data_dir: Path, train_on) -> None:
    prepared = prepared_for(tmp_path, data_dir, DIVERGING, backend=backend)
    diverged = train_on(backend, prepared.runs[0], prepared)
    assert diverged.status is RunStatus.DIVERGED, diverged.error
    assert "NaN" in diverged.error
    assert diverged.diagnosis is not None and diverged.diagnosis.health is Health.DIVERGED
    assert Cause.RAW_INPUTS in diverged.diagnosis.causes and Cause.LEARNING_RATE in diverged.diagnosis.causes
    frozen = train_on(backend, prepared.runs[1], prepared)
    assert frozen.status is RunStatus.DONE
    assert RunFlag.NEAR_CHANCE in frozen.flags and frozen.test_accuracy < 0.15
    assert frozen.diagnosis is not None and frozen.diagnosis.health is Health.COLLAPSED


def test_exception_becomes_failed_record(tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prepared = prepared_for(tmp_path, data_dir)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory while building")

    import harness.models

    monkeypatch.setattr(harness.models, "build_fused", broken)
    record = train.train_run(prepared.runs[0], prepared.dataset)
    assert record.status is RunStatus.FAILED
    assert "RuntimeError: out of memory while building" in record.error and "Traceback" in record.error
    assert record.metrics == {} and record.finished_at


def test_a_run_never_trains_on_another_backend(tmp_path: Path, data_dir: Path, train_on) -> None:
    """A run planned for JAX sent to a TensorFlow process is a FAILED record saying why."""
    from harness.backends import backend_version

    if backend_version("jax") is None:
        pytest.skip('jax not installed (pip install -e ".[jax]")')
    prepared = prepared_for(tmp_path, data_dir, backend="jax")
    record = train_on("tensorflow", prepared.runs[0], prepared)
    assert record.status is RunStatus.FAILED
    assert "planned for Keras backend 'jax' but this process runs Keras on 'tensorflow'" in record.error


def test_fit_options_cut_round_trips_without_changing_batches() -> None:
    def spe(backend: str = "tensorflow", **kwargs: int) -> int:
        return train.fit_options(backend=backend, **kwargs).steps_per_execution

    for backend in ("tensorflow", "jax"):
        assert spe(backend, batch_size=32, n_fit=54000) == 64
        assert spe(backend, batch_size=128, n_fit=54000) == 16
        assert spe(backend, batch_size=4096, n_fit=54000) == 1
        assert spe(backend, batch_size=64, n_fit=640) == 10  # never more than an epoch
    # JAX unrolls an execution's steps into one program: compute-bound steps are not batched there,
    # MLP 256-256 (~1.6 MFLOP per example) and a CNN (~65 MFLOP)
    assert spe("jax", batch_size=128, n_fit=54000, train_flops_per_example=1_600_000) == 5
    assert spe("jax", batch_size=128, n_fit=54000, train_flops_per_example=65_000_000) == 1
    # TensorFlow runs them in a loop: the same round trips as any step
    assert spe("tensorflow", batch_size=128, n_fit=54000, train_flops_per_example=65_000_000) == 16
    assert spe("torch", batch_size=32, n_fit=54000) == 1  # Keras' PyTorch trainer takes no other
    with pytest.raises(ValueError, match="no Keras backend 'auto'"):  # resolved when planned, never here
        spe("auto", batch_size=32, n_fit=54000)
    options = train.fit_options(backend="tensorflow", batch_size=32, n_fit=100)
    assert options.eval_batch_size == train.EVAL_BATCH_SIZE
    assert train.fit_options(backend="tensorflow", batch_size=4096, n_fit=100).eval_batch_size == 4096
    even = train.fit_options(backend="tensorflow", batch_size=32, n_fit=54000, n_val=6000, n_test=10000)
    assert (even.validation_batch_size, even.test_batch_size) == (2000, 2000)  # one batch shape each
    assert train.fit_options(backend="jax", batch_size=32, n_fit=100, n_val=0, n_test=500).test_batch_size == 500
