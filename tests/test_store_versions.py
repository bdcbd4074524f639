"""Opening a store changes nothing before it is known to be ours; v1 -> v2 upgrade; read-only
stores; damaged stores. Real SQLite files throughout (a v1 store built from the v1 schema SQL)."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from harness.cli import cli
from harness.errors import StoreError
from harness.migrations import SCHEMA_V1, SCHEMA_VERSION
from harness.records import RunStatus
from harness.store import SQLiteStore

from test_aggregate import VARIANTS, fixture_records
from test_store import make_record

REPO = Path(__file__).resolve().parents[1]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, lines
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def fill(store: SQLiteStore, sweep: str = "fx") -> None:
    records = fixture_records()
    for record in records:
        store.put(record)
    info = {"variants": VARIANTS, "seeds": [0, 1, 2], "dataset": {"name": "mnist", "n_train": 100, "n_test": 10}}
    store.save_plan(sweep, source="sweeps/fx.yaml", info=info, runs=[(r.run_id, r.variant, r.seed) for r in records])


def make_v1_store(path: Path) -> None:
    """A store exactly as harness 0.1 wrote it: the v1 schema, WAL, a sweep with its runs."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript(SCHEMA_V1)
    conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '1')")
    conn.execute("INSERT INTO meta (key, value) VALUES ('created_at', '\"2026-01-01T00:00:00+00:00\"')")
    records = fixture_records()
    for r in records:
        conn.execute(
            "INSERT INTO runs (run_id, sweep, variant, variant_id, seed, status, test_accuracy, finished_at, record) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (r.run_id, r.sweep, r.variant, r.variant_id, r.seed, r.status.value, r.test_accuracy, r.finished_at, r.to_json()),
        )
    import json

    info = {"variants": VARIANTS, "seeds": [0, 1, 2], "dataset": {"name": "mnist", "n_train": 100, "n_test": 10}}
    conn.execute("INSERT INTO sweeps VALUES ('fx', 'sweeps/fx.yaml', '2026-01-01', ?)", (json.dumps(info),))
    conn.executemany(
        "INSERT INTO plans VALUES ('fx', ?, ?, ?, ?)", [(i, r.run_id, r.variant, r.seed) for i, r in enumerate(records)]
    )
    conn.close()


# --------------------------------------------------------------------------- not ours: untouched


