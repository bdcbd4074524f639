"""One contract, every executor: inline, the local process pool and Ray (a real local cluster)
train a sweep with the same store, report, resume, retries and failure records.

Scheduling is the point here, so runs use the fake train functions of tests/fake_train.py in the
executors' real workers (processes, actors); `test_a_tiny_real_sweep` trains with TensorFlow once
per executor.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from harness.execute import SweepOptions, execute_sweep
from harness.records import RunStatus
from harness.report import load_results
from harness.spec import load_sweep
from harness.store import SQLiteStore
from harness.sweep import Progress

from conftest import tiny_sweep_text, write_sweep

EXECUTORS = ["inline", "pool", "ray"]


@pytest.fixture(params=EXECUTORS)
def executor(request) -> str:
    if request.param == "ray":
        request.getfixturevalue("ray_cluster")
    return request.param


@pytest.fixture()
def log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "calls.jsonl"
    monkeypatch.setenv("HARNESS_FAKE_LOG", str(path))
    monkeypatch.setenv("HARNESS_FAKE_SLEEP", "0.01")
    return path


def calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def sweep(tmp_path: Path, executor: str, data_dir: Path, *, seeds: int = 2, train_fn: str = "ok", **options):
    spec = load_sweep(write_sweep(tmp_path / "s.yaml", tiny_sweep_text(seeds=seeds, train=300, test=100)))
    opts = SweepOptions(store=tmp_path / "h.db", data_dir=data_dir, executor=executor,
                        train_fn=f"fake_train:{train_fn}", workers=None if executor == "inline" else 2, **options)
    return execute_sweep(spec, opts, progress=Progress((), stream=io.StringIO()))


def test_every_run_is_stored_once_and_reported(tmp_path: Path, data_dir: Path, executor: str, log: Path) -> None:
    outcome = sweep(tmp_path, executor, data_dir)
    assert outcome.planned == 4 and outcome.trained == 4 and outcome.failed == 0 and outcome.attempts == 4
    made = [c["run_id"] for c in calls(log)]
    assert sorted(made) == sorted(r.run_id for r in outcome.records) and len(set(made)) == 4
    with SQLiteStore(tmp_path / "h.db", create=False) as store:
        assert store.claims() == {}
        summary = load_results(store, "tiny").summary.set_index("variant")
        assert list(summary["n"]) == [2, 2] and all(summary["mean"] == 90.0)
        assert all(store.attempts(r.run_id) == 1 for r in outcome.records)


def test_resume_trains_exactly_the_missing_seeds(tmp_path: Path, data_dir: Path, executor: str, log: Path) -> None:
    first = sweep(tmp_path, executor, data_dir, seeds=2)
    again = sweep(tmp_path, executor, data_dir, seeds=3)
    assert again.skipped == 4 and again.trained == 2
    assert sorted(r.seed for r in again.records) == [2, 2]
    assert len(calls(log)) == first.trained + again.trained == 6
    nothing = sweep(tmp_path, executor, data_dir, seeds=3)
    assert nothing.trained == 0 and nothing.skipped == 6 and len(calls(log)) == 6


def test_failures_become_records_and_retries_count_runs(tmp_path: Path, data_dir: Path, executor: str, log: Path) -> None:
    outcome = sweep(tmp_path, executor, data_dir, train_fn="flaky", retries=1)
    assert outcome.trained == 4 and outcome.attempts == 8 and outcome.failed == 0
    with SQLiteStore(tmp_path / "h.db", create=False) as store:
        assert all(store.attempts(r.run_id) == 2 and r.status is RunStatus.DONE for r in outcome.records)
    (tmp_path / "x").mkdir()
    raising = sweep(tmp_path / "x", executor, data_dir, train_fn="crashy_raise")
    by_seed = {r.seed: r for r in raising.records}
    assert by_seed[0].status is RunStatus.DONE
    assert by_seed[1].status is RunStatus.FAILED and "ValueError: shape mismatch" in by_seed[1].error
    assert raising.has_failed_runs


def test_groups_of_one_variant_come_back_together(tmp_path: Path, data_dir: Path, executor: str, log: Path) -> None:
    outcome = sweep(tmp_path, executor, data_dir, seeds=3, fuse=3)
    assert outcome.trained == 6
    variants = {r.run_id: r.variant for r in outcome.records}
    made = calls(log)
    # each group of three seeds trained in one worker (workers may train their groups at once)
    pids: dict[str, set[int]] = {}
    for call in made:
        pids.setdefault(variants[call["run_id"]], set()).add(call["pid"])
    assert len(made) == 6 and all(len(p) == 1 for p in pids.values()) and len(pids) == 2


@pytest.mark.parametrize("where", ["pool", "ray"])
def test_a_dead_worker_a_raise_and_a_hang_are_three_failed_records(
    tmp_path: Path, data_dir: Path, log: Path, where: str, request
) -> None:
    """Seed 1's worker is SIGKILLed (as the OOM killer does), seed 2 raises, seed 3 hangs past the
    timeout: each a FAILED record with its cause, seed 0 DONE, no claim left, the sweep finishes."""
    if where == "ray":
        request.getfixturevalue("ray_cluster")
    outcome = sweep(tmp_path, where, data_dir, seeds=4, train_fn="crashy", fuse=1, timeout_s=3.0)
    assert outcome.planned == 8 and outcome.trained == 8 and outcome.failed == 6
    by_seed: dict[int, list] = {}
    with SQLiteStore(tmp_path / "h.db", create=False) as store:
        for record in store.records(r.run_id for r in outcome.records):
            by_seed.setdefault(record.seed, []).append(record)
        assert store.claims() == {}
        assert all(store.attempts(r.run_id) == 1 for r in outcome.records)
    assert all(r.status is RunStatus.DONE for r in by_seed[0])
    assert all(r.status is RunStatus.FAILED and "died" in r.error for r in by_seed[1]), by_seed[1][0].error
    assert all(r.status is RunStatus.FAILED and "ValueError: shape mismatch" in r.error for r in by_seed[2])
    assert all(r.status is RunStatus.FAILED and "timed out after 3 s" in r.error for r in by_seed[3]), by_seed[3][0].error


@pytest.mark.slow
def test_a_tiny_real_sweep(tmp_path: Path, data_dir: Path, executor: str) -> None:
    """Real TensorFlow in each executor's workers: same store, same report."""
    spec = load_sweep(write_sweep(tmp_path / "s.yaml", tiny_sweep_text(seeds=1, train=2000, test=500)))
    options = SweepOptions(store=tmp_path / "h.db", data_dir=data_dir, executor=executor,
                           workers=None if executor == "inline" else 2)
    outcome = execute_sweep(spec, options, progress=Progress((), stream=io.StringIO()))
    assert outcome.trained == 2 and outcome.failed == 0
    with SQLiteStore(tmp_path / "h.db", create=False) as store:
        records = store.records(r.run_id for r in outcome.records)
        assert all(r.status is RunStatus.DONE and r.test_accuracy > 0.2 for r in records)
        assert all(r.versions.get("tensorflow") for r in records)
        assert len(load_results(store, "tiny").summary) == 2


