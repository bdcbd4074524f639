"""Devices and worker slots, decided without importing TensorFlow in the parent process.

GPUs come from `nvidia-smi` (or `--gpus`); each worker process is pinned to one GPU with
`CUDA_VISIBLE_DEVICES` and its Keras backend's memory sharing, several per GPU with
`--runs-per-gpu`. On CPU the
cores are packed as several single-thread workers: on the 2-core machine two 1-thread processes
did the same MLP work 1.6x faster than one 2-thread process. When the CPU workers share out all
of this process's cores and one of them runs JAX, each is pinned to its own (`WorkerSlot.cpus`,
`pin_slots`): a thread setting does not bind XLA's CPU runtime (it runs independent parts of a
fused JAX program on threads of its own, 1.5 cores for a "1-thread" worker), and unpinned it
slows its neighbour.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from typing import Callable, Sequence

from harness.backends import DEFAULT_BACKEND, GPU_MEMORY_SHARE, worker_env
from harness.errors import UserError

WORKER_MEMORY_GIB = 2.0  # a TF worker with MNIST in memory stays well under this
CPUS_ENV = "HARNESS_CPUS"  # the cores a worker pins itself to, e.g. "0" or "2,3"
# Backends whose CPU runtime does not keep to the worker's thread setting (XLA runs independent
# parts of a program on threads of its own). With one of them among a sweep's CPU workers, every
# worker is pinned to its own cores (`pin_slots`): the notebooks sweep under `auto` took 474 s
# unpinned, 446 s with only the JAX worker pinned, 411 s with both. Without one (TensorFlow keeps
# to its setting) none is: pinned, TensorFlow lost about 6% on the CPU conv table (its Python
# thread and its runtime's overlap when a second core is free).
PINNED_BACKENDS = ("jax",)


def pin_slots(slots: Sequence["WorkerSlot"]) -> list["WorkerSlot"]:
    """`slots` as given when one of them runs a backend of `PINNED_BACKENDS`; else without cores."""
    if any(slot.backend in PINNED_BACKENDS for slot in slots):
        return list(slots)
    return [dataclasses.replace(slot, cpus=()) for slot in slots]


def allowed_cpus() -> tuple[int, ...]:
    """The host cores this process may run on (its affinity: a container's cpuset), in order."""
    if hasattr(os, "sched_getaffinity"):
        return tuple(sorted(os.sched_getaffinity(0)))
    return tuple(range(os.cpu_count() or 1))


def pin_to_cpus(value: str) -> tuple[int, ...]:
    """Pin this process (a worker, before it imports Keras) to the cores in `value` ("0,1"; empty:
    left as it is). Where the OS has no affinity call or refuses, the worker runs unpinned."""
    cores = tuple(int(c) for c in value.split(",") if c.strip().isdigit())
    if not cores or not hasattr(os, "sched_setaffinity"):
        return ()
    try:
        os.sched_setaffinity(0, cores)
    except OSError:  # a core gone or outside our cpuset: run where the OS puts us
        return ()
    # Linux pins one thread per call: the threads already running (NumPy's BLAS pool, started
    # when the worker imported it) are pinned too; threads started later inherit the mask.
    try:
        threads = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        threads = []
    for thread in threads:
        try:
            os.sched_setaffinity(thread, cores)
        except OSError:  # a thread that has just ended
            pass
    return cores


@dataclasses.dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_mib: int = 0


@dataclasses.dataclass(frozen=True)
class WorkerSlot:
    """One worker process: where it runs and the environment that pins it there."""

    name: str  # e.g. "gpu0.1" or "cpu.0"
    device: str  # "gpu:0" or "cpu"
    threads: int
    env: tuple[tuple[str, str], ...]
    backend: str = DEFAULT_BACKEND  # the Keras backend its worker imports (KERAS_BACKEND in env)
    runs_per_gpu: int = 1
    deterministic: bool = False  # deterministic GPU ops asked for in the env
    cpus: tuple[int, ...] = ()  # the host cores it is pinned to (empty: not pinned)
    memory_bytes: int | None = None  # a GPU worker's share of its device's memory, when known (in env)

    def environ(self) -> dict[str, str]:
        env = dict(self.env)
        if self.cpus:
            env[CPUS_ENV] = ",".join(str(c) for c in self.cpus)
        return env

    @property
    def gpu(self) -> int | None:
        return int(self.device.split(":", 1)[1]) if self.device.startswith("gpu:") else None

    def for_backend(self, backend: str) -> "WorkerSlot":
        """The same place (device, threads) for a worker of another Keras backend."""
        env = worker_env(
            backend, threads=self.threads, gpu=self.gpu, runs_per_gpu=self.runs_per_gpu, deterministic=self.deterministic,
            memory_bytes=self.memory_bytes,
        )
        return dataclasses.replace(self, backend=backend, env=env)


def gpu_worker_memory_bytes(gpus: Sequence[Gpu], runs_per_gpu: int) -> int | None:
    """A GPU worker's share of its device's memory (the smallest of `gpus`, the GPUs the sweep
    trains on (`chosen_gpus`), as nvidia-smi lists it;
    the share its backend is told, `backends.GPU_MEMORY_SHARE` / runs per GPU); None when no GPU
    or a size unknown. The fusion width is planned with it, and each GPU worker is told it
    (`backends.DEVICE_MEMORY_ENV`)."""
    sizes = [int(getattr(gpu, "memory_mib", 0) or 0) for gpu in gpus]
    if not sizes or min(sizes) <= 0:
        return None
    return int(min(sizes) * 2**20 * GPU_MEMORY_SHARE / max(1, runs_per_gpu))


def chosen_gpus(gpus: Sequence[Gpu], use_gpus: Sequence[int] | None) -> list[Gpu]:
    """The GPUs a sweep trains on: all of `gpus`, or those `use_gpus` names (`--gpus`), in its
    order; a `UserError` naming the first that is not there."""
    if use_gpus is None:
        return list(gpus)
    known = {gpu.index: gpu for gpu in gpus}
    missing = [i for i in use_gpus if i not in known]
    if missing:
        raise UserError(f"GPU {missing[0]} not found (nvidia-smi lists {sorted(known) or 'none'})", key="--gpus")
    return [known[i] for i in use_gpus]


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """Parse `nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader,nounits`."""
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 2 or not parts[0].isdigit():
            continue
        memory = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else 0
        gpus.append(Gpu(index=int(parts[0]), name=parts[1], memory_mib=memory))
    return gpus


def detect_gpus(*, run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> list[Gpu]:
    """GPUs that `nvidia-smi` reports; none when it is missing or fails. Never imports TensorFlow."""
    try:
        result = run(
            ["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (FileNotFoundError, PermissionError, subprocess.TimeoutExpired, OSError):
        return []
    if result.returncode != 0:
        return []
    return parse_nvidia_smi(result.stdout)


def parse_gpu_list(text: str) -> list[int]:
    """`--gpus 0,1` -> [0, 1]; `--gpus none` -> [] (CPU only)."""
    if text.strip().lower() in ("none", ""):
        return []
    try:
        indices = [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"expected comma-separated GPU indices such as 0,1 or 'none' (got {text!r})", key="--gpus") from None
    if len(set(indices)) != len(indices) or any(i < 0 for i in indices):
        raise UserError(f"GPU indices must be distinct and non-negative (got {text!r})", key="--gpus")
    return indices


def available_memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024 / 1024
    except OSError:
        return None
    return None


def plan_workers(
    *,
    gpus: Sequence[Gpu],
    pending: int,
    cpu_count: int,
    use_gpus: Sequence[int] | None = None,
    runs_per_gpu: int = 1,
    workers: int | None = None,
    threads: int | None = None,
    memory_gib: float | None = None,
    backend: str = DEFAULT_BACKEND,
    deterministic: bool = False,
    cpus: Sequence[int] | None = None,
) -> list[WorkerSlot]:
    """Decide the worker processes for `pending` runs on this machine.

    - GPUs (all detected, or `use_gpus`): `runs_per_gpu` workers per GPU, each pinned with
      CUDA_VISIBLE_DEVICES and its backend's memory sharing (TensorFlow memory growth; JAX no
      preallocation and 0.9 / runs_per_gpu of the memory; PyTorch the same fraction); host
      threads shared out among them.
    - Every slot's environment is `backends.worker_env(backend, ...)`: KERAS_BACKEND and the
      backend's thread settings (`WorkerSlot.for_backend` gives the same slot for another one).
    - CPU: `workers` x `threads` (default: one single-thread worker per core, no more workers than
      pending runs, spare cores given to the workers as threads, capped by memory). When the
      workers' threads add up to exactly the cores in `cpus` (this process's cores), each worker
      is pinned to `threads` of them, its own; otherwise (fewer or more threads than cores, or
      `cpus` None) no worker is pinned, so no core is left idle or doubly booked by the pinning.
    """
    if runs_per_gpu < 1:
        raise UserError("must be at least 1", key="--runs-per-gpu")
    if workers is not None and workers < 1:
        raise UserError("must be at least 1", key="--workers")
    if threads is not None and threads < 1:
        raise UserError("must be at least 1", key="--threads")
    cpu_count = max(1, cpu_count)
    pending = max(1, pending)
    chosen = chosen_gpus(gpus, use_gpus)
    if chosen:
        memory = gpu_worker_memory_bytes(chosen, runs_per_gpu)  # what the fusion width is planned with
        total = workers or min(len(chosen) * runs_per_gpu, max(pending, len(chosen)))
        per_thread = threads or max(1, cpu_count // max(1, min(total, len(chosen) * runs_per_gpu)))
        slots = []
        for k in range(runs_per_gpu):
            for gpu in chosen:
                if len(slots) >= total:
                    break
                env = worker_env(
                    backend, threads=per_thread, gpu=gpu.index, runs_per_gpu=runs_per_gpu, deterministic=deterministic,
                    memory_bytes=memory,
                )
                slots.append(
                    WorkerSlot(f"gpu{gpu.index}.{k}", f"gpu:{gpu.index}", per_thread, env, backend, runs_per_gpu, deterministic,
                               memory_bytes=memory)
                )
        return slots

    # More workers than pending runs would only start idle TensorFlow processes (~0.6 GB each).
    count = min(workers, pending) if workers else min(cpu_count, pending)
    if workers is None and memory_gib is not None:
        count = max(1, min(count, int(memory_gib // WORKER_MEMORY_GIB)))
    per_thread = threads or max(1, cpu_count // count)
    env = worker_env(backend, threads=per_thread, deterministic=deterministic)  # CUDA_VISIBLE_DEVICES="" too
    cores = list(cpus or ())
    pinned = len(cores) == count * per_thread
    return [
        WorkerSlot(f"cpu.{i}", "cpu", per_thread, env, backend, 1, deterministic,
                   tuple(cores[i * per_thread:(i + 1) * per_thread]) if pinned else ())
        for i in range(count)
    ]
