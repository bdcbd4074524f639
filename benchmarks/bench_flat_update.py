"""TensorFlow's optimizer update two ways, side by side in one invocation: Keras' own (a dozen small
ops per variable) and the flat compiled update (`harness.tf_update`: one XLA call over all
variables), on each variant of `sweeps/seed_notebooks.yaml`, and whether the answers changed.

Each variant's seeds train as one fused group (`harness.fused.train_group`, as a sweep's worker
does) with `--epochs` epochs on full MNIST, in one fresh TensorFlow process with one thread (a
sweep worker's environment, `harness.backends.worker_env`). The two ways alternate for `--rounds`
rounds; the table gives each way's fastest training time (build, fit and evaluation excluded)
and whether every seed's test accuracy and test loss are the same bits both ways.

    HARNESS_DATA_DIR=../shared/data .venv/bin/python benchmarks/bench_flat_update.py --epochs 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent

# The start of a child (`child_rows`): the sweep's groups (`groups`: variant -> runs, those --only
# names), at --epochs on TensorFlow, with Keras imported as a worker imports it.
CHILD_HEAD = textwrap.dedent(
    """
    import json, sys
    from harness.spec import load_sweep
    from harness.sweep import prepare_sweep
    from harness import fused, train

    path, epochs, rounds, only = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    prepared = prepare_sweep(load_sweep(path).with_overrides(epochs=epochs, keras_backend="tensorflow"))
    train.warm_up()
    groups = {}
    for run in prepared.runs:
        if not only or run.variant.name in only:
            groups.setdefault(run.variant.name, []).append(run)
    """
)

CHILD = CHILD_HEAD + textwrap.dedent(
    """
    for name, runs in groups.items():
        seconds, answers, used = {False: [], True: []}, {}, {}
        for _ in range(rounds):
            for flat in (False, True):
                fused.FLAT_UPDATE = flat
                records = fused.train_group(runs, prepared.dataset)
                bad = [r for r in records if r.status.value not in ("done", "diverged")]
                if bad:
                    raise SystemExit(f"{name}: {bad[0].error}")
                seconds[flat].append(sum(r.timings["train_s"] for r in records))
                answers.setdefault(flat, [(r.test_accuracy, r.metrics["test_loss"]) for r in records])
                used[flat] = records[0].metrics.get("flat_update")
        print(json.dumps({
            "variant": name, "seeds": len(runs), "params": runs[0].summary.params,
            "own_s": min(seconds[False]), "flat_s": min(seconds[True]),
            "same_bits": answers[False] == answers[True], "flat_used": used[True],
        }), flush=True)
    """
)


def arguments(description: str) -> argparse.Namespace:
    """The options this benchmark and `bench_trace.py` share: the sweep, epochs, rounds, variants."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--sweep", default=str(ROOT / "sweeps" / "seed_notebooks.yaml"))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", action="append", default=[], help="a variant name (repeatable)")
    return parser.parse_args()


def child_rows(child: str, args: argparse.Namespace) -> Iterator[dict]:
    """Run `child` (Python source) in one TensorFlow process with a sweep worker's environment (one
    thread) and yield each JSON row it prints, as it prints it; a failed process is an error."""
    from harness.backends import worker_env

    env = {**os.environ, **dict(worker_env("tensorflow", threads=1)), "TF_CPP_MIN_LOG_LEVEL": "2"}
    process = subprocess.Popen(
        [sys.executable, "-c", child, args.sweep, str(args.epochs), str(args.rounds), *args.only],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("{"):
            yield json.loads(line)
    if process.wait() != 0:
        raise SystemExit(f"the benchmark's TensorFlow process failed (exit {process.returncode})")


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    rows = []
    print("| variant | params per copy | Keras' own update (s) | flat update (s) | speed-up | same bits |")
    print("|---|---:|---:|---:|---:|---|")
    for row in child_rows(CHILD, args):
        rows.append(row)
        ratio = row["own_s"] / row["flat_s"]
        same = "yes" if row["same_bits"] else "**no**"
        if not row["flat_used"]:
            same += " (flat update not used: its bit check failed here)"
        print(f"| `{row['variant']}` | {row['params']:,} | {row['own_s']:.2f} | {row['flat_s']:.2f} | {ratio:.2f}x | {same} |",
              flush=True)
    if rows:
        own, flat = sum(r["own_s"] for r in rows), sum(r["flat_s"] for r in rows)
        print(f"\nall variants: {own:.1f} s -> {flat:.1f} s ({own / flat:.2f}x); "
              f"same bits in {sum(r['same_bits'] for r in rows)} of {len(rows)}")
    if not all(r["same_bits"] for r in rows):
        raise SystemExit("the flat update changed an answer")


if __name__ == "__main__":
    main()
