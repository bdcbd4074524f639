"""Adaptive seeds: train more seeds only where the answer is still uncertain.

A sweep with `budget.seeds: {min, max, ci_half_width}` (or `harness sweep --seeds auto`) trains
every variant on its first `min` seeds, then looks at each variant's interval of the mean, the
same Student-t interval the report's table shows (`harness.aggregate.mean_ci`, over its finished
runs). A variant whose interval is wider than +-`ci_half_width` points gets more seeds, as many as
its spread so far says it needs (at most doubling per round, at most `max` in all); the others
stop. Rounds repeat until no variant needs more.

Seeds are taken in order from the sweep's candidates (0..max-1), so the runs are the same content-
addressed runs a fixed-seed sweep would train, and a resumed sweep makes the same decisions from
the same stored results: it starts from the seeds the stored plan already holds.

This module is calculation only; `harness.execute` runs the rounds.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Iterable, Mapping, Sequence

from harness.contracts import AdaptiveSeeds
from harness.plan import PlannedRun
from harness.records import RunRecord, RunStatus


class SeedState(enum.Enum):
    MORE = "more"  # the interval is wider than the target: more seeds next round
    PRECISE = "precise"  # the interval is within the target
    AT_MAX = "at max"  # still wider, but the variant has its `max` seeds
    MOSTLY_FAILED = "mostly failed"  # most of its runs failed or diverged: more seeds would not help


@dataclasses.dataclass(frozen=True)
class SeedDecision:
    variant: str
    seeds: int  # seeds planned so far
    n: int  # finished runs (the interval's sample)
    half_width: float  # of the interval of the mean; NaN below two finished runs
    state: SeedState
    next_seeds: int  # seeds it has after this decision (== seeds unless MORE)


def half_width(accuracies: Sequence[float], confidence: float) -> float:
    """Half the width of the table's interval of the mean (NaN below two values)."""
    from harness.aggregate import mean_ci

    _mean, _std, low, high = mean_ci(list(accuracies), confidence=confidence)
    return (high - low) / 2 if not math.isnan(low) else math.nan


def seeds_needed(std: float, policy: AdaptiveSeeds) -> int:
    """The fewest runs whose interval of the mean, with this spread, is within the target
    (`policy.max` when even that is not enough)."""
    from harness.stats import t_quantile

    for n in range(2, policy.max + 1):
        if t_quantile(policy.confidence, n - 1) * std / math.sqrt(n) <= policy.ci_half_width:
            return n
    return policy.max


def decide(policy: AdaptiveSeeds, variant: str, seeds: int, records: Sequence[RunRecord]) -> SeedDecision:
    """What a variant with `seeds` planned seeds and these records of them needs next (accuracy in
    points, as in the table)."""
    done = [100.0 * r.test_accuracy for r in records if r.status is RunStatus.DONE and r.test_accuracy is not None]
    failures = sum(1 for r in records if r.status.is_failure())
    width = half_width(done, policy.confidence)

    def decision(state: SeedState, next_seeds: int = seeds) -> SeedDecision:
        return SeedDecision(variant, seeds, len(done), width, state, next_seeds)

    if records and failures * 2 > len(records):
        return decision(SeedState.MOSTLY_FAILED)
    if not math.isnan(width) and width <= policy.ci_half_width:
        return decision(SeedState.PRECISE)
    if seeds >= policy.max:
        return decision(SeedState.AT_MAX)
    if math.isnan(width):  # fewer than two finished runs (some failed): one more seed
        return decision(SeedState.MORE, seeds + 1)
    std = width * math.sqrt(len(done)) / _t(policy, len(done))
    wanted = seeds_needed(std, policy) + failures  # as many seeds again may fail
    return decision(SeedState.MORE, max(seeds + 1, min(wanted, 2 * seeds, policy.max)))


def _t(policy: AdaptiveSeeds, n: int) -> float:
    from harness.stats import t_quantile

    return t_quantile(policy.confidence, n - 1)


def first_counts(
    policy: AdaptiveSeeds, variants: Sequence[str], candidates: Sequence[int], stored: Iterable[tuple[str, int]] = ()
) -> dict[str, int]:
    """Seeds per variant for the first round: `min`, or, resuming, as many of the candidates (in
    order) as the stored plan already holds for that variant, up to `max`."""
    held: dict[str, set[int]] = {}
    for variant, seed in stored:
        held.setdefault(variant, set()).add(seed)
    counts = {}
    for name in variants:
        mine = held.get(name, set())
        prefix = 0
        while prefix < len(candidates) and candidates[prefix] in mine:
            prefix += 1
        counts[name] = min(policy.max, max(policy.min, prefix))
    return counts


def select(runs: Sequence[PlannedRun], counts: Mapping[str, int], candidates: Sequence[int]) -> list[PlannedRun]:
    """The runs of each variant's first `counts[variant]` candidate seeds, in plan order."""
    position = {seed: i for i, seed in enumerate(candidates)}
    return [r for r in runs if position.get(r.seed, len(candidates)) < counts.get(r.variant.name, 0)]


def describe_round(number: int, decisions: Sequence[SeedDecision], policy: AdaptiveSeeds) -> str:
    """One line after a round: what was decided for how many variants."""
    more = [d for d in decisions if d.state is SeedState.MORE]
    parts = []
    for state in SeedState:
        count = sum(1 for d in decisions if d.state is state)
        if count:
            parts.append(f"{count} {state.value}")
    line = f"adaptive seeds, round {number}: {', '.join(parts)} (target +-{policy.ci_half_width:g} points)"
    if more:
        widest = max(more, key=lambda d: (d.half_width if not math.isnan(d.half_width) else math.inf))
        added = sum(d.next_seeds - d.seeds for d in more)
        width = "n<2" if math.isnan(widest.half_width) else f"+-{widest.half_width:.2f}"
        line += f"; {added} more runs for {len(more)} variants (widest: {widest.variant} {width})"
    return line
