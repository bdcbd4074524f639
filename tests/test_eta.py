"""The ETA cost model, on injected runs (no clocks, no training)."""

from __future__ import annotations

import pytest

from harness.records import RunStatus

from harness.eta import (
    EXTRAPOLATED_SLACK,
    OVERDUE_GRACE_S,
    PRIOR,
    CostModel,
    CostTracker,
    RunCost,
    Running,
    beyond_the_runs_seen,
    extrapolate,
    finish_time,
    fit_cost_model,
    run_cost,
)


def test_run_cost_counts_steps_of_every_epoch() -> None:
    cost = run_cost(n_fit=800, batch_size=32, epochs=3, train_flops=7)
    assert cost == RunCost(steps=25 * 3, flops=7)
    assert run_cost(n_fit=801, batch_size=32, epochs=1, train_flops=0).steps == 26  # a last, smaller batch


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


def test_tracker_predicts_per_device_and_hands_pending_work_to_the_worker_free_first() -> None:
    tracker = CostTracker()
    fast = CostModel(0.0, 0.001, 0.0, "t")
    slow = CostModel(0.0, 0.004, 0.0, "t")
    for steps in (100, 200, 300, 400):
        tracker.observe("gpu0", RunCost(steps, 0), fast.predict(RunCost(steps, 0)))
        tracker.observe("cpu", RunCost(steps, 0), slow.predict(RunCost(steps, 0)))
    assert tracker.model("gpu0").step_s == pytest.approx(0.001)
    assert tracker.model("cpu").step_s == pytest.approx(0.004)
    eta = tracker.eta_s(pending=[RunCost(1000, 0)] * 4, running=[Running("cpu", RunCost(1000, 0), 1.0)], slots=2)
    pooled = tracker.model(None).predict(RunCost(1000, 0))
    assert pooled == pytest.approx(2.5)
    # the idle worker takes a run (free at 2.5), then the next (5.0); "cpu" is free at 3.0 and
    # takes the third (5.5); the idle one the fourth (7.5), not the even share (4 * 2.5 + 3) / 2
    assert eta == pytest.approx(7.5)
    # one long run left on one device: the ETA is what it still needs, not a share of it
    assert tracker.eta_s(pending=[], running=[Running("cpu", RunCost(1000, 0), 1.0)], slots=4) == pytest.approx(3.0)
    # a fused group of three on one device: their predictions add up, the group's age counts once
    group = [Running("cpu", RunCost(1000, 0), 5.0)] * 3
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
    on_time = tracker.eta_s(pending=[RunCost(1000, 0)], running=[Running("cpu", RunCost(1000, 0), predicted - 1.0)], slots=1)
    assert on_time == pytest.approx(1.0 + predicted)
    # past the prediction: unknown, not a count-down stuck at zero
    late = predicted + OVERDUE_GRACE_S + 0.1
    assert tracker.eta_s(pending=[RunCost(1000, 0)], running=[Running("cpu", RunCost(1000, 0), late)], slots=1) is None
    # a fused group's predictions add up before the rule applies
    group = [Running("cpu", RunCost(1000, 0), late)] * 3
    assert tracker.eta_s(pending=[], running=group, slots=1) == pytest.approx(3 * predicted - late)


def test_a_group_is_extrapolated_from_its_pace_between_reports() -> None:
    assert extrapolate([]) is None
    assert extrapolate([(5.0, 0.0), (float("nan"), 0.5), (6.0, float("inf"))]) is None
    # one report: unknown (the time to it holds the setup: scaled up, far too pessimistic)
    assert extrapolate([(12.0, 0.1)]) is None
    assert extrapolate([(12.0, 1.0)]) == pytest.approx(12.0)  # unless it says the training is done
    # two: the pace between them (10% per 8 s), which leaves the 4 s of setup out
    assert extrapolate([(12.0, 0.1), (20.0, 0.2)]) == pytest.approx(20.0 + 0.8 * 80.0)
    # all epochs trained: what it took (only the test evaluation is left)
    assert extrapolate([(12.0, 0.1), (90.0, 1.0)]) == pytest.approx(90.0)


