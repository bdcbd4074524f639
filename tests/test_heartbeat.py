"""Training progress from inside a worker (`harness.heartbeat`): the fraction of a group's epochs."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import heartbeat
from harness.records import RunStatus
from harness.spec import load_sweep
from harness.sweep import prepare_sweep

from conftest import tiny_sweep_text, write_sweep


def test_without_a_sink_a_report_goes_nowhere() -> None:
    heartbeat.report(0.5)  # no sink: nothing to do, nothing raised


def test_parts_map_each_trainer_fraction_into_its_share_of_the_group() -> None:
    got: list[float] = []
    with heartbeat.reporting(got.append):
        heartbeat.report(0.25)
        for index in range(4):
            with heartbeat.part(index, 4):
                heartbeat.report(0.5)
                with heartbeat.part(1, 2):  # nested: the second half of this quarter
                    heartbeat.report(1.0)
        heartbeat.report(7.0)  # clamped
        heartbeat.report(float("nan"))
    assert got == [0.25, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0, 1.0, 0.0]
    heartbeat.report(0.5)
    assert len(got) == 11  # the sink is gone with its block


def test_a_sink_that_fails_does_not_fail_the_training() -> None:
    def broken(done: float) -> None:
        raise BrokenPipeError("the parent is gone")

    with heartbeat.reporting(broken):
        heartbeat.report(0.5)


def test_a_fused_group_reports_after_every_epoch(tmp_path: Path, data_dir: Path) -> None:
    """Real TensorFlow: two seeds fused, three epochs of one call of the train function each
    (270 examples at batch 64: 5 steps): 1/3, 2/3, 1, each said after its epoch's steps and
    again when the epoch (its validation included) is over."""
    from harness.fused import train_group

    text = tiny_sweep_text(seeds=2, train=300, test=100).replace("epochs: 1", "epochs: 3")
    prepared = prepare_sweep(load_sweep(write_sweep(tmp_path / "s.yaml", text)), data_dir=data_dir)
    got: list[float] = []
    with heartbeat.reporting(got.append):
        records = train_group([r for r in prepared.runs if r.variant.name == "mlp_32"], prepared.dataset)
    assert [r.status for r in records] == [RunStatus.DONE] * 2, records[0].error
    assert sorted(set(round(f, 9) for f in got)) == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert got == sorted(got) and got[-1] == 1.0


COMPILED_BUILDER = """
import keras


