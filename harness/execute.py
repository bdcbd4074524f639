"""Run a sweep: `execute_sweep(spec, options) -> SweepOutcome`, the one library entry point.

One routine (`run_sweep`, driving a `_Dispatcher`) owns a sweep's bookkeeping, whatever trains it:

    plan -> pending runs -> groups (one variant, `fuse` runs each) -> longest first
         -> claim each run (harness.leases) -> hand the group to the executor
         -> records come back -> store each at once -> retry FAILED ones (`retries`)
         -> timeouts, lost workers and Ctrl-C / SIGTERM handled here, the same for every executor

Executors (`harness.executor`) only start workers, hand them groups and report events: inline
(this process), the local process pool (default) and Ray (`executor="ray"`). The CLI maps its
flags onto `SweepOptions`; tests and benchmarks call `execute_sweep` or `run_sweep` directly.

`SweepOutcome` counts runs (each run's last record), not attempts (`attempts` has those).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import itertools
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from harness.devices import chosen_gpus, gpu_worker_memory_bytes
from harness.errors import UserError
from harness.executor import (
    DEFAULT_TRAIN_FN,
    Executor,
    ExecutorEvent,
    GroupLost,
    GroupProgress,
    GroupStarted,
    InlineExecutor,
    RecordsReturned,
    Trainer,
    WorkGroup,
    backend_of,
    failed_record,
)
from harness.leases import LEASE_S, Claim, LeaseKeeper
from harness.plan import PlannedRun
from harness.records import RunRecord, RunStatus
from harness.spec import SweepSpec
from harness.store import DEFAULT_STORE, ResultStore
from harness.sweep import (
    Expectation,
    PreparedSweep,
    Progress,
    expected_seconds,
    finished_runs,
    order_longest_first,
    pending_runs,
    sweep_info,
)

POLL_S = 0.25
# Group ids are unique in this process, not only in one dispatcher: an executor outlives a round
# of adaptive seeds, and a late message of an old group must not pass for a new one's.
_GROUP_IDS = itertools.count(1)


class ExecutorKind(enum.Enum):
    INLINE = "inline"  # this process (`--in-process`)
    POOL = "pool"  # worker processes on this machine (default)
    RAY = "ray"  # actors on a Ray cluster


@dataclasses.dataclass(frozen=True)
class SweepOptions:
    """How to run a sweep (what to run is the `SweepSpec`). Every field has the CLI's default."""

    store: Path = DEFAULT_STORE
    data_dir: Path | None = None  # folder of the data files (default: $HARNESS_DATA_DIR)
    executor: ExecutorKind = ExecutorKind.POOL
    address: str | None = None  # Ray cluster address (default: $RAY_ADDRESS, else a local cluster)
    rerun_failed: bool = False  # train runs stored as FAILED again
    retries: int = 0  # retry a run that fails during this sweep up to N times
    timeout_s: float | None = None  # per run; a group of K runs gets K times this
    fuse: int | None = None  # runs of one variant per group; None: auto (1 until fused training lands)
    gpus: tuple[int, ...] | None = None  # None: every GPU nvidia-smi lists; (): CPU only
    runs_per_gpu: int = 1
    workers: int | None = None  # CPU workers (default: one per core)
    threads: int | None = None  # threads per worker (default: cores / workers)
    train_fn: str = DEFAULT_TRAIN_FN  # 'module:function', (run, dataset) -> RunRecord
    train_group: str | None = None  # 'module:function', (runs, dataset) -> list[RunRecord]
    lease_s: float = LEASE_S

    def __post_init__(self) -> None:
        if not isinstance(self.executor, ExecutorKind):
            object.__setattr__(self, "executor", ExecutorKind(self.executor))
        if self.retries < 0:
            raise UserError("must be 0 or more", key="--retries")
        if self.fuse is not None and self.fuse < 1:
            raise UserError("must be at least 1", key="--fuse")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise UserError(f"must be a positive number of seconds (got {self.timeout_s})", key="--timeout")
        if self.address is not None and self.executor is not ExecutorKind.RAY:
            raise UserError("--address is for --executor ray", key="--address")
        if self.gpus and self.executor is ExecutorKind.RAY:
            raise UserError(
                "Ray gives each actor its GPU: use --gpus none for CPU actors only, or leave --gpus out",
                key="--gpus",
            )

    @property
    def trainer(self) -> Trainer:
        """The default trainer trains a group fused (`harness.fused.train_group`: K seeds as one
        Keras program; a group of one is a plain run); a custom run function loops."""
        group = self.train_group
        if group is None and self.train_fn == DEFAULT_TRAIN_FN:
            group = FUSED_GROUP_TRAINER
        return Trainer(run=self.train_fn, group=group)


