"""Adaptive seeds (`budget.seeds: {min, max, ci_half_width}`, `--seeds auto`): the rule, the spec,
and sweeps that add seeds only where the interval is still wide, and resume."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.adaptive import SeedState, decide, first_counts, seeds_needed
from harness.aggregate import mean_ci
from harness.cli import cli
from harness.contracts import AdaptiveSeeds
from harness.errors import SpecError
from harness.execute import SweepOptions, execute_sweep
from harness.records import RunStatus
from harness.spec import load_sweep
from harness.stats import t_quantile
from harness.store import SQLiteStore
from harness.sweep import Progress

from conftest import write_sweep
from test_records import make_record

POLICY = AdaptiveSeeds(min=3, max=8, ci_half_width=1.0)


def records(*accuracies: float | None):
    """One record per value: an accuracy in points, or None for a FAILED run."""
    return [
        make_record(run_id=f"r{i}", seed=i, status=RunStatus.DONE, metrics={"test_accuracy": a / 100})
        if a is not None else make_record(run_id=f"r{i}", seed=i, status=RunStatus.FAILED, error="boom")
        for i, a in enumerate(accuracies)
    ]


def test_a_tight_variant_stops_at_min_and_its_width_is_the_tables() -> None:
    values = [98.0, 98.2, 98.1]
    d = decide(POLICY, "v", 3, records(*values))
    _mean, _std, low, high = mean_ci(values)
    assert d.state is SeedState.PRECISE and d.next_seeds == 3 and d.n == 3
    assert d.half_width == pytest.approx((high - low) / 2)  # the report's interval, not another one


def test_a_wide_variant_gets_the_seeds_its_spread_needs_at_most_doubling() -> None:
    values = [97.0, 98.0, 99.0]  # std 1.0: t(2) * 1 / sqrt(3) = 2.48 > 1
    d = decide(POLICY, "v", 3, records(*values))
    assert d.state is SeedState.MORE and d.next_seeds == 6  # needs 7 (see below), capped at 2 x 3
    n = seeds_needed(1.0, POLICY)
    assert t_quantile(0.95, n - 1) / math.sqrt(n) <= 1.0 < t_quantile(0.95, n - 2) / math.sqrt(n - 1)
    assert n == 7
    loose = AdaptiveSeeds(min=3, max=8, ci_half_width=2.0)
    assert decide(loose, "v", 3, records(*values)).next_seeds == seeds_needed(1.0, loose) == 4


def test_at_max_mostly_failed_and_too_few_finished() -> None:
    assert decide(POLICY, "v", 8, records(90, 99, 80, 95, 91, 93, 97, 85)).state is SeedState.AT_MAX
    broken = decide(POLICY, "v", 3, records(95.0, None, None))
    assert broken.state is SeedState.MOSTLY_FAILED and broken.next_seeds == 3
    one = decide(AdaptiveSeeds(min=2, max=8, ci_half_width=1.0), "v", 2, records(95.0, None))
    assert one.state is SeedState.MORE and one.next_seeds == 3 and math.isnan(one.half_width)
    # a failure is counted in the next round's size: as many seeds again may fail
    assert decide(POLICY, "v", 4, records(97.0, 98.0, 99.0, None)).next_seeds == 8


def test_resume_starts_from_the_seeds_the_stored_plan_holds() -> None:
    candidates = tuple(range(8))
    stored = [("a", 0), ("a", 1), ("a", 2), ("a", 3), ("a", 4), ("b", 0), ("b", 2), ("c", 9)]
    assert first_counts(POLICY, ["a", "b", "c", "d"], candidates, stored) == {"a": 5, "b": 3, "c": 3, "d": 3}
    assert first_counts(POLICY, ["a"], candidates, [("a", s) for s in range(20)]) == {"a": 8}


ADAPTIVE = """
schema_version: 1
name: adapt
dataset: mnist
subset: {train: 300, test: 100}
budget: {epochs: 1, batch_size: 64, seeds: {min: 3, max: 8, ci_half_width: 1.0}}
variants:
  - name: steady
    model: {dense: {units: [8]}}
  - name: noisy
    model: {dense: {units: [16]}}
  - name: broken
    model: {dense: {units: [24]}}
