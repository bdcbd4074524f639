"""The flat compiled optimizer update on TensorFlow (`harness.tf_update`): the same bits as Keras'
own update, used only where a check in the process shows it, and recorded on every run.

Each check runs in a fresh TensorFlow process (XLA reads its flags once per process, and the
pytest process may have started XLA already)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.backends import worker_env

REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("tensorflow")


def _run(script: str, *, extra_env: dict[str, str] | None = None) -> dict:
    env = {**os.environ, **dict(worker_env("tensorflow", threads=1)), "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("XLA_FLAGS", None)
    env.update(extra_env or {})
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


TRAIN_BOTH_WAYS = """
    import json, os
    import numpy as np
    import keras
    from harness import tf_update

    def model():
        keras.utils.set_random_seed(7)
        inputs = keras.Input((12,))
        h = keras.layers.Dense(9, activation="relu", kernel_regularizer=keras.regularizers.l2(1e-3))(inputs)
        h = keras.layers.BatchNormalization()(h)
        h = keras.layers.Dropout(0.3)(h)
        h = keras.layers.Dense(7, activation="relu")(h)
        return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(h))

    rng = np.random.default_rng(3)
    x = rng.standard_normal((96, 12)).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, 96)]
    out = {}
    for name, make in [
        ("adam", lambda: keras.optimizers.Adam(learning_rate=0.01)),
        ("sgd_nesterov", lambda: keras.optimizers.SGD(learning_rate=0.05, momentum=0.9, nesterov=True)),
        ("sgd", lambda: keras.optimizers.SGD(learning_rate=0.05)),
    ]:
        weights, kinds = [], []
        for flat in (False, True):
            optimizer = tf_update.flat_optimizer(make()) if flat else make()
            kinds.append(type(optimizer).__name__)
            m = model()
            m.compile(optimizer=optimizer, loss="categorical_crossentropy", steps_per_execution=4)
            m.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0)
            weights.append(m.get_weights())
        out[name] = {
            "kinds": kinds,
            "equal": all(np.array_equal(a, b) for a, b in zip(*weights)),
            "moved": not all(np.array_equal(a, b) for a, b in zip(weights[0], model().get_weights())),
        }
    # Where Keras creates the variables (and builds the optimizer) in its first trace; a variable
    # with a constraint, which Keras writes itself after each update
    for name, layers in [
        ("adam_unbuilt", lambda: [keras.layers.Dense(7, activation="relu"), keras.layers.Dense(3, activation="softmax")]),
        ("adam_constraint", lambda: [keras.Input((12,)), keras.layers.Dense(7, activation="relu", kernel_constraint=keras.constraints.NonNeg()),
                                     keras.layers.Dense(3, activation="softmax")]),
    ]:
        weights, kinds = [], []
        for flat in (False, True):
            keras.utils.set_random_seed(7)
            m = keras.Sequential(layers())
            optimizer = tf_update.flat_optimizer(keras.optimizers.Adam(learning_rate=0.01)) if flat else keras.optimizers.Adam(learning_rate=0.01)
            kinds.append(type(optimizer).__name__)
            m.compile(optimizer=optimizer, loss="categorical_crossentropy", steps_per_execution=4)
            m.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
            weights.append(m.get_weights())
        out[name] = {"kinds": kinds, "equal": all(np.array_equal(a, b) for a, b in zip(*weights))}

    # Weights written between epochs (here by the epoch's data callback) of `fused.fit_copies`,
    # which has the flat update read them again
    from harness import fused
    from harness.fused import fit_copies

    weights, kinds = [], []
    for flat in (False, True):
        m = model()
        optimizer = tf_update.flat_optimizer(keras.optimizers.Adam(learning_rate=0.01)) if flat else keras.optimizers.Adam(learning_rate=0.01)
        kinds.append(type(optimizer).__name__)
        # the loss metric `fit_copies` reads (without it the copy counts as diverged after epoch 0)
        logged = keras.metrics.MeanMetricWrapper(keras.losses.categorical_crossentropy, name=fused.LOSS_METRIC)
        m.compile(optimizer=optimizer, loss="categorical_crossentropy", metrics=[logged], steps_per_execution=4)
        epochs_seen = []

        def epoch_data(epoch, m=m):
            epochs_seen.append(epoch)
            if epoch == 1:
                m.set_weights([w * 0.5 for w in m.get_weights()])
            return [x], [y]

        fit_copies(m, n_copies=1, epoch_data=epoch_data, epochs=3, batch_size=8)
        weights.append(m.get_weights())
    assert epochs_seen == [0, 1, 2], epochs_seen
    out["adam_written"] = {"kinds": kinds, "equal": all(np.array_equal(a, b) for a, b in zip(*weights))}
    out["xla_flags_after"] = os.environ.get("XLA_FLAGS")
    print(json.dumps(out))
