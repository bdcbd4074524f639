"""Results store: one row per run, keyed by the run's content id, committed atomically.

`ResultStore` is the protocol the rest of the package talks to; `SQLiteStore` is the default
implementation (`results/harness.db`). The schema carries a version; a mismatch is a clear error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, Sequence

from harness.contracts import SweepInfo
from harness.errors import StoreError
from harness.leases import Claim, Liveness, make_owner, owner_alive, owner_liveness  # noqa: F401 - re-exported
from harness.records import RunRecord, RunStatus, utcnow

SCHEMA_VERSION = 1
DEFAULT_STORE = Path("results") / "harness.db"

_SCHEMA = """
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


class ResultStore(Protocol):
    """What the scheduler, the aggregator and the report need from a store."""

    def put(self, record: RunRecord) -> None: ...

    def get(self, run_id: str) -> RunRecord | None: ...

    def statuses(self, run_ids: Iterable[str]) -> dict[str, RunStatus]: ...

    def records(self, run_ids: Iterable[str]) -> list[RunRecord]: ...

    def save_plan(
        self, sweep: str, *, source: str, info: "SweepInfo | dict[str, Any]", runs: Sequence[tuple[str, str, int]],
        merge: bool = False,
    ) -> None: ...

    def plan(self, sweep: str) -> list[tuple[str, str, int]]: ...

    def sweep_info(self, sweep: str) -> SweepInfo | None: ...

    def sweeps(self) -> list[str]: ...

    def claim(
        self, run_id: str, *, owner: str, lease_s: float, takeover: tuple[str, float] | None = None
    ) -> Claim: ...

    def claim_holder(self, run_id: str) -> tuple[str, float] | None: ...

    def renew(self, run_ids: Iterable[str], *, owner: str, lease_s: float) -> None: ...

    def release(self, run_ids: Iterable[str], *, owner: str) -> None: ...

    def claims(self) -> dict[str, tuple[str, float]]: ...

    def get_meta(self, key: str) -> Any: ...

    def set_meta(self, key: str, value: Any) -> None: ...


