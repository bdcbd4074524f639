"""The one sweep routine (harness/execute.py): claim -> dispatch -> record -> store -> retry.

Event logic is checked on the routine's recorded event order with an injected clock: the inline
executor's idle wait advances the fake clock, and a scripted executor stands in for workers only
where the point is how the routine reacts to what workers report (lost groups, timeouts).
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pytest

from harness.execute import SweepOptions, form_groups, order_groups, run_sweep
from harness.sweep import expected_seconds
from harness.executor import GroupStarted, InlineExecutor, RecordsReturned
from harness.leases import Claim, LeaseKeeper
from harness.plan import PlannedRun
from harness.records import RunStatus
from harness.spec import load_sweep
from harness.store import SQLiteStore
from harness.sweep import Progress, prepare_sweep

from conftest import tiny_sweep_text, write_sweep


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Trainer:
    """Per-run fake: records calls; fails (variant, seed) pairs the first `fail_times` times."""

    def __init__(self, fail: set[tuple[str, int]] = frozenset(), fail_times: int = 1, clock: FakeClock | None = None,
                 takes_s: float = 0.0) -> None:
        self.calls: list[tuple[str, int]] = []
        self.fail = {key: fail_times for key in fail}
        self.clock, self.takes_s = clock, takes_s

    def __call__(self, run: PlannedRun, dataset):
        key = (run.variant.name, run.seed)
        self.calls.append(key)
        if self.clock is not None:
            self.clock.advance(self.takes_s)
        if self.fail.get(key, 0) > 0:
            self.fail[key] -= 1
            return run.record(RunStatus.FAILED, error="Traceback...\nRuntimeError: transient")
        return run.record(RunStatus.DONE, metrics={"test_accuracy": 0.9}, timings={"wall_s": 0.01})


@pytest.fixture()
def prepared(tmp_path: Path, data_dir: Path):
    spec = load_sweep(write_sweep(tmp_path / "s.yaml", tiny_sweep_text(seeds=3, train=300, test=100)))
    return prepare_sweep(spec, data_dir=data_dir)


def quiet() -> Progress:
    return Progress((), stream=io.StringIO())


def inline(prepared, trainer, clock: FakeClock | None = None) -> InlineExecutor:
    sleep = clock.advance if clock is not None else (lambda _s: None)
    return InlineExecutor(prepared.dataset, train=trainer, per_run=True, sleep=sleep)


def kinds(trace, *names):
    return [event for event in trace if event[0] in names]


class Watching(Progress):
    """A quiet progress that keeps every queue the dispatcher tells it (`Progress.grouped`)."""

    def __init__(self, runs=()) -> None:
        super().__init__(runs, stream=io.StringIO())
        self.queues: list[list[tuple[str, ...]]] = []

    def grouped(self, queue) -> None:
        queue = [tuple(group) for group in queue]
        self.queues.append(queue)
        super().grouped(queue)


def test_a_retried_run_is_recorded_claimed_again_and_counted_once(prepared, tmp_path: Path) -> None:
    trainer = Trainer(fail={("mlp_32", 1)})
    trace: list[tuple] = []
    progress = Watching()
    with SQLiteStore(tmp_path / "h.db") as store:
        outcome = run_sweep(prepared, store=store, executor=inline(prepared, trainer), options=SweepOptions(retries=2),
                            progress=progress, trace=trace)
    # the ETA is told the queue as it changes: every group, less each one handed out, and the
    # retried run alone at its front
    assert sorted(r for group in progress.queues[0] for r in group) == sorted(r.run_id for r in prepared.runs)
    assert progress.queues[1] == progress.queues[0][1:]  # one worker (in this process): one group out
    assert any(queue[:1] == [(prepared.runs[1].run_id,)] for queue in progress.queues)
    assert progress.queues[-1] == []
    with SQLiteStore(tmp_path / "h.db", create=False) as store:
        assert store.attempts(prepared.runs[1].run_id) == 2 and store.claims() == {}
    target = prepared.runs[1].run_id
    mine = [e for e in trace if target in e or (e[0] == "submit" and target in e[2])]
    assert [e[0] for e in mine] == ["claim", "submit", "record", "claim", "submit", "record"]
    assert mine[2][2] == "failed" and mine[5][2] == "done"
    assert outcome.trained == 6 and outcome.failed == 0 and outcome.attempts == 7
    assert trainer.calls.count(("mlp_32", 1)) == 2


def test_retries_stop_after_n_and_the_last_record_counts(prepared, tmp_path: Path) -> None:
    trainer = Trainer(fail={("cnn_8", 0)}, fail_times=5)
    with SQLiteStore(tmp_path / "h.db") as store:
        outcome = run_sweep(prepared, store=store, executor=inline(prepared, trainer), options=SweepOptions(retries=1),
                            progress=quiet())
    assert trainer.calls.count(("cnn_8", 0)) == 2
    assert outcome.trained == 6 and outcome.failed == 1 and outcome.has_failed_runs and outcome.attempts == 7


def test_a_run_held_by_a_live_sweep_waits_and_is_taken_once_its_lease_stops(prepared, tmp_path: Path) -> None:
    clock = FakeClock()
    held = prepared.runs[0]
    trace: list[tuple] = []
    with SQLiteStore(tmp_path / "h.db") as store:
        other = LeaseKeeper(owner="other-host:7:x:pid9:b00t", lease_s=30, clock=clock)
        assert other.claim(store, held.run_id) is Claim.CLAIMED
        keeper = LeaseKeeper(lease_s=30, clock=clock)
        run_sweep(prepared, store=store, executor=inline(prepared, Trainer(), clock), keeper=keeper,
                  options=SweepOptions(lease_s=30), progress=quiet(), clock=clock, trace=trace)
        assert store.statuses([held.run_id]) == {held.run_id: RunStatus.DONE}
    claims = [(e[2], e) for e in kinds(trace, "claim") if e[1] == held.run_id]
    assert claims[0][0] == "held" and claims[-1][0] == "claimed"
    assert [c for c, _e in claims].count("claimed") == 1
    records = [e[1] for e in kinds(trace, "record")]
    assert records[-1] == held.run_id and len(records) == 6  # the others did not wait for it
    assert clock.now >= 30  # taken over only after a whole lease without renewal (fake time)


def test_a_run_another_sweep_finishes_meanwhile_is_not_trained(prepared, tmp_path: Path) -> None:
    clock = FakeClock()
    held = prepared.runs[0]
    with SQLiteStore(tmp_path / "h.db") as store:
        other = LeaseKeeper(owner="other-host:7:x:pid9:b00t", lease_s=30, clock=clock)
        other.claim(store, held.run_id)

        def sleep(seconds: float) -> None:  # the other sweep renews, then stores its result
            clock.advance(seconds)
            other.renew(store)
            if clock.now > 20 and store.get(held.run_id) is None:
                store.put(held.record(RunStatus.DONE, metrics={"test_accuracy": 0.5}))

        trainer = Trainer()
        executor = InlineExecutor(prepared.dataset, train=trainer, per_run=True, sleep=sleep)
        progress = Watching(prepared.runs)
        outcome = run_sweep(prepared, store=store, executor=executor, options=SweepOptions(lease_s=30),
                            keeper=LeaseKeeper(lease_s=30, clock=clock), progress=progress, clock=clock)
    assert (held.variant.name, held.seed) not in trainer.calls
    assert outcome.trained == 5 and outcome.finished_elsewhere == 1
    # the progress counts it out: not pending for the rest of the sweep, nor in the ETA
    assert (progress.total, progress.done, progress.pending) == (5, 5, 0) and held.run_id not in progress.costs
    # held, it came back in a queue of its own once nothing else was left
    assert [(held.run_id,)] in progress.queues


def test_a_retry_another_sweep_finished_meanwhile_is_not_a_failure(prepared, tmp_path: Path) -> None:
    """Seed 1 fails here and is queued again; before its retry is claimed, another sweep on the
    store finishes it. The store's DONE record stands: this sweep reports no failure, trains it
    no more, and its progress counts it out with a line saying why."""
    trainer = Trainer(fail={("mlp_32", 1)})
    target = next(r for r in prepared.runs if r.variant.name == "mlp_32" and r.seed == 1)
    with SQLiteStore(tmp_path / "h.db") as store:

        class OtherSweepFinishesIt(Watching):
            def retried(self, record, attempt, retries) -> None:
                super().retried(record, attempt, retries)
                store.put(target.record(RunStatus.DONE, metrics={"test_accuracy": 0.5}))

        progress = OtherSweepFinishesIt(prepared.runs)
        outcome = run_sweep(prepared, store=store, executor=inline(prepared, trainer), options=SweepOptions(retries=1),
                            progress=progress)
        assert store.statuses([target.run_id]) == {target.run_id: RunStatus.DONE}
    assert trainer.calls.count(("mlp_32", 1)) == 1
    assert outcome.failed == 0 and not outcome.has_failed_runs and outcome.finished_elsewhere == 1
    assert (progress.total, progress.done, progress.failed, progress.pending) == (5, 5, 0, 0)
    assert "mlp_32 seed=1: finished by another sweep meanwhile" in progress.stream.getvalue()


def test_groups_are_formed_from_pending_runs_of_one_variant(prepared, tmp_path: Path) -> None:
    """Resume trains exactly the missing seeds, fused or not."""
    with SQLiteStore(tmp_path / "h.db") as store:
        store.put(prepared.runs[1].record(RunStatus.DONE, metrics={"test_accuracy": 0.9}))  # mlp_32 seed 1
        trace: list[tuple] = []
        trainer = Trainer()
        outcome = run_sweep(prepared, store=store, executor=inline(prepared, trainer), options=SweepOptions(fuse=3),
                            progress=quiet(), trace=trace)
    groups = [tuple(e[2]) for e in kinds(trace, "submit")]
    by_id = {r.run_id: (r.variant.name, r.seed) for r in prepared.runs}
    named = sorted(tuple(by_id[i] for i in g) for g in groups)
    assert named == [(("cnn_8", 0), ("cnn_8", 1), ("cnn_8", 2)), (("mlp_32", 0), ("mlp_32", 2))]
    assert outcome.skipped == 1 and outcome.trained == 5 and ("mlp_32", 1) not in trainer.calls


def test_on_a_gpu_the_worker_memory_share_sizes_the_auto_groups(prepared, tmp_path: Path) -> None:
    """Auto fusion on a (simulated) GPU: the groups are as wide as the worker's share of its GPU
    holds by the model's estimate (the inputs once, the copies each), not the cap."""
    from harness.devices import parse_nvidia_smi
    from harness.execute import gpu_worker_memory_bytes
    from harness.fusion import copy_memory_bytes, shared_memory_bytes

    gpus = parse_nvidia_smi("0, NVIDIA H100 80GB HBM3, 81559\n1, NVIDIA H100 80GB HBM3, 40000\n")
    assert gpu_worker_memory_bytes(gpus, 4) == int(40000 * 2**20 * 0.9 / 4)  # the smaller GPU, its share
    assert gpu_worker_memory_bytes([], 1) is None
    assert gpu_worker_memory_bytes(parse_nvidia_smi("0, some GPU, 0\n"), 1) is None  # size unknown
    cnn = [r for r in prepared.runs if r.variant.name == "cnn_8"]
    budget = shared_memory_bytes(cnn[0]) + 2 * copy_memory_bytes(cnn[0]) + 1
    with SQLiteStore(tmp_path / "h.db") as store:
        trace: list[tuple] = []
        run_sweep(prepared, store=store, executor=inline(prepared, Trainer()), progress=quiet(), trace=trace,
                  device_kind="gpu", memory_bytes=budget)
    by_id = {r.run_id: r.variant.name for r in prepared.runs}
    widths = sorted(len(e[2]) for e in kinds(trace, "submit") if by_id[e[2][0]] == "cnn_8")
    assert widths == [1, 2]  # 3 seeds, at most 2 copies in the budget


