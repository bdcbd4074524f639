"""Claims across processes, PID namespaces, hosts and clocks (harness/leases.py).

Lease logic runs on an injected monotonic clock: no test here sleeps to see a lease go stale.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.leases import (
    Claim,
    ClaimState,
    LeaseKeeper,
    Liveness,
    Owner,
    claim_states,
    make_owner,
    owner_liveness,
    this_namespace,
)
from harness.store import SQLiteStore

REPO = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture()
def store(tmp_path: Path):
    with SQLiteStore(tmp_path / "h.db") as opened:
        yield opened


def dead_pid() -> int:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(gone.stdout)


def test_owner_ids_name_their_pid_namespace_and_boot() -> None:
    owner = Owner.parse(make_owner())
    assert owner is not None and owner.pid == os.getpid()
    assert (owner.pid_ns, owner.boot_id) == this_namespace()
    assert Owner.parse(str(owner)) == owner
    assert Owner.parse("garbage") is None


def test_a_pid_is_probed_only_in_its_own_namespace_and_boot() -> None:
    here = Owner.current()
    assert owner_liveness(str(here)) is Liveness.ALIVE
    gone = dead_pid()
    assert owner_liveness(str(dataclasses.replace(here, pid=gone))) is Liveness.DEAD
    # the same host name and pid, but another PID namespace (a container) or another boot
    assert owner_liveness(str(dataclasses.replace(here, pid=gone, pid_ns="pid1"))) is Liveness.UNKNOWN
    assert owner_liveness(str(dataclasses.replace(here, pid=gone, boot_id="0" * 32))) is Liveness.UNKNOWN
    # ids written before namespaces were recorded are never probed
    assert owner_liveness(f"{here.host}:{gone}:tag") is Liveness.UNKNOWN


def test_a_claim_is_taken_over_only_after_its_lease_stopped_moving(store: SQLiteStore) -> None:
    clock = FakeClock()
    holder = LeaseKeeper(owner="other-host:7:a:pid9:b00t", lease_s=60, clock=clock)
    mine = LeaseKeeper(lease_s=60, clock=clock)
    assert holder.claim(store, "r1") is Claim.CLAIMED
    assert mine.claim(store, "r1") is Claim.HELD  # first sight: starts watching
    for _ in range(5):  # the holder renews every quarter lease: its lease keeps moving
        clock.advance(20)
        holder.renew(store)
        assert mine.claim(store, "r1") is Claim.HELD
    clock.advance(59)  # the holder stopped (killed, or its host is gone)
    assert mine.claim(store, "r1") is Claim.HELD
    clock.advance(1)
    assert mine.claim(store, "r1") is Claim.CLAIMED
    assert mine.held == {"r1"} and store.claim_holder("r1")[0] == mine.owner


def test_a_skewed_clock_never_makes_a_live_claim_look_expired(store: SQLiteStore) -> None:
    """The holder's clock is an hour behind ours: its expiry looks long past, yet it renews."""
    clock = FakeClock()
    holder = LeaseKeeper(owner="slow-clock-host:7:a:pid9:b00t", lease_s=60, clock=clock)
    assert holder.claim(store, "r1") is Claim.CLAIMED
    owner, _expires = store.claim_holder("r1")
    store.renew(["r1"], owner=owner, lease_s=-3600)  # as written by a clock one hour behind
    mine = LeaseKeeper(lease_s=60, clock=clock)
    for _ in range(10):
        assert mine.claim(store, "r1") is Claim.HELD
        clock.advance(30)
        store.renew(["r1"], owner=owner, lease_s=-3600 + clock.now - 1000)  # still renewing
    assert store.claim_holder("r1")[0] == owner


def test_a_dead_owner_of_this_namespace_is_taken_over_at_once(store: SQLiteStore) -> None:
    dead = str(dataclasses.replace(Owner.current(), pid=dead_pid()))
    assert store.claim("r1", owner=dead, lease_s=3600) is Claim.CLAIMED
    assert LeaseKeeper(clock=FakeClock()).claim(store, "r1") is Claim.CLAIMED


def test_two_sweeps_that_judge_a_claim_stale_cannot_both_win_it(store: SQLiteStore) -> None:
    clock = FakeClock()
    assert store.claim("r1", owner="gone-host:1:x", lease_s=60) is Claim.CLAIMED
    first, second = LeaseKeeper(lease_s=60, clock=clock), LeaseKeeper(lease_s=60, clock=clock)
    assert first.claim(store, "r1") is Claim.HELD and second.claim(store, "r1") is Claim.HELD
    clock.advance(61)
    stale = store.claim_holder("r1")
    assert first.claim(store, "r1") is Claim.CLAIMED
    # the second judged the same row stale; its compare-and-swap finds the first's claim instead
    assert store.claim("r1", owner=second.owner, lease_s=60, takeover=stale) is Claim.HELD
    assert second.claim(store, "r1") is Claim.HELD  # and it starts watching the new holder


