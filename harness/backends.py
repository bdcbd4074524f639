"""Keras 3 backends: what is backend-specific lives here, one small adapter per backend.

Two halves:
- Parent side (no backend imported): which backends are installed and their versions (read with
  `importlib.metadata`), the one-line error naming the extra to install, the worker environment
  per backend (threads, GPU memory sharing, determinism flags, `KERAS_BACKEND`), and `auto`: the
  backend to use for a model on a device, from `harness calibrate`'s measurement or a documented
  fallback.
- Worker side (`adapter()`): an `Adapter` for the backend Keras was imported with, which applies
  thread counts and GPU memory settings, turns op determinism on, names the device, reports
  library versions, clears state between runs and times a matmul for `calibrate`. `train.py`
  uses only Keras APIs plus this adapter.

The backend of a worker is fixed when the process starts: `KERAS_BACKEND` is in its environment
before Keras is imported, and Keras cannot switch backends afterwards.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.abc
import importlib.metadata
import importlib.util
import math
import os
import platform
import sys
import time
from typing import Any, Mapping, Sequence

from harness.errors import UserError

BACKENDS = ("tensorflow", "jax", "torch")
BACKEND_CHOICES = (*BACKENDS, "auto")
DEFAULT_BACKEND = "tensorflow"  # Keras' own default when neither the sweep nor $KERAS_BACKEND says

# The install extra that brings each backend (pyproject.toml [project.optional-dependencies]).
EXTRAS = {"tensorflow": "cpu", "jax": "jax", "torch": "torch"}
# Distributions that provide each backend's module, first match wins (metadata only, no import).
_DISTRIBUTIONS = {
    "tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tf-nightly", "tensorflow-macos"),
    "jax": ("jax",),
    "torch": ("torch",),
}
_MODULES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}

# Several runs share one GPU: each worker takes at most this share of it (JAX preallocates 75%
# by default, which would starve the second worker).
GPU_MEMORY_SHARE = 0.9
# A GPU worker is told its share of the device's memory in bytes (`devices.gpu_worker_memory_bytes`,
# the figure the fusion width was planned with), so that it holds its training inputs on the device
# only where the planner counted them there (`fused.device_inputs_limit`).
DEVICE_MEMORY_ENV = "HARNESS_DEVICE_MEMORY_BYTES"


class BackendNotInstalled(UserError):
    """A sweep asks for a Keras backend this environment does not have."""


# --------------------------------------------------------------------------- parent side


def distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def backend_version(backend: str) -> str | None:
    """The installed version of a backend's library, or None; never imports it."""
    if backend not in _DISTRIBUTIONS:
        raise ValueError(f"unknown Keras backend {backend!r}")
    if importlib.util.find_spec(_MODULES[backend]) is None:
        return None
    for dist in _DISTRIBUTIONS[backend]:
        version = distribution_version(dist)
        if version:
            return version
    return None


def installed_backends() -> tuple[str, ...]:
    return tuple(b for b in BACKENDS if backend_version(b) is not None)


def require_installed(backend: str, *, key: str = "budget.keras_backend", file: str | None = None) -> str:
    """The backend's version; `BackendNotInstalled` (one line naming the extra) when it is missing."""
    version = backend_version(backend)
    if version is None:
        raise BackendNotInstalled(
            f"Keras backend '{backend}' is not installed in this environment; "
            f'install it with: pip install -e ".[{EXTRAS[backend]}]"',
            file=file,
            key=key,
        )
    return version


def default_backend(environ: Mapping[str, str] | None = None) -> str:
    """A sweep that names no backend uses `$KERAS_BACKEND` (as Keras itself does), else TensorFlow."""
    value = (environ if environ is not None else os.environ).get("KERAS_BACKEND", "").strip().lower()
    return value if value in BACKEND_CHOICES else DEFAULT_BACKEND


