"""The worker pool with real worker processes (fake train functions: no TensorFlow, fast)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from harness.devices import Gpu, plan_workers
from harness.execute import SweepOptions, run_sweep as run_with
from harness.executor import Trainer
from harness.records import RunStatus
from harness.scheduler import DataSource, LocalPoolExecutor
from harness.spec import load_sweep
from harness.store import SQLiteStore
from harness.sweep import Progress, order_longest_first, prepare_sweep

from conftest import tiny_sweep_text, write_sweep

TESTS = Path(__file__).parent


@pytest.fixture()
def prepared(tmp_path: Path, data_dir: Path):
    spec = load_sweep(write_sweep(tmp_path / "s.yaml", tiny_sweep_text(seeds=4, train=600, test=100)))
    return prepare_sweep(spec, data_dir=data_dir)


@pytest.fixture()
def log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "calls.jsonl"
    monkeypatch.setenv("HARNESS_FAKE_LOG", str(path))
    return path


def calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def pool_for(prepared, train_fn: str, *, workers: int = 2, slots=None) -> LocalPoolExecutor:
    slots = slots or plan_workers(gpus=[], pending=len(prepared.runs), cpu_count=workers)
    source = DataSource(ref=prepared.spec.dataset, subset=prepared.spec.subset, data_dir=prepared.data_dir)
    return LocalPoolExecutor(slots, source=source, trainer=Trainer(run=f"fake_train:{train_fn}"))


def quiet(runs=()) -> Progress:
    return Progress(runs, stream=io.StringIO())


def run_sweep(prepared, *, store, pool, progress=None, **options):
    """The sweep routine on a real worker pool, one run per group unless asked (these tests are
    about per-run isolation); the pool is shut down afterwards."""
    options.setdefault("fuse", 1)
    try:
        return run_with(prepared, store=store, executor=pool, options=SweepOptions(**options), progress=progress or quiet())
    finally:
        pool.shutdown()


def test_long_lived_workers_train_every_run_once(prepared, log: Path, tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "h.db") as store:
        pool = pool_for(prepared, "ok")
        outcome = run_sweep(prepared, store=store, pool=pool, progress=quiet())
        assert outcome.trained == 8 and outcome.failed == 0
        statuses = store.statuses(r.run_id for r in prepared.runs)
        assert len(statuses) == 8 and all(s is RunStatus.DONE for s in statuses.values())
        assert store.claims() == {}  # every claim released with its result
    made = calls(log)
    assert sorted(c["run_id"] for c in made) == sorted(r.run_id for r in prepared.runs)
    assert len({c["pid"] for c in made}) <= 2  # eight runs in at most two long-lived processes
    assert pool.stats.worker_starts == 2
    assert len(pool.stats.return_s) == 8 and len(pool.stats.dispatch_s) == 8
    assert outcome.executor_summary and "scheduler overhead per run" in outcome.executor_summary


def test_cpu_workers_that_share_out_the_cores_are_each_pinned_to_their_own(
    prepared, log: Path, tmp_path: Path, data_dir: Path
) -> None:
    """Real worker processes on real cores: a JAX worker whose slot names cores runs on them alone
    (the affinity a library's own threads inherit)."""
    import os

    if not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs CPU affinity and two cores")
    from harness.backends import backend_version

    if backend_version("jax") is None:
        pytest.skip('jax not installed (pip install -e ".[jax]")')
    cores = sorted(os.sched_getaffinity(0))[:2]
    prepared = prepare_sweep(prepared.spec.with_overrides(keras_backend="jax"), data_dir=data_dir)  # fake runs
    slots = plan_workers(gpus=[], pending=8, cpu_count=2, cpus=cores, backend="jax")  # fake runs: no Keras
    assert [s.cpus for s in slots] == [(cores[0],), (cores[1],)]
    with SQLiteStore(tmp_path / "h.db") as store:
        records = run_sweep(prepared, store=store, pool=pool_for(prepared, "ok", slots=slots)).records
    seen = {(d["pid"], tuple(d["affinity"])) for d in (json.loads(r.device) for r in records)}
    assert {affinity for _pid, affinity in seen} <= {(cores[0],), (cores[1],)} and len(seen) == 2


def test_workers_are_pinned_by_their_slot_env(prepared, log: Path, tmp_path: Path) -> None:
    """Simulated GPUs: each worker sees only its own device and the memory-growth switch."""
    gpus = [Gpu(0, "sim"), Gpu(1, "sim")]
    slots = plan_workers(gpus=gpus, pending=8, cpu_count=4, runs_per_gpu=2)
    source = DataSource(ref=prepared.spec.dataset, subset=prepared.spec.subset, data_dir=prepared.data_dir)
    pool = LocalPoolExecutor(slots, source=source, trainer=Trainer(run="fake_train:ok"))
    with SQLiteStore(tmp_path / "h.db") as store:
        records = run_sweep(prepared, store=store, pool=pool).records
    assert len(records) == 8
    seen = [json.loads(r.device) for r in records]
    assert {s["CUDA_VISIBLE_DEVICES"] for s in seen} <= {"0", "1"}
    assert all(s["TF_FORCE_GPU_ALLOW_GROWTH"] == "true" and s["TF_NUM_INTRAOP_THREADS"] == "1" for s in seen)
    pids_per_gpu = Counter()
    for s in {(s["pid"], s["CUDA_VISIBLE_DEVICES"]) for s in seen}:
        pids_per_gpu[s[1]] += 1
    assert max(pids_per_gpu.values()) <= 2


def test_failures_are_isolated(prepared, log: Path, tmp_path: Path) -> None:
    """A killed worker, a raising run and a hung run each become a FAILED record; the rest finish."""
    with SQLiteStore(tmp_path / "h.db") as store:
        pool = pool_for(prepared, "crashy")
        outcome = run_sweep(prepared, store=store, pool=pool, timeout_s=3.0)
        by_seed = {}
        for record in store.records(r.run_id for r in prepared.runs):
            by_seed.setdefault(record.seed, []).append(record)
    assert outcome.trained == 8
    assert all(r.status is RunStatus.DONE for r in by_seed[0])
    assert all(r.status is RunStatus.FAILED and "died (signal SIGKILL)" in r.error for r in by_seed[1])
    assert all(r.status is RunStatus.FAILED and "ValueError: shape mismatch" in r.error for r in by_seed[2])
    assert all(r.status is RunStatus.FAILED and "timed out after 3 s" in r.error for r in by_seed[3])
    assert pool.stats.worker_starts == 2 + 4  # each kill and each timeout got a fresh worker


def test_a_record_sent_before_the_worker_died_counts_and_a_fresh_worker_takes_its_place(prepared, log: Path) -> None:
    """The worker sends its group's record, then is killed before the driver reads its pipe: the
    driver, learning of the death first, reads what the pipe holds before it gives the group up. The run is DONE (not lost,
    not trained again), and a fresh worker takes the dead one's place and trains the next group."""
    from harness.executor import GroupLost, GroupStarted, RecordsReturned, WorkGroup

    def until_idle() -> None:
        deadline = time.monotonic() + 60
        while not pool.idle_backends() and time.monotonic() < deadline:
            assert not pool.poll(0.05)  # nothing happens but a worker getting warm

    pool = pool_for(prepared, "returns_then_dies", workers=1)
    try:
        pool.start()
        until_idle()
        first = prepared.runs[0]
        pool.submit(WorkGroup(101, (first,)))
        events = pool.poll(0.0)
        assert [type(e) for e in events] == [GroupStarted]  # sent; it trains 0.2 s before it answers
        worker = pool._members[0]
        worker.process.join(timeout=60)  # no polling meanwhile: dead, its record unread in the pipe
        assert worker.process.exitcode == -signal.SIGKILL
        # the death seen before the pipe is read (`wait` may give the sentinel first)
        pool._died(worker)
        events = []
        deadline = time.monotonic() + 30
        while not any(isinstance(e, RecordsReturned) for e in events) and time.monotonic() < deadline:
            events += pool.poll(0.2)
        returned = [e for e in events if isinstance(e, RecordsReturned)]
        assert [r.run_id for e in returned for r in e.records] == [first.run_id]
        assert returned[0].records[0].status is RunStatus.DONE
        assert not any(isinstance(e, GroupLost) for e in events)
        fresh = pool._members[0]
        assert fresh is not worker  # replaced
        until_idle()
        second = prepared.runs[1]
        pool.submit(WorkGroup(102, (second,)))
        events = []
        deadline = time.monotonic() + 60
        while not any(isinstance(e, RecordsReturned) for e in events) and time.monotonic() < deadline:
            events += pool.poll(0.2)
        assert [r.run_id for e in events if isinstance(e, RecordsReturned) for r in e.records] == [second.run_id]
    finally:
        pool.shutdown()
    assert [c["seed"] for c in calls(log)] == [first.seed, second.seed]  # each trained once


def test_retries_rerun_failed_runs_within_the_sweep(prepared, log: Path, tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "h.db") as store:
        outcome = run_sweep(prepared, store=store, pool=pool_for(prepared, "flaky"), retries=1)
        assert all(s is RunStatus.DONE for s in store.statuses(r.run_id for r in prepared.runs).values())
        assert all(store.attempts(r.run_id) == 2 for r in prepared.runs)
    # the outcome counts runs, not attempts
    assert outcome.trained == 8 and outcome.failed == 0 and outcome.attempts == 16 and len(calls(log)) == 16


SWEEP_SCRIPT = """
import dataclasses
import sys
from harness.devices import plan_workers
from harness.execute import SweepOptions, run_sweep
from harness.executor import Trainer
from harness.scheduler import DataSource, LocalPoolExecutor
from harness.spec import load_sweep
from harness.store import SQLiteStore
from harness.sweep import prepare_sweep


def main():
    sweep, store, data_dir, train_fn, first = sys.argv[1:]
    prepared = prepare_sweep(load_sweep(sweep), data_dir=data_dir)
    prepared = dataclasses.replace(prepared, runs=prepared.runs[int(first):])
    slots = plan_workers(gpus=[], pending=len(prepared.runs), cpu_count=2)
    source = DataSource(ref=prepared.spec.dataset, subset=prepared.spec.subset, data_dir=prepared.data_dir)
    pool = LocalPoolExecutor(slots, source=source, trainer=Trainer(run=f"fake_train:{train_fn}"))
    with SQLiteStore(store) as s:
        try:
            run_sweep(prepared, store=s, executor=pool, options=SweepOptions(fuse=1),
                      open_store=lambda: SQLiteStore(store, create=False))
        finally:
            pool.shutdown()


if __name__ == "__main__":
    main()
"""


def sweep_process(tmp_path: Path, prepared, data_dir: Path, *, train_fn: str, first: int = 0, **env: str) -> subprocess.Popen:
    """A separate Python process running a worker pool over the sweep (from run `first` on)."""
    script = tmp_path / "one_sweep.py"
    if not script.exists():  # written once: a second process may already be reading it
        script.write_text(SWEEP_SCRIPT)
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path]), **env}
    args = [sys.executable, str(script), prepared.spec.source, str(tmp_path / "h.db"), str(data_dir), train_fn, str(first)]
    return subprocess.Popen(args, env=environ)


