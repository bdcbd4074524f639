"""Store schemas, one per version, and the steps that upgrade a store from one to the next.

`harness store upgrade` runs `upgrade_store`: a backup copy first (named with the old version,
never overwriting an earlier backup), then every step up to `SCHEMA_VERSION` in one transaction.
Opening an older store without upgrading is an error that says to run it; never silent.

Version history:
1. runs, sweeps, plans, claims, meta (harness 0.1).
2. + `attempts`: every superseded attempt of a run (the record of a failed try that a retry or
   `--rerun-failed` replaced), so a retried failure no longer overwrites the earlier traceback.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import quote

SCHEMA_VERSION = 2

# The schema as harness 0.1 created it (version 1). Kept verbatim: the upgrade tests build real
# version-1 stores from it.
SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    sweep TEXT NOT NULL,
    variant TEXT NOT NULL,
    variant_id TEXT NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL,
    test_accuracy REAL,
    attempts INTEGER NOT NULL DEFAULT 1,
    finished_at TEXT,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sweeps (
    name TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    planned_at TEXT NOT NULL,
    info TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS plans (
    sweep TEXT NOT NULL,
    position INTEGER NOT NULL,
    run_id TEXT NOT NULL,
    variant TEXT NOT NULL,
    seed INTEGER NOT NULL,
    PRIMARY KEY (sweep, position)
);
CREATE TABLE IF NOT EXISTS claims (
    run_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_by_variant ON runs (variant_id);
"""

_V1_TO_V2 = """
CREATE TABLE attempts (
    run_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    status TEXT NOT NULL,
    finished_at TEXT,
    record TEXT NOT NULL,
    PRIMARY KEY (run_id, attempt)
);
"""

# The current schema: version 1 and every step after it.
SCHEMA = SCHEMA_V1 + _V1_TO_V2

# Tables every harness store has had since version 1: how a harness store is told from another
# SQLite file before anything is changed.
CORE_TABLES = frozenset({"meta", "runs", "sweeps", "plans", "claims"})


def _statements(sql: str) -> list[str]:
    return [part.strip() for part in sql.split(";") if part.strip()]


def _v1_to_v2(conn: sqlite3.Connection) -> None:
    for statement in _statements(_V1_TO_V2):
        conn.execute(statement)


STEPS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _v1_to_v2}  # from version -> step to version + 1


def create_schema(conn: sqlite3.Connection, *, created_at: str) -> None:
    """The current schema in an empty database (inside the caller's transaction)."""
    for statement in _statements(SCHEMA):
        conn.execute(statement)
    conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    conn.execute("INSERT INTO meta (key, value) VALUES ('created_at', ?)", (json.dumps(created_at),))


def backup_path(store: Path, version: int) -> Path:
    """`harness.db.v1-backup`, or `.v1-backup.2`, `.3`... when an earlier backup is there."""
    first = store.with_name(f"{store.name}.v{version}-backup")
    candidate, n = first, 1
    while os.path.lexists(candidate):
        n += 1
        candidate = first.with_name(f"{first.name}.{n}")
    return candidate


def write_backup(store: Path, version: int) -> Path:
    """A consistent copy of the store (SQLite's online backup, WAL content included) beside it;
    created under a temp name and linked into place, so an existing file is never overwritten.

    Called while the upgrading connection holds the write lock: the copy is read through a second
    connection (readers are not blocked by a writer), so it is exactly the store being upgraded."""
    tmp_fd, tmp = tempfile.mkstemp(dir=store.parent, prefix=f".{store.name}.", suffix=".backup-tmp")
    os.close(tmp_fd)
    try:
        source = sqlite3.connect(f"file:{quote(str(store.resolve()))}?mode=ro", uri=True, timeout=30.0)
        target = sqlite3.connect(tmp)
        try:
            source.backup(target)
        finally:
            target.close()
            source.close()
        os.chmod(tmp, stat.S_IMODE(os.stat(store).st_mode))
        while True:
            path = backup_path(store, version)
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                continue  # someone made that name meanwhile: take the next one
    finally:
        Path(tmp).unlink(missing_ok=True)


@dataclass(frozen=True)
class UpgradeResult:
    store: Path
    from_version: int
    to_version: int
    backup: Path | None  # None when there was nothing to do


def run_steps(conn: sqlite3.Connection, from_version: int, *, upgraded_at: str) -> None:
    """Every step from `from_version` to the current version (inside the caller's transaction)."""
    for version in range(from_version, SCHEMA_VERSION):
        STEPS[version](conn)
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            (f"upgraded_from_{version}", json.dumps(upgraded_at)),
        )
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
