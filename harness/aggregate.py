"""Pure functions from run records to DataFrames. Nothing here draws or writes files."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd

from harness.contracts import VariantInfo
from harness.health import Health, health_of
from harness.records import RunRecord, RunStatus

RUN_COLUMNS = [
    "run_id",
    "variant",
    "variant_id",
    "seed",
    "status",
    "test_accuracy",
    "test_loss",
    "train_s",
    "wall_s",
    "params",
    "near_chance",
    "health",
    "device",
    "keras_backend",
    "error",
]


def runs_frame(records: Sequence[RunRecord], *, variants: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per run; accuracy in percent. `variants[i]` names the plan's variant of `records[i]`
    (a run shared by two variants of a sweep appears under both); default: the record's own."""
    rows = []
    for i, record in enumerate(records):
        acc = record.test_accuracy
        diagnosis = health_of(record)
        rows.append(
            {
                "run_id": record.run_id,
                "variant": variants[i] if variants is not None else record.variant,
                "variant_id": record.variant_id,
                "seed": record.seed,
                "status": record.status.value,
                "test_accuracy": 100.0 * acc if acc is not None and record.status is RunStatus.DONE else np.nan,
                "test_loss": record.metrics.get("test_loss", np.nan),
                "train_s": record.timings.get("train_s", np.nan),
                "wall_s": record.timings.get("wall_s", np.nan),
                "params": record.metrics.get("params", np.nan),
                "near_chance": any(flag.value == "near_chance" for flag in record.flags),
                "health": diagnosis.health.value if diagnosis is not None else "",
                "device": record.device,
                "keras_backend": record_backend(record),
                "error": (record.error or "").strip().splitlines()[-1] if record.error else "",
            }
        )
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def mean_ci(values: Sequence[float], *, confidence: float = 0.95) -> tuple[float, float, float, float]:
    """Mean, sample std (ddof=1) and the Student-t confidence interval of the mean."""
    data = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    n = len(data)
    if n == 0:
        return (math.nan,) * 4
    mean = float(data.mean())
    if n == 1:
        return mean, math.nan, math.nan, math.nan
    from scipy import stats

    std = float(data.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1)) * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


def summarize(
    runs: pd.DataFrame, variants: Sequence[VariantInfo | dict[str, Any]], *, alpha: float = 0.05
) -> pd.DataFrame:
    """Per variant: n, failures, mean/std/95% CI/min/max of test accuracy, train time and params,
    rank, whether it is statistically distinguishable from the best, and a verdict per reference.

    `variants` (from the stored sweep info) fixes the order and brings the published references,
    so a variant with no finished run still shows up, with its failures.
    """
    rows = []
    samples: dict[str, list[float]] = {}
    for info in (v if isinstance(v, VariantInfo) else VariantInfo.from_dict(v) for v in variants):
        mine = runs[runs["variant"] == info.name]
        done = mine[mine["status"] == RunStatus.DONE.value]
        acc = done["test_accuracy"].dropna().tolist()
        samples[info.name] = acc
        mean, std, low, high = mean_ci(acc)
        train = done["train_s"].dropna().tolist()
        reference = list(info.reference)
        rows.append(
            {
                "variant": info.name,
                "n": len(acc),
                "failures": int(mine["status"].isin([RunStatus.FAILED.value, RunStatus.DIVERGED.value]).sum()),
                "diverged": int((mine["status"] == RunStatus.DIVERGED.value).sum()),
                "near_chance": int(done["near_chance"].sum()),
                "collapsed": _count_health(done, Health.COLLAPSED),
                "mismatched": _count_health(done, Health.TRAIN_EVAL_MISMATCH),
                "mean": mean,
                "std": std,
                "ci_low": low,
                "ci_high": high,
                "min": min(acc) if acc else math.nan,
                "max": max(acc) if acc else math.nan,
                "params": int(info.params or (done["params"].iloc[0] if len(done) else 0)),
                "train_s": float(np.mean(train)) if train else math.nan,
                "train_s_std": float(np.std(train, ddof=1)) if len(train) > 1 else math.nan,
                "reference": reference,
                "verdicts": [reference_verdict(r, low, high) for r in reference],
            }
        )
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame["rank"] = frame["mean"].rank(ascending=False, method="min")
    frame = frame.sort_values(["rank", "variant"], na_position="last", kind="stable").reset_index(drop=True)
    frame["rank"] = frame["rank"].astype("Int64")
    best = frame["variant"].iloc[0] if frame["n"].iloc[0] else None
    p_values, tied = [], []
    for name in frame["variant"]:
        p = welch_p(samples[name], samples[best]) if best else math.nan
        p_values.append(0.0 if name == best else p)
        tied.append(name == best or (not math.isnan(p) and p >= alpha))
    frame["p_vs_best"] = p_values
    frame["tied_with_best"] = tied
    return frame


def _count_health(runs: pd.DataFrame, health: Health) -> int:
    return int((runs["health"] == health.value).sum()) if "health" in runs else 0


