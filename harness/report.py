"""Markdown leaderboard of a sweep, drawn from DataFrames the aggregator computed."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from harness import __version__
from harness.aggregate import runs_frame, summarize
from harness.errors import UserError
from harness.records import RunRecord
from harness.store import ResultStore


@dataclasses.dataclass(frozen=True)
class SweepResults:
    name: str
    info: dict[str, Any]
    records: tuple[RunRecord, ...]
    planned: int
    runs: pd.DataFrame
    summary: pd.DataFrame


def load_results(store: ResultStore, sweep: str) -> SweepResults:
    info = store.sweep_info(sweep)
    if info is None:
        known = ", ".join(store.sweeps()) or "none yet"
        raise UserError(f"no sweep named '{sweep}' in the store (known: {known})", key="--sweep")
    plan = store.plan(sweep)
    names = {run_id: variant for run_id, variant, _seed in plan}
    records = tuple(store.records(run_id for run_id, _v, _s in plan))
    runs = runs_frame(records, names=names)
    return SweepResults(
        name=sweep,
        info=info,
        records=records,
        planned=len(plan),
        runs=runs,
        summary=summarize(runs, info["variants"]),
    )


def _pct(value: float, digits: int = 2) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_leaderboard(results: SweepResults, *, generated_at: str | None = None) -> str:
    info, summary, runs = results.info, results.summary, results.runs
    dataset = info.get("dataset", {})
    generated_at = generated_at or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    finished = int(runs["status"].isin(["done", "diverged"]).sum()) if len(runs) else 0
    failed = int((runs["status"] == "failed").sum()) if len(runs) else 0
    lines = [
        f"# Leaderboard: {results.name}",
        "",
        info.get("description") or "",
        "",
        f"Test accuracy (%) over seeds {info.get('seeds')}: mean, sample std (ddof=1) and 95% Student-t interval. "
        f"n counts finished runs; failures are failed or diverged runs, never dropped silently.",
        "",
        f"Runs: {results.planned} planned, {finished} finished, {failed} failed, "
        f"{results.planned - len(runs)} not run yet.",
        "",
        "| Rank | Variant | Mean acc (%) | Std | 95% CI | n | Failures | Published (%) | Params | Mean train time (s) |",
        "|---:|---|---:|---:|---|---:|---:|---|---:|---:|",
    ]
    for row in summary.itertuples(index=False):
        rank = "—" if pd.isna(row.rank) else str(int(row.rank))
        ci = "—" if math.isnan(row.ci_low) else f"[{row.ci_low:.2f}, {row.ci_high:.2f}]"
        reference = ", ".join(f"{r:g}" for r in row.reference) or "—"
        failures = str(row.failures)
        if row.diverged:
            failures += f" ({row.diverged} diverged)"
        name = _md_escape(row.variant)
        if row.near_chance:
            name += f" ⚠ {row.near_chance} near chance"
        lines.append(
            f"| {rank} | {name} | {_pct(row.mean)} | {_pct(row.std)} | {ci} | {row.n} | {failures} | "
            f"{reference} | {row.params:,} | {_pct(row.train_s, 1)} |"
        )
    problems = runs[runs["status"].isin(["failed", "diverged"])] if len(runs) else runs
    if len(problems):
        lines += ["", "## Failures", "", "| Variant | Seed | Status | Cause |", "|---|---:|---|---|"]
        for row in problems.itertuples(index=False):
            lines.append(f"| {_md_escape(row.variant)} | {row.seed} | {row.status} | {_md_escape(row.error)[:200]} |")
    devices = sorted({d for d in runs["device"].tolist() if d}) if len(runs) else []
    versions = next((r.versions for r in results.records if r.versions.get("tensorflow")), {})
    lines += [
        "",
        "## Provenance",
        "",
        f"- generated: {generated_at} by harness {__version__}",
        f"- sweep file: `{info.get('source')}` (planned {info.get('planned_at')})",
        f"- dataset: {dataset.get('name')} from `{dataset.get('source')}`, {dataset.get('n_train')} train / "
        f"{dataset.get('n_test')} test images, fingerprint `{dataset.get('fingerprint')}`",
        f"- budget: epochs and batch size per variant as listed in the sweep; seeds {info.get('seeds')}; "
        f"op determinism {'on' if info.get('deterministic') else 'off'}",
        f"- TensorFlow {versions.get('tensorflow', '?')}, Keras {versions.get('keras', '?')}, "
        f"Python {versions.get('python', '?')}, NumPy {versions.get('numpy', '?')}",
        f"- devices: {', '.join(devices) or '—'}",
        "",
    ]
    return "\n".join(lines)


def atomic_write(path: str | Path, text: str) -> Path:
    """Write via a temp file in the same folder and `os.replace`: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_report(store: ResultStore, sweep: str, *, out: str | Path | None = None) -> Path:
    results = load_results(store, sweep)
    out = Path(out) if out else Path("reports") / f"{sweep}.md"
    return atomic_write(out, render_leaderboard(results))


def status_rows(store: ResultStore) -> list[dict[str, Any]]:
    """Per sweep: planned, done, diverged, failed, pending."""
    rows = []
    for sweep in store.sweeps():
        plan = store.plan(sweep)
        statuses = store.statuses(run_id for run_id, _v, _s in plan)
        counts = {s: 0 for s in ("done", "diverged", "failed")}
        for status in statuses.values():
            if status.value in counts:
                counts[status.value] += 1
        finished = counts["done"] + counts["diverged"] + counts["failed"]
        rows.append({"sweep": sweep, "planned": len(plan), **counts, "pending": len(plan) - finished})
    return rows
