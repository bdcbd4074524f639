"""Markdown leaderboard of a sweep, drawn from DataFrames the aggregator computed."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from harness import __version__
from harness.aggregate import (
    Resolution,
    backend_comparison,
    backend_versions,
    record_backend,
    resolution,
    runs_frame,
    summarize,
    sweep_utilisation,
)
from harness.contracts import SweepInfo
from harness.errors import UserError
from harness.fsio import check_writable_target, safe_name, safe_write
from harness.health import health_of
from harness.records import RunRecord, RunStatus
from harness.stats import clip_pct
from harness.store import ResultStore


@dataclasses.dataclass(frozen=True)
class SweepResults:
    name: str
    info: SweepInfo
    records: tuple[RunRecord, ...]  # one per plan entry that has a stored record
    variants: tuple[str, ...]  # the plan's variant name of each of `records`
    planned: int
    runs: pd.DataFrame
    summary: pd.DataFrame
    utilisation: dict[str, Any]
    resolution: Resolution | None = None

    @property
    def versions(self) -> dict[str, str]:
        """Library versions of the first run that got as far as importing its Keras backend."""
        return next((r.versions for r in self.records if r.versions.get("keras")), {})


def load_results(store: ResultStore, sweep: str) -> SweepResults:
    info = store.sweep_info(sweep)
    if info is None:
        known = ", ".join(store.sweeps()) or "none yet"
        raise UserError(f"no sweep named '{sweep}' in the store (known: {known})", key="--sweep")
    plan = store.plan(sweep)
    by_id = {r.run_id: r for r in store.records(dict.fromkeys(run_id for run_id, _v, _s in plan))}
    entries = [(variant, by_id[run_id]) for run_id, variant, _seed in plan if run_id in by_id]
    records = tuple(record for _variant, record in entries)
    variants = tuple(variant for variant, _record in entries)
    runs = runs_frame(records, variants=variants)
    planned: dict[str, int] = {}
    for _run_id, variant, _seed in plan:
        planned[variant] = planned.get(variant, 0) + 1
    summary = summarize(runs, info.variants, planned=planned)
    return SweepResults(
        name=sweep,
        info=info,
        records=records,
        variants=variants,
        planned=len(plan),
        runs=runs,
        summary=summary,
        resolution=resolution(summary) if len(summary) else None,
        utilisation=sweep_utilisation(
            records, {kind: store.get_meta(f"calibration:{kind}") for kind in ("cpu", "gpu")}
        ),
    )


def _pct(value: float, digits: int = 2) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _interval(low: float, high: float, digits: int = 2) -> str:
    """An accuracy interval for display, clipped to [0, 100]."""
    if math.isnan(low) or math.isnan(high):
        return "—"
    return f"[{clip_pct(low):.{digits}f}, {clip_pct(high):.{digits}f}]"


def _published_cell(row: Any) -> str:
    return "; ".join(f"{v.reference:g} ({_md_escape(v.text)})" for v in row.published) or "—"


def _difference_cell(row: Any) -> str:
    if row.tie_note == "best":
        return "best"
    if math.isnan(row.diff_to_best):
        return "—"
    text = f"{row.diff_to_best:+.2f}"
    if not math.isnan(row.diff_low) and row.diff_low != row.diff_high:
        text += f" [{row.diff_low:+.2f}, {row.diff_high:+.2f}]"
    if not math.isnan(row.p_holm):
        text += f", p={row.p_holm:.2g}"
    elif row.tie_note:
        text += f" ({_md_escape(row.tie_note)})"
    return text


def _not_healthy_cell(row: Any) -> str:
    """Failed (infrastructure) apart from the model's own bad outcomes (diverged, collapsed,
    train/eval mismatch: the last is not a collapse, see "Run health")."""
    mismatched = int(getattr(row, "mismatched", 0))
    collapsed = row.n - row.healthy - mismatched
    parts = []
    if row.failed:
        parts.append(f"{row.failed} failed")
    if row.diverged:
        parts.append(f"{row.diverged} diverged")
    if collapsed > 0:
        parts.append(f"{collapsed} collapsed")
    if mismatched:
        parts.append(f"{mismatched} mismatched")
    not_run = row.planned - row.n - row.failed - row.diverged
    if not_run > 0:
        parts.append(f"{not_run} not run yet")
    return ", ".join(parts) or "—"


def render_leaderboard(
    results: SweepResults, *, generated_at: str | None = None, plots: dict[str, str] | None = None,
    summary_csv: str | None = None,
) -> str:
    """The markdown report. `plots` maps plot names to paths relative to the report file."""
    info, summary, runs = results.info, results.summary, results.runs
    dataset = info.dataset
    generated_at = generated_at or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    count = lambda status: int((runs["status"] == status).sum()) if len(runs) else 0  # noqa: E731
    done, diverged, failed = count("done"), count("diverged"), count("failed")
    healthy = int(summary["healthy"].sum()) if len(summary) else 0
    lines = [f"# Leaderboard: {results.name}", ""]
    if info.description:
        lines += [info.description.strip(), ""]
    lines += [
        f"Test accuracy (%) over {_seeds_phrase(info)}: mean, sample std (ddof=1), 95% Student-t interval of "
        "the mean, and median [min, max], over the runs that finished with an accuracy (n). **Success**: healthy "
        "runs over planned runs. **Not healthy**: *failed* runs broke for infrastructure reasons; *diverged* "
        "(no accuracy, outside n), *collapsed* and *mismatched* (inside n) are the model's own outcome. "
        "Nothing is dropped silently.",
        "",
        "**Rank rule:** a variant needs more than half of its attempted runs healthy to be ranked with the "
        "others; one whose seeds mostly failed, diverged, collapsed or mismatched ranks after all of them "
        "(marked *mostly unhealthy*) and cannot take rank 1, however good its surviving seeds. "
        "**Bold** rank: not distinguishable from the best, i.e. its difference to the best has a Holm-corrected "
        "p >= 0.05 over all the comparisons with the best (Welch's t-test; a single run is tested against the "
        "other side's prediction interval; runs without seed variance and with the same accuracy are a tie, "
        "and no p-value is invented for them). Bold is contiguous: a variant ranked above a bold one is bold "
        "too. **Published** numbers are one run each, so each is judged against a 95% *prediction* interval "
        "for one new run of ours (mean +- t * s * sqrt(1 + 1/n)), with its rank among our seeds. Displayed "
        "intervals are clipped to [0, 100].",
        "",
        f"Runs: {results.planned} planned: {done} done (the n column; {done - healthy} of them collapsed or "
        f"mismatched), {diverged} diverged, {failed} failed, {results.planned - len(runs)} not run yet.",
        "",
    ]
    if info.adaptive is not None:
        lines += [_adaptive_note(info, summary), ""]
    if results.resolution is not None:
        lines += [results.resolution.text, ""]
    lines += [
        "| Rank | Variant | Mean acc (%) | Std | 95% CI | Median [min, max] | n | Success | Not healthy | "
        "Difference to best [95% CI], Holm p | Published (%) | Params | Mean train time (s) |",
        "|---:|---|---:|---:|---|---|---:|---:|---|---|---|---:|---:|",
    ]
    for row in summary.itertuples(index=False):
        rank = "—" if pd.isna(row.rank) else str(int(row.rank))
        if rank != "—" and row.tied_with_best:
            rank = f"**{rank}**"
        name = _md_escape(row.variant) + _health_note(row)
        spread = "—" if not row.n else f"{_pct(row.median)} [{_pct(row.min)}, {_pct(row.max)}]"
        success = "—" if math.isnan(row.success_rate) else f"{row.healthy}/{row.planned} ({100 * row.success_rate:.0f}%)"
        if row.n and not row.eligible:
            success += " *mostly unhealthy*"
        lines.append(
            f"| {rank} | {name} | {_pct(row.mean)} | {_pct(row.std)} | {_interval(row.ci_low, row.ci_high)} | "
            f"{spread} | {row.n} | {success} | {_not_healthy_cell(row)} | {_difference_cell(row)} | "
            f"{_published_cell(row)} | {row.params:,} | {_pct(row.train_s, 1)} |"
        )
    if summary_csv:
        lines += ["", f"The same table as CSV: [`{summary_csv}`]({summary_csv})."]
    lines += render_health(results)
    from harness.tune import render_tuner_comparison, tuner_comparison  # a tuned sweep: the winner's curse

    lines += render_tuner_comparison(tuner_comparison(info, results.records, results.variants))
    lines += render_backends(results)
    if plots:
        lines += ["", "## Plots", ""]
        captions = {
            "accuracy": "Mean and 95% CI per variant, each seed a dot, published numbers as red crosses",
            "learning_curves": "Learning curves: mean over seeds with a 95% band",
            "accuracy_vs_params": "Accuracy against parameters, Pareto front in red",
            "accuracy_vs_train_s": "Accuracy against train time, Pareto front in red",
            "grid_heatmap": "Mean accuracy over the two grid axes",
        }
        for name, path in plots.items():
            lines += [f"### {captions.get(name, name)}", "", f"![{name}]({path})", ""]
    problems = runs[runs["status"].isin(["failed", "diverged"])] if len(runs) else runs
    if len(problems):
        lines += ["", "## Failures", "", "| Variant | Seed | Status | Cause |", "|---|---:|---|---|"]
        for row in problems.itertuples(index=False):
            lines.append(f"| {_md_escape(row.variant)} | {row.seed} | {row.status} | {_md_escape(row.error)[:200]} |")
    devices = sorted({d for d in runs["device"].tolist() if d}) if len(runs) else []
    versions = results.versions
    lines += [
        "",
        "## Provenance",
        "",
        f"- generated: {generated_at} by harness {__version__}",
        f"- sweep file: `{info.source}` (planned {info.planned_at})",
        f"- dataset: {dataset.name} from `{dataset.source}`, {dataset.n_train} train / "
        f"{dataset.n_test} test images, fingerprint `{dataset.fingerprint}`",
        f"- budget: {_describe_budget(info)}; {_seeds_phrase(info)}; "
        f"op determinism {'on' if info.deterministic else 'off'}",
        f"- Keras {versions.get('keras', '?')} on {_describe_backends(results)}; "
        f"Python {versions.get('python', '?')}, NumPy {versions.get('numpy', '?')}",
        f"- devices: {', '.join(devices) or '—'}",
        f"- compute: {_describe_utilisation(results.utilisation)}",
        "",
    ]
    return "\n".join(lines)


_BACKEND_NAMES = {"tensorflow": "TensorFlow", "jax": "JAX", "torch": "PyTorch"}


def _describe_backends(results: SweepResults) -> str:
    """'TensorFlow 2.21.0 (8 runs), JAX 0.10.2 (4 runs)': every Keras backend the runs used."""
    versions = backend_versions(results.records)
    if not versions:
        return "—"
    counts = results.runs["keras_backend"].value_counts().to_dict() if len(results.runs) else {}
    return ", ".join(
        f"{_BACKEND_NAMES.get(b, b)} {v} ({counts.get(b, 0)} run{'s' if counts.get(b, 0) != 1 else ''})"
        for b, v in versions.items()
    )


def render_backends(results: SweepResults) -> list[str]:
    """The Keras backends section: models trained on several backends side by side (accuracy and
    train time per run), and what `keras_backend: auto` chose and why."""
    lines: list[str] = []
    table = backend_comparison(results.runs)
    if len(table):
        lines += [
            "",
            "## Keras backends side by side",
            "",
            "Variants that differ only by Keras backend (same model, budget, data and seeds). Speed-up: "
            "the slowest backend's mean train time per run over this one's.",
            "",
            "| Model | Backend | Variant | n | Failures | Mean acc (%) | Std | Mean train time (s) | Speed-up |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in table.itertuples(index=False):
            lines.append(
                f"| `{row.model}` | {_BACKEND_NAMES.get(row.keras_backend, row.keras_backend)} | {_md_escape(row.variant)} | "
                f"{row.n} | {row.failures} | {_pct(row.mean)} | {_pct(row.std)} | {_pct(row.train_s, 1)} | "
                f"{_pct(row.speedup, 2)}x |"
            )
    choices = {}
    for record in results.records:
        reason = record.budget.get("keras_backend_auto")
        if reason:
            choices.setdefault((record.variant, record.budget.get("keras_backend")), reason)
    if choices:
        lines += ["", "## keras_backend: auto", "", "| Variant | Chosen | Why |", "|---|---|---|"]
        for (variant, backend), reason in choices.items():
            lines.append(f"| {_md_escape(variant)} | {_BACKEND_NAMES.get(backend, backend)} | {_md_escape(reason)} |")
    return lines


def _health_note(row: Any) -> str:
    """The leaderboard's warning beside a variant: what its unhealthy runs are (harness/health.py)."""
    notes = []
    if getattr(row, "mismatched", 0):
        notes.append(f"{row.mismatched} train/eval mismatch")
    if getattr(row, "collapsed", 0):
        notes.append(f"{row.collapsed} collapsed")
    unexplained = row.near_chance - getattr(row, "mismatched", 0) - getattr(row, "collapsed", 0)
    if unexplained > 0:
        notes.append(f"{unexplained} near chance")
    return f" ⚠ {', '.join(notes)}" if notes else ""


