"""Train one run, with Keras APIs only; what differs between backends is in `harness.backends`.

The only module (with `backends`) that imports Keras and its backend, inside its functions.
"""

from __future__ import annotations

import dataclasses
import math
import time
import traceback
from typing import Any

from harness import __version__, heartbeat
from harness.data import Dataset, prepare_inputs, prepare_targets, split_sizes
from harness.fused import HISTORY_KEYS
from harness.plan import PlannedRun
from harness.records import RunFlag, RunRecord, RunStatus, utcnow
from harness.spec import Optimizer

NEAR_CHANCE_FACTOR = 1.5  # accuracy below 1.5x chance level is flagged as a collapse
# steps_per_execution: run this many examples per host round trip (small batches were dispatch
# bound: MLP 64-64 batch 32 trained 7x faster per epoch under TensorFlow with 32 steps per
# execution, benchmarks/bench_backends.py); never more steps than an epoch has.
EXAMPLES_PER_EXECUTION = 2048
MAX_STEPS_PER_EXECUTION = 64
# Keras' JAX trainer unrolls an execution's steps into one compiled program, whose compile time
# grows with them (5 fused MLP copies x 64 steps had not compiled after 10 minutes): there a step
# of more than this (the CNN at batch 128: ~8 GFLOP) runs alone. TensorFlow runs an execution as
# a loop (no cost per step to compile) and gains from it on compute-bound steps too; Keras'
# PyTorch trainer takes only 1.
FLOPS_PER_EXECUTION = 1e9
EVAL_BATCH_SIZE = 2048  # evaluation has no updates: large batches, few round trips


def warm_up(*, skip_integrations: bool = True) -> None:
    """Import Keras and its backend once, when a worker starts, and apply the worker's settings
    (threads, GPU memory sharing) through the backend's adapter. With `skip_integrations` Keras is
    imported without the integrations a sweep's worker does not use (`backends.import_keras_for_worker`)."""
    from harness.backends import adapter, import_keras_for_worker

    if skip_integrations:
        import_keras_for_worker()
    adapter()


def make_optimizer(spec: Optimizer, *, flat_update: bool = False):
    """The Keras optimizer of `spec`. With `flat_update`, in the form that computes the same bits
    fastest on this backend (`Adapter.optimizer`; TensorFlow: one compiled update of all variables,
    `harness.tf_update`): only for the harness's own models, whose every trainable variable gets a
    gradient at every step (a user's model may hold one that does not, which Keras skips)."""
    import keras

    from harness.backends import adapter

    kwargs: dict[str, Any] = {}
    if spec.learning_rate is not None:
        kwargs["learning_rate"] = spec.learning_rate
    if spec.name == "adam":
        optimizer = keras.optimizers.Adam(**kwargs)
    elif spec.name == "rmsprop":
        optimizer = keras.optimizers.RMSprop(momentum=spec.momentum, **kwargs)
    else:
        optimizer = keras.optimizers.SGD(momentum=spec.momentum, nesterov=spec.nesterov, **kwargs)
    return adapter().optimizer(optimizer) if flat_update else optimizer


def library_versions() -> dict[str, str]:
    """harness, Python, NumPy, Keras, the Keras backend's name and its library's version."""
    from harness.backends import adapter

    return adapter().versions()


def device_label() -> str:
    """The device this process trains on (fixed for a worker's life: its pinning env is set first)."""
    from harness.backends import adapter

    return adapter().device_label()


@dataclasses.dataclass(frozen=True)
class PreparedInputs:
    """A run's arrays, scaled and shaped once per worker and kept for its next runs (read-only
    NumPy; a fused group puts its training inputs on the device, `models.fed_by_rows`)."""

    x_fit: Any
    y_fit: Any
    x_val: Any | None
    y_val: Any | None
    x_test: Any
    y_test: Any

    @property
    def validation(self) -> tuple[Any, Any] | None:
        return None if self.x_val is None else (self.x_val, self.y_val)

    @property
    def n_fit(self) -> int:
        return len(self.x_fit)


_PREPARED: dict[tuple, PreparedInputs] = {}


def prepared_inputs(
    dataset: Dataset, *, preprocess: str, images: bool, loss: str, validation_split: float
) -> PreparedInputs:
    """Scaled inputs (`images`: N,H,W,C; else flat) and targets for `loss` of `dataset`, the last
    `validation_split` of the training arrays held out (`data.split_sizes`). Cached for the
    worker's next runs."""
    key = (dataset.fingerprint, preprocess, images, loss, validation_split)
    if key not in _PREPARED:
        if len(_PREPARED) >= 2:
            _PREPARED.pop(next(iter(_PREPARED)))
        x_all = prepare_inputs(dataset.x_train, preprocess=preprocess, images=images)
        y_all = prepare_targets(dataset.y_train, loss=loss, num_classes=dataset.num_classes)
        x_test = prepare_inputs(dataset.x_test, preprocess=preprocess, images=images)
        y_test = prepare_targets(dataset.y_test, loss=loss, num_classes=dataset.num_classes)
        n_fit, n_val = split_sizes(len(x_all), validation_split)
        arrays = [x_all[:n_fit], y_all[:n_fit], x_all[n_fit:] if n_val else None, y_all[n_fit:] if n_val else None, x_test, y_test]
        for array in arrays:
            if array is not None:
                array.setflags(write=False)
        _PREPARED[key] = PreparedInputs(*arrays)
    return _PREPARED[key]


