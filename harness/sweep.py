"""Prepare a sweep: load its data, plan its runs, say what the store holds, show progress.

`harness.execute.execute_sweep` runs it."""

from __future__ import annotations

import dataclasses
import math
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TextIO

from harness.backends import model_kind
from harness.contracts import sweep_info  # noqa: F401 - re-exported for harness.execute
from harness.errors import SpecError
from harness.data import Dataset, configured_data_dir, load_dataset, split_sizes
from harness.plan import BackendContext, PlannedRun, build_plan
from harness.records import RunRecord, RunStatus
from harness.spec import SweepSpec
from harness.store import ResultStore



@dataclasses.dataclass(frozen=True)
class PreparedSweep:
    spec: SweepSpec
    dataset: Dataset
    runs: tuple[PlannedRun, ...]
    data_dir: str | None = None  # the resolved data folder, for worker processes to load the same data


def prepare_sweep(
    spec: SweepSpec,
    *,
    data_dir: str | Path | None = None,
    build_builders: bool = False,
    backends: BackendContext | None = None,
) -> PreparedSweep:
    """Load the data (fingerprint) and plan every run (its Keras backend resolved with `backends`).
    Raises `DataError`/`SpecError`/`BackendNotInstalled`; writes nothing.

    `build_builders` builds builder models to count their parameters (imports TensorFlow and the
    user's code here: for dry runs)."""
    folder = configured_data_dir(data_dir)
    dataset = load_dataset(spec.dataset, subset=spec.subset, data_dir=folder)
    check_splits(spec, n_train=len(dataset.y_train))
    runs = build_plan(spec, dataset, build_builders=build_builders, backends=backends)
    return PreparedSweep(spec=spec, dataset=dataset, runs=tuple(runs), data_dir=str(folder) if folder else None)


def check_splits(spec: SweepSpec, *, n_train: int) -> None:
    """Refuse a validation split that leaves no training image (or no validation image) on this data,
    before anything trains: it would otherwise end as a FAILED or DIVERGED record."""
    for variant in spec.variants:
        split = variant.validation_split
        n_fit, n_val = split_sizes(n_train, split)
        if n_fit < 1 or (split > 0 and n_val < 1):
            raise SpecError(
                f"validation_split {split:g} of {n_train:,} training images leaves "
                f"{n_fit} to train on and {n_val} to validate (variant '{variant.name}')",
                file=spec.source,
                key="budget.validation_split",
            )


def shared_runs(runs: Sequence[PlannedRun]) -> list[tuple[str, str]]:
    """Pairs of variant names whose runs are the same content (e.g. after `--epochs` made two
    variants that differed only in epochs equal): trained once, reported under both names."""
    first: dict[str, str] = {}
    pairs: dict[tuple[str, str], None] = {}
    for run in runs:
        other = first.setdefault(run.run_id, run.variant.name)
        if other != run.variant.name:
            pairs[(other, run.variant.name)] = None
    return list(pairs)


def pending_runs(runs: Sequence[PlannedRun], store: ResultStore, *, rerun_failed: bool = False) -> list[PlannedRun]:
    """Resume is 'skip what is done': finished runs are kept; failed ones only with `rerun_failed`.
    Each distinct run appears once, however many variants share it."""
    statuses = store.statuses(run.run_id for run in runs)
    todo: list[PlannedRun] = []
    seen: set[str] = set()
    for run in runs:
        if run.run_id in seen:
            continue
        seen.add(run.run_id)
        status = statuses.get(run.run_id)
        if status is None or status in (RunStatus.PENDING, RunStatus.RUNNING):
            todo.append(run)
        elif status is RunStatus.FAILED and rerun_failed:
            todo.append(run)
    return todo