def render_health(results: SweepResults) -> list[str]:
    """The "Run health" section: every diverged, collapsed or mismatched run, why, and what to do."""
    rows = []
    for variant, record in zip(results.variants, results.records):
        diagnosis = health_of(record)
        if diagnosis is not None and diagnosis.health.is_problem():
            rows.append((variant, record.seed, diagnosis))
    if not rows:
        return []
    lines = [
        "",
        "## Run health",
        "",
        "A **train/eval mismatch** is not a collapse: the model learnt (its training accuracy is high) but "
        "its inference-mode accuracy is far lower, usually because batch-norm moving statistics have not "
        "converged in so few steps. Its low accuracy says the budget is too small for those statistics, not "
        "that the architecture is worse; more steps or a lower `batchnorm_momentum` fix it. A **collapse** "
        "is a run whose training accuracy itself stayed near chance; **diverged**: the loss became NaN.",
        "",
        "| Variant | Seed | Health | Train acc (%) | Test acc (%) | Steps | Evidence | Likely cause | Try |",
        "|---|---:|---|---:|---:|---:|---|---|---|",
    ]
    for variant, seed, d in rows:
        train = "—" if d.train_accuracy is None else f"{100 * d.train_accuracy:.2f}"
        test = "—" if d.eval_accuracy is None else f"{100 * d.eval_accuracy:.2f}"
        causes = "; ".join(cause.label for cause in d.causes) or "—"
        lines.append(
            f"| {_md_escape(variant)} | {seed} | {d.health.label} | {train} | {test} | {d.steps or '—'} | "
            f"{_md_escape(d.evidence)} | {_md_escape(causes)} | {_md_escape(d.advice) or '—'} |"
        )
    return lines


