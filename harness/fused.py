"""Fused seed training (worker side): K runs of one variant, each with its own seed, trained as
ONE Keras program (`harness.models.build_fused`): K independent copies, each initialised from its
own seed, fed its own per-epoch permutation of the data (`epoch_order`), with its own dropout
masks and batch-norm statistics. The loss is the sum of the copies' losses, so each copy's
gradients, and its Adam/RMSprop/SGD state (per parameter), are exactly its own. Each copy keeps
its own history, NaN detection (a diverging copy is DIVERGED; the others train on) and test
evaluation, and becomes its own `RunRecord`.

A group of one is a plain single run: `train.train_run` trains every run through
`train_group([run])`, so a run's result does not depend on the group it trained in (up to float
summation order). A builder's model (the user's own Keras code) fuses the same way, the builder
called once per copy after that copy's seed, unless the user compiled it, it does not take one
input to one output (`builder_trains_alone`) or its copies share state (`copies_share_state`):
those runs train one at a time (`train.train_compiled_builder`).
"""

from __future__ import annotations

import dataclasses
import math
import time
import traceback
from typing import Any, Callable, Sequence

import numpy as np

from harness import __version__, heartbeat
from harness.architecture import model_layout, uses_images
from harness.data import Dataset
from harness.plan import PlannedRun
from harness.records import RunRecord, RunStatus, utcnow

HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")
# A copy's loss is logged by a metric of its own (the same function as its loss): Keras' own
# per-output loss trackers average partial batches differently from its total loss, so a copy's
# logged loss would depend on whether it trained alone or fused. The metric averages per example.
LOSS_METRIC = "copy_loss"
_LOGGED = {"loss": LOSS_METRIC, "accuracy": "accuracy"}
# Training inputs up to this size are held on the device once per group and fed by row number
# (`models.fed_by_rows`): no per-epoch copy of each copy's permuted inputs on the host, no host to
# device transfer per batch (MLP 64x5 on raw MNIST, 5 copies, batch 32: the host copies alone took
# 2 s of each 5 s epoch under JAX on one core). Larger data sets are fed from host memory as before.
DEVICE_INPUTS_MAX_BYTES = 2 * 2**30
# On a GPU worker told its share of the device's memory (`backends.DEVICE_MEMORY_ENV`), the inputs
# are held there only if they take at most this part of it: the rest is for the copies (several
# workers share a GPU, each with its own copy of the inputs).
DEVICE_INPUTS_SHARE = 0.5
# A vocabulary group's optimizer updates all its variables in one compiled call where that gives
# Keras' own bits (`train.make_optimizer`, `harness.tf_update`: TensorFlow and Adam). Measured
# one group at a time on one core, one epoch (benchmarks/bench_flat_update.py): training 1.3-1.7x
# faster for the notebooks' small MLPs, 1.02-1.25x for their larger MLPs and CNN, the same bits.
# False: Keras' own update everywhere (for benchmarks). A builder's model always keeps Keras' own.
FLAT_UPDATE = True
# After a group that held at least this much on the device, a full garbage collection (about
# 0.2 s with Keras loaded): its models are reference cycles old enough to sit in the oldest
# generation, which the worker's cheap release does not reach, and they hold the device copy.
FULL_COLLECT_BYTES = 64 * 2**20


def device_inputs_limit(memory_bytes: int | None) -> int:
    """The largest training inputs (bytes) a group holds on its device: `DEVICE_INPUTS_MAX_BYTES`,
    and on a GPU worker with `memory_bytes` of its device at most `DEVICE_INPUTS_SHARE` of that.
    The planner (`fusion.inputs_on_device`) and the worker apply the same rule to the same figure."""
    if memory_bytes is None:
        return DEVICE_INPUTS_MAX_BYTES
    return min(DEVICE_INPUTS_MAX_BYTES, int(memory_bytes * DEVICE_INPUTS_SHARE))


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which a run of `seed` sees its `n` training examples in `epoch`: a pure
    function of (seed, epoch), the same whether the run trains alone or fused."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def check_group(runs: Sequence[PlannedRun]) -> None:
    """A group is runs of one variant (same model, budget, data and backend), distinct seeds."""
    if not runs:
        raise ValueError("a group needs at least one run")
    first = runs[0]
    for run in runs[1:]:
        if (run.variant.variant_id, run.backend.backend, run.dataset.get("fingerprint")) != (
            first.variant.variant_id,
            first.backend.backend,
            first.dataset.get("fingerprint"),
        ):
            raise ValueError(f"runs of different variants cannot be fused: {first.variant.name} and {run.variant.name}")
    seeds = [run.seed for run in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"a fused group trains distinct seeds (got {seeds})")


