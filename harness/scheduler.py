"""Worker pool: long-lived processes that each import TensorFlow once and train many runs.

The parent never imports TensorFlow. It claims each run in the store (a lease, so two sweeps on one
store never train the same run), sends it to an idle worker, and stores the record the moment it
comes back. A run that raises, a worker that dies (segfault, OOM kill) or a run past its timeout
becomes a FAILED record with the cause; a fresh worker replaces a dead one and the sweep goes on.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import multiprocessing
import os
import signal
import threading
import time
import traceback
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Iterable, Sequence

from harness.devices import WorkerSlot
from harness.errors import WorkerStartError
from harness.plan import PlannedRun
from harness.records import RunRecord, RunStatus, utcnow
from harness.spec import DatasetRef, Subset
from harness.store import Claim, ResultStore, make_owner

DEFAULT_TRAIN_FN = "harness.train:train_run"
LEASE_S = 120.0  # a claim lives this long without renewal; renewed every LEASE_S / 4
POLL_S = 0.25
SHUTDOWN_GRACE_S = 0.3


@dataclasses.dataclass(frozen=True)
class DataSource:
    """What a worker needs to load the sweep's dataset itself (arrays never cross the pipe)."""

    ref: DatasetRef
    subset: Subset | None
    data_dir: str | None


def _resolve(path: str) -> Callable[..., Any]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _watch_parent(parent_pid: int) -> None:
    """Exit when the parent is gone (SIGKILLed sweeps must not leave workers training)."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(3)
        time.sleep(1.0)


def worker_main(
    conn: Connection, slot_env: dict[str, str], train_fn_path: str, parent_pid: int, source: DataSource | None = None
) -> None:
    """Entry point of a worker process: set the pinning env, warm up (TensorFlow imported, data
    loaded), then train runs until told to stop."""
    os.environ.update(slot_env)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    from harness.data import load_dataset

    train_fn = _resolve(train_fn_path)
    module = importlib.import_module(train_fn_path.partition(":")[0])
    warm_up = getattr(module, "warm_up", None)
    if warm_up is not None:
        warm_up()  # import TensorFlow once, before the first run
    if source is not None:
        try:
            _ = load_dataset(source.ref, subset=source.subset, data_dir=source.data_dir).fingerprint  # load and hash now
        except Exception:  # noqa: BLE001 - reported with the first run that needs it
            pass
    conn.send(("ready", os.getpid()))

    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] == "stop":
            return
        _, run, source = message
        try:
            dataset = load_dataset(source.ref, subset=source.subset, data_dir=source.data_dir)
            if dataset.fingerprint != run.dataset["fingerprint"]:
                raise RuntimeError(
                    f"worker sees dataset {dataset.fingerprint}, the plan expects {run.dataset['fingerprint']}"
                )
            record = train_fn(run, dataset)
        except Exception:  # noqa: BLE001 - anything the train function did not turn into a record
            record = failed_record(run, traceback.format_exc())
        conn.send(("result", record.to_json()))


def _backend_of(run: PlannedRun) -> str:
    backend = getattr(run, "backend", None)
    return backend.backend if backend is not None else "tensorflow"


def _pop_for(queue: collections.deque, backend: str) -> PlannedRun | None:
    """The first queued run of `backend` (removed from the queue), or None."""
    for i, run in enumerate(queue):
        if _backend_of(run) == backend:
            del queue[i]
            return run
    return None



def failed_record(run: PlannedRun, error: str, *, wall_s: float = 0.0, device: str = "") -> RunRecord:
    return run.record(RunStatus.FAILED, timings={"wall_s": wall_s}, device=device, error=error, finished_at=utcnow())


@dataclasses.dataclass
class _Worker:
    slot: WorkerSlot
    process: multiprocessing.process.BaseProcess
    conn: Connection
    ready: bool = False
    run: PlannedRun | None = None
    sent_at: float = 0.0
    ready_at: float = 0.0


@dataclasses.dataclass
class PoolStats:
    """What the pool measured about itself (for the benchmark and the progress line)."""

    worker_starts: int = 0
    warm_up_s: list[float] = dataclasses.field(default_factory=list)
    dispatch_s: list[float] = dataclasses.field(default_factory=list)  # worker idle -> next run sent
    return_s: list[float] = dataclasses.field(default_factory=list)  # round trip minus time inside the run
    skipped_finished_elsewhere: int = 0

    def overhead_per_run_s(self) -> float:
        """Mean time a run spends in the scheduler rather than in its worker's train function."""
        mean = lambda values: sum(values) / len(values) if values else 0.0  # noqa: E731
        return mean(self.dispatch_s) + mean(self.return_s)

    def describe(self) -> str:
        warm = sum(self.warm_up_s) / len(self.warm_up_s) if self.warm_up_s else 0.0
        return (
            f"pool: {self.worker_starts} worker starts, warm-up mean {warm:.1f} s, "
            f"scheduler overhead per run: mean {self.overhead_per_run_s():.3f} s"
        )