@dataclasses.dataclass(frozen=True)
class SweepOutcome:
    """What a sweep did, counted in runs."""

    planned: int  # distinct runs in the plan
    skipped: int  # already in the store when the sweep started
    records: tuple[RunRecord, ...]  # the last record of each run this sweep trained
    attempts: int  # trainings started, retries included
    finished_elsewhere: int = 0  # runs another sweep on the store finished meanwhile
    executor_summary: str | None = None

    @property
    def trained(self) -> int:
        return len(self.records)

    @property
    def failed(self) -> int:
        """Runs whose last record is FAILED or DIVERGED."""
        return sum(1 for r in self.records if r.status.is_failure())

    @property
    def has_failed_runs(self) -> bool:
        """A run FAILED (not diverged: that is a result): `harness sweep` exits 1."""
        return any(r.status is RunStatus.FAILED for r in self.records)


# --------------------------------------------------------------------------- groups

FUSED_GROUP_TRAINER = "harness.fused:train_group"


def fuse_width(
    fuse: int | None, runs: Sequence[PlannedRun] = (), *, device_kind: str = "cpu", memory_bytes: int | None = None
) -> Callable[[PlannedRun], int]:
    """Runs per group, per variant: `fuse` (1: off), or for None (auto) what `harness.fusion`
    chooses from the device kind, the model's memory estimate and `memory_bytes` (a worker's
    share of its GPU; None: unknown) (builder models: 1)."""
    from harness.fusion import fuse_width as width_of

    return lambda run: width_of(fuse, [run], device_kind=device_kind, memory_bytes=memory_bytes)


def form_groups(runs: Sequence[PlannedRun], width: int | Callable[[PlannedRun], int]) -> list[tuple[PlannedRun, ...]]:
    """Pending runs of one variant (and backend) in groups of at most `width` (a number, or a
    function of the variant's first run), in plan order."""
    by_variant: dict[tuple[str, str], list[PlannedRun]] = {}
    for run in runs:
        by_variant.setdefault((run.variant.variant_id, backend_of(run)), []).append(run)
    groups = []
    for members in by_variant.values():
        size = max(1, width(members[0]) if callable(width) else width)
        groups += [tuple(members[i : i + size]) for i in range(0, len(members), size)]
    return groups


def order_groups(
    groups: Sequence[tuple[PlannedRun, ...]], known: Expectation | None = None
) -> list[tuple[PlannedRun, ...]]:
    """Longest first (`sweep.expected_seconds`: steps and FLOPs, or what `known` says from the
    store's runs finished here), the backend with the most runs first, so workers rarely restart
    for another Keras backend and no long group starts last."""
    per_backend = collections.Counter(backend_of(g[0]) for g in groups for _ in g)
    rank = {b: i for i, (b, _n) in enumerate(sorted(per_backend.items(), key=lambda item: (-item[1], item[0])))}
    return sorted(groups, key=lambda g: (rank[backend_of(g[0])], -sum(expected_seconds(r, known) for r in g)))


# --------------------------------------------------------------------------- the routine


@dataclasses.dataclass
class _InFlight:
    group: WorkGroup
    remaining: set[str]
    started_at: float | None = None  # when a worker took it (None: waiting for a worker)
    slot: str = ""
    device: str = ""


