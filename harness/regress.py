"""Baselines and the nightly regression check.

A baseline is a versioned JSON file of a sweep's per-seed accuracies (meant to be committed).
A variant regressed when its mean accuracy fell by more than a threshold AND the drop is
significant (one-sided Welch t-test at alpha); improved symmetrically; missing when the baseline
has it and tonight's results do not.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from harness import __version__
from harness.aggregate import welch_p
from harness.errors import UserError
from harness.records import RunStatus, utcnow
from harness.fsio import check_writable_target, safe_write
from harness.report import SweepResults, load_results, output_path
from harness.store import ResultStore

BASELINE_FORMAT = "harness-baseline"
BASELINE_VERSION = 1
DEFAULT_THRESHOLD = 0.2  # accuracy points
DEFAULT_ALPHA = 0.01


def finished_accuracies(results: SweepResults) -> dict[str, dict[str, Any]]:
    """Per variant name: its id and the seeds and test accuracies (%) of its finished runs."""
    variants: dict[str, dict[str, Any]] = {}
    for name, record in zip(results.variants, results.records):
        if record.status is RunStatus.DONE and record.test_accuracy is not None:
            entry = variants.setdefault(name, {"variant_id": record.variant_id, "seeds": [], "accuracy": []})
            entry["seeds"].append(record.seed)
            entry["accuracy"].append(100 * record.test_accuracy)
    return variants


def baseline_from_store(store: ResultStore, sweep: str) -> dict[str, Any]:
    results = load_results(store, sweep)
    variants = finished_accuracies(results)
    if not variants:
        raise UserError(f"sweep '{sweep}' has no finished run to make a baseline of", key="--sweep")
    for entry in variants.values():
        entry["accuracy"] = [round(a, 4) for a in entry["accuracy"]]
    return {
        "format": BASELINE_FORMAT,
        "version": BASELINE_VERSION,
        "sweep": sweep,
        "created_at": utcnow(),
        "harness": __version__,
        "versions": dict(results.versions),
        "dataset": results.info.dataset.fingerprint,
        "variants": variants,
    }


def save_baseline(store: ResultStore, sweep: str, *, out: str | Path | None = None) -> Path:
    out = check_writable_target(output_path(out, sweep, ".json", folder=Path("reports") / "baselines"), key="--out")
    return safe_write(out, json.dumps(baseline_from_store(store, sweep), indent=2, sort_keys=True) + "\n", key="--out")


def load_baseline(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError("baseline file not found", file=str(path)) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"not a readable JSON baseline: {exc}", file=str(path)) from None
    if not isinstance(data, dict) or data.get("format") != BASELINE_FORMAT:
        raise UserError(f"not a harness baseline (format should be '{BASELINE_FORMAT}')", file=str(path), key="format")
    if data.get("version") != BASELINE_VERSION:
        raise UserError(
            f"baseline version {data.get('version')} is not supported (this harness reads {BASELINE_VERSION})",
            file=str(path),
            key="version",
        )
    if not isinstance(data.get("variants"), dict):
        raise UserError("a baseline needs a 'variants' mapping", file=str(path), key="variants")
    return data


class Verdict(enum.Enum):
    IMPROVED = "improved"
    UNCHANGED = "unchanged"
    REGRESSED = "regressed"
    MISSING = "missing"
    NEW = "new"


@dataclasses.dataclass(frozen=True)
class Comparison:
    variant: str
    verdict: Verdict
    baseline_mean: float
    current_mean: float
    baseline_n: int
    current_n: int
    p_value: float
    note: str = ""

    @property
    def delta(self) -> float:
        return self.current_mean - self.baseline_mean


def compare(
    baseline: dict[str, Any],
    current: dict[str, list[float]],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    alpha: float = DEFAULT_ALPHA,
    current_ids: dict[str, str] | None = None,
) -> list[Comparison]:
    """Compare per-seed accuracies (%) of each variant with the baseline's."""
    rows = []
    for name, entry in baseline["variants"].items():
        before = [float(a) for a in entry["accuracy"]]
        after = current.get(name, [])
        b_mean = float(np.mean(before)) if before else math.nan
        if not after:
            rows.append(Comparison(name, Verdict.MISSING, b_mean, math.nan, len(before), 0, math.nan, "no finished run tonight"))
            continue
        a_mean = float(np.mean(after))
        delta = a_mean - b_mean
        p_down = welch_p(after, before, alternative="less")
        p_up = welch_p(after, before, alternative="greater")
        note = ""
        if current_ids and entry.get("variant_id") and current_ids.get(name) not in (None, entry["variant_id"]):
            note = "variant config changed since the baseline"
        if delta < -threshold and not math.isnan(p_down) and p_down < alpha:
            verdict, p = Verdict.REGRESSED, p_down
        elif delta > threshold and not math.isnan(p_up) and p_up < alpha:
            verdict, p = Verdict.IMPROVED, p_up
        else:
            verdict, p = Verdict.UNCHANGED, (p_down if delta < 0 else p_up)
            if math.isnan(p):
                note = note or "fewer than 2 seeds on a side: no test possible"
        rows.append(Comparison(name, verdict, b_mean, a_mean, len(before), len(after), p, note))
    for name, after in current.items():
        if name not in baseline["variants"] and after:
            rows.append(Comparison(name, Verdict.NEW, math.nan, float(np.mean(after)), 0, len(after), math.nan, "not in the baseline"))
    return rows


def current_accuracies(store: ResultStore, sweep: str) -> tuple[dict[str, list[float]], dict[str, str]]:
    variants = finished_accuracies(load_results(store, sweep))
    return (
        {name: entry["accuracy"] for name, entry in variants.items()},
        {name: entry["variant_id"] for name, entry in variants.items()},
    )


def render_comparison(rows: list[Comparison], *, sweep: str, baseline_path: str, threshold: float, alpha: float) -> str:
    counts = {v: sum(1 for r in rows if r.verdict is v) for v in Verdict}
    order = [Verdict.REGRESSED, Verdict.MISSING, Verdict.IMPROVED, Verdict.UNCHANGED, Verdict.NEW]
    lines = [
        f"# Regression check: {sweep}",
        "",
        f"Against `{baseline_path}`: a variant regressed when its mean test accuracy fell by more than "
        f"{threshold:g} points and a one-sided Welch t-test gives p < {alpha:g}.",
        "",
        "**" + ", ".join(f"{counts[v]} {v.value}" for v in order) + "**",
        "",
        "| Verdict | Variant | Baseline mean (%) | Tonight mean (%) | Change (points) | n base / tonight | p | Note |",
        "|---|---|---:|---:|---:|---|---:|---|",
    ]
    fmt = lambda x, d=2: "—" if math.isnan(x) else f"{x:.{d}f}"  # noqa: E731
    for verdict in order:
        for r in (r for r in rows if r.verdict is verdict):
            lines.append(
                f"| {verdict.value} | {r.variant} | {fmt(r.baseline_mean)} | {fmt(r.current_mean)} | "
                f"{'—' if math.isnan(r.delta) else f'{r.delta:+.2f}'} | {r.baseline_n} / {r.current_n} | {fmt(r.p_value, 4)} | {r.note} |"
            )
    return "\n".join(lines) + "\n"