class SQLiteStore:
    """SQLite-backed `ResultStore`. Each write is one transaction; readers never see half a run."""

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path)
        if not self.path.exists():
            if not create:
                raise StoreError("no results store here (run `harness sweep` first)", file=str(self.path))
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self._conn.execute("PRAGMA busy_timeout = 30000")
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = NORMAL")
            self._init_schema()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"not a usable harness store: {exc}", file=str(self.path)) from None

    def _init_schema(self) -> None:
        tables = {row[0] for row in self._conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables and "meta" not in tables:
            raise StoreError("not a harness store (an SQLite file of something else)", file=str(self.path))
        if "meta" in tables:
            row = self._conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            version = int(row[0]) if row else None
            if version != SCHEMA_VERSION:
                raise StoreError(
                    f"store schema version {version} is not supported (this harness reads {SCHEMA_VERSION})",
                    file=str(self.path),
                )
            return
        with self._transaction():
            for statement in _SCHEMA.strip().split(";"):
                if statement.strip():
                    self._conn.execute(statement)
            self._conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            self._conn.execute("INSERT INTO meta (key, value) VALUES ('created_at', ?)", (json.dumps(utcnow()),))

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): one writer at a time, all or nothing."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "SQLiteStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ runs

    def put(self, record: RunRecord) -> None:
        """Insert or update a run. A finished result is never replaced by an unfinished one."""
        finished = tuple(s.value for s in RunStatus if s.is_finished())
        with self._transaction():
            self._conn.execute(
                f"""
                INSERT INTO runs (run_id, sweep, variant, variant_id, seed, status, test_accuracy, finished_at, record)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT (run_id) DO UPDATE SET
                    sweep = excluded.sweep, variant = excluded.variant, status = excluded.status,
                    test_accuracy = excluded.test_accuracy, finished_at = excluded.finished_at,
                    record = excluded.record, attempts = runs.attempts + 1
                WHERE runs.status NOT IN ({",".join("?" * len(finished))})
                """,
                (
                    record.run_id,
                    record.sweep,
                    record.variant,
                    record.variant_id,
                    record.seed,
                    record.status.value,
                    record.test_accuracy,
                    record.finished_at,
                    record.to_json(),
                    *finished,
                ),
            )
            self._conn.execute("DELETE FROM claims WHERE run_id = ?", (record.run_id,))

    def get(self, run_id: str) -> RunRecord | None:
        row = self._conn.execute("SELECT record FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return RunRecord.from_json(row[0]) if row else None

    def attempts(self, run_id: str) -> int:
        row = self._conn.execute("SELECT attempts FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return int(row[0]) if row else 0

    def _by_run_id(self, columns: str, run_ids: Iterable[str]) -> list[tuple]:
        """Rows of `runs` for these ids, in chunks that stay under SQLite's parameter limit."""
        ids = list(run_ids)
        rows: list[tuple] = []
        for chunk in range(0, len(ids), 500):
            part = ids[chunk : chunk + 500]
            rows += self._conn.execute(
                f"SELECT run_id, {columns} FROM runs WHERE run_id IN ({','.join('?' * len(part))})", part
            ).fetchall()
        return rows

    def statuses(self, run_ids: Iterable[str]) -> dict[str, RunStatus]:
        return {run_id: RunStatus(status) for run_id, status in self._by_run_id("status", run_ids)}

    def records(self, run_ids: Iterable[str]) -> list[RunRecord]:
        """The stored records of these runs, in the order asked (missing ones left out)."""
        ids = list(run_ids)
        by_id = {run_id: RunRecord.from_json(text) for run_id, text in self._by_run_id("record", ids)}
        return [by_id[i] for i in ids if i in by_id]

    # ------------------------------------------------------------------ claims

    def claim(
        self, run_id: str, *, owner: str, lease_s: float, takeover: tuple[str, float] | None = None
    ) -> Claim:
        """Claim a run for `owner` for `lease_s` seconds, unless it is finished or claimed by another owner.

        Another owner's claim is taken over only when that owner is provably dead
        (`leases.owner_liveness`) or when it is exactly the row `takeover` (owner, expires_at) that
        the caller has watched go stale (`leases.LeaseKeeper`): a compare-and-swap, so two sweeps
        never both win one claim, whatever their clocks say.
        """
        with self._transaction():
            row = self._conn.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is not None and RunStatus(row[0]).is_finished():
                return Claim.FINISHED
            held = self._conn.execute("SELECT owner, expires_at FROM claims WHERE run_id = ?", (run_id,)).fetchone()
            if held is not None and held[0] != owner:
                swapped = takeover is not None and (held[0], float(held[1])) == (takeover[0], float(takeover[1]))
                if not swapped and owner_liveness(held[0]) is not Liveness.DEAD:
                    return Claim.HELD
            self._conn.execute(
                "INSERT OR REPLACE INTO claims (run_id, owner, expires_at) VALUES (?, ?, ?)",
                (run_id, owner, time.time() + lease_s),
            )
            return Claim.CLAIMED

    def claim_holder(self, run_id: str) -> tuple[str, float] | None:
        """(owner, expires_at) of the run's claim, if any."""
        row = self._conn.execute("SELECT owner, expires_at FROM claims WHERE run_id = ?", (run_id,)).fetchone()
        return (row[0], float(row[1])) if row else None

    def renew(self, run_ids: Iterable[str], *, owner: str, lease_s: float) -> None:
        ids = list(run_ids)
        if not ids:
            return
        with self._transaction():
            self._conn.executemany(
                "UPDATE claims SET expires_at = ? WHERE run_id = ? AND owner = ?",
                [(time.time() + lease_s, run_id, owner) for run_id in ids],
            )

    def release(self, run_ids: Iterable[str], *, owner: str) -> None:
        ids = list(run_ids)
        if not ids:
            return
        with self._transaction():
            self._conn.executemany("DELETE FROM claims WHERE run_id = ? AND owner = ?", [(r, owner) for r in ids])

    def claims(self) -> dict[str, tuple[str, float]]:
        return {r: (o, e) for r, o, e in self._conn.execute("SELECT run_id, owner, expires_at FROM claims")}

    # ------------------------------------------------------------------ meta

    def get_meta(self, key: str) -> Any:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def set_meta(self, key: str, value: Any) -> None:
        if key == "schema_version":
            raise ValueError("schema_version is not set through set_meta")
        with self._transaction():
            self._conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    # ------------------------------------------------------------------ plans

    def save_plan(
        self, sweep: str, *, source: str, info: "SweepInfo | dict[str, Any]", runs: Sequence[tuple[str, str, int]],
        merge: bool = False,
    ) -> None:
        """Record the sweep's current plan (run id, variant name, seed), replacing its previous plan.

        With `merge` (a sweep run for some of its variants, `--only`), only the plan of the variants
        in `runs` is replaced; the others keep theirs, so the report still covers the whole sweep.
        """
        info = SweepInfo.coerce(info)
        with self._transaction():
            if merge:
                mine = {variant for _run_id, variant, _seed in runs}
                kept = [row for row in self.plan(sweep) if row[1] not in mine]
                old = self.sweep_info(sweep)
                info = old.merged_with(info) if old is not None else info
                runs = kept + list(runs)
            stored = dataclasses.replace(info, source=None, planned_at=None)  # kept in their own columns
            self._conn.execute(
                "INSERT OR REPLACE INTO sweeps (name, source, planned_at, info) VALUES (?, ?, ?, ?)",
                (sweep, source, utcnow(), stored.to_json()),
            )
            self._conn.execute("DELETE FROM plans WHERE sweep = ?", (sweep,))
            self._conn.executemany(
                "INSERT INTO plans (sweep, position, run_id, variant, seed) VALUES (?, ?, ?, ?, ?)",
                [(sweep, i, run_id, variant, seed) for i, (run_id, variant, seed) in enumerate(runs)],
            )

    def plan(self, sweep: str) -> list[tuple[str, str, int]]:
        rows = self._conn.execute(
            "SELECT run_id, variant, seed FROM plans WHERE sweep = ? ORDER BY position", (sweep,)
        )
        return [(run_id, variant, int(seed)) for run_id, variant, seed in rows]

    def sweep_info(self, sweep: str) -> SweepInfo | None:
        """The typed sweep description (older stores' JSON reads too: missing keys get defaults)."""
        row = self._conn.execute("SELECT source, planned_at, info FROM sweeps WHERE name = ?", (sweep,)).fetchone()
        if row is None:
            return None
        info = json.loads(row[2])
        info.update(source=row[0], planned_at=row[1])
        info["name"] = info.get("name") or sweep
        return SweepInfo.from_dict(info)

    def sweeps(self) -> list[str]:
        return [row[0] for row in self._conn.execute("SELECT name FROM sweeps ORDER BY planned_at, name")]

