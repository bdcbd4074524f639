"""TensorFlow's step functions traced once or twice per group, side by side in one invocation:
with a group's compiled state built ahead (`harness.train.BUILD_STATE_AHEAD`, the default;
`harness.train.build_compiled_state`) and without (Keras' TensorFlow trainer creates its loss
trackers and optimizer slots in the first trace of its step, and TensorFlow traces the step again).

Each variant's seeds train as one fused group (`harness.fused.train_group`, as a sweep's worker
does) with `--epochs` epochs on full MNIST, in one fresh TensorFlow process with one thread (a
sweep worker's environment). The two ways alternate (A-B, then B-A) for `--rounds` rounds, after one untimed
group (the process's first group also runs the flat update's bit check); the table gives each
way's fastest group wall time (build, fit and evaluation: a trace can land in any of them) and
whether every seed's history and test result are the same bits both ways.

    HARNESS_DATA_DIR=../shared/data .venv/bin/python benchmarks/bench_trace.py --epochs 1
"""

from __future__ import annotations

import textwrap

from bench_flat_update import CHILD_HEAD, arguments, child_rows  # this folder: run as a script

CHILD = CHILD_HEAD + textwrap.dedent(
    """
    fused.train_group(next(iter(groups.values())), prepared.dataset)  # untimed: the process's first group
    for name, runs in groups.items():
        seconds, answers = {False: [], True: []}, {}
        for round_ in range(rounds):
            for ahead in ((False, True) if round_ % 2 == 0 else (True, False)):  # A-B, B-A, ...
                train.BUILD_STATE_AHEAD = ahead
                records = fused.train_group(runs, prepared.dataset)
                bad = [r for r in records if r.status.value not in ("done", "diverged")]
                if bad:
                    raise SystemExit(f"{name}: {bad[0].error}")
                seconds[ahead].append(records[0].timings["group_wall_s"])
                answers.setdefault(ahead, [(r.history, r.test_accuracy, r.metrics["test_loss"]) for r in records])
        print(json.dumps({
            "variant": name, "seeds": len(runs), "twice_s": min(seconds[False]), "once_s": min(seconds[True]),
            "same_bits": answers[False] == answers[True],
        }), flush=True)
    """
)


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    rows = []
    print("| variant | seeds | traced twice (s) | once (s) | saved per group (s) | same bits |")
    print("|---|---:|---:|---:|---:|---|")
    for row in child_rows(CHILD, args):
        rows.append(row)
        same = "yes" if row["same_bits"] else "**no**"
        print(f"| `{row['variant']}` | {row['seeds']} | {row['twice_s']:.2f} | {row['once_s']:.2f} | "
              f"{row['twice_s'] - row['once_s']:.2f} | {same} |", flush=True)
    if rows:
        twice, once = sum(r["twice_s"] for r in rows), sum(r["once_s"] for r in rows)
        print(f"\nall groups: {twice:.1f} s -> {once:.1f} s ({twice - once:.1f} s less, {twice / once:.3f}x); "
              f"same bits in {sum(r['same_bits'] for r in rows)} of {len(rows)}")
    if not all(r["same_bits"] for r in rows):
        raise SystemExit("building the state ahead changed an answer")


if __name__ == "__main__":
    main()