def test_renewal_is_due_every_quarter_lease(store: SQLiteStore) -> None:
    clock = FakeClock()
    keeper = LeaseKeeper(lease_s=40, clock=clock)
    keeper.claim(store, "r1")
    before = store.claim_holder("r1")[1]
    clock.advance(9)
    assert not keeper.renew_due()
    clock.advance(1)
    assert keeper.renew_due()
    keeper.renew(store)
    assert store.claim_holder("r1")[1] >= before and not keeper.renew_due()
    keeper.release_all(store)
    assert store.claims() == {} and keeper.held == frozenset()


def test_status_says_which_claims_are_live(store: SQLiteStore) -> None:
    live = make_owner()
    dead = str(dataclasses.replace(Owner.current(), pid=dead_pid()))
    store.claim("a", owner=live, lease_s=600)
    store.claim("b", owner=dead, lease_s=600)
    store.claim("c", owner="remote-host:1:x:pid5:boot", lease_s=-5)
    states = {c.run_id: c for c in claim_states(store)}
    assert states["a"].state is ClaimState.LIVE and "lease ends in" in states["a"].reason
    assert states["b"].state is ClaimState.STALE and "owner process is gone" in states["b"].reason
    assert states["c"].state is ClaimState.STALE and "expired" in states["c"].reason


def test_status_command_lists_claims(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from harness.cli import cli

    with SQLiteStore(tmp_path / "h.db") as s:
        s.claim("run-live", owner=make_owner(), lease_s=600)
        s.claim("run-dead", owner=str(dataclasses.replace(Owner.current(), pid=dead_pid())), lease_s=600)
    result = CliRunner().invoke(cli, ["status", "--store", str(tmp_path / "h.db")])
    assert result.exit_code == 0, result.output
    assert "claims: 1 live, 1 stale" in result.output
    lines = {line.split()[0]: line for line in result.output.splitlines() if line.startswith("run-")}
    assert " live " in lines["run-live"] and " stale " in lines["run-dead"] and "gone" in lines["run-dead"]


# --------------------------------------------------------------------------- PID namespaces

CLAIM_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from harness.leases import LeaseKeeper
    from harness.store import SQLiteStore

    store_path, mode = sys.argv[1], sys.argv[2]
    with SQLiteStore(store_path) as store:
        keeper = LeaseKeeper(lease_s=3600)
        result = keeper.claim(store, "run-1")
        print(result.value, os.getpid(), flush=True)
        if mode == "hold":
            time.sleep(float(sys.argv[3]))
    """
)


def _unshare_prefix() -> list[str] | None:
    tool = shutil.which("unshare")
    if tool is None:
        return None
    for prefix in ([tool, "--pid", "--fork"], [tool, "--user", "--map-root-user", "--pid", "--fork"]):
        if subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    return None


def test_a_sweep_in_another_pid_namespace_never_takes_a_live_claim(tmp_path: Path) -> None:
    """The attack of issue 7: a second sweep in a container (another PID namespace, same host
    name) where the first sweep's pid does not exist, or is someone else's."""
    prefix = _unshare_prefix()
    if prefix is None:
        pytest.skip("`unshare --pid --fork` is not available here (needs util-linux and user namespaces)")
    script = tmp_path / "claim.py"
    script.write_text(CLAIM_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    db = str(tmp_path / "h.db")
    SQLiteStore(db).close()
    # the holder lives in its own PID namespace, where it is pid 1 or 2
    holder = subprocess.Popen([*prefix, sys.executable, str(script), db, "hold", "60"], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        line = holder.stdout.readline().split()
        assert line[0] == "claimed" and int(line[1]) <= 3, line  # a pid that means nothing out here
        with SQLiteStore(db) as store:
            owner, _ = store.claim_holder("run-1")
            assert Owner.parse(owner).pid_ns != this_namespace()[0]
            assert owner_liveness(owner) is Liveness.UNKNOWN  # not probed from here
            assert claim_states(store)[0].state is ClaimState.LIVE
        # a sweep out here (our namespace) and one in yet another namespace both leave it alone
        here = subprocess.run([sys.executable, str(script), db, "try"], env=env, capture_output=True, text=True)
        there = subprocess.run([*prefix, sys.executable, str(script), db, "try"], env=env, capture_output=True, text=True)
        assert here.stdout.split()[0] == "held", here.stderr
        assert there.stdout.split()[0] == "held", there.stderr
    finally:
        holder.kill()
        holder.wait(timeout=30)
