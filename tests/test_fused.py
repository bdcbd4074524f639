"""Fused seed training: K copies in one Keras program train exactly as K separate runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from harness.fused import epoch_order
from harness.records import RunStatus
from harness.spec import ModelConfig, load_sweep
from harness.sweep import prepare_sweep

from conftest import backend_params, tiny_sweep_text, write_sweep

# Dropout in the model: each copy draws its own masks from its own seed.
CONFIG = {"dense": {"units": [16], "dropout": 0.2}, "regularizer": {"kind": "l2", "factor": 0.001}}


def _data(n: int = 100, features: int = 12, classes: int = 3):
    import keras

    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, features)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, classes, n), classes)
    return x, y


def _train(seeds, *, xs, ys, orders, epochs=2):
    """Build copies for `seeds`, train them fused on their own data in their own order."""
    import keras

    from harness.architecture import model_layout
    from harness.fused import compile_fused, fit_copies
    from harness.models import build_fused, copy_penalty

    layout = model_layout(ModelConfig.model_validate(CONFIG), input_shape=(12,), num_classes=3)
    model, copies = build_fused(layout, seeds, seed_fn=keras.utils.set_random_seed)
    compile_fused(model, copies, layout, loss="categorical_crossentropy", optimizer=keras.optimizers.Adam(0.01),
                  steps_per_execution=2)

    def epoch_data(epoch):
        return [x[o[epoch]] for x, o in zip(xs, orders)], [y[o[epoch]] for y, o in zip(ys, orders)]

    histories, diverged = fit_copies(model, n_copies=len(seeds), epoch_data=epoch_data, epochs=epochs, batch_size=32,
                                     penalties=[copy_penalty(copy, layout) for copy in copies])
    return copies, histories, diverged


def test_epoch_order_is_a_pure_function_of_seed_and_epoch() -> None:
    first = epoch_order(3, 0, 100)
    assert sorted(first) == list(range(100))
    assert np.array_equal(first, epoch_order(3, 0, 100))
    assert not np.array_equal(first, epoch_order(3, 1, 100)) and not np.array_equal(first, epoch_order(4, 0, 100))


def test_fused_pair_ends_with_the_weights_of_two_separate_runs() -> None:
    x, y = _data()
    orders = {seed: [epoch_order(seed, e, len(x)) for e in range(2)] for seed in (5, 9)}
    fused, fused_hist, diverged = _train([5, 9], xs=[x, x], ys=[y, y], orders=[orders[5], orders[9]])
    assert diverged == [None, None]
    for index, seed in enumerate((5, 9)):
        alone, alone_hist, _ = _train([seed], xs=[x], ys=[y], orders=[orders[seed]])
        for mine, theirs in zip(fused[index].get_weights(), alone[0].get_weights()):
            np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(fused_hist[index]["loss"], alone_hist[0]["loss"], rtol=1e-5)
    # and the copies really are different runs
    assert not np.allclose(fused[0].get_weights()[0], fused[1].get_weights()[0])


def test_a_copy_fed_nan_diverges_alone() -> None:
    from harness.fused import CopyResult, copy_record
    from harness.train import fit_options

    x, y = _data()
    poisoned = x.copy()
    poisoned[7, 3] = np.nan  # one example of copy 1 only
    orders = [[epoch_order(seed, e, len(x)) for e in range(2)] for seed in (5, 9)]
    fused, hist, diverged = _train([5, 9], xs=[x, poisoned], ys=[y, y], orders=orders)
    alone, alone_hist, _ = _train([5], xs=[x], ys=[y], orders=orders[:1])
    assert diverged == [None, 0]
    for mine, theirs in zip(fused[0].get_weights(), alone[0].get_weights()):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)  # unaffected by its NaN neighbour
    assert all(np.isfinite(w).all() for w in fused[0].get_weights())
    assert len(hist[1]["loss"]) == 1 and not np.isfinite(hist[1]["loss"][0])  # history ends where it diverged

    # Each copy becomes its own record: the NaN one DIVERGED, the other DONE.
    spec = load_sweep(write_sweep(Path(__import__("tempfile").mkdtemp()) / "s.yaml", tiny_sweep_text(seeds=2)))
    runs = [r for r in prepare_sweep(spec, data_dir=_data_dir()).runs if r.variant.name == "mlp_32"]
    records = [
        copy_record(run, CopyResult(h, d, loss, 0.5), share={"setup_s": 0.1, "train_s": 1.0, "eval_s": 0.1, "wall_s": 1.2},
                    group_wall_s=2.4, n=2, params=10, options=fit_options(backend="tensorflow", batch_size=64, n_fit=1800), n_fit=1800,
                    num_classes=10, started_at="t", device="cpu", versions={})
        for run, h, d, loss in zip(runs, hist, diverged, (0.7, float("nan")))
    ]
    assert [r.status for r in records] == [RunStatus.DONE, RunStatus.DIVERGED]
    assert records[1].error == "loss became NaN or infinite" and records[0].error is None
    assert [r.seed for r in records] == [0, 1] and records[0].metrics["fused"] == 2


def _data_dir():
    from conftest import _find_data_dir

    found = _find_data_dir()
    if found is None:
        pytest.skip("real MNIST not found")
    return found


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.values[0] != "torch"])
def test_train_group_gives_each_seed_the_record_of_its_single_run(backend: str, tmp_path: Path, data_dir: Path, train_on) -> None:
    """Real MNIST, a real worker per backend: seeds 0 and 1 fused end where each trained alone ends."""
    spec = load_sweep(write_sweep(tmp_path / "s.yaml", tiny_sweep_text(seeds=2, train=1000, test=300)))
    prepared = prepare_sweep(spec.with_overrides(keras_backend=backend), data_dir=data_dir)
    runs = [r for r in prepared.runs if r.variant.name == "cnn_8"]
    fused = train_on(backend, runs, prepared)
    assert [r.status for r in fused] == [RunStatus.DONE, RunStatus.DONE], fused[0].error
    assert [(r.run_id, r.seed) for r in fused] == [(r.run_id, r.seed) for r in runs]
    assert fused[0].history["loss"] != fused[1].history["loss"]
    for record, run in zip(fused, runs):
        alone = train_on(backend, run, prepared)
        assert alone.metrics["fused"] == 1 and record.metrics["fused"] == 2
        assert record.metrics["params"] == alone.metrics["params"] == run.summary.params
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            np.testing.assert_allclose(record.history[key], alone.history[key], rtol=1e-4, atol=1e-5)
        assert record.test_accuracy == pytest.approx(alone.test_accuracy, abs=2 / 300)
        assert record.timings["group_wall_s"] >= record.timings["wall_s"]


def test_a_group_mixing_variants_fails_as_records(tmp_path: Path, data_dir: Path) -> None:
    from harness.fused import train_group

    spec = load_sweep(write_sweep(tmp_path / "s.yaml", tiny_sweep_text(seeds=1, train=200, test=100)))
    prepared = prepare_sweep(spec, data_dir=data_dir)
    records = train_group(list(prepared.runs), prepared.dataset)
    assert [r.status for r in records] == [RunStatus.FAILED, RunStatus.FAILED]
    assert "cannot be fused" in records[0].error


def test_a_builder_copy_logs_the_loss_keras_reports_for_it_alone() -> None:
    """A builder's model keeps its layers' regularizers: a copy's logged loss is its data loss plus
    its own penalty, exactly what Keras reports for the model compiled alone."""
    import keras
    from keras import layers

    from harness.fused import compile_fused, evaluate_copies
    from harness.models import copy_penalty, fuse_models

    x, y = _data()
    keras.utils.set_random_seed(1)
    model = keras.Sequential([
        keras.Input((12,)),
        layers.Dense(16, activation="relu", kernel_regularizer=keras.regularizers.L2(0.05), name="hidden"),
        layers.Dense(3, activation="softmax", name="out"),
    ], name="mine")
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    keras_loss = model.evaluate(x, y, verbose=0, return_dict=True)["loss"]
    data_loss = float(keras.losses.CategoricalCrossentropy()(y, model.predict(x, verbose=0)))
    assert keras_loss > data_loss + 0.01  # the penalty is a visible part of Keras' loss

    fused, copies = fuse_models([model], input_shape=(12,))
    compile_fused(fused, copies, None, loss="categorical_crossentropy", optimizer=keras.optimizers.Adam(), builder=True)
    penalties = [copy_penalty(copies[0], None)]
    [(test_loss, _accuracy)] = evaluate_copies(fused, n_copies=1, x=x, y=y, batch_size=32, penalties=penalties)
    assert test_loss == pytest.approx(keras_loss, rel=1e-5)


REGULARIZED_SWEEP = """
schema_version: 1
name: reg
dataset: mnist
subset: {train: 600, test: 200}
budget: {epochs: 2, batch_size: 64, seeds: 2, validation_split: 0.1}
defaults: {preprocess: unit, optimizer: adam}
variants:
  - name: l2
    model: {dense: {units: [16]}, regularizer: {kind: l2, factor: 0.01}}
