"""Keras backends side by side on this machine: issue 13's table, and the single-run options.

Part 1 (the table): one epoch of the same Keras model on the same MNIST images, one thread per
process, each measurement in a fresh process with `KERAS_BACKEND` set before Keras is imported
(the environment is `harness.backends.worker_env`, exactly what a sweep worker gets). Models:
MLP 64-64 batch 32 and MLP 256-256 batch 128 on 12,000 images; CNN conv32-conv64-pool-dense128
batch 128 with and without batch norm on 1,024 images. Ways: TensorFlow, JAX, each with
`steps_per_execution` (spe) 1 and the harness' choice, and with XLA `jit_compile` on TensorFlow.
The time is the second epoch (the first includes tracing/compilation, reported apart).

Part 2 (`--sweep`): the whole-sweep effect of `keras_backend: auto` on sweeps/seed_notebooks.yaml
against TensorFlow alone, both through `harness sweep` in fresh stores (so `auto` uses its
documented fallback, no calibration), at a stated budget.

    python benchmarks/bench_backends.py                    # the table (a few minutes on 1 core)
    python benchmarks/bench_backends.py --sweep --seeds 2 --epochs 2 --subset 20000:5000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = {
    "mlp64": {"label": "MLP 64-64, batch 32", "batch": 32, "n": 12000},
    "mlp256": {"label": "MLP 256-256, batch 128", "batch": 128, "n": 12000},
    "cnn": {"label": "CNN conv32-conv64-pool-dense128, batch 128", "batch": 128, "n": 1024},
    "cnn_bn": {"label": "same CNN with batch norm", "batch": 128, "n": 1024},
}


def _child(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process: KERAS_BACKEND is already in the environment."""
    import numpy as np

    from harness.backends import adapter

    import keras
    from keras import layers

    adapter()  # thread settings, as in a worker
    data = np.load(Path(args.data_dir) / "mnist.npz")
    n = MODELS[args.model]["n"]
    conv = args.model.startswith("cnn")
    x = data["x_train"][:n].astype("float32") / 255.0
    x = x[..., None] if conv else x.reshape(n, -1)
    y = np.eye(10, dtype="float32")[data["y_train"][:n]]
    keras.utils.set_random_seed(0)
    if conv:
        bn = args.model == "cnn_bn"
        stack = [keras.Input((28, 28, 1))]
        for filters in (32, 64):
            stack.append(layers.Conv2D(filters, 3, activation=None if bn else "relu"))
            if bn:
                stack += [layers.BatchNormalization(), layers.Activation("relu")]
        stack += [layers.MaxPooling2D(2), layers.Flatten(), layers.Dense(128, activation="relu"), layers.Dense(10, activation="softmax")]
    else:
        units = 64 if args.model == "mlp64" else 256
        stack = [keras.Input((784,)), layers.Dense(units, activation="relu"), layers.Dense(units, activation="relu"),
                 layers.Dense(10, activation="softmax")]
    model = keras.Sequential(stack)
    jit = {"auto": "auto", "on": True, "off": False}[args.jit]
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"],
                  steps_per_execution=args.spe, jit_compile=jit)
    times: list[float] = []

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.t)

    model.fit(x, y, batch_size=MODELS[args.model]["batch"], epochs=args.epochs, shuffle=True, verbose=0, callbacks=[EpochTimer()])
    print(json.dumps({"epochs_s": times}))


def measure(backend: str, model: str, *, spe: int, jit: str, data_dir: str, epochs: int = 2) -> dict:
    from harness.backends import worker_env

    env = dict(os.environ)
    env.update(dict(worker_env(backend, threads=1)))
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, __file__, "--child", "--backend", backend, "--model", model, "--spe", str(spe),
           "--jit", jit, "--data-dir", data_dir, "--epochs", str(epochs)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


WAYS = [
    ("TensorFlow", "tensorflow", 1, "auto"),
    ("TensorFlow, spe=32", "tensorflow", 32, "auto"),
    ("TensorFlow, XLA", "tensorflow", 1, "on"),
    ("JAX", "jax", 1, "auto"),
    ("JAX, spe=32", "jax", 32, "auto"),
]