def _seeds_phrase(info: SweepInfo) -> str:
    if info.adaptive is None:
        return f"seeds {list(info.seeds)}"
    return f"adaptive seeds ({info.adaptive.min} to {info.adaptive.max} per variant, so n differs)"


def _adaptive_note(info: SweepInfo, summary: pd.DataFrame) -> str:
    """Which variants the adaptive rule left with an interval wider than its target."""
    policy = info.adaptive
    text = (
        f"**Adaptive seeds:** every variant trained its first {policy.min} seeds; one whose 95% interval of the "
        f"mean was wider than +-{policy.ci_half_width:g} points got more, up to {policy.max}."
    )
    if not len(summary):
        return text
    wide = summary[((summary["ci_high"] - summary["ci_low"]) / 2 > policy.ci_half_width) | summary["ci_low"].isna()]
    at_max = [row.variant for row in wide.itertuples() if row.planned >= policy.max]
    short = [row.variant for row in wide.itertuples() if row.planned < policy.max]
    if at_max:
        text += f" Still wider at {policy.max} seeds: {', '.join(_md_escape(v) for v in at_max)}."
    if short:
        text += (
            f" Still wider with fewer than {policy.max} seeds (most runs failed, or the sweep has not finished): "
            f"{', '.join(_md_escape(v) for v in short)}."
        )
    if not at_max and not short:
        text += " Every interval is within the target."
    return text