"""


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.values[0] != "torch"])
def test_a_regularized_model_trains_fused_on_every_backend(backend: str, tmp_path: Path, data_dir: Path, train_on) -> None:
    """A regularized model trains on every backend (a loss metric that read the weights failed on
    JAX, whose stateless steps let no metric read a weight: the penalty is now read between epochs)."""
    spec = load_sweep(write_sweep(tmp_path / "reg.yaml", REGULARIZED_SWEEP))
    prepared = prepare_sweep(spec.with_overrides(keras_backend=backend), data_dir=data_dir)
    records = train_on(backend, list(prepared.runs), prepared)
    assert [r.status for r in records] == [RunStatus.DONE, RunStatus.DONE], records[0].error
    for record in records:
        assert record.test_accuracy > 0.3  # chance is 0.1
        assert len(record.history["val_loss"]) == 2 and np.isfinite(record.metrics["test_loss"])
    assert records[0].history["loss"] != records[1].history["loss"]


def test_a_non_finite_weight_makes_the_logged_loss_nan_without_any_regularizer() -> None:
    """TensorFlow's relu turns NaN into 0, so a NaN weight need not show in the data loss: the
    penalty read between epochs is NaN for any copy whose weights are not all finite."""
    import keras

    from harness.architecture import model_layout
    from harness.models import build_layout, copy_penalty

    layout = model_layout(ModelConfig.model_validate({"dense": {"units": [4]}}), input_shape=(3,), num_classes=2)
    copy = build_layout(layout)
    assert copy_penalty(copy, layout)() == 0.0  # no regularizer: no penalty
    weights = copy.get_weights()
    weights[0][1, 2] = np.nan
    copy.set_weights(weights)
    assert np.isnan(copy_penalty(copy, layout)())
    keras.backend.clear_session()


def test_a_model_fed_by_row_number_holds_the_inputs_once_and_predicts_as_the_copies() -> None:
    """`fed_by_rows`: the inputs are one non-trainable variable (not a copy per copy), nothing of it
    trains, and copy k's output for row numbers r is copy k's prediction of rows r."""
    import keras

    from harness.models import fed_by_rows, fuse_models

    x, _y = _data(n=50)
    models = []
    for seed in (1, 2):
        keras.utils.set_random_seed(seed)
        models.append(keras.Sequential([keras.Input((12,)), keras.layers.Dense(3, activation="softmax")]))
    fused, copies = fuse_models(models, input_shape=(12,))
    by_rows = fed_by_rows(copies, x)
    assert [tuple(v.shape) for v in by_rows.non_trainable_variables] == [(50, 12)]
    assert {id(v) for v in by_rows.trainable_variables} == {id(v) for c in copies for v in c.trainable_variables}
    rows = [np.array([3, 0, 49, 3], dtype=np.int32), np.array([7, 8, 9, 10], dtype=np.int32)]
    got = by_rows.predict(rows, verbose=0)
    want = fused.predict([x[rows[0]], x[rows[1]]], verbose=0)
    for mine, theirs in zip(got, want):
        np.testing.assert_allclose(mine, theirs, rtol=1e-6)


ON_DEVICE_SWEEP = """
schema_version: 1
name: rows
dataset: mnist
subset: {train: 600, test: 200}
budget: {epochs: 2, batch_size: 32, seeds: 2, validation_split: 0.1}
defaults: {preprocess: unit, optimizer: adam}
variants:
  - name: bn_dropout_l2
    model:
      conv: [{filters: [4], kernel_size: 3, batchnorm: true, pool: max}]
      dense: {units: [16], dropout: 0.2}
      regularizer: {kind: l2, factor: 0.01}