def test_repeats_of_one_cost_scale_the_prior_instead_of_fitting_one_time_for_every_run() -> None:
    """Five finished runs of one fused group are one cost: they say how fast this device is, not
    how time grows with steps and FLOPs (an intercept-only fit said every run takes 80 s)."""
    long_run, short_run = RunCost(90_000, 3e11), RunCost(1_000, 1e10)
    model = fit_cost_model([(long_run, 80.0)] * 5)
    assert model.source == "scaled prior (5 runs)"
    assert model.predict(long_run) == pytest.approx(80.0)
    assert model.predict(short_run) / model.predict(long_run) == pytest.approx(
        PRIOR.predict(short_run) / PRIOR.predict(long_run)
    )


def test_a_paced_group_predicts_itself_and_the_runs_not_started() -> None:
    tracker = CostTracker()
    cost = RunCost(10_000, 0)
    # a fused pair whose pace says 100 s in all (50 s a run), 40 s in; two more such runs pending
    paced = [Running("cpu.0", cost, 40.0, 100.0, 2)] * 2
    assert tracker.eta_s(pending=[cost] * 2, running=paced, slots=1) == pytest.approx(60.0 + 2 * 50.0)
    # without a pace the (unscaled) prior decides: 2 + 0.003 * 10,000 = 32 s a run
    unpaced = [Running("cpu.0", cost, 40.0)] * 2
    assert tracker.eta_s(pending=[cost] * 2, running=unpaced, slots=1) == pytest.approx(64.0 - 40.0 + 64.0)
    # a pace is past its prediction only beyond the slack (its last epoch and the evaluation)
    within = 100.0 * EXTRAPOLATED_SLACK + OVERDUE_GRACE_S - 0.1
    assert tracker.eta_s(pending=[], running=[Running("cpu.0", cost, within, 100.0, 2)] * 2, slots=1) == 0.0
    late = within + 0.2
    assert tracker.eta_s(pending=[], running=[Running("cpu.0", cost, late, 100.0, 2)] * 2, slots=1) is None
    # the group's records arrive one by one: with one of its two runs recorded, its device still
    # needs what the group's pace says (not half of it, which read as overdue: "?")
    assert tracker.eta_s(pending=[], running=[Running("cpu.0", cost, 99.0, 100.0, 2)], slots=1) == pytest.approx(1.0)


def test_progress_has_an_eta_once_a_group_reports_its_pace(tmp_path, data_dir) -> None:
    import io

    from harness.sweep import Progress, prepare_sweep
    from harness.spec import load_sweep

    from conftest import tiny_sweep_text, write_sweep

    prepared = prepare_sweep(load_sweep(write_sweep(tmp_path / "s.yaml", tiny_sweep_text(seeds=2))), data_dir=data_dir)
    runs = [r for r in prepared.runs if r.variant.name == "mlp_32"]
    now = [0.0]
    stream = io.StringIO()
    progress = Progress(runs, stream=stream, clock=lambda: now[0], every_s=0.0)
    for run in runs:  # one fused group of both
        progress.started(run, "cpu.0")
    now[0] = 12.0
    assert progress.eta_s() is None  # no run finished, no report: no estimate
    ids = [r.run_id for r in runs]
    progress.advanced(ids, 0.1)
    assert progress.eta_s() is None  # one report: its time holds the setup, too rough to show
    now[0] = 20.0
    progress.advanced(ids, 0.2)
    now[0] = 21.0
    assert progress.eta_s() == pytest.approx(20.0 + 0.8 * 80.0 - 21.0)  # the pace since the first report
    progress.tick([("cpu.0", runs[0], 21.0)])
    assert "cpu.0 mlp_32 s0 21s 20% | done 0 failed 0 running 2 pending 0 | ETA 0:01:03 (0:00:21 elapsed)" in stream.getvalue()
    assert "| ETA ? (" in Progress(prepared.runs, stream=io.StringIO()).counts()  # nothing known
    # runs not started yet, predicted by the prior scaled to this one group: a rough estimate
    with_pending = Progress(prepared.runs, stream=io.StringIO(), clock=lambda: now[0])
    for run in runs:
        with_pending.started(run, "cpu.0")
    now[0] += 5.0
    with_pending.advanced(ids, 0.25)
    now[0] += 10.0
    with_pending.advanced(ids, 0.5)
    assert "| ETA ~" in with_pending.counts()
    # a report for runs not running (a stale message) changes nothing
    progress.advanced(["not-a-run"], 0.9)
    assert progress.fraction_done(ids[0]) == pytest.approx(0.2)
    now[0] = 84.0  # the group is trained; its records arrive one by one
    progress.finished(runs[0].record(RunStatus.DONE, timings={"wall_s": 42.0}, metrics={"test_accuracy": 0.9}))
    assert progress.fraction_done(ids[0]) is None
    assert progress.eta_s() == pytest.approx(0.0)  # not "?": the other run is the same group


