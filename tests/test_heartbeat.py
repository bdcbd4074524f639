"""Training progress from inside a worker (`harness.heartbeat`): the fraction of a group's epochs."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import heartbeat
from harness.records import RunStatus
from harness.spec import load_sweep
from harness.sweep import prepare_sweep

from conftest import tiny_sweep_text, write_sweep


def test_without_a_sink_a_report_goes_nowhere() -> None:
    heartbeat.report(0.5)  # no sink: nothing to do, nothing raised


def test_parts_map_each_trainer_fraction_into_its_share_of_the_group() -> None:
    got: list[float] = []
    with heartbeat.reporting(got.append):
        heartbeat.report(0.25)
        for index in range(4):
            with heartbeat.part(index, 4):
                heartbeat.report(0.5)
                with heartbeat.part(1, 2):  # nested: the second half of this quarter
                    heartbeat.report(1.0)
        heartbeat.report(7.0)  # clamped
        heartbeat.report(float("nan"))
    assert got == [0.25, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0, 1.0, 0.0]
    heartbeat.report(0.5)
    assert len(got) == 11  # the sink is gone with its block


def test_a_sink_that_fails_does_not_fail_the_training() -> None:
    def broken(done: float) -> None:
        raise BrokenPipeError("the parent is gone")

    with heartbeat.reporting(broken):
        heartbeat.report(0.5)


def test_a_fused_group_reports_after_every_epoch(tmp_path: Path, data_dir: Path) -> None:
    """Real TensorFlow: two seeds fused, three epochs: 1/3, 2/3, 1."""
    from harness.fused import train_group

    text = tiny_sweep_text(seeds=2, train=300, test=100).replace("epochs: 1", "epochs: 3")
    prepared = prepare_sweep(load_sweep(write_sweep(tmp_path / "s.yaml", text)), data_dir=data_dir)
    got: list[float] = []
    with heartbeat.reporting(got.append):
        records = train_group([r for r in prepared.runs if r.variant.name == "mlp_32"], prepared.dataset)
    assert [r.status for r in records] == [RunStatus.DONE] * 2, records[0].error
    assert got == pytest.approx([1 / 3, 2 / 3, 1.0])