def format_plan(prepared: PreparedSweep, store: ResultStore | None, *, first_round: int | None = None) -> str:
    """The `--dry-run` listing: variants, seeds, parameter counts and runs already in the store.
    With adaptive seeds, `first_round` is the number of runs of the first round."""
    spec, dataset = prepared.spec, prepared.dataset
    statuses = store.statuses(r.run_id for r in prepared.runs) if store is not None else {}
    if spec.adaptive is not None:
        seeds = (
            f"{spec.adaptive.describe()}; {len(spec.variants)} variants; {first_round} runs in the first round, "
            f"at most {len(prepared.runs)}"
        )
    else:
        seeds = f"seeds {list(spec.seeds)}; {len(spec.variants)} variants; {len(prepared.runs)} runs"
    lines = [
        f"sweep {spec.name} ({spec.source})",
        f"dataset {dataset.name}: {len(dataset.y_train)} train / {len(dataset.y_test)} test images "
        f"{'x'.join(map(str, dataset.image_shape))}, fingerprint {dataset.fingerprint} ({dataset.source})",
        seeds,
        "",
        f"{'variant':<48} {'id':<12} {'params':>10} {'epochs':>6} {'batch':>5} {'GFLOP/run':>10} {'done':>5} {'failed':>6}",
    ]
    by_variant: dict[str, list[PlannedRun]] = {}
    for run in prepared.runs:
        by_variant.setdefault(run.variant.name, []).append(run)
    for name, runs in by_variant.items():
        first = runs[0]
        done = sum(1 for r in runs if statuses.get(r.run_id, RunStatus.PENDING).is_finished())
        failed = sum(1 for r in runs if statuses.get(r.run_id) is RunStatus.FAILED)
        known = bool(first.summary.layers)  # a builder model not built for this plan: unknown
        params = f"{first.summary.params:>10,}" if known else f"{'?':>10}"
        gflops = f"{first.estimated_train_flops / 1e9:>10.1f}" if first.summary.forward_flops else f"{'?':>10}"
        lines.append(
            f"{name[:48]:<48} {first.variant.variant_id:<12} {params} "
            f"{first.variant.epochs:>6} {first.variant.batch_size:>5} {gflops} "
            f"{done:>5} {failed:>6}"
        )
    distinct = {run.run_id for run in prepared.runs}
    done = sum(1 for i in distinct if statuses.get(i, RunStatus.PENDING).is_finished())
    failed = sum(1 for i in distinct if statuses.get(i) is RunStatus.FAILED)
    left = len(distinct) - done - failed
    lines += ["", f"{done} done, {failed} failed, {left} to train" if spec.adaptive is None
              else f"{done} done, {failed} failed, at most {left} to train (adaptive: as many as the intervals need)"]
    return "\n".join(lines)


HISTORY_DEVICE = "earlier runs"  # the cost tracker's name for runs finished before this sweep
# The groups' tails (last-epoch report to records) whose median is added to a paced group.
TAILS_KEPT = 20