def test_groups_run_longest_first_and_one_backend_after_the_other(prepared) -> None:
    import dataclasses

    jax = dataclasses.replace(prepared.runs[0].backend, backend="jax")
    runs = [dataclasses.replace(r, backend=jax) if r.variant.name == "mlp_32" and r.seed == 2 else r for r in prepared.runs]
    ordered = order_groups(form_groups(runs, 2))
    backends = [g[0].backend.backend for g in ordered]
    assert backends == sorted(backends, key=lambda b: b == "jax")  # the backend with most runs first
    tf_groups = [g for g in ordered if g[0].backend.backend == "tensorflow"]
    expected = [sum(expected_seconds(r) for r in g) for g in tf_groups]
    assert expected == sorted(expected, reverse=True) and tf_groups[0][0].variant.name == "cnn_8"
    assert all(len({(r.variant.name, r.backend.backend) for r in g}) == 1 and len(g) <= 2 for g in ordered)


def test_ctrl_c_releases_the_claims_and_records_nothing_half_done(prepared, tmp_path: Path) -> None:
    class Interrupting(Trainer):
        def __call__(self, run, dataset):
            if len(self.calls) == 2:
                raise KeyboardInterrupt
            return super().__call__(run, dataset)

    trace: list[tuple] = []
    with SQLiteStore(tmp_path / "h.db") as store:
        with pytest.raises(KeyboardInterrupt):
            run_sweep(prepared, store=store, executor=inline(prepared, Interrupting()), options=SweepOptions(fuse=2),
                      progress=quiet(), trace=trace)
        assert store.claims() == {}
        statuses = store.statuses(r.run_id for r in prepared.runs)
    assert list(statuses.values()) == [RunStatus.DONE, RunStatus.DONE]  # the first group of two, stored
    assert trace[-1][0] == "interrupted" and len(trace[-1][1]) >= 1  # it held the next group's claims


