from __future__ import annotations

from pathlib import Path

import pytest

from harness.errors import UserError
from harness.report import load_results, render_leaderboard, status_rows, write_report
from harness.store import SQLiteStore

from test_aggregate import VARIANTS, fixture_records


@pytest.fixture()
def store(tmp_path: Path):
    with SQLiteStore(tmp_path / "h.db") as store:
        records = fixture_records()
        for record in records:
            store.put(record)
        plan = [(r.run_id, r.variant, r.seed) for r in records] + [("never-0", "never_ran", 0)]
        info = {"variants": VARIANTS, "seeds": [0, 1, 2], "dataset": {"name": "mnist", "n_train": 100, "n_test": 10}}
        store.save_plan("fx", source="sweeps/fx.yaml", info=info, runs=plan)
        yield store


def test_leaderboard_table_rows(store) -> None:
    text = render_leaderboard(load_results(store, "fx"), generated_at="2026-01-01")
    lines = text.splitlines()
    alpha = next(line for line in lines if line.startswith("| **1** | alpha"))  # bold: the best
    assert ("| 97.50 | 0.50 | [96.26, 98.74] | 97.50 [97.00, 98.00] | 3 | 3/3 (100%) | — | best | "
            "97 (inside [95.02, 99.98]; higher than 0 of our 3 seeds, equal to 1) | 5,000 | 12.0 |") in alpha
    beta = next(line for line in lines if line.startswith("| **2** | beta"))  # not separable from it
    assert "| 95.50 |" in beta and "| 2 | 2/3 (67%) | 1 failed | -2.00 [" in beta
    gamma = next(line for line in lines if "gamma" in line and line.startswith("| 3"))
    assert "| 1 | 0/2 (0%) *mostly unhealthy* | 1 diverged, 1 collapsed |" in gamma
    assert "9.8 (n too small to judge (1 seed" in gamma
    assert any(line.startswith("| — | never_ran") for line in lines)
    # the header's counts agree with the n column (6 = 3 + 2 + 1)
    assert "9 planned: 6 done (the n column; 1 of them collapsed or mismatched), 1 diverged, 1 failed, 1 not run yet" in text
    assert "**Rank rule:**" in text and "cannot be resolved" in text


def test_failures_and_provenance_sections(store) -> None:
    text = render_leaderboard(load_results(store, "fx"), generated_at="2026-01-01")
    assert "## Failures" in text and "ResourceExhaustedError: OOM when allocating tensor" in text
    assert "loss became NaN or infinite" in text
    assert "Keras 3.15.1 on TensorFlow 2.21.0 (8 runs)" in text and "cpu x86_64 (2 threads)" in text
    assert "## Keras backends side by side" not in text  # one backend: nothing to compare
    assert "`sweeps/fx.yaml`" in text


def test_write_report_is_atomic_file(store, tmp_path: Path) -> None:
    out = write_report(store, "fx", out=tmp_path / "reports" / "fx.md")
    assert out.read_text().startswith("# Leaderboard: fx")
    assert sorted(p.name for p in out.parent.iterdir()) == ["fx", "fx.md"]  # no temp file left behind
    assert not [p for p in (out.parent / "fx").iterdir() if p.name.startswith(".")]
    assert "![accuracy](fx/accuracy.png)" in out.read_text()
    import pandas as pd

    table = pd.read_csv(out.parent / "fx" / "summary.csv").set_index("variant")
    assert table.loc["alpha", "median"] == pytest.approx(97.5) and table.loc["alpha", "min"] == pytest.approx(97.0)
    assert table.loc["alpha", "max"] == pytest.approx(98.0) and table.loc["beta", "success_rate"] == pytest.approx(2 / 3)
    assert "[summary.csv]" not in out.read_text() and "(fx/summary.csv)" in out.read_text()


def test_csv_export_has_one_row_per_run(store, tmp_path: Path) -> None:
    import pandas as pd

    from harness.report import write_export

    frame = pd.read_csv(write_export(store, "fx", out=tmp_path / "fx.csv"))
    assert len(frame) == 8 and set(frame["status"]) == {"done", "failed", "diverged"}
    alpha = frame[frame["variant"] == "alpha"].sort_values("seed")
    assert alpha["test_accuracy"].round(2).tolist() == [97.0, 97.5, 98.0]
    assert "OOM" in frame[frame["status"] == "failed"]["error"].iloc[0]
    assert {"run_id", "seed", "params", "train_s", "device", "tensorflow", "dataset_fingerprint"} <= set(frame.columns)


def test_unknown_sweep(store) -> None:
    with pytest.raises(UserError, match="no sweep named 'nope'.*known: fx"):
        load_results(store, "nope")


def test_status_rows(store) -> None:
    assert status_rows(store) == [{"sweep": "fx", "planned": 9, "done": 6, "diverged": 1, "failed": 1, "running": 0, "pending": 1}]
    store.claim("never-0", owner="other-host:1:x", lease_s=60)
    assert status_rows(store)[0]["running"] == 1 and status_rows(store)[0]["pending"] == 0


def test_backends_side_by_side_and_auto_choices(tmp_path: Path) -> None:
    """The same variants on TensorFlow and on JAX (a grid over budget.keras_backend): the report
    puts them side by side, names both backends in the provenance, and says what auto chose."""
    import dataclasses

    tf_records = [r for r in fixture_records() if r.variant == "alpha"]
    jax_records = [
        dataclasses.replace(
            r,
            run_id=r.run_id + "-jax",
            variant="alpha_jax",
            budget={**r.budget, "keras_backend": "jax", "keras_backend_auto": "fastest measured dense step on cpu"},
            versions={**{k: v for k, v in r.versions.items() if k != "tensorflow"}, "keras_backend": "jax", "jax": "0.10.2"},
            metrics={**r.metrics, "test_accuracy": r.metrics["test_accuracy"] - 0.001},
            timings={**r.timings, "train_s": r.timings["train_s"] / 4},
        )
        for r in tf_records
    ]
    variants = [dict(VARIANTS[0]), {**VARIANTS[0], "name": "alpha_jax"}]
    with SQLiteStore(tmp_path / "h.db") as store:
        for record in tf_records + jax_records:
            store.put(record)
        plan = [(r.run_id, r.variant, r.seed) for r in tf_records + jax_records]
        store.save_plan("b", source="b.yaml", info={"variants": variants, "seeds": [0, 1, 2], "dataset": {}}, runs=plan)
        results = load_results(store, "b")
    assert results.runs["keras_backend"].tolist() == ["tensorflow"] * 3 + ["jax"] * 3
    text = render_leaderboard(results, generated_at="2026-01-01")
    assert "Keras 3.15.1 on TensorFlow 2.21.0 (3 runs), JAX 0.10.2 (3 runs)" in text
    section = text.split("## Keras backends side by side", 1)[1].split("##", 1)[0]
    tf_row = next(line for line in section.splitlines() if "| TensorFlow |" in line)
    jax_row = next(line for line in section.splitlines() if "| JAX |" in line)
    assert "| alpha | 3 | 0 | 97.50 | 0.50 | 12.0 | 1.00x |" in tf_row
    assert "| alpha_jax | 3 | 0 | 97.40 | 0.50 | 3.0 | 4.00x |" in jax_row
    assert "| alpha_jax | JAX | fastest measured dense step on cpu |" in text