def thread_env(backend: str, threads: int) -> list[tuple[str, str]]:
    """Environment that limits a worker to `threads` host threads under `backend`."""
    value = str(threads)
    env = [("OMP_NUM_THREADS", value), ("OPENBLAS_NUM_THREADS", value), ("MKL_NUM_THREADS", value)]
    if backend == "tensorflow":
        env += [("TF_NUM_INTRAOP_THREADS", value), ("TF_NUM_INTEROP_THREADS", "1" if threads == 1 else "2")]
    elif backend == "jax":
        # XLA's CPU client: one thread means no Eigen thread pool inside ops.
        # (XLA_FLAGS must start with "--", or XLA takes it for a file name and aborts.)
        eigen = "false" if threads == 1 else "true"
        env.append(("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen={eigen} intra_op_parallelism_threads={value}"))
    elif backend == "torch":
        env.append(("HARNESS_TORCH_THREADS", value))  # torch.set_num_threads in the adapter
    return env


def worker_memory_bytes() -> int | None:
    """This worker's share of its GPU's memory in bytes (`DEVICE_MEMORY_ENV`); None when not told
    (a CPU worker, a GPU of unknown size) or not a positive whole number."""
    value = os.environ.get(DEVICE_MEMORY_ENV, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def gpu_env(backend: str, *, runs_per_gpu: int = 1) -> list[tuple[str, str]]:
    """Environment that lets `runs_per_gpu` workers of `backend` share one GPU."""
    share = f"{GPU_MEMORY_SHARE / max(1, runs_per_gpu):.3f}"
    if backend == "tensorflow":
        return [("TF_FORCE_GPU_ALLOW_GROWTH", "true")]
    if backend == "jax":
        return [("XLA_PYTHON_CLIENT_PREALLOCATE", "false"), ("XLA_PYTHON_CLIENT_MEM_FRACTION", share)]
    if backend == "torch":
        return [("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"), ("HARNESS_TORCH_MEMORY_FRACTION", share)]
    raise ValueError(f"unknown Keras backend {backend!r}")


def determinism_env(backend: str) -> list[tuple[str, str]]:
    """Environment for deterministic GPU ops, needed before the backend starts (CPU ops of all
    three are deterministic once seeded; TensorFlow's switch is also called in the adapter)."""
    if backend == "jax":
        return [("XLA_FLAGS", "--xla_gpu_deterministic_ops=true")]
    if backend == "torch":
        return [("CUBLAS_WORKSPACE_CONFIG", ":4096:8")]
    return [("TF_DETERMINISTIC_OPS", "1")]


def worker_env(
    backend: str, *, threads: int, gpu: int | None = None, runs_per_gpu: int = 1, deterministic: bool = False,
    memory_bytes: int | None = None,
) -> tuple[tuple[str, str], ...]:
    """The whole environment of a worker of `backend`: set before Keras is imported there (a GPU
    worker's with `memory_bytes`, its share of the device's memory, when known)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown Keras backend {backend!r}")
    env = [("KERAS_BACKEND", backend)]
    if gpu is None:
        env.append(("CUDA_VISIBLE_DEVICES", ""))  # keep CPU workers off any GPU
        if backend == "jax":
            env.append(("JAX_PLATFORMS", "cpu"))
    else:
        env.append(("CUDA_VISIBLE_DEVICES", str(gpu)))
        env += gpu_env(backend, runs_per_gpu=runs_per_gpu)
        if memory_bytes:
            env.append((DEVICE_MEMORY_ENV, str(int(memory_bytes))))
        if deterministic:
            env += determinism_env(backend)
    env += thread_env(backend, threads)
    merged: dict[str, str] = {}
    for key, value in env:  # XLA_FLAGS may come from two places: join them
        merged[key] = f"{merged[key]} {value}" if key == "XLA_FLAGS" and key in merged else value
    return tuple(merged.items())


def share_workers(runs_per_backend: Mapping[str, int], workers: int) -> list[str]:
    """The backend of each of `workers` worker slots: every backend with runs gets one while there
    are slots, the rest go out in proportion to the runs (largest remainder). Workers move to
    another backend once theirs has no queued run (scheduler), so this is only the start."""
    wanted = {b: n for b, n in runs_per_backend.items() if n > 0}
    if not wanted or workers < 1:
        return []
    order = sorted(wanted, key=lambda b: (-wanted[b], b))
    shares = {b: 0 for b in order}
    for backend in order[:workers]:
        shares[backend] = 1
    total = sum(wanted.values())
    while sum(shares.values()) < workers:
        backend = max(order, key=lambda b: wanted[b] / total * workers - shares[b])
        shares[backend] += 1
    return [b for b in order for _ in range(shares[b])]


# --------------------------------------------------------------------------- auto


@dataclasses.dataclass(frozen=True)
class BackendChoice:
    """The backend a run trains with, and why (recorded with the run)."""

    backend: str
    version: str
    requested: str  # what the sweep asked: a backend name or "auto"
    reason: str = ""

    def describe(self) -> str:
        return f"{self.backend} {self.version}" + (f" (auto: {self.reason})" if self.reason else "")


def model_kind(config: Any) -> str:
    """'conv' for models with convolutions, 'dense' otherwise: the split `auto` decides on;
    'builder' for a user's own builder function (its code may be written for one backend)."""
    if getattr(config, "builder", None) is not None:
        return "builder"
    return "conv" if getattr(config, "conv", None) else "dense"


# Without a calibration: on CPU, JAX on dense models (several times faster on the notebook MLPs,
# issue 13's table and benchmarks/bench_backends.py) and TensorFlow's oneDNN on convolutions; on a
# GPU, JAX for both (XLA fuses the small MNIST models; TensorFlow is often absent from GPU images).
# A builder model (the user's own code) keeps Keras' default, TensorFlow, when it is installed.
FALLBACK = {
    ("cpu", "builder"): ("tensorflow", "jax", "torch"),
    ("gpu", "builder"): ("tensorflow", "jax", "torch"),
    ("cpu", "dense"): ("jax", "tensorflow", "torch"),
    ("cpu", "conv"): ("tensorflow", "jax", "torch"),
    ("gpu", "dense"): ("jax", "torch", "tensorflow"),
    ("gpu", "conv"): ("jax", "torch", "tensorflow"),
}


def calibration_key(device_kind: str) -> str:
    """Store meta key of the per-backend step timings for a device kind ('cpu' or 'gpu')."""
    return f"backend_steps:{device_kind}"


def choose_backend(
    requested: str,
    *,
    kind: str,
    device_kind: str,
    installed: Sequence[str],
    calibration: Mapping[str, Any] | None = None,
) -> tuple[str, str]:
    """(backend, reason) for one model. `requested` other than 'auto' is returned as it is.

    `auto`: the installed backend with the fastest measured training step for this model kind on
    this device kind (`calibration["steps"][kind][backend]`, seconds per step from `harness
    calibrate`); without a measurement, the first installed backend of `FALLBACK`.
    """
    if requested != "auto":
        return requested, ""
    if not installed:
        raise BackendNotInstalled(
            'no Keras backend is installed; install one with: pip install -e ".[cpu]" (or ".[jax]")',
            key="budget.keras_backend",
        )
    steps = ((calibration or {}).get("steps") or {}).get(kind) or {} if kind != "builder" else {}
    timed = {b: float(s) for b, s in steps.items() if b in installed and s and math.isfinite(float(s))}
    if timed:
        best = min(timed, key=timed.__getitem__)
        others = ", ".join(f"{b} {1e3 * s:.2f} ms" for b, s in sorted(timed.items(), key=lambda kv: kv[1]))
        return best, f"fastest measured {kind} step on {device_kind} ({others})"
    for backend in FALLBACK[(device_kind, kind)]:
        if backend in installed:
            return backend, f"no calibration for {device_kind}: default for {kind} models on {device_kind}"
    raise AssertionError("unreachable: installed is not empty")  # pragma: no cover


# --------------------------------------------------------------------------- worker side


class Adapter:
    """What differs between backends inside a worker. Subclasses override; defaults are Keras-only."""

    name = ""

    def configure(self) -> None:
        """Apply the worker's thread and memory settings (from its environment), once at start."""

    def enable_determinism(self) -> None:
        """Make ops deterministic (slower); seeding itself is `keras.utils.set_random_seed`."""

    def optimizer(self, optimizer: Any) -> Any:
        """The optimizer a run trains with: `optimizer`, or one that computes the same bits faster
        on this backend (TensorFlow: `harness.tf_update`)."""
        return optimizer

    def seed(self, seed: int) -> None:
        import keras

        keras.utils.set_random_seed(seed)

    def module_version(self) -> str:
        module = importlib.import_module(_MODULES[self.name])
        return str(getattr(module, "__version__", "?"))

    def versions(self) -> dict[str, str]:
        import keras
        import numpy

        from harness import __version__

        return {
            "harness": __version__,
            "python": platform.python_version(),
            "numpy": numpy.__version__,
            "keras": keras.__version__,
            "keras_backend": self.name,
            self.name: self.module_version(),
        }

    def gpu_names(self) -> list[str]:
        return []

    def device_label(self) -> str:
        gpus = self.gpu_names()
        if gpus:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            return ", ".join(gpus) + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible else "")
        return f"cpu {platform.machine()} ({self.threads()} threads)"

    def threads(self) -> int:
        for key in ("OMP_NUM_THREADS",):
            value = os.environ.get(key, "")
            if value.isdigit():
                return int(value)
        return os.cpu_count() or 1

    def uses_gpu(self) -> bool:
        return bool(self.gpu_names())

    def release(self) -> None:
        """Drop the Keras state of the last run (a long-lived worker trains many)."""
        import gc

        import keras

        keras.backend.clear_session(free_memory=self.uses_gpu())
        gc.collect(1)

    def matmul_seconds(self, size: int, repeats: int) -> float:
        raise NotImplementedError

    def peak_flops(self, *, size: int | None = None, repeats: int = 10) -> dict[str, Any]:
        gpu = self.uses_gpu()
        size = size or (8192 if gpu else 2048)
        best = self.matmul_seconds(size, repeats)
        from harness.records import utcnow

        return {
            "flops_per_s": 2.0 * size**3 / best,
            "kind": "gpu" if gpu else "cpu",
            "device": self.device_label(),
            "keras_backend": self.name,
            "size": size,
            "dtype": "float32",
            "seconds": best,
            "measured_at": utcnow(),
            "versions": self.versions(),
        }


