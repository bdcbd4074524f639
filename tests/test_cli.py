from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from harness.cli import cli
from harness.store import SQLiteStore

from conftest import tiny_sweep_text, write_sweep

GOOD = tiny_sweep_text(seeds=1)


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


BAD_INPUTS = {
    "malformed_yaml": (GOOD.replace("budget:", "budget: [", 1), "malformed YAML"),
    "unknown_key": (GOOD + "colour: blue\n", "key 'colour': unknown key"),
    "unknown_optimizer": (GOOD.replace("optimizer: adam", "optimizer: adadelta"), "key 'defaults.optimizer.name'"),
    "dropout_out_of_range": (GOOD.replace("dense: {units: [32]}", "dense: {units: [32], dropout: 1.5}"), "variants[0].model.dense.dropout"),
    "grid_key_missing": (GOOD + "grid:\n  model.dense.nope: [1, 2]\n", "key 'grid.model.dense.nope'"),
    "duplicate_variant": (GOOD.replace("name: cnn_8", "name: mlp_32"), "duplicate variant name 'mlp_32'"),
    "python_tag": (GOOD.replace("name: tiny", "name: !!python/object/apply:os.getcwd []"), "YAML tag '!!python/object/apply:os.getcwd' is not allowed"),
    "bad_dataset_file": (GOOD.replace("dataset: mnist", "dataset: {path: broken.npz}"), "cannot read npz file"),
    "missing_dataset_file": (GOOD.replace("dataset: mnist", "dataset: {path: nowhere.npz}"), "nowhere.npz: key 'dataset': not found"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_touches_nothing(case: str, tmp_path: Path, data_dir: Path) -> None:
    text, expected = BAD_INPUTS[case]
    (tmp_path / "broken.npz").write_bytes(b"garbage")
    sweep = write_sweep(tmp_path / "bad.yaml", text)
    store = tmp_path / "results" / "h.db"
    result = invoke("sweep", sweep, "--store", store, "--data-dir", data_dir)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("harness: error: ") and expected in lines[0], lines[0]
    assert "bad.yaml" in lines[0] or "npz" in lines[0]
    assert not store.exists() and not store.parent.exists()


def test_bad_input_leaves_existing_store_byte_identical(tmp_path: Path, data_dir: Path) -> None:
    store = tmp_path / "h.db"
    SQLiteStore(store).close()
    before = digest(store)
    sweep = write_sweep(tmp_path / "bad.yaml", GOOD + "colour: blue\n")
    assert invoke("sweep", sweep, "--store", store, "--data-dir", data_dir).exit_code == 2
    assert digest(store) == before


def test_missing_data_says_where_it_looked(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path / "s.yaml", GOOD)
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke("sweep", sweep, "--store", tmp_path / "h.db", "--data-dir", empty)
    assert result.exit_code == 2
    assert "dataset 'mnist' not found" in result.stderr and str(empty / "mnist.npz") in result.stderr
    assert not (tmp_path / "h.db").exists()


def test_bad_cli_options(tmp_path: Path, data_dir: Path) -> None:
    sweep = write_sweep(tmp_path / "s.yaml", GOOD)
    for args in (["--seeds", "0"], ["--subset", "x"], ["--epochs", "0"]):
        result = invoke("sweep", sweep, "--store", tmp_path / "h.db", "--data-dir", data_dir, *args)
        assert result.exit_code == 2 and "harness: error:" in result.stderr, args
    assert not (tmp_path / "h.db").exists()


def test_dry_run_prints_plan_and_trains_nothing(tmp_path: Path, data_dir: Path) -> None:
    sweep = write_sweep(tmp_path / "s.yaml", tiny_sweep_text(seeds=3))
    store = tmp_path / "h.db"
    result = invoke("sweep", sweep, "--store", store, "--data-dir", data_dir, "--dry-run", "--seeds", "4")
    assert result.exit_code == 0, result.output
    assert "seeds [0, 1, 2, 3]; 2 variants; 8 runs" in result.output
    assert "mlp_32" in result.output and "25,450" in result.output  # 784*32+32 + 32*10+10
    assert "0 done, 0 failed, 8 to train" in result.output
    assert not store.exists()


def test_report_and_status_without_store(tmp_path: Path) -> None:
    for command in ("report", "status"):
        result = invoke(command, "--store", tmp_path / "none.db")
        assert result.exit_code == 2 and "no results store" in result.stderr
    assert not (tmp_path / "none.db").exists()


@pytest.mark.slow
def test_end_to_end_sweep_report_status(tmp_path: Path, data_dir: Path) -> None:
    """Real TensorFlow training on a 2,000-image MNIST subset, through the CLI."""
    sweep = write_sweep(tmp_path / "s.yaml", tiny_sweep_text(seeds=2))
    store = tmp_path / "results" / "h.db"
    result = invoke("sweep", sweep, "--store", store, "--data-dir", data_dir)
    assert result.exit_code == 0, result.output + result.stderr
    assert "4 runs planned, 0 already in the store, 4 trained (0 failed or diverged)" in result.output
    assert "[4/4]" in result.stderr and "ETA" in result.stderr

    with SQLiteStore(store, create=False) as s:
        records = s.records(r for r, _v, _s in s.plan("tiny"))
    assert len(records) == 4 and all(r.status.value == "done" for r in records)
    assert {(r.variant, r.seed) for r in records} == {(v, s) for v in ("mlp_32", "cnn_8") for s in (0, 1)}
    accuracies = {r.variant: [] for r in records}
    for r in records:
        accuracies[r.variant].append(100 * r.test_accuracy)

    out = tmp_path / "reports" / "tiny.md"
    result = invoke("report", "--sweep", "tiny", "--store", store, "--out", out)
    assert result.exit_code == 0 and out.exists()
    text = out.read_text()
    for variant, values in accuracies.items():
        row = next(line for line in text.splitlines() if f"| {variant} |" in line)
        assert f"| {np.mean(values):.2f} | {np.std(values, ddof=1):.2f} |" in row
        assert "| 2 | 2/2 (100%) | — |" in row
    mlp = next(line for line in text.splitlines() if "| mlp_32 |" in line)
    from harness.stats import prediction_interval

    low, high = prediction_interval(accuracies["mlp_32"])  # one published run against one new run of ours
    verdict = "above" if 90 > high else "below" if 90 < low else "inside"
    assert f"| 90 ({verdict} [" in mlp  # the published reference beside our prediction interval
    assert "![accuracy](tiny/accuracy.png)" in text and (out.parent / "tiny" / "accuracy.svg").stat().st_size > 0

    for args in (["export", "--out", tmp_path / "a.csv"], ["report", "--format", "csv", "--out", tmp_path / "b.csv"]):
        result = invoke(*args, "--sweep", "tiny", "--store", store)
        assert result.exit_code == 0, result.output
    rows = (tmp_path / "a.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("sweep,run_id,variant")
    assert (tmp_path / "b.csv").read_text() == (tmp_path / "a.csv").read_text()

    result = invoke("status", "--store", store)
    assert result.exit_code == 0
    assert result.output.splitlines()[1].split() == ["tiny", "4", "4", "0", "0", "0", "0"]

    again = invoke("sweep", sweep, "--store", store, "--data-dir", data_dir)
    assert "4 already in the store, 0 trained" in again.output


@pytest.mark.slow
def test_calibrate_times_each_backend_and_auto_uses_it(tmp_path: Path, data_dir: Path) -> None:
    """Real child processes per installed backend: a peak, a dense and a conv step each; a sweep
    with `keras_backend: auto` then picks the measured fastest per model kind and says why."""
    from harness.backends import installed_backends

    store = tmp_path / "h.db"
    result = invoke("calibrate", "--store", store, "--size", "256")
    assert result.exit_code == 0, result.output + result.stderr
    assert "GFLOP/s" in result.output and "256x256 float32 matmul" in result.output
    with SQLiteStore(store, create=False) as s:
        calibration = s.get_meta("calibration:cpu")
        steps = s.get_meta("backend_steps:cpu")
    assert calibration["flops_per_s"] > 1e6 and calibration["size"] == 256
    installed = set(installed_backends())
    assert set(steps["steps"]["dense"]) == set(steps["steps"]["conv"]) == installed and not steps["errors"]
    assert all(0 < s < 10 for kind in steps["steps"].values() for s in kind.values())
    fastest = {kind: min(by, key=by.__getitem__) for kind, by in steps["steps"].items()}
    assert f"auto on cpu: dense models -> {fastest['dense']}" in result.output

    sweep = write_sweep(tmp_path / "s.yaml", GOOD)
    plan = invoke("sweep", sweep, "--data-dir", data_dir, "--store", store, "--dry-run", "--keras-backend", "auto")
    assert plan.exit_code == 0, plan.stderr
    from harness.plan import BackendContext
    from harness.spec import load_sweep
    from harness.sweep import prepare_sweep

    spec = load_sweep(sweep).with_overrides(keras_backend="auto")
    runs = prepare_sweep(spec, data_dir=data_dir, backends=BackendContext(calibration=steps)).runs
    chosen = {r.variant.name: r.backend for r in runs}
    assert chosen["mlp_32"].backend == fastest["dense"] and chosen["cnn_8"].backend == fastest["conv"]
    assert "fastest measured dense step on cpu" in chosen["mlp_32"].reason
    assert runs[0].budget["keras_backend_auto"] == chosen["mlp_32"].reason


def test_worker_options_shape_the_plan(tmp_path: Path, data_dir: Path) -> None:
    sweep = write_sweep(tmp_path / "s.yaml", tiny_sweep_text(seeds=3))
    result = invoke("sweep", sweep, "--data-dir", data_dir, "--store", tmp_path / "h.db", "--dry-run",
                    "--workers", "3", "--threads", "2", "--gpus", "none")
    assert result.exit_code == 0, result.stderr
    assert (
        "workers: 3: cpu.0 (cpu, 2 threads, tensorflow), cpu.1 (cpu, 2 threads, tensorflow), "
        "cpu.2 (cpu, 2 threads, tensorflow)" in result.output
    )
    missing_gpu = invoke("sweep", sweep, "--data-dir", data_dir, "--store", tmp_path / "h.db", "--gpus", "7")
    assert missing_gpu.exit_code == 2 and "GPU 7 not found" in missing_gpu.stderr
    assert not (tmp_path / "h.db").exists()


@pytest.mark.slow
def test_in_process_sweep_with_retries_and_rerun_failed(tmp_path: Path, data_dir: Path) -> None:
    sweep = write_sweep(tmp_path / "s.yaml", tiny_sweep_text(seeds=1, train=600, test=100))
    store = tmp_path / "h.db"
    result = invoke("sweep", sweep, "--data-dir", data_dir, "--store", store, "--in-process", "--retries", "1")
    assert result.exit_code == 0, result.stderr
    assert "2 trained (0 failed or diverged)" in result.output and "workers: none (training in this process)" in result.stderr
    again = invoke("sweep", sweep, "--data-dir", data_dir, "--store", store, "--rerun-failed")
    assert "2 already in the store, 0 trained" in again.output


def test_validation_planning_and_reports_never_import_tensorflow(tmp_path: Path, data_dir: Path) -> None:
    """The parent process, `--dry-run`, `report` and `regress` stay fast: no Keras backend imported
    (TensorFlow, JAX, PyTorch), nor Keras itself, whatever backend the sweep asks for."""
    import subprocess
    import sys

    sweep = write_sweep(tmp_path / "s.yaml", GOOD)
    code = f"""
import sys
from click.testing import CliRunner
from harness.cli import cli
import harness.report, harness.plots, harness.regress, harness.scheduler, harness.sweep
for backend in ("tensorflow", "jax", "auto"):
    r = CliRunner().invoke(cli, ["sweep", {str(sweep)!r}, "--dry-run", "--data-dir", {str(data_dir)!r},
                                 "--store", {str(tmp_path / 'h.db')!r}, "--keras-backend", backend])
    assert r.exit_code == 0, r.output
    loaded = [m for m in ("tensorflow", "keras", "jax", "jaxlib", "torch") if m in sys.modules]
    assert not loaded, f"{{loaded}} imported by the parent"
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_backend_not_installed_exits_2_before_anything_starts(tmp_path: Path, data_dir: Path) -> None:
    from harness.backends import backend_version

    if backend_version("torch") is not None:
        pytest.skip("torch is installed here")
    sweep = write_sweep(tmp_path / "s.yaml", GOOD)
    store = tmp_path / "h.db"
    result = invoke("sweep", sweep, "--data-dir", data_dir, "--store", store, "--keras-backend", "torch")
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert "\n" not in line and 'pip install -e ".[torch]"' in line and "Keras backend 'torch' is not installed" in line
    assert not store.exists()


def test_in_process_runs_one_backend_only(tmp_path: Path, data_dir: Path) -> None:
    sweep = write_sweep(tmp_path / "s.yaml", GOOD + "grid:\n  budget.keras_backend: [tensorflow, jax]\n")
    result = invoke("sweep", sweep, "--data-dir", data_dir, "--store", tmp_path / "h.db", "--in-process")
    assert result.exit_code == 2 and "runs Keras on one backend only" in result.stderr
    assert not (tmp_path / "h.db").exists()


def test_the_last_line_counts_runs_another_sweep_finished(tmp_path: Path, data_dir: Path, monkeypatch) -> None:
    """planned = already in the store + trained here + finished by another sweep meanwhile: the
    line says all three (the routine's count of the last is tested in tests/test_execute.py)."""
    import harness.execute
    from harness.execute import SweepOutcome

    monkeypatch.setattr(harness.execute, "execute_sweep",
                        lambda spec, options, notify=None: SweepOutcome(planned=4, skipped=1, records=(), attempts=2,
                                                                        finished_elsewhere=3))
    sweep = write_sweep(tmp_path / "s.yaml", tiny_sweep_text(seeds=2))
    result = invoke("sweep", sweep, "--data-dir", data_dir, "--store", tmp_path / "h.db")
    assert result.exit_code == 0, result.output
    assert "4 runs planned, 1 already in the store, 0 trained (0 failed or diverged), 3 finished by another sweep meanwhile;" in result.output
