"""`model: {builder: ...}`: the user's own Keras model (plain functions and KerasTuner build(hp))."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from harness import heartbeat, train
from harness.builders import BuilderError, check_args, locate_builder
from harness.cli import cli
from harness.records import RunStatus
from harness.spec import load_sweep
from harness.store import SQLiteStore
from harness.sweep import prepare_sweep

from conftest import write_sweep

BUILDERS = '''
"""Builders for the tests (importing this module leaves a marker file next to it)."""
from pathlib import Path

Path(__file__).with_name("imported.marker").write_text("imported")

import keras
from keras import layers


def mlp(units=32, dropout=0.0, *, input_shape, num_classes):
    inputs = keras.Input(shape=input_shape)
    x = layers.Flatten()(inputs)
    x = layers.Dense(units, activation="relu")(x)
    if dropout:
        x = layers.Dropout(dropout)(x)
    outputs = layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def named_mlp(units=16, *, input_shape, num_classes):
    """Named layers and model (copies of it must not clash), a weight penalty and dropout."""
    inputs = keras.Input(shape=input_shape, name="pixels")
    x = layers.Flatten(name="flat")(inputs)
    x = layers.Dense(units, activation="relu", kernel_regularizer=keras.regularizers.L2(0.001), name="hidden")(x)
    x = layers.Dropout(0.2, name="drop")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="out")(x)
    return keras.Model(inputs, outputs, name="named")


class Subclassed(keras.Model):
    """Weights made on the first call (no Input): each copy must be called right after its seed."""

    def __init__(self, units, num_classes):
        super().__init__()
        self.flat = layers.Flatten()
        self.hidden = layers.Dense(units, activation="relu")
        self.out = layers.Dense(num_classes, activation="softmax")

    def call(self, x):
        return self.out(self.hidden(self.flat(x)))


def subclassed(units=16, *, num_classes):
    return Subclassed(units, num_classes)


def nested_output(units=16, *, input_shape, num_classes):
    """One output, nested in a list."""
    inputs = keras.Input(shape=input_shape)
    x = layers.Dense(units, activation="relu")(layers.Flatten()(inputs))
    return keras.Model(inputs, [layers.Dense(num_classes, activation="softmax")(x)])


# Made when the module is imported: Keras draws its initializer's seed from the global random
# state, so a worker must import the module before it seeds a run (else the first run differs).
_SHARED = layers.Dense(16, activation="relu", name="shared_hidden")


def shared_layer(*, input_shape, num_classes):
    """Every call reuses one module-level layer: copies would share its weights."""
    inputs = keras.Input(shape=input_shape)
    x = _SHARED(layers.Flatten()(inputs))
    return keras.Model(inputs, layers.Dense(num_classes, activation="softmax")(x))


def compiled_mlp(units, input_shape, num_classes):
    model = mlp(units, input_shape=input_shape, num_classes=num_classes)
    model.compile(optimizer=keras.optimizers.Adam(0.003), loss="sparse_categorical_crossentropy",
                  metrics=["sparse_categorical_accuracy"])
    return model


def build(hp):
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        layers.Flatten(),
        layers.Dense(hp.Int("units", 8, 64, step=8, default=8), activation="relu"),
        layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(hp.Choice("lr", [0.01, 0.001])),
                  loss="categorical_crossentropy", metrics=["accuracy"])
    return model


def not_a_model(input_shape, num_classes):
    return "a string"


def raises(input_shape, num_classes):
    raise ValueError("broken on purpose")


CONSTANT = 3
'''

SWEEP = """
schema_version: 1
name: byo
dataset: mnist
subset: {{train: 2000, test: 300}}
budget: {{epochs: 1, batch_size: 64, seeds: {seeds}}}
defaults:
  optimizer: adam
  conv: [{{filters: [8]}}]      # vocabulary defaults do not apply to builder variants
variants:
{variants}
"""

MLP_VARIANT = """  - name: mlp
    model: {builder: "mybuilders:mlp", args: {units: 16}}
