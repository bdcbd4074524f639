"""Results store: one row per run, keyed by the run's content id, committed atomically.

`ResultStore` is the protocol the rest of the package talks to; `SQLiteStore` is the default
implementation (`results/harness.db`). The schema carries a version; a mismatch is a clear error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sqlite3
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, Sequence

from harness import migrations
from harness.contracts import SweepInfo
from harness.errors import StoreError
from harness.leases import Claim, ClaimStore, Liveness, make_owner, owner_alive, owner_liveness  # noqa: F401 - re-exported
from harness.fsio import current_umask
from harness.migrations import SCHEMA_VERSION
from harness.records import RunRecord, RunStatus, utcnow

DEFAULT_STORE = Path("results") / "harness.db"
SQLITE_MAGIC = b"SQLite format 3\x00"


class _Guarded:
    """The store's connection: any SQLite error while reading or writing (a damaged file, a
    read-only store, a busy lock past the timeout) becomes a one-line `StoreError` naming the store."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.raw = conn
        self.path = path

    def _fail(self, exc: sqlite3.Error) -> StoreError:
        text = str(exc)
        if "readonly" in text or "read-only" in text:
            return StoreError(
                "the store is read-only (file or file system): reports and status work, a sweep or "
                "calibrate needs a writable store (copy it somewhere writable)",
                file=str(self.path),
            )
        if "locked" in text or "busy" in text:
            return StoreError(f"the store stayed locked by another process for 30 s ({text}); try again", file=str(self.path))
        return StoreError(f"the store is damaged or unreadable ({text}); restore it from a backup", file=str(self.path))

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        try:
            return self.raw.execute(sql, params)
        except sqlite3.Error as exc:
            raise self._fail(exc) from None

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> sqlite3.Cursor:
        try:
            return self.raw.executemany(sql, rows)
        except sqlite3.Error as exc:
            raise self._fail(exc) from None

    def close(self) -> None:
        self.raw.close()


def _ro_uri(path: Path, *, immutable: bool = False) -> str:
    from urllib.parse import quote

    return f"file:{quote(str(path.resolve()))}?mode=ro" + ("&immutable=1" if immutable else "")


def _connect_ro(path: Path) -> sqlite3.Connection:
    """A read-only connection that changes nothing on disk. On a read-only file system, where
    SQLite cannot make the WAL index beside the file, the file is opened as immutable."""
    try:
        conn = sqlite3.connect(_ro_uri(path), uri=True, timeout=30.0, isolation_level=None)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError:
        conn = sqlite3.connect(_ro_uri(path, immutable=True), uri=True, timeout=30.0, isolation_level=None)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn


