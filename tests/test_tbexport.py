"""`harness export --tensorboard DIR`, read back with TensorBoard's own event reader."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import cli
from harness.records import RunStatus
from harness.store import SQLiteStore
from harness.tbexport import MARKER, tensorboard_runs

from test_aggregate import VARIANTS, fixture_records


@pytest.fixture()
def store_path(tmp_path: Path) -> Path:
    path = tmp_path / "h.db"
    with SQLiteStore(path) as store:
        records = fixture_records()
        for record in records:
            store.put(record)
        plan = [(r.run_id, r.variant, r.seed) for r in records]
        info = {"variants": VARIANTS, "seeds": [0, 1, 2], "dataset": {"name": "mnist", "n_train": 100, "n_test": 10}}
        store.save_plan("fx", source="sweeps/fx.yaml", info=info, runs=plan)
    return path


def read_back(folder: Path):
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.plugins.hparams import plugin_data_pb2

    accumulator = ea.EventAccumulator(str(folder), size_guidance={ea.TENSORS: 0})
    accumulator.Reload()
    content = accumulator.PluginTagToContent("hparams")
    data = {tag: plugin_data_pb2.HParamsPluginData.FromString(blob) for tag, blob in content.items()}
    scalars = {
        tag: [(event.step, event.tensor_proto.float_val[0]) for event in accumulator.Tensors(tag)]
        for tag in accumulator.Tags()["tensors"]
        if not tag.startswith("_hparams_")
    }
    return data, scalars


def test_export_reads_back_with_tensorboard(store_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "tb"
    result = CliRunner().invoke(cli, ["export", "--store", str(store_path), "--sweep", "fx", "--tensorboard", str(out)])
    assert result.exit_code == 0, result.output
    assert f"tensorboard --logdir {out}" in result.stdout

    experiment, _ = read_back(out)
    config = experiment["_hparams_/experiment"].experiment
    assert {h.name for h in config.hparam_infos} >= {"variant", "seed", "status"}
    assert [m.name.tag for m in config.metric_infos] == ["test_accuracy", "test_loss"]
    variant_info = next(h for h in config.hparam_infos if h.name == "variant")
    assert sorted(v.string_value for v in variant_info.domain_discrete.values) == ["alpha", "beta", "gamma"]

    records = {(r.variant, r.seed): r for r in fixture_records()}
    alpha1 = records[("alpha", 1)]
    data, scalars = read_back(out / "alpha" / "seed_1")
    start = data["_hparams_/session_start_info"].session_start_info
    assert start.hparams["variant"].string_value == "alpha" and start.hparams["seed"].number_value == 1.0
    assert start.hparams["status"].string_value == "done"
    assert [v for _step, v in scalars["accuracy"]] == pytest.approx(alpha1.history["accuracy"])
    assert [step for step, _v in scalars["loss"]] == [1, 2]
    assert scalars["test_accuracy"] == [(2, pytest.approx(alpha1.metrics["test_accuracy"]))]

    failed = next(r for r in fixture_records() if r.status is RunStatus.FAILED)
    data, scalars = read_back(out / failed.variant / f"seed_{failed.seed}")
    assert data["_hparams_/session_start_info"].session_start_info.hparams["status"].string_value == "failed"
    assert "test_accuracy" not in scalars  # a failed run is listed, without a made-up metric

    # Exporting again replaces our own folder; a folder that is not ours is refused untouched.
    again = CliRunner().invoke(cli, ["export", "--store", str(store_path), "--sweep", "fx", "--tensorboard", str(out)])
    assert again.exit_code == 0 and (out / MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.db", "tb"]  # no temp or old folder left
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    refused = CliRunner().invoke(cli, ["export", "--store", str(store_path), "--sweep", "fx", "--tensorboard", str(mine)])
    assert refused.exit_code == 2 and "is not a TensorBoard export of harness" in refused.stderr
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_varying_parameters_become_hparams() -> None:
    base = fixture_records()[0]
    import dataclasses

    wide = dataclasses.replace(base, variant="wide", config={"dense": {"units": [64]}, "optimizer": {"name": "adam"}})
    narrow = dataclasses.replace(base, variant="narrow", seed=3, config={"dense": {"units": [8]}, "optimizer": {"name": "adam"}})
    runs = tensorboard_runs([wide, narrow], ["wide", "narrow"])
    assert runs[0].hparams == {"model.dense.units": "[64]", "variant": "wide", "seed": 0.0, "status": "done"}
    assert runs[1].folder == "narrow/seed_3" and runs[1].hparams["model.dense.units"] == "[8]"


def test_export_writes_without_tensorflow(store_path: Path, tmp_path: Path) -> None:
    code = f"""
import sys
from harness.store import SQLiteStore
from harness.tbexport import export_tensorboard
with SQLiteStore({str(store_path)!r}, create=False) as store:
    export_tensorboard(store, "fx", out={str(tmp_path / 'tb')!r})
assert "tensorflow" not in sys.modules, "TensorFlow was imported"
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "tb" / "alpha" / "seed_0").is_dir()