def welch_p(a: Sequence[float], b: Sequence[float], *, alternative: str = "two-sided") -> float:
    """Welch's t-test p-value (unequal variances); NaN when either side has fewer than 2 runs."""
    if len(a) < 2 or len(b) < 2:
        return math.nan
    if np.std(a) == 0 and np.std(b) == 0:
        return 1.0 if np.mean(a) == np.mean(b) else 0.0
    from scipy import stats

    return float(stats.ttest_ind(a, b, equal_var=False, alternative=alternative).pvalue)


def reference_verdict(reference: float, low: float, high: float) -> str:
    """Where a published number falls against our 95% interval: inside, above or below it."""
    if math.isnan(low) or math.isnan(high):
        return "untested"
    if reference > high:
        return "above"
    if reference < low:
        return "below"
    return "inside"


def _parse_time(text: str | None) -> float | None:
    if not text:
        return None
    import datetime as dt

    try:
        return dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def sweep_utilisation(records: Sequence[RunRecord], calibrations: dict[str, dict] | None = None) -> dict[str, Any]:
    """Model-FLOPs utilisation of a sweep: estimated training FLOPs of its finished runs over the
    sweep's wall-clock span, against the calibrated matmul peak of the devices it used."""
    unique = {r.run_id: r for r in records}.values()  # a run shared by two variants counts once
    finished = [r for r in unique if r.status.is_finished() and r.metrics.get("estimated_train_flops")]
    starts = [t for t in (_parse_time(r.started_at) for r in finished) if t is not None]
    ends = [t for t in (_parse_time(r.finished_at) for r in finished) if t is not None]
    flops = float(sum(r.metrics["estimated_train_flops"] for r in finished))
    span = (max(ends) - min(starts)) if starts and ends else math.nan
    gpu_devices = {r.device for r in finished if "GPU" in r.device}
    kind = "gpu" if gpu_devices else "cpu"
    calibration = (calibrations or {}).get(kind)
    devices = max(1, len(gpu_devices)) if kind == "gpu" else 1
    peak = calibration["flops_per_s"] * devices if calibration else math.nan
    achieved = flops / span if span and span > 0 else math.nan
    return {
        "runs": len(finished),
        "flops": flops,
        "span_s": span,
        "achieved_flops_per_s": achieved,
        "kind": kind,
        "devices": devices,
        "peak_flops_per_s": peak,
        "calibrated_on": calibration.get("device") if calibration else None,
        "mfu": achieved / peak if calibration and peak > 0 else math.nan,
    }


def record_backend(record: RunRecord) -> str:
    """The Keras backend a run trained with (records from before backends were recorded: TensorFlow)."""
    return str(record.budget.get("keras_backend") or record.versions.get("keras_backend") or "tensorflow")


def backend_versions(records: Sequence[RunRecord]) -> dict[str, str]:
    """Keras backend -> the library versions its runs recorded (several joined, in order seen)."""
    seen: dict[str, list[str]] = {}
    for record in records:
        backend = record_backend(record)
        version = record.versions.get(backend)
        if version and version not in seen.setdefault(backend, []):
            seen[backend].append(version)
        seen.setdefault(backend, [])
    return {backend: ", ".join(versions) or "?" for backend, versions in seen.items()}


BACKEND_COLUMNS = ["model", "keras_backend", "variant", "n", "failures", "mean", "std", "train_s", "speedup"]


def backend_comparison(runs: pd.DataFrame) -> pd.DataFrame:
    """Variants that differ only by Keras backend, side by side: per model (variant id) that ran on
    more than one backend, one row per backend with its accuracy and mean train time per run, and
    `speedup`: the slowest backend's mean train time over this one's."""
    rows = []
    if not len(runs) or "keras_backend" not in runs:
        return pd.DataFrame(rows, columns=BACKEND_COLUMNS)
    for variant_id, group in runs.groupby("variant_id", sort=False):
        if group["keras_backend"].nunique() < 2:
            continue
        by_backend = []
        for backend, sub in group.groupby("keras_backend", sort=False):
            finished = sub[sub["status"] == "done"]
            mean, std, _lo, _hi = mean_ci(finished["test_accuracy"].tolist())
            by_backend.append(
                {
                    "model": variant_id,
                    "keras_backend": backend,
                    "variant": ", ".join(dict.fromkeys(sub["variant"].tolist())),
                    "n": int(finished["test_accuracy"].notna().sum()),
                    "failures": int(sub["status"].isin(["failed", "diverged"]).sum()),
                    "mean": mean,
                    "std": std,
                    "train_s": float(finished["train_s"].mean()) if len(finished) else math.nan,
                }
            )
        slowest = max((r["train_s"] for r in by_backend if not math.isnan(r["train_s"])), default=math.nan)
        for row in by_backend:
            row["speedup"] = slowest / row["train_s"] if row["train_s"] and not math.isnan(row["train_s"]) else math.nan
            rows.append(row)
    return pd.DataFrame(rows, columns=BACKEND_COLUMNS)
