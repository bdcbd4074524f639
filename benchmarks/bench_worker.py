"""A TensorFlow sweep worker two ways each, side by side in one invocation: its start (Keras imported
with or without the integrations it never uses, `harness.backends.import_keras_for_worker`) and
its training (Keras' tf.data pipeline for arrays with autotuning on, as Keras builds it, or off
with one thread, `harness.backends.keras_arrays_without_autotune`), and whether the answers changed.

1. start: two worker-like processes started together (a 2-worker pool on 2 cores), each with a
   CPU worker's environment (`harness.backends.worker_env`), timed from launch to the end of
   `harness.train.warm_up` (Python, the harness, Keras and TensorFlow imported, the worker's
   settings applied). The two ways alternate for `--starts` rounds (which goes first, too);
   medians and ranges.
2. pipeline: one fused group (`--variant` of `sweeps/seed_notebooks.yaml`, its seeds, `--epochs`
   epochs, full MNIST) trained as a sweep's worker does (`harness.fused.train_group`: one `fit`
   call per epoch, then the test evaluation), in `--processes` fresh worker-like processes at
   once (a 2-worker pool), each training one untimed group each way, then alternating the two
   pipelines (A-B, B-A...) for `--rounds` rounds. Timed: the group's fit and test evaluation. The
   stall it removes came after about half of Keras' `fit` and `evaluate` calls (about 2.5 s each),
   so the times are listed group by group, not only their best; every seed's history, test
   accuracy and loss, in every group, are compared bit for bit with the first group's.

    HARNESS_DATA_DIR=../shared/data .venv/bin/python benchmarks/bench_worker.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

START = textwrap.dedent(
    """
    import sys, time
    from harness.train import warm_up
    warm_up(skip_integrations=sys.argv[1] == "skip")
    print("WARM", time.time(), flush=True)
    """
)

PIPELINE = textwrap.dedent(
    """
    import json, sys
    from harness import fused, train
    from harness.backends import import_keras_for_worker
    from harness.spec import load_sweep
    from harness.sweep import prepare_sweep

    path, variant, epochs, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    spec = load_sweep(path).with_overrides(epochs=epochs, keras_backend="tensorflow")
    prepared = prepare_sweep(spec)
    runs = [run for run in prepared.runs if run.variant.name == variant]
    if not runs:
        raise SystemExit(f"no variant {variant!r} in {path}")
    import_keras_for_worker()
    from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter

    keras_own = ArrayDataAdapter.get_tf_dataset
    train.warm_up()  # a CPU worker's settings: the pipeline without autotuning
    ours = ArrayDataAdapter.get_tf_dataset
    if not getattr(ours, "without_autotune", False):
        raise SystemExit("this Keras lays its array adapter out otherwise: nothing to compare")
    ways = {"autotune": keras_own, "no_autotune": ours}

    def train(way):
        ArrayDataAdapter.get_tf_dataset = ways[way]
        records = fused.train_group(runs, prepared.dataset)
        bad = [r for r in records if r.status.value not in ("done", "diverged")]
        if bad:
            raise SystemExit(f"{variant}: {bad[0].error}")
        # the group's fit and its test evaluation (each record holds its share of both)
        seconds = sum(r.timings["train_s"] + r.timings["eval_s"] for r in records)
        return seconds, [(r.history, r.test_accuracy, r.metrics["test_loss"]) for r in records]

    for way in ways:  # untimed: the first group of a process pays for tracing and first touches
        _, first = train(way)
    seconds, same = {way: [] for way in ways}, True
    for round_ in range(rounds):
        for way in (list(ways) if round_ % 2 == 0 else list(ways)[::-1]):  # A-B, then B-A
            took, answers = train(way)
            seconds[way].append(took)
            # every seed's history, accuracy and loss, every time (as JSON: a NaN equals a NaN)
            same = same and json.dumps(answers) == json.dumps(first)
    print("RESULT " + json.dumps({"seeds": len(runs), "seconds": seconds, "same_bits": same}), flush=True)
    """
)


def together(commands: list[list[str]], env: dict[str, str], timeout_s: float) -> list[str]:
    """Run `commands` at once; their standard outputs. The first that fails, or all of them past
    `timeout_s` in all, stops the others and ends the benchmark with its error output."""
    children = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for cmd in commands]
    outputs: dict[int, tuple[str, str]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(outputs) < len(children):
            for index, child in enumerate(children):
                if index in outputs:
                    continue
                try:  # reads both pipes meanwhile (no child blocks on a full one); safe to call again
                    outputs[index] = child.communicate(timeout=0.5)
                except subprocess.TimeoutExpired:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"a benchmark process ran past {timeout_s:g} s") from None
                    continue
                if child.returncode != 0:
                    raise SystemExit(f"a benchmark process failed (exit {child.returncode}):\n{outputs[index][1][-3000:]}")
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    return [outputs[index][0] for index in range(len(children))]


def starts(args: argparse.Namespace, env: dict[str, str]) -> dict[str, list[float]]:
    """Seconds from launch to warm, for each of two processes started together, per way (the
    ways alternate which goes first from round to round)."""
    out: dict[str, list[float]] = {"skip": [], "all": []}
    for round_ in range(args.starts):
        for way in (list(out) if round_ % 2 == 0 else list(out)[::-1]):
            launched = time.time()
            for stdout in together([[sys.executable, "-c", START, way]] * 2, env, 600):
                warm = [line for line in stdout.splitlines() if line.startswith("WARM ")]
                if not warm:
                    raise SystemExit("a worker-like process did not say it was warm")
                out[way].append(float(warm[0].split()[1]) - launched)
    return out


def pipeline(args: argparse.Namespace, env: dict[str, str]) -> dict:
    """`--processes` worker-like processes at once (a sweep's pool), each alternating the ways;
    their training times pooled per way."""
    command = [sys.executable, "-c", PIPELINE, args.sweep, args.variant, str(args.epochs), str(args.rounds)]
    pooled: dict = {"seconds": {"autotune": [], "no_autotune": []}, "same_bits": True}
    for stdout in together([command] * args.processes, env, 3600):
        results = [json.loads(line[7:]) for line in stdout.splitlines() if line.startswith("RESULT ")]
        if not results:
            raise SystemExit("a pipeline process gave no result")
        for way, seconds in results[0]["seconds"].items():
            pooled["seconds"][way] += seconds
        pooled["seeds"] = results[0]["seeds"]
        pooled["same_bits"] = pooled["same_bits"] and results[0]["same_bits"]
    return pooled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=3, help="rounds of the start comparison (0: skip it)")
    parser.add_argument("--sweep", default=str(ROOT / "sweeps" / "seed_notebooks.yaml"))
    parser.add_argument("--variant", default="seed003_mlp_64x2")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the pipeline comparison (0: skip it)")
    parser.add_argument("--processes", type=int, default=2, help="pipeline processes at once (a sweep's workers)")
    args = parser.parse_args()

    from harness.backends import worker_env

    env = {**os.environ, **dict(worker_env("tensorflow", threads=1)), "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": str(ROOT)}
    env.setdefault("HARNESS_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    print(f"{os.cpu_count()} cores, TensorFlow workers of one thread\n")
    if args.starts:
        times = starts(args, env)
        print(f"worker start, two at once ({args.starts} rounds, each way alternating)\n")
        print("| Keras imported | median (s) | range (s) |")
        print("|---|---:|---:|")
        for way, label in (("all", "with every integration (Keras' own import)"), ("skip", "without scikit-learn, matplotlib, JAX")):
            print(f"| {label} | {statistics.median(times[way]):.2f} | {min(times[way]):.2f}-{max(times[way]):.2f} |")
        print(f"\nspeed-up of the median: {statistics.median(times['all']) / statistics.median(times['skip']):.2f}x\n")
    if args.rounds:
        result = pipeline(args, env)
        own, ours = result["seconds"]["autotune"], result["seconds"]["no_autotune"]
        print(f"`{args.variant}`, {result['seeds']} seeds fused, {args.epochs} epochs, full MNIST, in {args.processes} "
              f"processes at once ({args.rounds} rounds each, alternating)\n")
        print("| Keras' array pipeline | fit and test evaluation per group (s) | median (s) |")
        print("|---|---|---:|")
        print(f"| autotuning on (Keras' own) | {', '.join(f'{s:.1f}' for s in own)} | {statistics.median(own):.1f} |")
        print(f"| autotuning off, one thread | {', '.join(f'{s:.1f}' for s in ours)} | {statistics.median(ours):.1f} |")
        print(f"\nspeed-up of the median: {statistics.median(own) / statistics.median(ours):.2f}x; "
              f"same bits: {'yes' if result['same_bits'] else '**no**'}")
        if not result["same_bits"]:
            raise SystemExit("the pipeline setting changed an answer")


if __name__ == "__main__":
    main()
