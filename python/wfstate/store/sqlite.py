"""The embedded default store (``sqlite:///path.db``): the store contract on one SQLite file.

One file holds the executions' rows, the append-only log of deltas and the
snapshots (schema in ``_MIGRATIONS``). It is the store a single machine needs
without a server: threads of one process and several processes may use the same
file at once.

How it keeps the contract of ``wfstate.store.base``:

- **Durability.** The file is in WAL mode with ``synchronous=FULL`` by default: a
  ``write`` returns only after its transaction's WAL frames are fsynced, so an
  acknowledged write survives a crash of the process *and* a power loss.
  ``synchronous="NORMAL"`` (opt-in) keeps it across a crash of the process only.
- **Atomic batches.** A batch is one ``BEGIN IMMEDIATE`` transaction; executions
  refused by the version check write nothing, the others commit together. Any
  SQLite error rolls the whole transaction back and raises ``StoreUnavailableError``.
- **Native writes.** Writes run in Rust (``_core.SqliteWriter``): one release of
  the GIL per transaction instead of one per statement step, on a connection of
  the very SQLite library the ``sqlite3`` module loaded (never a second copy: two
  copies in one process do not see each other's file locks). The statements and
  rows are the ones this module's own path uses; where that library cannot be
  reached (SQLite linked into the ``sqlite3`` module itself), or with
  ``native_writer=False``, writes go through the ``sqlite3`` module.
- **Concurrency.** One writer at a time in the process: the native writer's queue
  (its group commit), in which the ``sqlite3`` write connection's lease
  transactions take turns; without the native writer, one write connection behind
  a lock. Reads go through a small pool of separate read-only connections, so in
  WAL mode they never wait for a write. Across processes, ``BEGIN IMMEDIATE`` takes
  SQLite's write lock up front; a busy file is retried for ``connect_timeout``
  seconds, then ``StoreUnavailableError`` is raised.
- **Migrations.** Versioned, applied on open inside ``BEGIN IMMEDIATE``, so several
  processes opening a new file at once migrate it exactly once.

This module must never: acknowledge a write before it is committed; commit part of
a batch; let a raw ``sqlite3`` error escape (each becomes ``StoreUnavailableError``
naming the store, raised ``from`` the original); format a value into SQL (every
value is a bound parameter; SQL text is only ever joined from the constant
fragments below); decode a delta or a snapshot (the Rust core does); or use a
connection in a process other than the one that opened it (SQLite forbids
carrying connections across ``fork``).
"""

from __future__ import annotations

import _sqlite3
import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal, TypeVar

from wfstate import _core
from wfstate._core import EventCursor, RecordBatch, SnapshotTracker
from wfstate._lease import from_micros, now_us
from wfstate._model import StateUpdate
from wfstate.errors import (
    AlreadyExistsError,
    ClosedError,
    ConflictError,
    LeaseHeldError,
    LeaseLostError,
    NotFoundError,
    StoreUnavailableError,
    ValidationError,
    WfstateError,
)
from wfstate.store.base import (
    ACTIVE_STATUSES,
    NEWER_DELTAS_LIMIT,
    LeaseGrant,
    LoadedExecution,
    PendingWrite,
    WriteItem,
    conflict_with,
)

__all__ = ["NATIVE_WRITER_ENV", "SCHEMA_VERSION", "SQLiteStore"]

_Result = TypeVar("_Result")

Synchronous = Literal["NORMAL", "FULL", "EXTRA"]

# PRAGMA values cannot be bound parameters, so each allowed setting maps to its
# constant statement.
_SYNCHRONOUS_PRAGMAS: Final[dict[str, str]] = {
    "NORMAL": "PRAGMA synchronous=NORMAL",
    "FULL": "PRAGMA synchronous=FULL",
    "EXTRA": "PRAGMA synchronous=EXTRA",
}