def _describe_budget(info: SweepInfo) -> str:
    budgets = sorted({(v.epochs, v.batch_size, v.validation_split) for v in info.variants}, key=str)
    if len(budgets) == 1:
        epochs, batch, split = budgets[0]
        return f"{epochs} epochs, batch {batch}, validation split {split}"
    return f"per variant ({len(budgets)} different epochs / batch / validation split settings, see the sweep file)"


def _describe_utilisation(use: dict[str, Any]) -> str:
    if not use.get("runs") or math.isnan(use.get("span_s", math.nan)):
        return "—"
    text = (
        f"{use['flops'] / 1e12:.2f} TFLOP of estimated training work in {use['span_s']:.0f} s of sweep time "
        f"= {use['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s"
    )
    if math.isnan(use.get("mfu", math.nan)):
        return text + f"; run `harness calibrate` on this {use['kind']} machine to get the model-FLOPs utilisation"
    return (
        text + f"; model-FLOPs utilisation {100 * use['mfu']:.1f}% of a measured peak of "
        f"{use['peak_flops_per_s'] / 1e9:.1f} GFLOP/s ({use['devices']} x matmul on {use['calibrated_on']})"
    )


def atomic_write(path: str | Path, text: str) -> Path:
    """Kept for callers of the old name: `harness.fsio.safe_write` (only ever replaces a regular file)."""
    return safe_write(path, text)