"""


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.values[0] != "torch"])
def test_inputs_held_on_the_device_train_exactly_as_inputs_fed_from_the_host(
    backend: str, tmp_path: Path, data_dir: Path, train_on
) -> None:
    """A group's training inputs held on the device and fed by row number (the default) give every
    seed the history, validation and test result that feeding its permuted arrays from the host
    gives, to the last bit: batch norm, dropout masks and penalties included."""
    spec = load_sweep(write_sweep(tmp_path / "rows.yaml", ON_DEVICE_SWEEP))
    prepared = prepare_sweep(spec.with_overrides(keras_backend=backend), data_dir=data_dir)
    runs = list(prepared.runs)
    on_device = train_on(backend, runs, prepared)
    from_host = train_on(backend, runs, prepared, {"DEVICE_INPUTS_MAX_BYTES": 0})
    assert [r.status for r in on_device + from_host] == [RunStatus.DONE] * 4, on_device[0].error
    assert [r.metrics["inputs_on_device"] for r in on_device + from_host] == [True, True, False, False]
    for mine, theirs in zip(on_device, from_host):
        assert mine.history == theirs.history and set(mine.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
        assert (mine.test_accuracy, mine.metrics["test_loss"]) == (theirs.test_accuracy, theirs.metrics["test_loss"])
    assert on_device[0].history["loss"] != on_device[1].history["loss"]


def test_a_gpu_worker_holds_its_inputs_on_the_device_only_within_its_share(tmp_path: Path, data_dir: Path, train_on) -> None:
    """A worker told its share of GPU memory (simulated here: the variable a GPU worker gets)
    holds the group's inputs on the device only if they take at most half of it, as the planner
    assumed (`fusion.inputs_on_device`); fed from the host instead, the same bits."""
    from harness.backends import DEVICE_MEMORY_ENV
    from harness.fusion import input_bytes, inputs_on_device

    spec = load_sweep(write_sweep(tmp_path / "rows.yaml", ON_DEVICE_SWEEP))
    prepared = prepare_sweep(spec.with_overrides(keras_backend="tensorflow"), data_dir=data_dir)
    runs = list(prepared.runs)
    inputs = input_bytes(runs[0])
    roomy, tight = 2 * inputs, 2 * inputs - 2
    assert inputs_on_device(runs[0], roomy) and not inputs_on_device(runs[0], tight)
    held = train_on("tensorflow", runs, prepared, {"environ": {DEVICE_MEMORY_ENV: str(roomy)}})
    fed = train_on("tensorflow", runs, prepared, {"environ": {DEVICE_MEMORY_ENV: str(tight)}})
    assert [r.status for r in held + fed] == [RunStatus.DONE] * 4, held[0].error
    assert [r.metrics["inputs_on_device"] for r in held + fed] == [True, True, False, False]
    for mine, theirs in zip(held, fed):
        assert mine.history == theirs.history
        assert (mine.test_accuracy, mine.metrics["test_loss"]) == (theirs.test_accuracy, theirs.metrics["test_loss"])


def test_a_group_trained_with_the_flat_update_ends_with_keras_own_bits(tmp_path: Path, data_dir: Path, train_on) -> None:
    """TensorFlow: a group's records with the flat compiled optimizer update (the default,
    `harness.tf_update`) equal those of Keras' own update to the last bit (batch norm, dropout,
    penalties, rows held on the device), and each record says which update it had."""
    spec = load_sweep(write_sweep(tmp_path / "rows.yaml", ON_DEVICE_SWEEP))
    prepared = prepare_sweep(spec.with_overrides(keras_backend="tensorflow"), data_dir=data_dir)
    runs = list(prepared.runs)
    flat = train_on("tensorflow", runs, prepared)
    own = train_on("tensorflow", runs, prepared, {"FLAT_UPDATE": False})
    assert [r.status for r in flat + own] == [RunStatus.DONE] * 4, flat[0].error
    assert [r.metrics["flat_update"] for r in flat + own] == [True, True, False, False]
    for mine, theirs in zip(flat, own):
        assert mine.history == theirs.history
        assert (mine.test_accuracy, mine.metrics["test_loss"]) == (theirs.test_accuracy, theirs.metrics["test_loss"])
    assert flat[0].history["loss"] != flat[1].history["loss"]


STATE_SWEEP = """
schema_version: 1
name: state
dataset: mnist
subset: {train: 200, test: 100}
budget: {epochs: 1, batch_size: 32, seeds: 2, validation_split: 0.1}
defaults: {preprocess: unit, optimizer: adam}
variants:
  - name: mlp
    model:
      dense: {units: [16], dropout: 0.2}
      regularizer: {kind: l2, factor: 0.01}