# The executions table is WITHOUT ROWID. Measured on 100,000 executions with
# 33-character time-ordered ids (SQLite 3.40, dbstat, no VACUUM): a rowid table
# with its separate primary-key index takes 257 bytes per execution against 289,
# but the WITHOUT ROWID table looks an execution up 1.7x faster and updates its
# row (every write does) 1.7-1.9x faster, because the row is found in one b-tree
# instead of two. 32 bytes per execution is about 1% of a store whose executions
# have a few dozen deltas each.
_MIGRATIONS: Final[tuple[tuple[int, tuple[str, ...]], ...]] = (
    (
        1,
        (
            """
            CREATE TABLE wfstate_executions (
                execution_id TEXT PRIMARY KEY,
                workflow_id TEXT NOT NULL,
                status TEXT NOT NULL,
                version INTEGER NOT NULL,
                created_at_us INTEGER NOT NULL,
                updated_at_us INTEGER NOT NULL,
                snapshot_version INTEGER NOT NULL DEFAULT 0,
                forked_from_id TEXT,
                forked_from_version INTEGER
            ) WITHOUT ROWID
            """,
            "CREATE INDEX wfstate_executions_status_updated"
            " ON wfstate_executions (status, updated_at_us)",
            "CREATE INDEX wfstate_executions_workflow_created"
            " ON wfstate_executions (workflow_id, created_at_us)",
            "CREATE INDEX wfstate_executions_created"
            " ON wfstate_executions (created_at_us, execution_id)",
            """
            CREATE TABLE wfstate_deltas (
                execution_id TEXT NOT NULL,
                version INTEGER NOT NULL,
                recorded_at_us INTEGER NOT NULL,
                actor TEXT,
                event_mask INTEGER NOT NULL,
                node_ids TEXT NOT NULL, -- JSON array of the node ids the delta touches
                data BLOB NOT NULL,
                PRIMARY KEY (execution_id, version)
            ) WITHOUT ROWID
            """,
            "CREATE INDEX wfstate_deltas_recorded ON wfstate_deltas (recorded_at_us)",
            """
            CREATE TABLE wfstate_snapshots (
                execution_id TEXT NOT NULL,
                version INTEGER NOT NULL,
                data BLOB NOT NULL,
                PRIMARY KEY (execution_id, version)
            ) WITHOUT ROWID
            """,
        ),
    ),
    (
        # Leases and fencing: the lease lives on the execution's row (the fencing
        # check reads the row the version check reads anyway); each delta records
        # the lease it was written under (NULLs, which cost no bytes, when none).
        2,
        (
            "ALTER TABLE wfstate_executions ADD COLUMN lease_owner TEXT",
            "ALTER TABLE wfstate_executions ADD COLUMN lease_token INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE wfstate_executions ADD COLUMN lease_expires_at_us INTEGER",
            "ALTER TABLE wfstate_deltas ADD COLUMN lease_owner TEXT",
            "ALTER TABLE wfstate_deltas ADD COLUMN lease_token INTEGER",
            # Startup recovery by owner.
            "CREATE INDEX wfstate_executions_lease_owner ON wfstate_executions (lease_owner)"
            " WHERE lease_owner IS NOT NULL",
            # Orphans: running executions that have had a lease, oldest expiry first.
            "CREATE INDEX wfstate_executions_orphans"
            " ON wfstate_executions (lease_expires_at_us)"
            " WHERE status = 'running' AND lease_token > 0",
        ),
    ),
    (
        # Status without the update time, as on PostgreSQL: the time changes on every
        # write, so its index entry moved on every write (measured, 11-12 µs of a
        # 200-250 µs sync write); a status changes a few times per execution.
        # Stuck executions ("running, not updated for 10 minutes") take the running
        # ones from this index and filter them on the time.
        3,
        (
            "DROP INDEX IF EXISTS wfstate_executions_status_updated",
            "CREATE INDEX IF NOT EXISTS wfstate_executions_status ON wfstate_executions (status)",
        ),
    ),
)

#: The schema version this code migrates a file to.
SCHEMA_VERSION: Final[int] = _MIGRATIONS[-1][0]

_CREATE_MIGRATIONS_TABLE: Final = """
    CREATE TABLE IF NOT EXISTS wfstate_schema_migrations (
        version INTEGER PRIMARY KEY,
        applied_at_us INTEGER NOT NULL
    )
"""
_SELECT_SCHEMA_VERSION: Final = "SELECT coalesce(max(version), 0) FROM wfstate_schema_migrations"
_PROBE_WRITABLE: Final = "UPDATE wfstate_schema_migrations SET version = version WHERE 0"
_INSERT_MIGRATION: Final = (
    "INSERT INTO wfstate_schema_migrations (version, applied_at_us) VALUES (?, ?)"
)

_INSERT_EXECUTION: Final = """
    INSERT INTO wfstate_executions (
        execution_id, workflow_id, status, version, created_at_us, updated_at_us,
        snapshot_version, forked_from_id, forked_from_version
    ) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (execution_id) DO NOTHING
"""
_UPDATE_EXECUTION: Final = """
    UPDATE wfstate_executions
    SET version = ?, status = ?, updated_at_us = ?,
        snapshot_version = max(snapshot_version, ?)
    WHERE execution_id = ? AND version = ?
"""
#: The same when the status stays as stored (the row the core makes has 5 values, not
#: 6): SQLite rewrites the entries of every index on a column its SET names, changed
#: or not, so naming ``status`` would cost each write its status-index entry.
_UPDATE_EXECUTION_KEEP_STATUS: Final = """
    UPDATE wfstate_executions
    SET version = ?, updated_at_us = ?, snapshot_version = max(snapshot_version, ?)
    WHERE execution_id = ? AND version = ?
"""
_SELECT_VERSION: Final = "SELECT version FROM wfstate_executions WHERE execution_id = ?"
_SELECT_VERSION_AND_SNAPSHOT: Final = (
    "SELECT version, snapshot_version FROM wfstate_executions WHERE execution_id = ?"
)
_INSERT_DELTA: Final = """
    INSERT INTO wfstate_deltas (
        execution_id, version, recorded_at_us, actor, event_mask, node_ids, data,
        lease_owner, lease_token
    ) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_SELECT_NEWER_DELTAS: Final = """
    SELECT version, recorded_at_us, actor, data FROM wfstate_deltas
    WHERE execution_id = ? AND version > ? ORDER BY version LIMIT ?
"""
_SELECT_LEASE: Final = """
    SELECT lease_owner, lease_token, coalesce(lease_expires_at_us, 0)
    FROM wfstate_executions WHERE execution_id = ?
"""
_GRANT_LEASE: Final = """
    UPDATE wfstate_executions
    SET lease_owner = ?, lease_token = lease_token + 1, lease_expires_at_us = ?
    WHERE execution_id = ?
    RETURNING lease_token
"""
_RENEW_LEASE: Final = """
    UPDATE wfstate_executions SET lease_expires_at_us = ?
    WHERE execution_id = ? AND lease_owner = ? AND lease_token = ?
"""
_RELEASE_LEASE: Final = """
    UPDATE wfstate_executions SET lease_owner = NULL, lease_expires_at_us = 0
    WHERE execution_id = ? AND lease_owner = ? AND lease_token = ?
"""
_SELECT_ORPHANS: Final = """
    SELECT execution_id FROM wfstate_executions
    WHERE status = 'running' AND lease_token > 0
      AND (lease_owner IS NULL OR lease_expires_at_us <= ?)
    ORDER BY lease_expires_at_us, execution_id
    LIMIT ?