class ScriptedExecutor:
    """Plays back what workers would report; records what the routine asks of it. `hang` and
    `lose` name groups by the order they were submitted in (1: the first)."""

    def __init__(self, clock: FakeClock, *, hang: set[int] = frozenset(), lose: set[int] = frozenset()) -> None:
        self.clock, self.hang, self.lose = clock, set(hang), set(lose)
        self.submitted: list = []
        self.cancelled: list[int] = []
        self.pending: list = []
        self.busy: set[int] = set()
        self.stopped = False

    def start(self) -> None: ...
    def describe(self) -> str: return "scripted"
    def summary(self): return None
    def shutdown(self) -> None: self.stopped = True

    def idle_backends(self):
        return [None] if len(self.busy) < 2 else []

    def submit(self, group) -> None:
        self.submitted.append(group)
        self.busy.add(group.group_id)
        self.pending.append(group)

    def cancel(self, group_id: int) -> None:
        self.cancelled.append(group_id)
        self.busy.discard(group_id)

    def poll(self, timeout_s: float):
        from harness.executor import GroupLost

        self.clock.advance(timeout_s)
        events = []
        for group in self.pending:
            ordinal = self.submitted.index(group) + 1
            events.append(GroupStarted(group.group_id, f"w{group.group_id}", "cpu"))
            if ordinal in self.lose:
                events.append(GroupLost(group.group_id, "worker process w died (signal SIGKILL)"))
                self.busy.discard(group.group_id)
            elif ordinal not in self.hang:
                records = tuple(r.record(RunStatus.DONE, metrics={"test_accuracy": 0.9}) for r in group.runs)
                events.append(RecordsReturned(group.group_id, records))
                self.busy.discard(group.group_id)
        self.pending = []
        return events


