"""Plots of a sweep. `*_data` functions compute what each plot shows (tested without pixels);
`draw_*` functions only draw it (seaborn, imported inside them), as PNG and SVG.

Made to read with 16 long variant names: every label is the full name wrapped (never cut, so
distinct names stay distinct) behind its leaderboard rank; axes focus on the healthy range and
what falls outside (collapsed seeds, published numbers far away) is drawn as an off-scale marker at
the edge; learning curves are small multiples with the table's Student-t band; the grid heatmap is
drawn per base variant with empty cells marked.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from harness.aggregate import mean_ci
from harness.contracts import SweepInfo
from harness.health import Health
from harness.records import RunRecord, RunStatus
from harness.stats import clip_pct

FORMATS = ("png", "svg")
LABEL_WIDTH = 40  # characters per line of a wrapped variant name
TOP_CURVES = 16  # learning-curve panels at most (the best ranked)


# --------------------------------------------------------------------------- data


def wrap_label(text: str, width: int = 28) -> list[str]:
    """A long variant name as lines of at most `width` characters, broken after '_', '-', ',' or
    '.' where possible (never cut: every character stays, so distinct names stay distinct)."""
    import re

    parts = re.findall(r"[^_\-,./ ]*[_\-,./ ]?", text)
    lines, line = [], ""
    for part in (p for p in parts if p):
        while len(part) > width:  # a part longer than a line: hard break
            if line:
                lines.append(line)
                line = ""
            lines.append(part[:width])
            part = part[width:]
        if len(line) + len(part) > width and line:
            lines.append(line)
            line = ""
        line += part
    if line:
        lines.append(line)
    return lines or [""]


def plot_labels(summary: pd.DataFrame) -> dict[str, str]:
    """Each variant's label: its leaderboard rank and its full name, wrapped (distinct names give
    distinct labels)."""
    labels = {}
    for row in summary.itertuples(index=False):
        rank = "—" if pd.isna(row.rank) else str(int(row.rank))
        labels[row.variant] = f"{rank}. " + "\n".join(wrap_label(row.variant, LABEL_WIDTH))
    return labels


def _healthy_flags(runs: pd.DataFrame) -> pd.Series:
    problem = {h.value for h in Health if h.is_problem()}
    health = runs["health"] if "health" in runs else pd.Series("", index=runs.index)
    return ~(runs["near_chance"].astype(bool) | health.isin(problem))


def accuracy_data(runs: pd.DataFrame, summary: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(per-variant label, mean and CI clipped to [0, 100] in rank order; one point per finished seed
    with whether it was healthy; published references)."""
    ranked = summary[summary["n"] > 0].reset_index(drop=True)
    labels = plot_labels(ranked)
    ranked = pd.DataFrame({
        "variant": ranked["variant"],
        "label": [labels[v] for v in ranked["variant"]],
        "mean": ranked["mean"],
        "ci_low": ranked["ci_low"].map(clip_pct),
        "ci_high": ranked["ci_high"].map(clip_pct),
        "n": ranked["n"],
        "eligible": ranked["eligible"] if "eligible" in ranked else True,
    })
    order = list(ranked["variant"])
    done = runs[(runs["status"] == RunStatus.DONE.value) & runs["variant"].isin(order)]
    seeds = done.assign(healthy=_healthy_flags(done))[["variant", "seed", "test_accuracy", "healthy"]]
    seeds = seeds.assign(order=seeds["variant"].map({v: i for i, v in enumerate(order)})).sort_values(["order", "seed"])
    refs = [
        {"variant": row.variant, "reference": value}
        for row in summary.itertuples(index=False)
        if row.variant in order
        for value in row.reference
    ]
    return ranked, seeds.drop(columns="order").reset_index(drop=True), pd.DataFrame(refs, columns=["variant", "reference"])


