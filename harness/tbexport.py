"""`harness export --tensorboard DIR`: a sweep as TensorBoard event files.

Each run becomes a TensorBoard run (`DIR/<variant>/seed_<n>`) with its per-epoch history as scalars
(step = epoch) and its test accuracy and loss; the sweep is an HParams experiment: the variant's
parameters that differ between variants, the variant name, the seed and the status are hparams,
test accuracy and loss the metrics. `tensorboard --logdir DIR` shows it in the HParams dashboard.

Written with tensorboard's own protos, summary builders and record writer, without TensorFlow.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from harness.errors import UserError
from harness.fsio import current_umask, safe_write
from harness.records import RunRecord
from harness.store import ResultStore

MARKER = ".harness-tensorboard.json"  # says a folder is an export of ours (safe to replace)
METRICS = ("test_accuracy", "test_loss")
MAX_DISCRETE = 64


@dataclasses.dataclass(frozen=True)
class TensorBoardRun:
    """One run as TensorBoard sees it: a folder, hparams, per-epoch scalars and final metrics."""

    folder: str
    hparams: Mapping[str, bool | float | str]
    scalars: Mapping[str, tuple[float, ...]]  # tag -> one value per epoch (step 1..n)
    metrics: Mapping[str, float]
    wall_time: float


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _hparam_value(value: Any) -> bool | float | str:
    if isinstance(value, bool) or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if value is None:
        return "none"
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _timestamp(text: str | None) -> float:
    if not text:
        return 0.0
    try:
        return dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        return 0.0


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.,=[]" else "_" for c in text) or "_"


def tensorboard_runs(records: Sequence[RunRecord], variants: Sequence[str]) -> list[TensorBoardRun]:
    """The data of the export (pure): which parameters vary, and each run's hparams and scalars."""
    flat = [_flatten({"model": r.config, "budget": r.budget}) for r in records]
    keys = sorted({key for item in flat for key in item})
    varying = [k for k in keys if len({json.dumps(item.get(k), sort_keys=True) for item in flat}) > 1]
    runs = []
    for record, name, params in zip(records, variants, flat):
        hparams: dict[str, bool | float | str] = {k: _hparam_value(params.get(k)) for k in varying}
        hparams.update({"variant": name, "seed": float(record.seed), "status": record.status.value})
        scalars = {
            tag: tuple(float(v) for v in values)
            for tag, values in sorted(record.history.items())
            if isinstance(values, list) and values
        }
        metrics = {m: float(record.metrics[m]) for m in METRICS if record.metrics.get(m) is not None}
        runs.append(
            TensorBoardRun(
                folder=f"{_safe_name(name)}/seed_{record.seed}",
                hparams=hparams,
                scalars=scalars,
                metrics=metrics,
                wall_time=_timestamp(record.finished_at) or _timestamp(record.started_at),
            )
        )
    return runs


def _domain(values: list[Any]):
    from tensorboard.plugins.hparams import summary_v2 as hp

    distinct = sorted(set(values), key=str)
    if len(distinct) > MAX_DISCRETE or len({type(v) for v in distinct}) != 1:
        return None
    return hp.Discrete(distinct)


def _write_events(folder: Path, events: list) -> None:
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "events.out.tfevents.0.harness", "wb") as handle:
        writer = RecordWriter(handle)
        writer.write(event_pb2.Event(wall_time=0.0, file_version="brain.Event:2").SerializeToString())
        for event in events:
            writer.write(event.SerializeToString())


def write_tensorboard_runs(runs: Sequence[TensorBoardRun], folder: Path, *, sweep: str) -> None:
    """Write the experiment summary at `folder` and one event file per run below it."""
    from tensorboard.compat.proto import event_pb2
    from tensorboard.plugins.hparams import summary_v2 as hp
    from tensorboard.plugins.scalar import summary_v2 as scalar

    names = sorted({name for run in runs for name in run.hparams})
    hparams = [hp.HParam(name, _domain([run.hparams[name] for run in runs if name in run.hparams])) for name in names]
    metrics = [hp.Metric(name, display_name=name.replace("_", " ")) for name in METRICS]
    created = min((run.wall_time for run in runs if run.wall_time), default=0.0)
    _write_events(
        folder,
        [event_pb2.Event(wall_time=created, summary=hp.hparams_config_pb(hparams, metrics, time_created_secs=created))],
    )
    for run in runs:
        events = [
            event_pb2.Event(
                wall_time=run.wall_time, step=0, summary=hp.hparams_pb(dict(run.hparams), trial_id=run.folder, start_time_secs=run.wall_time)
            )
        ]
        for tag, values in run.scalars.items():
            for epoch, value in enumerate(values, start=1):
                events.append(event_pb2.Event(wall_time=run.wall_time, step=epoch, summary=scalar.scalar_pb(tag, value)))
        epochs = max((len(v) for v in run.scalars.values()), default=0)
        for tag, value in run.metrics.items():
            events.append(event_pb2.Event(wall_time=run.wall_time, step=epochs, summary=scalar.scalar_pb(tag, value)))
        _write_events(folder / run.folder, events)
    safe_write(folder / MARKER, json.dumps({"sweep": sweep, "runs": len(runs)}) + "\n")


def _replace_dir(tmp: Path, out: Path) -> None:
    """Put `tmp` where `out` is. An existing `out` is replaced only when it is an export of ours
    (it holds our marker) or empty; anything else is refused before a byte is written there."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def check_export_dir(out: Path) -> None:
    if out.is_symlink():
        raise UserError("is a symbolic link; the harness only replaces folders of its own (choose another folder)",
                        file=str(out), key="--tensorboard")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise UserError(
            "exists and is not a TensorBoard export of harness (no " + MARKER + "); choose another folder",
            file=str(out),
            key="--tensorboard",
        )


def export_tensorboard(store: ResultStore, sweep: str, *, out: str | Path) -> Path:
    """Write the sweep's runs as TensorBoard logs in `out` (a folder of ours, replaced whole)."""
    from harness.report import load_results

    out = Path(out)
    check_export_dir(out)
    results = load_results(store, sweep)
    runs = tensorboard_runs(results.records, results.variants)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it 0700; the export folder follows the umask
    try:
        write_tensorboard_runs(runs, tmp, sweep=sweep)
        _replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
