"""Remaining-time estimate from a cost model fitted to the runs already finished (pure: no clocks,
no Keras; `sweep.Progress` feeds it).

A run's cost is its optimizer steps and its estimated training FLOPs; its time on a device is
modelled as `intercept + a * steps + b * flops` (non-negative coefficients), fitted by least
squares to the runs finished on that device. Small-batch runs are step-bound and large models
FLOP-bound, so neither alone predicts both (a FLOPs-only ETA said 2 minutes where 10 remained).
Before enough runs have finished, a prior (per-step and FLOP-rate guesses) is scaled to the
runs seen so far; before any, the prior itself is used.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Iterable, Sequence

# Priors for a 2-core CPU (issue 8: ~42 GFLOP/s reached; a few ms of dispatch per step).
PRIOR_STEP_S = 0.003
PRIOR_FLOPS_PER_S = 40e9
PRIOR_RUN_S = 2.0  # building, compiling and evaluating a model
# A device whose runs have taken longer than their prediction (+ OVERDUE_GRACE_S, for the poll's
# jitter) is past what the model knows: the ETA is unknown ("?") rather than a count-down stuck at
# 0:00:00 (seen on a fused group of seed 000's 256x4 network, predicted from the 32x4 group).
OVERDUE_FACTOR = 1.0
OVERDUE_GRACE_S = 2.0


@dataclasses.dataclass(frozen=True)
class RunCost:
    steps: int  # optimizer steps over the whole run
    flops: int  # estimated training FLOPs over the whole run


def run_cost(*, n_train: int, validation_split: float, batch_size: int, epochs: int, train_flops: int) -> RunCost:
    n_fit = max(1, int(n_train * (1.0 - validation_split)))
    return RunCost(steps=math.ceil(n_fit / batch_size) * epochs, flops=int(train_flops))


@dataclasses.dataclass(frozen=True)
class CostModel:
    intercept_s: float
    step_s: float
    flop_s: float
    source: str  # "prior", "scaled prior (n runs)" or "fit (n runs)"

    def predict(self, cost: RunCost) -> float:
        return self.intercept_s + self.step_s * cost.steps + self.flop_s * cost.flops


PRIOR = CostModel(PRIOR_RUN_S, PRIOR_STEP_S, 1.0 / PRIOR_FLOPS_PER_S, "prior")
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
    """The model of one device from its finished runs' (cost, seconds). With fewer points than a
    subset of (intercept, steps, FLOPs) needs to be over-determined, or no non-negative fit, the
    prior scaled by the observed total time over the prior's total (`scaled prior`)."""
    obs = [(c, s) for c, s in observations if s > 0 and math.isfinite(s)]
    if not obs:
        return prior
    columns = {
        "intercept_s": [1.0] * len(obs),
        "step_s": [float(c.steps) for c, _ in obs],
        "flop_s": [float(c.flops) for c, _ in obs],
    }
    ys = [s for _, s in obs]
    best: tuple[float, dict[str, float]] | None = None
    for size in (3, 2, 1):
        for subset in itertools.combinations(_FEATURES, size):
            if len(obs) < size + 2:  # two spare points: no fit through noise
                continue
            rows = [[columns[name][i] for name in subset] for i in range(len(obs))]
            coefs = _lstsq(rows, ys)
            if coefs is None or any(c < 0 for c in coefs):
                continue
            residual = sum((sum(c * x for c, x in zip(coefs, row)) - y) ** 2 for row, y in zip(rows, ys))
            if best is None or residual < best[0] * (1 - 1e-9):
                best = (residual, dict(zip(subset, coefs)))
        if best is not None:
            break  # the largest subset that fits non-negatively
    if best is not None:
        values = {name: best[1].get(name, 0.0) for name in _FEATURES}
        return CostModel(**values, source=f"fit ({len(obs)} runs)")
    factor = sum(ys) / sum(prior.predict(c) for c, _ in obs)
    return CostModel(
        prior.intercept_s * factor, prior.step_s * factor, prior.flop_s * factor, source=f"scaled prior ({len(obs)} runs)"
    )


class CostTracker:
    """Finished runs per device, and the remaining time they predict."""

    def __init__(self, prior: CostModel = PRIOR) -> None:
        self.prior = prior
        self._seen: dict[str, list[tuple[RunCost, float]]] = {}
        self._models: dict[str, CostModel] = {}

    def observe(self, device: str, cost: RunCost, seconds: float) -> None:
        self._seen.setdefault(device, []).append((cost, seconds))
        self._models.pop(device, None)

    def model(self, device: str | None = None) -> CostModel:
        """The device's model; `None`: one fitted to every device's runs (for runs not started)."""
        key = device if device in self._seen else None
        if key is None and not self._seen:
            return self.prior
        if key not in self._models:
            obs = self._seen[key] if key is not None else [o for v in self._seen.values() for o in v]
            self._models[key] = fit_cost_model(obs, prior=self.prior)  # type: ignore[index]
        return self._models[key]  # type: ignore[index]

    def eta_s(
        self, *, pending: Iterable[RunCost], running: Iterable[tuple[str, RunCost, float]], slots: int
    ) -> float | None:
        """Seconds until every run is done: what each busy device still needs (the predictions of
        the runs it trains, fused or not, less how long it has been at them) and the pending
        runs' predictions, shared by `slots` parallel workers; at least the busiest device's.
        None (unknown) while a device has been at its runs for more than `OVERDUE_FACTOR` times
        their prediction plus `OVERDUE_GRACE_S`: the model is wrong for it, and a count-down
        stuck at zero (or a made-up remainder) would say otherwise."""
        pending_s = sum(self.model(None).predict(c) for c in pending)
        busy: dict[str, tuple[float, float]] = {}
        for device, cost, age in running:
            predicted, oldest = busy.get(device, (0.0, 0.0))
            busy[device] = (predicted + self.model(device).predict(cost), max(oldest, age))
        if any(age > OVERDUE_FACTOR * predicted + OVERDUE_GRACE_S for predicted, age in busy.values()):
            return None
        left = [max(0.0, predicted - age) for predicted, age in busy.values()]
        total = (pending_s + sum(left)) / max(1, slots)
        return max(total, max(left, default=0.0))
