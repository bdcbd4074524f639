from __future__ import annotations

from pathlib import Path

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
    assert points.loc["alpha", "pareto"] and points.loc["beta", "pareto"] and points.loc["gamma", "pareto"]


def test_heatmap_only_for_two_grid_axes(frames) -> None:
    _runs, summary = frames
    info = {"variants": [
        {"name": "alpha", "grid_point": [["model.dense.dropout", 0.0], ["budget.batch_size", 32]]},
        {"name": "beta", "grid_point": [["model.dense.dropout", 0.5], ["budget.batch_size", 32]]},
        {"name": "gamma", "grid_point": [["model.dense.dropout", 0.0], ["budget.batch_size", 64]]},
    ]}
    assert grid_axes(info) == ["model.dense.dropout", "budget.batch_size"]
    table = heatmap_data(summary, info)
    assert table.loc["0.0", "32"] == pytest.approx(97.5) and table.loc["0.5", "32"] == pytest.approx(95.5)
    assert table.loc["0.0", "64"] == pytest.approx(9.8)
    assert heatmap_data(summary, {"variants": [{"name": "alpha", "grid_point": []}]}) is None


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
