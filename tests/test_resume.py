"""Crash safety with a real process: `harness sweep` killed with SIGKILL, then resumed."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.store import SQLiteStore

from conftest import backend_params, write_sweep

SWEEP = """
schema_version: 1
name: crashy
dataset: mnist
subset: {train: 2000, test: 500}
budget: {epochs: 1, batch_size: 64, seeds: 6}
variants:
  - name: mlp_64
    model:
      dense: {units: [64]}
"""


def finished_count(store: Path) -> int:
    if not store.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5)) as conn:
            return conn.execute("SELECT COUNT(*) FROM runs WHERE status = 'done'").fetchone()[0]
    except sqlite3.OperationalError:
        return 0  # schema not created yet


def wait_for_finished(store: Path, proc: subprocess.Popen, count: int) -> None:
    """Wait until `count` runs are stored as done while the sweep is still running."""
    deadline = time.monotonic() + 240
    while finished_count(store) < count:
        assert proc.poll() is None, f"sweep ended before it could be stopped: {proc.communicate()}"
        assert time.monotonic() < deadline, "no run finished in time"
        time.sleep(0.05)


def harness(*args: str, data_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "HARNESS_DATA_DIR": str(data_dir), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.Popen(
        [sys.executable, "-m", "harness", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.parametrize("backend", backend_params())
def test_sigkill_loses_no_finished_run_and_resume_trains_exactly_the_rest(backend: str, tmp_path: Path, data_dir: Path) -> None:
    sweep = write_sweep(tmp_path / "crashy.yaml", SWEEP)
    store = tmp_path / "h.db"
    proc = harness("sweep", str(sweep), "--store", str(store), "--keras-backend", backend, "--fuse", "1", data_dir=data_dir)
    wait_for_finished(store, proc, 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    with SQLiteStore(store, create=False) as s:
        survivors = {r.run_id: r for r in s.records(r for r, _v, _s in s.plan("crashy")) if r.status.value == "done"}
    killed_at = len(survivors)
    assert 2 <= killed_at < 6, "the kill must land mid-sweep"

    resumed = harness("sweep", str(sweep), "--store", str(store), "--keras-backend", backend, "--fuse", "1", data_dir=data_dir)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"6 runs planned, {killed_at} already in the store, {6 - killed_at} trained" in out

    with SQLiteStore(store, create=False) as s:
        plan = s.plan("crashy")
        records = s.records(r for r, _v, _s in plan)
        assert len(records) == 6 and all(r.status.value == "done" for r in records)
        assert sorted(r.seed for r in records) == list(range(6))
        assert all(s.attempts(r.run_id) == 1 for r in records), "a run was trained twice"
        assert {r.budget["keras_backend"] for r in records} == {r.versions["keras_backend"] for r in records} == {backend}
        for run_id, before in survivors.items():
            assert s.get(run_id) == before  # the finished runs were kept as they were


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_keeps_finished_runs(tmp_path: Path, data_dir: Path) -> None:
    sweep = write_sweep(tmp_path / "crashy.yaml", SWEEP)
    store = tmp_path / "h.db"
    proc = harness("sweep", str(sweep), "--store", str(store), "--fuse", "1", data_dir=data_dir)
    wait_for_finished(store, proc, 1)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err

    with SQLiteStore(store, create=False) as s:
        statuses = s.statuses(r for r, _v, _s in s.plan("crashy"))
        assert statuses and all(v.value == "done" for v in statuses.values())  # nothing half-recorded
        assert s.claims() == {}  # the interrupted runs were released, not left claimed
    kept = len(statuses)

    resumed = harness("sweep", str(sweep), "--store", str(store), "--fuse", "1", data_dir=data_dir)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"{kept} already in the store, {6 - kept} trained" in out


@pytest.mark.slow
def test_sigterm_is_ctrl_c_for_a_real_sweep(tmp_path: Path, data_dir: Path) -> None:
    sweep = write_sweep(tmp_path / "crashy.yaml", SWEEP)
    store = tmp_path / "h.db"
    proc = harness("sweep", str(sweep), "--store", str(store), "--fuse", "1", data_dir=data_dir)
    wait_for_finished(store, proc, 1)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err

    with SQLiteStore(store, create=False) as s:
        statuses = s.statuses(r for r, _v, _s in s.plan("crashy"))
        assert statuses and all(v.value == "done" for v in statuses.values())
        assert s.claims() == {}
    kept = len(statuses)

    resumed = harness("sweep", str(sweep), "--store", str(store), "--fuse", "1", data_dir=data_dir)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"{kept} already in the store, {6 - kept} trained" in out
