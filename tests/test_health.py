"""Run health: diverged vs collapsed vs train/eval mismatch, the pure rules and real training."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path


from harness import train
from harness.health import (
    Cause,
    Health,
    ModelTraits,
    diagnose,
    diagnose_record,
    health_of,
    model_traits,
    record_steps,
    suggested_momentum,
)
from harness.records import RunRecord, RunStatus
from harness.report import load_results, render_leaderboard
from harness.spec import load_sweep
from harness.store import SQLiteStore
from harness.sweep import prepare_sweep

from conftest import write_sweep

BN = ModelTraits(batchnorm=True, dropout=True)
PLAIN = ModelTraits()


def judge(train_acc: list[float], test: float, *, traits: ModelTraits = PLAIN, loss: list[float] | None = None,
          steps: int | None = None, diverged: bool = False):
    history = {"accuracy": train_acc, "loss": loss or [1.0] * len(train_acc)}
    return diagnose(history=history, test_accuracy=test, test_loss=0.5, num_classes=10, traits=traits,
                    steps=steps, diverged=diverged)


# --------------------------------------------------------------------------- pure rules


def test_a_learnt_model_is_healthy() -> None:
    assert judge([0.9, 0.98], 0.97).health is Health.HEALTHY
    # overfitting a small set (train 100%, test 70%) is not a mismatch
    assert judge([1.0], 0.70).health is Health.HEALTHY
    # dropout makes training accuracy lower than test accuracy: healthy
    assert judge([0.6], 0.9, traits=BN).health is Health.HEALTHY


def test_high_training_accuracy_with_test_at_chance_is_a_mismatch_not_a_collapse() -> None:
    d = judge([0.62, 0.91], 0.1135, traits=BN, steps=140)
    assert d.health is Health.TRAIN_EVAL_MISMATCH
    assert d.causes == (Cause.BATCHNORM_STATISTICS, Cause.DROPOUT_OR_REGULARIZATION)
    assert "not a collapse" in d.evidence and "91.0%" in d.evidence and "11.3%" in d.evidence
    assert "140 steps at batch-norm momentum 0.99 leave 24%" in d.evidence
    assert "at least 459 steps" in d.advice and "batchnorm_momentum (<= 0.96" in d.advice
    assert d.train_accuracy == 0.91 and d.eval_accuracy == 0.1135 and d.chance == 0.1 and d.steps == 140


def test_a_partial_mismatch_is_named_too() -> None:
    # far above chance but less than half as far above it as training
    assert judge([0.82], 0.31, traits=BN).health is Health.TRAIN_EVAL_MISMATCH
    assert judge([0.82], 0.50, traits=BN).health is Health.HEALTHY
    # training barely learnt (35%) while evaluation is at chance: still inference that differs
    assert judge([0.35], 0.10, traits=BN).health is Health.TRAIN_EVAL_MISMATCH


def test_the_cause_follows_the_model() -> None:
    no_bn = judge([0.9], 0.1)
    assert no_bn.health is Health.TRAIN_EVAL_MISMATCH and no_bn.causes == (Cause.OVERFITTING_OR_DATA_SHIFT,)
    assert "batchnorm" not in no_bn.advice
    low_momentum = judge([0.9], 0.1, traits=ModelTraits(batchnorm=True, batchnorm_momentum=0.9), steps=100)
    assert "0.9 leave 0%" in low_momentum.evidence and "lower batchnorm_momentum" not in low_momentum.advice
    builder = judge([0.9], 0.1, traits=ModelTraits(batchnorm=None, dropout=None, regularizer=None))
    assert Cause.BATCHNORM_STATISTICS in builder.causes and "if the model has batch normalization" in builder.advice


def test_training_accuracy_at_chance_is_a_collapse() -> None:
    d = judge([0.101, 0.099], 0.098)
    assert d.health is Health.COLLAPSED and d.causes == (Cause.UNKNOWN,)
    assert "both near chance" in d.evidence
    wild = judge([0.1], 0.11, traits=ModelTraits(optimizer="adam", learning_rate=1.0, preprocess="none",
                                                  output_activation="sigmoid"))
    assert wild.causes == (Cause.LEARNING_RATE, Cause.RAW_INPUTS, Cause.SIGMOID_OUTPUT)
    fell = judge([0.9, 0.1], 0.1)
    assert fell.health is Health.COLLAPSED and "reached 90.0% before falling back" in fell.evidence
    # a test accuracy above chance with training at chance is still a training that failed
    assert judge([0.12], 0.4).health is Health.COLLAPSED


def test_a_nan_loss_is_diverged_whatever_the_accuracy() -> None:
    d = judge([0.5, 0.1], 0.1, loss=[1.0, math.nan])
    assert d.health is Health.DIVERGED and "epoch 2" in d.evidence
    assert judge([0.9], 0.9, diverged=True).health is Health.DIVERGED
    inf_test = diagnose(history={"accuracy": [0.9], "loss": [0.3]}, test_accuracy=0.9, test_loss=math.inf,
                        num_classes=10, traits=PLAIN)
    assert inf_test.health is Health.DIVERGED


def test_no_training_accuracy_cannot_tell_collapse_from_mismatch() -> None:
    d = diagnose(history={"loss": [0.3]}, test_accuracy=0.1, test_loss=0.3, num_classes=10, traits=PLAIN)
    assert d.health is Health.COLLAPSED and d.causes == (Cause.UNKNOWN,) and "no training accuracy" in d.evidence
    healthy = diagnose(history={}, test_accuracy=0.9, test_loss=0.3, num_classes=10, traits=PLAIN)
    assert healthy.health is Health.HEALTHY


def test_chance_follows_the_number_of_classes() -> None:
    # 40% is far above chance for 10 classes, at chance (1.5x 25%) for 4
    h10 = diagnose(history={"accuracy": [0.4]}, test_accuracy=0.4, test_loss=1.0, num_classes=10, traits=PLAIN)
    h4 = diagnose(history={"accuracy": [0.3]}, test_accuracy=0.3, test_loss=1.0, num_classes=4, traits=PLAIN)
    assert h10.health is Health.HEALTHY and h4.health is Health.COLLAPSED


def test_suggested_momentum() -> None:
    assert suggested_momentum(140) == 0.96
    assert suggested_momentum(459) == 0.99  # 0.99**459 is just under 1%
    assert suggested_momentum(10) == 0.63
    assert 0.99**140 > 0.01 > 0.96**140


def test_model_traits_from_stored_configs() -> None:
    plain = model_traits({"dense": {"units": [8]}})
    assert plain.batchnorm is False and plain.dropout is False and plain.optimizer == "adam"
    conv = model_traits(
        {
            "conv": [{"filters": [8], "batchnorm": True, "batchnorm_momentum": 0.9, "dropout": 0.25}],
            "dense": {"units": [16, 16], "dropout": [0.0, 0.5], "batchnorm": True},
            "optimizer": {"name": "sgd", "learning_rate": 0.01},
            "regularizer": {"kind": "l2", "factor": 0.001},
        }
    )
    assert conv.batchnorm and conv.batchnorm_momentum == 0.99 and conv.dropout and conv.regularizer
    assert conv.learning_rate == 0.01 and conv.optimizer == "sgd"
    builder = model_traits({"builder": "pkg.mod:build", "args": {}})
    assert builder.batchnorm is None and builder.dropout is None


# --------------------------------------------------------------------------- records and report


def mismatched_record(**changes) -> RunRecord:
    record = RunRecord(
        run_id="bn-0", sweep="s", variant="bn", variant_id="bn", seed=0, status=RunStatus.DONE,
        config={"conv": [{"filters": [8], "batchnorm": True}], "dense": {"units": [16], "dropout": 0.5}},
        budget={"epochs": 2, "batch_size": 128, "validation_split": 0.1},
        dataset={"n_train": 10000, "num_classes": 10},
        metrics={"test_accuracy": 0.1135, "test_loss": 2.5, "epochs_ran": 2, "params": 100},
        history={"accuracy": [0.6, 0.9], "loss": [1.2, 0.4], "val_accuracy": [0.107, 0.107]},
        timings={"train_s": 1.0},
    )
    return dataclasses.replace(record, **changes)


def test_steps_come_from_the_budget_and_the_data() -> None:
    assert record_steps(mismatched_record()) == 2 * math.ceil(9000 / 128)  # 142
    assert record_steps(mismatched_record(dataset={})) is None


def test_the_diagnosis_survives_the_store_and_old_records_are_diagnosed_on_reading() -> None:
    record = mismatched_record()
    stored = dataclasses.replace(record, diagnosis=diagnose_record(record))
    again = RunRecord.from_json(stored.to_json())
    assert again.diagnosis == stored.diagnosis and again.diagnosis.health is Health.TRAIN_EVAL_MISMATCH
    old = json.loads(record.to_json())
    del old["diagnosis"]  # a record stored before diagnoses existed
    read = RunRecord.from_json(json.dumps(old))
    assert read.diagnosis is None and health_of(read).health is Health.TRAIN_EVAL_MISMATCH
    failed = mismatched_record(status=RunStatus.FAILED, metrics={}, history={})
    assert diagnose_record(failed) is None


def test_the_report_names_mismatches_and_says_they_are_not_collapses(tmp_path: Path) -> None:
    healthy = [
        mismatched_record(run_id=f"ok-{s}", variant="ok", seed=s, config={"dense": {"units": [8]}},
                          metrics={"test_accuracy": 0.97 + s / 1000, "test_loss": 0.1, "params": 100},
                          history={"accuracy": [0.98], "loss": [0.1]})
        for s in range(2)
    ]
    collapsed = mismatched_record(run_id="flat-0", variant="flat", config={"dense": {"units": [1]}},
                                  metrics={"test_accuracy": 0.098, "test_loss": 2.3, "params": 10},
                                  history={"accuracy": [0.099], "loss": [2.3]})
    records = [*healthy, mismatched_record(), mismatched_record(run_id="bn-1", seed=1, metrics={"test_accuracy": 0.12, "test_loss": 2.5, "epochs_ran": 2}), collapsed]
    with SQLiteStore(tmp_path / "h.db") as store:
        for record in records:
            store.put(record)
        variants = [{"name": name, "reference": []} for name in ("ok", "bn", "flat")]
        store.save_plan("s", source="s.yaml", info={"variants": variants, "seeds": [0, 1]},
                        runs=[(r.run_id, r.variant, r.seed) for r in records])
        results = load_results(store, "s")
    summary = results.summary.set_index("variant")
    assert summary.loc["bn", "mismatched"] == 2 and summary.loc["bn", "collapsed"] == 0
    assert summary.loc["flat", "collapsed"] == 1 and summary.loc["ok", "mismatched"] == 0
    text = render_leaderboard(results, generated_at="2026-01-01")
    lines = text.splitlines()
    bn_row = next(line for line in lines if line.startswith("| ") and "| bn ⚠" in line)
    assert "⚠ 2 train/eval mismatch |" in bn_row and "collapse" not in bn_row
    assert any("| flat ⚠ 1 collapsed |" in line for line in lines)
    assert "## Run health" in text and "A **train/eval mismatch** is not a collapse" in text
    health_rows = [line for line in text[text.index("## Run health"):].splitlines() if line.startswith("| bn |")]
    assert len(health_rows) == 2 and all("train/eval mismatch" in line and "| 90.00 |" in line and "| 142 |" in line
                                         for line in health_rows)
    assert "| 11.35 |" in health_rows[0] and "| 12.00 |" in health_rows[1]
    assert not any(line.startswith("| ok |") for line in text[text.index("## Run health"):].splitlines())


# --------------------------------------------------------------------------- real training

BN_CNN = """
schema_version: 1
name: bn_health
dataset: mnist
subset: {train: 2000, test: 500}
budget: {epochs: 1, batch_size: 32, seeds: 1, validation_split: 0.1}
variants:
  - name: bn_cnn
    model:
      conv:
        - {filters: [32, 32], kernel_size: 3, padding: same, activation: relu, batchnorm: true, pool: max}
      dense: {units: [128], batchnorm: true}
      optimizer: {name: sgd, learning_rate: 0.01, momentum: 0.9}
  - name: frozen            # a one-unit bottleneck that cannot learn at lr 1e-9: one constant class
    model:
      dense: {units: [1]}
      optimizer: {name: sgd, learning_rate: 1.0e-9}
