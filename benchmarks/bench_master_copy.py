"""TensorFlow's flat optimizer update two ways, side by side in one invocation: as it was until
2026-12-01 (each step joined every variable into the flat vector, and every gradient into one
vector, before the compiled call) and as it is (`harness.tf_update`: the flat vector is the
parameters' master copy, read from the variables when the optimizer is built and before each
epoch; the gradients are joined inside the compiled call).

Each variant's seeds train as one fused group (`harness.fused.train_group`, as a sweep's worker
does) with `--epochs` epochs on full MNIST, in one fresh TensorFlow process with one thread (a
sweep worker's environment). The two ways alternate (A-B, then B-A) for `--rounds` rounds, after
one untimed group (the process's first group also runs the flat update's bit check); the table
gives each way's fastest training time (`train_s` of the group: its fit and validation) and
whether every seed's history and test result are the same bits both ways.

    HARNESS_DATA_DIR=../shared/data .venv/bin/python benchmarks/bench_master_copy.py --epochs 1
"""

from __future__ import annotations

import textwrap

from bench_flat_update import CHILD_HEAD, arguments, child_rows  # this folder: run as a script

CHILD = CHILD_HEAD + textwrap.dedent(
    """
    import functools
    import tensorflow as tf
    from harness import tf_update

    current = tf_update.flat_class

    @functools.cache
    def previous(cls):
        # the update of 2026-12-01 before this change, on today's class
        class Previous(current(cls)):
            def build(self, variables):
                super().build(variables)
                self._whole_step = tf.function(
                    lambda gradient: self.update_step(gradient, self._flat, self.learning_rate), jit_compile=True
                )

            def _backend_update_step(self, grads, trainable_variables, learning_rate):
                trainable_variables = list(trainable_variables)
                self._flat.assign(tf.concat([tf.reshape(v.value, [-1]) for v in trainable_variables], 0))
                self._whole_step(tf.concat([tf.reshape(g, [-1]) for g in grads], 0))
                for variable, part in zip(trainable_variables, tf.split(self._flat.value, self._flat_sizes)):
                    variable.assign(tf.reshape(part, variable.shape))

        return Previous

    fused.train_group(next(iter(groups.values())), prepared.dataset)  # untimed: the process's first group
    for name, runs in groups.items():
        seconds, answers, used = {False: [], True: []}, {}, set()
        for round_ in range(rounds):
            for master in ((False, True) if round_ % 2 == 0 else (True, False)):  # A-B, B-A, ...
                tf_update.flat_class = current if master else previous
                records = fused.train_group(runs, prepared.dataset)
                bad = [r for r in records if r.status.value not in ("done", "diverged")]
                if bad:
                    raise SystemExit(f"{name}: {bad[0].error}")
                used.add(bool(records[0].metrics.get("flat_update")))
                seconds[master].append(sum(r.timings["train_s"] for r in records))
                answers.setdefault(master, [(r.history, r.test_accuracy, r.metrics["test_loss"]) for r in records])
        print(json.dumps({
            "variant": name, "seeds": len(runs), "before_s": min(seconds[False]), "now_s": min(seconds[True]),
            "same_bits": answers[False] == answers[True], "flat_used": used == {True},
        }), flush=True)
    """
)


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    rows = []
    print("| variant | seeds | variables re-read each step (s) | master copy (s) | speed-up | same bits |")
    print("|---|---:|---:|---:|---:|---|")
    for row in child_rows(CHILD, args):
        rows.append(row)
        same = "yes" if row["same_bits"] else "**no**"
        if not row["flat_used"]:
            same += " (the flat update was not used: its bit check failed here)"
        print(f"| `{row['variant']}` | {row['seeds']} | {row['before_s']:.2f} | {row['now_s']:.2f} | "
              f"{row['before_s'] / row['now_s']:.2f}x | {same} |", flush=True)
    if rows:
        before, now = sum(r["before_s"] for r in rows), sum(r["now_s"] for r in rows)
        print(f"\nall groups: {before:.1f} s -> {now:.1f} s ({before / now:.3f}x); "
              f"same bits in {sum(r['same_bits'] for r in rows)} of {len(rows)}")
    if not all(r["same_bits"] for r in rows):
        raise SystemExit("the master copy changed an answer")


if __name__ == "__main__":
    main()
