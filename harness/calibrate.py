"""`harness calibrate`: measure this machine, for MFU and for `keras_backend: auto`.

- The peak: a large float32 matmul timed with the default backend, all threads (the MFU line of
  the report), stored as `calibration:<cpu|gpu>` as before.
- Per installed Keras backend, the time of one training step of a dense and of a conv model
  (`CALIBRATION_MODELS`), with the threads a sweep worker gets on this machine; stored as
  `backend_steps:<cpu|gpu>` and read by `auto`.

Every measurement runs in a child process with the backend's worker environment
(`KERAS_BACKEND` set before Keras is imported): this process imports no backend.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any, Sequence

from harness.backends import BACKENDS, calibration_key, installed_backends, worker_env

# The models `auto` decides between (issue 13's table: the notebook-style MLP and the CNN).
CALIBRATION_MODELS = {
    "dense": {"model": {"dense": {"units": [128, 128]}}, "batch_size": 64, "examples": 2048},
    "conv": {
        "model": {"conv": [{"filters": [32, 64], "kernel_size": 3, "pool": "max"}], "dense": {"units": [128]}},
        "batch_size": 128,
        "examples": 512,
    },
}
CHILD_TIMEOUT_S = 600


@dataclasses.dataclass(frozen=True)
class BackendTiming:
    backend: str
    step_s: dict[str, float]  # model kind -> seconds per training step (second epoch)
    device: str = ""
    version: str = ""
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class Calibration:
    device_kind: str  # "cpu" | "gpu"
    threads: int
    peak: dict[str, Any] | None
    timings: tuple[BackendTiming, ...]

    def steps(self) -> dict[str, dict[str, float]]:
        """kind -> backend -> seconds per step, what `backends.choose_backend` reads."""
        out: dict[str, dict[str, float]] = {}
        for timing in self.timings:
            for kind, seconds in timing.step_s.items():
                out.setdefault(kind, {})[timing.backend] = seconds
        return out

    def to_meta(self) -> dict[str, Any]:
        return {
            "steps": self.steps(),
            "threads": self.threads,
            "models": CALIBRATION_MODELS,
            "devices": {t.backend: t.device for t in self.timings},
            "versions": {t.backend: t.version for t in self.timings},
            "errors": {t.backend: t.error for t in self.timings if t.error},
            "measured_at": _now(),
        }


def _now() -> str:
    from harness.records import utcnow

    return utcnow()


def _child(args: Sequence[str], env: dict[str, str]) -> dict[str, Any]:
    full = {**os.environ, **env, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    try:
        out = subprocess.run(
            [sys.executable, "-m", "harness.calibrate", *args],
            env=full,
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {CHILD_TIMEOUT_S} s"}
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {out.returncode}: {tail}"}
    return json.loads(lines[-1])


def calibrate(
    *,
    gpu: int | None,
    threads: int,
    all_threads: int,
    size: int | None = None,
    backends: Sequence[str] | None = None,
) -> Calibration:
    """Measure the peak (default backend, `all_threads`) and a step of each installed backend
    (`threads` each, the first GPU when `gpu` is given)."""
    chosen = [b for b in (backends or installed_backends()) if b in BACKENDS]
    peak = None
    if chosen:
        env = dict(worker_env(chosen[0], threads=all_threads, gpu=gpu))
        result = _child(["peak", *([f"--size={size}"] if size else [])], env)
        peak = None if "error" in result else result
        if peak is None:
            raise RuntimeError(f"calibration with {chosen[0]} failed: {result['error']}")
    timings = []
    for backend in chosen:
        result = _child(["steps"], dict(worker_env(backend, threads=threads, gpu=gpu)))
        timings.append(
            BackendTiming(
                backend=backend,
                step_s=result.get("step_s", {}),
                device=result.get("device", ""),
                version=result.get("version", ""),
                error=result.get("error"),
            )
        )
    return Calibration(device_kind="gpu" if gpu is not None else "cpu", threads=threads, peak=peak, timings=tuple(timings))


def save_calibration(store: Any, calibration: Calibration) -> None:
    if calibration.peak is not None:
        store.set_meta(f"calibration:{calibration.device_kind}", calibration.peak)
    store.set_meta(calibration_key(calibration.device_kind), calibration.to_meta())


# --------------------------------------------------------------------------- in the child


def time_steps(kind: str, *, epochs: int = 2) -> float:
    """Seconds per training step of `CALIBRATION_MODELS[kind]` (the last epoch, after compiling),
    driven exactly as a run is (harness.train: build, compile with fit options, fit)."""
    import keras
    import numpy as np

    from harness.spec import ModelConfig
    from harness.models import build_model
    from harness.train import fit_options, make_optimizer

    spec = CALIBRATION_MODELS[kind]
    config = ModelConfig.model_validate({**spec["model"], "optimizer": "adam"})
    n, batch = spec["examples"], spec["batch_size"]
    rng = np.random.default_rng(0)
    x = rng.random((n, 28, 28, 1) if config.conv else (n, 784), dtype=np.float32)
    y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, n)]
    keras.utils.set_random_seed(0)
    model = build_model(config, input_shape=(28, 28), num_classes=10)
    from harness.architecture import summarize_model

    summary = summarize_model(config, input_shape=(28, 28), num_classes=10)
    options = fit_options(backend=keras.backend.backend(), batch_size=batch, n_fit=n,
                          train_flops_per_example=summary.train_flops(examples=1, epochs=1))
    model.compile(optimizer=make_optimizer(config.optimizer, flat_update=True), loss="categorical_crossentropy",
                  steps_per_execution=options.steps_per_execution)
    times: list[float] = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.start)

    model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=True, verbose=0, callbacks=[Timer()])
    return times[-1] / -(-n // batch)


def _main(argv: Sequence[str]) -> None:
    from harness.backends import adapter
    from harness.train import warm_up

    warm_up()  # a worker's environment, and Keras imported and configured as a worker's
    backend = adapter()
    if argv[0] == "peak":
        size = next((int(a.split("=", 1)[1]) for a in argv[1:] if a.startswith("--size=")), None)
        print(json.dumps(backend.peak_flops(size=size)))
    elif argv[0] == "steps":
        steps = {kind: time_steps(kind) for kind in CALIBRATION_MODELS}
        print(json.dumps({"step_s": steps, "device": backend.device_label(), "version": backend.module_version()}))
    else:
        raise SystemExit(f"unknown calibration command {argv[0]!r}")


if __name__ == "__main__":
    _main(sys.argv[1:])