@dataclasses.dataclass(frozen=True)
class CopyResult:
    """What one copy of a fused model did: its per-epoch history (up to and including the first
    epoch whose loss was not finite), the epoch it diverged in (None: never), its test metrics."""

    history: dict[str, list[float]]
    diverged_at: int | None
    test_loss: float
    test_accuracy: float


def _copy_logs(logs: dict[str, Any], index: int, n_copies: int) -> dict[str, float]:
    """Copy `index`'s values out of Keras' logs (`c0_loss`...; a single output logs `loss`)."""
    from harness.models import copy_name

    out = {}
    for key in HISTORY_KEYS:
        val, name = (True, key[4:]) if key.startswith("val_") else (False, key)
        own = _LOGGED[name] if n_copies == 1 else f"{copy_name(index)}_{_LOGGED[name]}"
        own = f"val_{own}" if val else own
        if own in logs:
            value = logs[own]
            out[key] = float(value[-1] if isinstance(value, list) else value)
    return out


def _take(array: Any, order: np.ndarray) -> Any:
    if isinstance(array, np.ndarray):
        return array[order]
    from keras import ops

    return ops.take(array, order, axis=0)


def compile_fused(
    model: Any,
    copies: Sequence[Any],
    layout: Any,
    *,
    loss: str,
    optimizer: Any,
    steps_per_execution: int = 1,
    builder: bool = False,
) -> None:
    """Compile a fused model: one loss per copy and one accuracy per copy; Keras sums the losses.
    Vocabulary copies (built without layer regularizers) carry their penalty in their own loss
    (`models.copy_loss`); a builder's copies keep their layers' regularizers, whose penalties
    Keras adds to the total. Each copy's loss metric is its data loss per example; its penalty
    is added between epochs (`fit_copies`, `evaluate_copies`, `models.copy_penalty`)."""
    import keras

    from harness.models import copy_loss, data_loss

    def accuracy():
        if loss == "sparse_categorical_crossentropy":
            return keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        return keras.metrics.CategoricalAccuracy(name="accuracy")

    names = [copy.name for copy in copies]
    if builder:
        losses = {name: data_loss(loss, name) for name in names}
    else:
        losses = {name: copy_loss(loss, copy, layout) for name, copy in zip(names, copies)}
    model.compile(
        optimizer=optimizer,
        loss=losses,
        metrics={
            name: [accuracy(), keras.metrics.MeanMetricWrapper(data_loss(loss, name), name=LOSS_METRIC)]
            for name in names
        },
        steps_per_execution=steps_per_execution,
    )


def fit_copies(
    model: Any,
    *,
    n_copies: int,
    epoch_data: Callable[[int], tuple[list[Any], list[Any]]],
    epochs: int,
    batch_size: int,
    validation: tuple[Any, Any] | None = None,
    eval_batch_size: int | None = None,
    penalties: Sequence[Callable[[], float]] | None = None,
    eval_model: Any = None,
) -> tuple[list[dict[str, list[float]]], list[int | None]]:
    """Train a compiled fused model epoch by epoch; `epoch_data(e)` gives each copy's inputs (or,
    for a model `models.fed_by_rows`, its row numbers) and targets for epoch e, already in that
    copy's order (fed unshuffled). After each epoch the copies are evaluated on `validation` by
    `eval_model` (the same copies fed arrays; default `model`), as Keras' own validation would.
    Returns each copy's history and the epoch it diverged in. Training stops early only when
    every copy diverged. A copy's logged loss and validation loss are its data loss plus its
    weight penalty at the epoch's end (`penalties[k]()`, `models.copy_penalty`)."""
    import keras

    from harness.train import build_compiled_state, progress_callbacks

    histories: list[dict[str, list[float]]] = [{} for _ in range(n_copies)]
    diverged: list[int | None] = [None] * n_copies
    judge = model if eval_model is None else eval_model
    # TensorFlow's flat update keeps the parameters' master copy (`harness.tf_update`): it reads
    # the variables again before each epoch, so a write to them between epochs counts
    read_variables = getattr(getattr(model, "optimizer", None), "read_variables", None)
    for epoch in range(epochs):
        xs, ys = epoch_data(epoch)
        if read_variables is not None:
            read_variables()
        x_fit, y_fit = (xs, ys) if n_copies > 1 else (xs[0], ys[0])  # one copy: one input, one output
        if epoch == 0:
            build_compiled_state(model, x_fit, y_fit)
            if validation is not None and judge is not model:
                build_compiled_state(judge, _per_copy(validation[0], n_copies), _per_copy(validation[1], n_copies))
        fit = model.fit(
            x_fit,
            y_fit,
            batch_size=batch_size,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=progress_callbacks(
                keras, epochs=epochs, steps_per_epoch=math.ceil(len(ys[0]) / batch_size), first_epoch=epoch,
                epoch_ends=False,  # said below, after the validation
            ),
        )
        logs = {key: values[-1] for key, values in fit.history.items()}
        if validation is not None:
            x_val, y_val = validation
            scores = judge.evaluate(
                _per_copy(x_val, n_copies),
                _per_copy(y_val, n_copies),
                batch_size=eval_batch_size or batch_size,
                verbose=0,
                return_dict=True,
            )
            logs.update({f"val_{key}": value for key, value in scores.items()})
        for index in range(n_copies):
            if diverged[index] is not None:
                continue
            own = _with_penalty(_copy_logs(logs, index, n_copies), penalties, index)
            for key, value in own.items():
                histories[index].setdefault(key, []).append(value)
            if not math.isfinite(own.get("loss", math.nan)):
                diverged[index] = epoch
        heartbeat.report((epoch + 1) / epochs)
        if all(d is not None for d in diverged):
            break
    return histories, diverged


