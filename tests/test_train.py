"""Real TensorFlow training on small real MNIST subsets."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import train
from harness.health import Cause, Health
from harness.records import RunFlag, RunStatus
from harness.spec import load_sweep
from harness.sweep import prepare_sweep

from conftest import tiny_sweep_text, write_sweep


def prepared_for(tmp_path: Path, data_dir: Path, text: str | None = None):
    spec = load_sweep(write_sweep(tmp_path / "s.yaml", text or tiny_sweep_text(seeds=2)))
    return prepare_sweep(spec, data_dir=data_dir)


def test_real_run_records_everything(tmp_path: Path, data_dir: Path) -> None:
    prepared = prepared_for(tmp_path, data_dir)
    run = prepared.runs[2]  # cnn_8, seed 0
    record = train.train_run(run, prepared.dataset)
    assert record.status is RunStatus.DONE, record.error
    assert record.run_id == run.run_id and record.variant == "cnn_8" and record.seed == 0
    assert 0.5 < record.test_accuracy <= 1.0
    assert record.metrics["params"] == run.summary.params
    assert record.metrics["estimated_train_flops"] > 0 and record.metrics["examples_per_s"] > 0
    assert set(record.history) >= {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert len(record.history["loss"]) == 1
    assert record.timings["train_s"] > 0 and record.timings["wall_s"] >= record.timings["train_s"]
    assert record.versions["tensorflow"] and record.versions["keras"].startswith("3")
    assert record.device.startswith("cpu") or "GPU" in record.device
    assert record.dataset["fingerprint"] == prepared.dataset.fingerprint and record.dataset["n_train"] == 2000
    assert record.budget == {"epochs": 1, "batch_size": 64, "validation_split": 0.1, "deterministic": False}


def test_same_seed_same_result_other_seed_differs(tmp_path: Path, data_dir: Path) -> None:
    text = tiny_sweep_text(seeds=2).replace("validation_split: 0.1", "validation_split: 0.1\n  deterministic: true")
    prepared = prepared_for(tmp_path, data_dir, text)
    seed0, seed1 = prepared.runs[0], prepared.runs[1]
    first = train.train_run(seed0, prepared.dataset)
    again = train.train_run(seed0, prepared.dataset)
    other = train.train_run(seed1, prepared.dataset)
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


def test_nan_loss_is_diverged_and_chance_accuracy_is_flagged(tmp_path: Path, data_dir: Path) -> None:
    prepared = prepared_for(tmp_path, data_dir, DIVERGING)
    diverged = train.train_run(prepared.runs[0], prepared.dataset)
    assert diverged.status is RunStatus.DIVERGED
    assert "NaN" in diverged.error
    assert diverged.diagnosis is not None and diverged.diagnosis.health is Health.DIVERGED
    assert Cause.RAW_INPUTS in diverged.diagnosis.causes and Cause.LEARNING_RATE in diverged.diagnosis.causes
    frozen = train.train_run(prepared.runs[1], prepared.dataset)
    assert frozen.status is RunStatus.DONE
    assert RunFlag.NEAR_CHANCE in frozen.flags and frozen.test_accuracy < 0.15
    assert frozen.diagnosis is not None and frozen.diagnosis.health is Health.COLLAPSED


def test_exception_becomes_failed_record(tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prepared = prepared_for(tmp_path, data_dir)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory while building")

    monkeypatch.setattr(train, "build_model", broken)
    record = train.train_run(prepared.runs[0], prepared.dataset)
    assert record.status is RunStatus.FAILED
    assert "RuntimeError: out of memory while building" in record.error and "Traceback" in record.error
    assert record.metrics == {} and record.finished_at