def compiled_mlp(input_shape, num_classes):
    model = keras.Sequential([keras.Input(input_shape), keras.layers.Flatten(),
                              keras.layers.Dense(8, activation="relu"), keras.layers.Dense(num_classes, activation="softmax")])
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    return model
"""


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "one_after_another"])
def test_a_group_reports_inside_its_epochs(tmp_path: Path, data_dir: Path, fused: bool) -> None:
    """Real TensorFlow: an epoch of two calls of the train function (4,050 examples at batch 64:
    64 steps, 32 per call) reports after each call, so a group whose epochs take minutes (the conv
    table's CNNs on a CPU) is paced within seconds. Fused, and one run after the other (a model
    its builder compiled cannot fuse: it trains through Keras' own loop, each run its half)."""
    from harness.fused import train_group

    text = tiny_sweep_text(seeds=2, train=4500, test=100).replace("epochs: 1", "epochs: 2")
    if not fused:
        (tmp_path / "compiledbuild.py").write_text(COMPILED_BUILDER)
        text = text.replace("dense: {units: [32]}", 'builder: "compiledbuild:compiled_mlp"')
    prepared = prepare_sweep(load_sweep(write_sweep(tmp_path / "s.yaml", text)), data_dir=data_dir)
    got: list[float] = []
    with heartbeat.reporting(got.append):
        records = train_group([r for r in prepared.runs if r.variant.name == "mlp_32"], prepared.dataset)
    assert [r.status for r in records] == [RunStatus.DONE] * 2, records[0].error
    assert got == sorted(got) and got[-1] == 1.0
    if fused:  # 32 steps a call: one report inside the first epoch, after the first call
        assert [r.metrics["steps_per_execution"] for r in records] == [32, 32]
        assert [f for f in got if f < 0.5] == [0.25], got
        assert got.count(0.5) == 1  # the epoch's end once, after its validation: not its last call too
    else:  # the builder compiled its model with Keras' default: a call per step, each reported
        assert [r.metrics["steps_per_execution"] for r in records] == [1, 1]
        inside = [f for f in got if f < 0.25]  # the first run's first epoch
        assert inside[:2] == [0.25 / 64, 0.5 / 64] and len(inside) == 63, got
        assert got.count(0.25) == 1  # the first run's epoch end, after Keras' validation, once


def test_a_jax_worker_reports_inside_its_epochs_too(tmp_path: Path, data_dir: Path, backend_trainers) -> None:
    """Real JAX, in a worker process of its own (Keras may run the reporting callback
    asynchronously there): the same reports as on TensorFlow, each call of the train function but
    an epoch's last, and each epoch's end once."""
    pytest.importorskip("jax")
    from backend_worker import BackendTrainer

    text = tiny_sweep_text(seeds=2, train=4500, test=100).replace("epochs: 1", "epochs: 2")
    spec = load_sweep(write_sweep(tmp_path / "s.yaml", text)).with_overrides(keras_backend="jax")
    prepared = prepare_sweep(spec, data_dir=data_dir)
    if "jax" not in backend_trainers:
        backend_trainers["jax"] = BackendTrainer("jax")
    records, got = backend_trainers["jax"].train_group_reporting(
        [r for r in prepared.runs if r.variant.name == "mlp_32"], prepared
    )
    assert [r.status for r in records] == [RunStatus.DONE] * 2, records[0].error
    assert {r.versions["keras_backend"] for r in records} == {"jax"}
    assert [r.metrics["steps_per_execution"] for r in records] == [32, 32]
    # 64 steps an epoch, 32 a call: after the first call of each epoch, and at each epoch's end
    assert sorted(got) == pytest.approx([0.25, 0.5, 0.75, 1.0]), got
    assert max(got) == got[-1] == 1.0  # the group is done last, after its last validation


def test_a_groups_sink_sends_one_at_a_time_never_backwards_and_nothing_once_closed() -> None:
    """Keras may run the reporting callback in helper threads, in any order: the worker's sink
    sends one message at a time (they share the pipe with the group's records), never a smaller
    fraction than before, and nothing after the worker closed it to send the records."""
    import threading
    import time

    from harness.executor import ProgressSink

    sent: list[float] = []
    inside, overlapped = [0], [False]

    def send(progress) -> None:
        inside[0] += 1
        overlapped[0] |= inside[0] > 1
        time.sleep(0.0005)
        sent.append(progress.done)
        inside[0] -= 1

    sink = ProgressSink(send, 7, every_s=0.0)
    threads = [threading.Thread(target=lambda k=k: [sink((k * 50 + i) / 400) for i in range(50)]) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(sent) == 400 and not overlapped[0]
    assert sent == sorted(sent) and sent[-1] == 399 / 400
    sink.close()
    sink(1.0)
    assert len(sent) == 400


def test_the_end_of_training_is_always_sent_the_rest_at_most_once_a_second() -> None:
    """Per-batch reports are throttled (at most one a second); the first report that the epochs
    are done is sent whatever the throttle says (the ETA times a group's evaluation from it), once."""
    from harness.executor import ProgressSink

    sent: list[float] = []
    sink = ProgressSink(lambda progress: sent.append(progress.done), 3, every_s=3600.0)
    for done in (0.1, 0.5, 0.99, 1.0, 1.0):
        sink(done)
    assert sent == [0.1, 1.0]
