"""The local pool executor: long-lived worker processes that each import Keras once and train
many groups of runs.

The parent never imports Keras or TensorFlow; `harness.execute` decides what trains when and
stores the records, this module only runs the processes (see `harness.executor`). Each worker
serves one slot (`WorkerSlot`: device, threads, Keras backend; `WorkerSlot.environ()` is its whole
environment, set before anything is imported there). Messages between parent and workers are
small frozen dataclasses. A worker that dies (segfault, OOM kill) is reported as `GroupLost` and
replaced; a worker that dies while starting is a `WorkerStartError`.

Signals: workers ignore SIGINT and SIGTERM (Ctrl-C or `kill` of the process group is the
parent's to handle: it stops them); they exit by themselves when the parent is gone.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.connection import Connection, wait
from typing import Callable, Sequence

from harness.devices import CPUS_ENV, WorkerSlot, pin_to_cpus
from harness.errors import WorkerStartError
from harness.executor import (
    ExecutorEvent,
    GroupProgress,
    GroupStarted,
    RecordsReturned,
    SlotPool,
    Trainer,
    WorkGroup,
    train_reporting,
)
from harness.plan import PlannedRun
from harness.records import RunRecord
from harness.spec import DatasetRef, Subset

SHUTDOWN_GRACE_S = 0.3


@dataclasses.dataclass(frozen=True)
class DataSource:
    """What a worker needs to load the sweep's dataset itself (arrays never cross the pipe)."""

    ref: DatasetRef
    subset: Subset | None
    data_dir: str | None


# --------------------------------------------------------------------------- messages


@dataclasses.dataclass(frozen=True)
class TrainGroup:
    """Parent -> worker: train these runs (the data is loaded by the worker from `source`)."""

    group_id: int
    runs: tuple[PlannedRun, ...]
    source: DataSource


@dataclasses.dataclass(frozen=True)
class Stop:
    """Parent -> worker: leave now."""


@dataclasses.dataclass(frozen=True)
class Ready:
    """Worker -> parent: warmed up (Keras imported, data loaded)."""

    pid: int


@dataclasses.dataclass(frozen=True)
class GroupDone:
    """Worker -> parent: the records of a group (as JSON, the store's own format)."""

    group_id: int
    records: tuple[str, ...]


WORKER_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _watch_parent(parent_pid: int) -> None:
    """Exit when the parent is gone (SIGKILLed sweeps must not leave workers training)."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(3)
        time.sleep(1.0)


def _load(source: DataSource, runs: tuple[PlannedRun, ...]):
    from harness.data import load_dataset

    dataset = load_dataset(source.ref, subset=source.subset, data_dir=source.data_dir)
    expected = runs[0].dataset["fingerprint"]
    if dataset.fingerprint != expected:
        raise RuntimeError(f"worker sees dataset {dataset.fingerprint}, the plan expects {expected}")
    return dataset


def worker_main(
    conn: Connection, slot_env: dict[str, str], trainer: Trainer, parent_pid: int, source: DataSource | None = None
) -> None:
    """Entry point of a worker process: set the slot's env, warm up (Keras imported, data
    loaded), then train groups until told to stop."""
    for signum in WORKER_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)  # the parent's to handle (it stops us)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)  # blocked by the parent around our start
    os.environ.update(slot_env)
    pin_to_cpus(os.environ.get(CPUS_ENV, ""))  # before any library starts its threads
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    from harness.data import load_dataset

    train = trainer.load()
    trainer.warm_up()  # import Keras and its backend once, before the first run
    if source is not None:
        try:
            _ = load_dataset(source.ref, subset=source.subset, data_dir=source.data_dir).fingerprint  # load and hash now
        except Exception:  # noqa: BLE001 - reported with the first run that needs it
            pass
    conn.send(Ready(os.getpid()))

    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if not isinstance(message, TrainGroup):
            return
        records = train_reporting(
            message.group_id, message.runs, lambda: train(message.runs, _load(message.source, message.runs)), conn.send
        )
        conn.send(GroupDone(message.group_id, tuple(r.to_json() for r in records)))


# --------------------------------------------------------------------------- the pool


@dataclasses.dataclass
class _Worker:
    slot: WorkerSlot
    process: multiprocessing.process.BaseProcess
    conn: Connection
    started_at: float
    ready: bool = False
    group: WorkGroup | None = None  # sent to the worker, training
    assigned: WorkGroup | None = None  # waiting for the worker to be ready
    sent_at: float = 0.0
    ready_at: float = 0.0


@dataclasses.dataclass
class PoolStats:
    """What the pool measured about itself (for the benchmark and the progress line)."""

    worker_starts: int = 0
    warm_up_s: list[float] = dataclasses.field(default_factory=list)
    dispatch_s: list[float] = dataclasses.field(default_factory=list)  # worker idle -> next group sent
    return_s: list[float] = dataclasses.field(default_factory=list)  # round trip minus time inside the runs

    def overhead_per_run_s(self) -> float:
        """Mean time a group spends in the scheduler rather than in its worker's train function."""
        mean = lambda values: sum(values) / len(values) if values else 0.0  # noqa: E731
        return mean(self.dispatch_s) + mean(self.return_s)

    def describe(self) -> str:
        warm = sum(self.warm_up_s) / len(self.warm_up_s) if self.warm_up_s else 0.0
        return (
            f"pool: {self.worker_starts} worker starts, warm-up mean {warm:.1f} s, "
            f"scheduler overhead per run: mean {self.overhead_per_run_s():.3f} s"
        )


