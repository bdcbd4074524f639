"""Aggregates of checked-in run records with hand-computed expected values."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from harness.aggregate import mean_ci, runs_frame, summarize
from harness.records import RunRecord

FIXTURE = Path(__file__).parent / "fixtures" / "runs.jsonl"
VARIANTS = [
    {"name": "alpha", "params": 5000, "reference": [97.0]},
    {"name": "beta", "params": 800, "reference": []},
    {"name": "gamma", "params": 400, "reference": [9.8]},
    {"name": "never_ran", "params": 10, "reference": []},
]


def fixture_records() -> list[RunRecord]:
    return [RunRecord.from_json(line) for line in FIXTURE.read_text().splitlines() if line.strip()]


@pytest.fixture()
def summary():
    return summarize(runs_frame(fixture_records()), VARIANTS).set_index("variant")


def test_mean_std_and_student_t_interval(summary) -> None:
    alpha = summary.loc["alpha"]
    assert alpha["n"] == 3 and alpha["failures"] == 0
    assert alpha["mean"] == pytest.approx(97.5)
    assert alpha["std"] == pytest.approx(0.5)  # ddof=1
    half = 4.302652729911275 * 0.5 / math.sqrt(3)  # t(0.975, df=2)
    assert alpha["ci_low"] == pytest.approx(97.5 - half) and alpha["ci_high"] == pytest.approx(97.5 + half)
    assert alpha["min"] == pytest.approx(97.0) and alpha["max"] == pytest.approx(98.0)
    assert alpha["train_s"] == pytest.approx(12.0) and alpha["params"] == 5000


def test_failures_are_counted_never_dropped(summary) -> None:
    beta = summary.loc["beta"]
    assert beta["n"] == 2 and beta["failures"] == 1 and beta["mean"] == pytest.approx(95.5)
    gamma = summary.loc["gamma"]
    assert gamma["n"] == 1 and gamma["failures"] == 1 and gamma["diverged"] == 1 and gamma["near_chance"] == 1
    assert math.isnan(gamma["std"]) and math.isnan(gamma["ci_low"])
    never = summary.loc["never_ran"]
    assert never["n"] == 0 and math.isnan(never["mean"]) and never["failures"] == 0


def test_rank_by_mean_with_unrun_last(summary) -> None:
    assert list(summary.index) == ["alpha", "beta", "gamma", "never_ran"]
    assert list(summary["rank"].iloc[:3]) == [1, 2, 3] and summary["rank"].isna().iloc[3]


def test_runs_frame_uses_plan_names_and_percent() -> None:
    frame = runs_frame(fixture_records(), names={"alpha-0": "renamed"})
    assert frame.loc[0, "variant"] == "renamed" and frame.loc[0, "test_accuracy"] == pytest.approx(97.0)
    assert frame.loc[5, "status"] == "failed" and "OOM" in frame.loc[5, "error"]


def test_mean_ci_edge_cases() -> None:
    assert all(math.isnan(v) for v in mean_ci([]))
    mean, std, low, high = mean_ci([1.0])
    assert mean == 1.0 and math.isnan(std)