"""
_SELECT_OWNED: Final = """
    SELECT execution_id FROM wfstate_executions
    WHERE lease_owner = ? AND status IN ('running', 'suspended')
    ORDER BY created_at_us, execution_id
"""
_SELECT_LEASE_LOG: Final = """
    SELECT version, lease_owner, lease_token FROM wfstate_deltas
    WHERE execution_id = ? ORDER BY version
"""
_INSERT_SNAPSHOT: Final = (
    "INSERT INTO wfstate_snapshots (execution_id, version, data) VALUES (?, ?, ?)"
)
_SELECT_NEWEST_SNAPSHOT: Final = """
    SELECT version, data FROM wfstate_snapshots
    WHERE execution_id = ? AND version <= ?
    ORDER BY version DESC LIMIT 1
"""
_SELECT_DELTAS_FOR_LOAD: Final = """
    SELECT version, recorded_at_us, data FROM wfstate_deltas
    WHERE execution_id = ? AND version > ? AND version <= ?
    ORDER BY version
"""
_SELECT_CURRENT_VERSIONS: Final = """
    SELECT execution_id, version FROM wfstate_executions
    WHERE execution_id IN (SELECT value FROM json_each(?))
"""
_SELECT_VERSION_AT: Final = """
    SELECT max(version) FROM wfstate_deltas
    WHERE execution_id = ? AND recorded_at_us <= ?
"""

#: Idle read connections kept for reuse; more concurrent readers open (and on
#: return close) extra connections.
_MAX_IDLE_READERS: Final = 8

# Primary result codes (the low byte of an extended code) that mean "another
# connection holds the lock": worth retrying until the deadline.
_BUSY_CODES: Final = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})


def _is_busy(error: sqlite3.Error) -> bool:
    code = getattr(error, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _BUSY_CODES


def _rollback(connection: sqlite3.Connection) -> None:
    """End any transaction the connection has open; a second failure is not news."""
    try:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
    except sqlite3.Error:
        pass


@dataclass(slots=True)
class _Chain:
    """One execution's items of a batch, turned into statement parameters."""

    execution_id: str
    positions: list[int]
    base_version: int
    #: The executions row: INSERT parameters for a creation, UPDATE ones otherwise
    #: (with the status, or 5 values without it: ``_update_statement``).
    row: tuple[Any, ...]
    deltas: list[tuple[Any, ...]]
    snapshots: list[tuple[str, int, bytes]]
    #: (owner, fencing token) the chain is written under, or None.
    lease: tuple[str, int] | None


def _chains(items: Sequence[WriteItem]) -> list[_Chain]:
    """Group a batch by execution and compute every parameter before the lock is taken
    (in Rust: ``_core.sqlite_write_rows``, the builder of the write-behind's rows too)."""
    return [
        _Chain(execution_id, positions, base, row, deltas, snapshots, items[positions[0]].lease)
        for execution_id, positions, base, row, deltas, snapshots in _core.sqlite_write_rows(
            [(item.record, item.snapshot, item.lease) for item in items]
        )
    ]


def _conflict(
    connection: sqlite3.Connection, execution_id: str, base_version: int
) -> ConflictError:
    """The refusal of an update based on ``base_version`` that found another version
    stored, with the deltas the writer missed when they are few (same transaction)."""
    found = connection.execute(_SELECT_VERSION_AND_SNAPSHOT, (execution_id,)).fetchone()
    actual, snapshot_version = (0, 0) if found is None else found
    newer = (
        connection.execute(
            _SELECT_NEWER_DELTAS, (execution_id, base_version, NEWER_DELTAS_LIMIT)
        ).fetchall()
        if 0 < actual - base_version <= NEWER_DELTAS_LIMIT
        else []
    )
    return conflict_with(execution_id, base_version, actual, newer, snapshot_version)


#: Set to "0" to write through the ``sqlite3`` module instead of the native writer.
NATIVE_WRITER_ENV: Final = "WFSTATE_SQLITE_NATIVE_WRITER"

#: At most this many versions in one transaction of the native writer's group commit.
_NATIVE_MAX_BATCH: Final = 1000

#: The native writer's statements, by the names ``_core.SqliteWriter`` prepares.
_NATIVE_STATEMENTS: dict[str, str] = {
    "insert_execution": _INSERT_EXECUTION,
    "update_execution": _UPDATE_EXECUTION,
    "update_execution_keep_status": _UPDATE_EXECUTION_KEEP_STATUS,
    "insert_delta": _INSERT_DELTA,
    "insert_snapshot": _INSERT_SNAPSHOT,
    "select_lease": _SELECT_LEASE,
    "select_version_and_snapshot": _SELECT_VERSION_AND_SNAPSHOT,
    "select_newer_deltas": _SELECT_NEWER_DELTAS,
}


def _native_refusal(execution_id: str, base_version: int, refusal: tuple[Any, ...]) -> WfstateError:
    """The error for a chain the native writer reports refused (``SqliteWriter``)."""
    if refusal[0] == "lease":
        _, token, current = refusal
        return LeaseLostError(execution_id, token, current)
    if refusal[0] == "exists":
        return AlreadyExistsError(f"execution {execution_id!r} exists already")
    _, actual, snapshot_version, newer = refusal
    return conflict_with(execution_id, base_version, actual, newer, snapshot_version)


def _native_refusals(
    refused: Sequence[tuple[str, tuple[Any, ...]]],
    chains: Sequence[tuple[str, int, int, str, int, int, int]],
) -> dict[str, WfstateError]:
    """A write-behind batch's refusals by execution id, from the native writer's (the
    chains, as ``RecordBatch.chains()`` gives them, carry each one's base version)."""
    bases = {chain[0]: chain[1] for chain in chains}
    return {
        execution_id: _native_refusal(execution_id, bases[execution_id], refusal)
        for execution_id, refusal in refused
    }