def _per_copy(array: Any, n_copies: int) -> Any:
    """The same array fed to every copy of a fused model (one input per copy; one copy: the array)."""
    return [array] * n_copies if n_copies > 1 else array


def _with_penalty(logs: dict[str, float], penalties: Sequence[Callable[[], float]] | None, index: int) -> dict[str, float]:
    """A copy's logs with its weight penalty added to its losses (a no-op without penalties)."""
    if not penalties:
        return logs
    penalty = penalties[index]()
    return {key: value + penalty if key in ("loss", "val_loss") else value for key, value in logs.items()}


def evaluate_copies(
    model: Any, *, n_copies: int, x: Any, y: Any, batch_size: int, penalties: Sequence[Callable[[], float]] | None = None
) -> list[tuple[float, float]]:
    """Each copy's (test loss, test accuracy) on the same arrays (its penalty in its loss)."""
    from harness.train import build_compiled_state

    build_compiled_state(model, _per_copy(x, n_copies), _per_copy(y, n_copies))
    logs = model.evaluate(_per_copy(x, n_copies), _per_copy(y, n_copies), batch_size=batch_size, verbose=0,
                          return_dict=True)
    out = []
    for index in range(n_copies):
        own = _with_penalty(_copy_logs(logs, index, n_copies), penalties, index)
        out.append((own.get("loss", math.nan), own.get("accuracy", math.nan)))
    return out


def warm_up() -> None:
    """Import Keras once when a worker starts (the executor calls its trainer module's warm_up)."""
    from harness.train import warm_up as train_warm_up

    train_warm_up()


def builder_trains_alone(model: Any, *, input_shape: tuple[int, ...]) -> str | None:
    """Why a builder's model cannot be a fused copy (None: it can): the user compiled it (its own
    loss, metrics and optimizer are used as they are, `train.train_compiled_builder`), it cannot
    be called on one input, or it gives more than one output. The call builds a model whose
    weights are made on its first call (subclassed, `Sequential` without an `Input`): call it
    right after its copy's seed."""
    if getattr(model, "compiled", False):
        return "compiled by the builder"
    import keras

    try:
        outputs = keras.tree.flatten(model(keras.Input(shape=input_shape)))
    except Exception:  # noqa: BLE001 - the user's model: train it as it is, alone
        return "cannot be called on one input"
    if len(outputs) != 1:
        return "not one output"
    return None


def copies_share_state(models: Sequence[Any]) -> str | None:
    """Why a builder's copies cannot train as one program although each could (None: they can):
    they share a weight (a builder that returns a cached model or reuses module-level layers:
    their seeds would not be independent), or, on PyTorch, two weights have one path (Keras'
    torch backend keys its parameters by path)."""
    import keras

    seen: set[int] = set()
    paths: set[str] = set()
    torch = keras.backend.backend() == "torch"
    for model in models:
        own = {id(w) for w in model.weights}
        if own & seen:
            return "copies share weights"
        seen |= own
        if torch:
            own_paths = {w.path for w in model.weights}
            if own_paths & paths:
                return "weight paths repeat (PyTorch)"
            paths |= own_paths
    return None