def test_a_trained_group_s_tail_is_what_groups_took_after_their_last_epoch(tmp_path, data_dir) -> None:
    """A group's pace ends with its last epoch; its test evaluation and records come after. Once
    a group has finished here, that tail (from its last-epoch report to its records) is added to
    each group still training, so a trained group is not said to be done (0:00) for its last
    seconds; before any, nothing is added."""
    import io

    from harness.sweep import Progress, prepare_sweep
    from harness.spec import load_sweep

    from conftest import tiny_sweep_text, write_sweep

    prepared = prepare_sweep(load_sweep(write_sweep(tmp_path / "s.yaml", tiny_sweep_text(seeds=1))), data_dir=data_dir)
    first, second = prepared.runs[0], prepared.runs[1]
    now = [0.0]
    progress = Progress([first, second], stream=io.StringIO(), clock=lambda: now[0])
    progress.started(first, "cpu.0")
    progress.started(second, "cpu.1")
    now[0] = 10.0
    progress.advanced([first.run_id], 0.5)
    progress.advanced([second.run_id], 0.1)
    now[0] = 20.0
    progress.advanced([first.run_id], 1.0)  # trained: its test evaluation is under way
    progress.advanced([second.run_id], 0.2)
    assert progress.eta_s() == pytest.approx(20.0 + 0.8 * 100.0 - 20.0)  # no tail seen yet: none added
    now[0] = 26.0
    progress.finished(first.record(RunStatus.DONE, timings={"wall_s": 26.0}, metrics={"test_accuracy": 0.9}))
    assert progress.eta_s() == pytest.approx(20.0 + 0.8 * 100.0 + 6.0 - 26.0)  # its 6-s tail added
    now[0] = 100.0
    progress.advanced([second.run_id], 1.0)
    now[0] = 102.0
    assert progress.eta_s() == pytest.approx(4.0)  # trained 2 s ago: 4 s of its tail left, not 0
    now[0] = 110.0
    assert progress.eta_s() == pytest.approx(0.0)  # past it: nothing left to say


def test_a_fused_group_s_tail_counts_once_and_each_model_kind_has_its_own(tmp_path, data_dir) -> None:
    """The records of a fused group arrive together: one tail, not one per run. A CNN group is
    given the tails of CNN groups once one finished (until then those of any kind); a failed run
    gives none."""
    import io

    from harness.sweep import Progress, prepare_sweep
    from harness.spec import load_sweep

    from conftest import tiny_sweep_text, write_sweep

    prepared = prepare_sweep(load_sweep(write_sweep(tmp_path / "s.yaml", tiny_sweep_text(seeds=3))), data_dir=data_dir)
    mlp = [r for r in prepared.runs if r.variant.name == "mlp_32"]
    cnn = [r for r in prepared.runs if r.variant.name == "cnn_8"]
    now = [0.0]
    progress = Progress(prepared.runs, stream=io.StringIO(), clock=lambda: now[0])

    def group(runs, device, tail, status=RunStatus.DONE):
        for run in runs:
            progress.started(run, device)
        now[0] += 10.0
        progress.advanced([r.run_id for r in runs], 1.0)
        now[0] += tail
        for run in runs:
            progress.finished(run.record(status, timings={"wall_s": 10.0 + tail}, metrics={"test_accuracy": 0.9},
                                         error=None if status is RunStatus.DONE else "boom"))

    group(mlp[:2], "cpu.0", 2.0)  # two runs, one tail of 2 s
    group(mlp[2:], "cpu.0", 5.0)
    assert progress.tail_s(cnn[0].run_id) == pytest.approx(3.5)  # no CNN yet: the median of both MLP groups
    group(cnn[:1], "cpu.1", 30.0, RunStatus.FAILED)  # failed: no tail
    assert progress.tail_s(cnn[0].run_id) == pytest.approx(3.5)
    group(cnn[1:2], "cpu.1", 20.0)
    assert progress.tail_s(cnn[2].run_id) == pytest.approx(20.0)  # the CNNs' own
    assert progress.tail_s(mlp[0].run_id) == pytest.approx(3.5)  # the MLPs' own, unchanged