"""


def test_the_flat_update_trains_to_the_same_bits_as_keras_own() -> None:
    out = _run(TRAIN_BOTH_WAYS)
    assert out["adam"]["kinds"] == ["Adam", "FlatAdam"]  # the check passed: the flat update was used
    assert out["adam"]["moved"]  # training changed the weights: the comparison means something
    assert out["adam"]["equal"]  # batch norm, dropout and l2 included
    for name in ("sgd_nesterov", "sgd"):  # not flattened: Keras' own update, trivially the same bits
        assert out[name]["kinds"] == ["SGD", "SGD"] and out[name]["equal"], name
    assert out["xla_flags_after"] is None  # the flag was set only while XLA read it
    # the flat vector reads the variables at the first step, at every step where Keras writes
    # them itself (a constraint), and again after a write between epochs
    for name in ("adam_unbuilt", "adam_constraint", "adam_written"):
        assert out[name] == {"kinds": ["Adam", "FlatAdam"], "equal": True}, name


def _has_fma() -> bool:
    try:
        return " fma " in f" {Path('/proc/cpuinfo').read_text()} ".replace("\n", " ")
    except OSError:
        return False


@pytest.mark.skipif(not _has_fma(), reason="the CPU has no fused multiply-add: XLA cannot round differently")
def test_an_xla_started_with_other_flags_keeps_keras_own_update() -> None:
    # XLA read its flags before the check (here: FMA allowed, so it contracts a * b + c and rounds
    # once): the check sees other bits and Keras' own update is kept.
    out = _run(
        """
        import json, os
        import tensorflow as tf
        import keras
        from harness import tf_update

        os.environ["XLA_FLAGS"] = "--xla_cpu_max_isa=AVX2"
        tf.function(lambda x: x * 2.0 + 1.0, jit_compile=True)(tf.constant([1.0]))
        print(json.dumps({"adam": type(tf_update.flat_optimizer(keras.optimizers.Adam())).__name__}))
        """
    )
    assert out == {"adam": "Adam"}


CHOICES = """
    import json, keras
    import tensorflow as tf
    from harness import tf_update

    out = {}
    # The global seed: a run's is set before its models are built, its optimizer made after them.
    keras.utils.set_random_seed(5)
    keras.random.uniform((3,))
    expected = keras.random.uniform((3,)).numpy().tolist()
    keras.utils.set_random_seed(5)
    keras.random.uniform((3,))
    adam = tf_update.flat_optimizer(keras.optimizers.Adam())
    out["seed_kept"] = keras.random.uniform((3,)).numpy().tolist() == expected

    class MyAdam(keras.optimizers.Adam):
        pass

    built = keras.optimizers.Adam()
    built.build([keras.Variable([1.0, 2.0])])
    candidates = {
        "rmsprop": keras.optimizers.RMSprop(momentum=0.9),
        "sgd": keras.optimizers.SGD(momentum=0.9),
        "subclass": MyAdam(),
        "built": built,
        # Keras writes the variables itself here (the flat vector, read once, would lose it)
        "weight_decay": keras.optimizers.Adam(weight_decay=0.004),
        "ema": keras.optimizers.Adam(use_ema=True),
        "adam": keras.optimizers.Adam(learning_rate=0.003),
    }
    out["kinds"] = {k: type(tf_update.flat_optimizer(v)).__name__ for k, v in candidates.items()}
    # Another group's optimizer: a new name ("adam_3"), the same arithmetic, checked once.
    before = tf_update.verified.cache_info().misses
    again = [tf_update.flat_optimizer(keras.optimizers.Adam()) for _ in range(2)]
    out["again"] = [type(o).__name__ for o in again]
    out["checks_again"] = tf_update.verified.cache_info().misses - before
    out["names_differ"] = len({o.name for o in again}) == 2

    a, b = keras.Variable([1.0, 2.0]), keras.Variable([3.0])
    adam.apply([tf.constant([0.1, 0.2]), tf.constant([0.3])], [a, b])
    try:
        adam.apply([tf.constant([0.1, 0.2]), None], [a, b])
        out["skip_error"] = ""
    except ValueError as exc:
        out["skip_error"] = str(exc)
    out["adam"] = type(adam).__name__
    print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def choices() -> dict:
    """One TensorFlow process for the checks below, with a user's `XLA_FLAGS` holding a flag that
    TensorFlow's XLA does not know (it would abort the process at its first compilation)."""
    return _run(CHOICES, extra_env={"XLA_FLAGS": "--xla_no_such_flag_anywhere=1"})


