from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.aggregate import runs_frame, summarize
from harness.plots import (
    accuracy_data,
    accuracy_window,
    grid_axes,
    heatmap_data,
    learning_curve_data,
    pareto_front,
    tradeoff_data,
    write_plots,
)
from harness.report import load_results
from harness.store import SQLiteStore

from test_aggregate import VARIANTS, fixture_records


@pytest.fixture()
def frames():
    runs = runs_frame(fixture_records())
    return runs, summarize(runs, VARIANTS)


def test_accuracy_data_is_ranked_with_seeds_and_references(frames) -> None:
    runs, summary = frames
    ranked, seeds, refs = accuracy_data(runs, summary)
    assert list(ranked["variant"]) == ["alpha", "beta", "gamma"]  # never_ran has nothing to draw
    assert seeds["test_accuracy"].round(2).tolist() == [97.0, 97.5, 98.0, 95.0, 96.0, 9.8]
    assert refs.to_dict("records") == [{"variant": "alpha", "reference": 97.0}, {"variant": "gamma", "reference": 9.8}]


def test_accuracy_window_keeps_our_numbers_readable() -> None:
    low, high = accuracy_window([95.0, 98.0])
    assert 94.0 < low < 95.0 and 98.0 < high < 99.0
    assert accuracy_window([]) == (0.0, 100.0)


def test_learning_curves_long_table() -> None:
    curves = learning_curve_data(fixture_records())
    alpha = curves[(curves["variant"] == "alpha") & (curves["metric"] == "accuracy")]
    assert len(alpha) == 6 and sorted(alpha["epoch"].unique()) == [1, 2]
    assert alpha[alpha["epoch"] == 1]["value"].tolist() == [90.0, 90.0, 90.0]
    assert "beta" in set(curves["variant"]) and len(curves[curves["variant"] == "gamma"]) == 4  # failed runs left out


def test_pareto_front() -> None:
    points = pd.DataFrame({"variant": list("abcd"), "params": [10, 20, 30, 20], "mean": [90.0, 95.0, 94.0, 96.0]})
    assert pareto_front(points, cost="params").tolist() == [True, False, False, True]


def test_tradeoff_data_marks_front(frames) -> None:
    _runs, summary = frames
    points = tradeoff_data(summary, cost="params").set_index("variant")
    assert points.loc["alpha", "pareto"] and points.loc["beta", "pareto"]
    assert not points.loc["gamma", "pareto"]  # mostly unhealthy (1 diverged, 1 collapsed): not on the front


def test_heatmap_only_for_two_grid_axes(frames) -> None:
    _runs, summary = frames
    info = {"variants": [
        {"name": "alpha", "grid_point": [["model.dense.dropout", 0.0], ["budget.batch_size", 32]]},
        {"name": "beta", "grid_point": [["model.dense.dropout", 0.5], ["budget.batch_size", 32]]},
        {"name": "gamma", "grid_point": [["model.dense.dropout", 0.0], ["budget.batch_size", 64]]},
    ]}
    assert grid_axes(info) == ["model.dense.dropout", "budget.batch_size"]
    table = heatmap_data(summary, info)["(no base)"]
    assert table.loc["0.0", "32"] == pytest.approx(97.5) and table.loc["0.5", "32"] == pytest.approx(95.5)
    assert table.loc["0.0", "64"] == pytest.approx(9.8)
    assert pd.isna(table.loc["0.5", "64"])  # an empty cell stays, marked empty
    assert heatmap_data(summary, {"variants": [{"name": "alpha", "grid_point": []}]}) is None


def test_heatmap_per_base_variant_never_averages_across_bases(frames) -> None:
    _runs, summary = frames
    info = {"variants": [
        {"name": "alpha", "base": "mlp", "grid_point": [["lr", 0.1], ["batch", 32]]},
        {"name": "beta", "base": "cnn", "grid_point": [["lr", 0.1], ["batch", 32]]},
        {"name": "gamma", "base": "cnn", "grid_point": [["lr", 0.01], ["batch", 64]]},
    ]}
    tables = heatmap_data(summary, info)
    assert set(tables) == {"mlp", "cnn"}
    assert tables["mlp"].loc["0.1", "32"] == pytest.approx(97.5) and tables["cnn"].loc["0.1", "32"] == pytest.approx(95.5)
    assert pd.isna(tables["mlp"].loc["0.01", "64"]) and tables["mlp"].shape == (2, 2)


