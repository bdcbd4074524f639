"""Pure functions from run records to DataFrames. Nothing here draws or writes files."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from harness.contracts import VariantInfo
from harness.health import Health, health_of
from harness.records import RunRecord, RunStatus
from harness.stats import (
    EQUAL_TOLERANCE,
    Placement,
    clean,
    compare_with_best,
    published_verdict,
    resolvable_difference,
)

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


MAJORITY = 0.5  # a variant needs more than half of its attempted runs healthy to take rank 1


def summarize(
    runs: pd.DataFrame,
    variants: Sequence[VariantInfo | dict[str, Any]],
    *,
    alpha: float = 0.05,
    planned: Mapping[str, int] | None = None,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Per variant: planned / healthy / failed / diverged / collapsed counts and the success rate,
    mean/std/95% CI/median/min/max of test accuracy over its finished (DONE) runs, train time and
    params, rank, difference to the best with its interval, whether it is distinguishable from the
    best (Holm-corrected), and a `PublishedVerdict` per published number.

    Rank rule: a variant whose attempted runs are not mostly healthy (healthy <= half) cannot take
    rank 1: it ranks after every variant that is, by mean. `variants` (from the stored sweep info)
    fixes the order and brings the published references, so a variant with no finished run still
    shows up, with its failures. `planned` counts each variant's plan entries (default: its rows).
    """
    rows = []
    samples: dict[str, list[float]] = {}
    for info in (v if isinstance(v, VariantInfo) else VariantInfo.from_dict(v) for v in variants):
        mine = runs[runs["variant"] == info.name]
        done = mine[mine["status"] == RunStatus.DONE.value]
        acc = done["test_accuracy"].dropna().tolist()
        samples[info.name] = acc
        mean, std, low, high = mean_ci(acc, confidence=confidence)
        train = done["train_s"].dropna().tolist()
        reference = list(info.reference)
        healthy = int(_healthy(done).sum())
        failed = int((mine["status"] == RunStatus.FAILED.value).sum())
        diverged = int((mine["status"] == RunStatus.DIVERGED.value).sum())
        attempted = len(done) + failed + diverged
        n_planned = int(planned.get(info.name, len(mine))) if planned is not None else len(mine)
        published = [published_verdict(r, acc, confidence=confidence) for r in reference]
        rows.append(
            {
                "variant": info.name,
                "planned": n_planned,
                "n": len(acc),
                "healthy": healthy,
                "success_rate": healthy / n_planned if n_planned else math.nan,
                "failures": failed + diverged,
                "failed": failed,
                "diverged": diverged,
                "near_chance": int(done["near_chance"].sum()),
                "collapsed": _count_health(done, Health.COLLAPSED),
                "mismatched": _count_health(done, Health.TRAIN_EVAL_MISMATCH),
                "eligible": attempted > 0 and healthy > MAJORITY * attempted,
                "mean": mean,
                "std": std,
                "ci_low": low,
                "ci_high": high,
                "median": float(np.median(acc)) if acc else math.nan,
                "min": min(acc) if acc else math.nan,
                "max": max(acc) if acc else math.nan,
                "params": int(info.params or (done["params"].iloc[0] if len(done) and pd.notna(done["params"].iloc[0]) else 0)),
                "train_s": float(np.mean(train)) if train else math.nan,
                "train_s_std": float(np.std(train, ddof=1)) if len(train) > 1 else math.nan,
                "reference": reference,
                "published": published,
                "verdicts": [v.placement.value if v.placement is not Placement.TOO_FEW else "untested" for v in published],
            }
        )
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame = _rank(frame)
    return _compare_with_best(frame, samples, alpha=alpha, confidence=confidence)


def _healthy(done: pd.DataFrame) -> pd.Series:
    """DONE runs that neither collapsed, nor sit near chance, nor show a train/eval mismatch."""
    bad_health = done["health"].isin([h.value for h in Health if h.is_problem()]) if "health" in done else False
    return ~(done["near_chance"].astype(bool) | bad_health)


