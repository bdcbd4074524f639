"""The same sweep on the local process pool and on Ray, side by side in one invocation.

Work: 12 runs (4 MLP variants x 3 seeds) of real TensorFlow training on a stratified MNIST subset,
through `harness.execute.execute_sweep`, once with `executor="pool"` and once with
`executor="ray"` on a local Ray cluster (127.0.0.1, token auth, no dashboard) with as many CPUs as
the pool has workers. Each way runs in a fresh Python process; the Ray cluster is started before
the clock starts (a Ray user's cluster is already up) and its start time is reported apart.
Rounds are interleaved (pool, ray, pool, ray...) and medians reported.

Also measured: how many run records per second the driver's SQLite store absorbs (one
transaction per record, as the sweep routine stores them), the ceiling of any executor.

    HARNESS_DATA_DIR=../shared/data .venv/bin/python benchmarks/bench_executors.py [--repeats 2]
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

REPO = Path(__file__).resolve().parents[1]

SWEEP = textwrap.dedent(
    """
    schema_version: 1
    name: bench_executors
    dataset: mnist
    subset: {{train: {train}, test: 2000}}
    budget: {{epochs: {epochs}, batch_size: 128, seeds: 3, validation_split: 0.1}}
    defaults:
      preprocess: unit
    variants:
      - name: mlp
    grid:
      model.dense.units: [[64], [128]]
      model.optimizer.name: [adam, rmsprop]
    """
)

CHILD = textwrap.dedent(
    """
    import io, json, sys, time
    way, sweep, store, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    cluster_s = 0.0
    if way == "ray":
        from harness.ray_executor import start_local_cluster
        start = time.perf_counter()
        start_local_cluster(num_cpus=workers)
        cluster_s = time.perf_counter() - start
    from harness.execute import SweepOptions, execute_sweep
    from harness.spec import load_sweep
    from harness.sweep import Progress
    start = time.perf_counter()
    outcome = execute_sweep(load_sweep(sweep), SweepOptions(store=store, executor=way, workers=workers),
                            progress=Progress((), stream=io.StringIO()))
    sweep_s = time.perf_counter() - start
    train_s = sum(r.timings.get("wall_s", 0.0) for r in outcome.records)
    assert outcome.trained == 12 and not outcome.failed, outcome
    print(json.dumps({"way": way, "cluster_s": cluster_s, "sweep_s": sweep_s, "train_s": train_s,
                      "summary": outcome.executor_summary}))
    if way == "ray":
        import ray
        ray.shutdown()
    """
)


def store_throughput(n: int = 2000) -> float:
    """Records per second `SQLiteStore.put` absorbs, one transaction each (a 10-epoch record)."""
    sys.path.insert(0, str(REPO))
    from harness.records import RunRecord, RunStatus
    from harness.store import SQLiteStore

    history = {k: [0.9] * 10 for k in ("loss", "accuracy", "val_loss", "val_accuracy")}
    with tempfile.TemporaryDirectory() as tmp, SQLiteStore(Path(tmp) / "t.db") as store:
        records = [
            RunRecord(run_id=f"r{i:06d}", sweep="s", variant="v", variant_id="x", seed=i, status=RunStatus.DONE,
                      config={"dense": {"units": [64]}}, budget={"epochs": 10}, dataset={"name": "mnist"},
                      metrics={"test_accuracy": 0.98}, history=history, timings={"wall_s": 1.0})
            for i in range(n)
        ]
        start = time.perf_counter()
        for record in records:
            store.put(record)
        return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds of both ways; medians reported")
    parser.add_argument("--workers", type=int, default=2, help="pool workers = Ray CPUs")
    # runs of ~5 s each: long enough that a run's own time, not process start-up, is measured
    parser.add_argument("--train", type=int, default=20000, help="training images")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("HARNESS_DATA_DIR", str(REPO.parent / "shared" / "data"))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}
    results: dict[str, list[dict]] = {"pool": [], "ray": []}
    with tempfile.TemporaryDirectory() as tmp:
        sweep = Path(tmp) / "bench.yaml"
        sweep.write_text(SWEEP.format(train=args.train, epochs=args.epochs))
        for round_ in range(args.repeats):
            for way in ("pool", "ray"):
                store = Path(tmp) / f"{way}{round_}.db"
                cmd = [sys.executable, "-c", CHILD, way, str(sweep), str(store), str(args.workers)]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(f"{way} failed:\n{done.stderr[-3000:]}")
                results[way].append(json.loads(done.stdout.strip().splitlines()[-1]))
    med = {way: statistics.median(r["sweep_s"] for r in rows) for way, rows in results.items()}
    train = {way: statistics.median(r["train_s"] for r in rows) for way, rows in results.items()}
    runs = 12
    print(f"\n12 runs (4 MLP variants x 3 seeds), {args.train} MNIST images, {args.epochs} epochs; "
          f"{args.workers} pool workers vs a local Ray cluster of {args.workers} CPUs; {os.cpu_count()} cores; "
          f"median of {args.repeats} interleaved round(s)\n")
    print("| executor | sweep wall (s) | sum of run walls (s) | per-run overhead (s) | Ray cluster start (s) |")
    print("|---|---:|---:|---:|---:|")
    for way in ("pool", "ray"):
        per_run = (med[way] - train[way] / args.workers) / runs
        start = statistics.median(r["cluster_s"] for r in results[way])
        print(f"| {way} | {med[way]:.1f} | {train[way]:.1f} | {per_run:.2f} | {start:.1f} |")
    print(f"\nRay / pool sweep wall: {med['ray'] / med['pool']:.2f}x (target <= 1.10)")
    print(f"Ray extra wall per run: {(med['ray'] - med['pool']) / runs:+.2f} s")
    for way in ("pool", "ray"):
        print(f"{way}: {results[way][-1]['summary']}")
    print(f"driver store: {store_throughput():.0f} records/s absorbed (SQLite, one transaction per record)")


if __name__ == "__main__":
    main()