def _best_of(fn, repeats: int) -> float:
    fn()  # trace and warm up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


class TensorFlowAdapter(Adapter):
    name = "tensorflow"

    def configure(self) -> None:
        import tensorflow as tf

        intra = os.environ.get("TF_NUM_INTRAOP_THREADS")
        inter = os.environ.get("TF_NUM_INTEROP_THREADS")
        if intra:
            tf.config.threading.set_intra_op_parallelism_threads(int(intra))
        if inter:
            tf.config.threading.set_inter_op_parallelism_threads(int(inter))
        gpus = tf.config.list_physical_devices("GPU")
        for gpu in gpus:
            tf.config.experimental.set_memory_growth(gpu, True)
        if intra and not gpus:  # a harness CPU worker (`worker_env`), not a user's process
            keras_arrays_without_autotune(threads=int(intra))
        # A worker builds one model per group, so after five groups TensorFlow warns at every new
        # one that its functions were "retraced": expected here, and it buried the progress lines.
        tf.get_logger().setLevel("ERROR")

    def enable_determinism(self) -> None:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()

    def optimizer(self, optimizer: Any) -> Any:
        from harness.tf_update import flat_optimizer

        return flat_optimizer(optimizer)

    def gpu_names(self) -> list[str]:
        import tensorflow as tf

        names = []
        for gpu in tf.config.list_physical_devices("GPU"):
            details = tf.config.experimental.get_device_details(gpu)
            names.append(f"{gpu.name.replace('/physical_device:', '')} {details.get('device_name', '')}".strip())
        return names

    def threads(self) -> int:
        import tensorflow as tf

        return tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count() or 1

    def matmul_seconds(self, size: int, repeats: int) -> float:
        import tensorflow as tf

        a = tf.random.normal((size, size), dtype=tf.float32)
        b = tf.random.normal((size, size), dtype=tf.float32)
        step = tf.function(lambda x, y: tf.reduce_sum(tf.linalg.matmul(x, y)))
        return _best_of(lambda: step(a, b).numpy(), repeats)


