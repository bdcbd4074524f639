"""Pure functions from run records to DataFrames. Nothing here draws or writes files."""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

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
    "device",
    "error",
]


def runs_frame(records: Iterable[RunRecord], *, names: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per run; accuracy in percent. `names` maps run id -> variant name from the plan."""
    rows = []
    for record in records:
        acc = record.test_accuracy
        rows.append(
            {
                "run_id": record.run_id,
                "variant": (names or {}).get(record.run_id, record.variant),
                "variant_id": record.variant_id,
                "seed": record.seed,
                "status": record.status.value,
                "test_accuracy": 100.0 * acc if acc is not None and record.status is RunStatus.DONE else np.nan,
                "test_loss": record.metrics.get("test_loss", np.nan),
                "train_s": record.timings.get("train_s", np.nan),
                "wall_s": record.timings.get("wall_s", np.nan),
                "params": record.metrics.get("params", np.nan),
                "near_chance": any(flag.value == "near_chance" for flag in record.flags),
                "device": record.device,
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


def summarize(runs: pd.DataFrame, variants: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Per variant: n, failures, mean/std/95% CI/min/max of test accuracy, params, train time, rank.

    `variants` (from the stored sweep info) fixes the order and brings the published references,
    so a variant with no finished run still shows up, with its failures.
    """
    rows = []
    for info in variants:
        mine = runs[runs["variant"] == info["name"]]
        done = mine[mine["status"] == RunStatus.DONE.value]
        acc = done["test_accuracy"].dropna().tolist()
        mean, std, low, high = mean_ci(acc)
        rows.append(
            {
                "variant": info["name"],
                "n": len(acc),
                "failures": int(mine["status"].isin([RunStatus.FAILED.value, RunStatus.DIVERGED.value]).sum()),
                "diverged": int((mine["status"] == RunStatus.DIVERGED.value).sum()),
                "near_chance": int(done["near_chance"].sum()),
                "mean": mean,
                "std": std,
                "ci_low": low,
                "ci_high": high,
                "min": min(acc) if acc else math.nan,
                "max": max(acc) if acc else math.nan,
                "params": int(info.get("params") or (done["params"].iloc[0] if len(done) else 0)),
                "train_s": float(done["train_s"].mean()) if len(done) else math.nan,
                "reference": list(info.get("reference") or []),
            }
        )
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame["rank"] = frame["mean"].rank(ascending=False, method="min")
    frame = frame.sort_values(["rank", "variant"], na_position="last", kind="stable").reset_index(drop=True)
    frame["rank"] = frame["rank"].astype("Int64")
    return frame