"""


def test_tensorflow_traces_a_group_s_step_once_and_the_bits_do_not_change(tmp_path: Path, data_dir: Path, monkeypatch) -> None:
    """Keras' TensorFlow trainer creates the loss trackers and optimizer slots while it traces its
    first step, and TensorFlow then traces the step again; built ahead (`train.build_compiled_state`)
    each step function is traced once, and every history, validation and test number is the same
    to the bit (dropout, penalty, validation included)."""
    import keras

    if keras.backend.backend() != "tensorflow":
        pytest.skip("the TensorFlow trainer's retrace; this process runs another backend")
    import harness.fused
    import harness.train
    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    traces: list[str] = []
    for name in ("train_step", "test_step"):
        real = getattr(TensorFlowTrainer, name)
        monkeypatch.setattr(TensorFlowTrainer, name,
                            lambda self, data, real=real, name=name: traces.append((name, self.name)) or real(self, data))

    def count(ahead: bool, step: str) -> int:  # of the fused models (not the flat update's own check)
        return sum(1 for name, model in results[ahead, "traces"] if name == step and model.startswith("fused"))

    spec = load_sweep(write_sweep(tmp_path / "s.yaml", STATE_SWEEP))
    prepared = prepare_sweep(spec.with_overrides(keras_backend="tensorflow"), data_dir=data_dir)
    results = {}
    for ahead in (True, False):
        monkeypatch.setattr(harness.train, "BUILD_STATE_AHEAD", ahead)
        traces.clear()
        results[ahead] = harness.fused.train_group(list(prepared.runs), prepared.dataset)
        assert [r.status for r in results[ahead]] == [RunStatus.DONE] * 2, results[ahead][0].error
        results[ahead, "traces"] = list(traces)
    assert count(True, "train_step") == 1
    assert count(False, "train_step") == 2  # without: the retrace this removes
    assert count(True, "test_step") < count(False, "test_step")
    for mine, theirs in zip(results[True], results[False]):
        assert mine.history == theirs.history and "val_loss" in mine.history
        assert (mine.test_accuracy, mine.metrics["test_loss"]) == (theirs.test_accuracy, theirs.metrics["test_loss"])


def test_a_group_leaves_no_device_copy_of_its_inputs_behind(tmp_path: Path, data_dir: Path, monkeypatch) -> None:
    """The variable holding a group's inputs is gone when `train_group` returns (a worker trains
    group after group; on a GPU two stale copies would crowd out the next group). Checked by hand:
    without the full collection (FULL_COLLECT_BYTES above the inputs) it is still alive here."""
    import weakref

    import harness.fused
    import harness.models

    held = []
    real = harness.models.fed_by_rows

    def spy(copies, data):
        model = real(copies, data)
        held.append(weakref.ref(model.get_layer("inputs_on_device").rows))
        return model

    monkeypatch.setattr(harness.models, "fed_by_rows", spy)
    monkeypatch.setattr(harness.fused, "FULL_COLLECT_BYTES", 0)  # the tiny inputs count as large
    spec = load_sweep(write_sweep(tmp_path / "s.yaml", tiny_sweep_text(seeds=2, train=300, test=100)))
    prepared = prepare_sweep(spec, data_dir=data_dir)
    records = harness.fused.train_group([r for r in prepared.runs if r.variant.name == "mlp_32"], prepared.dataset)
    assert [r.status for r in records] == [RunStatus.DONE, RunStatus.DONE], records[0].error
    assert len(held) == 1 and held[0]() is None
