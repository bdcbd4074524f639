"""The ETA cost model, on injected runs (no clocks, no training)."""

from __future__ import annotations

import pytest

from harness.eta import OVERDUE_GRACE_S, PRIOR, CostModel, CostTracker, RunCost, fit_cost_model, run_cost


def test_run_cost_counts_steps_of_every_epoch() -> None:
    cost = run_cost(n_train=1000, validation_split=0.2, batch_size=32, epochs=3, train_flops=7)
    assert cost == RunCost(steps=25 * 3, flops=7)


def test_a_step_bound_and_a_flop_bound_population_are_both_recovered() -> None:
    truth = CostModel(1.5, 0.004, 2e-11, "truth")
    costs = [RunCost(s, f) for s, f in [(1000, 1e11), (30000, 2e11), (2000, 5e12), (50000, 1e12), (8000, 8e12)]]
    model = fit_cost_model([(c, truth.predict(c)) for c in costs])
    assert model.source == "fit (5 runs)"
    assert model.step_s == pytest.approx(0.004, rel=1e-6) and model.flop_s == pytest.approx(2e-11, rel=1e-6)
    assert model.intercept_s == pytest.approx(1.5, rel=1e-6)
    # A FLOPs-only rate would badly under-predict a step-bound run; this model does not.
    small_batch = RunCost(steps=94_000, flops=3e11)
    assert model.predict(small_batch) == pytest.approx(truth.predict(small_batch), rel=1e-6)


def test_no_runs_uses_the_prior_and_few_runs_scale_it() -> None:
    assert fit_cost_model([]) is PRIOR
    cost = RunCost(1000, 4e10)
    scaled = fit_cost_model([(cost, 2 * PRIOR.predict(cost))])
    assert scaled.source == "scaled prior (1 runs)"
    assert scaled.predict(RunCost(5000, 1e11)) == pytest.approx(2 * PRIOR.predict(RunCost(5000, 1e11)))


def test_negative_coefficients_are_refused() -> None:
    # Time falls as steps grow: no physical fit with a negative step cost; FLOPs alone explain it.
    obs = [(RunCost(100, 4e9), 4.0), (RunCost(50, 8e9), 8.0), (RunCost(10, 1e10), 10.0), (RunCost(200, 2e9), 2.0)]
    model = fit_cost_model(obs)
    assert model.step_s >= 0 and model.flop_s > 0 and model.intercept_s >= 0
    assert model.predict(RunCost(0, 6e9)) == pytest.approx(6.0, rel=1e-6)


def test_tracker_predicts_per_device_and_shares_pending_work_among_slots() -> None:
    tracker = CostTracker()
    fast = CostModel(0.0, 0.001, 0.0, "t")
    slow = CostModel(0.0, 0.004, 0.0, "t")
    for steps in (100, 200, 300, 400):
        tracker.observe("gpu0", RunCost(steps, 0), fast.predict(RunCost(steps, 0)))
        tracker.observe("cpu", RunCost(steps, 0), slow.predict(RunCost(steps, 0)))
    assert tracker.model("gpu0").step_s == pytest.approx(0.001)
    assert tracker.model("cpu").step_s == pytest.approx(0.004)
    eta = tracker.eta_s(pending=[RunCost(1000, 0)] * 4, running=[("cpu", RunCost(1000, 0), 1.0)], slots=2)
    pooled = tracker.model(None).predict(RunCost(1000, 0))
    assert eta == pytest.approx((4 * pooled + 3.0) / 2)
    # one long run left on one device: the ETA is what it still needs, not a share of it
    assert tracker.eta_s(pending=[], running=[("cpu", RunCost(1000, 0), 1.0)], slots=4) == pytest.approx(3.0)
    # a fused group of three on one device: their predictions add up, the group's age counts once
    group = [("cpu", RunCost(1000, 0), 5.0)] * 3
    assert tracker.eta_s(pending=[], running=group, slots=1) == pytest.approx(3 * 4.0 - 5.0)


def test_progress_counts_runs_not_attempts_and_eta_follows_the_fitted_model(tmp_path, data_dir) -> None:
    """A retried run is running again, not finished twice: never `[3/2] pending -2`."""
    import io

    from harness.records import RunStatus
    from harness.spec import load_sweep
    from harness.sweep import Progress, prepare_sweep

    from conftest import tiny_sweep_text, write_sweep

    prepared = prepare_sweep(load_sweep(write_sweep(tmp_path / "s.yaml", tiny_sweep_text(seeds=2))), data_dir=data_dir)
    runs = [r for r in prepared.runs if r.variant.name == "mlp_32"]
    now = [0.0]
    stream = io.StringIO()
    progress = Progress(runs, stream=stream, clock=lambda: now[0])

    def record(run, status, wall_s):
        return run.record(status, timings={"wall_s": wall_s}, metrics={"test_accuracy": 0.9}, device="cpu")

    assert progress.eta_s() is None  # nothing finished: no estimate
    progress.started(runs[0], "w0")
    now[0] = 3.0
    progress.finished(record(runs[0], RunStatus.FAILED, 3.0))
    progress.started(runs[0], "w0")  # retry
    assert (progress.done, progress.failed, progress.pending, len(progress.running)) == (0, 0, 1, 1)
    now[0] = 7.0
    progress.finished(record(runs[0], RunStatus.DONE, 4.0))
    progress.started(runs[1], "w0")
    now[0] = 8.0
    # the second run costs what the first did; it has run 1 s of its predicted 4 s
    assert progress.eta_s() == pytest.approx(3.0)
    progress.finished(record(runs[1], RunStatus.DONE, 4.0))
    lines = stream.getvalue().splitlines()
    finished = [line for line in lines if line.startswith("[")]
    assert [line.split("]")[0] for line in finished] == ["[1/2", "[1/2", "[2/2"]
    assert "done 2 failed 0 running 0 pending 0" in finished[-1]
    assert "pending -" not in stream.getvalue()


def test_a_device_past_its_prediction_has_no_eta() -> None:
    tracker = CostTracker()
    model = CostModel(0.0, 0.004, 0.0, "t")
    for steps in (100, 200, 300, 400):
        tracker.observe("cpu", RunCost(steps, 0), model.predict(RunCost(steps, 0)))
    predicted = tracker.model("cpu").predict(RunCost(1000, 0))  # 4 s
    # on time: what it still needs plus the pending run
    on_time = tracker.eta_s(pending=[RunCost(1000, 0)], running=[("cpu", RunCost(1000, 0), predicted - 1.0)], slots=1)
    assert on_time == pytest.approx(1.0 + predicted)
    # past the prediction: unknown, not a count-down stuck at zero
    late = predicted + OVERDUE_GRACE_S + 0.1
    assert tracker.eta_s(pending=[RunCost(1000, 0)], running=[("cpu", RunCost(1000, 0), late)], slots=1) is None
    # a fused group's predictions add up before the rule applies
    group = [("cpu", RunCost(1000, 0), late)] * 3
    assert tracker.eta_s(pending=[], running=group, slots=1) == pytest.approx(3 * predicted - late)
