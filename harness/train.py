"""Train one run. The only module that imports TensorFlow/Keras (inside its functions)."""

from __future__ import annotations

import functools
import gc
import math
import os
import platform
import time
import traceback
from typing import Any

from harness import __version__
from harness.architecture import uses_images
from harness.data import Dataset, prepare_inputs, prepare_targets
from harness.plan import PlannedRun
from harness.records import RunFlag, RunRecord, RunStatus, utcnow
from harness.spec import ModelConfig, Optimizer

NEAR_CHANCE_FACTOR = 1.5  # accuracy below 1.5x chance level is flagged as a collapse


def warm_up() -> None:
    """Import TensorFlow and Keras once, when a worker starts, and apply the worker's pinning:
    its thread counts (TF_NUM_INTRAOP_THREADS / TF_NUM_INTEROP_THREADS) and GPU memory growth."""
    import keras  # noqa: F401
    import tensorflow as tf

    intra = os.environ.get("TF_NUM_INTRAOP_THREADS")
    inter = os.environ.get("TF_NUM_INTEROP_THREADS")
    if intra:
        tf.config.threading.set_intra_op_parallelism_threads(int(intra))
    if inter:
        tf.config.threading.set_inter_op_parallelism_threads(int(inter))
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)


def build_model(config: ModelConfig, *, input_shape: tuple[int, ...], num_classes: int):
    """Build the Keras model a `ModelConfig` describes (mirrors `architecture.summarize_model`)."""
    import keras
    from keras import layers

    regularizer = None
    if config.regularizer is not None:
        factory = keras.regularizers.L1 if config.regularizer.kind == "l1" else keras.regularizers.L2
        regularizer = factory(config.regularizer.factor)

    images = uses_images(config)
    if images and len(input_shape) == 2:
        input_shape = (*input_shape, 1)
    if not images:
        input_shape = (math.prod(input_shape),)

    stack: list[Any] = [keras.Input(shape=input_shape)]
    for block in config.conv:
        for filters in block.filters:
            stack.append(
                layers.Conv2D(
                    filters,
                    block.kernel_size,
                    padding=block.padding,
                    activation=None if block.batchnorm else block.activation,
                    kernel_regularizer=regularizer,
                )
            )
            if block.batchnorm:
                stack += [layers.BatchNormalization(), layers.Activation(block.activation)]
        if block.pool == "max":
            stack.append(layers.MaxPooling2D(block.pool_size))
        elif block.pool == "avg":
            stack.append(layers.AveragePooling2D(block.pool_size))
        if block.dropout > 0:
            stack.append(layers.Dropout(block.dropout))
    if images:
        stack.append(layers.Flatten() if config.head == "flatten" else layers.GlobalAveragePooling2D())
    dense = config.dense
    for units, rate in zip(dense.units, dense.dropout_rates()):
        stack.append(
            layers.Dense(units, activation=None if dense.batchnorm else dense.activation, kernel_regularizer=regularizer)
        )
        if dense.batchnorm:
            stack += [layers.BatchNormalization(), layers.Activation(dense.activation)]
        if rate > 0:
            stack.append(layers.Dropout(rate))
    stack.append(layers.Dense(num_classes, activation=config.output_activation, kernel_regularizer=regularizer))
    return keras.Sequential(stack)


def make_optimizer(spec: Optimizer):
    import keras

    kwargs: dict[str, Any] = {}
    if spec.learning_rate is not None:
        kwargs["learning_rate"] = spec.learning_rate
    if spec.name == "adam":
        return keras.optimizers.Adam(**kwargs)
    if spec.name == "rmsprop":
        return keras.optimizers.RMSprop(momentum=spec.momentum, **kwargs)
    return keras.optimizers.SGD(momentum=spec.momentum, nesterov=spec.nesterov, **kwargs)


@functools.cache
def library_versions() -> dict[str, str]:
    import keras
    import numpy
    import tensorflow as tf

    return {
        "harness": __version__,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }


@functools.cache
def device_label() -> str:
    """The device this process trains on (fixed for a worker's life: its pinning env is set first)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        names = []
        for gpu in gpus:
            details = tf.config.experimental.get_device_details(gpu)
            names.append(f"{gpu.name.replace('/physical_device:', '')} {details.get('device_name', '')}".strip())
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return ", ".join(names) + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible else "")
    threads = tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count()
    return f"cpu {platform.machine()} ({threads} threads)"


_PREPARED: dict[tuple, tuple] = {}


def _prepared_arrays(dataset: Dataset, preprocess: str, images: bool, loss: str) -> tuple:
    """Scaled inputs and targets, kept for the next run of a long-lived worker (read-only arrays)."""
    key = (dataset.fingerprint, preprocess, images, loss)
    if key not in _PREPARED:
        if len(_PREPARED) >= 2:
            _PREPARED.pop(next(iter(_PREPARED)))
        arrays = (
            prepare_inputs(dataset.x_train, preprocess=preprocess, images=images),
            prepare_targets(dataset.y_train, loss=loss, num_classes=dataset.num_classes),
            prepare_inputs(dataset.x_test, preprocess=preprocess, images=images),
            prepare_targets(dataset.y_test, loss=loss, num_classes=dataset.num_classes),
        )
        for array in arrays:
            array.setflags(write=False)
        _PREPARED[key] = arrays
    return _PREPARED[key]


def _floats(values) -> list[float]:
    return [float(v) for v in values]


def train_run(run: PlannedRun, dataset: Dataset) -> RunRecord:
    """Seed, build, compile, fit, evaluate. Any exception becomes a FAILED record, never a crash."""
    started_at = utcnow()
    start = time.perf_counter()
    versions: dict[str, str] = {"harness": __version__}
    device = ""
    try:
        import keras
        import tensorflow as tf

        versions = dict(library_versions())
        device = device_label()
        keras.utils.set_random_seed(run.seed)
        if run.deterministic:
            tf.config.experimental.enable_op_determinism()

        config = run.variant.model
        own_model = None  # a builder model (harness/builders.py), built before its data is shaped
        if config.builder is not None:
            from harness.builders import build_builder_model, target_loss

            own_model = build_builder_model(
                config, root=run.variant.code_root, input_shape=dataset.image_shape, num_classes=dataset.num_classes
            )
            images, loss_kind = config.inputs == "images", target_loss(own_model, config.loss)
        else:
            images, loss_kind = uses_images(config), config.loss
        x_all, y_all, x_test, y_test = _prepared_arrays(dataset, config.preprocess, images, loss_kind)
        n_val = int(round(len(x_all) * run.variant.validation_split))
        if n_val:
            x_fit, y_fit = x_all[:-n_val], y_all[:-n_val]
            validation = (x_all[-n_val:], y_all[-n_val:])
        else:
            x_fit, y_fit, validation = x_all, y_all, None

        model = own_model or build_model(config, input_shape=dataset.image_shape, num_classes=dataset.num_classes)
        compiled_by_user = own_model is not None and bool(getattr(own_model, "compiled", False))
        if not compiled_by_user:
            accuracy = (
                keras.metrics.SparseCategoricalAccuracy(name="accuracy")
                if config.loss == "sparse_categorical_crossentropy"
                else keras.metrics.CategoricalAccuracy(name="accuracy")
            )
            model.compile(optimizer=make_optimizer(config.optimizer), loss=config.loss, metrics=[accuracy])
        built = time.perf_counter()
        fit = model.fit(
            x_fit,
            y_fit,
            epochs=run.variant.epochs,
            batch_size=run.variant.batch_size,
            validation_data=validation,
            shuffle=True,
            verbose=0,
            callbacks=[keras.callbacks.TerminateOnNaN()],
        )
        trained = time.perf_counter()
        if compiled_by_user:
            from harness.builders import evaluate_compiled, normalized_history

            test_loss, test_accuracy = evaluate_compiled(
                model, x_test, y_test, dataset.y_test, batch_size=max(run.variant.batch_size, 256)
            )
            fit_history = normalized_history(fit.history)
        else:
            test_loss, test_accuracy = model.evaluate(x_test, y_test, batch_size=max(run.variant.batch_size, 256), verbose=0)
            fit_history = fit.history
        finished = time.perf_counter()

        history = {key: _floats(values) for key, values in fit_history.items()}
        epochs_ran = len(history.get("loss", []))
        train_s = trained - built
        diverged = (
            not math.isfinite(test_loss)
            or any(not math.isfinite(v) for v in history.get("loss", []))
            or epochs_ran < run.variant.epochs
        )
        flops = run.estimated_train_flops * epochs_ran // max(1, run.variant.epochs)
        metrics = {
            "test_accuracy": float(test_accuracy),
            "test_loss": float(test_loss),
            "params": int(model.count_params()),
            "epochs_ran": epochs_ran,
            "estimated_train_flops": flops,
            "train_flops_per_s": flops / train_s if train_s > 0 else None,
            "examples_per_s": len(x_fit) * epochs_ran / train_s if train_s > 0 else None,
        }
        for key in ("accuracy", "val_accuracy", "loss", "val_loss"):
            if history.get(key):
                metrics[f"final_{key}"] = history[key][-1]
        flags: tuple[RunFlag, ...] = ()
        if not diverged and test_accuracy < NEAR_CHANCE_FACTOR / dataset.num_classes:
            flags = (RunFlag.NEAR_CHANCE,)
        return run.record(
            RunStatus.DIVERGED if diverged else RunStatus.DONE,
            started_at=started_at,
            metrics=metrics,
            history=history,
            timings={"setup_s": built - start, "train_s": train_s, "eval_s": finished - trained, "wall_s": finished - start},
            device=device,
            versions=versions,
            error="loss became NaN or infinite" if diverged else None,
            flags=flags,
            finished_at=utcnow(),
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


def release_memory() -> None:
    """Drop the Keras graph between runs of a long-lived worker.

    On GPU, Keras' full clear (a gc pass and freeing device memory) so the next run gets the
    memory back. On CPU the full pass costs about 0.2 s a run for nothing a young-generation
    collection does not already reclaim (Python's own collector still runs the older ones).
    """
    try:
        import keras
        import tensorflow as tf

        if tf.config.list_logical_devices("GPU"):
            keras.backend.clear_session(free_memory=True)
            return
        keras.backend.clear_session(free_memory=False)
    except Exception:  # noqa: BLE001 - best effort
        pass
    gc.collect(1)


def measure_peak_flops(*, size: int | None = None, repeats: int = 10) -> dict[str, Any]:
    """Time a large float32 matmul on this process's device: the peak that MFU is measured against.

    On CPU this uses all the threads TensorFlow is given (the whole machine by default); on GPU,
    the first visible GPU.
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    size = size or (8192 if gpus else 2048)
    a = tf.random.normal((size, size), dtype=tf.float32)
    b = tf.random.normal((size, size), dtype=tf.float32)

    @tf.function
    def step(x, y):
        return tf.reduce_sum(tf.linalg.matmul(x, y))

    step(a, b).numpy()  # trace and warm up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        step(a, b).numpy()
        best = min(best, time.perf_counter() - start)
    return {
        "flops_per_s": 2.0 * size**3 / best,
        "kind": "gpu" if gpus else "cpu",
        "device": device_label(),
        "size": size,
        "dtype": "float32",
        "seconds": best,
        "measured_at": utcnow(),
        "versions": library_versions(),
    }