@pytest.mark.slow
def test_two_sweeps_on_one_store_never_train_a_run_twice(prepared, log: Path, tmp_path: Path, data_dir: Path) -> None:
    SQLiteStore(tmp_path / "h.db").close()
    procs = [sweep_process(tmp_path, prepared, data_dir, train_fn="ok", HARNESS_FAKE_SLEEP="1.0") for _ in range(2)]
    assert [p.wait(timeout=180) for p in procs] == [0, 0]
    made = Counter(c["run_id"] for c in calls(log))
    assert sorted(made) == sorted(r.run_id for r in prepared.runs)
    assert set(made.values()) == {1}, made
    assert len({c["pid"] for c in calls(log)}) >= 3  # both sweeps did part of the work


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "State:\tZ" in status.read_text())


@pytest.mark.slow
def test_sigkill_of_the_parent_leaves_no_orphan_workers(prepared, log: Path, tmp_path: Path, data_dir: Path) -> None:
    parent = sweep_process(tmp_path, prepared, data_dir, train_fn="crashy", first=3)
    deadline = time.monotonic() + 60
    while not any(c["seed"] == 3 for c in calls(log)):  # a worker is now hanging in a run
        assert time.monotonic() < deadline and parent.poll() is None
        time.sleep(0.05)
    workers = {c["pid"] for c in calls(log)}
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=10)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers), "worker processes outlived their killed parent"