def keras_arrays_without_autotune(*, threads: int = 1) -> None:
    """On TensorFlow, Keras feeds NumPy arrays (`fit`, `evaluate`) through a tf.data pipeline with
    autotuning on (a parallel map and a prefetch, both AUTOTUNE). Each call builds one and tears
    it down at its end, and on a CPU worker of one thread that teardown often stalled for about
    2.5 s (tf.data's autotuning thread; measured: 2.4-2.6 s after about half the calls, in the
    frame exit of Keras' `fit`). A fused group fits one epoch per call, so a notebook MLP's
    2-epoch group of 6.5 s of training spent 0, 2.5 or 5 s more in stalls. Keras' pipeline is
    kept as it is, with autotuning off and `threads` threads of its own: the same batches in the
    same order (the map keeps its order either way), hence the same bits (tested). Keras' own
    pipeline if this Keras lays its adapter out otherwise. Applied once per process."""
    try:
        from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter
    except ImportError:  # another Keras: its own pipeline
        return
    original = ArrayDataAdapter.get_tf_dataset
    if getattr(original, "without_autotune", False):
        return

    def get_tf_dataset(self: Any) -> Any:
        import tensorflow as tf

        options = tf.data.Options()
        options.autotune.enabled = False
        # without autotuning, its parallel map would take a thread per core of the machine
        options.threading.private_threadpool_size = threads
        return original(self).with_options(options)

    get_tf_dataset.without_autotune = True  # type: ignore[attr-defined]
    get_tf_dataset.keras_own = original  # type: ignore[attr-defined]  (Keras' own, for comparisons)
    ArrayDataAdapter.get_tf_dataset = get_tf_dataset