def test_an_estimate_of_runs_not_started_is_rough_until_the_model_is_fitted() -> None:
    tracker = CostTracker()
    cost = RunCost(10_000, 0)
    paced = [Running("cpu.0", cost, 40.0, 50.0, 1)]
    assert tracker.estimate(pending=[cost], running=paced, slots=1).rough  # the prior, scaled to one cost
    assert not tracker.estimate(pending=[], running=paced, slots=1).rough  # nothing left to the prior
    for steps in (1_000, 2_000, 4_000, 8_000):
        tracker.observe("cpu.0", RunCost(steps, 0), 0.005 * steps)
    estimate = tracker.estimate(pending=[cost], running=paced, slots=1)
    assert not estimate.rough and estimate.seconds == pytest.approx(10.0 + 0.005 * 10_000, rel=1e-6)


def test_the_pooled_model_is_refitted_as_runs_finish() -> None:
    """Without any progress report (the in-process executor), runs that finish after a first
    estimate still refine the model for the runs not started, and the `~` goes once it is fitted."""
    tracker = CostTracker()
    cost = RunCost(10_000, 0)
    tracker.observe("cpu.0", RunCost(1_000, 0), 5.0)
    assert tracker.estimate(pending=[cost], running=[], slots=1).rough
    for steps in (2_000, 4_000, 8_000):
        tracker.observe("cpu.0", RunCost(steps, 0), 0.005 * steps)
    estimate = tracker.estimate(pending=[cost], running=[], slots=1)
    assert not estimate.rough and estimate.seconds == pytest.approx(50.0, rel=1e-6)


def test_progress_paces_a_group_by_its_worker_clock(tmp_path, data_dir) -> None:
    """Two reports that reach the driver together (a busy driver, or Ray handing over several at
    once) are paced by when the worker made them, not by when they arrived."""
    import io

    from harness.sweep import Progress, prepare_sweep
    from harness.spec import load_sweep

    from conftest import tiny_sweep_text, write_sweep

    prepared = prepare_sweep(load_sweep(write_sweep(tmp_path / "s.yaml", tiny_sweep_text(seeds=1))), data_dir=data_dir)
    run = prepared.runs[0]
    now = [0.0]
    progress = Progress([run], stream=io.StringIO(), clock=lambda: now[0])
    progress.started(run, "cpu.0")
    now[0] = 30.0
    progress.advanced([run.run_id], 0.2, age_s=20.0)
    progress.advanced([run.run_id], 0.4, age_s=29.0)
    assert progress.eta_s() == pytest.approx(29.0 + 0.6 * 9.0 / 0.2 - 30.0)


def test_a_few_similar_times_do_not_make_every_run_as_long() -> None:
    """The notebooks sweep's first two groups (seed 004's 94,000-step MLP and seed 000's 256x4
    network) take 80 and 46 s a run: two costs leave the scaled prior; three long runs of about
    one length never mean a constant time per run (it said 24 minutes for a 10-minute sweep)."""
    small = RunCost(9_375, 9.9e10)
    two = fit_cost_model([(RunCost(93_750, 1.21e12), 80.0), (RunCost(12_000, 2.879e12), 46.0)])
    assert two.source.startswith("scaled prior") and two.predict(small) < 20.0
    three = fit_cost_model([(RunCost(93_750, 1.21e12), 50.0), (RunCost(12_000, 2.879e12), 52.0),
                            (RunCost(40_000, 1e12), 48.0)])
    assert three.predict(RunCost(100, 1e9)) < 5.0