def test_a_users_xla_flags_do_not_reach_the_check(choices: dict) -> None:
    assert choices["adam"] == "FlatAdam"


def test_the_check_leaves_the_global_seed_alone(choices: dict) -> None:
    assert choices["seed_kept"]


def test_only_checked_optimizers_and_fresh_ones_are_flattened(choices: dict) -> None:
    assert choices["kinds"] == {"rmsprop": "RMSprop", "sgd": "SGD", "subclass": "MyAdam", "built": "Adam",
                                "weight_decay": "Adam", "ema": "Adam", "adam": "FlatAdam"}


def test_each_configuration_is_checked_once_per_process_whatever_the_optimizers_name(choices: dict) -> None:
    assert choices["names_differ"] and choices["again"] == ["FlatAdam", "FlatAdam"]
    assert choices["checks_again"] == 0  # Adam() was checked above, under another name


def test_a_flat_update_refuses_a_step_that_skips_a_variable(choices: dict) -> None:
    # Keras drops a variable without a gradient; the flat layout would then be wrong, so it stops.
    assert "needs a gradient for every trainable variable" in choices["skip_error"]


def test_the_flag_context_restores_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.tf_update import XLA_CPU_FLAG, xla_cpu_flag

    monkeypatch.delenv("XLA_FLAGS", raising=False)
    with xla_cpu_flag():
        assert os.environ["XLA_FLAGS"] == XLA_CPU_FLAG
    assert "XLA_FLAGS" not in os.environ
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # a user's, for JAX
    with xla_cpu_flag():
        assert os.environ["XLA_FLAGS"] == XLA_CPU_FLAG
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"


def test_the_planner_expects_the_flat_update_exactly_where_the_worker_flattens(choices: dict) -> None:
    """The fusion width's memory estimate (`fusion.flat_update_planned`) reads the sweep file's
    optimizer name; the worker flattens by Keras class (`choices`, one real TensorFlow process)."""
    import typing

    from harness.spec import Optimizer
    from harness.tf_update import may_flatten

    names = typing.get_args(Optimizer.model_fields["name"].annotation)
    assert set(names) <= set(choices["kinds"])  # every optimizer a sweep file may name is checked
    for name in names:
        assert may_flatten(name) == choices["kinds"][name].startswith("Flat"), name