def test_longest_runs_first(prepared) -> None:
    ordered = order_longest_first(prepared.runs)
    flops = [r.estimated_train_flops for r in ordered]
    assert flops == sorted(flops, reverse=True)
    assert ordered[0].variant.name == "cnn_8"


def test_a_step_bound_run_counts_its_steps_not_only_its_flops(prepared) -> None:
    """A step-bound run (like seed 004's 50 epochs at batch 32: many cheap steps) is longer than a
    run of more FLOPs in far fewer steps."""
    import dataclasses

    from harness.sweep import expected_seconds

    cnn = next(r for r in prepared.runs if r.variant.name == "cnn_8")
    mlp = next(r for r in prepared.runs if r.variant.name == "mlp_32")
    long_mlp = dataclasses.replace(mlp, variant=dataclasses.replace(mlp.variant, epochs=2, batch_size=1))
    assert long_mlp.estimated_train_flops < cnn.estimated_train_flops
    assert expected_seconds(long_mlp) > expected_seconds(cnn)
    assert order_longest_first([cnn, long_mlp])[0] is long_mlp


def test_the_notebooks_groups_start_in_the_order_of_their_measured_times(data_dir: Path) -> None:
    """The notebooks sweep on 2 workers (2026-12-01, TensorFlow, 5 seeds fused): its groups took
    258 s (seed 004), 186 s (seed 000's 256x4), 188 s (the CNN), 132 s (seed 002), then 42 s and
    less. Under issue 8's prior (3 ms a step) the 10-epoch, batch-32 64x2 (18,750 steps, 42 s)
    came before the CNN (1,920 steps, 188 s), which then ran alone for the last 27 s. The prior
    of today's engine starts the four long groups first, the CNN before every short one."""
    from harness.execute import form_groups, order_groups

    notebooks = prepare_sweep(load_sweep(Path(__file__).resolve().parents[1] / "sweeps" / "seed_notebooks.yaml"),
                              data_dir=data_dir)
    order = [group[0].variant.name for group in order_groups(form_groups(list(notebooks.runs), 5))]
    assert order[:2] == ["seed004_mlp_64x5_raw", "seed000_256x4_sigmoid_raw"]
    assert set(order[2:4]) == {"seed002_mlp_256x2_dropout", "seed001_cnn_12_20"}


