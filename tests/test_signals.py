"""SIGTERM behaves like Ctrl-C (issue 7, invariant 6), in real processes.

`harness sweep` exits 143 on SIGTERM (130 on Ctrl-C): workers stopped, the claims of unfinished
runs released, finished runs kept, no traceback from the parent or its workers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness.store import SQLiteStore

from conftest import tiny_sweep_text, write_sweep

TESTS = Path(__file__).parent
REPO = TESTS.parent

# The CLI's own wrapper (`_user_errors`: signals and exit codes) around `execute_sweep` with a fake
# train function in real worker processes: the point here is signals, not training.
SCRIPT = textwrap.dedent(
    """
    import sys
    from harness.cli import _user_errors
    from harness.execute import SweepOptions, execute_sweep
    from harness.spec import load_sweep

    @_user_errors
    def main():
        options = SweepOptions(store=sys.argv[2], data_dir=sys.argv[3], train_fn="fake_train:ok", workers=2, fuse=1)
        execute_sweep(load_sweep(sys.argv[1]), options, notify=print)

    if __name__ == "__main__":
        main()
    """
)


def calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "State:\tZ" in status.read_text())


def start_sweep(tmp_path: Path, data_dir: Path, log: Path) -> subprocess.Popen:
    sweep = write_sweep(tmp_path / "s.yaml", tiny_sweep_text(seeds=6, train=300, test=100))
    script = tmp_path / "sweep.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]), "HARNESS_FAKE_LOG": str(log),
           "HARNESS_FAKE_SLEEP": "1.0"}
    return subprocess.Popen(
        [sys.executable, str(script), str(sweep), str(tmp_path / "h.db"), str(data_dir)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group, as a service manager would start it
    )


@pytest.mark.parametrize("whom", ["parent", "group"])
def test_sigterm_stops_the_sweep_like_ctrl_c(tmp_path: Path, data_dir: Path, whom: str) -> None:
    """SIGTERM to the sweep alone (kill PID) or to its whole process group (kill -PGID, as
    `docker stop` / systemd do): exit 143, workers gone, claims released, no traceback."""
    log = tmp_path / "calls.jsonl"
    proc = start_sweep(tmp_path, data_dir, log)
    deadline = time.monotonic() + 120
    while len(calls(log)) < 3:  # two workers busy, at least one run stored
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the sweep did not start training in time"
        time.sleep(0.05)
    workers = {c["pid"] for c in calls(log)}
    if whom == "group":
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err, err
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers), "workers outlived the terminated sweep"
    with SQLiteStore(tmp_path / "h.db", create=False) as store:
        assert store.claims() == {}  # the interrupted runs were released, not left claimed
        plan = [run_id for run_id, _v, _s in store.plan("tiny")]
        statuses = store.statuses(plan)
    assert statuses and all(s.value == "done" for s in statuses.values())  # nothing half-recorded
    assert len(statuses) < len(plan)  # it really stopped mid-sweep