@pytest.mark.parametrize("journal", ["delete", "wal"])
@pytest.mark.parametrize("command", ["status", "report", "sweep", "calibrate", "store-upgrade"])
def test_foreign_sqlite_file_stays_byte_identical(command: str, journal: str, tmp_path: Path) -> None:
    other = tmp_path / "some-other-app.db"
    conn = sqlite3.connect(other)
    conn.execute(f"PRAGMA journal_mode = {journal}")
    conn.execute("CREATE TABLE meta (key TEXT, value TEXT)")  # even one table name in common
    conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    conn.commit()
    conn.close()
    sweep = tmp_path / "s.yaml"
    sweep.write_text((REPO / "sweeps" / "quickstart.yaml").read_text())
    before = snapshot(tmp_path)
    args = {
        "status": ["status"],
        "report": ["report"],
        "sweep": ["sweep", sweep, "--dry-run"],
        "calibrate": ["calibrate", "--size", "64"],
        "store-upgrade": ["store", "upgrade"],
    }[command]
    line = one_error_line(invoke(*args, "--store", other))
    assert str(other) in line and "not a harness store" in line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "content, problem",
    [(b"", "empty file"), (b"hello world, not a database" * 50, "not an SQLite file"),
     (b"SQLite format 3\x00" + b"\xff" * 5000, "not a usable harness store")],
)
def test_empty_or_garbage_file_is_refused_untouched(content: bytes, problem: str, tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    path.write_bytes(content)
    for args in (["status"], ["report"], ["calibrate", "--size", "64"]):
        line = one_error_line(invoke(*args, "--store", path))
        assert problem in line and str(path) in line
    assert path.read_bytes() == content and sorted(p.name for p in tmp_path.iterdir()) == ["h.db"]


def test_a_directory_or_fifo_as_store_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.db"
    os.mkfifo(fifo)
    assert "not a regular file" in one_error_line(invoke("status", "--store", fifo))


def test_truncated_store_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    with SQLiteStore(path) as store:
        fill(store)
        store._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = path.read_bytes()
    assert len(data) > 8192
    path.write_bytes(data[: len(data) // 2])
    for args in (["status"], ["report", "--no-plots", "--out", tmp_path / "r.md"]):
        line = one_error_line(invoke(*args, "--store", path))
        assert str(path) in line
    assert not (tmp_path / "r.md").exists()


def test_corrupt_record_is_one_line_naming_the_run(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    with SQLiteStore(path) as store:
        fill(store)
        victim = fixture_records()[0].run_id
    with sqlite3.connect(path) as conn:  # damage one record, as a bad disk or a hand edit would
        conn.execute("UPDATE runs SET record = '{\"record_version\": 1, \"stat' WHERE run_id = ?", (victim,))
    line = one_error_line(invoke("report", "--store", path, "--out", tmp_path / "r.md"))
    assert victim in line and "damaged" in line
    line = one_error_line(invoke("export", "--store", path, "--out", tmp_path / "r.csv"))
    assert victim in line


# --------------------------------------------------------------------------- versions and upgrade


def test_v1_store_is_refused_with_the_upgrade_command_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    make_v1_store(path)
    before = snapshot(tmp_path)
    with pytest.raises(StoreError, match=r"older harness .* run `harness store upgrade --store"):
        SQLiteStore(path)
    line = one_error_line(invoke("status", "--store", path))
    assert "harness store upgrade" in line
    assert snapshot(tmp_path) == before


def test_store_upgrade_backs_up_then_upgrades_in_place_and_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    make_v1_store(path)
    (tmp_path / "h.db.v1-backup").write_text("an older backup, not to be overwritten")
    result = invoke("store", "upgrade", "--store", path)
    assert result.exit_code == 0, result.output
    backup = tmp_path / "h.db.v1-backup.2"
    assert f"from schema version 1 to {SCHEMA_VERSION}" in result.output and str(backup) in result.output
    assert (tmp_path / "h.db.v1-backup").read_text() == "an older backup, not to be overwritten"
    with pytest.raises(StoreError, match="older harness"):  # the backup is the v1 store, whole
        SQLiteStore(backup, create=False)
    with sqlite3.connect(f"file:{backup}?mode=ro", uri=True) as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == len(fixture_records())
    with SQLiteStore(path, create=False) as store:  # upgraded: every run and the plan are there
        assert len(store.records(r.run_id for r in fixture_records())) == len(fixture_records())
        assert len(store.plan("fx")) == len(fixture_records())
        assert store.get_meta("upgraded_from_1")
    assert invoke("report", "--store", path, "--no-plots", "--out", tmp_path / "r.md").exit_code == 0
    again = invoke("store", "upgrade", "--store", path)
    assert again.exit_code == 0 and "nothing to do" in again.output
    backups = sorted(p.name for p in tmp_path.glob("h.db.v1-backup*") if not p.name.endswith(("-wal", "-shm")))
    assert backups == ["h.db.v1-backup", "h.db.v1-backup.2"]


def test_newer_store_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    SQLiteStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '9' WHERE key = 'schema_version'")
    assert "newer harness" in one_error_line(invoke("store", "upgrade", "--store", path))
    assert "newer harness" in one_error_line(invoke("status", "--store", path))


def test_every_attempt_of_a_run_is_kept(tmp_path: Path) -> None:
    import dataclasses

    with SQLiteStore(tmp_path / "h.db") as store:
        first = dataclasses.replace(make_record(), status=RunStatus.FAILED, error="Traceback...\nRuntimeError: first cause")
        second = dataclasses.replace(first, error="Traceback...\nMemoryError: second cause")
        store.put(first)
        store.put(second)
        store.put(make_record())
        store.put(dataclasses.replace(first, error="late failure"))  # never replaces a finished result
        assert store.get("r1").status is RunStatus.DONE and store.attempts("r1") == 3
        earlier = store.earlier_attempts(["r1", "nothing"])
    assert [r.error.splitlines()[-1] for r in earlier["r1"]] == ["RuntimeError: first cause", "MemoryError: second cause"]
    assert "nothing" not in earlier


# --------------------------------------------------------------------------- read-only stores


def _can_mount() -> bool:
    if not shutil.which("unshare") or sys.platform != "linux":
        return False
    return subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt"], capture_output=True).returncode == 0


def test_read_only_uri_store_reads_and_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    with SQLiteStore(path) as store:
        fill(store)
    before = snapshot(tmp_path)
    store = SQLiteStore(path, create=False)
    store.readonly = True  # as on a read-only file system, where os.access says so
    store._conn.close()
    from harness.store import _Guarded, _connect_ro

    store._conn = _Guarded(_connect_ro(path), path)
    assert len(store.plan("fx")) == len(fixture_records())
    with pytest.raises(StoreError, match="read-only"):
        store.put(make_record())
    store.close()
    assert snapshot(tmp_path)["h.db"] == before["h.db"]  # (SQLite may add its empty -wal/-shm side files)


@pytest.mark.skipif(not _can_mount(), reason="needs `unshare -m` and mount (root or user namespaces)")
def test_store_on_a_read_only_file_system_can_be_reported_on(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    seed = tmp_path / "seed.db"
    with SQLiteStore(seed) as store:
        fill(store)
    sweep = tmp_path / "s.yaml"
    sweep.write_text((REPO / "sweeps" / "quickstart.yaml").read_text())
    py = f"{sys.executable} -m harness"
    command = (
        f"mount -t tmpfs -o size=8m tmpfs {mnt} && cp {seed} {mnt}/h.db && mount -o remount,ro {mnt} && "
        f"{py} status --store {mnt}/h.db && {py} report --store {mnt}/h.db --no-plots --out {tmp_path}/r.md && "
        f"{py} calibrate --size 64 --store {mnt}/h.db; echo rc=$?"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(["unshare", "-m", "sh", "-c", command], capture_output=True, text=True, timeout=300, env=env)
    assert "fx" in done.stdout and (tmp_path / "r.md").is_file(), (done.stdout, done.stderr)
    assert "rc=2" in done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "read-only" in lines[0] and "Traceback" not in done.stderr, lines
