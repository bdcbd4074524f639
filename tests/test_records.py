from __future__ import annotations

import math

import pytest

from harness.records import RunFlag, RunRecord, RunStatus


def make_record(**changes) -> RunRecord:
    fields = dict(
        run_id="r1",
        sweep="s",
        variant="v",
        variant_id="vid",
        seed=0,
        status=RunStatus.DONE,
        config={"dense": {"units": [8]}},
        budget={"epochs": 1},
        dataset={"fingerprint": "f"},
        metrics={"test_accuracy": 0.5, "test_loss": 1.0},
        history={"loss": [1.0, float("nan")]},
        flags=(RunFlag.NEAR_CHANCE,),
    )
    fields.update(changes)
    return RunRecord(**fields)


def test_json_round_trip_keeps_everything() -> None:
    record = make_record()
    back = RunRecord.from_json(record.to_json())
    assert back.status is RunStatus.DONE and back.flags == (RunFlag.NEAR_CHANCE,)
    assert back.metrics == record.metrics and back.config == record.config
    assert math.isnan(back.history["loss"][1])


def test_unknown_record_version_is_refused() -> None:
    text = make_record().to_json().replace('"record_version": 1', '"record_version": 99')
    with pytest.raises(ValueError, match="version 99"):
        RunRecord.from_json(text)


def test_status_helpers() -> None:
    assert RunStatus.DONE.is_finished() and RunStatus.DIVERGED.is_finished()
    assert not RunStatus.FAILED.is_finished() and not RunStatus.RUNNING.is_finished()
    assert RunStatus.FAILED.is_failure() and RunStatus.DIVERGED.is_failure()
    assert not RunStatus.DONE.is_failure()


def test_records_are_frozen() -> None:
    with pytest.raises(AttributeError):
        make_record().seed = 3  # type: ignore[misc]
