"""Run a sweep: plan it, skip what the store already holds, train the rest, store each result."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Callable, Sequence, TextIO

from harness.data import Dataset, load_dataset
from harness.plan import PlannedRun, build_plan
from harness.records import RunRecord, RunStatus
from harness.spec import SweepSpec
from harness.store import ResultStore

TrainFn = Callable[[PlannedRun, Dataset], RunRecord]


@dataclasses.dataclass(frozen=True)
class PreparedSweep:
    spec: SweepSpec
    dataset: Dataset
    runs: tuple[PlannedRun, ...]


@dataclasses.dataclass(frozen=True)
class SweepOutcome:
    planned: int
    skipped: int
    records: tuple[RunRecord, ...]

    @property
    def failed(self) -> int:
        return sum(1 for r in self.records if r.status.is_failure())

    @property
    def trained(self) -> int:
        return len(self.records)


def prepare_sweep(spec: SweepSpec, *, data_dir: str | Path | None = None) -> PreparedSweep:
    """Load the data (fingerprint) and plan every run. Raises `DataError`/`SpecError`; writes nothing."""
    dataset = load_dataset(spec.dataset, subset=spec.subset, data_dir=data_dir)
    return PreparedSweep(spec=spec, dataset=dataset, runs=tuple(build_plan(spec, dataset)))


def sweep_info(prepared: PreparedSweep) -> dict:
    """What the report needs about a sweep besides its runs: variants, references, budget, data."""
    spec = prepared.spec
    variants = []
    seen = set()
    for run in prepared.runs:
        if run.variant.name in seen:
            continue
        seen.add(run.variant.name)
        variants.append(
            {
                "name": run.variant.name,
                "variant_id": run.variant.variant_id,
                "base": run.variant.base,
                "grid_point": [[k, v] for k, v in run.variant.grid_point],
                "reference": list(run.variant.reference),
                "params": run.summary.params,
                "epochs": run.variant.epochs,
                "batch_size": run.variant.batch_size,
                "validation_split": run.variant.validation_split,
                "estimated_train_flops": run.estimated_train_flops,
            }
        )
    return {
        "name": spec.name,
        "description": spec.description,
        "seeds": list(spec.seeds),
        "deterministic": spec.deterministic,
        "dataset": prepared.dataset.describe(),
        "variants": variants,
    }


def pending_runs(runs: Sequence[PlannedRun], store: ResultStore, *, rerun_failed: bool = False) -> list[PlannedRun]:
    """Resume is 'skip what is done': finished runs are kept; failed ones only with `rerun_failed`."""
    statuses = store.statuses(run.run_id for run in runs)
    todo = []
    for run in runs:
        status = statuses.get(run.run_id)
        if status is None or status in (RunStatus.PENDING, RunStatus.RUNNING):
            todo.append(run)
        elif status is RunStatus.FAILED and rerun_failed:
            todo.append(run)
    return todo


def format_plan(prepared: PreparedSweep, store: ResultStore | None) -> str:
    """The `--dry-run` listing: variants, seeds, parameter counts and runs already in the store."""
    spec, dataset = prepared.spec, prepared.dataset
    statuses = store.statuses(r.run_id for r in prepared.runs) if store is not None else {}
    lines = [
        f"sweep {spec.name} ({spec.source})",
        f"dataset {dataset.name}: {len(dataset.y_train)} train / {len(dataset.y_test)} test images "
        f"{'x'.join(map(str, dataset.image_shape))}, fingerprint {dataset.fingerprint} ({dataset.source})",
        f"seeds {list(spec.seeds)}; {len(spec.variants)} variants; {len(prepared.runs)} runs",
        "",
        f"{'variant':<48} {'id':<12} {'params':>10} {'epochs':>6} {'batch':>5} {'GFLOP/run':>10} {'done':>5} {'failed':>6}",
    ]
    by_variant: dict[str, list[PlannedRun]] = {}
    for run in prepared.runs:
        by_variant.setdefault(run.variant.name, []).append(run)
    total_done = total_failed = 0
    for name, runs in by_variant.items():
        first = runs[0]
        done = sum(1 for r in runs if statuses.get(r.run_id, RunStatus.PENDING).is_finished())
        failed = sum(1 for r in runs if statuses.get(r.run_id) is RunStatus.FAILED)
        total_done += done
        total_failed += failed
        lines.append(
            f"{name[:48]:<48} {first.variant.variant_id:<12} {first.summary.params:>10,} "
            f"{first.variant.epochs:>6} {first.variant.batch_size:>5} {first.estimated_train_flops / 1e9:>10.1f} "
            f"{done:>5} {failed:>6}"
        )
    lines += ["", f"{total_done} done, {total_failed} failed, {len(prepared.runs) - total_done - total_failed} to train"]
    return "\n".join(lines)


class Progress:
    """One line per finished run: counts, the run's result and an ETA."""

    def __init__(self, total: int, *, stream: TextIO | None = None) -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self.stream = stream or sys.stderr
        self.start = time.monotonic()

    def started(self, run: PlannedRun) -> None:
        self._write(f"[{self.done + self.failed + 1}/{self.total}] running {run.variant.name} seed={run.seed}")

    def finished(self, record: RunRecord) -> None:
        if record.status.is_failure():
            self.failed += 1
        else:
            self.done += 1
        finished = self.done + self.failed
        elapsed = time.monotonic() - self.start
        eta = elapsed / finished * (self.total - finished) if finished else 0.0
        if record.status is RunStatus.DONE:
            result = f"acc {100 * (record.test_accuracy or 0):.2f}%"
            if record.flags:
                result += " [" + ", ".join(f.value for f in record.flags) + "]"
        else:
            last = (record.error or "").strip().splitlines()[-1:] or [""]
            result = f"{record.status.value.upper()}: {last[0][:100]}"
        self._write(
            f"[{finished}/{self.total}] {record.variant} seed={record.seed}: {result} "
            f"({record.timings.get('wall_s', 0):.1f}s) | done {self.done} failed {self.failed} "
            f"pending {self.total - finished} | ETA {_fmt_duration(eta)}"
        )

    def _write(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


def _fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def run_sweep(
    prepared: PreparedSweep,
    *,
    store: ResultStore,
    rerun_failed: bool = False,
    train_fn: TrainFn | None = None,
    progress: Progress | None = None,
) -> SweepOutcome:
    """Train every planned run the store does not already hold, storing each as soon as it ends."""
    if train_fn is None:
        from harness.train import train_run as train_fn  # TensorFlow only now

    store.save_plan(
        prepared.spec.name,
        source=prepared.spec.source,
        info=sweep_info(prepared),
        runs=[(r.run_id, r.variant.name, r.seed) for r in prepared.runs],
    )
    todo = pending_runs(prepared.runs, store, rerun_failed=rerun_failed)
    progress = progress or Progress(len(todo))
    records = []
    for run in todo:
        progress.started(run)
        record = train_fn(run, prepared.dataset)
        store.put(record)
        records.append(record)
        progress.finished(record)
    return SweepOutcome(planned=len(prepared.runs), skipped=len(prepared.runs) - len(todo), records=tuple(records))