def signal_name(code: int | None) -> str:
    if code is None:
        return "unknown"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class LocalPoolExecutor(SlotPool):
    """Worker processes on this machine, one per `WorkerSlot`; see the module docstring."""

    def __init__(
        self,
        slots: Sequence[WorkerSlot],
        *,
        source: DataSource,
        trainer: Trainer = Trainer(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not slots:
            raise ValueError("a worker pool needs at least one slot")
        self.slots = list(slots)
        self.source = source
        self.trainer = trainer
        self.clock = clock
        self.stats = PoolStats()
        self._ctx = multiprocessing.get_context("spawn")
        self._members: list[_Worker] = []
        self._events: list[ExecutorEvent] = []

    # ------------------------------------------------------------------ workers

    def start(self) -> None:
        """Start the worker processes now (they import Keras and load the data meanwhile)."""
        if not self._members:
            self._members = [self._start(slot) for slot in self.slots]

    def describe(self) -> str:
        def cores(slot: WorkerSlot) -> str:
            if not slot.cpus:
                return ""
            return f", core{'s' if len(slot.cpus) > 1 else ''} {','.join(str(c) for c in slot.cpus)}"

        kinds = ", ".join(
            f"{s.name} ({s.device}{cores(s)}, {s.threads} thread{'s' if s.threads > 1 else ''}, {s.backend})"
            for s in self.slots
        )
        return f"workers: {len(self.slots)}: {kinds}"

    def _start(self, slot: WorkerSlot) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=worker_main,
            args=(child, slot.environ(), self.trainer, os.getpid(), self.source),
            name=f"harness-worker-{slot.name}",
            daemon=True,
        )
        # Blocked (not ignored) while the child starts: a Ctrl-C now reaches us once start()
        # returns, and the child, which inherits the mask, cannot die of it before it ignores it.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        child.close()
        self.stats.worker_starts += 1
        return _Worker(slot=slot, process=process, conn=parent, started_at=self.clock())

    @staticmethod
    def _kill(worker: _Worker) -> None:
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(timeout=10)
        if not worker.conn.closed:
            worker.conn.close()

    def shutdown(self) -> None:
        """Stop idle workers politely; kill those still starting or busy (nothing of theirs is kept)."""
        for worker in self._members:
            if not worker.process.is_alive():
                continue
            if worker.group is None and worker.ready:
                try:
                    worker.conn.send(Stop())
                except (BrokenPipeError, OSError):
                    worker.process.kill()
            else:
                worker.process.kill()
        # Idle workers hold nothing worth keeping (every result is already stored), so a worker
        # whose interpreter takes its time to tear Keras down is killed after a short grace.
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        for worker in self._members:
            worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=5)
            if not worker.conn.closed:
                worker.conn.close()
        self._members = []

    # ------------------------------------------------------------------ work

    def _send(self, worker: _Worker, group: WorkGroup) -> None:
        worker.group, worker.assigned, worker.sent_at = group, None, self.clock()
        worker.conn.send(TrainGroup(group.group_id, group.runs, self.source))
        if worker.ready_at:
            self.stats.dispatch_s.append(worker.sent_at - worker.ready_at)
        self._events.append(GroupStarted(group.group_id, worker.slot.name, worker.slot.device))

    def poll(self, timeout_s: float) -> list[ExecutorEvent]:
        if not self._events:
            conns = {w.conn: w for w in self._members}
            sentinels = {w.process.sentinel: w for w in self._members}
            for ready in wait(list(conns) + list(sentinels), timeout=timeout_s):
                worker = conns.get(ready) or sentinels.get(ready)
                if worker is None or worker not in self._members:
                    continue  # replaced meanwhile
                if ready is worker.conn:
                    self._receive(worker)
                elif not worker.process.is_alive():
                    self._died(worker)
        events, self._events = self._events, []
        return events

    def _receive(self, worker: _Worker, *, results_only: bool = False) -> None:
        """Every message waiting in the worker's pipe (progress may queue ahead of a result); of a
        dead worker, only its group's records. A closed pipe ends it: the sentinel reports the death."""
        try:
            while worker.conn.poll():
                message = worker.conn.recv()
                if not results_only or isinstance(message, GroupDone):
                    self._handle(worker, message)
        except (EOFError, OSError):
            return

    def _handle(self, worker: _Worker, message: object) -> None:
        now = self.clock()
        if isinstance(message, Ready):
            worker.ready, worker.ready_at = True, now
            self.stats.warm_up_s.append(now - worker.started_at)
            if worker.assigned is not None:
                self._send(worker, worker.assigned)
        elif isinstance(message, GroupProgress) and worker.group is not None and worker.group.group_id == message.group_id:
            self._events.append(message)
        elif isinstance(message, GroupDone) and worker.group is not None and worker.group.group_id == message.group_id:
            records = tuple(RunRecord.from_json(text) for text in message.records)
            inside = sum(r.timings.get("wall_s", 0.0) for r in records)
            self.stats.return_s.append(max(0.0, now - worker.sent_at - inside))
            worker.group, worker.ready_at = None, now
            self._events.append(RecordsReturned(message.group_id, records))

    def _died(self, worker: _Worker) -> None:
        self._receive(worker, results_only=True)  # records it sent before it died still count
        worker.process.join(timeout=1)
        how = signal_name(worker.process.exitcode)
        if worker.group is None and not worker.ready:
            raise WorkerStartError(
                f"worker {worker.slot.name} ({worker.slot.backend}) died while starting ({how}); "
                "its traceback is above; `harness sweep --in-process` trains without workers",
                key=self.trainer.group or self.trainer.run,
            )
        self._lost(
            worker,
            f"worker process {worker.slot.name} died ({how}) while training this run: "
            "killed by the OS (out of memory?) or crashed in native code",
        )

    def summary(self) -> str | None:
        return self.stats.describe() if self.stats.dispatch_s else None
