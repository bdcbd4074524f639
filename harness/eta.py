"""Remaining-time estimate from a cost model fitted to the runs already finished (pure: no clocks,
no Keras; `sweep.Progress` feeds it).

A run's cost is its optimizer steps and its estimated training FLOPs; its time on a device is
modelled as `intercept + a * steps + b * flops` (non-negative coefficients), fitted by least
squares to the runs finished on that device. Small-batch runs are step-bound and large models
FLOP-bound, so neither alone predicts both (a FLOPs-only ETA said 2 minutes where 10 remained).
Before enough runs have finished, a prior (per-step and FLOP-rate guesses) is scaled to the
runs seen so far; before any, the prior itself is used.

A group still training that has reported how far it is (`harness.heartbeat`: the fraction of its
epochs done) is predicted from its own pace instead (`extrapolate`), and that prediction also
stands in for a finished run when the model of the runs not started yet is fitted: the first
estimate comes after the first epoch of the first group, not after the first run ends.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
from typing import Iterable, Sequence, Union

# Priors for a 2-core CPU (issue 8: ~42 GFLOP/s reached; a few ms of dispatch per step): the ETA's
# baseline, which its fits replace once they predict the runs seen better (see ORDER_PRIOR).
PRIOR_STEP_S = 0.003
PRIOR_FLOPS_PER_S = 40e9
PRIOR_RUN_S = 2.0  # building, compiling and evaluating a model
# A device whose runs have taken longer than their prediction (+ OVERDUE_GRACE_S, for the poll's
# jitter) is past what the model knows: the ETA is unknown ("?") rather than a count-down stuck at
# 0:00:00 (seen on a fused group of seed 000's 256x4 network, predicted from the 32x4 group).
OVERDUE_FACTOR = 1.0
OVERDUE_GRACE_S = 2.0
# A group predicted from its own pace (plus the tail groups take after their epochs,
# `sweep.Progress.tail_s`) is overdue only 10% past it: the pace between two reports is noisy.
EXTRAPOLATED_SLACK = 1.1
# The cost model's features are chosen on at most this many distinct run costs (the latest).
SELECTION_POINTS = 48
# Runs not started are predicted from fewer than this many distinct costs (finished or paced):
# the estimate is shown as rough (`~`).
ROUGH_BELOW = 3


@dataclasses.dataclass(frozen=True)
class RunCost:
    steps: int  # optimizer steps over the whole run
    flops: int  # estimated training FLOPs over the whole run


def run_cost(*, n_fit: int, batch_size: int, epochs: int, train_flops: int) -> RunCost:
    """The cost of training on `n_fit` examples (`PlannedRun.n_fit`) for `epochs` epochs."""
    return RunCost(steps=math.ceil(max(1, n_fit) / batch_size) * epochs, flops=int(train_flops))


def extrapolate(reports: Sequence[tuple[float, float]]) -> float | None:
    """A training group's expected total seconds from its progress reports, (seconds since it
    started, fraction of its epochs done), oldest first: from the pace between its first and
    latest report, which leaves out building, compiling and the first epoch's tracing. None
    before two reports (the time to a first one holds the setup: scaled up, it once predicted 35
    minutes for a 10-minute sweep) unless that one says the training is done."""
    usable = [(age, done) for age, done in reports if done > 0 and age > 0 and math.isfinite(age) and math.isfinite(done)]
    if not usable:
        return None
    first_age, first_done = usable[0]
    age, done = usable[-1]
    if done >= 1.0:
        return age  # trained: what is left (the test evaluation) is small
    if done > first_done and age > first_age:
        return age + (1.0 - done) * (age - first_age) / (done - first_done)
    return None


# A pending unit of work: one run's cost, or the costs of the runs one worker trains together.
Pending = Union[RunCost, Sequence[RunCost]]


@dataclasses.dataclass(frozen=True)
class Running:
    """A run being trained: where, its cost, how long its device has been at it, and, when its
    group reported progress, the group's extrapolated total seconds (`paced_total_s`, the same
    for each of its runs) and how many runs the group started with (`group_size`); after one
    report only, that report's time over its fraction (`first_total_s`: it holds the setup, so
    it is used only where the cost model is already past)."""

    device: str
    cost: RunCost
    age_s: float
    paced_total_s: float | None = None
    group_size: int = 1
    first_total_s: float | None = None  # with one report only: its time over its fraction


@dataclasses.dataclass(frozen=True)
class CostModel:
    intercept_s: float
    step_s: float
    flop_s: float
    source: str  # "prior", "scaled prior (n runs)" or "fit (n runs)"
    distinct: int = 0  # distinct run costs it was fitted to (runs of one fused group share one)

    def predict(self, cost: RunCost) -> float:
        return self.intercept_s + self.step_s * cost.steps + self.flop_s * cost.flops


PRIOR = CostModel(PRIOR_RUN_S, PRIOR_STEP_S, 1.0 / PRIOR_FLOPS_PER_S, "prior")
# What orders a sweep's queue before any of its runs is known (`sweep.expected_seconds`): today's
# engine on a 2-core CPU, per run of a 5-copy fused group on TensorFlow, one core per worker (a
# least-squares fit to the 10 groups of sweeps/seed_notebooks.yaml, 2026-12-01: 0.36 ms per step,
# 76 GFLOP/s, 0.94 s per run; its widest miss, the notebook CNN: 26 s said, 38 s taken). Under
# PRIOR's 3 ms a step, a 42-s group of 18,750 small steps started before that sweep's 188-s CNN,
# which then ran alone at the end. As the ETA's baseline it did worse: scaled to the runs seen, it
# beat the fits in their leave-one-out and said 18-53% too much under `auto` (JAX's steps are
# cheaper) where PRIOR's fits said within 8% (up to 19% too much in its last 40 s).
ORDER_PRIOR = CostModel(1.0, 0.00036, 1.0 / 76e9, "order prior")
_FEATURES = ("intercept_s", "step_s", "flop_s")


def _lstsq(rows: list[list[float]], ys: list[float]) -> list[float] | None:
    """Least squares by the normal equations (at most 3 unknowns); None when singular."""
    k = len(rows[0])
    a = [[sum(r[i] * r[j] for r in rows) for j in range(k)] for i in range(k)]
    b = [sum(r[i] * y for r, y in zip(rows, ys)) for i in range(k)]
    scale = [math.sqrt(a[i][i]) or 1.0 for i in range(k)]
    a = [[a[i][j] / (scale[i] * scale[j]) for j in range(k)] for i in range(k)]
    b = [b[i] / scale[i] for i in range(k)]
    for col in range(k):  # Gaussian elimination with partial pivoting
        pivot = max(range(col, k), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-9:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        b[col], b[pivot] = b[pivot], b[col]
        for r in range(k):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [x - f * y for x, y in zip(a[r], a[col])]
                b[r] -= f * b[col]
    return [b[i] / a[i][i] / scale[i] for i in range(k)]


def fit_cost_model(observations: Sequence[tuple[RunCost, float]], *, prior: CostModel = PRIOR) -> CostModel:
    """The model of one device from its finished runs' (cost, seconds).

    Candidates: the prior scaled by the observed total time over the prior's total (`scaled
    prior`), and a non-negative least-squares fit of each subset of (intercept, steps, FLOPs)
    but the intercept alone (a constant does not grow with the run), given two distinct costs
    more than it has features.
    The one chosen predicts each distinct cost best from the others (leave-one-out, squared log
    ratio: an ETA sums runs of very different lengths; the latest `SELECTION_POINTS` costs) and is
    fitted to one point per distinct cost (its mean time); ties go to the simpler. Runs of one
    fused group share one cost, so repeats count once: five finished runs of one group say how
    fast this device is, not how time grows with steps and FLOPs (a fit to them alone once said
    every run takes as long as these). Few distinct costs leave the scaled prior."""
    obs = [(c, s) for c, s in observations if s > 0 and math.isfinite(s)]
    if not obs:
        return prior
    points = _mean_per_cost(obs)
    chooser = points[-SELECTION_POINTS:]  # leave-one-out is quadratic: the latest costs choose
    best: tuple[float, tuple[str, ...] | None] = (_loo_error(None, chooser, prior), None)
    for size in (1, 2, 3):
        for subset in itertools.combinations(_FEATURES, size):
            # a constant alone does not grow with the run (it once said 24 minutes for a 10-minute
            # sweep: every small run as long as the two big ones seen); each fold keeps a spare point
            if subset == ("intercept_s",) or len(chooser) < size + 2:
                continue
            error = _loo_error(subset, chooser, prior)
            if error < best[0] * (1 - 1e-9) - 1e-12:
                best = (error, subset)
    if best[1] is not None:
        fitted = _fit_subset(best[1], points, source=f"fit ({len(obs)} runs)")
        if fitted is not None:
            return dataclasses.replace(fitted, distinct=len(points))
    return _scaled_prior(points, prior, distinct=len(points), runs=len(obs))


def _mean_per_cost(obs: Sequence[tuple[RunCost, float]]) -> list[tuple[RunCost, float]]:
    """One point per distinct run cost, its mean time (the runs of one fused group share one)."""
    by_cost: dict[RunCost, list[float]] = {}
    for cost, seconds in obs:
        by_cost.setdefault(cost, []).append(seconds)
    return [(cost, sum(times) / len(times)) for cost, times in by_cost.items()]


def _steps_per_flop(cost: RunCost) -> float:
    return cost.steps / max(1, cost.flops)


def _scaled_prior(
    obs: Sequence[tuple[RunCost, float]], prior: CostModel, *, distinct: int, runs: int | None = None
) -> CostModel:
    factor = sum(s for _, s in obs) / sum(prior.predict(c) for c, _ in obs)
    return CostModel(
        prior.intercept_s * factor, prior.step_s * factor, prior.flop_s * factor,
        source=f"scaled prior ({len(obs) if runs is None else runs} runs)", distinct=distinct,
    )


def _fit_subset(subset: tuple[str, ...], obs: Sequence[tuple[RunCost, float]], *, source: str = "fit") -> CostModel | None:
    """Least squares of time on the `subset` features (the others 0); None when singular or a
    coefficient is negative. The two rates alone (steps and FLOPs: `time = a * steps + b * flops`,
    the cost of a run without a constant) are fitted non-negative instead: where the plain fit
    gives one rate a negative value, the better of the two one-rate fits (the non-negative least
    squares). Otherwise a leave-one-out fold of them that came out negative disqualified them, and
    FLOPs alone, chosen instead, put small step-bound MLPs at half their time (the notebooks sweep
    under `auto`, 42-61% too little for half a minute once a step-bound group had been seen)."""
    columns = {"intercept_s": lambda c: 1.0, "step_s": lambda c: float(c.steps), "flop_s": lambda c: float(c.flops)}
    rows = [[columns[name](c) for name in subset] for c, _ in obs]
    coefs = _lstsq(rows, [s for _, s in obs])
    if coefs is None or any(c < 0 for c in coefs):
        if tuple(subset) != ("step_s", "flop_s"):
            return None
        ones = [m for m in (_fit_subset((name,), obs, source=source) for name in subset) if m is not None]
        return min(ones, key=lambda m: sum((m.predict(c) - s) ** 2 for c, s in obs), default=None)
    values = dict.fromkeys(_FEATURES, 0.0) | dict(zip(subset, coefs))
    return CostModel(**values, source=source)


def _loo_error(subset: tuple[str, ...] | None, points: Sequence[tuple[RunCost, float]], prior: CostModel) -> float:
    """Mean squared log ratio of each point's prediction from the others (`subset` None: the
    scaled prior); infinite when a fold cannot be fitted. One point: nothing to test, 0."""
    if len(points) < 2:
        return 0.0
    total = 0.0
    for index, (cost, seconds) in enumerate(points):
        others = [p for i, p in enumerate(points) if i != index]
        model = _scaled_prior(others, prior, distinct=0) if subset is None else _fit_subset(subset, others)
        if model is None:
            return math.inf
        predicted = model.predict(cost)
        if predicted <= 0:
            return math.inf
        total += math.log(predicted / seconds) ** 2
    return total / len(points)


class CostTracker:
    """Finished runs per device, and the remaining time they predict."""

    def __init__(self, prior: CostModel = PRIOR) -> None:
        self.prior = prior
        self._seen: dict[str, list[tuple[RunCost, float]]] = {}
        self._models: dict[str | None, CostModel] = {}
        self._paced: tuple[tuple, CostModel] | None = None  # the pooled model with paces, and its key

    def observe(self, device: str, cost: RunCost, seconds: float) -> None:
        self._seen.setdefault(device, []).append((cost, seconds))
        self._models.pop(device, None)
        self._models.pop(None, None)  # the pooled model holds every device's runs

    def model(self, device: str | None = None) -> CostModel:
        """The device's model; `None`: one fitted to every device's runs (for runs not started)."""
        key = device if device in self._seen else None
        if key is None and not self._seen:
            return self.prior
        if key not in self._models:
            obs = self._seen[key] if key is not None else [o for v in self._seen.values() for o in v]
            self._models[key] = fit_cost_model(obs, prior=self.prior)  # type: ignore[index]
        return self._models[key]  # type: ignore[index]

    def eta_s(self, *, pending: Iterable[Pending], running: Iterable[Running], slots: int) -> float | None:
        return self.estimate(pending=pending, running=running, slots=slots).seconds

    def estimate(self, *, pending: Iterable[Pending], running: Iterable[Running], slots: int) -> "Estimate":
        """Seconds until every run is done: what each busy device still needs (the predictions of
        the runs it trains, fused or not, from their group's own pace where it reported one, less
        how long it has been at them), then the pending work as the dispatcher hands it out
        (`finish_time`): each pending group (a run's cost, or a sequence of the costs of the runs
        one worker will train together), in the order given (the dispatcher's queue), goes to
        whichever of the `slots` workers is free first. Dividing the pending total by the workers said 15-20% too little on the
        notebooks sweep: one worker can hold a long group while the others run out of work.
        The pending runs' model is fitted to the finished runs and to the extrapolated totals of
        the runs still training.
        None (unknown) while a device has been at its runs for more than `OVERDUE_FACTOR` times
        their prediction plus `OVERDUE_GRACE_S` (`EXTRAPOLATED_SLACK` for a pace): the model is
        wrong for it, and a count-down stuck at zero (or a made-up remainder) would say otherwise."""
        running = list(running)
        pending = [(unit,) if isinstance(unit, RunCost) else tuple(unit) for unit in pending]
        provisional = [(r.cost, r.paced_total_s / max(1, r.group_size)) for r in running if r.paced_total_s is not None]
        seen = [o for observed in self._seen.values() for o in observed]
        pooled = self.model(None)
        if provisional:
            key = (len(seen), tuple(provisional))
            if self._paced is None or self._paced[0] != key:  # paces change at most once a second
                self._paced = (key, fit_cost_model(seen + provisional, prior=self.prior))
            pooled = self._paced[1]
        pooled = beyond_the_runs_seen(pooled, seen + provisional, [c for unit in pending for c in unit])
        units = [sum(pooled.predict(c) for c in unit) for unit in pending if unit]
        # per device: the predictions of its runs without a pace (a fused group's add up), or
        # its paced group's total (whichever of its runs are still to be recorded)
        busy: dict[str, tuple[float, float, bool]] = {}
        first: dict[str, float] = {}  # a group's total from its first report alone
        for r in running:
            predicted, oldest, paced = busy.get(r.device, (0.0, 0.0, False))
            if r.paced_total_s is not None:
                predicted, paced = (predicted if paced else 0.0), True
                predicted = max(predicted, r.paced_total_s)
            elif not paced:
                predicted += self.model(r.device).predict(r.cost)
            if r.first_total_s is not None:
                first[r.device] = max(first.get(r.device, 0.0), r.first_total_s)
            busy[r.device] = (predicted, max(oldest, r.age_s), paced)
        stand_in = False
        for device, (predicted, age, paced) in list(busy.items()):
            if age > (EXTRAPOLATED_SLACK if paced else OVERDUE_FACTOR) * predicted + OVERDUE_GRACE_S:
                # past the model (a CNN after MLPs): its first report's time scaled up is a
                # pessimistic stand-in until a second report gives its pace (while still ahead)
                if first.get(device, 0.0) > age:
                    busy[device], stand_in = (first[device], age, True), True
                else:
                    return Estimate(None, rough=True)
        left = [max(0.0, predicted - age) for predicted, age, _paced in busy.values()]
        idle = [0.0] * max(0, max(1, slots) - len(left))
        rough = stand_in or (bool(units) and pooled.distinct < ROUGH_BELOW)
        return Estimate(finish_time(left + idle, units), rough=rough)


def beyond_the_runs_seen(
    model: CostModel, observations: Sequence[tuple[RunCost, float]], pending: Sequence[RunCost]
) -> CostModel:
    """`model`, or where it would extrapolate along a feature it left out, the steps-and-FLOPs fit
    to the same runs. A model chosen without steps (FLOPs alone predicted the runs seen best)
    says nothing of what steps cost: a pending run with more steps per FLOP than every run seen
    gets the steps-and-FLOPs fit when that one exists (both rates non-negative); the same for a
    model without FLOPs and a run with fewer steps per FLOP than every run seen. Found on the
    notebooks sweep under `auto`: four big groups seen, FLOPs alone chosen, the six small MLPs left
    predicted at 7.6-15.9 s a group where they took 16-33 s (27-61% too little for two minutes);
    the steps-and-FLOPs fit said 141 s for the six, 149 s in fact. Likewise a model with a
    constant and a pending run that the steps-and-FLOPs fit puts below every run seen: the
    notebooks sweep on TensorFlow with its four long groups first (2026-12-01) chose 30 s a run
    plus steps from them, and said 10-11 minutes for a minute where 3-4 were left (the six
    small groups at 30 s a run; they took 4-8 s)."""
    if not pending or not model.source.startswith("fit"):
        return model
    if model.step_s > 0 and model.flop_s > 0 and model.intercept_s == 0:
        return model
    points = _mean_per_cost([(c, s) for c, s in observations if s > 0 and math.isfinite(s)])
    if len(points) < 2:
        return model
    ratios = [_steps_per_flop(c) for c, _s in points]
    low, high = min(ratios), max(ratios)
    both = _fit_subset(("step_s", "flop_s"), points, source=f"{model.source}, steps and FLOPs beyond the runs seen")
    if both is None:
        return model
    shortest = min(s for _c, s in points)
    past = any(
        (model.step_s == 0 and _steps_per_flop(c) > high) or (model.flop_s == 0 and _steps_per_flop(c) < low)
        # shorter than every run seen (by the rates alone): a constant fitted to longer runs is
        # most of the prediction there
        or (model.intercept_s > 0 and both.predict(c) < shortest)
        for c in pending
    )
    return dataclasses.replace(both, distinct=model.distinct) if past else model


def finish_time(free_in: Sequence[float], units: Iterable[float]) -> float:
    """When the last worker is done: worker i is free in `free_in[i]` seconds, and each unit of
    work (seconds), in the order given, goes to the worker free first, as the dispatcher hands out
    its queue (`execute.order_groups`: longest first) to whichever worker is idle. (A sweep of
    several Keras backends gives a group only to a worker of its backend; not modelled.)"""
    heap = list(free_in) or [0.0]
    heapq.heapify(heap)
    for seconds in units:
        heapq.heappush(heap, heapq.heappop(heap) + seconds)
    return max(heap)


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Seconds left (None: unknown) and whether they are rough (`~`): the runs not started
    predicted from fewer than `ROUGH_BELOW` distinct run costs, or a group past the model
    standing in by its first report."""

    seconds: float | None
    rough: bool