def default_output(sweep: str, suffix: str, *, folder: str | Path = "reports") -> Path:
    """`reports/<sweep><suffix>`, with the stored sweep name made a safe file name: whatever the
    store says the sweep is called (`../../etc/x`, `a/b`, 300 characters), the path stays in `folder`."""
    return Path(folder) / f"{safe_name(sweep)}{suffix}"


def output_path(out: str | Path | None, sweep: str, suffix: str, *, folder: str | Path = "reports") -> Path:
    """The file to write: the user's `--out` exactly as named (no suffix added), else the default."""
    return Path(out) if out else default_output(sweep, suffix, folder=folder)


def plots_dir(out: Path) -> Path:
    """Where a report's plots go: beside it, in a folder named like the report without its suffix
    (`reports/x.md` -> `reports/x/`), or `NAME_plots/` when the report's name has no suffix."""
    return out.parent / (out.stem if out.suffix else f"{out.name}_plots")


def write_report(store: ResultStore, sweep: str, *, out: str | Path | None = None, with_plots: bool = True) -> Path:
    """Write reports/<sweep>.md and its plots (reports/<sweep>/*.png and .svg), linked relatively."""
    out = check_writable_target(output_path(out, sweep, ".md"), key="--out")
    results = load_results(store, sweep)
    plots: dict[str, str] = {}
    if with_plots:
        from harness.plots import write_plots

        plot_dir = plots_dir(out)
        plots = {name: os.path.relpath(path, out.parent) for name, path in write_plots(results, plot_dir).items()}
    table = safe_write(plots_dir(out) / "summary.csv", summary_frame(results.summary).to_csv(index=False), key="--out")
    return safe_write(
        out, render_leaderboard(results, plots=plots, summary_csv=os.path.relpath(table, out.parent)), key="--out"
    )


SUMMARY_COLUMNS = [
    "rank", "variant", "tied_with_best", "eligible", "mean", "std", "ci_low", "ci_high", "median", "min", "max",
    "n", "planned", "healthy", "success_rate", "failed", "diverged", "collapsed", "mismatched", "near_chance",
    "diff_to_best", "diff_low", "diff_high", "p_vs_best", "p_holm", "tie_note", "params", "train_s", "train_s_std",
]