class _Dispatcher:
    """Claim -> dispatch -> record -> store -> retry, for one executor. See `run_sweep`."""

    def __init__(
        self,
        *,
        store: ResultStore,
        executor: Executor,
        keeper: LeaseKeeper,
        progress: Progress,
        retries: int,
        timeout_s: float | None,
        width: int | Callable[[PlannedRun], int],
        clock: Callable[[], float],
        trace: list[tuple] | None,
        poll_s: float,
    ) -> None:
        self.store, self.executor, self.keeper, self.progress = store, executor, keeper, progress
        self.retries, self.timeout_s, self.width, self.clock, self.poll_s = retries, timeout_s, width, clock, poll_s
        self.queue: collections.deque[tuple[PlannedRun, ...]] = collections.deque()
        self.waiting: list[PlannedRun] = []  # claimed by another live sweep: looked at again later
        self.in_flight: dict[int, _InFlight] = {}
        self.attempts: collections.Counter[str] = collections.Counter()
        self.final: dict[str, RunRecord] = {}
        self.finished_elsewhere = 0
        self.trace = trace
        self._next_look = clock()

    def _log(self, *event: object) -> None:
        if self.trace is not None:
            self.trace.append(event)

    def run(self, groups: Iterable[tuple[PlannedRun, ...]]) -> None:
        self.queue.extend(groups)
        self._queued()
        try:
            while self._step():
                pass
        except BaseException:
            # Ctrl-C, SIGTERM or a fatal error: stop the workers first (no result can arrive
            # after this), then free the claims of whatever was training. Nothing is recorded.
            self._log("interrupted", sorted(self.keeper.held))
            self.executor.shutdown()
            try:
                self.keeper.release_all(self.store)
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
            raise

    def _step(self) -> bool:
        self._dispatch()
        if not (self.queue or self.waiting or self.in_flight):
            return False
        for event in self.executor.poll(self.poll_s):
            self._handle(event)
        now = self.clock()
        self._expire(now)
        self._look_again(now)
        if self.keeper.renew_due():
            self.keeper.renew(self.store)
        self.progress.tick(
            [(f.slot, f.group.runs[0], now - f.started_at) for f in self.in_flight.values() if f.started_at is not None]
        )
        return True

    # ------------------------------------------------------------------ dispatch

    def _dispatch(self) -> None:
        queued = len(self.queue)
        for backend in self.executor.idle_backends():
            group = self._next_group(backend)
            if group is None:
                break
            self.in_flight[group.group_id] = _InFlight(group, set(group.run_ids))
            self._log("submit", group.group_id, group.run_ids)
            self.executor.submit(group)
        if len(self.queue) != queued:
            self._queued()

    def _next_group(self, backend: str | None) -> WorkGroup | None:
        """The first queued group of `backend` (else the first of any), with its runs claimed."""
        while self.queue:
            index = next((i for i, g in enumerate(self.queue) if backend in (None, backend_of(g[0]))), 0)
            runs = self.queue[index]
            del self.queue[index]
            claimed = tuple(run for run in runs if self._claim(run))
            if claimed:
                return WorkGroup(next(_GROUP_IDS), claimed)
        return None

    def _queued(self) -> None:
        """Tell the progress (its ETA) the queue as it now is."""
        self.progress.grouped([run.run_id for run in group] for group in self.queue)

    def _claim(self, run: PlannedRun) -> bool:
        result = self.keeper.claim(self.store, run.run_id)
        self._log("claim", run.run_id, result.value)
        if result is Claim.FINISHED:
            self.finished_elsewhere += 1
            # a retry another sweep finished meanwhile: its record is the store's, not our failure
            self.final.pop(run.run_id, None)
            self.progress.dropped(run)
        elif result is Claim.HELD:
            self.waiting.append(run)
        return result is Claim.CLAIMED

    def _look_again(self, now: float) -> None:
        """Runs another sweep held: when nothing else is queued, try them again now and then
        (their owner may finish them, or die and its lease stop moving)."""
        if self.waiting and not self.queue and now >= self._next_look:
            self.queue.extend(form_groups(self.waiting, self.width))
            self.waiting.clear()
            self._queued()
            self._next_look = now + min(1.0, self.keeper.lease_s / 10)

    # ------------------------------------------------------------------ events

    def _handle(self, event: ExecutorEvent) -> None:
        flight = self.in_flight.get(event.group_id)
        if flight is None:
            return  # a group already given up on (timed out)
        if isinstance(event, GroupStarted):
            flight.started_at, flight.slot, flight.device = self.clock(), event.slot, event.device
            self._log("start", event.group_id, event.slot)
            for run in flight.group.runs:
                self.progress.started(run, event.slot)
        elif isinstance(event, GroupProgress):
            remaining = [run.run_id for run in flight.group.runs if run.run_id in flight.remaining]
            self.progress.advanced(remaining, event.done, age_s=event.elapsed_s)
        elif isinstance(event, RecordsReturned):
            for record in event.records:
                if record.run_id in flight.remaining:
                    self._record(flight, record)
        elif isinstance(event, GroupLost):
            self._lose(flight, event.cause)
        if not flight.remaining:
            del self.in_flight[event.group_id]

    def _lose(self, flight: _InFlight, cause: str) -> None:
        self._log("lost", flight.group.group_id, cause)
        wall_s = self.clock() - flight.started_at if flight.started_at is not None else 0.0
        for run in flight.group.runs:
            if run.run_id in flight.remaining:
                self._record(flight, failed_record(run, cause, wall_s=wall_s, device=flight.device))

    def _record(self, flight: _InFlight, record: RunRecord) -> None:
        """Store a run's record the moment it arrives; queue a retry of a FAILED one."""
        flight.remaining.discard(record.run_id)
        self.store.put(record)  # drops the claim with it
        self.keeper.done([record.run_id])
        self.attempts[record.run_id] += 1
        self.final[record.run_id] = record
        self._log("record", record.run_id, record.status.value)
        retry = record.status is RunStatus.FAILED and self.attempts[record.run_id] <= self.retries
        if retry:
            run = next(r for r in flight.group.runs if r.run_id == record.run_id)
            self.queue.appendleft((run,))
            self._queued()
            self.progress.retried(record, self.attempts[record.run_id], self.retries)
        else:
            self.progress.finished(record)

    def _expire(self, now: float) -> None:
        if not self.timeout_s:
            return
        for flight in list(self.in_flight.values()):
            limit = self.timeout_s * len(flight.group.runs)
            if flight.started_at is not None and now - flight.started_at > limit:
                self.executor.cancel(flight.group.group_id)  # first: no late result can arrive
                self._lose(flight, f"timed out after {limit:g} s (worker killed)")
                del self.in_flight[flight.group.group_id]


