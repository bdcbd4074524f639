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
    records = fixture_records()
    frame = runs_frame(records, variants=["renamed"] + [r.variant for r in records[1:]])
    assert frame.loc[0, "variant"] == "renamed" and frame.loc[0, "test_accuracy"] == pytest.approx(97.0)
    assert frame.loc[5, "status"] == "failed" and "OOM" in frame.loc[5, "error"]


def test_mean_ci_edge_cases() -> None:
    assert all(math.isnan(v) for v in mean_ci([]))
    mean, std, low, high = mean_ci([1.0])
    assert mean == 1.0 and math.isnan(std)


def test_sweep_utilisation_against_calibrated_peak() -> None:
    from harness.aggregate import sweep_utilisation
    from harness.records import RunStatus

    from test_records import make_record

    def run(i: int, start: str, end: str, device: str = "cpu x86_64 (1 threads)", status=RunStatus.DONE):
        return make_record(
            run_id=f"u{i}", status=status, device=device, started_at=f"2026-01-01T00:00:{start}+00:00",
            finished_at=f"2026-01-01T00:00:{end}+00:00", metrics={"test_accuracy": 0.9, "estimated_train_flops": 1e12},
        )

    records = [run(0, "00", "10"), run(1, "05", "20"), run(2, "01", "59", status=RunStatus.FAILED)]
    use = sweep_utilisation(records, {"cpu": {"flops_per_s": 1e12, "device": "cpu"}})
    assert use["runs"] == 2 and use["span_s"] == pytest.approx(20.0)
    assert use["achieved_flops_per_s"] == pytest.approx(1e11) and use["mfu"] == pytest.approx(0.10)
    assert math.isnan(sweep_utilisation(records, {})["mfu"])  # not calibrated: no made-up number

    gpus = [run(0, "00", "10", "GPU:0 H100 (CUDA_VISIBLE_DEVICES=0)"), run(1, "00", "10", "GPU:0 H100 (CUDA_VISIBLE_DEVICES=1)")]
    use = sweep_utilisation(gpus, {"gpu": {"flops_per_s": 1e13, "device": "H100"}, "cpu": {"flops_per_s": 1.0}})
    assert use["kind"] == "gpu" and use["devices"] == 2 and use["mfu"] == pytest.approx(2e12 / 10 / 2e13)


def test_welch_marks_variants_tied_with_the_best(summary) -> None:
    assert summary.loc["alpha", "tied_with_best"]
    assert summary.loc["alpha", "p_vs_best"] == 0.0
    from scipy import stats

    expected = stats.ttest_ind([95.0, 96.0], [97.0, 97.5, 98.0], equal_var=False).pvalue
    assert summary.loc["beta", "p_vs_best"] == pytest.approx(expected)
    assert expected > 0.05 and summary.loc["beta", "tied_with_best"]  # two seeds cannot separate them
    assert not summary.loc["gamma", "tied_with_best"]  # one run: untestable, never called a tie


def test_clearly_worse_variant_is_not_tied() -> None:
    import pandas as pd

    runs = pd.DataFrame(
        [{"variant": v, "status": "done", "test_accuracy": a, "train_s": 1.0, "params": 1, "near_chance": False}
         for v, accs in (("best", [98.0, 98.1, 97.9, 98.05]), ("worse", [96.0, 96.1, 95.9, 96.05])) for a in accs]
    )
    frame = summarize(runs, [{"name": "best"}, {"name": "worse"}]).set_index("variant")
    assert frame.loc["worse", "p_vs_best"] < 1e-4 and not frame.loc["worse", "tied_with_best"]


def test_reference_verdicts(summary) -> None:
    assert summary.loc["alpha", "verdicts"] == ["inside"]  # 97.0 in [96.26, 98.74]
    assert summary.loc["gamma", "verdicts"] == ["untested"]  # one seed: no interval
    from harness.aggregate import reference_verdict

    assert reference_verdict(99.0, 97.0, 98.0) == "above" and reference_verdict(96.0, 97.0, 98.0) == "below"


def test_train_time_spread(summary) -> None:
    assert summary.loc["alpha", "train_s_std"] == pytest.approx(2.0)