def accuracy_window(values: Sequence[float], *, pad: float = 0.15, min_span: float = 1.0) -> tuple[float, float]:
    """The accuracy range of a plot: our own (healthy) numbers, padded, within [0, 100]; anything
    outside is drawn as an off-scale marker at the edge rather than squashing the intervals (a
    collapsed 9.8% next to 98%)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return 0.0, 100.0
    low, high = min(values), max(values)
    span = max(high - low, min_span)
    return max(0.0, low - pad * span), min(100.0, high + pad * span)


def focus_window(ranked: pd.DataFrame, seeds: pd.DataFrame) -> tuple[float, float]:
    """The window of the accuracy plot: the healthy seeds (a mean pulled down by a collapsed seed is
    drawn at the edge with its value); every seed and mean when none is healthy."""
    healthy = seeds[seeds["healthy"]]["test_accuracy"].tolist() if len(seeds) else []
    return accuracy_window(healthy or seeds["test_accuracy"].tolist() + ranked["mean"].tolist())


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


def curve_bands(curves: pd.DataFrame, summary: pd.DataFrame, *, top: int = TOP_CURVES) -> tuple[pd.DataFrame, str]:
    """Per variant (the `top` best ranked) and epoch: mean over seeds and the same 95% Student-t
    interval as the table (clipped to [0, 100]; no bootstrap), of validation accuracy when recorded,
    else training accuracy. Returns (bands, metric)."""
    metric = "val_accuracy" if (curves["metric"] == "val_accuracy").any() else "accuracy"
    data = curves[curves["metric"] == metric]
    ranked = [v for v in summary[summary["n"] > 0]["variant"] if v in set(data["variant"])][:top]
    labels = plot_labels(summary)
    rows = []
    for variant in ranked:
        mine = data[data["variant"] == variant]
        for epoch, values in mine.groupby("epoch")["value"]:
            mean, _std, low, high = mean_ci(values.tolist())
            rows.append({"variant": variant, "label": labels[variant], "epoch": int(epoch), "mean": mean,
                         "low": clip_pct(low), "high": clip_pct(high), "n": int(values.notna().sum())})
    return pd.DataFrame(rows, columns=["variant", "label", "epoch", "mean", "low", "high", "n"]), metric


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
    """Mean accuracy against a cost column ('params' or 'train_s'), with the Pareto front marked
    (among the ranked, not mostly-failed variants) and each point's rank as its label."""
    points = summary[summary["n"] > 0].reset_index(drop=True)
    eligible = points["eligible"] if "eligible" in points else pd.Series(True, index=points.index)
    frame = pd.DataFrame({
        "variant": points["variant"], "rank": points["rank"], cost: points[cost], "mean": points["mean"],
        "ci_low": points["ci_low"].map(clip_pct), "ci_high": points["ci_high"].map(clip_pct),
        "eligible": eligible.astype(bool),
        "all_healthy": (points["healthy"] == points["n"]) if "healthy" in points else True,
    })
    front = pareto_front(frame[frame["eligible"]], cost=cost) if frame["eligible"].any() else pd.Series(dtype=bool)
    return frame.assign(pareto=front.reindex(frame.index, fill_value=False).astype(bool))


def grid_axes(info: SweepInfo | dict[str, Any]) -> list[str]:
    """The sweep's grid keys, in file order."""
    return SweepInfo.coerce(info).grid_axes()


def heatmap_data(summary: pd.DataFrame, info: SweepInfo | dict[str, Any]) -> dict[str, pd.DataFrame] | None:
    """Per base variant: mean accuracy pivoted over the two grid axes, every grid value as a row or
    column, NaN where that base has no finished run at that point (never averaged across bases,
    never dropped). None unless the sweep has exactly two grid axes."""
    info = SweepInfo.coerce(info)
    axes = grid_axes(info)
    if len(axes) != 2:
        return None
    means = {r.variant: r.mean for r in summary.itertuples(index=False) if r.n > 0}
    values: dict[str, list[str]] = {axis: [] for axis in axes}
    cells: dict[str, dict[tuple[str, str], float]] = {}
    for v in info.variants:
        point = {k: str(val) for k, val in v.grid_point}
        if not all(axis in point for axis in axes):
            continue
        for axis in axes:
            if point[axis] not in values[axis]:
                values[axis].append(point[axis])
        cells.setdefault(v.base or "(no base)", {})[(point[axes[0]], point[axes[1]])] = means.get(v.name, math.nan)
    if not cells:
        return None
    tables = {}
    for base, grid in cells.items():
        table = pd.DataFrame(math.nan, index=pd.Index(values[axes[0]], name=axes[0]),
                             columns=pd.Index(values[axes[1]], name=axes[1]))
        for (row, col), mean in grid.items():
            table.loc[row, col] = mean
        tables[base] = table
    return tables


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


def _setup():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    return plt, sns