def run_sweep(
    prepared: PreparedSweep,
    *,
    store: ResultStore,
    executor: Executor | None = None,
    options: SweepOptions = SweepOptions(),
    progress: Progress | None = None,
    keeper: LeaseKeeper | None = None,
    open_store: Callable[[], ResultStore] | None = None,
    clock: Callable[[], float] = time.monotonic,
    trace: list[tuple] | None = None,
    device_kind: str = "cpu",
    memory_bytes: int | None = None,
) -> SweepOutcome:
    """Train every planned run the store does not hold yet with `executor`, storing each record
    as it arrives. Uses `options.rerun_failed/retries/timeout_s/fuse/lease_s`; `device_kind`
    ("cpu" | "gpu") and `memory_bytes` (a GPU worker's share of its memory) size the fused groups
    when `options.fuse` is None (auto).

    `executor` defaults to training in this process with `options`' train function.
    `open_store` opens a second connection to the store for the lease heartbeat thread (a run
    trained in this process keeps its claim); without it leases are renewed between events.
    `trace`, when given, receives the routine's events in order (for tests).
    Ctrl-C / SIGTERM (any BaseException): workers stopped, claims released, exception re-raised.
    """
    store.save_plan(
        prepared.spec.name,
        source=prepared.spec.source,
        info=sweep_info(prepared),
        runs=[(r.run_id, r.variant.name, r.seed) for r in prepared.runs],
        merge=prepared.spec.partial,
    )
    # what the store's finished runs say about this device orders the rest and starts the ETA
    finished = finished_runs(prepared.runs, store, device_kind=device_kind)
    known = Expectation.of(finished)
    todo = order_longest_first(pending_runs(prepared.runs, store, rerun_failed=options.rerun_failed), known)
    distinct = len({run.run_id for run in prepared.runs})
    width = fuse_width(options.fuse, todo, device_kind=device_kind, memory_bytes=memory_bytes)
    if executor is None:
        executor = InlineExecutor(prepared.dataset, train=options.trainer.load())
    keeper = keeper or LeaseKeeper(lease_s=options.lease_s, clock=clock)
    progress = progress or Progress(todo)
    progress.remember(finished)
    dispatcher = _Dispatcher(
        store=store, executor=executor, keeper=keeper, progress=progress, retries=options.retries,
        timeout_s=options.timeout_s, width=width, clock=clock, trace=trace, poll_s=POLL_S,
    )
    if todo:
        executor.start()
        if open_store is not None:
            keeper.start_heartbeat(open_store)
    try:
        dispatcher.run(order_groups(form_groups(todo, width), known))
    finally:
        keeper.stop_heartbeat()
        progress.close()
    return SweepOutcome(
        planned=distinct,
        skipped=distinct - len(todo),
        records=tuple(dispatcher.final.values()),
        attempts=sum(dispatcher.attempts.values()),
        finished_elsewhere=dispatcher.finished_elsewhere,
        executor_summary=executor.summary() if dispatcher.attempts else None,
    )