def _build_copies(runs: Sequence[PlannedRun], dataset: Dataset, backend: Any) -> tuple[Any, list[Any], Any, bool] | str:
    """The fused model of a group, its copies, the vocabulary layout (None for a builder) and
    whether its inputs are images. Each copy is built right after its own seed: a builder is
    called once per copy (a fresh model each time, its weights made before the next seed), the
    vocabulary built from its layout. Why not, when a builder's models cannot be fused
    (`builder_trains_alone`, `copies_share_state`)."""
    from harness.models import build_fused, fuse_models

    config = runs[0].variant.model
    if config.builder is None:
        layout = model_layout(config, input_shape=dataset.image_shape, num_classes=dataset.num_classes)
        model, copies = build_fused(layout, [run.seed for run in runs], seed_fn=backend.seed)
        return model, copies, layout, uses_images(config)
    from harness.builders import build_builder_model, builder_function, model_input_shape

    input_shape = model_input_shape(config, dataset.image_shape)
    function = builder_function(config, root=runs[0].variant.code_root)  # imported before any seed
    models = []
    for run in runs:
        backend.seed(run.seed)
        model = build_builder_model(
            config, root=run.variant.code_root, input_shape=dataset.image_shape, num_classes=dataset.num_classes,
            function=function,
        )
        alone = builder_trains_alone(model, input_shape=input_shape)
        if alone is not None:
            return alone
        models.append(model)
    shared = copies_share_state(models)
    if shared is not None:
        return shared
    model, copies = fuse_models(models, input_shape=input_shape)
    return model, copies, None, config.inputs == "images"


def train_group(runs: Sequence[PlannedRun], dataset: Dataset) -> list[RunRecord]:
    """Train a group of runs of one variant (distinct seeds) as one fused Keras program; one
    `RunRecord` per run, in the order given. Any exception fails every run of the group (each a
    FAILED record with the traceback), never a crash. A builder's model fuses like the
    vocabulary's unless it cannot (`builder_trains_alone`: then its runs train one after another
    with `train.train_compiled_builder`). The group's models and the inputs it held on the device
    are gone (the helper's frame) before the worker's memory is released for the next group."""
    import gc

    from harness.train import release_memory

    started_at = utcnow()
    start = time.perf_counter()
    about: dict[str, Any] = {"versions": {"harness": __version__}, "device": "", "device_bytes": 0}
    try:
        return _train_fused(runs, dataset, started_at=started_at, start=start, about=about)
    except Exception:  # noqa: BLE001 - failed runs are records, the sweep goes on
        error = traceback.format_exc()
        wall = (time.perf_counter() - start) / max(1, len(runs))
        return [
            run.record(RunStatus.FAILED, started_at=started_at, timings={"wall_s": wall}, device=about["device"],
                       versions=about["versions"], error=error, finished_at=utcnow())
            for run in runs
        ]
    finally:
        release_memory()
        if about["device_bytes"] >= FULL_COLLECT_BYTES:
            gc.collect()