def test_progress_line_shows_device_activity(prepared) -> None:
    stream = io.StringIO()
    progress = Progress(prepared.runs, stream=stream, every_s=0.0)
    progress.started(prepared.runs[0], "gpu0.1")
    progress.tick([("gpu0.1", prepared.runs[0], 12.0)])
    text = stream.getvalue()
    assert "gpu0.1: start mlp_32 seed=0" in text
    assert "running: gpu0.1 mlp_32 s0 12s" in text and "running 1 pending 7" in text


def test_leases_are_renewed_while_a_long_run_trains(prepared, log: Path, tmp_path: Path, monkeypatch) -> None:
    """A run that trains longer than the lease keeps its claim: another sweep watching it (with
    the same lease) never sees it stop moving, so never takes it over."""
    import threading

    from harness.leases import Claim, LeaseKeeper

    monkeypatch.setenv("HARNESS_FAKE_SLEEP", "6")
    run = prepared.runs[0]
    seen: list[Claim] = []
    with SQLiteStore(tmp_path / "h.db") as store:
        pool = pool_for(prepared, "ok", workers=1)

        def intruder() -> None:
            other_sweep = LeaseKeeper(owner="remote-host:1:intruder", lease_s=2.0)
            with SQLiteStore(tmp_path / "h.db") as other:
                deadline = time.monotonic() + 60
                while not calls(log) and time.monotonic() < deadline:
                    time.sleep(0.05)
                for _ in range(16):  # 4 s, twice the lease
                    seen.append(other_sweep.claim(other, run.run_id))
                    time.sleep(0.25)

        thread = threading.Thread(target=intruder)
        thread.start()
        prepared_one = dataclasses.replace(prepared, runs=(run,))
        run_sweep(prepared_one, store=store, pool=pool, lease_s=2.0)
        thread.join()
    assert seen and set(seen) <= {Claim.HELD, Claim.FINISHED} and seen[0] is Claim.HELD
    assert len(calls(log)) == 1