def _signal_name(code: int | None) -> str:
    if code is None:
        return "unknown"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class WorkerPool:
    """Runs `PlannedRun`s on worker processes; see the module docstring."""

    def __init__(
        self,
        slots: Sequence[WorkerSlot],
        *,
        source: DataSource,
        train_fn: str = DEFAULT_TRAIN_FN,
        timeout_s: float | None = None,
        lease_s: float = LEASE_S,
        owner: str | None = None,
    ) -> None:
        if not slots:
            raise ValueError("a worker pool needs at least one slot")
        self.slots = list(slots)
        self.source = source
        self.train_fn = train_fn
        self.timeout_s = timeout_s
        self.lease_s = lease_s
        self.owner = owner or make_owner()
        self.stats = PoolStats()
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []

    # ------------------------------------------------------------------ workers

    def start(self) -> None:
        """Start the worker processes now (they import TensorFlow and load the data meanwhile)."""
        if not self._workers:
            self._workers = [self._start(slot) for slot in self.slots]

    def _start(self, slot: WorkerSlot) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=worker_main,
            args=(child, slot.environ(), self.train_fn, os.getpid(), self.source),
            name=f"harness-worker-{slot.name}",
            daemon=True,
        )
        process.start()
        child.close()
        self.stats.worker_starts += 1
        worker = _Worker(slot=slot, process=process, conn=parent, sent_at=time.monotonic())
        return worker

    def _replace(self, worker: _Worker) -> None:
        self._kill(worker)
        index = self._workers.index(worker)
        self._workers[index] = self._start(worker.slot)

    def _switch_idle_backends(self, queue: Iterable[PlannedRun]) -> None:
        """Routing by Keras backend: a run only goes to a worker of its backend (a process runs Keras
        on one backend). An idle worker whose backend has no queued run is replaced by a worker of
        the backend with the most queued runs per worker."""
        queued = collections.Counter(_backend_of(run) for run in queue)
        if not queued:
            return
        for worker in list(self._workers):
            if not (worker.ready and worker.run is None) or queued.get(worker.slot.backend):
                continue
            serving = collections.Counter(w.slot.backend for w in self._workers)
            backend = max(queued, key=lambda b: queued[b] / (1 + serving.get(b, 0)))
            if queued[backend] <= serving.get(backend, 0):
                return  # enough workers of that backend already
            self._kill(worker)
            self._workers[self._workers.index(worker)] = self._start(worker.slot.for_backend(backend))

    @staticmethod
    def _kill(worker: _Worker) -> None:
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(timeout=10)
        if not worker.conn.closed:
            worker.conn.close()

    def shutdown(self) -> None:
        """Stop idle workers politely; kill those still starting or busy (nothing of theirs is kept)."""
        for worker in self._workers:
            if not worker.process.is_alive():
                continue
            if worker.run is None and worker.ready:
                try:
                    worker.conn.send(("stop",))
                except (BrokenPipeError, OSError):
                    worker.process.kill()
            else:
                worker.process.kill()
        # Idle workers hold nothing worth keeping (every result is already stored), so a worker
        # whose interpreter takes its time to tear TensorFlow down is killed after a short grace.
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        for worker in self._workers:
            worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=5)
            if not worker.conn.closed:
                worker.conn.close()
        self._workers = []

    # ------------------------------------------------------------------ the loop

    def run(
        self,
        runs: Iterable[PlannedRun],
        store: ResultStore,
        *,
        retries: int = 0,
        on_start: Callable[[PlannedRun, WorkerSlot], None] | None = None,
        on_record: Callable[[RunRecord], None] | None = None,
        on_tick: Callable[[list[tuple[WorkerSlot, PlannedRun, float]]], None] | None = None,
    ) -> list[RunRecord]:
        """Train `runs` (in the given order) and store each record as it arrives. Returns the records."""
        queue = collections.deque(runs)
        waiting: collections.deque[PlannedRun] = collections.deque()  # held by another sweep's lease
        attempts: collections.Counter[str] = collections.Counter()
        records: list[RunRecord] = []
        last_renew = next_look = time.monotonic()

        def finish(worker: _Worker, record: RunRecord) -> None:
            run = worker.run
            assert run is not None
            worker.run = None
            store.put(record)
            records.append(record)
            if on_record:
                on_record(record)
            attempts[run.run_id] += 1
            if record.status is RunStatus.FAILED and attempts[run.run_id] <= retries:
                queue.appendleft(run)

        self.start()
        try:
            while True:
                now = time.monotonic()
                if waiting and not queue and now >= next_look:
                    # Another sweep holds these; look again once in a while (its lease may expire).
                    queue.extend(waiting)
                    waiting.clear()
                    next_look = now + min(1.0, self.lease_s / 10)
                for worker in list(self._workers):
                    if not (worker.ready and worker.run is None):
                        continue
                    while (run := _pop_for(queue, worker.slot.backend)) is not None:
                        claim = store.claim(run.run_id, owner=self.owner, lease_s=self.lease_s)
                        if claim is Claim.FINISHED:
                            self.stats.skipped_finished_elsewhere += 1
                            continue
                        if claim is Claim.HELD:
                            waiting.append(run)
                            continue
                        worker.run, worker.sent_at = run, time.monotonic()
                        worker.conn.send(("run", run, self.source))
                        if worker.ready_at:
                            self.stats.dispatch_s.append(worker.sent_at - worker.ready_at)
                        if on_start:
                            on_start(run, worker.slot)
                        break
                self._switch_idle_backends(queue)
                busy = [w for w in self._workers if w.run is not None]
                if not busy and not queue and not waiting:
                    break

                conns = {w.conn: w for w in self._workers}
                sentinels = {w.process.sentinel: w for w in self._workers}
                for ready in wait(list(conns) + list(sentinels), timeout=POLL_S):
                    worker = conns.get(ready) or sentinels.get(ready)
                    if worker is None or worker not in self._workers:
                        continue
                    if ready is worker.conn:
                        try:
                            message = worker.conn.recv()
                        except (EOFError, OSError):
                            continue  # the sentinel reports the death
                        if message[0] == "ready":
                            worker.ready = True
                            worker.ready_at = time.monotonic()
                            self.stats.warm_up_s.append(worker.ready_at - worker.sent_at)
                        elif message[0] == "result" and worker.run is not None:
                            record = RunRecord.from_json(message[1])
                            received = time.monotonic()
                            self.stats.return_s.append(
                                max(0.0, received - worker.sent_at - record.timings.get("wall_s", 0.0))
                            )
                            worker.ready_at = received
                            finish(worker, record)
                    elif not worker.process.is_alive():
                        worker.process.join(timeout=1)
                        run = worker.run
                        if run is not None:
                            cause = (
                                f"worker process {worker.slot.name} died ({_signal_name(worker.process.exitcode)}) "
                                f"while training this run: killed by the OS (out of memory?) or crashed in native code"
                            )
                            finish(worker, failed_record(run, cause, wall_s=time.monotonic() - worker.sent_at, device=worker.slot.device))
                        elif not worker.ready:
                            raise WorkerStartError(
                                f"worker {worker.slot.name} died while starting ({_signal_name(worker.process.exitcode)}); "
                                "its traceback is above; `harness sweep --in-process` trains without workers",
                                key=self.train_fn,
                            )
                        self._replace(worker)

                now = time.monotonic()
                for worker in list(self._workers):
                    if worker.run is not None and self.timeout_s and now - worker.sent_at > self.timeout_s:
                        self._kill(worker)  # first, so no late result can arrive for the timed-out run
                        cause = f"timed out after {self.timeout_s:g} s (worker killed)"
                        finish(worker, failed_record(worker.run, cause, wall_s=now - worker.sent_at, device=worker.slot.device))
                        self._replace(worker)
                if now - last_renew > self.lease_s / 4:
                    store.renew((w.run.run_id for w in self._workers if w.run is not None), owner=self.owner, lease_s=self.lease_s)
                    last_renew = now
                if on_tick:
                    on_tick([(w.slot, w.run, now - w.sent_at) for w in self._workers if w.run is not None])
        except BaseException:
            # Ctrl-C or a fatal error: running runs are not recorded as done; their claims are freed.
            running = [w.run.run_id for w in self._workers if w.run is not None]
            for worker in self._workers:
                self._kill(worker)
            self._workers = []
            try:
                store.release(running, owner=self.owner)
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
            raise
        finally:
            self.shutdown()
        return records