def _update_statement(row: tuple[Any, ...]) -> str:
    """The UPDATE of an execution row the core made (with the status or without)."""
    return _UPDATE_EXECUTION if len(row) == 6 else _UPDATE_EXECUTION_KEEP_STATUS


def _insert_rows(
    connection: sqlite3.Connection,
    deltas: list[tuple[Any, ...]],
    snapshots: list[tuple[str, int, bytes]],
) -> None:
    """Insert a chain's deltas and snapshots (after its row passed its check)."""
    if len(deltas) == 1:  # the sync path's usual chain: execute costs less
        connection.execute(_INSERT_DELTA, deltas[0])
    else:
        connection.executemany(_INSERT_DELTA, deltas)
    if snapshots:
        connection.executemany(_INSERT_SNAPSHOT, snapshots)


def _write_chains(connection: sqlite3.Connection, chains: list[_Chain]) -> dict[str, WfstateError]:
    """Apply the chains in one transaction; return the refused executions."""
    refusals: dict[str, WfstateError] = {}
    connection.execute("BEGIN IMMEDIATE")
    for chain in chains:
        if chain.lease is not None:
            found = connection.execute(_SELECT_LEASE, (chain.execution_id,)).fetchone()
            owner, token = chain.lease
            if found is None or found[0] != owner or found[1] != token:
                current = None if found is None or found[0] is None else found[1]
                refusals[chain.execution_id] = LeaseLostError(chain.execution_id, token, current)
                continue
        if chain.base_version == 0:
            if connection.execute(_INSERT_EXECUTION, chain.row).rowcount == 0:
                refusals[chain.execution_id] = AlreadyExistsError(
                    f"execution {chain.execution_id!r} exists already"
                )
                continue
        elif connection.execute(_update_statement(chain.row), chain.row).rowcount == 0:
            refusals[chain.execution_id] = _conflict(
                connection, chain.execution_id, chain.base_version
            )
            continue
        _insert_rows(connection, chain.deltas, chain.snapshots)
    connection.execute("COMMIT")
    return refusals


