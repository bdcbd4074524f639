from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pytest

from harness.plan import PlannedRun
from harness.records import RunRecord, RunStatus
from harness.spec import load_sweep
from harness.store import SQLiteStore
from harness.execute import SweepOptions, run_sweep as run_with
from harness.executor import InlineExecutor
from harness.sweep import Progress, format_plan, pending_runs, prepare_sweep

from conftest import tiny_sweep_text, write_sweep


class FakeTrainer:
    """Stands in for TensorFlow: scheduler logic only. Fails the runs it is told to."""

    def __init__(self, fail: set[tuple[str, int]] = frozenset()) -> None:
        self.calls: list[tuple[str, int]] = []
        self.fail = set(fail)

    def __call__(self, run: PlannedRun, dataset) -> RunRecord:
        self.calls.append((run.variant.name, run.seed))
        failed = (run.variant.name, run.seed) in self.fail
        return run.record(
            RunStatus.FAILED if failed else RunStatus.DONE,
            metrics={} if failed else {"test_accuracy": 0.9 + run.seed / 100},
            timings={"wall_s": 0.1, "train_s": 0.1},
            error="Traceback...\nValueError: bad luck" if failed else None,
        )


@pytest.fixture()
def prepared(tmp_path: Path, data_dir: Path):
    spec = load_sweep(write_sweep(tmp_path / "s.yaml", tiny_sweep_text(seeds=3)))
    return prepare_sweep(spec, data_dir=data_dir)


def quiet() -> Progress:
    return Progress((), stream=io.StringIO())


def run_sweep(prepared, *, store, train_fn, progress=None, **options):
    """The sweep routine with a fake per-run train function, in this process."""
    executor = InlineExecutor(prepared.dataset, train=train_fn, per_run=True)
    return run_with(prepared, store=store, executor=executor, options=SweepOptions(**options), progress=progress)


def test_plan_is_variant_times_seed_with_unique_ids(prepared) -> None:
    assert len(prepared.runs) == 6
    assert len({r.run_id for r in prepared.runs}) == 6
    assert [(r.variant.name, r.seed) for r in prepared.runs][:3] == [("mlp_32", 0), ("mlp_32", 1), ("mlp_32", 2)]


def test_resume_skips_done_runs(prepared, tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "h.db") as store:
        first = FakeTrainer()
        outcome = run_sweep(prepared, store=store, train_fn=first, progress=quiet())
        assert outcome.trained == 6 and outcome.skipped == 0
        again = FakeTrainer()
        outcome = run_sweep(prepared, store=store, train_fn=again, progress=quiet())
        assert again.calls == [] and outcome.skipped == 6


def test_failures_are_isolated_and_retried_only_when_asked(prepared, tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "h.db") as store:
        trainer = FakeTrainer(fail={("cnn_8", 1)})
        outcome = run_sweep(prepared, store=store, train_fn=trainer, progress=quiet())
        assert outcome.trained == 6 and outcome.failed == 1  # the sweep went on after the failure
        statuses = store.statuses(r.run_id for r in prepared.runs)
        assert sorted(s.value for s in statuses.values()) == ["done"] * 5 + ["failed"]

        plain = FakeTrainer()
        run_sweep(prepared, store=store, train_fn=plain, progress=quiet())
        assert plain.calls == []  # failed runs are not retried by default

        retry = FakeTrainer()
        run_sweep(prepared, store=store, train_fn=retry, rerun_failed=True, progress=quiet())
        assert retry.calls == [("cnn_8", 1)]
        assert all(s is RunStatus.DONE for s in store.statuses(r.run_id for r in prepared.runs).values())


def test_pending_treats_running_as_not_done(prepared, tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "h.db") as store:
        run = prepared.runs[0]
        store.put(dataclasses.replace(FakeTrainer()(run, None), status=RunStatus.RUNNING))
        assert run in pending_runs(prepared.runs, store)


def test_dry_run_listing_shows_params_and_done(prepared, tmp_path: Path) -> None:
    text = format_plan(prepared, None)
    assert "mlp_32" in text and "cnn_8" in text and "6 to train" in text
    assert f"{prepared.runs[0].summary.params:,}" in text
    with SQLiteStore(tmp_path / "h.db") as store:
        run_sweep(prepared, store=store, train_fn=FakeTrainer(fail={("mlp_32", 0)}), progress=quiet())
        text = format_plan(prepared, store)
    assert "5 done, 1 failed, 0 to train" in text


def test_progress_reports_counts_and_eta(prepared) -> None:
    stream = io.StringIO()
    progress = Progress(prepared.runs[:2], stream=stream)
    trainer = FakeTrainer(fail={("mlp_32", 1)})
    for run in prepared.runs[:2]:
        progress.started(run)
        progress.finished(trainer(run, None))
    lines = stream.getvalue().splitlines()
    assert "start mlp_32 seed=0" in lines[0]
    assert "acc 90.00%" in lines[1] and "done 1 failed 0 running 0 pending 1" in lines[1]
    assert "ETA ~0:00:00" in lines[1] or "ETA ~0:00:01" in lines[1]  # done almost at once; from one run: rough
    assert "FAILED: ValueError: bad luck" in lines[3] and "done 1 failed 1 running 0 pending 0" in lines[3]


def test_variants_made_equal_by_overrides_share_their_runs(tmp_path: Path, data_dir: Path) -> None:
    from harness.report import load_results
    from harness.sweep import shared_runs

    text = tiny_sweep_text(seeds=2).replace("  - name: cnn_8\n", "  - name: mlp_32_long\n    budget: {epochs: 3}\n    model:\n      dense: {units: [32]}\n  - name: cnn_8\n")
    spec = load_sweep(write_sweep(tmp_path / "s.yaml", text)).with_overrides(epochs=1)
    prepared = prepare_sweep(spec, data_dir=data_dir)
    assert shared_runs(prepared.runs) == [("mlp_32", "mlp_32_long")]
    with SQLiteStore(tmp_path / "h.db") as store:
        trainer = FakeTrainer()
        outcome = run_sweep(prepared, store=store, train_fn=trainer, progress=quiet())
        assert outcome.planned == 4 and outcome.trained == 4 and len(trainer.calls) == 4  # not 6
        results = load_results(store, "tiny")
    summary = results.summary.set_index("variant")
    assert summary.loc["mlp_32", "n"] == 2 and summary.loc["mlp_32_long", "n"] == 2
    assert summary.loc["mlp_32", "mean"] == summary.loc["mlp_32_long", "mean"]
    assert format_plan(prepared, None).endswith("0 done, 0 failed, 4 to train")


def test_only_some_variants_keeps_the_rest_of_the_report(tmp_path: Path, data_dir: Path) -> None:
    from harness.report import load_results

    spec = load_sweep(write_sweep(tmp_path / "s.yaml", tiny_sweep_text(seeds=2)))
    with SQLiteStore(tmp_path / "h.db") as store:
        run_sweep(prepare_sweep(spec, data_dir=data_dir), store=store, train_fn=FakeTrainer(), progress=quiet())
        again = FakeTrainer()
        only = prepare_sweep(spec.with_overrides(only=["cnn*"], seeds=3), data_dir=data_dir)
        outcome = run_sweep(only, store=store, train_fn=again, progress=quiet())
        assert again.calls == [("cnn_8", 2)] and outcome.skipped == 2
        summary = load_results(store, "tiny").summary.set_index("variant")
    assert summary.loc["mlp_32", "n"] == 2 and summary.loc["cnn_8", "n"] == 3