@dataclasses.dataclass(frozen=True)
class FitOptions:
    steps_per_execution: int
    eval_batch_size: int  # the largest evaluation batch
    validation_batch_size: int
    test_batch_size: int


def even_batches(n: int, largest: int) -> int:
    """A batch size of at most `largest` that cuts `n` examples into equal batches where it can
    (10,000 -> 5 x 2,000, not 4 x 2,048 + 1,808): each distinct batch shape is one more compile
    under XLA (JAX), so evaluation sees one shape instead of two."""
    if n <= 0:
        return largest
    return math.ceil(n / math.ceil(n / largest))


# Build a compiled model's state before its first fit or evaluate (`build_compiled_state`), so that
# TensorFlow traces each step function once, not twice (off: Keras' own order, for comparison).
BUILD_STATE_AHEAD = True


def build_compiled_state(model: Any, x: Any, y: Any) -> None:
    """Create a compiled model's metric, loss-tracker and optimizer variables before its first
    `fit` or `evaluate`, from one row of `x` and `y` as those calls are fed them (their shapes
    only). Keras' JAX and PyTorch trainers do this themselves (`_symbolic_build`); its TensorFlow
    trainer without a distribution strategy leaves it to the first trace of its step function,
    and a `tf.function` whose first trace created variables is traced again: one more trace of
    the whole step, 0.8-1.0 s per fused group of the notebooks' MLPs on this CPU
    (`benchmarks/bench_trace.py`). The variables are the same and start at the same zeros, so
    training is the same to the bit (tested). A model not built yet (a user's Sequential without
    an `Input`) is left to Keras, which builds it from the batches it is fed. `_symbolic_build`
    is Keras' private method: if it goes, or fails, the step is traced twice as before (the
    trace count is tested on TensorFlow)."""
    import keras

    build = getattr(model, "_symbolic_build", None)
    if not BUILD_STATE_AHEAD or keras.backend.backend() != "tensorflow" or build is None:
        return
    if getattr(model, "_distribute_strategy", None) or not getattr(model, "built", False):
        return
    try:
        head = keras.tree.map_structure(lambda a: a[:1], (x, y))
        build(data_batch=(head[0], head[1], None))
    except Exception:  # noqa: BLE001 - a model Keras cannot build ahead (a user's): its first trace does
        pass