class _Watched(Progress):
    """A Progress that keeps every progress report it is given, per group of run ids."""

    def __init__(self) -> None:
        super().__init__((), stream=io.StringIO())
        self.reports: dict[tuple[str, ...], list[float]] = {}

    def advanced(self, run_ids, done: float, *, age_s: float | None = None) -> None:
        super().advanced(run_ids, done, age_s=age_s)
        self.reports.setdefault(tuple(run_ids), []).append(done)
        assert age_s is not None and age_s > 0  # timed by the worker


@pytest.mark.parametrize("where", ["pool", "ray"])
def test_a_training_group_reports_its_progress_to_the_driver(
    tmp_path: Path, data_dir: Path, log: Path, where: str, request, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's group of two runs (trained one after the other, three 'epochs' each) tells the
    driver how far it is while it trains: the fraction of the group's epochs, growing, the first
    within the first run's half; throttled to one message a second."""
    if where == "ray":
        request.getfixturevalue("ray_cluster")
    monkeypatch.setenv("HARNESS_FAKE_EPOCH_S", "0.4")
    spec = load_sweep(write_sweep(tmp_path / "s.yaml", tiny_sweep_text(seeds=2, train=300, test=100)))
    options = SweepOptions(store=tmp_path / "h.db", data_dir=data_dir, executor=where, train_fn="fake_train:epochs",
                           workers=2, fuse=2)
    progress = _Watched()
    outcome = execute_sweep(spec, options, progress=progress)
    assert outcome.trained == 4 and outcome.failed == 0
    assert len(progress.reports) == 2  # one group per variant
    for run_ids, fractions in progress.reports.items():
        assert len(run_ids) == 2
        assert 2 <= len(fractions) <= 3, fractions  # 2.4 s of epochs, at most one message a second
        assert fractions == sorted(fractions) and all(0 < f <= 1 for f in fractions)
        assert fractions[0] <= 0.5  # the first run is the first half of the group
    assert not progress.paces  # forgotten once the runs finished