def off_scale_notes(
    ranked: pd.DataFrame, seeds: pd.DataFrame, refs: pd.DataFrame, low: float, high: float
) -> dict[tuple[str, bool], str]:
    """What lies outside the accuracy plot's window, as one note per (variant, below the window):
    its mean, its seeds below (equal values counted once: "3 seeds at 9.8"), its published numbers
    outside; drawn as one line each, so nothing is overprinted."""
    parts: dict[tuple[str, bool], list[str]] = {}
    for row in ranked[(ranked["mean"] < low) | (ranked["mean"] > high)].itertuples(index=False):
        parts.setdefault((row.variant, bool(row.mean < low)), []).append(f"mean {row.mean:.1f}")
    if len(seeds):
        below = seeds[seeds["test_accuracy"] < low]
        for variant, group in below.groupby("variant", sort=False):
            values = [f"{v:.1f}" for v in sorted(group["test_accuracy"])]
            text = (f"{len(values)} seeds at {values[0]}" if len(set(values)) == 1 and len(values) > 1
                    else ("seed " if len(values) == 1 else "seeds ") + ", ".join(values))
            parts.setdefault((variant, True), []).append(text)
    if len(refs):
        off = refs[(refs["reference"] < low) | (refs["reference"] > high)]
        for (variant, is_below), group in off.groupby([off["variant"], off["reference"] < low], sort=False):
            parts.setdefault((variant, bool(is_below)), []).append(
                "published " + ", ".join(f"{r:g}" for r in group["reference"]))
    return {
        key: ("◀ " if key[1] else "") + " · ".join(texts) + ("" if key[1] else " ▶")
        for key, texts in parts.items()
    }


def draw_accuracy(ranked: pd.DataFrame, seeds: pd.DataFrame, refs: pd.DataFrame, out_dir: Path, title: str) -> list[Path]:
    plt, _sns = _setup()
    lines = [label.count("\n") + 1 for label in ranked["label"]]
    fig, ax = plt.subplots(figsize=(11, max(2.5, 0.32 * sum(lines) + 0.25 * len(ranked) + 1.5)))
    y = {v: i for i, v in enumerate(ranked["variant"])}
    low, high = focus_window(ranked, seeds)
    clip = lambda s: s.clip(lower=low, upper=high)  # noqa: E731
    ys = [y[v] for v in ranked["variant"]]
    ax.hlines(ys, clip(ranked["ci_low"].fillna(ranked["mean"])), clip(ranked["ci_high"].fillna(ranked["mean"])),
              color="tab:blue", lw=4, alpha=0.35, label="95% CI of the mean")
    inside = ranked[(ranked["mean"] >= low) & (ranked["mean"] <= high)]
    ax.plot(inside["mean"], [y[v] for v in inside["variant"]], "o", color="tab:blue", label="mean over seeds")
    off = ranked[(ranked["mean"] < low) | (ranked["mean"] > high)]
    for row in off.itertuples(index=False):
        edge, marker = (low, "<") if row.mean < low else (high, ">")
        ax.plot([edge], [y[row.variant]], marker, color="tab:blue", ms=9)
    if len(seeds):
        jitter = np.linspace(-0.15, 0.15, max(2, seeds["seed"].nunique()))
        seed_pos = {s: jitter[i % len(jitter)] for i, s in enumerate(sorted(seeds["seed"].unique()))}
        shown = seeds[(seeds["test_accuracy"] >= low) & (seeds["test_accuracy"] <= high)]
        ax.scatter(shown["test_accuracy"], [y[v] + seed_pos[s] for v, s in zip(shown["variant"], shown["seed"])],
                   s=14, color="black", alpha=0.6, label="one seed", zorder=3)
        below = seeds[seeds["test_accuracy"] < low]
        if len(below):
            ax.scatter([low] * len(below), [y[v] + seed_pos[s] for v, s in zip(below["variant"], below["seed"])],
                       marker="<", s=40, color="tab:red", zorder=4, label="seed off scale (collapsed), value written")
    if len(refs):
        shown = refs[(refs["reference"] >= low) & (refs["reference"] <= high)]
        ax.scatter(shown["reference"], [y[v] for v in shown["variant"]], marker="x", s=60, color="tab:red",
                   label="published", zorder=4)
    for (variant, is_below), text in off_scale_notes(ranked, seeds, refs, low, high).items():
        if is_below:  # inside, by the left edge (the window rarely holds data there)
            ax.annotate(text, (low, y[variant]), fontsize="x-small", color="dimgray", va="center", ha="left",
                        xytext=(12, 0), textcoords="offset points",
                        bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.85}, zorder=5)
        else:  # outside the right edge: the best rows' seeds sit by it, a note there would hide them
            ax.annotate(text, (1.0, y[variant]), xycoords=("axes fraction", "data"), fontsize="x-small",
                        color="dimgray", va="center", ha="left", xytext=(4, 0), textcoords="offset points",
                        annotation_clip=False)
    ax.set_xlim(low, high)
    ax.set_yticks(range(len(ranked)))
    ax.set_yticklabels(ranked["label"], fontsize="x-small")
    ax.set_ylim(len(ranked) - 0.5, -0.5)
    ax.set_xlabel("test accuracy (%)")
    # the legend above the axes, under the title: the right margin holds the off-scale notes
    ax.set_title(title, pad=26)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=5, fontsize="x-small", frameon=False)
    return _save(fig, out_dir, "accuracy")