def table(data_dir: str, *, models: list[str], ways: list[str], rounds: int) -> str:
    chosen = [w for w in WAYS if w[0] in ways] if ways else WAYS
    results: dict[tuple[str, str], list[dict]] = {}
    for _round in range(rounds):  # interleaved, so load changes hit every way alike
        for model in models:
            for label, backend, spe, jit in chosen:
                result = measure(backend, model, spe=spe, jit=jit, data_dir=data_dir)
                results.setdefault((model, label), []).append(result)
                print(f"  {model} {label}: {result}", file=sys.stderr, flush=True)
    lines = [
        "| model | " + " | ".join(label for label, *_ in chosen) + " |",
        "|---|" + "---:|" * len(chosen),
    ]
    for model in models:
        base = None
        cells = []
        for label, *_ in chosen:
            runs = [r for r in results[(model, label)] if "epochs_s" in r]
            if not runs:
                cells.append("failed")
                continue
            steady = statistics.median(r["epochs_s"][-1] for r in runs)
            first = statistics.median(r["epochs_s"][0] for r in runs)
            base = base or steady
            cells.append(f"{steady:.2f} s ({base / steady:.1f}x; 1st {first:.1f} s)")
        lines.append(f"| {MODELS[model]['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_effect(*, epochs: int | None, subset: str | None, sweep: str, seeds: int | None = None) -> str:
    """`harness sweep` of the same file twice in fresh stores: TensorFlow alone, then auto."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("tensorflow", "auto"):
            cmd = [sys.executable, "-m", "harness", "sweep", sweep, "--store", f"{tmp}/{backend}.db", "--keras-backend", backend]
            if epochs:
                cmd += ["--epochs", str(epochs)]
            if subset:
                cmd += ["--subset", subset]
            if seeds:
                cmd += ["--seeds", str(seeds)]
            start = time.perf_counter()
            out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
            wall = time.perf_counter() - start
            print(out.stderr[-3000:], file=sys.stderr)
            rows.append((backend, wall, out.returncode, _accuracies(f"{tmp}/{backend}.db")))
    base = rows[0][1]
    lines = ["| keras_backend | wall time (s) | speed-up | exit | mean test accuracy per variant (%) |", "|---|---:|---:|---:|---|"]
    for backend, wall, rc, acc in rows:
        shown = ", ".join(f"{k} {v:.2f}" for k, v in sorted(acc.items()))
        lines.append(f"| {backend} | {wall:.0f} | {base / wall:.2f}x | {rc} | {shown} |")
    return "\n".join(lines)


def _accuracies(store_path: str) -> dict[str, float]:
    from harness.report import load_results
    from harness.store import SQLiteStore

    out: dict[str, list[float]] = {}
    with SQLiteStore(store_path, create=False) as store:
        for name in store.sweeps():
            for record in load_results(store, name).records:
                if record.test_accuracy is not None:
                    out.setdefault(f"{record.variant} [{record.budget.get('keras_backend', '?')}]", []).append(100 * record.test_accuracy)
    return {k: statistics.mean(v) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="tensorflow", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="mlp64")
    parser.add_argument("--spe", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--jit", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--data-dir", default=os.environ.get("HARNESS_DATA_DIR", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--ways", default="", help="comma-separated way labels (default: all)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--sweep", action="store_true", help="whole-sweep effect of auto vs tensorflow")
    parser.add_argument("--sweep-file", default="sweeps/seed_notebooks.yaml")
    parser.add_argument("--subset", default=None)
    parser.add_argument("--seeds", type=int, default=None)
    args = parser.parse_args()
    if args.child:
        args.epochs = args.epochs or 2
        _child(args)
        return
    if args.sweep:
        print(sweep_effect(epochs=args.epochs, subset=args.subset, sweep=args.sweep_file, seeds=args.seeds))
        return
    ways = [w for w in args.ways.split(",") if w]
    print(table(args.data_dir, models=args.models.split(","), ways=ways, rounds=args.rounds))


if __name__ == "__main__":
    main()