def fit_options(
    *, backend: str, batch_size: int, n_fit: int, n_val: int = 0, n_test: int = 0, train_flops_per_example: int = 0
) -> FitOptions:
    """How a run is driven on Keras backend `backend`: `steps_per_execution` so that small steps
    are not dispatch bound (each host round trip trains about `EXAMPLES_PER_EXECUTION` examples,
    at most an epoch's steps; on JAX no more steps than make `FLOPS_PER_EXECUTION` when the
    model's FLOPs are known, its compile time grows with them; on PyTorch 1, all Keras takes),
    and large, even evaluation batches. Neither changes the updates: the same batches in the same
    order."""
    from harness.backends import BACKENDS

    if backend not in BACKENDS:
        raise ValueError(f"no Keras backend {backend!r} (one of {', '.join(BACKENDS)})")
    steps_per_epoch = max(1, math.ceil(n_fit / batch_size))
    spe = min(MAX_STEPS_PER_EXECUTION, steps_per_epoch, EXAMPLES_PER_EXECUTION // batch_size)
    if backend == "jax" and train_flops_per_example > 0:
        spe = min(spe, math.ceil(FLOPS_PER_EXECUTION / (train_flops_per_example * batch_size)))
    if backend == "torch":
        spe = 1
    spe = max(1, spe)
    largest = max(batch_size, EVAL_BATCH_SIZE)
    return FitOptions(
        steps_per_execution=spe,
        eval_batch_size=largest,
        validation_batch_size=even_batches(n_val, largest),
        test_batch_size=even_batches(n_test, largest),
    )


def check_backend(run: PlannedRun) -> None:
    """A run planned for one Keras backend never trains on another (Keras cannot switch in a process)."""
    import keras

    loaded = keras.backend.backend()
    if loaded != run.backend.backend:
        raise RuntimeError(
            f"this run is planned for Keras backend '{run.backend.backend}' but this process runs Keras on "
            f"'{loaded}' (KERAS_BACKEND is read once, when Keras is first imported)"
        )


def _floats(values) -> list[float]:
    return [float(v) for v in values]


def train_run(run: PlannedRun, dataset: Dataset) -> RunRecord:
    """Seed, build, compile, fit, evaluate. Any exception becomes a FAILED record, never a crash.

    A run trains as a group of one (`harness.fused.train_group`): the same program, data order and
    records as a copy of a fused group."""
    from harness.fused import train_group

    return train_group([run], dataset)[0]


def train_compiled_builder(run: PlannedRun, dataset: Dataset, *, not_fused: str = "") -> RunRecord:
    """One run of a builder's model that cannot be a fused copy (`fused.builder_trains_alone`:
    compiled by the user, or several inputs or outputs; `fused.copies_share_state`): built after
    the run's seed, compiled by the harness only when the user did not, fitted with Keras' own
    shuffle (seeded), evaluated. `not_fused` (why) is recorded as `metrics.not_fused`. Any
    exception becomes a FAILED record."""
    started_at = utcnow()
    start = time.perf_counter()
    versions: dict[str, str] = {"harness": __version__}
    device = ""
    try:
        import keras

        from harness.backends import adapter

        backend = adapter()
        check_backend(run)
        versions = backend.versions()
        device = backend.device_label()
        config = run.variant.model
        from harness.builders import build_builder_model, builder_function, target_loss

        function = builder_function(config, root=run.variant.code_root)  # imported before the seed
        backend.seed(run.seed)
        if run.deterministic:
            backend.enable_determinism()
        model = build_builder_model(
            config, root=run.variant.code_root, input_shape=dataset.image_shape, num_classes=dataset.num_classes,
            function=function,
        )
        images, loss_kind = config.inputs == "images", target_loss(model, config.loss)
        inputs = prepared_inputs(
            dataset, preprocess=config.preprocess, images=images, loss=loss_kind, validation_split=run.variant.validation_split
        )
        options = fit_options(
            backend=run.backend.backend,
            batch_size=run.variant.batch_size,
            n_fit=inputs.n_fit,
            n_val=0 if inputs.x_val is None else len(inputs.x_val),
            n_test=len(inputs.x_test),
            train_flops_per_example=run.summary.train_flops(examples=1, epochs=1),
        )

        compiled_by_user = bool(getattr(model, "compiled", False))
        if not compiled_by_user:
            accuracy = (
                keras.metrics.SparseCategoricalAccuracy(name="accuracy")
                if config.loss == "sparse_categorical_crossentropy"
                else keras.metrics.CategoricalAccuracy(name="accuracy")
            )
            model.compile(
                optimizer=make_optimizer(config.optimizer),
                loss=config.loss,
                metrics=[accuracy],
                steps_per_execution=options.steps_per_execution,
            )
        build_compiled_state(model, inputs.x_fit, inputs.y_fit)
        built = time.perf_counter()
        fit = model.fit(
            inputs.x_fit,
            inputs.y_fit,
            epochs=run.variant.epochs,
            batch_size=run.variant.batch_size,
            validation_data=inputs.validation,
            validation_batch_size=options.validation_batch_size,
            shuffle=True,
            verbose=0,
            callbacks=[keras.callbacks.TerminateOnNaN()] + progress_callbacks(
                keras, epochs=run.variant.epochs, steps_per_epoch=math.ceil(len(inputs.x_fit) / run.variant.batch_size)
            ),
        )
        trained = time.perf_counter()
        if compiled_by_user:
            from harness.builders import evaluate_compiled, normalized_history

            test_loss, test_accuracy = evaluate_compiled(
                model, inputs.x_test, inputs.y_test, dataset.y_test, batch_size=options.test_batch_size
            )
            fit_history = normalized_history(fit.history)
        else:
            test_loss, test_accuracy = model.evaluate(
                inputs.x_test, inputs.y_test, batch_size=options.test_batch_size, verbose=0
            )
            fit_history = fit.history
        finished = time.perf_counter()

        return trained_record(
            run,
            test_accuracy=float(test_accuracy),
            test_loss=float(test_loss),
            history={key: _floats(values) for key, values in fit_history.items()},
            params=int(model.count_params()),
            n_fit=inputs.n_fit,
            train_s=trained - built,
            # a model its builder compiled keeps its own (Keras' default: 1)
            steps_per_execution=int(getattr(model, "steps_per_execution", None) or options.steps_per_execution),
            num_classes=dataset.num_classes,
            started_at=started_at,
            timings={"setup_s": built - start, "train_s": trained - built, "eval_s": finished - trained,
                     "wall_s": finished - start},
            device=device,
            versions=versions,
            extra_metrics={"fused": 1, **({"not_fused": not_fused} if not_fused else {})},
        )
    except Exception:  # noqa: BLE001 - a failed run is a record, the sweep goes on
        return run.record(
            RunStatus.FAILED,
            started_at=started_at,
            timings={"wall_s": time.perf_counter() - start},
            device=device,
            versions=versions,
            error=traceback.format_exc(),
            finished_at=utcnow(),
        )
    finally:
        release_memory()


def trained_record(
    run: PlannedRun,
    *,
    test_accuracy: float,
    test_loss: float,
    history: dict[str, list[float]],
    params: int,
    n_fit: int,
    train_s: float,
    steps_per_execution: int,
    num_classes: int,
    started_at: str,
    timings: dict[str, float],
    device: str,
    versions: dict[str, str],
    diverged: bool = False,
    extra_metrics: dict[str, Any] | None = None,
) -> RunRecord:
    """The record of a run that trained to the end (alone or as a copy of a fused group): DIVERGED
    when its loss stopped being finite or it ran fewer epochs than asked (the history ends there),
    else DONE, flagged NEAR_CHANCE below 1.5x chance level."""
    epochs_ran = len(history.get("loss", []))
    diverged = (
        diverged
        or not math.isfinite(test_loss)
        or any(not math.isfinite(v) for v in history.get("loss", []))
        or epochs_ran < run.variant.epochs
    )
    flops = run.estimated_train_flops * epochs_ran // max(1, run.variant.epochs)
    metrics: dict[str, Any] = {
        "test_accuracy": float(test_accuracy),
        "test_loss": float(test_loss),
        "params": params,
        "epochs_ran": epochs_ran,
        "estimated_train_flops": flops,
        "train_flops_per_s": flops / train_s if train_s > 0 else None,
        "examples_per_s": n_fit * epochs_ran / train_s if train_s > 0 else None,
        "steps_per_execution": steps_per_execution,
        **(extra_metrics or {}),
    }
    for key in HISTORY_KEYS:
        if history.get(key):
            metrics[f"final_{key}"] = history[key][-1]
    flags: tuple[RunFlag, ...] = ()
    if not diverged and test_accuracy < NEAR_CHANCE_FACTOR / num_classes:
        flags = (RunFlag.NEAR_CHANCE,)
    return run.record(
        RunStatus.DIVERGED if diverged else RunStatus.DONE,
        started_at=started_at,
        metrics=metrics,
        history=history,
        timings=timings,
        device=device,
        versions=versions,
        error="loss became NaN or infinite" if diverged else None,
        flags=flags,
        finished_at=utcnow(),
    )


def progress_callbacks(
    keras: Any, *, epochs: int, steps_per_epoch: int, first_epoch: int = 0, epoch_ends: bool = True
) -> list[Any]:
    """A Keras callback (in a list; none when no one listens, `heartbeat.listening`) that reports
    the fraction of `epochs` done (`harness.heartbeat`: the ETA of a long group before it
    finishes) after each call of the train function (`steps_per_execution` steps) and after each
    epoch, so that a group is paced from its first seconds, not from its first epoch's end (a CNN
    epoch of the conv table takes minutes on a CPU). An epoch's last call is not reported: its
    end is, after its validation (`epoch_ends`; False where the caller validates after `fit` and
    reports then, `fused.fit_copies`), so that a group is never said done before its last
    validation. `first_epoch`: the epoch the fit's first epoch is (a fused group fits epoch by
    epoch). Marked safe for Keras' asynchronous dispatch, so adding it changes nothing in how
    Keras steps: it reads only the step's index (the sink takes reports in any order)."""
    if not heartbeat.listening():
        return []
    epochs, steps = max(1, epochs), max(1, steps_per_epoch)

    class Progress(keras.callbacks.Callback):
        async_safe = True

        def __init__(self) -> None:
            super().__init__()
            self.epoch = first_epoch

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.epoch = first_epoch + epoch

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if batch + 1 < steps:
                heartbeat.report((self.epoch + (batch + 1) / steps) / epochs)

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            if epoch_ends:
                heartbeat.report((first_epoch + epoch + 1) / epochs)

    return [Progress()]


def release_memory() -> None:
    """Drop the Keras state of the last run of a long-lived worker (the backend's adapter: on a
    GPU a full clear that gives the memory back, on CPU a cheap one)."""
    try:
        from harness.backends import adapter

        adapter().release()
    except Exception:  # noqa: BLE001 - best effort
        pass


def measure_peak_flops(*, size: int | None = None, repeats: int = 10) -> dict[str, Any]:
    """Time a large float32 matmul on this process's device with its Keras backend: the peak
    that MFU is measured against (on CPU all the threads the backend is given, on GPU the first)."""
    from harness.backends import adapter

    return adapter().peak_flops(size=size, repeats=repeats)