def inspect_store(path: Path) -> int:
    """The schema version of the harness store at `path`, found without changing a byte of it.

    Raises `StoreError` for anything else: not a regular file, empty, not SQLite, damaged, an SQLite
    file of another program, a store without a version."""
    # No Python-level open() of the file here: closing any descriptor of a file drops every POSIX
    # lock this process holds on it, SQLite's included. Another harness connection open in this
    # process (the sweep's own store, say) would lose its shared lock, and another process could then
    # checkpoint and delete the WAL under it. SQLite's own VFS keeps such descriptors open until the
    # locks go, so the header is read through SQLite only.
    try:
        info = os.stat(path)
    except OSError as exc:
        raise StoreError(f"cannot read the store: {exc.strerror or exc}", file=str(path), key="--store") from None
    if not stat.S_ISREG(info.st_mode):
        raise StoreError("is not a regular file, so not a harness store", file=str(path), key="--store")
    if not os.access(path, os.R_OK):
        raise StoreError("cannot read the store: Permission denied", file=str(path), key="--store")
    if info.st_size == 0:
        raise StoreError("is an empty file, not a harness store (remove it or choose another --store)", file=str(path))
    # Without a -wal file beside it, the main file is the whole database: look at it alone
    # (immutable: no lock, no WAL index, not a byte written, not even the -shm/-wal files SQLite
    # makes beside a WAL database). With one, recent writes may be in it: open read-only the
    # ordinary way (the side files are there already).
    try:
        if not os.path.exists(f"{path}-wal"):
            conn = sqlite3.connect(_ro_uri(path, immutable=True), uri=True, isolation_level=None)
        else:
            conn = sqlite3.connect(_ro_uri(path), uri=True, timeout=30.0, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(f"not a usable harness store: {exc}", file=str(path)) from None
    return _version_in(conn, path)


def _has_magic(path: Path) -> bool:
    """Whether the file starts as an SQLite file does. Read only once SQLite has refused the file:
    no connection of this process can hold a lock on a file SQLite cannot read."""
    try:
        with open(path, "rb") as handle:
            return handle.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except OSError:
        return False


def _version_in(conn: sqlite3.Connection, path: Path) -> int:
    try:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not migrations.CORE_TABLES <= tables:
            raise StoreError(
                "not a harness store (an SQLite file of something else); it was left untouched", file=str(path)
            )
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.DatabaseError as exc:
        if (getattr(exc, "sqlite_errorname", "") == "SQLITE_NOTADB" or "not a database" in str(exc)) and not _has_magic(path):
            raise StoreError("is not an SQLite file, so not a harness store (choose another --store)", file=str(path)) from None
        raise StoreError(f"not a usable harness store: the file is damaged ({exc})", file=str(path)) from None
    except sqlite3.Error as exc:
        raise StoreError(f"not a usable harness store: the file is damaged ({exc})", file=str(path)) from None
    finally:
        conn.close()
    try:
        return int(row[0])
    except (TypeError, ValueError):
        raise StoreError("a harness store without a schema version (damaged?)", file=str(path)) from None


def check_version(version: int, path: Path) -> None:
    if version < SCHEMA_VERSION:
        raise StoreError(
            f"store schema version {version} is from an older harness (this one uses {SCHEMA_VERSION}); "
            f"run `harness store upgrade --store {path}` (it makes a backup first)",
            file=str(path),
        )
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"store schema version {version} is not supported (this harness reads {SCHEMA_VERSION}); "
            "it was written by a newer harness: upgrade harness",
            file=str(path),
        )


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)


