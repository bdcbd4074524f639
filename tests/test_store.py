from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from harness.errors import StoreError
from harness.records import RunStatus
from harness.store import SQLiteStore

from test_records import make_record


@pytest.fixture()
def store(tmp_path: Path):
    with SQLiteStore(tmp_path / "h.db") as s:
        yield s


def test_put_get_round_trip(store: SQLiteStore) -> None:
    record = make_record(history={"loss": [1.0, 0.5]})
    store.put(record)
    assert store.get("r1") == record
    assert store.get("missing") is None
    assert store.statuses(["r1", "missing"]) == {"r1": RunStatus.DONE}


def test_failed_run_is_replaced_by_its_retry(store: SQLiteStore) -> None:
    store.put(make_record(status=RunStatus.FAILED, error="boom"))
    store.put(make_record(status=RunStatus.DONE))
    assert store.get("r1").status is RunStatus.DONE
    assert store.attempts("r1") == 2


def test_finished_result_is_never_overwritten(store: SQLiteStore) -> None:
    store.put(make_record(status=RunStatus.DONE, metrics={"test_accuracy": 0.9}))
    store.put(make_record(status=RunStatus.FAILED, error="late duplicate"))
    kept = store.get("r1")
    assert kept.status is RunStatus.DONE and kept.test_accuracy == 0.9


def test_records_keep_plan_order(store: SQLiteStore) -> None:
    for i in range(3):
        store.put(make_record(run_id=f"r{i}", seed=i))
    assert [r.run_id for r in store.records(["r2", "r0", "nope", "r1"])] == ["r2", "r0", "r1"]


def test_plan_is_replaced_per_sweep(store: SQLiteStore) -> None:
    store.save_plan("s", source="a.yaml", info={"variants": []}, runs=[("r1", "v", 0), ("r2", "v", 1)])
    store.save_plan("s", source="a.yaml", info={"variants": [], "x": 1}, runs=[("r3", "w", 0)])
    store.save_plan("other", source="b.yaml", info={}, runs=[])
    assert store.plan("s") == [("r3", "w", 0)]
    assert store.sweep_info("s").extra["x"] == 1 and store.sweep_info("s").source == "a.yaml"
    assert store.sweep_info("s").name == "s"  # an older plan without a name gets the sweep's
    assert sorted(store.sweeps()) == ["other", "s"]


def test_data_survives_reopen(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "h.db") as s:
        s.put(make_record())
    with SQLiteStore(tmp_path / "h.db", create=False) as s:
        assert s.get("r1").status is RunStatus.DONE


def test_schema_version_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    SQLiteStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value='7' WHERE key='schema_version'")
    with pytest.raises(StoreError, match="schema version 7 is not supported"):
        SQLiteStore(path)


def test_foreign_sqlite_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE stuff (x)")
    with pytest.raises(StoreError, match="not a harness store"):
        SQLiteStore(path)


def test_garbage_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StoreError, match="not an SQLite file, so not a harness store"):
        SQLiteStore(path)


def test_missing_store_without_create(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no results store"):
        SQLiteStore(tmp_path / "none.db", create=False)
    assert not (tmp_path / "none.db").exists()


def test_claims_block_others_until_released_or_taken_over(store: SQLiteStore) -> None:
    from harness.store import Claim, make_owner

    alive = make_owner()
    assert store.claim("r1", owner=alive, lease_s=60) is Claim.CLAIMED
    assert store.claim("r1", owner="elsewhere:1:b", lease_s=60) is Claim.HELD
    assert store.claim("r1", owner=alive, lease_s=60) is Claim.CLAIMED  # re-entrant for its owner
    store.release(["r1"], owner=alive)
    assert store.claim("r1", owner="elsewhere:1:b", lease_s=-1) is Claim.CLAIMED
    # an expiry in the past by our clock is not enough (the owner's clock may differ)...
    assert store.claim("r1", owner=alive, lease_s=60) is Claim.HELD
    # ...only a compare-and-swap of exactly the row the caller watched go stale
    holder = store.claim_holder("r1")
    assert store.claim("r1", owner=alive, lease_s=60, takeover=("elsewhere:1:b", holder[1] + 1)) is Claim.HELD
    assert store.claim("r1", owner=alive, lease_s=60, takeover=holder) is Claim.CLAIMED
    store.put(make_record())
    assert store.claims() == {} and store.claim("r1", owner="elsewhere:1:b", lease_s=60) is Claim.FINISHED


def test_claim_of_a_dead_process_of_this_namespace_is_stale_at_once(store: SQLiteStore) -> None:
    import dataclasses
    import subprocess
    import sys

    from harness.leases import Owner
    from harness.store import Claim

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_owner = str(dataclasses.replace(Owner.current(), pid=int(gone.stdout)))
    assert store.claim("r1", owner=dead_owner, lease_s=3600) is Claim.CLAIMED
    assert store.claim("r1", owner="remote-host:1:y", lease_s=60) is Claim.CLAIMED
    assert store.claim("r1", owner=dead_owner, lease_s=3600) is Claim.HELD  # remote owner: trust its lease
    # the same pid in another PID namespace (a container with the same host name) is not ours to probe
    other_ns = str(dataclasses.replace(Owner.current(), pid=int(gone.stdout), pid_ns="pid4026599999"))
    store.release(["r1"], owner="remote-host:1:y")
    assert store.claim("r1", owner=other_ns, lease_s=3600) is Claim.CLAIMED
    assert store.claim("r1", owner="remote-host:1:y", lease_s=60) is Claim.HELD


def test_partial_plan_merges_with_the_rest_of_the_sweep(store: SQLiteStore) -> None:
    info = {"variants": [{"name": "a", "params": 1}, {"name": "b", "params": 2}], "seeds": [0]}
    store.save_plan("s", source="s.yaml", info=info, runs=[("ra", "a", 0), ("rb", "b", 0)])
    store.save_plan("s", source="s.yaml", info={"variants": [{"name": "b", "params": 3}], "seeds": [0]},
                    runs=[("rb2", "b", 0)], merge=True)
    assert store.plan("s") == [("ra", "a", 0), ("rb2", "b", 0)]
    assert [(v.name, v.params) for v in store.sweep_info("s").variants] == [("a", 1), ("b", 3)]


def test_a_second_open_in_one_process_keeps_the_first_connections_locks(tmp_path: Path) -> None:
    """Opening the store again in a process that has it open (the sweep does: its own store, then
    the executor's) must not drop the first connection's POSIX locks. If it did, another process
    closing the store would think it the last user, delete the WAL and its index, and the first
    connection, still mapping the deleted index, would then read the store as malformed."""
    import subprocess
    import sys

    path = tmp_path / "h.db"
    first = SQLiteStore(path)
    first.put(make_record(run_id="r1"))
    SQLiteStore(path, create=False).close()  # the second open in this process
    writer = (
        "import sqlite3, sys\n"
        "conn = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "conn.execute(\"INSERT OR REPLACE INTO meta (key, value) VALUES ('probe', '1')\")\n"
        "conn.close()\n"
    )
    subprocess.run([sys.executable, "-c", writer, str(path)], check=True, timeout=60)
    assert Path(f"{path}-wal").exists(), "another process deleted the WAL while this one had the store open"
    first.put(make_record(run_id="r2"))
    with SQLiteStore(path, create=False) as third:
        assert {r.run_id for r in third.records(["r1", "r2"])} == {"r1", "r2"}
    first.close()
