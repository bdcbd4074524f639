"""Plots of a sweep. `*_data` functions compute what each plot shows (tested without pixels);
`draw_*` functions only draw it (seaborn, imported inside them), as PNG and SVG."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from harness.contracts import SweepInfo
from harness.records import RunRecord, RunStatus

FORMATS = ("png", "svg")


# --------------------------------------------------------------------------- data


def accuracy_data(runs: pd.DataFrame, summary: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(per-variant mean and CI in rank order, one point per finished seed, published references)."""
    ranked = summary[summary["n"] > 0][["variant", "mean", "ci_low", "ci_high", "n"]].reset_index(drop=True)
    order = list(ranked["variant"])
    seeds = runs[(runs["status"] == RunStatus.DONE.value) & runs["variant"].isin(order)][["variant", "seed", "test_accuracy"]]
    seeds = seeds.assign(order=seeds["variant"].map({v: i for i, v in enumerate(order)})).sort_values(["order", "seed"])
    refs = [
        {"variant": row.variant, "reference": value}
        for row in summary.itertuples(index=False)
        if row.variant in order
        for value in row.reference
    ]
    return ranked, seeds.drop(columns="order").reset_index(drop=True), pd.DataFrame(refs, columns=["variant", "reference"])


def accuracy_window(values: Sequence[float], *, pad: float = 0.15, min_span: float = 1.0) -> tuple[float, float]:
    """The x range of the accuracy plot: our own numbers, padded; published numbers outside it are
    drawn as arrows at the edge rather than squashing our intervals (a 9.8% next to 98%)."""
    if not values:
        return 0.0, 100.0
    low, high = min(values), max(values)
    span = max(high - low, min_span)
    return max(0.0, low - pad * span), min(100.0, high + pad * span)


def learning_curve_data(records: Sequence[RunRecord], variants: Sequence[str] | None = None) -> pd.DataFrame:
    """Long table (variant, seed, epoch, metric, value) of every finished run's per-epoch history."""
    rows = []
    for i, record in enumerate(records):
        if record.status is not RunStatus.DONE:
            continue
        variant = variants[i] if variants is not None else record.variant
        for metric in ("accuracy", "val_accuracy", "loss", "val_loss"):
            for epoch, value in enumerate(record.history.get(metric, []), start=1):
                scaled = 100.0 * value if "accuracy" in metric else value
                rows.append({"variant": variant, "seed": record.seed, "epoch": epoch, "metric": metric, "value": scaled})
    return pd.DataFrame(rows, columns=["variant", "seed", "epoch", "metric", "value"])


def pareto_front(points: pd.DataFrame, *, cost: str, value: str = "mean") -> pd.Series:
    """True for each point that no other point beats: lower-or-equal cost and higher-or-equal value,
    one of them strictly."""
    front = []
    costs, values = points[cost].to_numpy(float), points[value].to_numpy(float)
    for i in range(len(points)):
        if math.isnan(costs[i]) or math.isnan(values[i]):
            front.append(False)
            continue
        dominated = np.any(
            (costs <= costs[i]) & (values >= values[i]) & ((costs < costs[i]) | (values > values[i]))
        )
        front.append(not dominated)
    return pd.Series(front, index=points.index, name="pareto")


def tradeoff_data(summary: pd.DataFrame, *, cost: str) -> pd.DataFrame:
    """Mean accuracy against a cost column ('params' or 'train_s'), with the Pareto front marked."""
    points = summary[summary["n"] > 0][["variant", cost, "mean", "ci_low", "ci_high"]].reset_index(drop=True)
    return points.assign(pareto=pareto_front(points, cost=cost))


def grid_axes(info: SweepInfo | dict[str, Any]) -> list[str]:
    """The sweep's grid keys, in file order."""
    return SweepInfo.coerce(info).grid_axes()


def heatmap_data(summary: pd.DataFrame, info: SweepInfo | dict[str, Any]) -> pd.DataFrame | None:
    """Mean accuracy pivoted over the two grid axes (averaged over base variants); None unless the
    sweep has exactly two grid axes."""
    info = SweepInfo.coerce(info)
    axes = grid_axes(info)
    if len(axes) != 2:
        return None
    point = {v.name: {k: str(val) for k, val in v.grid_point} for v in info.variants}
    rows = [
        {axes[0]: point[r.variant][axes[0]], axes[1]: point[r.variant][axes[1]], "mean": r.mean}
        for r in summary.itertuples(index=False)
        if r.variant in point and axes[0] in point[r.variant] and r.n > 0
    ]
    if not rows:
        return None
    return pd.DataFrame(rows).pivot_table(index=axes[0], columns=axes[1], values="mean", aggfunc="mean", sort=False)


# --------------------------------------------------------------------------- drawing


def _save(fig, out_dir: Path, stem: str) -> list[Path]:
    import io

    from harness.fsio import ensure_dir, safe_write

    ensure_dir(out_dir)
    paths = []
    for fmt in FORMATS:
        path = out_dir / f"{stem}.{fmt}"
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, bbox_inches="tight", dpi=120)
        paths.append(safe_write(path, buffer.getvalue()))
    import matplotlib.pyplot as plt

    plt.close(fig)
    return paths


def _setup():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    return plt, sns


