"""`harness sweep` against the loop a notebook user writes, side by side in one invocation.

Work (issue 8's bar): two MLPs of the seed notebooks (seed 003's 64-64 and 64-64-64-64, ReLU,
softmax, Adam) x 3 seeds, batch 32, 2 epochs on full MNIST (60,000 images, /255), each evaluated
on the 10,000 test images.

1. notebook: one Python process, TensorFlow's default threads, for each model for each seed:
   `keras.utils.set_random_seed`, build, compile, `fit(batch_size=32, epochs=2)`, `evaluate`;
   timed from the first build to the last evaluation (the import and the data loading are free);
2. `harness sweep` on the same 6 runs, as a user runs it (`python -m harness sweep FILE`, a fresh
   store), timed end to end by the wall clock: process start, worker start-up, Keras imports in the
   workers, data loading, training, storing. Once with the sweep's default backend (TensorFlow)
   and once with `--keras-backend auto` (JAX for these dense models where it is installed and
   faster, by `harness calibrate`'s fallback when nothing was measured).

Rounds are interleaved (notebook, harness, harness auto, notebook...) and medians reported; mean
accuracies are printed beside the times, so a speed-up that changed the answers would show.

    HARNESS_DATA_DIR=../shared/data .venv/bin/python benchmarks/bench_notebook.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MODELS = {"mlp_64x2": [64, 64], "mlp_64x4": [64, 64, 64, 64]}

SWEEP = textwrap.dedent(
    """
    schema_version: 1
    name: bench_notebook
    dataset: mnist
    {subset}
    budget: {{epochs: {epochs}, batch_size: 32, seeds: {seeds}}}
    defaults: {{preprocess: unit, optimizer: adam}}
    variants:
      - name: mlp_64x2
        model: {{dense: {{units: [64, 64]}}}}
      - name: mlp_64x4
        model: {{dense: {{units: [64, 64, 64, 64]}}}}
    """
)

NOTEBOOK = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    import keras
    seeds, epochs, train = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    models = json.loads(sys.argv[4])
    with np.load(sys.argv[5]) as data:
        x, y, xt, yt = data["x_train"], data["y_train"], data["x_test"], data["y_test"]
    if train < len(x):
        x, y = x[:train], y[:train]
    x = x.reshape(len(x), -1).astype("float32") / 255
    xt = xt.reshape(len(xt), -1).astype("float32") / 255
    y, yt = keras.utils.to_categorical(y, 10), keras.utils.to_categorical(yt, 10)
    accuracies = {}
    start = time.perf_counter()
    for name, units in models.items():
        for seed in range(seeds):
            keras.utils.set_random_seed(seed)
            model = keras.Sequential([keras.Input((784,))] + [keras.layers.Dense(u, activation="relu") for u in units]
                                     + [keras.layers.Dense(10, activation="softmax")])
            model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
            model.fit(x, y, batch_size=32, epochs=epochs, verbose=0)
            accuracies.setdefault(name, []).append(model.evaluate(xt, yt, verbose=0)[1])
    print("RESULT " + json.dumps({"seconds": time.perf_counter() - start, "accuracies": accuracies}))
    """
)


def notebook(args: argparse.Namespace, env: dict[str, str]) -> dict:
    data = Path(env["HARNESS_DATA_DIR"]) / "mnist.npz"
    cmd = [sys.executable, "-c", NOTEBOOK, str(args.seeds), str(args.epochs), str(args.train), json.dumps(MODELS), str(data)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"notebook loop failed:\n{done.stderr[-3000:]}")


def harness(args: argparse.Namespace, env: dict[str, str], sweep: Path, store: Path, backend: str | None) -> dict:
    cmd = [sys.executable, "-m", "harness", "sweep", str(sweep), "--store", str(store)]
    if backend:
        cmd += ["--keras-backend", backend]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"harness sweep failed:\n{done.stderr[-3000:]}")
    sys.path.insert(0, str(ROOT))
    from harness.store import SQLiteStore

    accuracies: dict[str, list[float]] = {}
    with SQLiteStore(store, create=False) as opened:
        records = opened.records(run_id for run_id, _v, _s in opened.plan("bench_notebook"))
    for record in records:
        accuracies.setdefault(record.variant, []).append(record.test_accuracy)
    backends = {record.budget.get("keras_backend") for record in records}
    return {"seconds": seconds, "accuracies": accuracies, "backends": sorted(backends)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds; medians reported")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train", type=int, default=60000, help="training images (60000: full MNIST)")
    args = parser.parse_args()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
    env.setdefault("HARNESS_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    subset = "" if args.train >= 60000 else f"subset: {{train: {args.train}}}"
    ways = {"notebook loop": [], "harness sweep": [], "harness sweep --keras-backend auto": []}
    with tempfile.TemporaryDirectory() as tmp:
        sweep = Path(tmp) / "bench_notebook.yaml"
        sweep.write_text(SWEEP.format(subset=subset, epochs=args.epochs, seeds=args.seeds))
        for round_ in range(args.repeats):
            ways["notebook loop"].append(notebook(args, env))
            ways["harness sweep"].append(harness(args, env, sweep, Path(tmp) / f"tf{round_}.db", None))
            ways["harness sweep --keras-backend auto"].append(harness(args, env, sweep, Path(tmp) / f"auto{round_}.db", "auto"))
    runs = len(MODELS) * args.seeds
    print(f"\n{len(MODELS)} MLPs (64x2, 64x4) x {args.seeds} seeds, batch 32, {args.epochs} epochs, {args.train} MNIST "
          f"images; {os.cpu_count()} cores; median of {args.repeats} interleaved round(s)\n")
    print("| way | wall (s) | s/run | speed-up | mean acc 64x2 (%) | mean acc 64x4 (%) | backend |")
    print("|---|---:|---:|---:|---:|---:|---|")
    base = statistics.median(r["seconds"] for r in ways["notebook loop"])
    for way, rows in ways.items():
        seconds = statistics.median(r["seconds"] for r in rows)
        accs = {m: statistics.mean(a for r in rows for a in r["accuracies"][m]) * 100 for m in MODELS}
        backend = ", ".join(rows[-1].get("backends", ["tensorflow"]))
        print(f"| {way} | {seconds:.1f} | {seconds / runs:.2f} | {base / seconds:.2f}x | {accs['mlp_64x2']:.2f} | "
              f"{accs['mlp_64x4']:.2f} | {backend} |")
    print("\nbar (issue 8): harness sweep >= 3x the notebook loop")


if __name__ == "__main__":
    main()