class _OnDemand:
    """An executor made only when a round with work starts it (`Executor`): a resumed adaptive
    sweep may find its first rounds done and still need workers for a later one."""

    def __init__(self, make: Callable[[], Executor], say: Callable[[str], None]) -> None:
        self._make, self._say = make, say
        self._inner: Executor | None = None

    def start(self) -> None:
        if self._inner is None:
            self._inner = self._make()
            self._say(self._inner.describe())
        self._inner.start()

    def describe(self) -> str:
        return self._inner.describe() if self._inner is not None else "workers: none yet (started when needed)"

    def idle_backends(self) -> list[str | None]:
        return self._inner.idle_backends() if self._inner is not None else []

    def submit(self, group: WorkGroup) -> None:
        assert self._inner is not None, "start() first"
        self._inner.submit(group)

    def poll(self, timeout_s: float) -> list[ExecutorEvent]:
        return self._inner.poll(timeout_s) if self._inner is not None else []

    def cancel(self, group_id: int) -> None:
        if self._inner is not None:
            self._inner.cancel(group_id)

    def shutdown(self) -> None:
        if self._inner is not None:
            self._inner.shutdown()

    def summary(self) -> str | None:
        return self._inner.summary() if self._inner is not None else None


def run_adaptive(
    prepared: PreparedSweep,
    *,
    store: ResultStore,
    executor: Executor | None = None,
    options: SweepOptions = SweepOptions(),
    progress: Progress | None = None,
    notify: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> SweepOutcome:
    """`run_sweep` in rounds for a sweep with adaptive seeds (`prepared.spec.adaptive`; its runs are
    every candidate seed of every variant): each round trains the runs of the seeds chosen so far,
    then `harness.adaptive.decide` gives each variant more seeds or none. A resumed sweep starts
    from the seeds the stored plan holds. One executor serves every round. `kwargs` go to `run_sweep`."""
    from harness import adaptive

    policy = prepared.spec.adaptive
    if policy is None:
        raise ValueError("run_adaptive needs a sweep with adaptive seeds")
    say = notify or (lambda _line: None)
    candidates = prepared.spec.seeds
    names = list(dict.fromkeys(r.variant.name for r in prepared.runs))
    stored = [(variant, seed) for _run_id, variant, seed in store.plan(prepared.spec.name)]
    counts = adaptive.first_counts(policy, names, candidates, stored)
    say(policy.describe())
    outcomes: list[SweepOutcome] = []
    number = 1
    while True:
        selected = adaptive.select(prepared.runs, counts, candidates)
        outcomes.append(
            run_sweep(
                dataclasses.replace(prepared, runs=selected),
                store=store, executor=executor, progress=progress,
                # a run that failed in an earlier round was this sweep's attempt: not again
                options=options if number == 1 else dataclasses.replace(options, rerun_failed=False),
                **kwargs,
            )
        )
        records = {r.run_id: r for r in store.records(r.run_id for r in selected)}
        decisions = [
            adaptive.decide(
                policy, name, counts[name],
                [records[r.run_id] for r in selected if r.variant.name == name and r.run_id in records],
            )
            for name in names
        ]
        say(adaptive.describe_round(number, decisions, policy))
        more = {d.variant: d.next_seeds for d in decisions if d.state is adaptive.SeedState.MORE}
        if not more:
            break
        counts.update(more)
        number += 1
    distinct = len({r.run_id for r in adaptive.select(prepared.runs, counts, candidates)})
    trained = {record.run_id: record for outcome in outcomes for record in outcome.records}
    return SweepOutcome(
        planned=distinct,
        skipped=distinct - len(trained) - sum(o.finished_elsewhere for o in outcomes),
        records=tuple(trained.values()),
        attempts=sum(o.attempts for o in outcomes),
        finished_elsewhere=sum(o.finished_elsewhere for o in outcomes),
        executor_summary=next((o.executor_summary for o in reversed(outcomes) if o.executor_summary), None),
    )


# --------------------------------------------------------------------------- the entry point


@dataclasses.dataclass(frozen=True)
class _Machine:
    """What a sweep decides before loading data: devices and Keras backends."""

    gpus: tuple  # harness.devices.Gpu
    cpus: tuple[int, ...]  # this process's cores
    backend_context: object  # harness.plan.BackendContext
    backends: dict[str, int]  # runs per Keras backend

    @property
    def cpu_count(self) -> int:
        return len(self.cpus)

    @property
    def first_backend(self) -> str:
        return max(self.backends, key=self.backends.__getitem__)


def _machine(spec: SweepSpec, options: SweepOptions, *, gpus: Sequence | None = None) -> _Machine:
    """`gpus` (a Ray cluster's, `_on_cluster`) or, for the local pool, nvidia-smi's."""
    from harness.devices import allowed_cpus, detect_gpus
    from harness.plan import BackendContext, sweep_backends

    if gpus is None:
        gpus = tuple(detect_gpus()) if options.gpus != () and options.executor is ExecutorKind.POOL else ()
    gpus = tuple(gpus)
    on_gpu = bool(gpus)
    context = BackendContext(device_kind="gpu" if on_gpu else "cpu", calibration=_calibration(options.store, on_gpu))
    backends = sweep_backends(spec, context)  # a missing backend is an error here, before anything starts
    return _Machine(gpus=gpus, cpus=allowed_cpus(), backend_context=context, backends=backends)


def _on_cluster(
    spec: SweepSpec, options: SweepOptions, machine: _Machine, notify: Callable[[str], None] | None = None
) -> _Machine:
    """A Ray sweep's machine once connected: the cluster's GPUs (`ray_executor.cluster_gpus`),
    so that the fusion width, `auto`'s backend and the actors' memory share are a GPU's; as it
    was where the cluster has none or `--gpus none` keeps the actors on CPUs."""
    if options.gpus == ():
        return machine
    from harness.ray_executor import cluster_gpus

    gpus = cluster_gpus(notify=notify)
    return _machine(spec, options, gpus=gpus) if gpus else machine


def _ray_dry_run_machine(
    spec: SweepSpec, options: SweepOptions, machine: _Machine, notify: Callable[[str], None] | None = None
) -> _Machine:
    """What a Ray sweep would plan for, without training: the cluster at `--address` (connected
    to, asked, left running), or for the private cluster a sweep starts, this machine's GPUs."""
    from harness.ray_executor import connect, disconnect

    if options.gpus == ():
        return machine
    if not (options.address or os.environ.get("RAY_ADDRESS")):
        from harness.devices import detect_gpus

        gpus = detect_gpus()
        return _machine(spec, options, gpus=gpus) if gpus else machine
    connect(options.address)
    try:
        return _on_cluster(spec, options, machine, notify)
    finally:
        disconnect()


def _memory_share(machine: _Machine, options: SweepOptions) -> int | None:
    """A GPU worker's share of its GPU's memory, from the GPUs this sweep trains on (`--gpus` on
    this machine; a Ray cluster's all, `--gpus` being refused there); None where it trains on
    none (CPU, in this process)."""
    if not machine.gpus:
        return None
    used = chosen_gpus(machine.gpus, list(options.gpus) if options.gpus is not None else None)
    return gpu_worker_memory_bytes(used, options.runs_per_gpu)


def _calibration(store_path: Path, on_gpu: bool) -> dict | None:
    """`harness calibrate`'s per-backend step timings for this device kind, if the store has them."""
    if not Path(store_path).exists():
        return None
    from harness.backends import calibration_key
    from harness.store import SQLiteStore

    try:
        with SQLiteStore(store_path, create=False) as store:
            return store.get_meta(calibration_key("gpu" if on_gpu else "cpu"))
    except Exception:  # noqa: BLE001 - an unreadable store is reported when the sweep opens it
        return None


def worker_slots(spec: SweepSpec, options: SweepOptions, machine: _Machine, pending: int) -> list:
    """Worker slots on this machine, shared out among the sweep's Keras backends."""
    from harness.backends import share_workers
    from harness.devices import available_memory_gib, pin_slots, plan_workers

    slots = plan_workers(
        gpus=machine.gpus, pending=pending, cpu_count=machine.cpu_count,
        use_gpus=list(options.gpus) if options.gpus is not None else None, runs_per_gpu=options.runs_per_gpu,
        workers=options.workers, threads=options.threads, memory_gib=available_memory_gib(),
        backend=machine.first_backend, deterministic=spec.deterministic, cpus=machine.cpus,
    )
    return pin_slots([slot.for_backend(b) for slot, b in zip(slots, share_workers(machine.backends, len(slots)))])


def _data_source(spec: SweepSpec, options: SweepOptions):
    from harness.data import configured_data_dir
    from harness.scheduler import DataSource

    folder = configured_data_dir(options.data_dir)
    return DataSource(ref=spec.dataset, subset=spec.subset, data_dir=str(folder) if folder else None)


def make_executor(
    spec: SweepSpec, options: SweepOptions, machine: _Machine, *, pending: int, dataset=None, owns_cluster: bool = False
) -> Executor:
    """The executor `options.executor` names, sized for `pending` runs."""
    if options.executor is ExecutorKind.INLINE:
        return InlineExecutor(dataset, train=options.trainer.load())
    if options.executor is ExecutorKind.RAY:
        from harness.ray_executor import RayExecutor  # Ray imported only there

        return RayExecutor.for_cluster(
            spec=spec, options=options, backend=machine.first_backend, pending=pending, dataset=dataset,
            owns_cluster=owns_cluster, memory_bytes=_memory_share(machine, options),
        )
    from harness.scheduler import LocalPoolExecutor

    return LocalPoolExecutor(
        worker_slots(spec, options, machine, pending), source=_data_source(spec, options), trainer=options.trainer
    )


def _sweep_in_store(store_path: Path, name: str) -> bool:
    if not Path(store_path).exists():
        return False
    from harness.store import SQLiteStore

    with SQLiteStore(store_path, create=False) as store:
        return store.sweep_info(name) is not None


def _first_round(prepared: PreparedSweep, store: ResultStore | None) -> list[PlannedRun]:
    """The runs the sweep trains first: all of them, or with adaptive seeds those of its first round."""
    policy = prepared.spec.adaptive
    if policy is None:
        return list(prepared.runs)
    from harness import adaptive

    names = list(dict.fromkeys(r.variant.name for r in prepared.runs))
    stored = [(v, s) for _r, v, s in store.plan(prepared.spec.name)] if store is not None else []
    return adaptive.select(prepared.runs, adaptive.first_counts(policy, names, prepared.spec.seeds, stored), prepared.spec.seeds)


def shared_notes(prepared: PreparedSweep) -> list[str]:
    from harness.sweep import shared_runs

    return [
        f"note: variants '{first}' and '{second}' are the same runs with these options; "
        "each is trained once and reported under both names"
        for first, second in shared_runs(prepared.runs)
    ]


def execute_sweep(
    spec: SweepSpec,
    options: SweepOptions = SweepOptions(),
    *,
    progress: Progress | None = None,
    notify: Callable[[str], None] | None = None,
    trace: list[tuple] | None = None,
) -> SweepOutcome:
    """Train every run of `spec` that `options.store` does not hold yet; store each as it ends.

    Raises `UserError` (bad data, store, backend, options: nothing trained), `WorkerStartError`
    (no worker could start), `KeyboardInterrupt` (Ctrl-C; after stopping the workers and
    releasing the claims of unfinished runs: every finished run is stored). `notify` receives
    one-line notes for the user (shared runs, the workers chosen, executor overheads).
    """
    from harness.store import SQLiteStore
    from harness.sweep import prepare_sweep

    say = notify or (lambda _line: None)
    machine = _machine(spec, options)
    if options.executor is ExecutorKind.INLINE:
        from harness.backends import use_backend_in_process

        use_backend_in_process(machine.backends)  # KERAS_BACKEND before Keras is imported here
    executor: Executor | None = None
    owns_cluster = False
    if options.executor is ExecutorKind.RAY:
        from harness.ray_executor import connect

        owns_cluster = connect(options.address)  # no Ray, or no cluster there: one line, nothing written
    try:
        if options.executor is ExecutorKind.RAY:
            machine = _on_cluster(spec, options, machine, say)
        if options.executor is ExecutorKind.POOL and not _sweep_in_store(options.store, spec.name):
            # A new sweep: every run is pending, so start the workers now; they import Keras and
            # load the data while this process plans the sweep.
            first = spec.adaptive.min if spec.adaptive is not None else len(spec.seeds)
            executor = make_executor(spec, options, machine, pending=len(spec.variants) * first)
            executor.start()
        prepared = prepare_sweep(spec, data_dir=options.data_dir, backends=machine.backend_context)
        for line in shared_notes(prepared):
            say(line)
        with SQLiteStore(options.store) as store:
            pending = pending_runs(_first_round(prepared, store), store, rerun_failed=options.rerun_failed)
            if executor is None and pending:
                executor = make_executor(
                    spec, options, machine, pending=len(pending), dataset=prepared.dataset, owns_cluster=owns_cluster
                )
            if executor is not None:
                say(executor.describe())
            elif spec.adaptive is not None:  # resumed, first round done: a later round may need workers
                executor = _OnDemand(
                    lambda: make_executor(
                        spec, options, machine, pending=len(pending_runs(prepared.runs, store)),
                        dataset=prepared.dataset, owns_cluster=owns_cluster,
                    ),
                    say,
                )
            common = dict(
                store=store, executor=executor or InlineExecutor(prepared.dataset), options=options,
                progress=progress, open_store=lambda: SQLiteStore(options.store, create=False), trace=trace,
                device_kind="gpu" if machine.gpus else "cpu",
                memory_bytes=_memory_share(machine, options),
            )
            if spec.adaptive is not None:
                outcome = run_adaptive(prepared, notify=say, **common)
            else:
                outcome = run_sweep(prepared, **common)
    finally:
        if executor is not None:
            executor.shutdown()
        if owns_cluster:
            from harness.ray_executor import disconnect

            disconnect()
    if outcome.executor_summary:
        say(outcome.executor_summary)
    return outcome


def describe_sweep(
    spec: SweepSpec, options: SweepOptions = SweepOptions(), *, notify: Callable[[str], None] | None = None
) -> str:
    """The `--dry-run` text: the plan (runs, params, FLOPs, what the store holds) and the workers.
    Builds builder models to count their parameters (imports Keras here)."""
    from harness.store import SQLiteStore
    from harness.sweep import format_plan, prepare_sweep

    machine = _machine(spec, options)
    if options.executor is ExecutorKind.RAY:
        machine = _ray_dry_run_machine(spec, options, machine, notify)
    prepared = prepare_sweep(spec, data_dir=options.data_dir, build_builders=True, backends=machine.backend_context)
    for line in shared_notes(prepared):
        (notify or (lambda _line: None))(line)
    lines = []
    store = SQLiteStore(options.store, create=False) if Path(options.store).exists() else None
    try:
        pending = pending_runs(_first_round(prepared, store), store, rerun_failed=options.rerun_failed) if store else _first_round(prepared, None)
        lines.append(format_plan(prepared, store, first_round=len(_first_round(prepared, store)) if spec.adaptive else None))
    finally:
        if store is not None:
            store.close()
    if options.executor is ExecutorKind.INLINE:
        lines.append("workers: none (training in this process)")
    elif options.executor is ExecutorKind.RAY:
        where = options.address or os.environ.get("RAY_ADDRESS") or "a local cluster"
        gpus = f", planned for its {len(machine.gpus)} GPUs" if machine.gpus else ", planned for CPUs"
        lines.append(f"workers: Ray actors on {where}{gpus}")
    else:
        from harness.scheduler import LocalPoolExecutor

        slots = worker_slots(spec, options, machine, len(pending))
        lines.append(LocalPoolExecutor(slots, source=_data_source(spec, options)).describe())
    return "\n".join(lines)