def test_plot_files_are_written_and_not_empty(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "h.db") as store:
        records = fixture_records()
        for record in records:
            store.put(record)
        info = {"variants": [dict(v, grid_point=[["model.dense.dropout", i % 2], ["budget.batch_size", 32 * (1 + i // 2)]])
                             for i, v in enumerate(VARIANTS)], "seeds": [0, 1, 2]}
        store.save_plan("fx", source="fx.yaml", info=info, runs=[(r.run_id, r.variant, r.seed) for r in records])
        written = write_plots(load_results(store, "fx"), tmp_path / "plots")
    assert set(written) == {"accuracy", "learning_curves", "accuracy_vs_params", "accuracy_vs_train_s", "grid_heatmap"}
    for png in written.values():
        for path in (png, png.with_suffix(".svg")):
            assert path.stat().st_size > 1000, path
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in png.with_suffix(".svg").read_bytes()[:2000]


# --------------------------------------------------------------------------- 16 long names (conv_table)


def conv_table_store(path: Path):
    """A conv_table-shaped store: the 16 real variant names of sweeps/conv_table.yaml x 3 seeds,
    synthesized records with learning curves; one variant collapses on a seed, one mostly diverges."""
    from harness.records import RunFlag, RunStatus
    from harness.spec import load_sweep

    from test_records import make_record

    names = [v.name for v in load_sweep(Path(__file__).parent.parent / "sweeps" / "conv_table.yaml").variants]
    rng = np.random.default_rng(0)
    store = SQLiteStore(path)
    plan, variants = [], []
    for i, name in enumerate(names):
        variants.append({"name": name, "params": 10_000 * (i + 1), "reference": [98.5 + 0.03 * i]})
        for seed in range(3):
            acc = 98.0 + 0.05 * i + 0.1 * rng.standard_normal()
            status, flags = RunStatus.DONE, ()
            if i == 12 and seed == 0:
                acc, flags = 9.8, (RunFlag.NEAR_CHANCE,)
            if i == 14 and seed < 2:
                status = RunStatus.DIVERGED
            curve = [acc / 100 - 0.02 * (4 - e) for e in range(5)]
            record = make_record(run_id=f"r{i}-{seed}", variant=name, variant_id=f"id{i}", seed=seed, status=status,
                                 flags=flags, metrics={"test_accuracy": acc / 100, "params": 10_000 * (i + 1)}
                                 if status is RunStatus.DONE else {},
                                 history={"val_accuracy": curve, "accuracy": curve}, timings={"train_s": 10.0 + i})
            store.put(record)
            plan.append((record.run_id, name, seed))
    store.save_plan("conv_table", source="sweeps/conv_table.yaml", info={"variants": variants, "seeds": [0, 1, 2]},
                    runs=plan)
    return store, names


def test_sixteen_long_names_get_distinct_full_labels_and_a_focused_axis(tmp_path: Path) -> None:
    from harness.plots import curve_bands, focus_window, plot_labels

    store, names = conv_table_store(tmp_path / "c.db")
    with store:
        results = load_results(store, "conv_table")
    labels = plot_labels(results.summary)
    assert len(set(labels.values())) == 16
    for name, label in labels.items():  # every character of the name is there, in order
        assert label.split(". ", 1)[1].replace("\n", "") == name
        assert max(len(line) for line in label.split("\n")) <= 44
    ranked, seeds, _refs = accuracy_data(results.runs, results.summary)
    low, high = focus_window(ranked, seeds)
    assert 97.0 < low < 98.0 and 98.5 < high <= 100.0  # the collapsed 9.8 does not stretch the axis
    assert (~seeds["healthy"]).sum() == 1
    bands, metric = curve_bands(learning_curve_data(results.records, results.variants), results.summary)
    assert metric == "val_accuracy" and bands["variant"].nunique() == 16
    from harness.aggregate import mean_ci

    one = bands[(bands["variant"] == names[0]) & (bands["epoch"] == 5)].iloc[0]
    values = [100 * r.history["val_accuracy"][-1] for r, v in zip(results.records, results.variants) if v == names[0]]
    _m, _s, ci_low, ci_high = mean_ci(values)
    assert (one["low"], one["high"]) == (pytest.approx(ci_low), pytest.approx(min(100.0, ci_high)))  # the table's interval


def test_conv_table_plots_are_written(tmp_path: Path) -> None:
    store, _names = conv_table_store(tmp_path / "c.db")
    with store:
        written = write_plots(load_results(store, "conv_table"), tmp_path / "plots")
    assert {"accuracy", "learning_curves", "accuracy_vs_params", "accuracy_vs_train_s"} <= set(written)
    for png in written.values():
        assert png.stat().st_size > 1000


def test_what_lies_off_scale_is_one_note_per_variant_and_side() -> None:
    """The quickstart's collapsed row (3 seeds at 9.8, published 9.8) was overprinted by four labels."""
    from harness.plots import off_scale_notes

    ranked = pd.DataFrame({"variant": ["cnn", "sigmoid", "wide"], "mean": [98.2, 9.8, 99.9]})
    seeds = pd.DataFrame({"variant": ["cnn"] * 3 + ["sigmoid"] * 3 + ["wide"],
                          "seed": [0, 1, 2, 0, 1, 2, 0], "test_accuracy": [98.1, 98.3, 98.2, 9.8, 9.8, 9.8, 99.9]})
    refs = pd.DataFrame({"variant": ["sigmoid", "cnn", "cnn"], "reference": [9.8, 98.2, 12.0]})
    notes = off_scale_notes(ranked, seeds, refs, 95.0, 99.5)
    assert notes == {
        ("sigmoid", True): "◀ mean 9.8 · 3 seeds at 9.8 · published 9.8",
        ("cnn", True): "◀ published 12",
        ("wide", False): "mean 99.9 ▶",
    }
    seeds.loc[4, "test_accuracy"] = 11.36
    assert off_scale_notes(ranked, seeds, refs, 95.0, 99.5)[("sigmoid", True)] == "◀ mean 9.8 · seeds 9.8, 9.8, 11.4 · published 9.8"