def draw_accuracy(ranked: pd.DataFrame, seeds: pd.DataFrame, refs: pd.DataFrame, out_dir: Path, title: str) -> list[Path]:
    plt, sns = _setup()
    height = max(2.5, 0.45 * len(ranked) + 1.2)
    fig, ax = plt.subplots(figsize=(9, height))
    y = {v: i for i, v in enumerate(ranked["variant"])}
    ax.hlines([y[v] for v in ranked["variant"]], ranked["ci_low"].fillna(ranked["mean"]), ranked["ci_high"].fillna(ranked["mean"]),
              color="tab:blue", lw=4, alpha=0.35, label="95% CI of the mean")
    ax.plot(ranked["mean"], [y[v] for v in ranked["variant"]], "o", color="tab:blue", label="mean over seeds")
    if len(seeds):
        jitter = np.linspace(-0.15, 0.15, max(2, seeds["seed"].nunique()))
        seed_pos = {s: jitter[i % len(jitter)] for i, s in enumerate(sorted(seeds["seed"].unique()))}
        ax.scatter(seeds["test_accuracy"], [y[v] + seed_pos[s] for v, s in zip(seeds["variant"], seeds["seed"])],
                   s=14, color="black", alpha=0.6, label="one seed", zorder=3)
    ours = pd.concat([seeds["test_accuracy"], ranked["mean"], ranked["ci_low"], ranked["ci_high"]]).dropna()
    low, high = accuracy_window(ours.tolist())
    if len(refs):
        inside = refs[(refs["reference"] >= low) & (refs["reference"] <= high)]
        ax.scatter(inside["reference"], [y[v] for v in inside["variant"]], marker="x", s=60, color="tab:red",
                   label="published", zorder=4)
        for row in refs[(refs["reference"] < low) | (refs["reference"] > high)].itertuples(index=False):
            edge, align, arrow = (low, "left", "◀") if row.reference < low else (high, "right", "▶")
            text = f"{arrow} published {row.reference:g}" if arrow == "◀" else f"published {row.reference:g} {arrow}"
            ax.annotate(text, (edge, y[row.variant]), color="tab:red", fontsize="small", ha=align, va="bottom",
                        xytext=(0, 3), textcoords="offset points")
    ax.set_xlim(low, high)
    ax.set_yticks(range(len(ranked)))
    ax.set_yticklabels([v if len(v) <= 60 else v[:57] + "..." for v in ranked["variant"]])
    ax.invert_yaxis()
    ax.set_xlabel("test accuracy (%)")
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return _save(fig, out_dir, "accuracy")


def draw_learning_curves(curves: pd.DataFrame, out_dir: Path, title: str) -> list[Path]:
    plt, sns = _setup()
    metric = "val_accuracy" if (curves["metric"] == "val_accuracy").any() else "accuracy"
    data = curves[curves["metric"] == metric]
    fig, ax = plt.subplots(figsize=(9, 5))
    sns.lineplot(data=data, x="epoch", y="value", hue="variant", errorbar=("ci", 95), marker="o", ax=ax)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"{metric.replace('_', ' ')} (%)")
    ax.set_title(f"{title}: mean over seeds with 95% band")
    ax.legend(fontsize="x-small", loc="lower right")
    return _save(fig, out_dir, "learning_curves")


def draw_tradeoff(points: pd.DataFrame, *, cost: str, xlabel: str, out_dir: Path, title: str, log_x: bool) -> list[Path]:
    plt, sns = _setup()
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.errorbar(points[cost], points["mean"], yerr=[points["mean"] - points["ci_low"].fillna(points["mean"]),
                points["ci_high"].fillna(points["mean"]) - points["mean"]], fmt="o", color="tab:gray", alpha=0.6)
    front = points[points["pareto"]].sort_values(cost)
    ax.plot(front[cost], front["mean"], "-o", color="tab:red", label="Pareto front")
    for row in points.itertuples(index=False):
        ax.annotate(row.variant[:30], (getattr(row, cost), row.mean), fontsize="x-small", xytext=(4, 4),
                    textcoords="offset points", color="tab:red" if row.pareto else "dimgray")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean test accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize="small")
    return _save(fig, out_dir, f"accuracy_vs_{cost}")


def draw_heatmap(table: pd.DataFrame, out_dir: Path, title: str) -> list[Path]:
    plt, sns = _setup()
    fig, ax = plt.subplots(figsize=(1.2 * table.shape[1] + 3, 0.8 * table.shape[0] + 2))
    sns.heatmap(table, annot=True, fmt=".2f", cmap="viridis", ax=ax, cbar_kws={"label": "mean test accuracy (%)"})
    ax.set_title(title)
    return _save(fig, out_dir, "grid_heatmap")


def write_plots(results, out_dir: Path) -> dict[str, Path]:
    """Draw every plot the sweep supports; returns {plot name: PNG path}."""
    title = results.name
    written: dict[str, Path] = {}
    ranked, seeds, refs = accuracy_data(results.runs, results.summary)
    if ranked.empty:
        return written
    written["accuracy"] = draw_accuracy(ranked, seeds, refs, out_dir, f"{title}: test accuracy by variant")[0]
    curves = learning_curve_data(results.records, results.variants)
    if len(curves):
        written["learning_curves"] = draw_learning_curves(curves, out_dir, title)[0]
    written["accuracy_vs_params"] = draw_tradeoff(
        tradeoff_data(results.summary, cost="params"), cost="params", xlabel="parameters", out_dir=out_dir,
        title=f"{title}: accuracy against size", log_x=True,
    )[0]
    timed = tradeoff_data(results.summary, cost="train_s")
    if timed["train_s"].notna().any():
        written["accuracy_vs_train_s"] = draw_tradeoff(
            timed, cost="train_s", xlabel="mean train time (s)", out_dir=out_dir,
            title=f"{title}: accuracy against train time", log_x=False,
        )[0]
    table = heatmap_data(results.summary, results.info)
    if table is not None:
        written["grid_heatmap"] = draw_heatmap(table, out_dir, f"{title}: mean accuracy over the grid")[0]
    return written