"""


def test_a_model_the_user_compiled_trains_to_the_same_bits_with_its_state_built_ahead(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TensorFlow: the user's compiled model (their optimizer, loss, metric) with its state built
    before `fit` (`train.build_compiled_state`, one trace of its step) ends with the history and
    test result of Keras' own order, to the bit."""
    import keras

    if keras.backend.backend() != "tensorflow":
        pytest.skip("building ahead is for Keras' TensorFlow trainer; this process runs another backend")
    path = sweep_file(tmp_path, '  - name: b\n    model: {builder: "mybuilders:compiled_mlp", args: {units: 16}}\n')
    prepared = prepare_sweep(load_sweep(path), data_dir=data_dir)
    records = []
    for ahead in (True, False):
        monkeypatch.setattr(train, "BUILD_STATE_AHEAD", ahead)
        records.append(train.train_run(prepared.runs[0], prepared.dataset))
    assert [r.status for r in records] == [RunStatus.DONE, RunStatus.DONE], records[0].error
    assert records[0].history == records[1].history
    assert (records[0].test_accuracy, records[0].metrics["test_loss"]) == (records[1].test_accuracy, records[1].metrics["test_loss"])


def sweep_file(tmp_path: Path, variants: str = MLP_VARIANT, *, seeds: int = 1, extra: str = "") -> Path:
    if not (tmp_path / "mybuilders.py").exists():
        (tmp_path / "mybuilders.py").write_text(BUILDERS)
    return write_sweep(tmp_path / "byo.yaml", SWEEP.format(seeds=seeds, variants=variants) + extra)


# --------------------------------------------------------------------------- planning (no TensorFlow)


def test_builder_variants_and_grid_over_args(tmp_path: Path) -> None:
    spec = load_sweep(sweep_file(tmp_path, extra="grid:\n  model.args.units: [16, 32]\n  model.args.dropout: [0.0, 0.5]\n"))
    assert [v.name for v in spec.variants] == [
        "mlp[args.units=16,args.dropout=0.0]", "mlp[args.units=16,args.dropout=0.5]",
        "mlp[args.units=32,args.dropout=0.0]", "mlp[args.units=32,args.dropout=0.5]",
    ]
    first = spec.variants[0]
    assert first.model.builder == "mybuilders:mlp" and first.model.args == {"units": 16, "dropout": 0.0}
    assert first.model.builder_source == hashlib.sha256((tmp_path / "mybuilders.py").read_bytes()).hexdigest()
    assert first.code_root == str(tmp_path.resolve())
    dumped = first.model.model_dump(mode="json")
    assert "conv" not in dumped and "dense" not in dumped  # the defaults' vocabulary was dropped
    assert len({v.variant_id for v in spec.variants}) == 4
    assert not (tmp_path / "imported.marker").exists()  # planning never imports the user's module


def test_vocabulary_models_keep_their_dump(tmp_path: Path) -> None:
    """Builder keys are absent from a vocabulary model's dump, so its run ids are what they were."""
    text = SWEEP.format(seeds=1, variants="  - name: plain\n    model: {dense: {units: [8]}}\n")
    spec = load_sweep(write_sweep(tmp_path / "plain.yaml", text))
    dumped = spec.variants[0].model.model_dump(mode="json")
    assert not {"builder", "args", "inputs", "builder_source"} & set(dumped)
    assert dumped["conv"][0]["filters"] == [8]


def test_editing_the_builder_changes_run_ids(tmp_path: Path, data_dir: Path) -> None:
    path = sweep_file(tmp_path)
    before = prepare_sweep(load_sweep(path), data_dir=data_dir)
    (tmp_path / "mybuilders.py").write_text(BUILDERS.replace('activation="relu"', 'activation="tanh"', 1))
    after = prepare_sweep(load_sweep(path), data_dir=data_dir)
    assert before.runs[0].run_id != after.runs[0].run_id
    assert before.runs[0].variant.variant_id != after.runs[0].variant.variant_id
    # The args are part of the identity too.
    other = prepare_sweep(load_sweep(sweep_file(tmp_path, MLP_VARIANT.replace("16", "17"))), data_dir=data_dir)
    assert other.runs[0].run_id != after.runs[0].run_id


def test_sweep_folder_first_then_python_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "lib"
    (elsewhere / "pkg").mkdir(parents=True)
    (elsewhere / "pkg" / "__init__.py").write_text("raise RuntimeError('never executed by planning')\n")
    (elsewhere / "pkg" / "nets.py").write_text("def net(input_shape, num_classes):\n    return None\n")
    (elsewhere / "mybuilders.py").write_text("def mlp(units):\n    pass\n")
    monkeypatch.syspath_prepend(str(elsewhere))
    folder = tmp_path / "sweeps"
    folder.mkdir()
    (folder / "mybuilders.py").write_text("def mlp(units, input_shape, num_classes):\n    pass\n")
    local = locate_builder("mybuilders:mlp", sweep_dir=folder)
    assert local.file == str(folder / "mybuilders.py") and local.root == str(folder.resolve())
    packaged = locate_builder("pkg.nets:net", sweep_dir=folder)
    assert packaged.file == str(elsewhere / "pkg" / "nets.py") and packaged.params == ("input_shape", "num_classes")
    assert str(folder) not in sys.path and str(folder.resolve()) not in sys.path