def _rank(frame: pd.DataFrame) -> pd.DataFrame:
    """Eligible variants by mean first, then the mostly-failed ones by mean, then those never run;
    equal means (to 0.001 points) share a rank."""
    has = frame["n"] > 0
    order = frame.assign(
        rank_group=np.where(has & frame["eligible"], 0, np.where(has, 1, 2)),
        rank_key=-frame["mean"].round(3).fillna(-np.inf),
    ).sort_values(["rank_group", "rank_key", "variant"], kind="stable")
    ranks: list[Any] = []
    previous = None
    for position, row in enumerate(order.itertuples(index=False), start=1):
        if row.rank_group == 2:
            ranks.append(pd.NA)
            continue
        key = (row.rank_group, row.rank_key)
        ranks.append(ranks[-1] if key == previous else position)
        previous = key
    order = order.drop(columns=["rank_group", "rank_key"]).reset_index(drop=True)
    order["rank"] = pd.array(ranks, dtype="Int64")
    return order


def _compare_with_best(
    frame: pd.DataFrame, samples: dict[str, list[float]], *, alpha: float, confidence: float
) -> pd.DataFrame:
    versus = compare_with_best([samples[name] for name in frame["variant"]], alpha=alpha, confidence=confidence)
    best = [v.difference is None and v.tied for v in versus]
    frame["diff_to_best"] = [0.0 if b else (v.difference.delta if v.difference else math.nan) for v, b in zip(versus, best)]
    frame["diff_low"] = [v.difference.low if v.difference else math.nan for v in versus]
    frame["diff_high"] = [v.difference.high if v.difference else math.nan for v in versus]
    frame["p_vs_best"] = [0.0 if b else (v.difference.p_value if v.difference else math.nan) for v, b in zip(versus, best)]
    frame["p_holm"] = [v.p_holm for v in versus]
    frame["tied_with_best"] = [v.tied for v in versus]
    frame["tie_note"] = [v.note for v in versus]
    return frame


@dataclasses.dataclass(frozen=True)
class Resolution:
    """The smallest difference in mean accuracy the sweep's seed count can resolve."""

    n: int  # seeds per variant (median over variants with at least 2)
    std: float  # typical seed std (median over those variants)
    difference: float  # points; NaN when fewer than 2 seeds
    alpha: float = 0.05
    power: float = 0.8

    @property
    def text(self) -> str:
        if math.isnan(self.difference):
            return "With fewer than 2 finished seeds per variant, no difference between variants can be resolved."
        return (
            f"With {self.n} seeds per variant and a typical seed std of {self.std:.2f} points, differences smaller "
            f"than about {self.difference:.2f} points cannot be resolved (two-sided test at {self.alpha:g}, "
            f"{100 * self.power:.0f}% power); more seeds shrink this as 1/sqrt(n)."
        )


def resolution(summary: pd.DataFrame, *, alpha: float = 0.05, power: float = 0.8) -> Resolution:
    usable = summary[(summary["n"] >= 2) & summary["std"].notna()] if len(summary) else summary
    if not len(usable):
        return Resolution(0, math.nan, math.nan, alpha, power)
    n = int(np.median(usable["n"]))
    std = float(np.median(usable["std"]))
    return Resolution(n, std, resolvable_difference(n, std, alpha=alpha, power=power), alpha, power)


def _count_health(runs: pd.DataFrame, health: Health) -> int:
    return int((runs["health"] == health.value).sum()) if "health" in runs else 0


def welch_p(a: Sequence[float], b: Sequence[float], *, alternative: str = "two-sided") -> float:
    """Welch's t-test p-value (unequal variances); NaN when either side has fewer than 2 runs or
    neither side has any variance (no test exists; see `harness.stats.difference`)."""
    x, y = clean(a), clean(b)
    if len(x) < 2 or len(y) < 2:
        return math.nan
    if np.std(x) == 0 and np.std(y) == 0:
        return 1.0 if abs(x.mean() - y.mean()) <= EQUAL_TOLERANCE else math.nan
    from scipy import stats

    return float(stats.ttest_ind(x, y, equal_var=False, alternative=alternative).pvalue)


def reference_verdict(reference: float, low: float, high: float) -> str:
    """Where a number falls against an interval: inside, above or below it ("untested" without
    one). For published numbers use `harness.stats.published_verdict` (prediction interval)."""
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