def test_a_group_past_the_model_with_one_report_is_estimated_from_it() -> None:
    """A CNN after MLPs: the model says 20 s, the group is at 60 s with one report (25% at 50 s).
    Its time over its fraction (200 s) stands in for it rather than "?"; without that report the
    device is past its prediction: unknown."""
    tracker = CostTracker()
    for steps in (1_000, 2_000, 4_000, 8_000):
        tracker.observe("cpu.0", RunCost(steps, 0), 0.005 * steps)
    cnn = RunCost(4_000, 0)  # 20 s by the model
    reported = [Running("cpu.0", cnn, 60.0, None, 1, 200.0)]
    assert tracker.eta_s(pending=[], running=reported, slots=1) == pytest.approx(140.0)
    assert tracker.eta_s(pending=[], running=[Running("cpu.0", cnn, 60.0)], slots=1) is None
    assert tracker.estimate(pending=[], running=reported, slots=1).rough  # a pessimistic stand-in
    # where the model is not past, it decides (the first report's time holds the setup)
    assert tracker.eta_s(pending=[], running=[Running("cpu.0", cnn, 10.0, None, 1, 200.0)], slots=1) == pytest.approx(10.0)
    # past the stand-in too: unknown, not a count-down stuck at zero
    assert tracker.eta_s(pending=[], running=[Running("cpu.0", cnn, 201.0, None, 1, 200.0)], slots=1) is None


def test_progress_stands_in_for_a_group_past_the_model_by_its_first_report(tmp_path, data_dir) -> None:
    """Runs of the other variant finished fast; the CNN group has one report (25% at 50 s by its
    worker's clock): 200 s in all, so 140 s left at 60 s, shown rough; at 230 s, unknown."""
    import io

    from harness.sweep import Progress, prepare_sweep
    from harness.spec import load_sweep

    from conftest import tiny_sweep_text, write_sweep

    prepared = prepare_sweep(load_sweep(write_sweep(tmp_path / "s.yaml", tiny_sweep_text(seeds=2))), data_dir=data_dir)
    mlp = [r for r in prepared.runs if r.variant.name == "mlp_32"]
    cnn = [r for r in prepared.runs if r.variant.name == "cnn_8"]
    now = [0.0]
    progress = Progress(prepared.runs, stream=io.StringIO(), clock=lambda: now[0])
    for run in mlp:
        progress.started(run, "cpu.0")
        now[0] += 1.0
        progress.finished(run.record(RunStatus.DONE, timings={"wall_s": 1.0}, metrics={"test_accuracy": 0.9}))
    start = now[0]
    for run in cnn:
        progress.started(run, "cpu.0")
    now[0] = start + 60.0
    assert progress.eta_s() is None  # past the model, nothing reported
    progress.advanced([r.run_id for r in cnn], 0.25, age_s=50.0)
    estimate = progress.estimate()
    assert estimate.seconds == pytest.approx(140.0) and estimate.rough
    now[0] = start + 230.0
    assert progress.eta_s() is None


def test_an_estimate_is_rough_while_a_kind_of_model_waiting_has_not_trained_yet(tmp_path, data_dir) -> None:
    """Steps and FLOPs cannot tell a CNN from an MLP (the notebooks sweep's CNN, run last, was
    predicted 45% short): with CNN runs still to start and none trained yet, the ETA says `~`,
    however many MLPs finished; once a CNN finished, it does not."""
    import io

    from harness.sweep import Progress, prepare_sweep
    from harness.spec import load_sweep

    from conftest import tiny_sweep_text, write_sweep

    prepared = prepare_sweep(load_sweep(write_sweep(tmp_path / "s.yaml", tiny_sweep_text(seeds=4))), data_dir=data_dir)
    mlp = [r for r in prepared.runs if r.variant.name == "mlp_32"]
    cnn = [r for r in prepared.runs if r.variant.name == "cnn_8"]
    now = [0.0]
    progress = Progress(prepared.runs, stream=io.StringIO(), clock=lambda: now[0])
    fake = {}
    for index, run in enumerate(mlp):  # four MLPs of four costs: a fitted model
        fake[run.run_id] = RunCost(1_000 * (index + 1), 0)
    progress.costs.update(fake)
    for run in mlp:
        progress.started(run, "cpu.0")
        now[0] += 1.0
        progress.finished(run.record(RunStatus.DONE, timings={"wall_s": fake[run.run_id].steps * 0.001},
                                     metrics={"test_accuracy": 0.9}))
    assert "| ETA ~" in progress.counts()
    progress.started(cnn[0], "cpu.0")
    now[0] += 1.0
    progress.finished(cnn[0].record(RunStatus.DONE, timings={"wall_s": 5.0}, metrics={"test_accuracy": 0.9}))
    line = progress.counts()
    assert "| ETA " in line and "| ETA ~" not in line and "| ETA ?" not in line, line