def draw_learning_curves(bands: pd.DataFrame, metric: str, out_dir: Path, title: str, *, total: int) -> list[Path]:
    """One small panel per variant (the best `TOP_CURVES` by rank), a shared y range focused on the
    healthy curves, the band the table's 95% t-interval."""
    plt, _sns = _setup()
    names = list(dict.fromkeys(bands["variant"]))
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.7 * rows + 0.8), squeeze=False, sharex=True,
                             sharey=True)
    finals = bands.sort_values("epoch").groupby("variant")["mean"].last()
    typical = float(np.nanmedian(finals))
    spread = float(np.nanmedian(np.abs(finals - typical))) or 1.0
    good = finals[finals >= typical - max(5.0, 10 * spread)].index  # curves that did not collapse
    low, high = accuracy_window(bands[bands["variant"].isin(good)]["mean"].tolist(), pad=0.08, min_span=2.0)
    for ax, name in zip(axes.flat, names):
        mine = bands[bands["variant"] == name].sort_values("epoch")
        ax.fill_between(mine["epoch"], mine["low"].fillna(mine["mean"]), mine["high"].fillna(mine["mean"]),
                        color="tab:blue", alpha=0.25, lw=0)
        ax.plot(mine["epoch"], mine["mean"], "-o", ms=3, color="tab:blue")
        last = mine.iloc[-1]
        if last["mean"] < low:  # off scale: say where it is instead of stretching every panel
            ax.annotate(f"▼ off scale: ends at {last['mean']:.1f}%", (0.04, 0.06), xycoords="axes fraction",
                        color="tab:red", fontsize="small")
        ax.set_title(mine["label"].iloc[0], fontsize=7, loc="left")
        ax.tick_params(labelsize="x-small")
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    from matplotlib.ticker import MaxNLocator

    axes[0][0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].set_ylim(low, high)
    shown = f"the {len(names)} best ranked of {total}" if total > len(names) else f"all {total} variants"
    fig.suptitle(f"{title}: {metric.replace('_', ' ')} (%) by epoch, mean over seeds with its 95% t-interval "
                 f"({shown})", fontsize="small")
    fig.tight_layout()
    return _save(fig, out_dir, "learning_curves")