def test_progress_on_a_terminal_redraws_the_live_line(prepared) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    progress = Progress(prepared.runs, stream=stream)
    assert progress.every_s == 1.0  # a terminal gets a live line every second, a log every 15 s
    progress.every_s = 0.0
    progress.tick([("cpu.0", prepared.runs[0], 3.0)])
    progress.started(prepared.runs[1], "cpu.1")
    progress.close()
    text = stream.getvalue()
    assert text.count("\r\x1b[K  running: cpu.0 mlp_32 s0 3s") == 2  # drawn, then redrawn under the event
    assert "\r\x1b[K  cpu.1: start mlp_32 seed=1\n" in text
    assert text.endswith("\r\x1b[K")


def test_worker_that_cannot_start_is_a_clear_error(prepared, log: Path, tmp_path: Path, monkeypatch) -> None:
    from harness.errors import WorkerStartError

    monkeypatch.setenv("HARNESS_FAKE_BROKEN_INSTALL", "1")
    with SQLiteStore(tmp_path / "h.db") as store:
        with pytest.raises(WorkerStartError, match="died while starting .exit code 1.*--in-process"):
            run_sweep(prepared, store=store, pool=pool_for(prepared, "ok"))
        assert store.statuses(r.run_id for r in prepared.runs) == {} and store.claims() == {}
    assert calls(log) == []


def test_runs_go_only_to_workers_of_their_keras_backend(tmp_path: Path, data_dir: Path, log: Path) -> None:
    """A sweep over two backends on two TensorFlow workers: idle workers are restarted as JAX
    workers for the JAX runs; every run trains in a process whose KERAS_BACKEND is its own."""
    text = tiny_sweep_text(seeds=3, train=600, test=100) + "grid:\n  budget.keras_backend: [tensorflow, jax]\n"
    prepared = prepare_sweep(load_sweep(write_sweep(tmp_path / "s.yaml", text)), data_dir=data_dir)
    planned = {r.run_id: r.backend.backend for r in prepared.runs}
    assert set(planned.values()) == {"tensorflow", "jax"}
    pool = pool_for(prepared, "ok")
    with SQLiteStore(tmp_path / "h.db") as store:
        records = run_sweep(prepared, store=store, pool=pool).records
    assert len(records) == len(prepared.runs) == 12
    trained = calls(log)
    assert sorted(c["run_id"] for c in trained) == sorted(planned)
    assert all(c["keras_backend"] == planned[c["run_id"]] for c in trained)
    assert pool.stats.worker_starts >= 3  # two TensorFlow workers, then at least one JAX worker
