"""The shipped `sweeps/examples/`: a residual CNN builder and a KerasTuner build(hp), on a tiny budget."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import cli
from harness.records import RunStatus
from harness.spec import load_sweep
from harness.store import SQLiteStore

from conftest import REPO

EXAMPLES = REPO / "sweeps" / "examples"


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_examples_validate_without_importing_their_code() -> None:
    resnet = load_sweep(EXAMPLES / "resnet_mnist.yaml")
    assert len(resnet.variants) == 4 and {v.model.builder for v in resnet.variants} == {"residual_cnn:small_resnet"}
    tuner = load_sweep(EXAMPLES / "tuner_mlp.yaml")
    assert tuner.variants[0].model.builder == "tuner_mlp:build"
    assert not list(EXAMPLES.glob("__pycache__"))  # nothing imported here, nothing compiled next to the files


@pytest.mark.slow
def test_residual_cnn_example_trains(tmp_path: Path, data_dir: Path) -> None:
    store = tmp_path / "h.db"
    common = ["--store", store, "--data-dir", data_dir, "--subset", "1000:200", "--epochs", "2", "--seeds", "1"]
    dry = invoke("sweep", EXAMPLES / "resnet_mnist.yaml", "--dry-run", *common)
    assert dry.exit_code == 0, dry.output

    import importlib.util
    import sys

    import keras

    spec = importlib.util.spec_from_file_location("residual_cnn_example", EXAMPLES / "residual_cnn.py")
    module = importlib.util.module_from_spec(spec)
    saved, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = saved
    small_resnet = module.small_resnet
    for width in (8, 16):
        for blocks in (1, 2):
            params = small_resnet((28, 28, 1), 10, width=width, blocks=blocks).count_params()
            line = next(line for line in dry.stdout.splitlines() if f"width={width},args.blocks={blocks}]" in line)
            assert f"{params:,}" in line, (line, params)
    keras.backend.clear_session()

    # Two grid points trained for real, in this process (the residual blocks, BN and the 1x1 projection).
    run = invoke("sweep", EXAMPLES / "resnet_mnist.yaml", "--only", "resnet?args.width=8,*", "--in-process", *common)
    assert run.exit_code == 0, run.output
    with SQLiteStore(store, create=False) as opened:
        records = opened.records(r for r, _v, _s in opened.plan("resnet_mnist"))
    assert len(records) == 2 and all(r.status is RunStatus.DONE for r in records), [r.error for r in records]
    # A global-average-pooled residual net needs more than 30 steps to score well; it does learn.
    assert all(r.history["loss"][1] < r.history["loss"][0] for r in records), [r.history for r in records]
    assert not list(EXAMPLES.glob("__pycache__"))


@pytest.mark.slow
def test_kerastuner_example_is_a_builder_as_it_is(tmp_path: Path, data_dir: Path) -> None:
    store = tmp_path / "h.db"
    run = invoke("sweep", EXAMPLES / "tuner_mlp.yaml", "--store", store, "--data-dir", data_dir, "--subset", "600:200",
                 "--epochs", "1", "--seeds", "2", "--in-process")
    assert run.exit_code == 0, run.output
    with SQLiteStore(store, create=False) as opened:
        records = opened.records(r for r, _v, _s in opened.plan("tuner_mlp"))
    assert len(records) == 2 and all(r.status is RunStatus.DONE for r in records), [r.error for r in records]
    # One hidden layer of 64 units: the `layers` arg fixed at 1, units_0 at its default.
    assert {r.metrics["params"] for r in records} == {784 * 64 + 64 + 64 * 10 + 10}
    assert re.search(r"2 trained \(0 failed", run.stdout)