class SQLiteStore:
    """The store contract on one SQLite file in WAL mode. Thread- and process-safe.

    ``path`` is the database file (created if missing; its directory must exist),
    ``display`` the URL to show (``url``), ``connect_timeout`` how long, in seconds,
    a call waits for a file another connection has locked before it raises
    ``StoreUnavailableError`` (the whole transaction is retried meanwhile; a write
    waits for this process's other writes, which each hold the one write connection
    for at most about that long, without a deadline of its own). ``synchronous`` is
    SQLite's setting for the write
    connection: ``"FULL"`` (default) makes every acknowledged write survive power
    loss; ``"NORMAL"`` only a crash of the process, and writes faster.
    ``native_writer`` chooses the native writer (see the module docs) or the
    ``sqlite3`` module's path; None (default) takes the native one unless
    ``$WFSTATE_SQLITE_NATIVE_WRITER`` is ``0``. It is used only where it can share
    the ``sqlite3`` module's SQLite library (``native_writer`` tells).

    ``storage_bytes()`` counts the database's pages in use (``page_count`` minus
    ``freelist_count``, times ``page_size``) as of the last commit, WAL included:
    the tables, their indexes and SQLite's schema page, not the WAL file's own size
    nor free pages.

    Raises ``StoreUnavailableError`` naming the store when the file cannot be
    opened, is not a SQLite database, cannot be switched to WAL mode, or holds a
    schema newer than this code knows; ``ValidationError`` for a bad argument.
    """

    def __init__(
        self,
        path: str,
        *,
        display: str,
        connect_timeout: float = 5.0,
        synchronous: Synchronous = "FULL",
        native_writer: bool | None = None,
    ) -> None:
        self.url = display
        if not path or path == ":memory:" or path.startswith("file::memory:"):
            raise ValidationError(
                f"{display!r} names no database file; use memory:// for a store in memory"
            )
        if not (isinstance(connect_timeout, int | float) and 0 <= connect_timeout < math.inf):
            raise ValidationError(
                f"connect_timeout must be a finite number of seconds >= 0, not {connect_timeout!r}"
            )
        if synchronous not in _SYNCHRONOUS_PRAGMAS:
            raise ValidationError(
                f"synchronous must be one of {sorted(_SYNCHRONOUS_PRAGMAS)}, not {synchronous!r}"
            )
        # Absolute, so that read connections opened later find the same file even if
        # the process changes directory, and so that SQLite never reads the name as a
        # "file:" URI.
        self._path = os.path.abspath(path)
        self._connect_timeout = float(connect_timeout)
        self._synchronous_pragma = _SYNCHRONOUS_PRAGMAS[synchronous]
        self._pid = os.getpid()
        self._closed = False
        self._write_lock = threading.Lock()
        self._pool_lock = threading.Lock()
        self._idle_readers: list[sqlite3.Connection] = []
        self._writer = self._open_writer()
        if native_writer is None:
            native_writer = os.environ.get(NATIVE_WRITER_ENV, "1") != "0"
        self._native: _core.SqliteWriter | None = None
        if native_writer:
            self._native = self._open_native()

    def __repr__(self) -> str:
        return f"SQLiteStore({self.url!r})"

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- connections ----------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: the sqlite3 module opens no transaction of its own;
        # this class issues BEGIN IMMEDIATE / BEGIN / COMMIT itself. ``timeout`` is
        # SQLite's busy timeout: how long a statement waits for another connection's lock.
        return sqlite3.connect(
            self._path,
            timeout=self._connect_timeout,
            isolation_level=None,
            check_same_thread=False,
        )

    def _unavailable(self, doing: str, error: sqlite3.Error) -> StoreUnavailableError:
        waited = (
            f" (another connection held the lock for {self._connect_timeout:g} s)"
            if _is_busy(error)
            else ""
        )
        return StoreUnavailableError(
            f"SQLite store {self.url} ({self._path}): {doing} failed: {error}{waited}",
            target=self.url,
        )

    def _open_failure(self, error: sqlite3.Error) -> StoreUnavailableError:
        directory = os.path.dirname(self._path)
        if not os.path.exists(directory):
            reason = f"its directory {directory} does not exist"
        elif not os.path.isdir(directory):
            reason = f"{directory} is not a directory"
        elif os.path.isdir(self._path):
            reason = "the path is a directory"
        elif os.path.exists(self._path) and not os.access(self._path, os.R_OK | os.W_OK):
            reason = f"the file is not readable and writable by this process ({error})"
        elif not os.access(directory, os.W_OK | os.X_OK):
            # SQLite creates the database, and its -wal and -shm files, in the directory.
            reason = f"its directory {directory} is not writable by this process ({error})"
        else:
            reason = str(error)
        return StoreUnavailableError(
            f"cannot open the SQLite store {self.url} ({self._path}): {reason}", target=self.url
        )

    def _open_writer(self) -> sqlite3.Connection:
        try:
            writer = self._connect()
        except sqlite3.Error as e:
            raise self._open_failure(e) from e
        try:
            self._retrying(writer, self._configure_writer, doing="opening")
            self._retrying(writer, self._migrate, doing="migrating the schema")
        except StoreUnavailableError as e:
            writer.close()
            cause = e.__cause__
            if isinstance(cause, sqlite3.Error) and not _is_busy(cause):
                raise self._open_failure(cause) from cause
            raise
        except BaseException:
            writer.close()
            raise
        return writer

    def _open_native(self) -> _core.SqliteWriter | None:
        """The native writer on a second write connection, or None when the ``sqlite3``
        module's SQLite library cannot be reached from Rust."""
        try:
            return _core.SqliteWriter(
                self._path,
                _NATIVE_STATEMENTS,
                [self._synchronous_pragma],
                self._connect_timeout,
                _sqlite3.__file__,
                sqlite3.sqlite_version,
                max_batch=_NATIVE_MAX_BATCH,
                newer_limit=NEWER_DELTAS_LIMIT,
            )
        except ValueError:
            return None
        except sqlite3.Error as e:
            self._writer.close()
            raise self._open_failure(e) from e

    @property
    def native_writer(self) -> bool:
        """Whether writes run in Rust (``_core.SqliteWriter``; see the module docs)."""
        return self._native is not None

    @property
    def groups_writes(self) -> bool:
        """True with the native writer: ``write`` group-commits concurrent callers."""
        return self._native is not None

    def write_stats(self) -> tuple[int, int]:
        """(transactions of sync writes the native writer ran, versions they
        carried); the write-behind's batches are not counted here."""
        return (0, 0) if self._native is None else self._native.stats()

    def _configure_writer(self, writer: sqlite3.Connection) -> None:
        # journal_mode=WAL is stored in the file: a no-op once any process has set it.
        (journal_mode,) = writer.execute("PRAGMA journal_mode=WAL").fetchone()
        if str(journal_mode).lower() != "wal":
            raise StoreUnavailableError(
                f"cannot open the SQLite store {self.url} ({self._path}): the file system "
                f"does not support WAL mode (journal mode stayed {journal_mode!r})",
                target=self.url,
            )
        writer.execute(self._synchronous_pragma)

    def _migrate(self, writer: sqlite3.Connection) -> None:
        # Under BEGIN IMMEDIATE, so that of several processes opening a new file at
        # once, one migrates and the others then find the work done.
        writer.execute("BEGIN IMMEDIATE")
        writer.execute(_CREATE_MIGRATIONS_TABLE)
        (applied,) = writer.execute(_SELECT_SCHEMA_VERSION).fetchone()
        if applied > SCHEMA_VERSION:
            raise StoreUnavailableError(
                f"the SQLite store {self.url} ({self._path}) has schema version {applied}, "
                f"newer than this wfstate knows ({SCHEMA_VERSION}); upgrade wfstate",
                target=self.url,
            )
        for version, statements in _MIGRATIONS:
            if version <= applied:
                continue
            for statement in statements:
                writer.execute(statement)
            writer.execute(_INSERT_MIGRATION, (version, now_us()))
        # SQLite opens a file it may not write read-only, and BEGIN IMMEDIATE succeeds
        # on it; this no-op write fails there (SQLITE_READONLY), so open does too.
        writer.execute(_PROBE_WRITABLE)
        writer.execute("COMMIT")

    def _check_usable(self) -> None:
        if self._closed:
            raise ClosedError(f"the SQLite store {self.url} is closed")
        if os.getpid() != self._pid:
            raise StoreUnavailableError(
                f"the SQLite store {self.url} was opened in process {self._pid}; "
                "SQLite connections cannot cross fork(): open the store in this process",
                target=self.url,
            )

    def _acquire_reader(self) -> sqlite3.Connection:
        with self._pool_lock:
            self._check_usable()
            if self._idle_readers:
                return self._idle_readers.pop()
        try:
            reader = self._connect()
            # The reader's synchronous setting governs the checkpoint SQLite runs when
            # the file's last connection closes: keep it as safe as the writer's.
            reader.execute(self._synchronous_pragma)
            reader.execute("PRAGMA query_only=ON")
        except sqlite3.Error as e:
            raise self._unavailable("opening a read connection", e) from e
        return reader

    def _release_reader(self, reader: sqlite3.Connection, *, healthy: bool) -> None:
        with self._pool_lock:
            if healthy and not self._closed and len(self._idle_readers) < _MAX_IDLE_READERS:
                self._idle_readers.append(reader)
                return
        reader.close()

    def _retrying(
        self,
        connection: sqlite3.Connection,
        operation: Callable[[sqlite3.Connection], _Result],
        *,
        doing: str,
    ) -> _Result:
        """Run ``operation``; on "database is locked" roll back and rerun it until the
        deadline; any other SQLite error becomes ``StoreUnavailableError``.

        ``operation`` must be repeatable from the start: it opens its own transaction.
        """
        deadline = time.monotonic() + self._connect_timeout
        pause = 0.001
        while True:
            try:
                return operation(connection)
            except sqlite3.Error as e:
                _rollback(connection)
                remaining = deadline - time.monotonic()
                if not _is_busy(e) or remaining <= 0:
                    raise self._unavailable(doing, e) from e
                time.sleep(min(pause, remaining))
                pause = min(pause * 2, 0.05)
            except BaseException:
                _rollback(connection)
                raise

    def _read(self, operation: Callable[[sqlite3.Connection], _Result]) -> _Result:
        reader = self._acquire_reader()
        healthy = False
        try:
            result = self._retrying(reader, operation, doing="reading")
            healthy = True
            return result
        finally:
            self._release_reader(reader, healthy=healthy)

    # -- the Store protocol ---------------------------------------------------------

    def schema_version(self) -> int:
        def operation(reader: sqlite3.Connection) -> int:
            (version,) = reader.execute(_SELECT_SCHEMA_VERSION).fetchone()
            return int(version)

        return self._read(operation)

    def write(self, items: Sequence[WriteItem]) -> list[WfstateError | None]:
        native = self._native
        if native is not None:
            return self._write_native(native, items)
        if len(items) == 1 and items[0].lease is None and items[0].record.base_version:
            return [self._write_update(items[0])]
        outcomes: list[WfstateError | None] = [None] * len(items)
        if not items:
            self._check_usable()
            return outcomes
        chains = _chains(items)
        with self._write_lock:
            self._check_usable()
            refusals = self._retrying(
                self._writer, lambda writer: _write_chains(writer, chains), doing="writing"
            )
        if refusals:
            for chain in chains:
                refusal = refusals.get(chain.execution_id)
                if refusal is not None:
                    for position in chain.positions:
                        outcomes[position] = refusal
        return outcomes

    def _native_failure(
        self, native: _core.SqliteWriter, error: sqlite3.Error | RuntimeError
    ) -> Exception:
        """What a native writer's write error becomes: ``StoreUnavailableError`` for
        the ``sqlite3`` module's error, else as ``_closed_meanwhile`` says."""
        if isinstance(error, sqlite3.Error):
            return self._unavailable("writing", error)
        return self._closed_meanwhile(native, error)

    def _closed_meanwhile(self, native: _core.SqliteWriter, error: RuntimeError) -> Exception:
        """``ClosedError`` when ``error`` says the native writer was closed (by
        ``close()`` after this call checked), else ``error`` itself."""
        if native.closed:
            return ClosedError(f"the SQLite store {self.url} is closed")
        return error

    def _write_native(
        self, native: _core.SqliteWriter, items: Sequence[WriteItem]
    ) -> list[WfstateError | None]:
        outcomes: list[WfstateError | None] = [None] * len(items)
        self._check_usable()
        if not items:
            return outcomes
        try:
            refused = native.write_items([(i.record, i.snapshot, i.lease) for i in items])
        except (sqlite3.Error, RuntimeError) as e:
            raise self._native_failure(native, e) from e
        for positions, refusal in refused:
            record = items[positions[0]].record
            error = _native_refusal(record.execution_id, record.base_version, refusal)
            for position in positions:
                outcomes[position] = error
        return outcomes

    def _write_update(self, item: WriteItem) -> ConflictError | None:
        """One version of an existing execution without a lease: the sync path of one
        writer, without grouping into chains (measured 4-6 µs less a write)."""
        record = item.record
        execution_id, base_version = record.execution_id, record.base_version
        row, deltas, snapshots = record.sqlite_update_rows(item.snapshot)

        def transaction(writer: sqlite3.Connection) -> ConflictError | None:
            writer.execute("BEGIN IMMEDIATE")
            refusal = None
            if writer.execute(_update_statement(row), row).rowcount == 0:
                refusal = _conflict(writer, execution_id, base_version)
            else:
                _insert_rows(writer, deltas, snapshots)
            writer.execute("COMMIT")
            return refusal

        with self._write_lock:
            self._check_usable()
            return self._retrying(self._writer, transaction, doing="writing")

    def write_pending(
        self,
        cursor: EventCursor,
        tracker: SnapshotTracker,
        max_events: int,
        timeout: float,
        skip_before: Mapping[str, int],
        keep_going: float = 0.0,
    ) -> PendingWrite | None:
        """With the native writer, the write-behind's step in one release of the GIL
        (``SqliteWriter.pump``), going on through full batches for up to
        ``keep_going`` seconds; else None."""
        native = self._native
        if native is None:
            return None
        self._check_usable()
        batch, chains, snapshot, refused, sizes, error, earlier = native.pump(
            cursor, tracker, max_events, timeout, dict(skip_before), keep_going
        )
        if error is not None:
            if isinstance(error, sqlite3.Error):
                failure = self._unavailable("writing", error)
                return PendingWrite(batch, chains, snapshot, None, failure, earlier)
            if isinstance(error, RuntimeError):
                raise self._closed_meanwhile(native, error) from error
            raise error
        if refused is None or sizes is None:
            return PendingWrite(batch, chains, snapshot, None, None, earlier)
        written = (_native_refusals(refused, chains), sizes)
        return PendingWrite(batch, chains, snapshot, written, None, earlier)

    def write_update(
        self,
        core: _core.Core,
        tracker: _core.SnapshotTracker,
        execution_id: str,
        update: StateUpdate | Mapping[str, Any],
        expected_version: int | None,
        actor: str | None,
    ) -> tuple[int, WfstateError | None] | None:
        """With the native writer, the sync path of one update in one call
        (``SqliteWriter.apply``: the snapshot decision and the write without the
        GIL, in the group); else None."""
        native = self._native
        if native is None:
            return None
        self._check_usable()
        try:
            version, refusal = native.apply(
                core, tracker, execution_id, update, expected_version, actor
            )
        except (sqlite3.Error, RuntimeError) as e:
            raise self._native_failure(native, e) from e
        if refusal is None:
            return version, None
        return version, _native_refusal(execution_id, version, refusal)

    def write_batch(
        self, batch: RecordBatch, snapshot: Sequence[bool]
    ) -> tuple[dict[str, WfstateError], list[int]]:
        native = self._native
        if native is not None:
            self._check_usable()
            try:
                refused, sizes = native.write_batch(batch, list(snapshot))
            except (sqlite3.Error, RuntimeError) as e:
                raise self._native_failure(native, e) from e
            return (_native_refusals(refused, batch.chains()) if refused else {}), sizes
        # The rows come encoded from Rust (one call for the whole batch).
        rows, sizes = batch.sqlite_rows(snapshot)
        chains = [
            _Chain(execution_id, [], base, row, deltas, snapshots, None)
            for execution_id, base, row, deltas, snapshots in rows
        ]
        if not chains:
            self._check_usable()
            return {}, sizes
        with self._write_lock:
            self._check_usable()
            refusals = self._retrying(
                self._writer, lambda writer: _write_chains(writer, chains), doing="writing"
            )
        return refusals, sizes

    def load(self, execution_id: str, *, version: int | None = None) -> LoadedExecution | None:
        def operation(reader: sqlite3.Connection) -> LoadedExecution | None:
            # One read transaction: the row, snapshot and deltas of one commit.
            reader.execute("BEGIN")
            found = reader.execute(_SELECT_VERSION, (execution_id,)).fetchone()
            loaded: LoadedExecution | None = None
            if found is not None:
                target = found[0] if version is None else version
                if 1 <= target <= found[0]:
                    snapshot_row = reader.execute(
                        _SELECT_NEWEST_SNAPSHOT, (execution_id, target)
                    ).fetchone()
                    snapshot_version, snapshot = snapshot_row or (0, None)
                    deltas = reader.execute(
                        _SELECT_DELTAS_FOR_LOAD, (execution_id, snapshot_version, target)
                    ).fetchall()
                    loaded = LoadedExecution(execution_id, snapshot, snapshot_version, deltas)
            reader.execute("COMMIT")
            return loaded

        return self._read(operation)

    def active_execution_ids(self) -> list[str]:
        return self.list_execution_ids(statuses=ACTIVE_STATUSES)

    def current_versions(self, execution_ids: Sequence[str]) -> dict[str, int]:
        if not execution_ids:
            self._check_usable()
            return {}
        # One JSON parameter instead of an IN list: one cached statement for any count.
        ids_json = json.dumps(list(execution_ids))

        def operation(reader: sqlite3.Connection) -> dict[str, int]:
            return dict(reader.execute(_SELECT_CURRENT_VERSIONS, (ids_json,)).fetchall())

        return self._read(operation)

    def version_at(self, execution_id: str, at_us: int) -> int | None:
        def operation(reader: sqlite3.Connection) -> int | None:
            (version,) = reader.execute(_SELECT_VERSION_AT, (execution_id, at_us)).fetchone()
            return None if version is None else int(version)

        return self._read(operation)

    def read_deltas(
        self,
        execution_id: str,
        *,
        after_version: int | None = None,
        since_us: int | None = None,
        until_us: int | None = None,
    ) -> list[tuple[int, int, str | None, bytes]]:
        # Only the filters given go into the SQL (joined from constant fragments, values
        # bound), so that ``version > ?`` narrows the primary-key range scan.
        sql = (
            "SELECT version, recorded_at_us, actor, data FROM wfstate_deltas"
            " WHERE execution_id = :execution_id"
        )
        parameters: dict[str, object] = {"execution_id": execution_id}
        if after_version is not None:
            sql += " AND version > :after_version"
            parameters["after_version"] = after_version
        if since_us is not None:
            sql += " AND recorded_at_us >= :since_us"
            parameters["since_us"] = since_us
        if until_us is not None:
            sql += " AND recorded_at_us < :until_us"
            parameters["until_us"] = until_us
        sql += " ORDER BY version"

        def operation(reader: sqlite3.Connection) -> list[tuple[int, int, str | None, bytes]]:
            return reader.execute(sql, parameters).fetchall()

        return self._read(operation)

    def list_execution_ids(
        self,
        *,
        statuses: Sequence[str] | None = None,
        workflow_id: str | None = None,
        limit: int | None = None,
    ) -> list[str]:
        # SQL joined from constant fragments; every value is bound.
        sql = "SELECT execution_id FROM wfstate_executions"
        conditions: list[str] = []
        parameters: dict[str, object] = {}
        if statuses is not None:
            conditions.append("status IN (SELECT value FROM json_each(:statuses))")
            parameters["statuses"] = json.dumps(list(statuses))
        if workflow_id is not None:
            conditions.append("workflow_id = :workflow_id")
            parameters["workflow_id"] = workflow_id
        if conditions:
            sql += " WHERE " + " AND ".join(conditions)
        sql += " ORDER BY created_at_us, execution_id"
        if limit is not None and limit >= 0:
            sql += " LIMIT :limit"
            parameters["limit"] = limit

        def operation(reader: sqlite3.Connection) -> list[str]:
            return [execution_id for (execution_id,) in reader.execute(sql, parameters)]

        ids = self._read(operation)
        # A negative limit slices like a Python list, as MemoryStore's does.
        return ids[:limit] if limit is not None and limit < 0 else ids

    def storage_bytes(self) -> int:
        def operation(reader: sqlite3.Connection) -> int:
            reader.execute("BEGIN")
            (page_count,) = reader.execute("PRAGMA page_count").fetchone()
            (freelist_count,) = reader.execute("PRAGMA freelist_count").fetchone()
            (page_size,) = reader.execute("PRAGMA page_size").fetchone()
            reader.execute("COMMIT")
            return int((page_count - freelist_count) * page_size)

        return self._read(operation)

    # -- leases -------------------------------------------------------------------------

    def _write_op(self, operation: Callable[[sqlite3.Connection], _Result], doing: str) -> _Result:
        """Run ``operation`` in one BEGIN IMMEDIATE transaction on the write connection."""

        def transaction(writer: sqlite3.Connection) -> _Result:
            writer.execute("BEGIN IMMEDIATE")
            result = operation(writer)
            writer.execute("COMMIT")
            return result

        with self._write_lock:
            self._check_usable()
            native = self._native
            if native is None:
                return self._retrying(self._writer, transaction, doing=doing)
            # The native writer's connection is this process's other writer: take a
            # turn in its queue rather than wait on the file's lock.
            try:
                result: _Result = native.exclusive(
                    lambda: self._retrying(self._writer, transaction, doing=doing)
                )
            except RuntimeError as e:
                raise self._closed_meanwhile(native, e) from e
            return result

    def acquire_lease(self, execution_id: str, owner: str, ttl_us: int) -> LeaseGrant:
        def operation(writer: sqlite3.Connection) -> LeaseGrant:
            found = writer.execute(_SELECT_LEASE, (execution_id,)).fetchone()
            if found is None:
                raise NotFoundError(f"no execution {execution_id!r}")
            holder, _, expires_at_us = found
            now = now_us()
            if holder is not None and holder != owner and expires_at_us > now:
                raise LeaseHeldError(execution_id, holder, from_micros(expires_at_us))
            (token,) = writer.execute(_GRANT_LEASE, (owner, now + ttl_us, execution_id)).fetchone()
            return LeaseGrant(execution_id, owner, token, now + ttl_us)

        return self._write_op(operation, "acquiring a lease")

    def renew_lease(self, execution_id: str, owner: str, token: int, ttl_us: int) -> LeaseGrant:
        def operation(writer: sqlite3.Connection) -> LeaseGrant:
            expires_at_us = now_us() + ttl_us
            if writer.execute(_RENEW_LEASE, (expires_at_us, execution_id, owner, token)).rowcount:
                return LeaseGrant(execution_id, owner, token, expires_at_us)
            found = writer.execute(_SELECT_LEASE, (execution_id,)).fetchone()
            current = None if found is None or found[0] is None else found[1]
            raise LeaseLostError(execution_id, token, current)

        return self._write_op(operation, "renewing a lease")

    def release_lease(self, execution_id: str, owner: str, token: int) -> bool:
        def operation(writer: sqlite3.Connection) -> bool:
            return writer.execute(_RELEASE_LEASE, (execution_id, owner, token)).rowcount > 0

        return self._write_op(operation, "releasing a lease")

    def get_lease(self, execution_id: str) -> LeaseGrant | None:
        def operation(reader: sqlite3.Connection) -> LeaseGrant | None:
            found = reader.execute(_SELECT_LEASE, (execution_id,)).fetchone()
            if found is None or found[0] is None:
                return None
            return LeaseGrant(execution_id, found[0], found[1], found[2])

        return self._read(operation)

    def claim_orphans(self, owner: str, ttl_us: int, limit: int) -> list[LeaseGrant]:
        def operation(writer: sqlite3.Connection) -> list[LeaseGrant]:
            now = now_us()
            grants = []
            for (execution_id,) in writer.execute(_SELECT_ORPHANS, (now, limit)).fetchall():
                (token,) = writer.execute(
                    _GRANT_LEASE, (owner, now + ttl_us, execution_id)
                ).fetchone()
                grants.append(LeaseGrant(execution_id, owner, token, now + ttl_us))
            return grants

        return self._write_op(operation, "claiming orphans")

    def owned_execution_ids(self, owner: str) -> list[str]:
        def operation(reader: sqlite3.Connection) -> list[str]:
            return [execution_id for (execution_id,) in reader.execute(_SELECT_OWNED, (owner,))]

        return self._read(operation)

    def lease_log(self, execution_id: str) -> list[tuple[int, str | None, int | None]]:
        def operation(reader: sqlite3.Connection) -> list[tuple[int, str | None, int | None]]:
            return reader.execute(_SELECT_LEASE_LOG, (execution_id,)).fetchall()

        return self._read(operation)

    def close(self) -> None:
        """Close every connection, after checkpointing the WAL into the file. Idempotent.

        The checkpoint does not wait: if another connection (another process) is
        reading or writing, it is skipped, and that connection checkpoints later.
        Committed writes are durable in the WAL either way.
        """
        with self._pool_lock:
            if self._closed:
                return
            self._closed = True
            idle_readers, self._idle_readers = self._idle_readers, []
        for reader in idle_readers:
            reader.close()
        # Waits for a write in flight; later writes see ``_closed``.
        with self._write_lock:
            # In a forked child the writer's state is the parent's at the fork (a
            # write may have been in flight): leave it alone.
            if self._native is not None and os.getpid() == self._pid:
                self._native.close()
            if os.getpid() == self._pid:
                try:
                    self._writer.execute("PRAGMA busy_timeout=0")
                    self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                except sqlite3.Error:
                    pass
            self._writer.close()