class Progress:
    """Live progress: a line per finished run (counts, result, ETA) and what each device is doing.

    On a terminal the device line stays at the bottom and is redrawn in place every second; in a
    log (not a TTY) it is printed as a plain line every `every_s` seconds, with how far each
    device's group is (its workers report the fraction of its epochs trained: `advanced`). The
    ETA comes from a cost model (`harness.eta`: time ~ steps and FLOPs) fitted to the runs
    finished on each device, and, for a group still training, from its own pace.
    Counts are of runs, not attempts: a retried run is running again, not finished twice.
    """

    def __init__(
        self,
        runs: Sequence[PlannedRun] = (),
        *,
        stream: TextIO | None = None,
        every_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from harness.eta import CostTracker

        self.total = len({r.run_id for r in runs})
        self.costs = {r.run_id: planned_cost(r) for r in runs}
        self.tracker = CostTracker()
        self.results: dict[str, RunStatus] = {}  # run id -> status of its last finished attempt
        self.running: dict[str, tuple[str, PlannedRun]] = {}
        self.started_at: dict[str, float] = {}
        # run id -> (its group's size, its group's progress reports: (seconds since it started,
        # fraction of its epochs done), the first and the latest)
        self.paces: dict[str, tuple[int, list[tuple[float, float]]]] = {}
        self._remembered: set[str] = set()  # run ids of `remember`ed runs
        # a group's pace ends with its last epoch; its test evaluation and records come after:
        # run id -> when its group reported its epochs done; model kind -> (device, that time) ->
        # the group's tail, once its records came (one per group, however many runs it had)
        self.trained_at: dict[str, float] = {}
        self.tails: dict[str, dict[tuple[str, float], float]] = {}
        self.groups: dict[str, tuple[str, ...]] = {}  # run id -> the run ids of its queued group
        self.queue_order: dict[tuple[str, ...], int] = {}  # a queued group -> its place in the queue
        self._seen_kinds: set[str] = set()  # model kinds (`backends.model_kind`) of those
        self.kinds = {r.run_id: model_kind(r.variant.model) for r in runs}
        self.slots = 1  # the most devices seen busy at once (a fused group is one)
        self.stream = stream or sys.stderr
        self.clock = clock
        self.start = clock()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = every_s if every_s is not None else (1.0 if self._tty else 15.0)
        self._last_status = self.start
        self._status = ""  # the live line currently drawn at the bottom of a terminal

    @property
    def done(self) -> int:
        return sum(1 for status in self.results.values() if not status.is_failure())

    @property
    def failed(self) -> int:
        return sum(1 for status in self.results.values() if status.is_failure())

    @property
    def pending(self) -> int:
        return max(0, self.total - len(self.results) - len(self.running))

    def eta_s(self) -> float | None:
        """Predicted seconds left; None until a run has finished or a training group has reported
        its progress twice (the prior alone is a guess, and the time to a first report holds the
        setup: 35 minutes predicted for a 10-minute sweep), and while a device is past its
        prediction (`harness.eta.OVERDUE_FACTOR`)."""
        return self.estimate().seconds

    def estimate(self):
        """`harness.eta.Estimate`: seconds left (see `eta_s`) and whether they are rough."""
        from harness.eta import Estimate, Running, extrapolate

        totals = {run_id: extrapolate(reports) for run_id, (_size, reports) in self.paces.items()}
        paced = {run_id for run_id, total in totals.items() if total is not None}
        totals = {run_id: None if total is None else total + self.tail_s(run_id) for run_id, total in totals.items()}
        if not paced and not self._remembered and not any(not s.is_failure() for s in self.results.values()):
            return Estimate(None, rough=True)
        now = self.clock()
        # the pending runs by the group a worker will train them in, in the queue's order (runs
        # not queued, held by another sweep, last)
        units: dict[tuple[str, ...], list[Any]] = {}
        for run_id, cost in self.costs.items():
            if run_id not in self.results and run_id not in self.running:
                units.setdefault(self.groups.get(run_id, (run_id,)), []).append(cost)
        last = len(self.queue_order)
        pending = [units[key] for key in sorted(units, key=lambda key: self.queue_order.get(key, last))]
        running = []
        for run_id, (device, _run) in self.running.items():
            if run_id not in self.costs:
                continue
            size, reports = self.paces.get(run_id, (1, []))
            first = reports[0][0] / reports[0][1] if len(reports) == 1 and reports[0][1] > 0 else None
            running.append(Running(device, self.costs[run_id], now - self.started_at.get(run_id, now),
                                   totals.get(run_id), size, first))
        estimate = self.tracker.estimate(pending=pending, running=running, slots=self.slots)
        # steps and FLOPs cannot tell a CNN from an MLP: while a kind of model among the runs not
        # started has not trained here yet (finished, or paced), its prediction is a guess
        seen = set(self._seen_kinds) | {self.kinds.get(i) for i, s in self.results.items() if not s.is_failure()}
        seen |= {self.kinds.get(i) for i in paced}
        unseen = {self.kinds.get(i) for i in self.costs if i not in self.results and i not in self.running} - seen
        if unseen and estimate.seconds is not None and not estimate.rough:
            return dataclasses.replace(estimate, rough=True)
        return estimate

    def tail_s(self, run_id: str) -> float:
        """What a group takes after its last epoch (test evaluation, records): the median over the
        last `TAILS_KEPT` groups of its model kind finished here, else over every kind; 0 before."""
        own = list(self.tails.get(self.kinds.get(run_id, ""), {}).values())
        every = [t for tails in self.tails.values() for t in tails.values()]
        seen = (own or every)[-TAILS_KEPT:]
        return statistics.median(seen) if seen else 0.0

    def grouped(self, queue: Iterable[Sequence[str]]) -> None:
        """The dispatcher's queue, in order: the run ids of each group it will hand to one worker
        (fused seeds; a retried run alone, first). The ETA places each group's runs on one worker,
        in this order, not spread over all of them. Replaces the queue told before."""
        self.groups, self.queue_order = {}, {}
        for position, group in enumerate(queue):
            members = tuple(group)
            self.queue_order[members] = position
            for run_id in members:
                self.groups[run_id] = members

    def dropped(self, run: PlannedRun) -> None:
        """A run this sweep will not train after all: another sweep finished it meanwhile (said in
        a line, since the count of runs goes down by one)."""
        if self.costs.pop(run.run_id, None) is not None:  # (a retried run is not in `results`)
            self.total -= 1
            self._write(f"  {run.variant.name} seed={run.seed}: finished by another sweep meanwhile, not trained here")

    def remember(self, finished: Sequence["FinishedRun"]) -> None:
        """Runs finished before this sweep started (`finished_runs`): the ETA knows from the
        first second how long runs take here (a resumed sweep, more seeds, a later round)."""
        for run in finished:
            if run.run_id not in self.results and run.run_id not in self._remembered:
                self._remembered.add(run.run_id)
                self._seen_kinds.add(run.kind)
                self.tracker.observe(HISTORY_DEVICE, run.cost, run.seconds)

    def advanced(self, run_ids: Sequence[str], done: float, *, age_s: float | None = None) -> None:
        """The group training `run_ids` has done `done` (0..1) of its epochs (`harness.heartbeat`),
        `age_s` seconds after it began (as its worker timed it; default: since it started here)."""
        now = self.clock()
        live = [i for i in run_ids if i in self.running and i in self.started_at]
        for run_id in live:
            size, reports = self.paces.get(run_id, (len(live), []))  # the group's size at its first report
            report = (now - self.started_at[run_id] if age_s is None else float(age_s), float(done))
            self.paces[run_id] = (size, (reports[:1] + [report]) if reports else [report])
            if done >= 1.0:
                self.trained_at.setdefault(run_id, now)

    def fraction_done(self, run_id: str) -> float | None:
        """The latest progress its group reported (None: none yet)."""
        reports = self.paces.get(run_id, (1, []))[1]
        return reports[-1][1] if reports else None

    def started(self, run: PlannedRun, device: str = "this process") -> None:
        self.results.pop(run.run_id, None)  # a retry: running again, not finished
        self.paces.pop(run.run_id, None)
        self.trained_at.pop(run.run_id, None)
        self.running[run.run_id] = (device, run)
        self.started_at[run.run_id] = self.clock()
        self.slots = max(self.slots, len({device for device, _run in self.running.values()}))
        self._write(f"  {device}: start {run.variant.name} seed={run.seed}")

    def finished(self, record: RunRecord) -> None:
        device, _run = self.running.pop(record.run_id, ("", None))
        self.started_at.pop(record.run_id, None)
        self.paces.pop(record.run_id, None)
        trained = self.trained_at.pop(record.run_id, None)
        if trained is not None and not record.status.is_failure():
            kind = self.tails.setdefault(self.kinds.get(record.run_id, ""), {})
            kind.setdefault((device, trained), max(0.0, self.clock() - trained))
        self.results[record.run_id] = record.status
        wall_s = record.timings.get("wall_s", 0.0)
        if not record.status.is_failure() and record.run_id in self.costs and wall_s > 0:
            self.tracker.observe(device or record.device, self.costs[record.run_id], wall_s)
        if record.status is RunStatus.DONE:
            result = f"acc {100 * (record.test_accuracy or 0):.2f}%"
            if record.diagnosis is not None and record.diagnosis.health.is_problem():
                result += f" [{record.diagnosis.health.label}]"
            elif record.flags:
                result += " [" + ", ".join(f.value for f in record.flags) + "]"
        else:
            last = (record.error or "").strip().splitlines()[-1:] or [""]
            result = f"{record.status.value.upper()}: {last[0][:120]}"
        self._write(
            f"[{len(self.results)}/{self.total}] {device + ': ' if device else ''}{record.variant} seed={record.seed}: "
            f"{result} ({record.timings.get('wall_s', 0):.1f}s) | {self.counts()}"
        )

    def retried(self, record: RunRecord, attempt: int, retries: int) -> None:
        """A run failed and is queued again (`--retries`): not counted until its last attempt."""
        device, _run = self.running.pop(record.run_id, ("", None))
        self.paces.pop(record.run_id, None)
        self.trained_at.pop(record.run_id, None)
        last = (record.error or "").strip().splitlines()[-1:] or [""]
        self._write(
            f"  {device + ': ' if device else ''}{record.variant} seed={record.seed}: FAILED, retry {attempt}/{retries}: "
            f"{last[0][:120]}"
        )

    def counts(self) -> str:
        """The counts and the ETA: `?` unknown, `~` rough (see `estimate` and `harness.eta.Estimate`)."""
        estimate = self.estimate()
        eta = "?" if estimate.seconds is None else ("~" if estimate.rough else "") + _fmt_duration(estimate.seconds)
        return (
            f"done {self.done} failed {self.failed} running {len(self.running)} "
            f"pending {self.pending} | ETA {eta} ({_fmt_duration(self.clock() - self.start)} elapsed)"
        )

    def tick(self, active: Sequence[tuple[Any, PlannedRun, float]]) -> None:
        """Called by the scheduler while it waits: the device activity line, every `every_s`."""
        now = self.clock()
        if not active or now - self._last_status < self.every_s:
            return
        self._last_status = now
        busy = ", ".join(
            f"{getattr(slot, 'name', slot)} {run.variant.name[:24]} s{run.seed} {age:.0f}s{self._done_text(run.run_id)}"
            for slot, run, age in active
        )
        line = f"  running: {busy} | {self.counts()}"
        if self._tty:
            self._status = line
            self._draw_status()
        else:
            self._write(line)

    def _done_text(self, run_id: str) -> str:
        done = self.fraction_done(run_id)
        return "" if done is None else f" {100 * done:.0f}%"

    def _draw_status(self) -> None:
        width = shutil.get_terminal_size((120, 24)).columns
        self.stream.write("\r\033[K" + self._status[: max(20, width - 1)])
        self.stream.flush()

    def _write(self, text: str) -> None:
        if self._tty and self._status:
            self.stream.write("\r\033[K")  # clear the live line, print above it, draw it again
            print(text, file=self.stream)
            if self.running:
                self._draw_status()
            else:
                self._status = ""
                self.stream.flush()
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        """End the live line so the next output starts on a fresh line."""
        if self._tty and self._status:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._status = ""


def _fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def planned_cost(run: PlannedRun):
    """A run's cost for the ETA model (`harness.eta.RunCost`): its optimizer steps and FLOPs."""
    from harness.eta import run_cost

    return run_cost(
        n_fit=run.n_fit,
        batch_size=run.variant.batch_size,
        epochs=run.variant.epochs,
        train_flops=run.estimated_train_flops,
    )


def expected_seconds(run: PlannedRun, known: "Expectation | None" = None) -> float:
    """A run's expected time before it starts: what `known` says (the store's runs measured on
    this device), else `eta.ORDER_PRIOR` (steps and FLOPs). FLOPs alone put seed 004's step-bound
    50-epoch, batch-32 MLP (94,000 steps) after far shorter runs, and it started last."""
    from harness.eta import ORDER_PRIOR

    return known.seconds(run) if known is not None else ORDER_PRIOR.predict(planned_cost(run))


def order_longest_first(runs: Sequence[PlannedRun], known: "Expectation | None" = None) -> list[PlannedRun]:
    """Longest expected runs first (`expected_seconds`), so no long run starts last."""
    return sorted(runs, key=lambda r: -expected_seconds(r, known))


@dataclasses.dataclass(frozen=True)
class FinishedRun:
    """A run the store holds as DONE, trained on this kind of device: its cost and its seconds."""

    run_id: str
    variant_id: str
    cost: Any  # harness.eta.RunCost
    seconds: float
    kind: str = ""  # `backends.model_kind`: dense, conv or builder


def finished_runs(runs: Sequence[PlannedRun], store: ResultStore, *, device_kind: str) -> list[FinishedRun]:
    """The runs of `runs` the store holds as DONE with a wall time, trained on `device_kind`
    ("cpu" | "gpu", from the record's device label): what a resumed sweep, or one given more
    seeds, already knows about how long its runs take here."""
    by_id = {run.run_id: run for run in runs}
    out = []
    for record in store.records(by_id):
        seconds = record.timings.get("wall_s", 0.0)
        on_cpu = record.device.startswith("cpu")
        if record.status is RunStatus.DONE and seconds > 0 and math.isfinite(seconds) and on_cpu == (device_kind == "cpu"):
            run = by_id[record.run_id]
            out.append(FinishedRun(record.run_id, record.variant_id, planned_cost(run), float(seconds),
                                   model_kind(run.variant.model)))
    return out


@dataclasses.dataclass(frozen=True)
class Expectation:
    """Expected seconds of runs not started, from runs finished here: a variant's own mean where
    some of its seeds finished (the cost model cannot tell an MLP from a CNN of the same steps
    and FLOPs), else the cost model fitted to them all (`harness.eta.fit_cost_model`)."""

    model: Any  # harness.eta.CostModel
    measured: Mapping[str, float]  # variant id -> mean seconds of its finished runs

    @classmethod
    def of(cls, finished: Sequence[FinishedRun]) -> "Expectation | None":
        if not finished:
            return None
        from harness.eta import fit_cost_model

        by_variant: dict[str, list[float]] = {}
        for run in finished:
            by_variant.setdefault(run.variant_id, []).append(run.seconds)
        return cls(
            fit_cost_model([(run.cost, run.seconds) for run in finished]),
            {variant: sum(times) / len(times) for variant, times in by_variant.items()},
        )

    def seconds(self, run: PlannedRun) -> float:
        measured = self.measured.get(run.variant.variant_id)
        return measured if measured is not None else self.model.predict(planned_cost(run))