def summary_frame(summary: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard as a flat table (CSV): one row per variant, published verdicts as text."""
    if summary.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS + ["published"])
    flat = summary[SUMMARY_COLUMNS].copy()
    flat["published"] = [
        "; ".join(f"{v.reference:g}: {v.text}" for v in verdicts) for verdicts in summary["published"]
    ]
    return flat


EXPORT_COLUMNS = [
    "sweep", "run_id", "variant", "variant_id", "seed", "status", "test_accuracy", "test_loss", "params",
    "epochs", "batch_size", "validation_split", "train_s", "wall_s", "estimated_train_flops", "device",
    "keras_backend", "backend_version", "tensorflow", "keras", "dataset_fingerprint", "started_at", "finished_at", "flags", "health", "error",
]


def export_frame(store: ResultStore, sweep: str) -> pd.DataFrame:
    """Every run of a sweep as one row (accuracy in %), the grid values as extra columns."""
    results = load_results(store, sweep)
    grid = {v.name: v.grid for v in results.info.variants}
    rows = []
    for variant, record in zip(results.variants, results.records):
        acc = record.test_accuracy
        row = {
            "sweep": sweep,
            "run_id": record.run_id,
            "variant": variant,
            "variant_id": record.variant_id,
            "seed": record.seed,
            "status": record.status.value,
            "test_accuracy": 100 * acc if acc is not None else None,
            "test_loss": record.metrics.get("test_loss"),
            "params": record.metrics.get("params"),
            "epochs": record.budget.get("epochs"),
            "batch_size": record.budget.get("batch_size"),
            "validation_split": record.budget.get("validation_split"),
            "train_s": record.timings.get("train_s"),
            "wall_s": record.timings.get("wall_s"),
            "estimated_train_flops": record.metrics.get("estimated_train_flops"),
            "device": record.device,
            "keras_backend": record_backend(record),
            "backend_version": record.versions.get(record_backend(record)),
            "tensorflow": record.versions.get("tensorflow"),
            "keras": record.versions.get("keras"),
            "dataset_fingerprint": record.dataset.get("fingerprint"),
            "started_at": record.started_at,
            "finished_at": record.finished_at,
            "flags": ";".join(flag.value for flag in record.flags),
            "health": diagnosis.health.value if (diagnosis := health_of(record)) is not None else "",
            "error": (record.error or "").strip().splitlines()[-1] if record.error else "",
        }
        row.update({f"grid.{key}": value for key, value in grid.get(variant, {}).items()})
        rows.append(row)
    extra = sorted({key for row in rows for key in row} - set(EXPORT_COLUMNS))
    return pd.DataFrame(rows, columns=EXPORT_COLUMNS + extra)


def write_export(store: ResultStore, sweep: str, *, out: str | Path | None = None) -> Path:
    out = check_writable_target(output_path(out, sweep, ".csv"), key="--out")
    return safe_write(out, export_frame(store, sweep).to_csv(index=False), key="--out")


def status_rows(store: ResultStore) -> list[dict[str, Any]]:
    """Per sweep: planned, done, diverged, failed, running (claimed by a live sweep now), pending."""
    from harness.leases import claim_states

    live = {claim.run_id for claim in claim_states(store) if claim.is_live}
    rows = []
    for sweep in store.sweeps():
        plan = store.plan(sweep)
        statuses = store.statuses(run_id for run_id, _v, _s in plan)
        counts = {s: 0 for s in ("done", "diverged", "failed")}
        for status in statuses.values():
            if status.value in counts:
                counts[status.value] += 1
        running = sum(1 for run_id, _v, _s in plan if run_id in live and not (statuses.get(run_id) or RunStatus.PENDING).is_finished())
        finished = counts["done"] + counts["diverged"] + counts["failed"]
        rows.append({"sweep": sweep, "planned": len(plan), **counts, "running": running,
                     "pending": len(plan) - finished - running})
    return rows
