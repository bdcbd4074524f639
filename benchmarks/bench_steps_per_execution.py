"""TensorFlow's `steps_per_execution` two ways, side by side in one invocation: with the FLOP cap
that every backend had until 2026-12-01 (no more steps per host round trip than make about
1 GFLOP of estimated training work: a fused group of the notebooks' 256-wide MLPs or CNN trained
one step per round trip) and as it is (`harness.train.fit_options`: the cap is JAX's alone, whose
trainer unrolls an execution's steps into one program; TensorFlow runs them in a loop).

Each variant's seeds train as one fused group (`harness.fused.train_group`, as a sweep's worker
does) with `--epochs` epochs on full MNIST, in one fresh TensorFlow process with one thread (a
sweep worker's environment). The two ways alternate (A-B, then B-A) for `--rounds` rounds, after
one untimed group (the process's first group also runs the flat update's bit check); the table
gives each way's steps per execution, its fastest training time (`train_s` of the group: its
fit, tracing and validation) and whether every seed's history and test result are the same bits
both ways.

    HARNESS_DATA_DIR=../shared/data .venv/bin/python benchmarks/bench_steps_per_execution.py --epochs 1
"""

from __future__ import annotations

import textwrap

from bench_flat_update import CHILD_HEAD, arguments, child_rows  # this folder: run as a script

CHILD = CHILD_HEAD + textwrap.dedent(
    """
    import dataclasses

    current = train.fit_options

    def capped(**kwargs):
        # the rule until 2026-12-01: the FLOP cap (now JAX's alone) on TensorFlow too
        jax_rule = current(**{**kwargs, "backend": "jax"}).steps_per_execution
        return dataclasses.replace(current(**kwargs), steps_per_execution=jax_rule)

    fused.train_group(next(iter(groups.values())), prepared.dataset)  # untimed: the process's first group
    for name, runs in groups.items():
        seconds, answers, spe = {False: [], True: []}, {}, {}
        for round_ in range(rounds):
            for now in ((False, True) if round_ % 2 == 0 else (True, False)):  # A-B, B-A, ...
                train.fit_options = current if now else capped
                records = fused.train_group(runs, prepared.dataset)
                bad = [r for r in records if r.status.value not in ("done", "diverged")]
                if bad:
                    raise SystemExit(f"{name}: {bad[0].error}")
                seconds[now].append(sum(r.timings["train_s"] for r in records))
                spe[now] = records[0].metrics["steps_per_execution"]
                answers.setdefault(now, [(r.history, r.test_accuracy, r.metrics["test_loss"]) for r in records])
        train.fit_options = current
        print(json.dumps({
            "variant": name, "seeds": len(runs), "before_spe": spe[False], "now_spe": spe[True],
            "before_s": min(seconds[False]), "now_s": min(seconds[True]), "same_bits": answers[False] == answers[True],
        }), flush=True)
    """
)


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    rows = []
    print("| variant | seeds | steps per execution, FLOP cap | time (s) | steps per execution, now | time (s) "
          "| speed-up | same bits |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for row in child_rows(CHILD, args):
        rows.append(row)
        same = "yes" if row["same_bits"] else "**no**"
        print(f"| `{row['variant']}` | {row['seeds']} | {row['before_spe']} | {row['before_s']:.2f} | {row['now_spe']} | "
              f"{row['now_s']:.2f} | {row['before_s'] / row['now_s']:.2f}x | {same} |", flush=True)
    if rows:
        before, now = sum(r["before_s"] for r in rows), sum(r["now_s"] for r in rows)
        print(f"\nall groups: {before:.1f} s -> {now:.1f} s ({before / now:.3f}x); "
              f"same bits in {sum(r['same_bits'] for r in rows)} of {len(rows)}")
    if not all(r["same_bits"] for r in rows):
        raise SystemExit("steps_per_execution changed an answer")


if __name__ == "__main__":
    main()
