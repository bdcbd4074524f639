"""How many seeds of a variant train fused in one worker (parent side: no Keras).

`--fuse K` forces K (1 turns fusion off). Auto: on CPU `CPU_AUTO_WIDTH` (measured on the quiet
2-core machine, 10 seeds of MLP 64-64 at batch 32, `benchmarks/bench_engine.py --ways fused
--width K`, one run each: width 1 17.7 s, 2 16.9 s, 5 14.4 s, 10 15.5 s, the same accuracies to
every digit); on a GPU as many copies as fit in the worker's
share of its memory by the model's estimate (`ModelSummary.train_memory_bytes` and its permuted
targets per copy, the training inputs once: they are held on the device for the whole group,
unless they would take more than `fused.DEVICE_INPUTS_SHARE` of that share: then each copy is
fed its own from host memory, and counts them), at most `GPU_MAX_WIDTH`. A builder's model (the user's
own Keras code) has no memory estimate and may not be fusable (compiled by the user, several
inputs or outputs) until a worker builds it: auto does not fuse it (its seeds go to separate
workers); `--fuse K` fuses K, and a group whose model cannot fuse trains one run after another.
"""

from __future__ import annotations

import math
from typing import Sequence

from harness.fused import device_inputs_limit
from harness.plan import PlannedRun

CPU_AUTO_WIDTH = 5
GPU_MAX_WIDTH = 32
# Of a CPU worker's host memory estimate, the share fused copies may take.
CPU_MEMORY_BYTES = 4 * 2**30


def input_bytes(run: PlannedRun) -> int:
    """The size of `run`'s training inputs as float32."""
    return 4 * run.n_fit * math.prod(run.summary.input_shape or (0,))


def inputs_on_device(run: PlannedRun, memory_bytes: int | None = None) -> bool:
    """Whether a group of `run`'s variant holds its training inputs on the device, once for all
    its copies (`harness.fused`), or feeds each copy its own permuted copy from host memory; on a
    GPU worker with `memory_bytes` of the device, the worker's own rule (`fused.device_inputs_limit`)."""
    return input_bytes(run) <= device_inputs_limit(memory_bytes)


def shared_memory_bytes(run: PlannedRun, memory_bytes: int | None = None) -> int:
    """Estimated memory a group of `run`'s variant takes once, whatever its width: its training
    inputs when they are held on the device."""
    return input_bytes(run) if inputs_on_device(run, memory_bytes) else 0


# TensorFlow's flat optimizer update (`harness.tf_update`) holds three more copies of a group's
# parameters while it steps: the flat vector, the flat gradient and the parts split back (counted
# for the TensorFlow runs of the harness's own models whose optimizer it flattens: Adam).
FLAT_UPDATE_PARAMETER_COPIES = 3


def copy_memory_bytes(run: PlannedRun, memory_bytes: int | None = None) -> int:
    """Estimated memory one fused copy of `run` adds: its training state and activations, its own
    per-epoch permutation of the targets and, when the inputs are fed from the host, of them; on
    TensorFlow, the flat optimizer update's copies of its parameters (`flat_update_planned`)."""
    summary = run.summary
    targets = 4 * run.n_fit * int(run.dataset.get("num_classes", 0) or 0)
    own_inputs = 0 if inputs_on_device(run, memory_bytes) else input_bytes(run)
    flat_update = 4 * FLAT_UPDATE_PARAMETER_COPIES * summary.params if flat_update_planned(run) else 0
    return summary.train_memory_bytes(batch_size=run.variant.batch_size) + targets + own_inputs + flat_update


def flat_update_planned(run: PlannedRun) -> bool:
    """Whether the worker will train `run` with TensorFlow's flat optimizer update (its rule:
    TensorFlow, a vocabulary model, an optimizer `tf_update.may_flatten`)."""
    from harness.tf_update import may_flatten

    model = run.variant.model
    return run.backend.backend == "tensorflow" and model.builder is None and may_flatten(model.optimizer.name)


def fusable(run: PlannedRun) -> bool:
    """Whether `run`'s variant may fuse: a builder's model (decided in the worker, when it is
    built) or a vocabulary model with a layout."""
    return run.variant.model.builder is not None or bool(run.summary.layers)


def auto_fuse_width(run: PlannedRun, *, device_kind: str = "cpu", memory_bytes: int | None = None) -> int:
    """The fusion width for `run`'s variant on a device of `device_kind` with `memory_bytes` free
    for this worker (None: `CPU_MEMORY_BYTES` on CPU; on GPU, no memory limit known: the cap)."""
    if not fusable(run):
        return 1
    if run.variant.model.builder is not None:
        # No memory estimate, and whether it can fuse at all (a model the user compiled cannot)
        # is known only when a worker builds it: auto keeps its seeds apart, on separate workers.
        return 1
    cap = CPU_AUTO_WIDTH if device_kind == "cpu" else GPU_MAX_WIDTH
    budget = memory_bytes if memory_bytes is not None else (CPU_MEMORY_BYTES if device_kind == "cpu" else None)
    device = memory_bytes if device_kind != "cpu" else None  # what a GPU worker is told (a CPU worker: nothing)
    if budget is not None:
        cap = min(cap, max(0, budget - shared_memory_bytes(run, device)) // max(1, copy_memory_bytes(run, device)))
    return max(1, cap)


def fuse_width(fuse: int | None, runs: Sequence[PlannedRun], *, device_kind: str = "cpu", memory_bytes: int | None = None) -> int:
    """`fuse` when given (1: off), else auto for the first run's variant."""
    if not runs or not fusable(runs[0]):
        return 1
    if fuse is not None:
        return max(1, fuse)
    return auto_fuse_width(runs[0], device_kind=device_kind, memory_bytes=memory_bytes)
