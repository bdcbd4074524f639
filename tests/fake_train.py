"""Train functions for scheduler tests: no TensorFlow, behaviour chosen by seed.

They run inside real worker processes (spawned), so they live in an importable module.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from harness.records import RunRecord, RunStatus, utcnow

LOG_ENV = "HARNESS_FAKE_LOG"  # file each call appends a JSON line to


def _log(run, **extra) -> None:
    path = os.environ.get(LOG_ENV)
    if path:
        line = json.dumps(
            {"run_id": run.run_id, "seed": run.seed, "pid": os.getpid(), "keras_backend": os.environ.get("KERAS_BACKEND"), **extra}
        ) + "\n"
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line)


def _record(run, status=RunStatus.DONE, error=None, accuracy=0.9) -> RunRecord:
    return run.record(
        status,
        metrics={"test_accuracy": accuracy} if status is RunStatus.DONE else {},
        timings={"wall_s": 0.01, "train_s": 0.01},
        device=json.dumps(
            {
                "pid": os.getpid(),
                "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "TF_NUM_INTRAOP_THREADS": os.environ.get("TF_NUM_INTRAOP_THREADS"),
                "TF_FORCE_GPU_ALLOW_GROWTH": os.environ.get("TF_FORCE_GPU_ALLOW_GROWTH"),
                "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            }
        ),
        error=error,
        finished_at=utcnow(),
    )


def ok(run, dataset) -> RunRecord:
    _log(run)
    time.sleep(float(os.environ.get("HARNESS_FAKE_SLEEP", "0.05")))
    return _record(run)


def crashy(run, dataset) -> RunRecord:
    """seed 1: the process is killed (as the OOM killer does); 2: raises; 3: hangs; others fine."""
    _log(run)
    if run.seed == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    if run.seed == 2:
        raise ValueError("shape mismatch in layer dense_7")
    if run.seed == 3:
        time.sleep(600)
    return _record(run)


def returns_then_dies(run, dataset) -> RunRecord:
    """Returns its record, then the process is killed a moment later (after the worker has sent
    the record, before the driver has read it)."""
    import threading

    _log(run)
    time.sleep(0.2)
    threading.Timer(0.3, os.kill, args=(os.getpid(), signal.SIGKILL)).start()
    return _record(run)


def flaky(run, dataset) -> RunRecord:
    """Fails the first attempt of every run (a marker file per run remembers), then succeeds."""
    _log(run)
    marker = Path(os.environ[LOG_ENV]).with_name(f"tried-{run.run_id}")
    if not marker.exists():
        marker.touch()
        return _record(run, RunStatus.FAILED, "Traceback...\nRuntimeError: transient")
    return _record(run)


def warm_up() -> None:
    """Called by a worker before its first run (as harness.train.warm_up imports TensorFlow)."""
    if os.environ.get("HARNESS_FAKE_BROKEN_INSTALL"):
        raise ImportError("libtensorflow_framework.so.2: cannot open shared object file")


def crashy_raise(run, dataset) -> RunRecord:
    """seed 1 raises (a bug in user code); others fine. Safe in any executor (no kill, no hang)."""
    _log(run)
    if run.seed == 1:
        raise ValueError("shape mismatch in layer dense_7")
    return _record(run)


def uses_data(run, dataset) -> RunRecord:
    """Logs the size of the data it was handed (Ray actors get it from the object store)."""
    _log(run, n_train=int(len(dataset.y_train)))
    return _record(run)


def spread(run, dataset) -> RunRecord:
    """Accuracy by variant name: 'steady*' 90% on every seed; 'noisy*' 85-95% by seed; 'broken*'
    fails every seed but the first; others 90%."""
    _log(run)
    name = run.variant.name
    if name.startswith("broken") and run.seed != 0:
        return _record(run, RunStatus.FAILED, "Traceback...\nRuntimeError: broken on purpose")
    if name.startswith("noisy"):
        return _record(run, accuracy=0.90 + ((run.seed * 37) % 11 - 5) / 100)
    return _record(run)


def epochs(run, dataset) -> RunRecord:
    """Three 'epochs' of HARNESS_FAKE_EPOCH_S seconds each, reporting progress after each as the
    real trainers do (`harness.heartbeat`)."""
    from harness import heartbeat

    _log(run)
    for epoch in range(3):
        time.sleep(float(os.environ.get("HARNESS_FAKE_EPOCH_S", "0.4")))
        heartbeat.report((epoch + 1) / 3)
    return _record(run)