"""


def test_sweep_file_forms_and_one_line_errors(tmp_path: Path) -> None:
    spec = load_sweep(write_sweep(tmp_path / "a.yaml", ADAPTIVE))
    assert spec.adaptive == AdaptiveSeeds(3, 8, 1.0) and spec.seeds == tuple(range(8))
    assert spec.with_overrides(seeds=4).adaptive is None  # a fixed count wins
    auto = load_sweep(write_sweep(tmp_path / "b.yaml", ADAPTIVE.replace("{min: 3, max: 8, ci_half_width: 1.0}", "3")))
    assert auto.adaptive is None and auto.with_overrides(seeds="auto").adaptive == AdaptiveSeeds()
    for bad, problem in [
        ("{min: 5, max: 2, ci_half_width: 1}", "max (2) must be at least min (5)"),
        ("{min: 1, max: 4, ci_half_width: 1}", "min: Input should be greater than or equal to 2"),
        ("{min: 3, max: 8, ci_half_width: .nan}", "ci_half_width: Input should be a finite number"),
        ("{min: 3, max: 8, ci_half_width: 0}", "ci_half_width: Input should be greater than 0"),
        ("{min: 3, max: 8, target: 1}", "target: Extra inputs are not permitted"),
        ("{min: 3, max: 100000000, ci_half_width: 1}", "HARNESS_MAX_SEEDS"),
    ]:
        path = write_sweep(tmp_path / "bad.yaml", ADAPTIVE.replace("{min: 3, max: 8, ci_half_width: 1.0}", bad))
        with pytest.raises(SpecError) as info:
            load_sweep(path)
        line = str(info.value)
        assert "\n" not in line and str(path) in line and "budget.seeds" in line and problem in line, line


def test_seeds_go_only_where_the_interval_is_wide_and_a_rerun_trains_nothing(tmp_path: Path, data_dir: Path) -> None:
    spec = load_sweep(write_sweep(tmp_path / "a.yaml", ADAPTIVE))
    options = SweepOptions(store=tmp_path / "h.db", data_dir=data_dir, executor="inline", train_fn="fake_train:spread")
    notes: list[str] = []
    outcome = execute_sweep(spec, options, progress=Progress((), stream=io.StringIO()), notify=notes.append)
    rounds = [n for n in notes if n.startswith("adaptive seeds, round")]
    noisy = [90 + (seed * 37) % 11 - 5 for seed in range(8)]  # what fake_train.spread gives
    width = lambda n: (mean_ci(noisy[:n])[3] - mean_ci(noisy[:n])[2]) / 2  # noqa: E731
    # steady (no spread) and broken (2 of 3 failed) stop after round 1; noisy (std ~3.5) grows
    # 3 -> 6 -> 8 (doubling, then max) and stops there still wide
    assert rounds == [
        "adaptive seeds, round 1: 1 more, 1 precise, 1 mostly failed (target +-1 points); "
        f"3 more runs for 1 variants (widest: noisy +-{width(3):.2f})",
        "adaptive seeds, round 2: 1 more, 1 precise, 1 mostly failed (target +-1 points); "
        f"2 more runs for 1 variants (widest: noisy +-{width(6):.2f})",
        "adaptive seeds, round 3: 1 precise, 1 at max, 1 mostly failed (target +-1 points)",
    ], notes
    assert outcome.planned == outcome.trained == 3 + 8 + 3 and outcome.skipped == 0
    with SQLiteStore(tmp_path / "h.db", create=False) as store:
        plan = store.plan("adapt")
        per_variant = {v: sorted(s for _r, name, s in plan if name == v) for v in ("steady", "noisy", "broken")}
        assert per_variant == {"steady": [0, 1, 2], "noisy": list(range(8)), "broken": [0, 1, 2]}
        assert store.sweep_info("adapt").adaptive == AdaptiveSeeds(3, 8, 1.0)

    again = execute_sweep(spec, options, progress=Progress((), stream=io.StringIO()))
    assert again.trained == 0 and again.planned == 14 and again.skipped == 14

    report = CliRunner().invoke(cli, ["report", "--sweep", "adapt", "--store", str(tmp_path / "h.db"), "--no-plots",
                                      "--out", str(tmp_path / "r.md")])
    assert report.exit_code == 0, report.output
    text = (tmp_path / "r.md").read_text()
    assert "over adaptive seeds (3 to 8 per variant, so n differs)" in text
    assert "Still wider at 8 seeds: noisy." in text
    assert "Still wider with fewer than 8 seeds (most runs failed, or the sweep has not finished): broken." in text


def test_a_run_another_sweep_finishes_in_a_later_round_is_not_counted_as_skipped(tmp_path: Path, data_dir: Path) -> None:
    """Round 2 queues noisy's seeds 3-5; another sweep on the store finishes seed 3 before this one
    claims it. The outcome counts it apart: planned = skipped + trained + finished elsewhere, and
    skipped stays what the store held at the start (none), as the CLI's last line says."""
    from harness.sweep import prepare_sweep

    spec = load_sweep(write_sweep(tmp_path / "a.yaml", ADAPTIVE))
    options = SweepOptions(store=tmp_path / "h.db", data_dir=data_dir, executor="inline", train_fn="fake_train:spread")
    candidates = prepare_sweep(spec, data_dir=data_dir).runs
    target = next(r for r in candidates if r.variant.name == "noisy" and r.seed == 3)

    class OtherSweepFinishesIt(Progress):
        def grouped(self, queue) -> None:
            queue = [tuple(group) for group in queue]
            super().grouped(queue)
            if any(target.run_id in group for group in queue) and not self.__dict__.get("put"):
                self.put = True
                with SQLiteStore(tmp_path / "h.db", create=False) as other:  # what fake_train.spread gives
                    other.put(target.record(RunStatus.DONE, metrics={"test_accuracy": 0.90 + ((3 * 37) % 11 - 5) / 100}))

    progress = OtherSweepFinishesIt(candidates, stream=io.StringIO())  # one progress for every round
    outcome = execute_sweep(spec, options, progress=progress)
    assert progress.__dict__.get("put")  # round 2 queued it
    assert outcome.planned == 14 and outcome.finished_elsewhere == 1
    assert outcome.trained == 13 and outcome.skipped == 0
    assert target.run_id not in {r.run_id for r in outcome.records}
    assert "noisy seed=3: finished by another sweep meanwhile" in progress.stream.getvalue()


