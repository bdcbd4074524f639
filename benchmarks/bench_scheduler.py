"""Same work three ways, side by side in one invocation: how much faster is `harness sweep`?

Work: 8 runs of an MLP 784-256-256-10 (4 variants x 2 seeds: dropout 0 / 0.2, adam / rmsprop),
2 epochs each on full MNIST (60,000 images), batch 128, then test-set evaluation.

1. the sequential loop of the notebooks: one process, build / compile / fit / evaluate per run;
2. KerasTuner GridSearch over the same 4 variants with executions_per_trial=2 (it keeps only the
   mean of the two executions);
3. `harness.execute.execute_sweep` with its defaults, the call behind `harness sweep` (worker
   processes packed on the cores, every run stored).

Each way runs in a fresh Python process (TensorFlow import included) and is timed from outside.

    HARNESS_DATA_DIR=../shared/data .venv/bin/python benchmarks/bench_scheduler.py
"""

from __future__ import annotations

import argparse
import os
import re
import sqlite3
import statistics
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

VARIANTS = [(0.0, "adam"), (0.2, "adam"), (0.0, "rmsprop"), (0.2, "rmsprop")]
SEEDS = [0, 1]

COMMON = textwrap.dedent(
    """
    import os, time, numpy as np
    data = np.load(os.path.join(os.environ["HARNESS_DATA_DIR"], "mnist.npz"))
    x_train = data["x_train"].reshape(-1, 784).astype("float32") / 255.0
    x_test = data["x_test"].reshape(-1, 784).astype("float32") / 255.0
    y_train = np.eye(10, dtype="float32")[data["y_train"]]
    y_test = np.eye(10, dtype="float32")[data["y_test"]]
    EPOCHS, BATCH = {epochs}, 128
    import keras

    def build_mlp(dropout, optimizer):
        layers = [keras.Input((784,)), keras.layers.Dense(256, activation="relu")]
        layers += [keras.layers.Dropout(dropout)] if dropout else []
        layers += [keras.layers.Dense(256, activation="relu")]
        layers += [keras.layers.Dropout(dropout)] if dropout else []
        layers += [keras.layers.Dense(10, activation="softmax")]
        model = keras.Sequential(layers)
        model.compile(optimizer=optimizer, loss="categorical_crossentropy", metrics=["accuracy"])
        return model
    """
)

LOOP = COMMON + textwrap.dedent(
    """
    for dropout, optimizer in {variants}:
        for seed in {seeds}:
            keras.utils.set_random_seed(seed)
            model = build_mlp(dropout, optimizer)
            model.fit(x_train, y_train, epochs=EPOCHS, batch_size=BATCH, validation_split=0.1, verbose=0)
            print("acc", model.evaluate(x_test, y_test, verbose=0)[1], flush=True)
    """
)

TUNER = COMMON + textwrap.dedent(
    """
    import keras_tuner as kt
    def build(hp):
        return build_mlp(hp.Choice("dropout", [0.0, 0.2]), hp.Choice("optimizer", ["adam", "rmsprop"]))
    tuner = kt.GridSearch(build, objective="val_accuracy", executions_per_trial={executions},
                          directory={directory!r}, project_name="bench", overwrite=True, seed=0)
    tuner.search(x_train, y_train, epochs=EPOCHS, batch_size=BATCH, validation_split=0.1, verbose=0)
    for trial in tuner.oracle.get_best_trials(4):
        print("trial", trial.hyperparameters.values, trial.score, flush=True)
    """
)

SWEEP = textwrap.dedent(
    """
    schema_version: 1
    name: bench
    dataset: mnist
    budget: {{epochs: {epochs}, batch_size: 128, seeds: {seeds}, validation_split: 0.1}}
    defaults:
      preprocess: unit
      dense: {{units: [256, 256]}}
    variants:
      - name: base
    grid:
      model.dense.dropout: [0.0, 0.2]
      model.optimizer.name: [adam, rmsprop]
    """
)


HARNESS = textwrap.dedent(
    """
    import sys
    from harness.execute import SweepOptions, execute_sweep
    from harness.spec import load_sweep

    outcome = execute_sweep(load_sweep(sys.argv[1]), SweepOptions(store=sys.argv[2]), notify=print)
    assert outcome.trained == {runs} and not outcome.failed, outcome
    """
)


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{cmd[:3]} failed:\n{result.stderr[-3000:]}")
    return elapsed, result.stdout + result.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--skip-tuner", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of all ways, interleaved; medians reported")
    args = parser.parse_args()
    if not os.environ.get("HARNESS_DATA_DIR"):
        default = Path(__file__).resolve().parents[2] / "shared" / "data"
        os.environ["HARNESS_DATA_DIR"] = str(default)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    runs = len(VARIANTS) * len(SEEDS)
    times: dict[str, list[float]] = {}
    overheads: list[float] = []
    setups: list[float] = []
    workers = None
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        for round_ in range(args.repeats):
            loop = LOOP.format(epochs=args.epochs, variants=VARIANTS, seeds=SEEDS)
            seconds, _ = timed([sys.executable, "-c", loop], env)
            times.setdefault("sequential loop (notebook style)", []).append(seconds)

            if not args.skip_tuner:
                tuner = TUNER.format(epochs=args.epochs, executions=len(SEEDS), directory=str(tmp_path / "kt"))
                seconds, _ = timed([sys.executable, "-c", tuner], env)
                times.setdefault(f"KerasTuner GridSearch, executions_per_trial={len(SEEDS)}", []).append(seconds)

            sweep = tmp_path / "bench.yaml"
            sweep.write_text(SWEEP.format(epochs=args.epochs, seeds=len(SEEDS)))
            store = tmp_path / f"bench{round_}.db"
            harness = [sys.executable, "-c", HARNESS.format(runs=runs), str(sweep), str(store)]
            seconds, output = timed(harness, env)
            times.setdefault("harness execute_sweep (defaults)", []).append(seconds)
            found = re.search(r"workers: (\d+)", output)
            workers = found.group(1) if found else "?"
            found = re.search(r"scheduler overhead per run: mean ([\d.]+) s", output)
            if found:
                overheads.append(float(found.group(1)))
            with sqlite3.connect(store) as conn:
                records = [json.loads(r[0]) for r in conn.execute("SELECT record FROM runs")]
            setups.append(sum(r["timings"]["setup_s"] for r in records) / len(records))
    rows = [(name, statistics.median(values), min(values)) for name, values in times.items()]
    base = rows[0][1]
    print(f"\n{runs} runs x {args.epochs} epochs, MLP 784-256-256-10, full MNIST, {os.cpu_count()} cores, "
          f"median of {args.repeats} interleaved rounds\n")
    print("| way | wall time (s), median | min | speed-up vs loop (medians) |")
    print("|---|---:|---:|---:|")
    for name, median, fastest in rows:
        print(f"| {name} | {median:.1f} | {fastest:.1f} | {base / median:.2f}x |")
    print()
    print(f"harness: {workers} workers; per-run overhead once warm: "
          f"{statistics.median(overheads) if overheads else float('nan'):.3f} s scheduling "
          f"+ {statistics.median(setups):.3f} s model build and compile in the worker")


if __name__ == "__main__":
    main()