def test_signature_checks_without_importing(tmp_path: Path) -> None:
    (tmp_path / "mybuilders.py").write_text(BUILDERS)
    mlp = locate_builder("mybuilders:mlp", sweep_dir=tmp_path)
    assert mlp.kind == "function" and mlp.required == ("input_shape", "num_classes")
    check_args(mlp, {"units": 3, "dropout": 0.1})
    with pytest.raises(BuilderError, match="takes no argument 'width'"):
        check_args(mlp, {"width": 3})
    with pytest.raises(BuilderError, match="passed by the harness"):
        check_args(mlp, {"num_classes": 3})
    with pytest.raises(BuilderError, match="needs args units"):
        check_args(locate_builder("mybuilders:compiled_mlp", sweep_dir=tmp_path), {})
    hp = locate_builder("mybuilders:build", sweep_dir=tmp_path)
    assert hp.kind == "hp"
    check_args(hp, {"units": 16, "lr": 0.01})  # any names: they become hp.Fixed
    with pytest.raises(BuilderError, match="hp.Fixed"):
        check_args(hp, {"units": [16, 32]})
    assert not (tmp_path / "imported.marker").exists()


BAD_BUILDERS = {
    "missing_module": ('{builder: "nowhere:mlp"}', "key 'variants[0].model.builder': module 'nowhere' not found"),
    "missing_function": ('{builder: "mybuilders:nope"}', "defines no 'nope'"),
    "constant": ('{builder: "mybuilders:CONSTANT"}', "is a constant, not a function"),
    "malformed_ref": ('{builder: "mybuilders.mlp"}', "key 'variants[0].model.builder'"),
    "unknown_arg": ('{builder: "mybuilders:mlp", args: {width: 3}}', "takes no argument 'width'"),
    "vocabulary_key": ('{builder: "mybuilders:mlp", dense: {units: [3]}}', "'dense' does not apply to a builder model"),
    "args_without_builder": ('{args: {units: 3}}', "'args' only applies to a builder model"),
    "source_hash_by_hand": ('{builder: "mybuilders:mlp", builder_source: abc}', "key 'variants[0].model.builder_source'"),
    "hp_list_arg": ('{builder: "mybuilders:build", args: {units: [1, 2]}}', "must be a number, a string or a boolean"),
}