"""


def test_real_batchnorm_cnn_after_few_steps_is_a_mismatch_and_a_frozen_model_a_collapse(
    tmp_path: Path, data_dir: Path
) -> None:
    prepared = prepare_sweep(load_sweep(write_sweep(tmp_path / "s.yaml", BN_CNN)), data_dir=data_dir)
    bn = train.train_run(prepared.runs[0], prepared.dataset)
    assert bn.status is RunStatus.DONE, bn.error
    # 57 steps at momentum 0.99: the model learnt, inference (moving statistics) did not follow
    assert bn.history["accuracy"][-1] > 0.6 and bn.test_accuracy < 0.45
    assert bn.diagnosis is not None and bn.diagnosis.health is Health.TRAIN_EVAL_MISMATCH
    assert bn.diagnosis.causes[0] is Cause.BATCHNORM_STATISTICS and bn.diagnosis.steps == 57
    frozen = train.train_run(prepared.runs[1], prepared.dataset)
    assert frozen.status is RunStatus.DONE and frozen.history["accuracy"][-1] < 0.15
    assert frozen.diagnosis is not None and frozen.diagnosis.health is Health.COLLAPSED


def test_real_batchnorm_cnn_with_a_lower_momentum_trains_past_the_mismatch(tmp_path: Path, data_dir: Path) -> None:
    # the same model and 57 steps, batch-norm momentum 0.9 (the diagnosis above suggests <= 0.92)
    text = BN_CNN.replace("batchnorm: true, pool: max}", "batchnorm: true, pool: max, batchnorm_momentum: 0.9}")
    text = text.replace("dense: {units: [128], batchnorm: true}", "dense: {units: [128], batchnorm: true, batchnorm_momentum: 0.9}")
    prepared = prepare_sweep(load_sweep(write_sweep(tmp_path / "s.yaml", text)), data_dir=data_dir)
    assert prepared.runs[0].variant.model.dense.batchnorm_momentum == 0.9
    bn = train.train_run(prepared.runs[0], prepared.dataset)
    assert bn.status is RunStatus.DONE, bn.error
    assert bn.diagnosis is not None and bn.diagnosis.health is Health.HEALTHY
    assert bn.test_accuracy > 0.8


def test_seed_000s_published_log_is_a_collapse_with_its_causes_named() -> None:
    # ../shared/seeds/000_*.txt: 256x4 relu, sigmoid output, raw 0-255 pixels, adam; every epoch
    # "loss: 2.3026 - acc: 0.0987", test accuracy 0.098 (the notebook suspected overfitting)
    traits = model_traits(
        {"preprocess": "none", "dense": {"units": [256] * 4}, "output_activation": "sigmoid", "optimizer": "adam"}
    )
    d = diagnose(history={"loss": [2.3026] * 20, "accuracy": [0.0987] * 20}, test_accuracy=0.098,
                 test_loss=2.3026, num_classes=10, traits=traits, steps=20 * 600)
    assert d.health is Health.COLLAPSED
    assert d.causes == (Cause.RAW_INPUTS, Cause.SIGMOID_OUTPUT)
