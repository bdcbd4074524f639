"""The statistics behind verdicts and ranks, reproducing the cases of issue 9 with their numbers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from harness.aggregate import resolution, summarize
from harness.stats import (
    Placement,
    compare_with_best,
    difference,
    holm,
    mean_interval_rule,
    paired_permutation_p,
    prediction_interval,
    published_verdict,
    resolvable_difference,
)


def with_mean_std(mean: float, std: float, n: int) -> list[float]:
    """n values with exactly this mean and sample std."""
    z = np.arange(n, dtype=float)
    z = (z - z.mean()) / z.std(ddof=1)
    return list(mean + std * z)


def false_call_rate(rule, n: int, *, reps: int = 3000, seed: int = 0) -> float:
    """How often a published number that is just one more draw of the same model is called
    above/below our seeds."""
    rng = np.random.default_rng(seed)
    calls = 0
    for _ in range(reps):
        draws = 97.0 + 0.5 * rng.standard_normal(n + 1)
        placement = rule(float(draws[-1]), list(draws[:-1]))
        calls += placement in (Placement.ABOVE, Placement.BELOW)
    return calls / reps


@pytest.mark.parametrize("n, old_rate", [(3, 0.16), (5, 0.32), (10, 0.51)])
def test_old_rule_grows_wronger_with_more_seeds_the_new_one_stays_at_5_percent(n: int, old_rate: float) -> None:
    old = false_call_rate(mean_interval_rule, n)
    new = false_call_rate(lambda r, v: published_verdict(r, v).placement, n)
    assert old == pytest.approx(old_rate, abs=0.025)
    assert new == pytest.approx(0.05, abs=0.015)


def test_seed_000_32_unit_net_published_96_16_is_inside_the_prediction_interval() -> None:
    seeds = with_mean_std(81.36, 7.24, 5)  # README: 81.36 +- 7.24 over 5 seeds
    low, high = prediction_interval(seeds)
    assert (round(low, 1), round(high, 1)) == (59.3, 103.4)
    assert mean_interval_rule(96.16, seeds) is Placement.ABOVE  # what the README claimed
    verdict = published_verdict(96.16, seeds)
    assert verdict.placement is Placement.INSIDE and verdict.seeds_below == 5
    assert verdict.text == "inside [59.34, 100.00]; higher than all 5 of our seeds"  # clipped for display


def test_too_few_seeds_say_so_in_words() -> None:
    assert published_verdict(97.0, [98.0]).text.startswith("n too small to judge (1 seed")
    assert published_verdict(97.0, []).text == "no finished seed to compare with"
    assert published_verdict(9.8, [97.0, 97.2, 97.1]).placement is Placement.BELOW


def test_float_noise_is_a_tie_without_a_p_value() -> None:
    d = difference([98.119995] * 3, [98.12] * 3)
    assert d.how == "equal" and d.delta == 0.0 and math.isnan(d.p_value)
    apart = difference([98.0] * 3, [98.5] * 3)  # deterministic and different: nothing to test with
    assert apart.how == "none" and math.isnan(apart.p_value) and apart.delta == pytest.approx(-0.5)
    versus = compare_with_best([[98.12] * 3, [98.119995] * 3, [98.0] * 3])
    assert [v.tied for v in versus] == [True, True, False]


def test_single_run_best_still_finds_ties() -> None:
    versus = compare_with_best([[98.3], [98.2, 98.1, 98.25], [98.0], [90.0, 90.2, 89.9]])
    assert versus[1].tied and versus[1].difference.how == "prediction"  # consistent with the single run
    assert versus[2].tied and "cannot tell apart" in versus[2].note  # one run each
    assert not versus[3].tied  # eight points under: told apart even against one run


def test_holm_adjustment() -> None:
    assert holm([0.01, 0.04, 0.03, math.nan]) == pytest.approx([0.03, 0.06, 0.06, math.nan], nan_ok=True)


def test_sixteen_identical_variants_are_rarely_unbolded() -> None:
    """16 identical variants x 3 seeds: the old rule (uncorrected Welch p < 0.05 against the best)
    un-bolds at least one in about half the sweeps; with Holm it is about 5% at most."""
    from scipy import stats

    rng = np.random.default_rng(3)
    old = new = 0
    reps = 300
    for _ in range(reps):
        acc = 97.0 + 0.3 * rng.standard_normal((16, 3))
        acc = acc[np.argsort(-acc.mean(axis=1))]
        p = [stats.ttest_ind(acc[i], acc[0], equal_var=False).pvalue for i in range(1, 16)]
        old += any(x < 0.05 for x in p)
        new += not all(v.tied for v in compare_with_best([list(row) for row in acc]))
    assert old / reps == pytest.approx(0.53, abs=0.08)
    assert new / reps <= 0.06


def test_precise_second_keeps_its_bold_when_a_noisy_third_does() -> None:
    best, precise, noisy = [98.50, 98.55, 98.45, 98.52, 98.48], [98.20, 98.22, 98.18, 98.21, 98.19], [
        99.5, 96.0, 98.9, 96.5, 99.0]
    plain = difference(precise, best)
    assert plain.p_value < 0.001  # alone it would be un-bolded
    versus = compare_with_best([best, precise, noisy])
    assert versus[2].tied and versus[1].tied and "ranked above" in versus[1].note


def frame_of(variants: dict[str, list[tuple[str, float]]]) -> pd.DataFrame:
    rows = []
    for name, runs in variants.items():
        for seed, (status, acc) in enumerate(runs):
            near = status == "done" and acc < 20
            rows.append({"variant": name, "seed": seed, "status": status, "test_accuracy": acc, "train_s": 1.0,
                         "params": 1, "near_chance": near, "health": "collapsed" if near else "healthy"})
    return pd.DataFrame(rows)


def test_mostly_diverged_variant_cannot_rank_first() -> None:
    """3 of 5 seeds diverged and two at 99.0/99.1: it used to rank first."""
    runs = frame_of({
        "steady": [("done", a) for a in (98.0, 98.1, 97.9, 98.05, 98.0)],
        "lucky": [("diverged", math.nan)] * 3 + [("done", 99.0), ("done", 99.1)],
        "half_collapsed": [("done", 9.8), ("done", 9.8), ("done", 9.8), ("done", 99.5), ("done", 99.6)],
    })
    frame = summarize(runs, [{"name": n} for n in ("steady", "lucky", "half_collapsed")]).set_index("variant")
    assert frame.loc["steady", "rank"] == 1 and frame.loc["steady", "eligible"]
    assert not frame.loc["lucky", "eligible"] and frame.loc["lucky", "rank"] > 1
    assert frame.loc["lucky", "success_rate"] == pytest.approx(0.4) and frame.loc["lucky", "diverged"] == 3
    assert not frame.loc["half_collapsed", "eligible"]  # collapses count against it too (inside n)
    assert frame.loc["half_collapsed", "n"] == 5 and frame.loc["half_collapsed", "healthy"] == 2


def test_failed_and_diverged_are_apart_and_median_min_max() -> None:
    runs = frame_of({"a": [("done", 97.0), ("failed", math.nan), ("diverged", math.nan), ("done", 98.0), ("done", 97.2)]})
    row = summarize(runs, [{"name": "a"}]).iloc[0]
    assert (row["failed"], row["diverged"], row["n"], row["healthy"]) == (1, 1, 3, 3)
    assert (row["median"], row["min"], row["max"]) == (97.2, 97.0, 98.0)


def test_resolvable_difference_line() -> None:
    # 3 seeds, std 0.3: (t_.975,4 + t_.8,4) * 0.3 * sqrt(2/3)
    from scipy import stats

    expected = (stats.t.ppf(0.975, 4) + stats.t.ppf(0.8, 4)) * 0.3 * math.sqrt(2 / 3)
    assert resolvable_difference(3, 0.3) == pytest.approx(expected)
    summary = pd.DataFrame({"n": [3, 3, 1], "std": [0.2, 0.4, math.nan]})
    line = resolution(summary)
    assert line.n == 3 and line.std == pytest.approx(0.3) and line.difference == pytest.approx(expected)
    assert f"{expected:.2f} points cannot be resolved" in line.text


def test_paired_permutation() -> None:
    base = [98.0, 98.1, 97.9, 98.05, 98.0]
    assert paired_permutation_p([b - 1 for b in base], base, alternative="less") == pytest.approx(1 / 32)
    assert paired_permutation_p(base, base, alternative="less") == 1.0