@pytest.mark.parametrize("case", sorted(BAD_BUILDERS))
def test_bad_builder_is_one_line_exit_2(case: str, tmp_path: Path, data_dir: Path) -> None:
    model, expected = BAD_BUILDERS[case]
    path = sweep_file(tmp_path, f"  - name: bad\n    model: {model}\n")
    store = tmp_path / "results" / "h.db"
    result = CliRunner().invoke(cli, ["sweep", str(path), "--store", str(store), "--data-dir", str(data_dir)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("harness: error: ") and "byo.yaml" in lines[0], lines
    assert expected in lines[0], lines[0]
    assert not store.parent.exists()
    assert not (tmp_path / "imported.marker").exists()


def test_parent_imports_neither_tensorflow_nor_the_builder(tmp_path: Path, data_dir: Path) -> None:
    path = sweep_file(tmp_path, extra="grid:\n  model.args.units: [16, 32]\n")
    code = f"""
import sys
from harness.spec import load_sweep
from harness.sweep import prepare_sweep, format_plan
prepared = prepare_sweep(load_sweep({str(path)!r}), data_dir={str(data_dir)!r})
text = format_plan(prepared, None)
assert "?" in text, text
assert "tensorflow" not in sys.modules and "keras" not in sys.modules and "mybuilders" not in sys.modules
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (tmp_path / "imported.marker").exists()


# --------------------------------------------------------------------------- real training


VARIANTS = """  - name: mlp
    model: {builder: "mybuilders:mlp", args: {units: 16}}
  - name: compiled
    model: {builder: "mybuilders:compiled_mlp", args: {units: 16}}
  - name: tuner_build
    model: {builder: "mybuilders:build", args: {units: 24, lr: 0.01}}
  - name: not_a_model
    model: {builder: "mybuilders:not_a_model"}
  - name: raises
    model: {builder: "mybuilders:raises"}
  - name: vocabulary
    model: {conv: [], dense: {units: [16]}}
"""


def test_builders_train_for_real(tmp_path: Path, data_dir: Path) -> None:
    prepared = prepare_sweep(load_sweep(sweep_file(tmp_path, VARIANTS)), data_dir=data_dir)
    records = {run.variant.name: train.train_run(run, prepared.dataset) for run in prepared.runs}
    for name in ("mlp", "compiled", "tuner_build", "vocabulary"):
        record = records[name]
        assert record.status is RunStatus.DONE, record.error
        assert 0.3 < record.test_accuracy <= 1.0, (name, record.test_accuracy)  # chance is 0.1
        assert set(record.history) >= {"loss", "accuracy"}, record.history.keys()
    assert records["mlp"].metrics["params"] == 784 * 16 + 16 + 16 * 10 + 10
    assert records["tuner_build"].metrics["params"] == 784 * 24 + 24 + 24 * 10 + 10  # hp.Fixed won over the default
    assert records["mlp"].config["builder"] == "mybuilders:mlp" and records["mlp"].config["args"] == {"units": 16}
    assert records["not_a_model"].status is RunStatus.FAILED
    assert "returned str, not a Keras model" in records["not_a_model"].error
    assert records["raises"].status is RunStatus.FAILED
    assert "Traceback" in records["raises"].error and "broken on purpose" in records["raises"].error
    assert str(tmp_path) not in sys.path and str(tmp_path.resolve()) not in sys.path


@pytest.mark.parametrize("builder", ["named_mlp", "subclassed", "nested_output"])
def test_builder_seeds_fuse_and_each_ends_where_its_single_run_ends(builder: str, tmp_path: Path, data_dir: Path) -> None:
    """A builder called once per copy after that copy's seed: two seeds trained as one program
    end with the histories and test results of each trained alone (penalty and dropout per copy;
    a subclassed model's weights made before the next seed; a nested single output)."""
    from harness.fused import train_group

    variant = f'  - name: b\n    model: {{builder: "mybuilders:{builder}", args: {{units: 16}}}}\n'
    path = sweep_file(tmp_path, variant, seeds=2)
    prepared = prepare_sweep(load_sweep(path), data_dir=data_dir)
    fused = train_group(list(prepared.runs), prepared.dataset)
    assert [r.status for r in fused] == [RunStatus.DONE, RunStatus.DONE], fused[0].error
    assert [r.metrics["fused"] for r in fused] == [2, 2]
    assert fused[0].history["loss"] != fused[1].history["loss"]
    for record, run in zip(fused, prepared.runs):
        alone = train.train_run(run, prepared.dataset)
        assert alone.status is RunStatus.DONE and alone.metrics["fused"] == 1
        assert record.metrics["params"] == alone.metrics["params"] == 784 * 16 + 16 + 16 * 10 + 10
        assert set(record.history) == set(alone.history) >= {"loss", "accuracy"}
        for key in alone.history:
            np.testing.assert_allclose(record.history[key], alone.history[key], rtol=1e-4, atol=1e-5)
        assert record.test_accuracy == pytest.approx(alone.test_accuracy, abs=2 / 300)


@pytest.mark.parametrize("builder", ["compiled_mlp", "shared_layer"])
def test_a_builder_that_cannot_fuse_trains_its_group_one_run_at_a_time(builder: str, tmp_path: Path, data_dir: Path) -> None:
    """Compiled by the user (its own loss and optimizer; each run as it would train in a group of
    one), or copies that would share a layer's weights (seeds that are not independent): each run
    of the group trains alone, not as a fused copy."""
    from harness.fused import train_group

    args = "{units: 16}" if builder == "compiled_mlp" else "{}"
    path = sweep_file(tmp_path, f'  - name: b\n    model: {{builder: "mybuilders:{builder}", args: {args}}}\n', seeds=2)
    prepared = prepare_sweep(load_sweep(path), data_dir=data_dir)
    reported: list[float] = []
    with heartbeat.reporting(reported.append):
        records = train_group(list(prepared.runs), prepared.dataset)
    assert [r.status for r in records] == [RunStatus.DONE, RunStatus.DONE], records[0].error
    # one epoch each, one after the other: each run half the group (reported after each call of
    # the train function: the compiled model steps one batch a call, the other 32 in one call)
    assert reported == sorted(reported) and 0.5 in reported and reported[-1] == 1.0
    first = {round(f, 9) for f in reported if f <= 0.5}
    assert first == {round(f - 0.5, 9) for f in reported if f > 0.5}  # the second run: the same steps, shifted
    assert all(r.metrics["fused"] == 1 for r in records)  # not fused copies, and each says why
    why = "compiled by the builder" if builder == "compiled_mlp" else "copies share weights"
    assert [r.metrics["not_fused"] for r in records] == [why, why]
    assert records[0].history["loss"] != records[1].history["loss"]
    if builder == "compiled_mlp":
        alone = train.train_run(prepared.runs[1], prepared.dataset)
        assert alone.history["loss"] == pytest.approx(records[1].history["loss"], rel=1e-5)


def test_builder_edited_after_planning_fails_the_run(tmp_path: Path, data_dir: Path) -> None:
    prepared = prepare_sweep(load_sweep(sweep_file(tmp_path)), data_dir=data_dir)
    (tmp_path / "mybuilders.py").write_text(BUILDERS + "\n# edited\n")
    record = train.train_run(prepared.runs[0], prepared.dataset)
    assert record.status is RunStatus.FAILED and "changed since the sweep was planned" in record.error


def test_dry_run_counts_builder_params(tmp_path: Path, data_dir: Path) -> None:
    path = sweep_file(tmp_path, VARIANTS.split("  - name: not_a_model")[0])
    result = CliRunner().invoke(cli, ["sweep", str(path), "--dry-run", "--data-dir", str(data_dir),
                                      "--store", str(tmp_path / "h.db")])
    assert result.exit_code == 0, result.output
    assert "imports TensorFlow and runs the builder code" in result.stderr
    assert f"{784 * 16 + 16 + 16 * 10 + 10:,}" in result.stdout and f"{784 * 24 + 24 + 24 * 10 + 10:,}" in result.stdout
    assert not (tmp_path / "h.db").exists()


def test_dry_run_reports_a_builder_that_returns_no_model(tmp_path: Path, data_dir: Path) -> None:
    path = sweep_file(tmp_path, "  - name: bad\n    model: {builder: mybuilders:not_a_model}\n")
    result = CliRunner().invoke(cli, ["sweep", str(path), "--dry-run", "--data-dir", str(data_dir)])
    assert result.exit_code == 2
    assert "building variant 'bad' failed: BuilderError: builder 'mybuilders:not_a_model' returned str" in result.stderr


@pytest.mark.slow
def test_builder_sweep_on_workers_resumes_reports_and_regresses(tmp_path: Path, data_dir: Path) -> None:
    """Real worker processes import the builder from the sweep's folder; an edit retrains."""
    path = sweep_file(tmp_path, seeds=2, extra="grid:\n  model.args.units: [16, 32]\n")
    store = tmp_path / "h.db"
    common = ["--store", str(store), "--data-dir", str(data_dir), "--workers", "2", "--threads", "1"]
    runner = CliRunner()
    first = runner.invoke(cli, ["sweep", str(path), *common])
    assert first.exit_code == 0, first.output
    assert "4 trained (0 failed" in first.stdout
    again = runner.invoke(cli, ["sweep", str(path), *common])
    assert "4 already in the store, 0 trained" in again.stdout
    report = runner.invoke(cli, ["report", "--sweep", "byo", "--store", str(store), "--no-plots",
                                 "--out", str(tmp_path / "byo.md")])
    assert report.exit_code == 0, report.output
    text = (tmp_path / "byo.md").read_text()
    assert "mlp[args.units=32]" in text and f"{784 * 32 + 32 + 330:,}" in text  # params measured by the workers
    baseline = tmp_path / "base.json"
    assert runner.invoke(cli, ["baseline", "save", "--sweep", "byo", "--store", str(store), "--out", str(baseline)]).exit_code == 0
    assert runner.invoke(cli, ["regress", "--sweep", "byo", "--baseline", str(baseline), "--store", str(store)]).exit_code == 0

    (tmp_path / "mybuilders.py").write_text(BUILDERS.replace("def mlp(", "# a comment\ndef mlp("))
    edited = runner.invoke(cli, ["sweep", str(path), *common])
    assert edited.exit_code == 0, edited.output
    assert "0 already in the store, 4 trained (0 failed" in edited.stdout
    with SQLiteStore(store, create=False) as opened:
        sources = {r.config["builder_source"] for r in opened.records(r for r, _v, _s in opened.plan("byo"))}
    assert sources == {hashlib.sha256((tmp_path / "mybuilders.py").read_bytes()).hexdigest()}
