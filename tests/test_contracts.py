"""Typed contracts across the store: SweepInfo / VariantInfo / DatasetInfo and RunMetrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.contracts import DatasetInfo, RunMetrics, SweepInfo, VariantInfo
from harness.records import RunRecord
from harness.store import SQLiteStore

FIXTURE = Path(__file__).parent / "fixtures" / "runs.jsonl"

# A sweep description as the previous harness stored it (an untyped dict in the sweeps table).
OLD_INFO = {
    "name": "conv",
    "description": "d",
    "seeds": [0, 1],
    "deterministic": True,
    "dataset": {"name": "mnist", "source": "npz", "fingerprint": "abc", "n_train": 100, "n_test": 10,
                "image_shape": [28, 28, 1], "num_classes": 10, "subset": None},
    "variants": [
        {"name": "a", "variant_id": "111", "base": "a", "grid_point": [["model.dense.dropout", 0.5]],
         "reference": [98.2], "params": 1000, "epochs": 2, "batch_size": 32, "validation_split": 0.1,
         "estimated_train_flops": 1e9, "keras_backend": "tensorflow", "keras_backend_requested": "tensorflow"},
        {"name": "b", "params": 10},  # an even older variant entry: most keys absent
    ],
}


def test_sweep_info_round_trips_and_reads_old_json() -> None:
    info = SweepInfo.from_dict(OLD_INFO)
    assert info.variants[0] == VariantInfo(
        name="a", variant_id="111", base="a", grid_point=(("model.dense.dropout", 0.5),), reference=(98.2,),
        params=1000, epochs=2, batch_size=32, validation_split=0.1, estimated_train_flops=1e9,
        keras_backend="tensorflow", keras_backend_requested="tensorflow",
    )
    assert info.variants[1].reference == () and info.variants[1].epochs is None and info.variants[1].params == 10
    assert info.dataset.fingerprint == "abc" and info.dataset.image_shape == (28, 28, 1)
    assert SweepInfo.from_json(info.to_json()) == info
    assert json.loads(info.to_json())["variants"][0] == OLD_INFO["variants"][0]  # same JSON as before
    assert info.grid_axes() == ["model.dense.dropout"] and info.variant("a").grid == {"model.dense.dropout": 0.5}


def test_unknown_keys_of_a_newer_harness_are_kept() -> None:
    info = SweepInfo.from_dict({**OLD_INFO, "future": 1, "variants": [{"name": "a", "new_key": [1]}]})
    assert info.extra == {"future": 1} and info.variants[0].extra == {"new_key": [1]}
    assert json.loads(info.to_json())["variants"][0]["new_key"] == [1]


def test_store_keeps_the_typed_info_and_reads_an_old_plan(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "h.db") as store:
        store.save_plan("conv", source="sweeps/c.yaml", info=SweepInfo.from_dict(OLD_INFO), runs=[("r", "a", 0)])
        back = store.sweep_info("conv")
        assert isinstance(back, SweepInfo) and back.source == "sweeps/c.yaml" and back.planned_at
        assert back.variants == SweepInfo.from_dict(OLD_INFO).variants
        store.save_plan("old", source="o.yaml", info=OLD_INFO, runs=[])  # a plain dict, as older callers pass
        assert store.sweep_info("old").dataset == DatasetInfo.from_dict(OLD_INFO["dataset"])


def test_run_metrics_are_typed_and_still_read_as_a_mapping() -> None:
    metrics = RunMetrics.from_dict({"test_accuracy": 0.97, "params": 5000, "examples_per_s": None, "custom": "x"})
    assert metrics.test_accuracy == 0.97 and metrics.params == 5000 and isinstance(metrics.params, int)
    assert metrics.extra == {"custom": "x"}
    assert metrics.get("test_accuracy") == 0.97 and metrics["custom"] == "x" and metrics.get("test_loss") is None
    assert metrics == {"test_accuracy": 0.97, "params": 5000, "custom": "x"}
    assert RunMetrics.from_json(metrics.to_json()) == metrics
    assert RunMetrics.from_dict({"params": "many"}).extra == {"params": "many"}  # not a number: kept, not lost


def test_stored_records_read_and_write_the_same_json() -> None:
    for line in FIXTURE.read_text().splitlines():
        record = RunRecord.from_json(line)
        assert isinstance(record.metrics, RunMetrics)
        assert json.loads(record.to_json())["metrics"] == json.loads(line)["metrics"]
    record = RunRecord.from_json(FIXTURE.read_text().splitlines()[0])
    assert record.test_accuracy == pytest.approx(0.97) and record.metrics.test_loss == pytest.approx(0.1)