def test_a_group_past_its_timeout_is_cancelled_then_failed_with_the_cause(prepared, tmp_path: Path) -> None:
    clock = FakeClock()
    executor = ScriptedExecutor(clock, hang={1})
    trace: list[tuple] = []
    with SQLiteStore(tmp_path / "h.db") as store:
        outcome = run_sweep(prepared, store=store, executor=executor, options=SweepOptions(timeout_s=10, fuse=3),
                            progress=quiet(), clock=clock, trace=trace)
        records = {r.run_id: r for r in outcome.records}
        hung = executor.submitted[0]
        assert executor.cancelled == [hung.group_id]
        assert all(records[i].status is RunStatus.FAILED and "timed out after 30 s" in records[i].error
                   for i in hung.run_ids)  # 3 runs: 3 x 10 s
        assert store.claims() == {}
    lost = kinds(trace, "lost")
    assert len(lost) == 1 and trace.index(lost[0]) < trace.index(kinds(trace, "record")[-1])


def test_a_lost_group_fails_its_runs_and_is_retried(prepared, tmp_path: Path) -> None:
    clock = FakeClock()
    executor = ScriptedExecutor(clock, lose={1})
    with SQLiteStore(tmp_path / "h.db") as store:
        outcome = run_sweep(prepared, store=store, executor=executor, options=SweepOptions(retries=1, fuse=1),
                            progress=quiet(), clock=clock)
        first = executor.submitted[0].run_ids[0]
        assert store.attempts(first) == 2 and store.get(first).status is RunStatus.DONE
    assert outcome.trained == 6 and outcome.failed == 0 and outcome.attempts == 7


def test_execute_sweep_is_the_cli_s_one_call(tmp_path: Path, data_dir: Path, monkeypatch) -> None:
    from harness.execute import ExecutorKind, execute_sweep
    from harness.report import load_results

    monkeypatch.setenv("HARNESS_FAKE_SLEEP", "0")
    spec = load_sweep(write_sweep(tmp_path / "s.yaml", tiny_sweep_text(seeds=2, train=300, test=100)))
    notes: list[str] = []
    options = SweepOptions(store=tmp_path / "h.db", data_dir=data_dir, executor="inline", train_fn="fake_train:ok")
    assert options.executor is ExecutorKind.INLINE
    outcome = execute_sweep(spec, options, notify=notes.append, progress=quiet())
    assert outcome.planned == 4 and outcome.trained == 4 and notes == ["workers: none (training in this process)"]
    again = execute_sweep(spec, options, notify=notes.append, progress=quiet())
    assert again.trained == 0 and again.skipped == 4
    with SQLiteStore(tmp_path / "h.db") as store:
        assert load_results(store, "tiny").summary.set_index("variant").loc["mlp_32", "n"] == 2