def test_a_fixed_seed_sweep_resumed_with_auto_adds_only_what_is_needed(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seeds 0..3 of every variant already in the store (a fixed `--seeds 4` sweep): `--seeds auto`
    starts from those four, trains nothing more for the steady variant and extends the noisy one."""
    spec = load_sweep(write_sweep(tmp_path / "a.yaml", ADAPTIVE.replace("{min: 3, max: 8, ci_half_width: 1.0}", "4")))
    log = tmp_path / "calls.jsonl"
    options = SweepOptions(store=tmp_path / "h.db", data_dir=data_dir, executor="inline", train_fn="fake_train:spread")
    quiet = lambda: Progress((), stream=io.StringIO())  # noqa: E731
    execute_sweep(spec.with_overrides(only=["steady", "noisy"]), options, progress=quiet())
    monkeypatch.setenv("HARNESS_FAKE_LOG", str(log))
    # round 1 has nothing to train (seeds 0..3 are stored): the trainer is made when a round needs it
    outcome = execute_sweep(spec.with_overrides(seeds="auto", only=["steady", "noisy"]), options, progress=quiet())
    trained = [(json.loads(line)["seed"]) for line in log.read_text().splitlines()]
    assert sorted(trained) == list(range(4, 10))  # noisy only: 4 -> 8 -> 10 (the default max)
    assert outcome.skipped == 8 and outcome.trained == 6


def test_cli_seeds_auto_dry_run_and_a_bad_value(tmp_path: Path, data_dir: Path) -> None:
    path = write_sweep(tmp_path / "a.yaml", ADAPTIVE.replace("{min: 3, max: 8, ci_half_width: 1.0}", "2"))
    runner = CliRunner()
    bad = runner.invoke(cli, ["sweep", str(path), "--seeds", "many", "--dry-run"])
    assert bad.exit_code == 2 and "expected a whole number or 'auto'" in bad.output
    dry = runner.invoke(cli, ["sweep", str(path), "--seeds", "auto", "--dry-run", "--data-dir", str(data_dir),
                              "--store", str(tmp_path / "h.db")])
    assert dry.exit_code == 0, dry.output
    assert f"{AdaptiveSeeds().describe()}; 3 variants; 9 runs in the first round, at most 30" in dry.output
    assert "at most 30 to train" in dry.output and not (tmp_path / "h.db").exists()


@pytest.mark.slow
def test_real_training_adds_a_round_until_max_when_the_target_is_out_of_reach(tmp_path: Path, data_dir: Path) -> None:
    """Real TensorFlow in worker processes: a target no real spread meets (+-0.01 points) takes every
    variant from min to max in one more round; the report counts each variant's n."""
    text = ADAPTIVE.replace("{min: 3, max: 8, ci_half_width: 1.0}", "{min: 2, max: 3, ci_half_width: 0.01}")
    path = write_sweep(tmp_path / "a.yaml", text.replace("  - name: broken\n    model: {dense: {units: [24]}}\n", ""))
    runner = CliRunner()
    result = runner.invoke(cli, ["sweep", str(path), "--data-dir", str(data_dir), "--store", str(tmp_path / "h.db"),
                                 "--fuse", "1"])
    assert result.exit_code == 0, result.output + result.stderr
    assert "adaptive seeds, round 1: 2 more" in result.stderr and "adaptive seeds, round 2: 2 at max" in result.stderr
    assert "6 runs planned, 0 already in the store, 6 trained" in result.output
    with SQLiteStore(tmp_path / "h.db", create=False) as store:
        assert sorted(seed for _r, _v, seed in store.plan("adapt")) == [0, 0, 1, 1, 2, 2]