def test_pending_groups_go_in_queue_order_to_the_worker_free_first() -> None:
    """The notebooks sweep's end: one worker 96 s into a CNN group, four small fused groups left
    of about 29 s. The idle worker trains all four (116 s): an even share of the work (106 s)
    said too little. A group's runs stay on one worker, and the queue's order is kept."""
    assert finish_time([96.0, 0.0], [29.0] * 4) == pytest.approx(116.0)
    assert finish_time([0.0, 0.0], [20.0, 10.0, 10.0]) == pytest.approx(20.0)  # 20 | 10 + 10
    assert finish_time([0.0, 0.0], [10.0, 10.0, 20.0]) == pytest.approx(30.0)  # 10 + 20 | 10: as queued
    assert finish_time([5.0], []) == pytest.approx(5.0)
    assert finish_time([], [3.0, 4.0]) == pytest.approx(7.0)  # no worker known: one

    tracker = CostTracker()
    for steps in (100, 200, 300, 400):
        tracker.observe("cpu.0", RunCost(steps, 0), 0.01 * steps)
    group = [RunCost(1000, 0)] * 3  # 10 s each: 30 s on one worker
    assert tracker.eta_s(pending=[group], running=[], slots=2) == pytest.approx(30.0)
    assert tracker.eta_s(pending=group, running=[], slots=2) == pytest.approx(20.0)  # runs apart: 2 + 1


def test_progress_keeps_a_fused_group_on_one_worker(tmp_path, data_dir) -> None:
    """`Progress.grouped` (the dispatcher's groups): a pending fused group is one worker's work."""
    import io

    from harness.spec import load_sweep
    from harness.sweep import FinishedRun, Progress, prepare_sweep

    from conftest import tiny_sweep_text, write_sweep

    prepared = prepare_sweep(load_sweep(write_sweep(tmp_path / "s.yaml", tiny_sweep_text(seeds=4))), data_dir=data_dir)
    runs = [r for r in prepared.runs if r.variant.name == "mlp_32"]
    assert len(runs) == 4
    progress = Progress(runs, stream=io.StringIO(), clock=lambda: 0.0)
    cost = progress.costs[runs[0].run_id]
    progress.remember([FinishedRun("elsewhere", "v", cost, 1.0)])  # such a run takes 1 s here
    progress.slots = 2
    assert progress.eta_s() == pytest.approx(2.0)  # four 1-s runs over two workers
    progress.grouped([[r.run_id for r in runs]])
    assert progress.eta_s() == pytest.approx(4.0)  # one fused group of four: one worker's
    # the queue's order: two singles, then the pair: 1 | 1, then the pair on one of them: 3 s;
    # the pair first, then the singles: 2 | 1 + 1: 2 s
    ids = [r.run_id for r in runs]
    progress.grouped([[ids[0]], [ids[1]], [ids[2], ids[3]]])
    assert progress.eta_s() == pytest.approx(3.0)
    progress.grouped([[ids[2], ids[3]], [ids[0]], [ids[1]]])  # replaces what it was told before
    assert progress.eta_s() == pytest.approx(2.0)


def test_a_model_without_steps_is_not_stretched_to_runs_with_more_steps_per_flop() -> None:
    """The notebooks sweep under `auto`, four minutes in: four big groups seen (a CNN and three
    MLPs, their runs' times as measured), FLOPs alone predicts each from the others best. Seed
    003's 64-64 MLP (9,375 steps of small batches per run) has more steps per FLOP than any of
    them: its group took 19.5 s. FLOPs alone said 7.6 s; the steps-and-FLOPs fit says 18.4 s."""
    seen = [
        (RunCost(12000, 2_879_078_400_000), 34.1),  # seed 000's 256x4, batch 100
        (RunCost(1920, 1_849_441_536_000), 36.9),  # seed 001's CNN
        (RunCost(9380, 1_935_360_000_000), 23.9),  # seed 002's 256x2 with dropout, batch 128
        (RunCost(93750, 1_209_600_000_000), 40.5),  # seed 004's 64x5, batch 32, 50 epochs
    ]
    tracker = CostTracker()
    for cost, seconds in seen:
        for _seed in range(5):
            tracker.observe("cpu.0", cost, seconds)
    flops_only = tracker.model(None)
    assert flops_only.step_s == 0 and flops_only.flop_s > 0  # what leave-one-out chooses here
    mlp = RunCost(9375, 98_841_600_000)
    assert 5 * flops_only.predict(mlp) == pytest.approx(7.6, abs=0.1)
    eta = tracker.eta_s(pending=[[mlp] * 5], running=[], slots=1)
    assert eta == pytest.approx(18.4, abs=0.2)  # 19.5 s in fact
    # within the runs seen the model chosen stands: a run like seed 000's 256x4
    inside = RunCost(6000, 1_500_000_000_000)
    assert tracker.eta_s(pending=[inside], running=[], slots=1) == pytest.approx(flops_only.predict(inside))
    # and a model with both rates is never replaced
    both = CostModel(0.0, 0.001, 1e-11, "fit (9 runs)")
    assert beyond_the_runs_seen(both, seen, [mlp]) is both