def _train_fused(
    runs: Sequence[PlannedRun], dataset: Dataset, *, started_at: str, start: float, about: dict[str, Any]
) -> list[RunRecord]:
    """The body of `train_group` (`about` receives the versions, the device and the bytes of
    inputs held on it as soon as known)."""
    from harness.models import copy_penalty, fed_by_rows
    from harness.train import check_backend, fit_options, make_optimizer, prepared_inputs, release_memory

    check_group(runs)
    from harness.backends import adapter

    backend = adapter()
    for run in runs:
        check_backend(run)
    about["versions"] = backend.versions()
    about["device"] = backend.device_label()
    versions, device = about["versions"], about["device"]
    first = runs[0]
    if first.deterministic:
        backend.enable_determinism()
    config, variant, n = first.variant.model, first.variant, len(runs)
    built_copies = _build_copies(runs, dataset, backend)
    if isinstance(built_copies, str):  # a builder's model that trains alone, and why
        release_memory()
        from harness.train import train_compiled_builder

        records = []
        for index, run in enumerate(runs):
            with heartbeat.part(index, len(runs)):
                records.append(train_compiled_builder(run, dataset, not_fused=built_copies))
        return records
    model, copies, layout, images = built_copies
    inputs = prepared_inputs(
        dataset,
        preprocess=config.preprocess,
        images=images,
        loss=config.loss,
        validation_split=variant.validation_split,
    )
    options = fit_options(
        backend=first.backend.backend,
        batch_size=variant.batch_size,
        n_fit=inputs.n_fit,
        n_val=0 if inputs.x_val is None else len(inputs.x_val),
        n_test=len(inputs.x_test),
        # a fused step does the work of n copies: JAX's per-execution FLOP cap counts them all
        train_flops_per_example=n * first.summary.train_flops(examples=1, epochs=1),
    )
    optimizer = make_optimizer(config.optimizer, flat_update=FLAT_UPDATE and layout is not None)
    from harness.backends import worker_memory_bytes

    on_device = inputs.x_fit.nbytes <= device_inputs_limit(worker_memory_bytes())
    about["device_bytes"] = inputs.x_fit.nbytes if on_device else 0
    trainer = fed_by_rows(copies, inputs.x_fit) if on_device else model
    compile_fused(
        trainer,
        copies,
        layout,
        loss=config.loss,
        optimizer=optimizer,
        steps_per_execution=options.steps_per_execution,
        builder=layout is None,
    )
    if on_device:  # the model fed arrays evaluates (validation and test); it never steps
        compile_fused(model, copies, layout, loss=config.loss, optimizer="sgd", builder=layout is None,
                      steps_per_execution=options.steps_per_execution)
    penalties = [copy_penalty(copy, layout) for copy in copies]
    built = time.perf_counter()

    def epoch_data(epoch: int) -> tuple[list[Any], list[Any]]:
        orders = [epoch_order(run.seed, epoch, inputs.n_fit) for run in runs]
        ys = [_take(inputs.y_fit, o) for o in orders]
        if on_device:
            return [o.astype(np.int32) for o in orders], ys
        return [_take(inputs.x_fit, o) for o in orders], ys

    histories, diverged_at = fit_copies(
        trainer,
        n_copies=n,
        epoch_data=epoch_data,
        epochs=variant.epochs,
        batch_size=variant.batch_size,
        validation=inputs.validation,
        eval_batch_size=options.validation_batch_size,
        penalties=penalties,
        eval_model=model,
    )
    trained = time.perf_counter()
    tests = evaluate_copies(
        model, n_copies=n, x=inputs.x_test, y=inputs.y_test, batch_size=options.test_batch_size, penalties=penalties
    )
    finished = time.perf_counter()
    params = int(copies[0].count_params())
    results = [CopyResult(h, d, loss, acc) for h, (loss, acc), d in zip(histories, tests, diverged_at)]
    share = {
        "setup_s": (built - start) / n,
        "train_s": (trained - built) / n,
        "eval_s": (finished - trained) / n,
        "wall_s": (finished - start) / n,
    }
    return [
        copy_record(run, result, share=share, group_wall_s=finished - start, n=n, params=params, options=options,
                n_fit=inputs.n_fit, num_classes=dataset.num_classes, started_at=started_at, device=device,
                versions=versions, inputs_on_device=on_device,
                flat_update=bool(getattr(optimizer, "flat_update", False)))
        for run, result in zip(runs, results)
    ]


def copy_record(
    run: PlannedRun,
    result: CopyResult,
    *,
    share: dict[str, float],
    group_wall_s: float,
    n: int,
    params: int,
    options: Any,
    n_fit: int,
    num_classes: int,
    started_at: str,
    device: str,
    versions: dict[str, str],
    inputs_on_device: bool | None = None,
    flat_update: bool | None = None,
) -> RunRecord:
    """The `RunRecord` of one copy of a group: DIVERGED when its loss stopped being finite (its
    history ends at that epoch), else DONE (flagged near chance); timings are its share of the
    group's (`group_wall_s`: the whole group's wall time); `metrics.fused` the group's width and
    `metrics.inputs_on_device` whether its training inputs were held on the device,
    `metrics.flat_update` whether its optimizer updated all variables in one compiled call
    (`harness.tf_update`; the same bits as Keras' own update)."""
    from harness.train import trained_record

    return trained_record(
        run,
        test_accuracy=float(result.test_accuracy),
        test_loss=float(result.test_loss),
        history=result.history,
        params=params,
        n_fit=n_fit,
        train_s=share["train_s"],
        steps_per_execution=options.steps_per_execution,
        num_classes=num_classes,
        started_at=started_at,
        timings={**share, "group_wall_s": group_wall_s},
        device=device,
        versions=versions,
        diverged=result.diverged_at is not None,
        extra_metrics={
            "fused": n,
            **({} if inputs_on_device is None else {"inputs_on_device": inputs_on_device}),
            **({} if flat_update is None else {"flat_update": flat_update}),
        },
    )
