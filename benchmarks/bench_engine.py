"""The training engine three ways, side by side in one invocation, and whether fusing changed the
answers.

Work: K seeds of one variant (default: MLP 784-64-64-10, batch 32, the issue's step-bound case),
trained on a MNIST subset, then evaluated on the 10,000 test images:

1. today's engine (before issue 8): one run at a time, `model.fit(shuffle=True)` with one step
   per host round trip and Keras' default evaluation batch;
2. the new single-run path: `harness.train.train_run` (a group of one: steps_per_execution,
   large even evaluation batches, the run's own per-epoch permutation);
3. fused: `harness.fused.train_group` on all K seeds at once (one Keras program), in groups of
   `--width`.

Each way runs in a fresh Python process with the same threads (Keras import and data loading
excluded from the timed part: only build + fit + evaluate). Then the accuracy-equivalence check:
fused vs separate (2) and fused vs today's engine (1): means within 0.15 points and a Welch test
that cannot tell them apart (p > 0.05).

    HARNESS_DATA_DIR=../shared/data .venv/bin/python benchmarks/bench_engine.py --seeds 10
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SWEEP = textwrap.dedent(
    """
    schema_version: 1
    name: bench_engine
    dataset: mnist
    subset: {{train: {train}}}
    budget: {{epochs: {epochs}, batch_size: {batch}, seeds: {seeds}, keras_backend: {backend}}}
    variants:
      - name: mlp
        model:
          dense: {{units: {units}}}
          optimizer: adam
    """
)

CHILD = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from harness.spec import load_sweep
    from harness.sweep import prepare_sweep
    way, path, width = sys.argv[1], sys.argv[2], int(sys.argv[3])
    prepared = prepare_sweep(load_sweep(path))
    runs, dataset = list(prepared.runs), prepared.dataset
    from harness import train
    train.warm_up()
    out = []
    start = time.perf_counter()
    if way == "today":
        import keras
        from harness.data import prepare_inputs, prepare_targets
        from harness.models import build_model
        config = runs[0].variant.model
        x = prepare_inputs(dataset.x_train, preprocess="unit", images=False)
        y = prepare_targets(dataset.y_train, loss=config.loss, num_classes=10)
        xt = prepare_inputs(dataset.x_test, preprocess="unit", images=False)
        yt = prepare_targets(dataset.y_test, loss=config.loss, num_classes=10)
        start = time.perf_counter()
        for run in runs:
            keras.utils.set_random_seed(run.seed)
            model = build_model(config, input_shape=dataset.image_shape, num_classes=10)
            model.compile(optimizer="adam", loss=config.loss, metrics=["accuracy"])
            model.fit(x, y, epochs=run.variant.epochs, batch_size=run.variant.batch_size, shuffle=True, verbose=0)
            loss, acc = model.evaluate(xt, yt, verbose=0)
            out.append(acc)
            keras.backend.clear_session()
    elif way == "single":
        for run in runs:
            out.append(train.train_run(run, dataset).test_accuracy)
    else:
        from harness.fused import train_group
        for i in range(0, len(runs), width):
            out += [r.test_accuracy for r in train_group(runs[i:i + width], dataset)]
    print("RESULT " + json.dumps({"seconds": time.perf_counter() - start, "accuracies": out}))
    """
)


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """Welch's t statistic and two-sided p-value (scipy when installed)."""
    try:
        from scipy import stats

        result = stats.ttest_ind(a, b, equal_var=False)
        return float(result.statistic), float(result.pvalue)
    except ImportError:  # normal approximation
        va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
        if va + vb == 0:
            return 0.0, 1.0
        t = (statistics.mean(a) - statistics.mean(b)) / math.sqrt(va + vb)
        return t, math.erfc(abs(t) / math.sqrt(2))


def run_way(way: str, sweep: Path, width: int, env: dict[str, str]) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, way, str(sweep), str(width)], env=env, capture_output=True, text=True, cwd=ROOT
    )
    for line in result.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"{way} failed:\n{result.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--width", type=int, default=0, help="fusion width (0: all seeds at once)")
    parser.add_argument("--train", type=int, default=12000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--units", default="[64, 64]")
    parser.add_argument("--backend", default="tensorflow")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ways", default="today,single,fused")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not os.environ.get("HARNESS_DATA_DIR"):
        os.environ["HARNESS_DATA_DIR"] = str(ROOT.parent / "shared" / "data")
    from harness.backends import worker_env

    env = {**os.environ, **dict(worker_env(args.backend, threads=args.threads)), "TF_CPP_MIN_LOG_LEVEL": "2"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        sweep = Path(tmp) / "bench_engine.yaml"
        sweep.write_text(SWEEP.format(train=args.train, epochs=args.epochs, batch=args.batch, seeds=args.seeds,
                                      units=args.units, backend=args.backend))
        width = args.width or args.seeds
        results = {way: run_way(way, sweep, width, env) for way in args.ways.split(",")}
    print(f"{args.seeds} seeds of MLP {args.units}, batch {args.batch}, {args.epochs} epochs on {args.train} "
          f"MNIST images, Keras backend {args.backend}, {args.threads} threads, fusion width {width}")
    print(f"{'way':<8} {'seconds':>8} {'s/run':>7} {'speedup':>8} {'mean acc %':>11} {'std':>6}")
    base = results.get("today", next(iter(results.values())))["seconds"]
    for way, r in results.items():
        accs = [100 * a for a in r["accuracies"]]
        print(f"{way:<8} {r['seconds']:>8.1f} {r['seconds'] / len(accs):>7.2f} {base / r['seconds']:>7.2f}x "
              f"{statistics.mean(accs):>11.2f} {statistics.stdev(accs) if len(accs) > 1 else 0:>6.2f}")
    if "fused" in results:
        fused = [100 * a for a in results["fused"]["accuracies"]]
        for other in ("single", "today"):
            if other in results and len(fused) > 1:
                theirs = [100 * a for a in results[other]["accuracies"]]
                diff = statistics.mean(fused) - statistics.mean(theirs)
                t, p = welch(fused, theirs)
                ok = abs(diff) <= 0.15 and p > 0.05
                print(f"fused vs {other}: mean difference {diff:+.3f} points, Welch t={t:.2f} p={p:.3f} -> "
                      f"{'equivalent' if ok else 'NOT equivalent'} (bar: |diff| <= 0.15 and p > 0.05)")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results}, indent=1))


if __name__ == "__main__":
    main()
