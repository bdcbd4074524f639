"""The statistics behind verdicts and ranks: pure functions of per-seed accuracies (in %).

- `published_verdict`: is a published number (one run) consistent with our seeds? It is tested
  against a *prediction interval for one new run* (mean +- t_{n-1} * s * sqrt(1 + 1/n)), not the
  confidence interval of our mean: a published accuracy is one draw, and the mean's interval
  shrinks with n, so the old rule called a draw of the very same model "above/below" more often
  the more seeds we ran (16% at n=3, 32% at n=5, 51% at n=10).
- `compare_to_best`: difference to the best variant with its Welch interval, a p-value only where
  one exists (n >= 2 on both sides, some variance), Holm-corrected across the comparisons.
- `resolvable_difference`: the smallest difference the current seed count can resolve.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Sequence

import numpy as np

# Accuracies are stored as float32 fractions: 98.119995 and 98.12 are the same number. Values are
# rounded to this many decimals (of a percent) before any comparison.
ACCURACY_DECIMALS = 4
# Means closer than this (points) are equal: far below one test image in 10,000 (0.01 points).
EQUAL_TOLERANCE = 1e-3


def clean(values: Sequence[float]) -> np.ndarray:
    """Finite values, rounded away from float32 noise."""
    data = np.asarray([float(v) for v in values], dtype=float)
    return np.round(data[np.isfinite(data)], ACCURACY_DECIMALS)


def t_quantile(confidence: float, df: float) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.5 + confidence / 2, df=df))


def clip_pct(value: float) -> float:
    """Displayed accuracies and interval ends stay within [0, 100]."""
    return value if math.isnan(value) else min(100.0, max(0.0, value))


def prediction_interval(values: Sequence[float], *, confidence: float = 0.95) -> tuple[float, float]:
    """Where one more run of the same model is expected to land: mean +- t_{n-1} s sqrt(1 + 1/n).
    (NaN, NaN) below two values. Not clipped (see `clip_pct` for display)."""
    data = clean(values)
    n = len(data)
    if n < 2:
        return math.nan, math.nan
    mean, std = float(data.mean()), float(data.std(ddof=1))
    half = t_quantile(confidence, n - 1) * std * math.sqrt(1 + 1 / n)
    return mean - half, mean + half


class Placement(enum.Enum):
    INSIDE = "inside"
    ABOVE = "above"
    BELOW = "below"
    TOO_FEW = "too few seeds"


@dataclasses.dataclass(frozen=True)
class PublishedVerdict:
    """A published number against our seeds."""

    reference: float
    placement: Placement
    n: int
    low: float  # prediction interval for one new run (not clipped); NaN when n < 2
    high: float
    seeds_below: int  # how many of our seeds scored below the published number...
    seeds_equal: int  # ...and how many the same (to 0.001 points)
    confidence: float = 0.95

    @property
    def rank_text(self) -> str:
        """The empirical rank of the published number among our seeds, in words."""
        if self.n == 0:
            return "no finished seed"
        if self.n == 1:
            below, equal = self.seeds_below, self.seeds_equal
            return "higher than our one seed" if below else ("equal to our one seed" if equal else "lower than our one seed")
        if self.seeds_below == self.n:
            where = f"higher than all {self.n} of our seeds"
        elif self.seeds_below == 0 and self.seeds_equal == 0:
            where = f"lower than all {self.n} of our seeds"
        else:
            where = f"higher than {self.seeds_below} of our {self.n} seeds"
            if self.seeds_equal:
                where += f", equal to {self.seeds_equal}"
        return where

    @property
    def text(self) -> str:
        """One phrase for a report cell, e.g. "inside [95.1, 97.3]; higher than 2 of our 5 seeds"."""
        if self.placement is Placement.TOO_FEW:
            if self.n == 0:
                return "no finished seed to compare with"
            return f"n too small to judge ({self.n} seed; a prediction interval needs 2); {self.rank_text}"
        interval = f"[{clip_pct(self.low):.2f}, {clip_pct(self.high):.2f}]"
        return f"{self.placement.value} {interval}; {self.rank_text}"


def published_verdict(reference: float, values: Sequence[float], *, confidence: float = 0.95) -> PublishedVerdict:
    """Is a published accuracy (%) one plausible run of what we measured (`values`, %, per seed)?

    INSIDE when it lies in the `confidence` prediction interval for one new run; ABOVE/BELOW
    outside it; TOO_FEW with fewer than two seeds. Under the null "the published number is one more
    draw of the same model" it is called above/below about 1 - confidence of the time whatever n.
    """
    data = clean(values)
    n = len(data)
    ref = round(float(reference), ACCURACY_DECIMALS)
    below = int(np.sum(data < ref - EQUAL_TOLERANCE))
    equal = int(np.sum(np.abs(data - ref) <= EQUAL_TOLERANCE))
    low, high = prediction_interval(data, confidence=confidence)
    if n < 2:
        placement = Placement.TOO_FEW
    elif ref > high:
        placement = Placement.ABOVE
    elif ref < low:
        placement = Placement.BELOW
    else:
        placement = Placement.INSIDE
    return PublishedVerdict(float(reference), placement, n, low, high, below, equal, confidence)


def mean_interval_rule(reference: float, values: Sequence[float], *, confidence: float = 0.95) -> Placement:
    """The old rule (published number against the confidence interval of our *mean*), kept only to
    show in tests how wrong it is."""
    data = clean(values)
    n = len(data)
    if n < 2:
        return Placement.TOO_FEW
    mean, std = float(data.mean()), float(data.std(ddof=1))
    half = t_quantile(confidence, n - 1) * std / math.sqrt(n)
    if reference > mean + half:
        return Placement.ABOVE
    if reference < mean - half:
        return Placement.BELOW
    return Placement.INSIDE


# --------------------------------------------------------------------------- two variants


@dataclasses.dataclass(frozen=True)
class Difference:
    """`a` minus `b` in mean accuracy (points), its interval, and a two-sided p-value where a test
    exists. `how` says which: welch, prediction (one side has a single run), equal (both sides have
    no variance and the same value), none."""

    delta: float
    low: float
    high: float
    p_value: float
    how: str
    note: str = ""


def difference(a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95) -> Difference:
    """Mean of `a` minus mean of `b` with a `confidence` interval and a two-sided p-value.

    - both n >= 2 with some variance: Welch (Welch-Satterthwaite df);
    - one side n == 1: the single run against the other side's prediction distribution
      (t_{n-1}, s * sqrt(1 + 1/n));
    - no variance on either side: no p-value (there is nothing to test with); equal means (to
      0.001 points) are a tie, different ones are called different with a note;
    - n == 1 on both sides or n == 0: nothing can be said.
    """
    from scipy import stats

    x, y = clean(a), clean(b)
    if len(x) == 0 or len(y) == 0:
        return Difference(math.nan, math.nan, math.nan, math.nan, "none", "no finished run")
    delta = float(x.mean() - y.mean())
    sx = float(x.std(ddof=1)) if len(x) > 1 else math.nan
    sy = float(y.std(ddof=1)) if len(y) > 1 else math.nan
    if abs(delta) <= EQUAL_TOLERANCE and not (sx > 0 or sy > 0):
        return Difference(0.0, 0.0, 0.0, math.nan, "equal", "same accuracy, no seed variance: a tie, no test")
    if len(x) == 1 and len(y) == 1:
        return Difference(delta, math.nan, math.nan, math.nan, "none", "one run each: cannot tell apart")
    if len(x) == 1 or len(y) == 1:
        many, s = (y, sy) if len(x) == 1 else (x, sx)
        if s == 0:
            return Difference(delta, delta, delta, math.nan, "none", "no seed variance: difference not testable")
        scale = s * math.sqrt(1 + 1 / len(many))
        df = len(many) - 1
        half = t_quantile(confidence, df) * scale
        p = float(2 * stats.t.sf(abs(delta) / scale, df))
        return Difference(delta, delta - half, delta + half, p, "prediction", "one side has a single run")
    vx, vy = sx**2 / len(x), sy**2 / len(y)
    se = math.sqrt(vx + vy)
    if se == 0:
        return Difference(delta, delta, delta, math.nan, "none", "no seed variance: difference not testable")
    df = (vx + vy) ** 2 / ((vx**2 / (len(x) - 1) if vx else 0.0) + (vy**2 / (len(y) - 1) if vy else 0.0))
    half = t_quantile(confidence, df) * se
    p = float(2 * stats.t.sf(abs(delta) / se, df))
    return Difference(delta, delta - half, delta + half, p, "welch")


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN stays NaN and is not counted as a comparison)."""
    indexed = [(p, i) for i, p in enumerate(p_values) if not math.isnan(p)]
    indexed.sort()
    m = len(indexed)
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def resolvable_difference(n: int, std: float, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true difference (points) two variants of `n` seeds each and seed std `std` are
    told apart with probability `power` by a two-sided test at `alpha`:
    (t_{1-alpha/2} + t_{power}) * std * sqrt(2 / n), df = 2n - 2. NaN below 2 seeds."""
    from scipy import stats

    if n < 2 or math.isnan(std):
        return math.nan
    df = 2 * n - 2
    return float((stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * std * math.sqrt(2 / n))


def mann_whitney_p(a: Sequence[float], b: Sequence[float], *, alternative: str) -> float:
    """Mann-Whitney U p-value (`alternative` as scipy: 'less' means `a` tends lower); NaN below one
    value a side. Exact for small samples without ties."""
    from scipy import stats

    x, y = clean(a), clean(b)
    if len(x) == 0 or len(y) == 0:
        return math.nan
    if np.all(x == x[0]) and np.all(y == y[0]) and x[0] == y[0]:
        return 1.0
    return float(stats.mannwhitneyu(x, y, alternative=alternative).pvalue)


def paired_permutation_p(a: Sequence[float], b: Sequence[float], *, alternative: str) -> float:
    """Exact sign-flip permutation test on paired differences a_i - b_i (same seeds), mean
    difference as statistic; 'less' asks whether `a` is lower. NaN below 2 pairs."""
    x, y = clean(a), clean(b)
    if len(x) != len(y) or len(x) < 2:
        return math.nan
    d = x - y
    observed = d.mean()
    n = len(d)
    if n > 16:  # 65,536 sign patterns at most; beyond that a seeded Monte Carlo sample
        rng = np.random.default_rng(0)
        signs = rng.choice([-1.0, 1.0], size=(65536, n))
    else:
        signs = np.array([[1.0 if (k >> i) & 1 else -1.0 for i in range(n)] for k in range(2**n)])
    means = (signs * np.abs(d)).mean(axis=1)
    tol = 1e-9
    if alternative == "less":
        return float(np.mean(means <= observed + tol))
    if alternative == "greater":
        return float(np.mean(means >= observed - tol))
    return float(np.mean(np.abs(means) >= abs(observed) - tol))


@dataclasses.dataclass(frozen=True)
class VersusBest:
    """One variant against the best: the difference (None for the best itself), its
    Holm-adjusted p-value, whether it is tied with the best (bold), and why."""

    difference: Difference | None
    p_holm: float
    tied: bool
    note: str


def compare_with_best(
    samples: Sequence[Sequence[float]], *, alpha: float = 0.05, confidence: float = 0.95
) -> list[VersusBest]:
    """`samples` in rank order (the best first; variants without a finished run anywhere): each
    one's difference to the best, Holm-corrected across all the comparisons with the best.

    Tied (bold) when the adjusted p >= alpha, when both sides have no variance and the same
    accuracy, or when nothing can tell them apart (one run each). Bold is contiguous: a variant
    ranked above a tied one is tied too, so a precise #2 is not un-bolded while a noisy #3 keeps its
    bold only because its spread hides its gap.
    """
    if not samples or len(clean(samples[0])) == 0:
        return [VersusBest(None, math.nan, False, "") for _ in samples]
    diffs = [None] + [difference(s, samples[0], confidence=confidence) for s in samples[1:]]
    adjusted = holm([d.p_value if d is not None else math.nan for d in diffs])
    tied, notes = [True], ["best"]
    for d, p in zip(diffs[1:], adjusted[1:]):
        if math.isnan(d.delta):
            tied.append(False)
            notes.append(d.note)
        elif d.how == "equal":
            tied.append(True)
            notes.append(d.note)
        elif d.how == "none":
            tied.append("no seed variance" not in d.note)  # one run each: cannot tell apart
            notes.append(d.note)
        else:
            tied.append(p >= alpha)
            notes.append(d.note)
    present = [i for i, s in enumerate(samples) if len(clean(s))]
    last = max((i for i in present if tied[i]), default=0)
    for i in present:
        if i < last and not tied[i]:
            tied[i] = True
            notes[i] = (notes[i] + "; " if notes[i] else "") + "ranked above a variant tied with the best"
    return [VersusBest(d, p, t, note) for d, p, t, note in zip(diffs, adjusted, tied, notes)]
