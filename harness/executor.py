"""The executor interface: what runs the training of a sweep, apart from what decides it.

`harness.execute` owns a sweep's bookkeeping (claim -> dispatch -> record -> store -> retry).
An executor only starts workers, hands them work and returns what happened, as events:

- the unit of work is a `WorkGroup`: a tuple of `PlannedRun`s of one variant (size 1 unless
  runs are fused), trained by one worker with a *group trainer*
  `train_group(runs, dataset) -> list[RunRecord]` (default: `train_group`, a loop over
  `harness.train.train_run`);
- a worker serves one Keras backend (`KERAS_BACKEND` is set before Keras is imported there), so
  a group goes only to a worker of its backend (`WorkGroup.backend`); `idle_backends()` says
  which backends could take a group now;
- events: `GroupStarted` (a worker took the group), `GroupProgress` (the fraction of its epochs
  trained, for the ETA), `RecordsReturned` (records of some or all of its runs, possibly all
  together), `GroupLost` (its worker died, or `cancel` killed it: the
  runs without a record are lost and the driver records them FAILED with the cause).

Executors: `InlineExecutor` (this process, for debugging), `harness.scheduler.LocalPoolExecutor`
(worker processes on this machine) and `harness.ray_executor.RayExecutor` (Ray actors).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import threading
import time
import traceback
from typing import Callable, Iterable, Protocol, Sequence, Union

from harness import heartbeat
from harness.data import Dataset
from harness.plan import PlannedRun
from harness.records import RunRecord, RunStatus, utcnow

DEFAULT_TRAIN_FN = "harness.train:train_run"

GroupTrainer = Callable[[Sequence[PlannedRun], Dataset], list[RunRecord]]
RunTrainer = Callable[[PlannedRun, Dataset], RunRecord]


@dataclasses.dataclass(frozen=True)
class WorkGroup:
    """Runs handed to one worker at once: all of one variant and one Keras backend."""

    group_id: int
    runs: tuple[PlannedRun, ...]

    def __post_init__(self) -> None:
        if not self.runs:
            raise ValueError("a work group needs at least one run")

    @property
    def backend(self) -> str:
        return backend_of(self.runs[0])

    @property
    def run_ids(self) -> tuple[str, ...]:
        return tuple(run.run_id for run in self.runs)

    @property
    def estimated_train_flops(self) -> int:
        return sum(run.estimated_train_flops for run in self.runs)


@dataclasses.dataclass(frozen=True)
class GroupStarted:
    group_id: int
    slot: str  # the worker's name, e.g. "cpu.0"
    device: str  # "cpu", "gpu:0", "ray:node-ip/gpu"


@dataclasses.dataclass(frozen=True)
class RecordsReturned:
    group_id: int
    records: tuple[RunRecord, ...]


@dataclasses.dataclass(frozen=True)
class GroupLost:
    group_id: int
    cause: str  # one sentence: why the runs of the group without a record are lost


@dataclasses.dataclass(frozen=True)
class GroupProgress:
    """The worker of a group has trained `done` (0..1) of the group's epochs (`harness.heartbeat`),
    `elapsed_s` seconds after it began the group (timed where it trains: messages may arrive
    late, or together). Advice for the ETA only: an executor may send none (the inline one does not)."""

    group_id: int
    done: float
    elapsed_s: float | None = None


PROGRESS_EVERY_S = 1.0  # at most one progress message a second per worker (epochs may be milliseconds)


class ProgressSink:
    """A `harness.heartbeat` sink for a worker's group: `send`s its progress with the seconds
    since this sink was made (the group's start), at most every `every_s` seconds, never less
    than it sent before. Thread-safe (Keras may call the reporting callback from helper threads,
    in any order): one send at a time, and none once `close`d (the worker closes it before it
    sends the group's records down the same pipe)."""

    def __init__(self, send: Callable[[GroupProgress], None], group_id: int, *, every_s: float = PROGRESS_EVERY_S) -> None:
        self._send, self._group_id, self._every_s = send, group_id, every_s
        self._start = time.monotonic()
        self._last_at = -math.inf
        self._done = 0.0
        self._closed = False
        self._lock = threading.Lock()

    def __call__(self, done: float) -> None:
        with self._lock:
            now = time.monotonic()
            first_done = done >= 1.0 > self._done  # the end of training, always sent (the ETA's tail starts there)
            if self._closed or (now - self._last_at < self._every_s and not first_done):
                return
            self._last_at, self._done = now, max(self._done, done)
            self._send(GroupProgress(self._group_id, self._done, now - self._start))

    def close(self) -> None:
        with self._lock:
            self._closed = True


ExecutorEvent = Union[GroupStarted, GroupProgress, RecordsReturned, GroupLost]


class Executor(Protocol):
    """Starts workers, hands them `WorkGroup`s, reports `ExecutorEvent`s. Never touches the store."""

    def start(self) -> None:
        """Start the workers now (they warm up while the sweep is planned). Idempotent."""

    def describe(self) -> str:
        """One line: the workers (printed before the sweep starts)."""

    def idle_backends(self) -> list[str | None]:
        """One entry per worker that could take a group now: its backend, or None for any."""

    def submit(self, group: WorkGroup) -> None:
        """Hand `group` to an idle worker (restarting one for the group's backend if needed)."""

    def poll(self, timeout_s: float) -> list[ExecutorEvent]:
        """Wait up to `timeout_s` for events. Raises `WorkerStartError` if no worker can start."""

    def cancel(self, group_id: int) -> None:
        """Kill the worker of a group that ran too long (a fresh one replaces it); no record of
        that group is delivered afterwards."""

    def shutdown(self) -> None:
        """Stop every worker (those still training are killed). Idempotent."""

    def summary(self) -> str | None:
        """What the executor measured about itself (overheads), or None."""


# --------------------------------------------------------------------------- pools of workers


class SlotPool:
    """What a pool of long-lived workers (worker processes, Ray actors) does the same way, one
    worker per `WorkerSlot`: find an idle one, hand it a group (restarting it for the group's
    backend if none of that backend is idle), cancel a group, and turn a worker's death into
    `GroupLost` plus a fresh worker in its place.

    A pool keeps its workers in `_members` (each with `slot`, `ready`, `group`, `assigned`) and
    its events in `_events`, and provides `_start(slot)`, `_kill(member)` and `_send(member, group)`."""

    _members: list
    _events: list

    def _start(self, slot):  # pragma: no cover - abstract
        raise NotImplementedError

    def _kill(self, member) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _send(self, member, group: WorkGroup) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _slot_for(self, slot, backend: str):
        """The same place for a worker of another backend."""
        return slot.for_backend(backend)

    def _replace(self, member, slot=None):
        self._kill(member)
        fresh = self._start(slot or member.slot)
        self._members[self._members.index(member)] = fresh
        return fresh

    def _idle(self) -> list:
        return [m for m in self._members if m.ready and m.group is None and m.assigned is None]

    def idle_backends(self) -> list[str | None]:
        return [m.slot.backend for m in self._idle()]

    def submit(self, group: WorkGroup) -> None:
        """To an idle worker of the group's backend, else an idle worker restarted for it (the group
        is sent once that one is ready)."""
        idle = self._idle()
        if not idle:
            raise RuntimeError("no idle worker to take a group")
        member = next((m for m in idle if m.slot.backend == group.backend), None)
        if member is None:
            member = self._replace(idle[0], self._slot_for(idle[0].slot, group.backend))
            member.assigned = group
            return
        self._send(member, group)

    def cancel(self, group_id: int) -> None:
        for member in list(self._members):
            if member.group is not None and member.group.group_id == group_id:
                self._replace(member)  # killed first: no late result can arrive for this group

    def _lost(self, member, cause: str | None) -> None:
        """`member` died: its group, if it had one, is lost with `cause`; a fresh worker takes its
        place and the group that was waiting for it."""
        if member.group is not None and cause is not None:
            self._events.append(GroupLost(member.group.group_id, cause))
        fresh = self._replace(member)
        fresh.assigned = member.assigned


# --------------------------------------------------------------------------- worker side


def backend_of(run: PlannedRun) -> str:
    backend = getattr(run, "backend", None)
    return backend.backend if backend is not None else "tensorflow"


def resolve(path: str) -> Callable:
    """'module:function' -> the function."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def failed_record(run: PlannedRun, error: str, *, wall_s: float = 0.0, device: str = "") -> RunRecord:
    return run.record(RunStatus.FAILED, timings={"wall_s": wall_s}, device=device, error=error, finished_at=utcnow())


def train_group(runs: Sequence[PlannedRun], dataset: Dataset, *, train_fn: RunTrainer | None = None) -> list[RunRecord]:
    """The default group trainer: each run on its own, one after another. A run that raises
    becomes a FAILED record with its traceback; the others still train."""
    if train_fn is None:
        from harness.train import train_run as train_fn  # Keras only here, in the worker
    records = []
    for index, run in enumerate(runs):
        start = time.perf_counter()
        try:
            with heartbeat.part(index, len(runs)):
                records.append(train_fn(run, dataset))
        except Exception:  # noqa: BLE001 - anything the train function did not turn into a record
            records.append(failed_record(run, traceback.format_exc(), wall_s=time.perf_counter() - start))
    return records


@dataclasses.dataclass(frozen=True)
class Trainer:
    """Which functions train a group, by import path (so worker processes and Ray actors can
    import them): `group` ('module:function' with the `train_group` signature), or else a loop
    over `run` ('module:function', `(run, dataset) -> RunRecord`)."""

    run: str = DEFAULT_TRAIN_FN
    group: str | None = None

    def module(self) -> str:
        return (self.group or self.run).partition(":")[0]

    def load(self) -> GroupTrainer:
        if self.group is not None:
            return resolve(self.group)
        run_fn = resolve(self.run)
        return lambda runs, dataset: train_group(runs, dataset, train_fn=run_fn)

    def warm_up(self) -> None:
        """Import the training module and call its `warm_up()` (Keras imported once, here)."""
        warm = getattr(importlib.import_module(self.module()), "warm_up", None)
        if warm is not None:
            warm()


def train_reporting(
    group_id: int, runs: Sequence[PlannedRun], train: Callable[[], Iterable[RunRecord]],
    send: Callable[[GroupProgress], None],
) -> list[RunRecord]:
    """A worker's group (pool or Ray): `train()`'s records of `runs` (`check_records`), its
    progress sent by `send` meanwhile (`ProgressSink`, closed before the caller sends the
    records); a trainer that raises (or data that cannot load) fails every run of the group."""
    sink = ProgressSink(send, group_id)
    try:
        with heartbeat.reporting(sink):
            return check_records(runs, train())
    except Exception:  # noqa: BLE001 - a group trainer that raised, or data that cannot load
        return [failed_record(run, traceback.format_exc()) for run in runs]
    finally:
        sink.close()  # a late callback thread sends nothing after this


def check_records(group: Sequence[PlannedRun], records: Iterable[RunRecord]) -> list[RunRecord]:
    """The records of the group's runs, one per run at most (a trainer bug never stores a stranger)."""
    wanted = {run.run_id for run in group}
    out, seen = [], set()
    for record in records:
        if record.run_id in wanted and record.run_id not in seen:
            seen.add(record.run_id)
            out.append(record)
    return out


# --------------------------------------------------------------------------- inline


class InlineExecutor:
    """Trains in this process, one group at a time (`--in-process`: debugging, pdb works).

    Timeouts cannot be enforced here (nothing can stop a call in this process); a run trains to
    its end. `train` is a group trainer, or a per-run function with `per_run=True`.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        train: GroupTrainer | RunTrainer | None = None,
        per_run: bool = False,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.dataset = dataset
        if train is None:
            self._train: GroupTrainer = train_group
        elif per_run:
            run_fn = train
            self._train = lambda runs, dataset: train_group(runs, dataset, train_fn=run_fn)  # type: ignore[arg-type]
        else:
            self._train = train  # type: ignore[assignment]
        self._sleep = sleep
        self._pending: WorkGroup | None = None

    def start(self) -> None:
        pass

    def describe(self) -> str:
        return "workers: none (training in this process)"

    def idle_backends(self) -> list[str | None]:
        return [] if self._pending is not None else [None]

    def submit(self, group: WorkGroup) -> None:
        if self._pending is not None:
            raise RuntimeError("the inline executor trains one group at a time")
        self._pending = group

    def poll(self, timeout_s: float) -> list[ExecutorEvent]:
        group, self._pending = self._pending, None
        if group is None:
            self._sleep(timeout_s)
            return []
        started = GroupStarted(group.group_id, "this process", "this process")
        try:
            records = self._train(group.runs, self.dataset)
        except Exception:  # noqa: BLE001 - a group trainer that raises fails its group
            records = [failed_record(run, traceback.format_exc()) for run in group.runs]
        return [started, RecordsReturned(group.group_id, tuple(check_records(group.runs, records)))]

    def cancel(self, group_id: int) -> None:
        pass

    def shutdown(self) -> None:
        self._pending = None

    def summary(self) -> str | None:
        return None