def _create_store(path: Path) -> None:
    """Build a new store under a temp name and link it into place: two sweeps creating the same
    store at once end with one store, and a file that appeared meanwhile is never replaced."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".new")
        os.close(fd)
    except OSError as exc:
        raise StoreError(f"cannot create the store: {exc.strerror or exc}", file=str(path), key="--store") from None
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("BEGIN IMMEDIATE")
            migrations.create_schema(conn, created_at=utcnow())
            conn.execute("COMMIT")
        finally:
            conn.close()
        os.chmod(tmp, 0o666 & ~current_umask())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process created it first: use theirs
        except OSError:
            if not os.path.lexists(path):  # a file system without hard links
                os.rename(tmp, path)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot create the store: {exc}", file=str(path), key="--store") from None
    except OSError as exc:
        raise StoreError(f"cannot create the store: {exc.strerror or exc}", file=str(path), key="--store") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def upgrade_store(path: str | Path) -> "migrations.UpgradeResult":
    """`harness store upgrade`: back the store up beside itself, then bring it to the current schema
    in one transaction. Idempotent: a store already current is left alone."""
    path = Path(path)
    if not path.exists():
        raise StoreError("no results store here", file=str(path), key="--store")
    version = inspect_store(path)
    if version > SCHEMA_VERSION:
        check_version(version, path)
    if version == SCHEMA_VERSION:
        return migrations.UpgradeResult(path, version, version, None)
    if not _writable(path):
        raise StoreError("the store is read-only; an upgrade needs to write it and a backup beside it", file=str(path))
    conn = _Guarded(sqlite3.connect(path, timeout=30.0, isolation_level=None), path)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0])  # again, under the write lock: another upgrade may have run
            if version == SCHEMA_VERSION:
                conn.execute("ROLLBACK")
                return migrations.UpgradeResult(path, version, version, None)
            try:
                backup = migrations.write_backup(path, version)
            except OSError as exc:
                raise StoreError(f"cannot write the backup beside the store: {exc.strerror or exc}", file=str(path)) from None
            migrations.run_steps(conn.raw, version, upgraded_at=utcnow())
        except BaseException:
            conn.raw.rollback() if conn.raw.in_transaction else None
            raise
        conn.execute("COMMIT")
    finally:
        conn.close()
    return migrations.UpgradeResult(path, version, SCHEMA_VERSION, backup)


class ResultStore(ClaimStore, Protocol):
    """What the scheduler, the aggregator and the report need from a store (the claim methods
    come from `harness.leases.ClaimStore`)."""

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

    def get_meta(self, key: str) -> Any: ...

    def set_meta(self, key: str, value: Any) -> None: ...


class SQLiteStore:
    """SQLite-backed `ResultStore`. Each write is one transaction; readers never see half a run."""

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        """Open (or, with `create`, make) the store at `path`. Nothing is changed in a file before it
        is known to be a harness store of this schema version; a store that cannot be written (a
        read-only file or file system) opens read-only: reading works, a write is a `StoreError`."""
        self.path = Path(path)
        if not os.path.lexists(self.path):
            if not create:
                raise StoreError("no results store here (run `harness sweep` first)", file=str(self.path))
            _create_store(self.path)
        check_version(inspect_store(self.path), self.path)
        self.readonly = not _writable(self.path)
        try:
            if self.readonly:
                raw = _connect_ro(self.path)
            else:
                raw = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
                raw.execute("PRAGMA busy_timeout = 30000")
                raw.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as exc:
            raise StoreError(f"not a usable harness store: {exc}", file=str(self.path)) from None
        self._conn = _Guarded(raw, self.path)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): one writer at a time, all or nothing."""
        if self.readonly:
            raise self._conn._fail(sqlite3.OperationalError("attempt to write a readonly database"))
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self._conn.raw.in_transaction:
                self._conn.raw.rollback()
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
            # The attempt this one supersedes (a failed try) is kept in `attempts`, not overwritten.
            self._conn.execute(
                f"""
                INSERT OR IGNORE INTO attempts (run_id, attempt, status, finished_at, record)
                SELECT run_id, attempts, status, finished_at, record FROM runs
                WHERE run_id = ? AND status NOT IN ({",".join("?" * len(finished))})
                """,
                (record.run_id, *finished),
            )
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
        return self._record(run_id, row[0]) if row else None

    def _record(self, run_id: str, text: str) -> RunRecord:
        try:
            return RunRecord.from_json(text)
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(
                f"the stored record of run {run_id} is damaged ({type(exc).__name__}: {str(exc)[:200]}); "
                "restore the store from a backup or delete that run's row to train it again",
                file=str(self.path),
            ) from None

    def earlier_attempts(self, run_ids: Iterable[str]) -> dict[str, list[RunRecord]]:
        """The superseded attempts of these runs (failed tries a retry replaced), oldest first."""
        ids = list(run_ids)
        found: dict[str, list[RunRecord]] = {}
        for chunk in range(0, len(ids), 500):
            part = ids[chunk : chunk + 500]
            rows = self._conn.execute(
                f"SELECT run_id, record FROM attempts WHERE run_id IN ({','.join('?' * len(part))}) "
                "ORDER BY run_id, attempt",
                part,
            )
            for run_id, text in rows:
                found.setdefault(run_id, []).append(self._record(run_id, text))
        return found

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
        try:
            return {run_id: RunStatus(status) for run_id, status in self._by_run_id("status", run_ids)}
        except ValueError as exc:
            raise StoreError(f"a stored run has an unknown status ({exc})", file=str(self.path)) from None

    def records(self, run_ids: Iterable[str]) -> list[RunRecord]:
        """The stored records of these runs, in the order asked (missing ones left out)."""
        ids = list(run_ids)
        by_id = {run_id: self._record(run_id, text) for run_id, text in self._by_run_id("record", ids)}
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