@pytest.mark.parametrize(
    "kwargs, key",
    [({"retries": -1}, "--retries"), ({"fuse": 0}, "--fuse"), ({"timeout_s": float("nan")}, "--timeout"),
     ({"address": "auto"}, "--address")],
)
def test_bad_options_are_one_line_errors(kwargs, key) -> None:
    from harness.errors import UserError

    with pytest.raises(UserError, match=key):
        SweepOptions(**kwargs)


def test_a_resumed_sweep_orders_and_estimates_from_what_the_store_holds(prepared, tmp_path: Path) -> None:
    """Seed 0 of each variant finished before: here the MLP's took 100 s and the CNN's 1 s. The
    prior alone starts the CNN first (more FLOPs); what the store holds starts the MLP first,
    and the progress line has an ETA before any run of this sweep finished. Runs measured on
    another kind of device (a GPU) and failed runs say nothing about this one."""
    from harness.sweep import Expectation, finished_runs

    mlp, cnn = ([r for r in prepared.runs if r.variant.name == name] for name in ("mlp_32", "cnn_8"))
    assert order_groups(form_groups(mlp[1:] + cnn[1:], 1))[0][0].variant.name == "cnn_8"  # the prior's order
    here = "cpu x86_64 (1 threads)"
    with SQLiteStore(tmp_path / "h.db") as store:
        store.put(mlp[0].record(RunStatus.DONE, metrics={"test_accuracy": 0.9}, timings={"wall_s": 100.0}, device=here))
        store.put(cnn[0].record(RunStatus.DONE, metrics={"test_accuracy": 0.9}, timings={"wall_s": 1.0}, device=here))
        store.put(cnn[1].record(RunStatus.DONE, metrics={"test_accuracy": 0.9}, timings={"wall_s": 500.0}, device="NVIDIA H100"))
        store.put(mlp[1].record(RunStatus.FAILED, error="boom", timings={"wall_s": 900.0}, device=here))
        finished = finished_runs(prepared.runs, store, device_kind="cpu")
        assert sorted((f.run_id, f.seconds) for f in finished) == sorted([(mlp[0].run_id, 100.0), (cnn[0].run_id, 1.0)])
        known = Expectation.of(finished)
        assert known.seconds(mlp[2]) == 100.0 and known.seconds(cnn[2]) == 1.0

        progress = Progress([r for r in prepared.runs if r.seed > 0], stream=io.StringIO())
        lines: list[str] = []

        class Watching(Trainer):
            def __call__(self, run, dataset):
                lines.append(progress.counts())  # while the first run trains, before any finished
                return super().__call__(run, dataset)

        trace: list[tuple] = []
        run_sweep(prepared, store=store, executor=inline(prepared, Watching()), options=SweepOptions(fuse=1),
                  progress=progress, trace=trace)
    submitted = [prepared_names(prepared)[event[2][0]] for event in kinds(trace, "submit")]
    assert submitted == ["mlp_32", "cnn_8"]  # seed 2 of each (seed 1: failed, and done elsewhere)
    assert "done 0 failed 0" in lines[0] and "ETA ?" not in lines[0], lines[0]


def prepared_names(prepared) -> dict[str, str]:
    return {r.run_id: r.variant.name for r in prepared.runs}


def test_group_ids_are_never_reused_across_sweep_rounds(prepared, tmp_path: Path) -> None:
    """One executor serves every round of adaptive seeds; a late message of a group of an earlier
    round must not be taken for a group of this one, so no id comes twice."""
    traces: list[list[tuple]] = [[], []]
    with SQLiteStore(tmp_path / "h.db") as store:
        executor = inline(prepared, Trainer())
        for trace, seeds in zip(traces, ({0}, {1, 2})):
            chosen = dataclasses.replace(prepared, runs=[r for r in prepared.runs if r.seed in seeds])
            run_sweep(chosen, store=store, executor=executor, progress=quiet(), trace=trace)
    first, second = ({event[1] for event in kinds(trace, "submit")} for trace in traces)
    assert first and second and not first & second