class JaxAdapter(Adapter):
    name = "jax"

    def configure(self) -> None:
        import jax  # noqa: F401 - XLA reads its flags (threads, memory fraction) from the env here

    def enable_determinism(self) -> None:
        # XLA on CPU is deterministic; on GPU the slot env carries --xla_gpu_deterministic_ops
        # (it must be set before the backend starts, see `determinism_env`).
        pass

    def gpu_names(self) -> list[str]:
        import jax

        return [f"GPU:{d.id} {d.device_kind}" for d in jax.devices() if d.platform == "gpu"]

    def matmul_seconds(self, size: int, repeats: int) -> float:
        import jax
        import jax.numpy as jnp

        key = jax.random.PRNGKey(0)
        a = jax.random.normal(key, (size, size), dtype=jnp.float32)
        b = jax.random.normal(jax.random.fold_in(key, 1), (size, size), dtype=jnp.float32)
        step = jax.jit(lambda x, y: jnp.sum(x @ y))
        return _best_of(lambda: step(a, b).block_until_ready(), repeats)


class TorchAdapter(Adapter):
    name = "torch"

    def configure(self) -> None:
        import torch

        threads = os.environ.get("HARNESS_TORCH_THREADS", "")
        if threads.isdigit():
            torch.set_num_threads(int(threads))
            try:
                torch.set_num_interop_threads(1 if threads == "1" else 2)
            except RuntimeError:  # already set (only once per process)
                pass
        fraction = os.environ.get("HARNESS_TORCH_MEMORY_FRACTION")
        if fraction and torch.cuda.is_available():
            torch.cuda.set_per_process_memory_fraction(float(fraction))

    def enable_determinism(self) -> None:
        import torch

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False

    def gpu_names(self) -> list[str]:
        import torch

        if not torch.cuda.is_available():
            return []
        return [f"GPU:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]

    def threads(self) -> int:
        import torch

        return torch.get_num_threads()

    def release(self) -> None:
        super().release()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def matmul_seconds(self, size: int, repeats: int) -> float:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        generator = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(size, size, device=device, generator=generator)
        b = torch.randn(size, size, device=device, generator=generator)

        def step() -> None:
            torch.sum(a @ b).item()

        return _best_of(step, repeats)


_ADAPTERS: dict[str, type[Adapter]] = {"tensorflow": TensorFlowAdapter, "jax": JaxAdapter, "torch": TorchAdapter}



# Libraries that Keras and TensorFlow import at their own import when installed, for integrations
# a harness worker never uses: scikit-learn (`keras.wrappers`), matplotlib (`keras.visualization`)
# and, under TensorFlow or PyTorch, JAX (TensorFlow Lite's JAX converter). Measured on the 2-core
# machine, `import keras` on TensorFlow took 3.9 s with them and 2.3 s without.
WORKER_SKIPPED_IMPORTS = ("sklearn", "matplotlib", "jax")
_IMPORTERS = ("keras", "tensorflow")


class _SkipIntegrations(importlib.abc.MetaPathFinder):
    """An import hook that fails (`ModuleNotFoundError`, which Keras and TensorFlow catch: they
    then leave that integration off) the imports of `names` made by Keras' or TensorFlow's own
    modules; the same import from any other module (a user's model, the harness) goes through."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = frozenset(names)

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
        if fullname.partition(".")[0] in self.names and _importer().partition(".")[0] in _IMPORTERS:
            raise ModuleNotFoundError(f"{fullname} is not imported by Keras in a harness worker", name=fullname)
        return None


def _importer() -> str:
    """The module whose code runs the import being resolved (past importlib's own frames)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        name = name if isinstance(name, str) else ""
        if not (frame.f_code.co_filename.startswith("<frozen importlib") or name.startswith("importlib")):
            return name
        frame = frame.f_back
    return ""


def worker_skipped_imports(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The libraries of `WORKER_SKIPPED_IMPORTS` a worker's Keras is imported without: JAX only
    where `KERAS_BACKEND` names TensorFlow or PyTorch (a worker's environment always names its
    backend, `worker_env`; without it Keras may take JAX from its `keras.json`)."""
    backend = (environ if environ is not None else os.environ).get("KERAS_BACKEND", "")
    return tuple(name for name in WORKER_SKIPPED_IMPORTS if name != "jax" or backend in ("tensorflow", "torch"))


def import_keras_for_worker() -> None:
    """Import Keras (and its backend) without `worker_skipped_imports()`, for a worker process
    (a pool worker, a Ray actor): a direct import of those libraries works as ever afterwards,
    but in this process Keras' scikit-learn wrappers, its gallery plots and TensorFlow Lite's JAX
    converter stay off (they say the library is missing). A process that holds Keras already is
    left as it is, and so is a library it holds already."""
    if "keras" in sys.modules:
        return
    hook = _SkipIntegrations([name for name in worker_skipped_imports() if name not in sys.modules])
    sys.meta_path.insert(0, hook)
    try:
        import keras  # noqa: F401
    finally:
        sys.meta_path.remove(hook)


@functools.cache
def adapter() -> Adapter:
    """The adapter of the backend Keras runs on in this process (imports Keras and the backend),
    configured once."""
    import keras

    name = keras.backend.backend()
    if name not in _ADAPTERS:
        raise RuntimeError(f"Keras backend {name!r} is not supported by harness (supported: {', '.join(BACKENDS)})")
    instance = _ADAPTERS[name]()
    instance.configure()
    return instance


def loaded_backend() -> str | None:
    """The backend of the Keras already imported in this process, None when Keras is not imported
    (then `KERAS_BACKEND` can still choose it)."""
    import sys

    if "keras" not in sys.modules:
        return None
    return sys.modules["keras"].backend.backend()


def use_backend_in_process(backends: Mapping[str, int]) -> None:
    """Make this process train on the one backend of `backends` (`--in-process`): set
    `KERAS_BACKEND` before Keras is imported; a `UserError` when that is impossible."""
    if len(backends) > 1:
        raise UserError(
            f"--in-process trains in this one process, which runs Keras on one backend only; this sweep "
            f"needs {', '.join(sorted(backends))} (drop --in-process, or choose one with --keras-backend)",
            key="--in-process",
        )
    (backend,) = backends
    loaded = loaded_backend()
    if loaded is not None and loaded != backend:
        raise UserError(
            f"this process already runs Keras on '{loaded}'; the sweep needs '{backend}' (drop --in-process)",
            key="--in-process",
        )
    os.environ["KERAS_BACKEND"] = backend
