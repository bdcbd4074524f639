"""One compiled optimizer update per step on TensorFlow: faster, and bit-identical to Keras' own.

Keras 3's TensorFlow optimizer updates every variable with its own dozen small ops, one op at a
time over the whole parameter vector. On a five-copy fused MLP (64x5, batch 32, one CPU thread)
Adam's update was 2.7 ms of a 5.8 ms step (SGD without momentum: 3.0 ms). Here the update runs
on one flat vector that holds every trainable variable, compiled by XLA into one loop: 3.3 ms.

The flat vector is the parameters' master copy: it is read from the variables when the optimizer
is built (built inside Keras' first trace, where the variables have no value yet: at the first
step) and again by `read_variables`, which `fused.fit_copies` calls before each epoch; each step
joins the gradients inside the compiled call and writes the updated parts back into the
variables. (Until 2026-12-01 each step also joined every variable into it, and the gradients into
one vector, before the call: 2-8% slower on nine of the notebooks' ten groups,
`benchmarks/bench_master_copy.py`.) Keras itself writes the variables under weight decay and a
moving average (optimizers configured with them keep Keras' own update) and for a variable with a
constraint after each update (then every step reads them all again).

The update's arithmetic is Keras' own (`update_step` of the same optimizer class), so the results
are the same bits, with two conditions this module checks rather than assumes:
- XLA's CPU code generator contracts `a * b + c` into fused multiply-adds (one rounding instead of
  two). TensorFlow's own kernels never do, so a TensorFlow worker caps XLA's CPU instruction set at
  SSE4.2, which has no FMA (`XLA_CPU_FLAG`; on CPU, XLA compiles nothing else in a TensorFlow
  worker: `jit_compile` stays off there). XLA reads its flags once per process, at its first
  compilation; `xla_cpu_flag` sets them for that moment only.
- Before an optimizer configuration is used in a process, a small model (dense, l2, batch norm,
  dropout) is trained for a few steps both ways through Keras' `fit` and the weights are compared
  bit for bit (`verified`). If they differ (XLA already started with other flags, another device),
  Keras' own update is used.

Only optimizers whose update is elementwise can be flattened: per-variable norms (LAMB, clipnorm
on one variable) would mix variables. `FLAT_OPTIMIZERS` names those used: Adam, Keras' default and
the harness's. RMSprop is not one (XLA rewrites its `x / sqrt(y)`, and its compiled update was no
faster), nor is SGD (see there).

TensorFlow is imported only inside these functions; callers reach this module through
`backends.TensorFlowAdapter.optimizer`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from typing import Any, Iterator

# Class names in keras.optimizers; subclasses keep their own update. SGD's flat update is barely
# faster (3.1 against 3.3 ms per step on the five-copy 64x5 MLP) and, trained through `fit`, it
# ended one unit in the last place away from Keras' own on some models and not on others (with or
# without momentum; likely TensorFlow's graph rewrites of its `g * lr`): a check on one small model
# cannot vouch for it, so it is not one.
FLAT_OPTIMIZERS = ("Adam",)


def may_flatten(optimizer_name: str) -> bool:
    """Whether a harness model with this optimizer (a sweep file's name, e.g. "adam") is trained
    with the flat update on TensorFlow, unless the per-process check refuses it (the planner's
    memory estimate counts its parameter copies only then)."""
    return optimizer_name.lower() in {name.lower() for name in FLAT_OPTIMIZERS}


XLA_CPU_FLAG = "--xla_cpu_max_isa=SSE4_2"
_CHECK_EPOCHS = 2  # of 6 steps


@contextlib.contextmanager
def xla_cpu_flag() -> Iterator[None]:
    """`XLA_FLAGS` is `XLA_CPU_FLAG` alone while XLA may read it (its first compilation in this
    process); the environment is restored afterwards, so processes started later do not inherit
    it. A user's own `XLA_FLAGS` (often meant for JAX, whose XLA knows other flags: one unknown
    to TensorFlow's would abort the process) never reached a TensorFlow worker's XLA, which
    compiled nothing before this update, and still does not."""
    before = os.environ.get("XLA_FLAGS")
    os.environ["XLA_FLAGS"] = XLA_CPU_FLAG
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("XLA_FLAGS", None)
        else:
            os.environ["XLA_FLAGS"] = before


def _joined(tensors: list[Any]) -> Any:
    """One flat vector of `tensors`, in order."""
    import tensorflow as tf

    return tf.concat([tf.reshape(t, [-1]) for t in tensors], 0)


@functools.cache
def flat_class(cls: type) -> type:
    """A subclass of Keras optimizer `cls` whose state covers one flat vector of all its variables,
    updated by one XLA-compiled call of `cls.update_step` per step."""
    import keras
    import tensorflow as tf

    class Flat(cls):  # type: ignore[misc, valid-type]
        flat_update = True  # what a run's record says (`metrics.flat_update`)

        def build(self, variables):
            variables = list(variables)
            dtypes = {v.dtype for v in variables}
            if len(dtypes) != 1:
                raise ValueError(f"a flat optimizer update needs one variable dtype, got {sorted(dtypes)}")
            self._flat_members = variables
            self._flat_sizes = [math.prod(v.shape) for v in variables]
            with tf.init_scope():
                self._flat = keras.Variable(
                    tf.zeros([sum(self._flat_sizes)], dtype=dtypes.pop()), trainable=False, name="flat_parameters"
                )
            super().build([self._flat])  # slots (Adam's m and v, SGD's momentum) are flat as well
            for variable in variables:  # Keras checks every step that it knows the variables
                self._trainable_variables_indices[self._var_key(variable)] = 0
            self._trainable_variables = variables
            # Keras writes a constrained variable itself after each update (`apply`): read them all
            # at every step then, as this update did before the master copy.
            self._flat_rejoin = any(getattr(v, "constraint", None) is not None for v in variables)
            # Built inside a trace (Keras builds the optimizer in its first step where it creates
            # the model's variables there too): they have no value to read yet, so the step reads
            # them in the graph, at the first step and after `read_variables` (a flag).
            self._flat_in_graph = tf.inside_function()
            self._flat_read = None
            if self._flat_in_graph:
                with tf.init_scope():  # not a Keras variable: no state to save, not in Keras' lists
                    self._flat_read = tf.Variable(False, trainable=False, name="flat_parameters_read")
            elif not self._flat_rejoin:
                with tf.init_scope():
                    self._flat.assign(_joined([v.value for v in variables]))

            def step(gradients):  # the gradients are joined inside the compiled call, not before it
                self.update_step(_joined(gradients), self._flat, self.learning_rate)

            self._flat_step = tf.function(step, jit_compile=True)

        def read_variables(self):
            """Read the variables into the flat vector again (after a write to them from outside
            the optimizer: `set_weights`, a restore); eager, or at the next step (`_flat_in_graph`)."""
            if not getattr(self, "built", False) or self._flat_rejoin:
                return
            if self._flat_read is not None:
                self._flat_read.assign(False)
            else:
                self._flat.assign(_joined([v.value for v in self._flat_members]))

        def _backend_update_step(self, grads, trainable_variables, learning_rate):
            trainable_variables = list(trainable_variables)
            if [id(v) for v in trainable_variables] != [id(v) for v in self._flat_members]:
                # Keras dropped a variable without a gradient: the flat layout no longer matches.
                raise ValueError("a flat optimizer update needs a gradient for every trainable variable")
            # The flat vector is the parameters' master copy: read from the variables when the
            # optimizer was built (or, built in a trace, at its first step), then only after
            # `read_variables`; at every step where Keras writes a constrained variable itself.
            if self._flat_rejoin:
                self._flat.assign(_joined([v.value for v in trainable_variables]))
            elif self._flat_read is not None:
                def read():
                    self._flat.assign(_joined([v.value for v in trainable_variables]))
                    self._flat_read.assign(True)
                    return tf.constant(True)

                tf.cond(self._flat_read, lambda: tf.constant(False), read)
            self._flat_step(list(grads))
            for variable, part in zip(trainable_variables, tf.split(self._flat.value, self._flat_sizes)):
                variable.assign(tf.reshape(part, variable.shape))

    Flat.__name__ = Flat.__qualname__ = f"Flat{cls.__name__}"
    return Flat


def _train(optimizer: Any) -> list[Any]:
    """A small model's weights after a few steps of `fit` with `optimizer`: a compiled train
    function like a run's, so that TensorFlow's graph rewrites act as they do in training (they
    can round an update differently once its gradient feeds other ops, which eager steps miss)."""
    import keras
    import numpy as np

    rng = np.random.default_rng(20261130)
    x = rng.standard_normal((48, 13)).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, 48)]
    # Every random draw has its own seed: the global one (a run's, set before its models were
    # built) is left as it was.
    inputs = keras.Input((13,))
    hidden = keras.layers.Dense(
        11, activation="relu", kernel_initializer=keras.initializers.GlorotUniform(seed=1),
        kernel_regularizer=keras.regularizers.l2(1e-3),
    )(inputs)
    hidden = keras.layers.BatchNormalization()(hidden)
    hidden = keras.layers.Dropout(0.25, seed=2)(hidden)
    output = keras.layers.Dense(3, activation="softmax", kernel_initializer=keras.initializers.GlorotUniform(seed=3))
    model = keras.Model(inputs, output(hidden))
    model.compile(optimizer=optimizer, loss="categorical_crossentropy", steps_per_execution=2)
    model.fit(x, y, batch_size=8, epochs=_CHECK_EPOCHS, shuffle=False, verbose=0)
    return [np.asarray(w) for w in model.get_weights()]


@functools.cache
def verified(cls: type, config: str) -> bool:
    """Whether the flat compiled update of optimizer `cls` with `config` (JSON) gives the same bits
    as Keras' own update in this process, checked once per configuration."""
    import numpy as np

    settings = json.loads(config)
    try:
        with xla_cpu_flag():
            own = _train(cls.from_config(settings))
            flat = _train(flat_class(cls).from_config(settings))
    except Exception:  # XLA unavailable or refusing the update: Keras' own update it is
        return False
    return all(np.array_equal(a, b) for a, b in zip(own, flat))


def flat_optimizer(optimizer: Any) -> Any:
    """`optimizer` with a flat compiled update where that is verified bit-identical here, else
    `optimizer` itself. Only optimizers never built, without a distribution strategy."""
    import keras
    import tensorflow as tf

    cls = type(optimizer)
    if not any(cls is getattr(keras.optimizers, name) for name in FLAT_OPTIMIZERS):
        return optimizer
    if getattr(optimizer, "built", False) or tf.distribute.has_strategy():
        return optimizer
    config = optimizer.get_config()
    # Keras writes the model's variables itself under weight decay (before each update, even at
    # 0.0) and a moving average (at its overwrite frequency and when `fit` ends); the flat vector,
    # the parameters' master copy between steps, would lose those writes: Keras' own update.
    if config.get("weight_decay") is not None or config.get("use_ema"):
        return optimizer
    try:
        key = check_key(config)
    except TypeError:  # a schedule or callable in the configuration: keep Keras' own update
        return optimizer
    if not verified(cls, key):
        return optimizer
    return flat_class(cls).from_config(config)


def check_key(config: dict[str, Any]) -> str:
    """What `verified` is keyed by: an optimizer's configuration without its name. Keras names
    each new optimizer apart ("adam", "adam_1"...): keyed by name, every group of a worker checked
    again (1.6 s each on one core of this machine) for the same arithmetic."""
    return json.dumps({key: value for key, value in config.items() if key != "name"}, sort_keys=True)