def draw_tradeoff(points: pd.DataFrame, *, cost: str, xlabel: str, out_dir: Path, title: str, log_x: bool) -> list[Path]:
    """Each variant a point labelled with its leaderboard rank (the table is the key); mostly-failed
    variants hollow; y focused on the ranked variants, anything under it drawn at the edge."""
    plt, _sns = _setup()
    fig, ax = plt.subplots(figsize=(8, 5))
    focus = points[points["eligible"] & points["all_healthy"].astype(bool)]["mean"].tolist()
    low, high = accuracy_window(focus or points["mean"].tolist())
    shown = points.assign(y=points["mean"].clip(lower=low, upper=high))
    err_low = (shown["y"] - points["ci_low"].fillna(points["mean"]).clip(lower=low)).clip(lower=0)
    err_high = (points["ci_high"].fillna(points["mean"]).clip(upper=high) - shown["y"]).clip(lower=0)
    ax.errorbar(shown[cost], shown["y"], yerr=[err_low, err_high], fmt="none", ecolor="tab:gray", alpha=0.6)
    ok = shown[shown["eligible"] & (shown["mean"] >= low)]
    ax.scatter(ok[cost], ok["y"], color="tab:gray", zorder=3)
    bad = shown[~shown["eligible"] | (shown["mean"] < low)]
    ax.scatter(bad[cost], bad["y"], facecolors="none", edgecolors="tab:red", marker="v", zorder=3,
               label="mostly unhealthy or off scale")
    front = shown[shown["pareto"]].sort_values(cost)
    ax.plot(front[cost], front["y"], "-o", color="tab:red", label="Pareto front")
    for row in shown.itertuples(index=False):
        rank = "—" if pd.isna(row.rank) else str(int(row.rank))
        text = rank if row.mean >= low else f"{rank} ({row.mean:.1f})"
        ax.annotate(text, (getattr(row, cost), row.y), fontsize="x-small", xytext=(4, 3), textcoords="offset points",
                    color="tab:red" if row.pareto else "dimgray")
    if log_x:
        ax.set_xscale("log")
    ax.set_ylim(low, high)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean test accuracy (%)")
    ax.set_title(f"{title} (points labelled with their leaderboard rank)", fontsize="small")
    ax.legend(fontsize="x-small")
    return _save(fig, out_dir, f"accuracy_vs_{cost}")


def draw_heatmap(tables: dict[str, pd.DataFrame], out_dir: Path, title: str) -> list[Path]:
    """One heatmap per base variant; a cell without a finished run is hatched and says so."""
    plt, sns = _setup()
    bases = list(tables)
    first = tables[bases[0]]
    cols = min(3, len(bases))
    rows = math.ceil(len(bases) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * (1.1 * first.shape[1] + 2.5), rows * (0.7 * first.shape[0] + 1.8)),
                             squeeze=False)
    values = pd.concat([t.stack() for t in tables.values()]).dropna()
    vmin, vmax = (values.min(), values.max()) if len(values) else (0.0, 100.0)
    for ax, base in zip(axes.flat, bases):
        table = tables[base]
        sns.heatmap(table, annot=True, fmt=".2f", cmap="viridis", vmin=vmin, vmax=vmax, ax=ax, cbar=ax is axes.flat[0],
                    cbar_kws={"label": "mean test accuracy (%)"}, mask=table.isna())
        for i, row in enumerate(table.index):
            for j, col in enumerate(table.columns):
                if pd.isna(table.loc[row, col]):
                    ax.add_patch(plt.Rectangle((j, i), 1, 1, fill=False, hatch="//", edgecolor="lightgray", lw=0))
                    ax.text(j + 0.5, i + 0.5, "no run", ha="center", va="center", fontsize="x-small", color="dimgray")
        ax.set_title("\n".join(wrap_label(base, 36)), fontsize="small")
    for ax in list(axes.flat)[len(bases):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
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
        bands, metric = curve_bands(curves, results.summary)
        if len(bands):
            written["learning_curves"] = draw_learning_curves(bands, metric, out_dir, title, total=len(ranked))[0]
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
    tables = heatmap_data(results.summary, results.info)
    if tables:
        written["grid_heatmap"] = draw_heatmap(tables, out_dir, f"{title}: mean accuracy over the grid, per base variant")[0]
    return written


def draw_history(history: pd.DataFrame, out_dir: Path, *, title: str) -> Path:
    """Each variant's nightly mean accuracy over nights (with its standard error), one small panel
    per variant so that their scales do not squash one another; returns the PNG path."""
    plt, _sns = _setup()
    names = list(dict.fromkeys(history["variant"]))
    cols = min(3, max(1, len(names)))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.6 * rows), squeeze=False, sharex=True)
    for ax, name in zip(axes.flat, names):
        mine = history[history["variant"] == name].sort_values("night")
        ax.errorbar(mine["night"], mine["mean"], yerr=mine["se"].fillna(0), fmt="-o", ms=3, color="tab:blue")
        bad = mine[mine["unhealthy"] > 0]
        ax.scatter(bad["night"], bad["mean"], marker="x", color="tab:red", zorder=3, label="unhealthy seeds")
        ax.set_title("\n".join(wrap_label(name, 40)), fontsize="small")
        ax.tick_params(labelsize="x-small")
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("night")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out_dir, "trend")[0]