def test_the_two_rates_are_fitted_non_negative_so_a_fold_cannot_rule_them_out() -> None:
    """The same sweep half a minute later: a step-bound group (seed 003's 10-epoch 64x2) has been
    seen too. A leave-one-out fold of the steps-and-FLOPs fit came out with a negative rate, which
    ruled it out, and FLOPs alone put the next 64x2 group at 7.7 s (16.4 s in fact). Fitted
    non-negative (the fold falls back to its better one-rate fit), the two rates are chosen."""
    seen = [
        (RunCost(1920, 1_849_441_536_000), 36.7),
        (RunCost(93750, 1_209_600_000_000), 41.2),
        (RunCost(9380, 1_935_360_000_000), 24.1),
        (RunCost(12000, 2_879_078_400_000), 34.4),
        (RunCost(18750, 197_683_200_000), 6.4),  # seed 003's 64x2, 10 epochs of batch 32
    ]
    model = fit_cost_model([point for point in seen for _seed in range(5)])
    assert model.step_s > 0 and model.flop_s > 0 and model.intercept_s == 0
    assert 5 * model.predict(RunCost(9375, 98_841_600_000)) == pytest.approx(18.6, abs=0.2)  # 16.4 s in fact


def test_a_constant_fitted_to_long_runs_is_not_given_to_shorter_ones() -> None:
    """The notebooks sweep on TensorFlow with its four long groups first (2026-12-01): two finished
    (seed 000's 256x4, seed 004's 64x5), two paced (seed 002's MLP, the CNN). A constant plus
    steps predicted those four best (30 s a run, 0.25 ms a step), so the six small MLPs pending,
    4-8 s a run in fact, got 30 s each: the ETA said 10-11 minutes with 3-4 left. Where the
    steps-and-FLOPs fit puts a pending run below every run seen, that fit is used instead."""
    tracker = CostTracker()
    big = {"256x4": RunCost(12000, 2_879_078_400_000), "64x5": RunCost(93750, 1_209_600_000_000),
           "256x2": RunCost(9380, 1_935_360_000_000), "cnn": RunCost(1920, 1_849_441_536_000)}
    for _seed in range(5):
        tracker.observe("cpu.0", big["256x4"], 38.7)
        tracker.observe("cpu.1", big["64x5"], 52.8)
    running = [Running("cpu.0", big["256x2"], 91.0, 135.0, 5)] * 5 + [Running("cpu.1", big["cnn"], 21.0, 150.0, 5)] * 5
    small = [RunCost(18750, 197_683_200_000), RunCost(12000, 205_056_000_000), RunCost(9600, 117_936_000_000),
             RunCost(9375, 113_587_200_000), RunCost(9375, 98_841_600_000), RunCost(9375, 98_841_600_000)]
    pooled = fit_cost_model([(c, s) for c, s in [(big["256x4"], 38.7), (big["64x5"], 52.8), (big["256x2"], 27.0),
                                                 (big["cnn"], 30.0)] for _seed in range(5)])
    assert pooled.intercept_s > 20  # what leave-one-out chooses from the four
    eta = tracker.eta_s(pending=[[c] * 5 for c in small], running=running, slots=2)
    # the groups took 44 (cpu.0: 256x2 left) + 40 + 37 + 34 + 28 + 23 + 24 s; the two workers about 3.5 minutes
    assert 150 < eta < 260
