"""The PostgreSQL store (``postgresql://``): the store contract on psycopg 3 and a pool.

``write`` is one SQL statement in one round trip, in autocommit mode: a data-modifying
CTE that checks every execution's version, advances the rows that pass and inserts
their deltas and snapshots, so a sync update costs about one autocommit INSERT. A
batch's statement depends only on which parts it needs (updates, creations,
snapshots), never on its size: rows travel as arrays that ``unnest`` turns back into
rows, so each shape is parsed and planned once per connection (psycopg prepares it);
a batch of one item (the sync path) binds scalars instead. The write-behind's batches
are written by ``_core.PgWriter`` (the same statements, through libpq on a connection
psycopg opened, without the GIL) where it can reach psycopg's libpq. ``docs/storage.md``
gives the schema, the statements and the measurements behind them.

This module must never build SQL from values: identifiers go through
``psycopg.sql.Identifier``, values are always bound parameters. It must never let a
driver exception escape: a failure is a ``StoreUnavailableError`` naming the store by
its display URL (no password), raised only when nothing of the call was written.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import select
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Final, LiteralString, NamedTuple

import psycopg
from psycopg import postgres, pq, sql
from psycopg.abc import Buffer
from psycopg.adapt import Dumper
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow
from psycopg.types.numeric import Int8
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from wfstate import _core
from wfstate._core import EventCursor, RecordBatch, SnapshotTracker, VersionRecord
from wfstate._lease import from_micros, now_us
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
    GroupedByManager,
    LeaseGrant,
    LoadedExecution,
    PendingWrite,
    WriteItem,
    conflict_with,
)

__all__ = ["COPY_THRESHOLD", "NATIVE_WRITER_ENV", "PostgresStore"]

_Connection = psycopg.Connection[TupleRow]

#: Key of the transaction-level advisory lock that serialises migrations across processes.
#: A constant (ASCII "wfstate" + 1) so that every wfstate version takes the same lock.
MIGRATION_LOCK_ID = 0x7766_7374_6174_6501

#: How long opening waits for another process's migration (or a lock its DDL needs).
MIGRATION_LOCK_TIMEOUT_S = 60

#: From this many versions on, a write-behind batch sends its deltas by COPY.
COPY_THRESHOLD = 2_000

#: Set to "0" to write the write-behind's batches through psycopg instead of the
#: native writer.
NATIVE_WRITER_ENV: Final = "WFSTATE_PG_NATIVE_WRITER"

#: After the native writer failed to connect, how long its steps stay off (seconds),
#: doubling at each failed connect up to the maximum.
_PUMP_FIRST_BACKOFF: Final = 1.0
_PUMP_MAX_BACKOFF: Final = 30.0

#: Every table the store owns, for ``storage_bytes``.
_TABLES = (
    "wfstate_schema_migrations",
    "wfstate_executions",
    "wfstate_deltas",
    "wfstate_snapshots",
)

#: libpq keepalive settings used unless the URL sets its own: a write to a server
#: that vanished from the network fails in about half a minute instead of hanging for
#: the kernel's TCP retransmission timeout (15 minutes on Linux).
_KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
}


def _migrations(schema: str) -> list[tuple[int, list[sql.Composed]]]:
    """The schema's history: (version, statements). Append only; never edit a step."""
    names = {
        "executions": sql.Identifier(schema, "wfstate_executions"),
        "deltas": sql.Identifier(schema, "wfstate_deltas"),
        "snapshots": sql.Identifier(schema, "wfstate_snapshots"),
    }

    def statement(text: LiteralString) -> sql.Composed:
        return sql.SQL(text).format(**names)

    # Ids are compared byte-wise (COLLATE "C"): list order is then Python's str
    # order, whatever the database's default collation, and b-tree comparisons are
    # memcmp instead of locale-aware strcoll. Fixed-width columns come first: no
    # alignment padding after a variable-length one (8 bytes a delta row, measured).
    version_1 = [
        statement(
            """
            CREATE TABLE {executions} (
                version bigint NOT NULL,
                created_at timestamptz NOT NULL,
                updated_at timestamptz NOT NULL,
                snapshot_version bigint NOT NULL DEFAULT 0,
                forked_from_version bigint,
                execution_id text COLLATE "C" PRIMARY KEY,
                workflow_id text COLLATE "C" NOT NULL,
                status text COLLATE "C" NOT NULL,
                forked_from_id text COLLATE "C"
            ) WITH (fillfactor = 70)
            """
        ),
        # Recovery (status IN running, suspended) and stuck-execution queries (running,
        # then filtered on updated_at). Not (status, updated_at): every write changes
        # updated_at, and an indexed column that changes rules out HOT updates, which
        # (with the fillfactor's free space) keep the row's indexes untouched on the
        # common write that leaves the status as it was.
        statement("CREATE INDEX wfstate_executions_status ON {executions} (status)"),
        # A workflow's executions over time.
        statement(
            "CREATE INDEX wfstate_executions_workflow_created_at"
            " ON {executions} (workflow_id, created_at)"
        ),
        # Listing oldest first and time-range pages, with the id as the tie-breaker.
        statement(
            "CREATE INDEX wfstate_executions_created_at ON {executions} (created_at, execution_id)"
        ),
        statement(
            """
            CREATE TABLE {deltas} (
                version bigint NOT NULL,
                recorded_at timestamptz NOT NULL,
                event_mask integer NOT NULL,
                execution_id text COLLATE "C" NOT NULL,
                actor text,
                node_ids text[] NOT NULL,
                data bytea NOT NULL,
                PRIMARY KEY (execution_id, version)
            )
            """
        ),
        # Deltas arrive in time order: a BRIN index serves time ranges across all
        # executions at a few pages per GB, and costs inserts next to nothing.
        statement("CREATE INDEX wfstate_deltas_recorded_at ON {deltas} USING brin (recorded_at)"),
        statement(
            """
            CREATE TABLE {snapshots} (
                version bigint NOT NULL,
                execution_id text COLLATE "C" NOT NULL,
                data bytea NOT NULL,
                PRIMARY KEY (execution_id, version)
            )
            """
        ),
    ]
    # Leases and fencing. The lease lives on the execution's row: the fencing check
    # then reads the row the version check locks anyway, in the same statement. Each
    # delta records the lease it was written under (NULLs, free, when none). Neither
    # new index covers a column an ordinary write changes, so those stay HOT updates.
    version_2 = [
        statement(
            """
            ALTER TABLE {executions}
                ADD COLUMN lease_token bigint NOT NULL DEFAULT 0,
                ADD COLUMN lease_expires_at timestamptz,
                ADD COLUMN lease_owner text COLLATE "C"
            """
        ),
        statement(
            """
            ALTER TABLE {deltas}
                ADD COLUMN lease_token bigint,
                ADD COLUMN lease_owner text COLLATE "C"
            """
        ),
        # Startup recovery by owner.
        statement(
            "CREATE INDEX wfstate_executions_lease_owner ON {executions} (lease_owner)"
            " WHERE lease_owner IS NOT NULL"
        ),
        # Orphans: running executions that have had a lease, oldest expiry first.
        statement(
            "CREATE INDEX wfstate_executions_orphans ON {executions} (lease_expires_at)"
            " WHERE status = 'running' AND lease_token > 0"
        ),
    ]
    return [(1, version_1), (2, version_2)]


def _storable(text: str) -> bool:
    """PostgreSQL text cannot hold NUL (the core refuses it in ids, actors and node ids;
    a record that slips through costs its own chain, not the whole batch)."""
    return "\x00" not in text


def _findable(text: str) -> bool:
    """Whether a read's argument can name anything stored (else the read finds nothing).

    Besides NUL, a str may hold lone surrogates, which have no UTF-8 form: the core
    never writes them, and binding one would raise UnicodeEncodeError.
    """
    if "\x00" in text:
        return False
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


class _TextArray(list[Any]):
    """A list of str (or None) bound as ``text[]``."""


_ARRAY_HEADER = struct.Struct("!iiiii")  # dimensions, has NULLs, element type, length, base
_EMPTY_ARRAY_HEADER = struct.Struct("!iii")  # dimensions (0), has NULLs, element type
_ELEMENT_LENGTH = struct.Struct("!i")
_NULL_ELEMENT = _ELEMENT_LENGTH.pack(-1)


class _TextArrayDumper(Dumper):
    """A ``_TextArray`` in PostgreSQL's binary array format, written in one pass.

    psycopg's generic list dumper inspects every list to choose the element type, at
    7-20 µs per parameter even for one element. (The write statements' arrays come
    encoded from Rust: ``_core.pg_write_parameters``, ``RecordBatch.pg_parameters``.)
    """

    format = pq.Format.BINARY
    oid = postgres.types["text"].array_oid
    element_oid = postgres.types["text"].oid

    def dump(self, obj: list[Any]) -> Buffer | None:
        if not obj:
            return _EMPTY_ARRAY_HEADER.pack(0, 0, self.element_oid)
        has_null = None in obj
        header = _ARRAY_HEADER.pack(1, has_null, self.element_oid, len(obj), 1)
        pack = _ELEMENT_LENGTH.pack
        parts: list[bytes] = [header]
        for value in obj:
            if value is None:
                parts.append(_NULL_ELEMENT)
            else:
                data = value.encode()  # the pool's connections use client_encoding UTF8
                parts.append(pack(len(data)))
                parts.append(data)
        return b"".join(parts)


class _EncodedTextArray(bytes):
    """A ``text[]`` parameter already in PostgreSQL's binary format (from Rust)."""


class _EncodedBigintArray(bytes):
    """A ``bigint[]`` parameter already in PostgreSQL's binary format (from Rust)."""


class _EncodedByteaArray(bytes):
    """A ``bytea[]`` parameter already in PostgreSQL's binary format (from Rust)."""


class _EncodedDumper(Dumper):
    format = pq.Format.BINARY

    def dump(self, obj: bytes) -> Buffer | None:
        return obj


class _EncodedTextDumper(_EncodedDumper):
    oid = postgres.types["text"].array_oid


class _EncodedBigintDumper(_EncodedDumper):
    oid = postgres.types["int8"].array_oid


class _EncodedByteaDumper(_EncodedDumper):
    oid = postgres.types["bytea"].array_oid


#: The batch statement's text and bytea arrays (the others are bigint).
_TEXT_ARRAYS = frozenset(
    {
        "u_id", "u_status", "u_lease_owner", "c_id", "c_workflow", "c_status",
        "c_forked_id", "d_id", "d_actor", "d_nodes", "d_lease_owner", "s_id",
    }
)  # fmt: skip
_BYTEA_ARRAYS = frozenset({"d_data", "s_data"})


def _encoded(name: str, value: bytes) -> bytes:
    """A Rust-encoded array parameter, typed for its dumper."""
    if name in _TEXT_ARRAYS:
        return _EncodedTextArray(value)
    if name in _BYTEA_ARRAYS:
        return _EncodedByteaArray(value)
    return _EncodedBigintArray(value)


def _configure(conn: _Connection) -> None:
    """Set up a pooled connection's adapters.

    The write statement's arrays are bound with fixed types: its parameter types are
    then the same for every call, so psycopg prepares it once per connection instead of
    once per combination of int2/int4/int8 (or all-None) arrays.
    """
    conn.adapters.register_dumper(_TextArray, _TextArrayDumper)
    conn.adapters.register_dumper(_EncodedTextArray, _EncodedTextDumper)
    conn.adapters.register_dumper(_EncodedBigintArray, _EncodedBigintDumper)
    conn.adapters.register_dumper(_EncodedByteaArray, _EncodedByteaDumper)


def _bigint(value: int | None) -> Int8 | None:
    """A scalar bound as bigint whatever its size: one prepared statement, not three."""
    return None if value is None else Int8(value)


def _check_idle(conn: _Connection) -> None:
    """The pool's check before it hands out a connection: free unless it is suspect.

    An idle autocommit connection receives nothing unprompted, except the FATAL that a
    server sends before it closes the connection (restart, pg_terminate_backend,
    idle_session_timeout). So: poll the socket without waiting (a syscall, no round
    trip); only when it is readable, ask the server (one round trip), which raises
    for a dead connection and makes the pool replace it. A write after a restart then
    gets a fresh connection instead of failing on a dead one.
    """
    fileno = conn.fileno()
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fileno, select.POLLIN)
        readable = bool(poller.poll(0))
    else:  # pragma: no cover - Windows
        readable = bool(select.select([fileno], [], [], 0)[0])
    if readable:
        ConnectionPool.check_connection(conn)


def _unless_dead(conn: _Connection | None) -> _Connection | None:
    """``conn``, or None (closed) when ``_check_idle`` finds it dead."""
    if conn is not None:
        try:
            _check_idle(conn)
        except psycopg.Error:
            conn.close()
            return None
    return conn


def _reason(error: BaseException) -> str:
    """A driver error's first line (libpq messages never carry the password)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


#: The parameters of the one-version write statement: type OID, and whether each
#: travels in binary (bytea) or text format (by name; ``_numbered`` gives their order).
_FAST_PARAMETERS: dict[str, tuple[int, int]] = {
    "id": (25, 0),
    "base": (20, 0),
    "version": (20, 0),
    "status": (25, 0),
    "updated": (20, 0),
    "actor": (25, 0),
    "mask": (20, 0),
    "nodes": (1009, 0),
    "data": (17, 1),
    "lease_owner": (25, 0),
    "lease_token": (20, 0),
    "snapshot": (17, 1),
    "workflow": (25, 0),
    "created": (20, 0),
    "forked_id": (25, 0),
    "forked_version": (20, 0),
}
_INT8 = struct.Struct("!q")


def _connection_lost(pgconn: pq.abc.PGconn) -> str:
    return pgconn.error_message.decode(errors="replace").strip() or "the connection was lost"


def _fast_rows(result: pq.abc.PGresult) -> list[tuple[Any, ...]]:
    """The write statement's rows from a binary-format result: (id, version, lease
    owner, lease token, recorded_us, actor, data)."""
    rows = []
    for row in range(result.ntuples):
        values = [result.get_value(row, column) for column in range(7)]
        rows.append(
            (
                bytes(values[0]).decode() if values[0] is not None else None,
                None if values[1] is None else _INT8.unpack(values[1])[0],
                None if values[2] is None else bytes(values[2]).decode(),
                None if values[3] is None else _INT8.unpack(values[3])[0],
                None if values[4] is None else _INT8.unpack(values[4])[0],
                None if values[5] is None else bytes(values[5]).decode(),
                None if values[6] is None else bytes(values[6]),
            )
        )
    return rows


#: A named parameter in a composed statement's text.
_PLACEHOLDER = re.compile(r"%\((\w+)\)s")


def _numbered(text: str) -> tuple[str, list[str]]:
    """A composed statement's text with its ``%(name)s`` placeholders as libpq's
    ``$n`` (numbered in order of first appearance), and the names in ``$n`` order:
    for the statements this store prepares or sends through libpq itself."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match[1] not in names:
            names.append(match[1])
        return f"${names.index(match[1]) + 1}"

    return _PLACEHOLDER.sub(number, text), names


def _array_oid(name: str) -> int:
    """The type of the batch statement's array parameter ``name`` (as ``_encoded``)."""
    if name in _TEXT_ARRAYS:
        return postgres.types["text"].array_oid
    if name in _BYTEA_ARRAYS:
        return postgres.types["bytea"].array_oid
    return postgres.types["int8"].array_oid


def _libpq_module() -> str | None:
    """The file through which psycopg calls libpq (its wrapper extension, or the
    library its ctypes wrapper loaded): the native writer resolves libpq from it, so
    that it calls the copy psycopg's connections belong to. None if unknown."""
    try:
        if pq.__impl__ in ("binary", "c"):
            name = "psycopg_binary.pq" if pq.__impl__ == "binary" else "psycopg_c.pq"
            return getattr(importlib.import_module(name), "__file__", None)
        from psycopg.pq import _pq_ctypes

        library: str | None = getattr(getattr(_pq_ctypes, "pq", None), "_name", None)
        return library
    except (ImportError, AttributeError):  # pragma: no cover - another psycopg layout
        return None


class _WriteShape(NamedTuple):
    """What a write statement must do; one statement is composed per shape."""

    #: One item: scalar parameters (the sync path). Otherwise arrays.
    single: bool
    updates: bool
    creations: bool
    snapshots: bool
    #: The deltas follow by COPY in the same transaction (write-behind batches).
    copied_deltas: bool = False


class _Batch:
    """A batch of ``WriteItem`` as the parameters of its write statement.

    One item (the sync path) binds scalars. Otherwise per execution the items form a
    chain; the chain becomes one row of ``upd`` (first base, last version/status/time,
    newest snapshot of the chain, else NULL: keep) or of ``cre`` (a creation: the
    first record's row, advanced to the chain's last version), and each item one
    delta row (and one snapshot row with a snapshot), bound as arrays named
    ``<part>_<column>``.
    """

    __slots__ = ("chains", "parameters", "refused", "shape")

    def __init__(self, items: Sequence[WriteItem]) -> None:
        self.chains: dict[str, list[int]] = {}
        for position, item in enumerate(items):
            self.chains.setdefault(item.record.execution_id, []).append(position)
        #: Chains refused before the database sees them (text PostgreSQL cannot hold).
        self.refused: dict[str, WfstateError] = {}
        for execution_id, positions in self.chains.items():
            if not all(_storable_record(items[position].record) for position in positions):
                self.refused[execution_id] = ValidationError(
                    f"execution {execution_id!r}: PostgreSQL text cannot hold NUL "
                    "characters (in an id, actor or node id)"
                )
        #: None when there is nothing to send.
        self.shape: _WriteShape | None = None
        self.parameters: dict[str, Any] = {}
        if len(items) == 1:
            if not self.refused:
                self._one(items[0])
        else:
            self._many(items)

    def _one(self, item: WriteItem) -> None:
        """The one-version write's parameters, already in libpq's formats (text, and
        bytea as binary) for ``PostgresStore._execute_one``; None is NULL (made by
        the core: ``VersionRecord.pg_parameters``)."""
        record = item.record
        creation = record.base_version == 0
        self.shape = _WriteShape(True, not creation, creation, item.snapshot is not None)
        self.parameters = record.pg_parameters(item.snapshot, item.lease)

    def _many(self, items: Sequence[WriteItem]) -> None:
        """The arrays, encoded in Rust (``_core.pg_write_parameters``, the encoder of
        the write-behind batches too); refused chains are left out."""
        kept = [
            (item.record, item.snapshot, item.lease)
            for execution_id, positions in self.chains.items()
            if execution_id not in self.refused
            for item in (items[position] for position in positions)
        ]
        encoded, updates, creations, snapshots = _core.pg_write_parameters(kept)
        if not (updates or creations):
            return
        self.shape = _WriteShape(False, updates, creations, snapshots)
        self.parameters = {name: _encoded(name, value) for name, value in encoded.items()}


#: What the refusal check needs of a chain's first item: its base version and lease.
_ChainHead = tuple[int, tuple[str, int] | None]


def _refusal(
    execution_id: str, head: _ChainHead, found: tuple[int, str | None, int] | None
) -> WfstateError:
    """Why the store refused an update chain whose row it found as ``found``
    (version, lease owner, lease token): a lost lease first, else the version."""
    base, lease = head
    if lease is not None:
        owner, token = lease
        if found is None or found[1] != owner or found[2] != token:
            current = None if found is None or found[1] is None else found[2]
            return LeaseLostError(execution_id, token, current)
    return ConflictError(execution_id, base, 0 if found is None else found[0])


def _storable_record(record: VersionRecord) -> bool:
    forked_from = record.forked_from
    texts = (
        record.execution_id,
        record.workflow_id,
        record.status,
        record.actor or "",
        "" if forked_from is None else forked_from[0],
        *record.node_ids,
    )
    return _storable("".join(texts))


class PostgresStore(GroupedByManager):
    """Rows, deltas and snapshots in PostgreSQL, through a psycopg connection pool.

    ``conninfo`` is a libpq URL or key/value string; ``display`` the same without the
    password (it names the store in errors). ``connect_timeout`` bounds opening and
    every wait for a connection (libpq counts whole seconds, at least 2). ``schema``
    holds the tables (created if missing). ``native_writer`` chooses how the
    write-behind writes its batches: in Rust through the libpq psycopg uses, without
    the GIL (``write_pending``), or through psycopg; None (default) takes the native
    one unless ``$WFSTATE_PG_NATIVE_WRITER`` is ``0``. It is used only where that
    libpq can be reached (``native_writer`` tells).
    """

    def __init__(
        self,
        conninfo: str,
        *,
        display: str,
        connect_timeout: float = 5.0,
        pool_size: int = 8,
        schema: str = "public",
        native_writer: bool | None = None,
    ) -> None:
        if not (isinstance(connect_timeout, int | float) and 0 < connect_timeout < math.inf):
            raise ValidationError(
                f"connect_timeout must be a positive number of seconds, not {connect_timeout!r}"
            )
        if not (isinstance(pool_size, int) and pool_size >= 1):
            raise ValidationError(f"pool_size must be an int >= 1, not {pool_size!r}")
        if not (isinstance(schema, str) and schema and _findable(schema)):
            raise ValidationError(f"schema must be a non-empty str, not {schema!r}")
        self.url = display
        self._pid = os.getpid()
        self._schema = schema
        self._timeout = connect_timeout
        self._lock = threading.Lock()
        self._closed = False
        self._statements: dict[object, bytes] = {}
        self._identifiers = {
            "executions": sql.Identifier(schema, "wfstate_executions"),
            "deltas": sql.Identifier(schema, "wfstate_deltas"),
            "snapshots": sql.Identifier(schema, "wfstate_snapshots"),
            "migrations": sql.Identifier(schema, "wfstate_schema_migrations"),
        }
        try:
            given = conninfo_to_dict(conninfo)
        except psycopg.Error as e:
            raise StoreUnavailableError(
                f"invalid PostgreSQL connection string for {display}: {_reason(e)}",
                target=display,
            ) from e
        # libpq takes whole seconds and treats anything below 2 as 2.
        settings: dict[str, Any] = {
            "connect_timeout": max(2, math.ceil(connect_timeout)),
            # The array dumpers encode str as UTF-8 themselves.
            "client_encoding": "utf8",
            **{key: value for key, value in _KEEPALIVES.items() if key not in given},
        }
        # Migrate on a connection of our own first: its error says what is wrong (no
        # such database, role, host...), where the pool would only report a timeout.
        if native_writer is None:
            native_writer = os.environ.get(NATIVE_WRITER_ENV, "1") != "0"
        try:
            with psycopg.connect(conninfo, **settings) as conn:
                self._migrate(conn)
                self._native = self._open_native(conn) if native_writer else None
        except psycopg.Error as e:
            raise StoreUnavailableError(
                f"cannot open the PostgreSQL store at {display}: {_reason(e)}", target=display
            ) from e
        self._conninfo = conninfo
        self._settings = settings
        self._writer: _Connection | None = None
        self._writer_lock = threading.Lock()
        #: The native writer's connection (``write_pending``), the flusher's alone.
        self._pump: _Connection | None = None
        self._pump_lock = threading.Lock()
        #: After a failed connect for it: no native step before this ``monotonic()``
        #: time, and the wait before the next try (doubling up to 30 s).
        self._pump_retry_at = 0.0
        self._pump_backoff = _PUMP_FIRST_BACKOFF
        #: Statements prepared on the writer connection by ``_execute_one``: name ->
        #: the parameters in ``$n`` order.
        self._fast_prepared: dict[bytes, list[tuple[str, int, int]]] = {}
        self._pool: ConnectionPool[_Connection] = ConnectionPool(
            conninfo,
            kwargs={"autocommit": True, **settings},
            min_size=1,
            max_size=pool_size,
            open=False,
            configure=_configure,
            check=_check_idle,
            timeout=connect_timeout,
            name=f"wfstate {display}",
        )
        try:
            self._pool.open(wait=True, timeout=connect_timeout)
        except PoolTimeout as e:
            self._pool.close()
            raise StoreUnavailableError(
                f"cannot open the PostgreSQL store at {display}: no connection within "
                f"{connect_timeout:g} s",
                target=display,
            ) from e

    def __repr__(self) -> str:
        return f"PostgresStore({self.url!r})"

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------------

    def _migrate(self, conn: _Connection) -> None:
        """Apply the missing migrations in one transaction, one process at a time."""
        migrations = self._identifiers["migrations"]
        with conn.transaction():
            # Another process may be migrating: wait for it, but not forever.
            conn.execute(
                sql.SQL("SET LOCAL lock_timeout = {}").format(
                    sql.Literal(f"{MIGRATION_LOCK_TIMEOUT_S}s")
                )
            )
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_ID,))
            conn.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self._schema))
            )
            conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {} (version int PRIMARY KEY,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                ).format(migrations)
            )
            row = conn.execute(
                sql.SQL("SELECT coalesce(max(version), 0) FROM {}").format(migrations)
            ).fetchone()
            applied = 0 if row is None else int(row[0])
            migrations_known = _migrations(self._schema)
            if applied > migrations_known[-1][0]:
                # As the SQLite store does: a schema we do not know may mean things we
                # do not know (a column the newer code relies on us to fill).
                raise StoreUnavailableError(
                    f"the PostgreSQL store at {self.url} has schema version {applied}, newer "
                    f"than this wfstate knows ({migrations_known[-1][0]}); upgrade wfstate",
                    target=self.url,
                )
            for version, statements in migrations_known:
                if version <= applied:
                    continue
                for statement in statements:
                    conn.execute(statement)
                conn.execute(
                    sql.SQL("INSERT INTO {} (version) VALUES (%s)").format(migrations), (version,)
                )

    def _open_native(self, conn: _Connection) -> _core.PgWriter | None:
        """The native write-behind writer (see ``write_pending``) with every batch
        statement shape composed on ``conn``, or None where it cannot reach the libpq
        psycopg uses."""
        module = _libpq_module()
        if module is None:
            return None
        statements: dict[int, tuple[str, list[tuple[str, int]]]] = {}
        for key in range(16):
            updates, creations, snapshots, copied = (bool(key & bit) for bit in (1, 2, 4, 8))
            if not (updates or creations):
                continue
            shape = _WriteShape(False, updates, creations, snapshots, copied_deltas=copied)
            text, names = _numbered(self._write_statement(shape).as_string(conn))
            statements[key] = (text, [(name, _array_oid(name)) for name in names])
        try:
            return _core.PgWriter(
                module,
                pq.version(),
                statements,
                self._copy_statement().as_string(conn),
                COPY_THRESHOLD,
            )
        except ValueError:  # not the libpq psycopg calls, or not reachable
            return None

    @property
    def native_writer(self) -> bool:
        """Whether the write-behind's batches are written in Rust through libpq
        (``_core.PgWriter``; see ``write_pending``)."""
        return self._native is not None

    def _statement(
        self, key: object, conn: _Connection, build: Callable[[], sql.Composable]
    ) -> bytes:
        """The bytes of a statement, composed once per key (psycopg prepares by text)."""
        statement = self._statements.get(key)
        if statement is None:
            statement = build().as_bytes(conn)
            self._statements[key] = statement
        return statement

    def _sql(self, text: LiteralString, **parts: sql.Composable) -> sql.Composed:
        """SQL text with the store's tables filled in: {executions}, {deltas}, ..."""
        return sql.SQL(text).format(**self._identifiers, **parts)

    def _check_usable(self) -> None:
        if self._closed:
            raise ClosedError(f"the store at {self.url} is closed")
        if os.getpid() != self._pid:
            # A forked child shares the parent's sockets: using them would interleave
            # two processes' messages on one connection.
            raise StoreUnavailableError(
                f"the store at {self.url} was opened in process {self._pid}; connections "
                "cannot cross fork(): open the store in this process",
                target=self.url,
            )

    @contextmanager
    def _writer_connection(self) -> Iterator[_Connection]:
        """The store's own connection for writes, outside the pool.

        Writes are serialised anyway (the sync path has one group-commit leader at a
        time, async mode one flusher), and a pool checkout costs about 50 µs a write.
        A dead connection is noticed before use (as the pool's check does) or by the
        failing write, and replaced on the next write.
        """
        self._check_usable()
        with self._writer_lock:
            try:
                conn = self._writer = _unless_dead(self._writer)
                if conn is None:
                    conn = psycopg.connect(self._conninfo, autocommit=True, **self._settings)
                    _configure(conn)
                    self._writer = conn
                    self._fast_prepared = {}
                yield conn
            except psycopg.Error as e:
                if self._writer is not None:
                    self._writer.close()
                    self._writer = None
                raise StoreUnavailableError(
                    f"writing failed at {self.url}: {_reason(e)}", target=self.url
                ) from e

    @contextmanager
    def _connection(self, action: str) -> Iterator[_Connection]:
        """A pooled connection; any driver or pool failure becomes StoreUnavailableError."""
        self._check_usable()
        try:
            with self._pool.connection() as conn:
                yield conn
        except PoolClosed as e:
            raise ClosedError(f"the store at {self.url} is closed") from e
        except PoolTimeout as e:
            raise StoreUnavailableError(
                f"{action} failed: no connection to {self.url} within {self._timeout:g} s",
                target=self.url,
            ) from e
        except psycopg.Error as e:
            raise StoreUnavailableError(
                f"{action} failed at {self.url}: {_reason(e)}", target=self.url
            ) from e

    # -- the Store protocol ---------------------------------------------------------------

    def schema_version(self) -> int:
        with self._connection("reading the schema version") as conn:
            row = conn.execute(
                self._sql("SELECT coalesce(max(version), 0) FROM {migrations}")
            ).fetchone()
        return 0 if row is None else int(row[0])

    def write(self, items: Sequence[WriteItem]) -> list[WfstateError | None]:
        outcomes: list[WfstateError | None] = [None] * len(items)
        if not items:
            self._check_usable()
            return outcomes
        batch = _Batch(items)
        refusals: dict[str, WfstateError] = dict(batch.refused)
        shape = batch.shape
        if shape is not None:
            newer: list[tuple[int, int, str | None, bytes]] = []
            snapshot_version = 0
            sent = False
            try:
                with self._writer_connection() as conn:
                    statement = self._statement(shape, conn, lambda: self._write_statement(shape))
                    sent = True
                    if shape.single:
                        rows = self._execute_one(conn, shape, batch.parameters)
                        # Rows with a delta are the newer deltas; the others the outcome
                        # (a refused update's row carries the stored snapshot version).
                        newer = sorted(
                            (row[1], row[4], row[5], row[6]) for row in rows if row[6] is not None
                        )
                        snapshot_version = max(
                            (row[4] or 0 for row in rows if row[6] is None), default=0
                        )
                        rows = [row[:4] for row in rows if row[6] is None]
                    else:
                        rows = conn.execute(statement, batch.parameters).fetchall()
                    heads: dict[str, _ChainHead] = {
                        execution_id: (
                            items[positions[0]].record.base_version,
                            items[positions[0]].lease,
                        )
                        for execution_id, positions in batch.chains.items()
                        if execution_id not in batch.refused
                    }
                    refusals.update(self._refusals(conn, heads, rows))
                    if not shape.single:
                        refusals.update(self._with_newer_deltas(conn, refusals))
            except StoreUnavailableError:
                # The connection failed after the statement was sent: the server may
                # have committed it and lost only the reply. Ask it, on a connection
                # of its own; a write found stored, byte for byte, is reported as
                # written (so memory follows the store), anything else as the failure.
                if not (sent and shape.single and not refusals and self._landed(items[0])):
                    raise
            if newer:
                for execution_id, refusal in refusals.items():
                    if type(refusal) is ConflictError:
                        refusals[execution_id] = conflict_with(
                            execution_id, refusal.expected, refusal.actual, newer, snapshot_version
                        )
        for execution_id, error in refusals.items():
            for position in batch.chains[execution_id]:
                outcomes[position] = error
        return outcomes

    def _landed(self, item: WriteItem) -> bool:
        """Whether ``item``'s version is stored exactly as this write would have
        stored it (same delta, actor and time). False when that cannot be known."""
        record = item.record
        try:
            with psycopg.connect(self._conninfo, autocommit=True, **self._settings) as conn:
                row = conn.execute(
                    self._sql(
                        "SELECT data, actor, (extract(epoch FROM recorded_at) * 1000000)::bigint"
                        " FROM {deltas} WHERE execution_id = %s AND version = %s"
                    ),
                    (record.execution_id, Int8(record.version)),
                ).fetchone()
        except psycopg.Error:
            return False
        return row is not None and (bytes(row[0]), row[1], row[2]) == (
            record.delta,
            record.actor,
            record.updated_at_us,
        )

    def _execute_one(
        self, conn: _Connection, shape: _WriteShape, parameters: dict[str, Any]
    ) -> list[tuple[Any, ...]]:
        """Run the one-version write through libpq directly (the sync path's hot spot).

        psycopg's cursor machinery costs about 35 µs of CPU per call on top of libpq's
        (measured; docs/storage.md); a sync update spends it on every write. The
        statement is prepared once per writer connection under a name of our own, its
        parameters come encoded by ``_Batch._one`` (text, bytea in binary) and its
        result is read in binary.
        Errors become the psycopg exceptions the caller already handles.
        """
        pgconn = conn.pgconn
        name = b"wfstate_write_%d%d" % (shape.creations, shape.snapshots)
        if name not in self._fast_prepared:
            text, names = _numbered(
                self._statement(shape, conn, lambda: self._write_statement(shape)).decode()
            )
            used = [(parameter, *_FAST_PARAMETERS[parameter]) for parameter in names]
            try:
                prepared = pgconn.prepare(name, text.encode(), [oid for _, oid, _ in used])
            except MemoryError as e:  # libpq returned no result: the connection is gone
                raise psycopg.OperationalError(_connection_lost(pgconn)) from e
            if prepared.status != pq.ExecStatus.COMMAND_OK:
                raise psycopg.errors.error_from_result(prepared)
            self._fast_prepared[name] = used
        used = self._fast_prepared[name]
        values: Any = [parameters.get(p) for p, _, _ in used]
        try:
            result = pgconn.exec_prepared(
                name,
                values,  # None is SQL NULL for libpq (psycopg's stub leaves it out)
                [binary for _, _, binary in used],
                1,
            )
        except MemoryError as e:  # libpq returned no result: the connection is gone
            raise psycopg.OperationalError(_connection_lost(pgconn)) from e
        if result.status != pq.ExecStatus.TUPLES_OK:
            if pgconn.status != pq.ConnStatus.OK:
                raise psycopg.OperationalError(_connection_lost(pgconn))
            raise psycopg.errors.error_from_result(result)
        return _fast_rows(result)

    def _write_statement(self, shape: _WriteShape) -> sql.Composed:
        if shape.single:
            return self._write_one_statement(shape.creations, shape.snapshots)
        return self._write_many_statement(
            shape.updates, shape.creations, shape.snapshots, with_deltas=not shape.copied_deltas
        )

    def _write_one_statement(self, creation: bool, snapshot: bool) -> sql.Composed:
        """The statement that writes one version (the sync path), with scalar parameters.

        The same steps as the batch statement below, without arrays: binding ~20 arrays
        and planning their unnest cost about 150 µs more per call than these scalars
        (measured; see docs/storage.md). The last part, which reports the stored
        version on a conflict, runs only when the UPDATE matched no row.
        """
        if creation:
            passed = self._sql(
                """passed AS (
                INSERT INTO {executions} (execution_id, workflow_id, status, version,
                    created_at, updated_at, snapshot_version, forked_from_id,
                    forked_from_version)
                VALUES (%(id)s, %(workflow)s, %(status)s, %(version)s,
                    timestamptz 'epoch' + %(created)s * interval '1 microsecond',
                    timestamptz 'epoch' + %(updated)s * interval '1 microsecond',
                    {snapshot_version}, %(forked_id)s, %(forked_version)s)
                ON CONFLICT (execution_id) DO NOTHING
                RETURNING execution_id
            )""",
                snapshot_version=sql.SQL("%(version)s" if snapshot else "0"),
            )
            result: sql.Composable = sql.SQL(
                "SELECT execution_id, NULL::bigint, NULL::text, NULL::bigint,"
                " NULL::bigint, NULL::text, NULL::bytea FROM passed"
            )
        else:
            passed = self._sql(
                """passed AS (
                UPDATE {executions} AS e
                SET version = %(version)s,
                    status = %(status)s,
                    updated_at = timestamptz 'epoch' + %(updated)s * interval '1 microsecond',
                    snapshot_version = {snapshot_version}
                WHERE e.execution_id = %(id)s AND e.version = %(base)s
                  AND (%(lease_token)s::bigint IS NULL
                       OR (e.lease_token = %(lease_token)s AND e.lease_owner = %(lease_owner)s))
                RETURNING e.execution_id
            )""",
                snapshot_version=sql.SQL("%(version)s" if snapshot else "e.snapshot_version"),
            )
            # On a refusal, also the deltas the writer missed (a few, in the same
            # snapshot as the version): it catches up without reading them again.
            result = self._sql(
                """SELECT execution_id, NULL::bigint, NULL::text, NULL::bigint,
                NULL::bigint, NULL::text, NULL::bytea FROM passed
            UNION ALL
            SELECT execution_id, version, lease_owner, lease_token, snapshot_version, NULL,
                NULL
            FROM {executions}
            WHERE execution_id = %(id)s AND NOT EXISTS (SELECT FROM passed)
            UNION ALL
            (SELECT execution_id, version, NULL, NULL,
                (extract(epoch FROM recorded_at) * 1000000)::bigint, actor, data
            FROM {deltas}
            WHERE execution_id = %(id)s AND version > %(base)s
              AND NOT EXISTS (SELECT FROM passed)
            ORDER BY version LIMIT {limit})""",
                limit=sql.Literal(NEWER_DELTAS_LIMIT),
            )
        ctes = [
            passed,
            self._sql(
                """ins AS (
                INSERT INTO {deltas} (execution_id, version, recorded_at, actor, event_mask,
                    node_ids, data, lease_owner, lease_token)
                SELECT execution_id, %(version)s,
                    timestamptz 'epoch' + %(updated)s * interval '1 microsecond',
                    %(actor)s, %(mask)s, %(nodes)s, %(data)s, %(lease_owner)s,
                    %(lease_token)s::bigint
                FROM passed
            )"""
            ),
        ]
        if snapshot:
            ctes.append(
                self._sql(
                    """snap AS (
                INSERT INTO {snapshots} (execution_id, version, data)
                SELECT execution_id, %(version)s, %(snapshot)s FROM passed
            )"""
                )
            )
        return sql.SQL("WITH {} {}").format(sql.SQL(",\n").join(ctes), result)

    def _write_many_statement(
        self, has_updates: bool, has_creations: bool, has_snapshots: bool, *, with_deltas: bool
    ) -> sql.Composed:
        """The one statement that writes a batch of this shape (see docs/storage.md).

        ``upd`` advances the rows whose version is the chain's base (under READ
        COMMITTED a concurrent writer's commit is rechecked: the loser matches no
        row), ``cre`` inserts the new rows (a concurrent creation makes ours a no-op),
        ``ok`` is what passed, and only ok's deltas and snapshots are inserted. The
        result: ``(id, NULL)`` per written execution and ``(id, version)`` per refused
        update whose row exists, as of the statement's snapshot, so a conflict needs
        no second round trip.
        """
        ctes: list[sql.Composable] = []
        passed: list[sql.Composable] = []
        if has_updates:
            # Two batches that update the same rows in different orders deadlock. So the
            # rows are locked first, in id order (LockRows above the Sort), and the
            # UPDATE joins that CTE: whatever plan it gets, it reaches a row only after
            # the CTE has locked it, and the CTE locks in order.
            ctes.append(
                self._sql(
                    """locked AS (
                SELECT e.execution_id FROM {executions} AS e
                WHERE e.execution_id = ANY(%(u_id)s::text[])
                ORDER BY e.execution_id
                FOR NO KEY UPDATE
            )"""
                )
            )
            ctes.append(
                self._sql(
                    """upd AS (
                UPDATE {executions} AS e
                SET version = u.version,
                    status = u.status,
                    updated_at = timestamptz 'epoch' + u.updated_us * interval '1 microsecond',
                    snapshot_version = coalesce(u.snapshot_version, e.snapshot_version)
                FROM unnest(%(u_id)s::text[], %(u_base)s::bigint[], %(u_version)s::bigint[],
                            %(u_status)s::text[], %(u_updated)s::bigint[],
                            %(u_snapshot)s::bigint[], %(u_lease_owner)s::text[],
                            %(u_lease_token)s::bigint[])
                    AS u(execution_id, base, version, status, updated_us, snapshot_version,
                         lease_owner, lease_token)
                    JOIN locked USING (execution_id)
                WHERE e.execution_id = u.execution_id AND e.version = u.base
                  AND (u.lease_token IS NULL
                       OR (e.lease_token = u.lease_token AND e.lease_owner = u.lease_owner))
                RETURNING e.execution_id
            )"""
                )
            )
            ctes.append(
                self._sql(
                    """stale AS (
                SELECT e.execution_id, e.version, e.lease_owner, e.lease_token
                FROM {executions} AS e
                WHERE e.execution_id = ANY(%(u_id)s::text[])
                  AND e.execution_id NOT IN (SELECT execution_id FROM upd)
            )"""
                )
            )
            passed.append(sql.SQL("SELECT execution_id FROM upd"))
        if has_creations:
            ctes.append(
                self._sql(
                    """cre AS (
                INSERT INTO {executions} (execution_id, workflow_id, status, version,
                    created_at, updated_at, snapshot_version, forked_from_id,
                    forked_from_version)
                SELECT c.execution_id, c.workflow_id, c.status, c.version,
                    timestamptz 'epoch' + c.created_us * interval '1 microsecond',
                    timestamptz 'epoch' + c.updated_us * interval '1 microsecond',
                    c.snapshot_version, c.forked_from_id, c.forked_from_version
                FROM unnest(%(c_id)s::text[], %(c_workflow)s::text[], %(c_status)s::text[],
                            %(c_version)s::bigint[], %(c_created)s::bigint[],
                            %(c_updated)s::bigint[], %(c_snapshot)s::bigint[],
                            %(c_forked_id)s::text[], %(c_forked_version)s::bigint[])
                    AS c(execution_id, workflow_id, status, version, created_us, updated_us,
                         snapshot_version, forked_from_id, forked_from_version)
                ON CONFLICT (execution_id) DO NOTHING
                RETURNING execution_id
            )"""
                )
            )
            passed.append(sql.SQL("SELECT execution_id FROM cre"))
        ctes.append(sql.SQL("ok AS ({})").format(sql.SQL(" UNION ALL ").join(passed)))
        if with_deltas:
            ctes.append(
                self._sql(
                    """ins AS (
                INSERT INTO {deltas} (execution_id, version, recorded_at, actor, event_mask,
                    node_ids, data, lease_owner, lease_token)
                SELECT d.execution_id, d.version,
                    timestamptz 'epoch' + d.recorded_us * interval '1 microsecond',
                    d.actor, d.event_mask::integer, d.node_ids::text[], d.data,
                    d.lease_owner, d.lease_token
                FROM unnest(%(d_id)s::text[], %(d_version)s::bigint[],
                            %(d_recorded)s::bigint[], %(d_actor)s::text[],
                            %(d_mask)s::bigint[], %(d_nodes)s::text[], %(d_data)s::bytea[],
                            %(d_lease_owner)s::text[], %(d_lease_token)s::bigint[])
                    AS d(execution_id, version, recorded_us, actor, event_mask, node_ids, data,
                         lease_owner, lease_token)
                WHERE d.execution_id IN (SELECT execution_id FROM ok)
            )"""
                )
            )
        if has_snapshots:
            ctes.append(
                self._sql(
                    """snap AS (
                INSERT INTO {snapshots} (execution_id, version, data)
                SELECT s.execution_id, s.version, s.data
                FROM unnest(%(s_id)s::text[], %(s_version)s::bigint[], %(s_data)s::bytea[])
                    AS s(execution_id, version, data)
                WHERE s.execution_id IN (SELECT execution_id FROM ok)
            )"""
                )
            )
        result: sql.Composable = sql.SQL(
            "SELECT execution_id, NULL::bigint, NULL::text, NULL::bigint FROM ok"
        )
        if has_updates:
            result = sql.SQL(
                "{} UNION ALL SELECT execution_id, version, lease_owner, lease_token FROM stale"
            ).format(result)
        return sql.SQL("WITH {} {}").format(sql.SQL(",\n").join(ctes), result)

    def _refusals(
        self,
        conn: _Connection,
        heads: dict[str, _ChainHead],
        rows: Sequence[tuple[Any, ...]],
        *,
        committed: bool = True,
    ) -> dict[str, WfstateError]:
        """The error of each chain (by its head) the statement refused.

        ``committed``: the statement ran in autocommit, so a failure of the follow-up
        read must not raise (the batch is stored). Inside a transaction it must: a
        swallowed error would leave the transaction aborted and turn its COMMIT into a
        silent ROLLBACK of versions reported as written.
        """
        written: set[str] = set()
        stored: dict[str, tuple[int, str | None, int]] = {}
        for execution_id, version, lease_owner, lease_token in rows:
            if version is None:
                written.add(execution_id)
            else:
                stored[execution_id] = (version, lease_owner, lease_token)
        refusals: dict[str, WfstateError] = {}
        raced: list[str] = []
        for execution_id, head in heads.items():
            if execution_id in written:
                continue
            base = head[0]
            if base == 0:
                refusals[execution_id] = AlreadyExistsError(
                    f"execution {execution_id!r} exists already"
                )
                continue
            found = stored.get(execution_id)
            refusal = _refusal(execution_id, head, found)
            if isinstance(refusal, ConflictError) and found is not None and found[0] == base:
                raced.append(execution_id)
            refusals[execution_id] = refusal
        if raced:
            # The row was at the base when the statement began and a concurrent writer
            # moved it on before our UPDATE could: read the version it moved it to. A
            # committed batch must not fail here; the conflict then reports the
            # version as of the statement.
            try:
                for execution_id, version, lease_owner, lease_token in conn.execute(
                    self._statement(
                        "versions_and_leases",
                        conn,
                        lambda: self._sql(
                            "SELECT execution_id, version, lease_owner, lease_token"
                            " FROM {executions} WHERE execution_id = ANY(%s::text[])"
                        ),
                    ),
                    (_TextArray(raced),),
                ):
                    refusals[execution_id] = _refusal(
                        execution_id, heads[execution_id], (version, lease_owner, lease_token)
                    )
            except psycopg.Error:
                if not committed:
                    raise
        return refusals

    def _with_newer_deltas(
        self, conn: _Connection, refusals: dict[str, WfstateError]
    ) -> dict[str, WfstateError]:
        """The version conflicts of a grouped write (its statement committed in
        autocommit), each with the deltas its writer missed when they are few, as the
        one-version statement returns them; one read for all. A failure of this read
        leaves the plain conflicts: the batch is stored."""
        stale = {
            execution_id: refusal
            for execution_id, refusal in refusals.items()
            if type(refusal) is ConflictError
            and 0 < refusal.expected < refusal.actual <= refusal.expected + NEWER_DELTAS_LIMIT
        }
        if not stale:
            return {}
        newer: dict[str, list[tuple[int, int, str | None, bytes]]] = {}
        snapshots: dict[str, int] = {}
        try:
            rows = conn.execute(
                self._statement(
                    "newer_deltas",
                    conn,
                    lambda: self._sql(
                        "SELECT c.id, d.version,"
                        " (extract(epoch FROM d.recorded_at) * 1000000)::bigint, d.actor,"
                        " d.data, e.snapshot_version"
                        " FROM unnest(%s::text[], %s::bigint[], %s::bigint[])"
                        " AS c(id, base, actual)"
                        " JOIN {deltas} d ON d.execution_id = c.id"
                        " AND d.version > c.base AND d.version <= c.actual"
                        " JOIN {executions} e ON e.execution_id = c.id"
                        " ORDER BY c.id, d.version"
                    ),
                ),
                (
                    _TextArray(list(stale)),
                    [refusal.expected for refusal in stale.values()],
                    [refusal.actual for refusal in stale.values()],
                ),
            ).fetchall()
        except psycopg.Error:
            return {}
        for execution_id, version, at_us, actor, data, snapshot_version in rows:
            newer.setdefault(execution_id, []).append((version, at_us, actor, bytes(data)))
            snapshots[execution_id] = snapshot_version
        return {
            execution_id: conflict_with(
                execution_id,
                refusal.expected,
                refusal.actual,
                newer.get(execution_id, []),
                snapshots.get(execution_id, 0),
            )
            for execution_id, refusal in stale.items()
        }

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
        (``PgWriter.pump``: read, decide, write as ``write_batch`` does, on through
        full batches for up to ``keep_going`` seconds) on a connection of its own;
        else None.

        Through psycopg a batch's round trips each take the GIL back, and with other
        threads applying updates the flusher then stored next to nothing until they
        stopped. A batch the statement refuses any chain of is rolled back and
        returned unwritten: the flusher writes it with ``write_batch``, which reports
        each refusal. None too when no connection can be made (``write_batch`` then
        reports the failure, if the server is away, and the flusher backs off); the
        native steps then stay off for 1 s, doubling at each failed connect up to
        30 s, so that neither a server that is away nor a connection limit that only
        this connection exceeds makes the flusher connect at every step.
        """
        native = self._native
        if native is None or time.monotonic() < self._pump_retry_at:
            return None
        self._check_usable()  # before the lock: a forked child may hold a copy locked
        with self._pump_lock:
            self._check_usable()
            conn = self._pump_connection()
            if conn is None:
                return None
            # Not in psycopg's PGconn protocol, but on each implementation's PGconn.
            pointer: int | None = getattr(conn.pgconn, "pgconn_ptr", None)
            if pointer is None:  # pragma: no cover - closed between check and use
                return None
            batch, chains, snapshot, outcome, sizes, error, earlier = native.pump(
                pointer, cursor, tracker, max_events, timeout, dict(skip_before), keep_going
            )
            if outcome == "failed":
                conn.close()
                self._pump = None
                assert error is not None  # a failed write carries its error
                message, sqlstate = error
                reason = message.splitlines()[0] if message else "the write failed"
                if sqlstate:
                    reason = f"{reason} (SQLSTATE {sqlstate})"
                failure = StoreUnavailableError(
                    f"writing failed at {self.url}: {reason}", target=self.url
                )
                return PendingWrite(batch, chains, snapshot, None, failure, earlier)
        if outcome == "stored":
            assert sizes is not None  # a stored batch carries its snapshot sizes
            return PendingWrite(batch, chains, snapshot, ({}, sizes), None, earlier)
        return PendingWrite(batch, chains, snapshot, None, None, earlier)

    def _pump_connection(self) -> _Connection | None:
        """The native writer's connection, checked as the pool checks its own and
        replaced when dead; None when none can be made. Under ``_pump_lock``."""
        conn = self._pump = _unless_dead(self._pump)
        if conn is None:
            try:
                conn = psycopg.connect(self._conninfo, autocommit=True, **self._settings)
            except psycopg.Error:
                self._pump_retry_at = time.monotonic() + self._pump_backoff
                self._pump_backoff = min(self._pump_backoff * 2, _PUMP_MAX_BACKOFF)
                return None
            self._pump = conn
            self._pump_backoff = _PUMP_FIRST_BACKOFF
        return conn

    def write_batch(
        self, batch: RecordBatch, snapshot: Sequence[bool]
    ) -> tuple[dict[str, WfstateError], list[int]]:
        """One transaction: the executions' compare-and-swap, the snapshots and the
        deltas in one statement; from ``COPY_THRESHOLD`` versions on, the deltas of
        the chains that passed follow by binary COPY instead.

        Everything comes encoded from Rust, for the whole batch and without the GIL:
        the statement's binary arrays and the COPY payload. Measured on 100,000
        versions (docs/storage.md): the ``unnest`` INSERT ingests about 160,000 rows/s
        whatever the batch size; COPY 145,000 in batches of 1,000 (its extra round
        trips), 200,000 in batches of 5,000 and 230,000 in batches of 20,000. The
        statement goes first so that a refused chain's deltas are left out of COPY.
        """
        encoded, sizes, has_updates, has_creations = batch.pg_parameters(snapshot)
        if not (has_updates or has_creations):
            self._check_usable()
            return {}, sizes
        by_copy = len(batch) >= COPY_THRESHOLD
        parameters = {
            name: _encoded(name, value)
            for name, value in encoded.items()
            if not (by_copy and name.startswith("d_"))
        }
        shape = _WriteShape(False, has_updates, has_creations, any(sizes), copied_deltas=by_copy)
        heads: dict[str, _ChainHead] = {chain[0]: (chain[1], None) for chain in batch.chains()}
        with self._writer_connection() as conn, conn.transaction():
            statement = self._statement(shape, conn, lambda: self._write_statement(shape))
            rows = conn.execute(statement, parameters).fetchall()
            refusals = self._refusals(conn, heads, rows, committed=False)
            if by_copy and len(refusals) < len(heads):
                payload = batch.pg_copy(set(refusals) if refusals else None)
                copy_statement = self._statement("copy_deltas", conn, self._copy_statement)
                with conn.cursor().copy(copy_statement) as copy:
                    copy.write(payload)
        return refusals, sizes

    def _copy_statement(self) -> sql.Composed:
        return self._sql(
            "COPY {deltas} (execution_id, version, recorded_at, actor, event_mask, node_ids,"
            " data, lease_owner, lease_token) FROM STDIN (FORMAT BINARY)"
        )

    def load(self, execution_id: str, *, version: int | None = None) -> LoadedExecution | None:
        if not _findable(execution_id):
            return None
        with self._connection("loading") as conn:
            statement = self._statement("load", conn, self._load_statement)
            rows = conn.execute(
                statement, {"id": execution_id, "version": _bigint(version)}
            ).fetchall()
        if not rows:
            return None
        _, snapshot_version, _, snapshot = rows[0]
        deltas = [(version, recorded_us, data) for _, version, recorded_us, data in rows[1:]]
        return LoadedExecution(execution_id, snapshot, snapshot_version, deltas)

    def _load_statement(self) -> sql.Composed:
        """One statement, so one round trip and one consistent snapshot of the tables.

        ``target`` is the version asked for (the latest by default) if it is stored;
        the first row gives the newest snapshot at or below it (version 0 and NULL
        when none), the next ones the deltas after that snapshot, up to the target.
        """
        return self._sql(
            """
            WITH target AS (
                SELECT coalesce(%(version)s::bigint, e.version) AS version
                FROM {executions} AS e
                WHERE e.execution_id = %(id)s
                  AND coalesce(%(version)s::bigint, e.version) BETWEEN 1 AND e.version
            ), snapshot AS (
                SELECT s.version, s.data
                FROM {snapshots} AS s, target AS t
                WHERE s.execution_id = %(id)s AND s.version <= t.version
                ORDER BY s.version DESC
                LIMIT 1
            )
            SELECT 0 AS part, coalesce(snapshot.version, 0) AS version,
                   NULL::bigint AS recorded_us, snapshot.data
            FROM target LEFT JOIN snapshot ON true
            UNION ALL
            SELECT 1, d.version, (extract(epoch FROM d.recorded_at) * 1000000)::bigint,
                   d.data
            FROM {deltas} AS d, target AS t
            WHERE d.execution_id = %(id)s
              AND d.version > coalesce((SELECT version FROM snapshot), 0)
              AND d.version <= t.version
            ORDER BY part, version
            """
        )

    def active_execution_ids(self) -> list[str]:
        return self.list_execution_ids(statuses=ACTIVE_STATUSES)

    def current_versions(self, execution_ids: Sequence[str]) -> dict[str, int]:
        wanted = [execution_id for execution_id in execution_ids if _findable(execution_id)]
        if not wanted:
            return {}
        with self._connection("reading versions") as conn:
            statement = self._statement(
                "versions",
                conn,
                lambda: self._sql(
                    "SELECT execution_id, version FROM {executions}"
                    " WHERE execution_id = ANY(%s::text[])"
                ),
            )
            rows = conn.execute(statement, (_TextArray(wanted),)).fetchall()
        return {execution_id: version for execution_id, version in rows}

    def version_at(self, execution_id: str, at_us: int) -> int | None:
        if not _findable(execution_id):
            return None
        with self._connection("reading a version") as conn:
            statement = self._statement(
                "version_at",
                conn,
                lambda: self._sql(
                    "SELECT max(version) FROM {deltas} WHERE execution_id = %s"
                    " AND recorded_at <= timestamptz 'epoch' + %s * interval '1 microsecond'"
                ),
            )
            row = conn.execute(statement, (execution_id, _bigint(at_us))).fetchone()
        return None if row is None else row[0]

    def read_deltas(
        self,
        execution_id: str,
        *,
        after_version: int | None = None,
        since_us: int | None = None,
        until_us: int | None = None,
    ) -> list[tuple[int, int, str | None, bytes]]:
        if not _findable(execution_id):
            return []
        given = (after_version is not None, since_us is not None, until_us is not None)

        def build() -> sql.Composed:
            conditions = [sql.SQL("execution_id = %(id)s")]
            if given[0]:
                conditions.append(sql.SQL("version > %(after)s"))
            if given[1]:
                conditions.append(
                    sql.SQL(
                        "recorded_at >= timestamptz 'epoch' + %(since)s * interval '1 microsecond'"
                    )
                )
            if given[2]:
                conditions.append(
                    sql.SQL(
                        "recorded_at < timestamptz 'epoch' + %(until)s * interval '1 microsecond'"
                    )
                )
            return sql.SQL(
                "SELECT version, (extract(epoch FROM recorded_at) * 1000000)::bigint, actor,"
                " data FROM {} WHERE {} ORDER BY version"
            ).format(self._identifiers["deltas"], sql.SQL(" AND ").join(conditions))

        parameters = {
            "id": execution_id,
            "after": _bigint(after_version),
            "since": _bigint(since_us),
            "until": _bigint(until_us),
        }
        with self._connection("reading deltas") as conn:
            statement = self._statement(("read_deltas", given), conn, build)
            rows = conn.execute(statement, parameters).fetchall()
        return [(version, at_us, actor, data) for version, at_us, actor, data in rows]

    def list_execution_ids(
        self,
        *,
        statuses: Sequence[str] | None = None,
        workflow_id: str | None = None,
        limit: int | None = None,
    ) -> list[str]:
        if statuses is not None:
            statuses = [status for status in statuses if _findable(status)]
            if not statuses:
                return []
        if workflow_id is not None and not _findable(workflow_id):
            return []
        # A negative limit slices like the memory store (drops from the end), so SQL
        # only gets the non-negative ones.
        sql_limit = limit is not None and limit >= 0
        given = (statuses is not None, workflow_id is not None, sql_limit)

        def build() -> sql.Composed:
            conditions = []
            if given[0]:
                conditions.append(sql.SQL("status = ANY(%(statuses)s::text[])"))
            if given[1]:
                conditions.append(sql.SQL("workflow_id = %(workflow_id)s"))
            where = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conditions)
            return sql.SQL(
                "SELECT execution_id FROM {}{} ORDER BY created_at, execution_id{}"
            ).format(
                self._identifiers["executions"],
                where if conditions else sql.SQL(""),
                sql.SQL(" LIMIT %(limit)s") if given[2] else sql.SQL(""),
            )

        parameters = {
            "statuses": None if statuses is None else _TextArray(statuses),
            "workflow_id": workflow_id,
            "limit": _bigint(limit),
        }
        with self._connection("listing executions") as conn:
            statement = self._statement(("list", given), conn, build)
            ids = [execution_id for (execution_id,) in conn.execute(statement, parameters)]
        return ids if limit is None or sql_limit else ids[:limit]

    # -- leases -----------------------------------------------------------------------
    # Expiry is computed on the server's clock (clock_timestamp(): the time of the
    # statement, not of the transaction), so hosts whose clocks disagree still agree
    # on who holds a lease. Each method is one autocommit statement; under READ
    # COMMITTED an UPDATE that waited for a concurrent one re-checks its WHERE on the
    # row that one left, so two acquirers never both win.

    def _lease_query(
        self, key: str, action: str, text: LiteralString, parameters: dict[str, Any]
    ) -> list[TupleRow]:
        if not _findable(parameters.get("id", "")) or not _findable(parameters.get("owner", "")):
            return []
        with self._connection(action) as conn:
            statement = self._statement(key, conn, lambda: self._sql(text))
            return conn.execute(statement, parameters).fetchall()

    def acquire_lease(self, execution_id: str, owner: str, ttl_us: int) -> LeaseGrant:
        parameters = {"id": execution_id, "owner": owner, "ttl": Int8(ttl_us)}
        for _attempt in range(3):
            rows = self._lease_query(
                "acquire_lease",
                "acquiring a lease",
                """
                WITH granted AS (
                    UPDATE {executions} AS e
                    SET lease_owner = %(owner)s, lease_token = e.lease_token + 1,
                        lease_expires_at = clock_timestamp() + %(ttl)s * interval '1 microsecond'
                    WHERE e.execution_id = %(id)s
                      AND (e.lease_owner IS NULL OR e.lease_owner = %(owner)s
                           OR e.lease_expires_at <= clock_timestamp())
                    RETURNING e.lease_token, e.lease_expires_at
                )
                SELECT true, lease_token,
                       (extract(epoch FROM lease_expires_at) * 1000000)::bigint, NULL::text
                FROM granted
                UNION ALL
                SELECT false, lease_token,
                       (extract(epoch FROM lease_expires_at) * 1000000)::bigint, lease_owner
                FROM {executions}
                WHERE execution_id = %(id)s AND NOT EXISTS (SELECT FROM granted)
                """,
                parameters,
            )
            if not rows:
                raise NotFoundError(f"no execution {execution_id!r}")
            granted, token, expires_at_us, holder = rows[0]
            if granted:
                return LeaseGrant(execution_id, owner, token, expires_at_us)
            if holder is not None and expires_at_us is not None and expires_at_us > now_us():
                raise LeaseHeldError(execution_id, holder, from_micros(expires_at_us))
            # The statement's snapshot shows a lease our UPDATE found taken, released or
            # expired in between (a concurrent grant or release): look again.
        raise LeaseHeldError(execution_id, holder or "(another owner)", from_micros(now_us()))

    def renew_lease(self, execution_id: str, owner: str, token: int, ttl_us: int) -> LeaseGrant:
        rows = self._lease_query(
            "renew_lease",
            "renewing a lease",
            """
            WITH renewed AS (
                UPDATE {executions}
                SET lease_expires_at = clock_timestamp() + %(ttl)s * interval '1 microsecond'
                WHERE execution_id = %(id)s AND lease_owner = %(owner)s
                  AND lease_token = %(token)s
                RETURNING lease_expires_at
            )
            SELECT true, (extract(epoch FROM lease_expires_at) * 1000000)::bigint, NULL::bigint
            FROM renewed
            UNION ALL
            SELECT false, NULL::bigint,
                   CASE WHEN lease_owner IS NULL THEN NULL ELSE lease_token END
            FROM {executions}
            WHERE execution_id = %(id)s AND NOT EXISTS (SELECT FROM renewed)
            """,
            {"id": execution_id, "owner": owner, "token": Int8(token), "ttl": Int8(ttl_us)},
        )
        if rows and rows[0][0]:
            return LeaseGrant(execution_id, owner, token, rows[0][1])
        raise LeaseLostError(execution_id, token, rows[0][2] if rows else None)

    def release_lease(self, execution_id: str, owner: str, token: int) -> bool:
        rows = self._lease_query(
            "release_lease",
            "releasing a lease",
            """
            UPDATE {executions} SET lease_owner = NULL, lease_expires_at = clock_timestamp()
            WHERE execution_id = %(id)s AND lease_owner = %(owner)s AND lease_token = %(token)s
            RETURNING true
            """,
            {"id": execution_id, "owner": owner, "token": Int8(token)},
        )
        return bool(rows)

    def get_lease(self, execution_id: str) -> LeaseGrant | None:
        rows = self._lease_query(
            "get_lease",
            "reading a lease",
            """
            SELECT lease_owner, lease_token,
                   (extract(epoch FROM lease_expires_at) * 1000000)::bigint
            FROM {executions} WHERE execution_id = %(id)s AND lease_owner IS NOT NULL
            """,
            {"id": execution_id},
        )
        if not rows:
            return None
        holder, token, expires_at_us = rows[0]
        return LeaseGrant(execution_id, holder, token, expires_at_us)

    def claim_orphans(self, owner: str, ttl_us: int, limit: int) -> list[LeaseGrant]:
        # SKIP LOCKED: two claimers (or a claimer and a writer) never wait on each
        # other's rows; the UPDATE re-checks the expiry on the row it locked.
        rows = self._lease_query(
            "claim_orphans",
            "claiming orphans",
            """
            WITH orphans AS (
                SELECT execution_id FROM {executions}
                WHERE status = 'running' AND lease_token > 0
                  AND (lease_owner IS NULL OR lease_expires_at <= clock_timestamp())
                ORDER BY lease_expires_at, execution_id
                LIMIT %(limit)s
                FOR NO KEY UPDATE SKIP LOCKED
            )
            UPDATE {executions} AS e
            SET lease_owner = %(owner)s, lease_token = e.lease_token + 1,
                lease_expires_at = clock_timestamp() + %(ttl)s * interval '1 microsecond'
            FROM orphans
            WHERE e.execution_id = orphans.execution_id
            RETURNING e.execution_id, e.lease_token,
                      (extract(epoch FROM e.lease_expires_at) * 1000000)::bigint
            """,
            {"owner": owner, "ttl": Int8(ttl_us), "limit": Int8(limit)},
        )
        return sorted(
            (
                LeaseGrant(execution_id, owner, token, expires)
                for execution_id, token, expires in rows
            ),
            key=lambda grant: (grant.expires_at_us, grant.execution_id),
        )

    def owned_execution_ids(self, owner: str) -> list[str]:
        rows = self._lease_query(
            "owned_execution_ids",
            "reading owned executions",
            """
            SELECT execution_id FROM {executions}
            WHERE lease_owner = %(owner)s AND status IN ('running', 'suspended')
            ORDER BY created_at, execution_id
            """,
            {"owner": owner},
        )
        return [execution_id for (execution_id,) in rows]

    def lease_log(self, execution_id: str) -> list[tuple[int, str | None, int | None]]:
        rows = self._lease_query(
            "lease_log",
            "reading the lease log",
            """
            SELECT version, lease_owner, lease_token FROM {deltas}
            WHERE execution_id = %(id)s ORDER BY version
            """,
            {"id": execution_id},
        )
        return [(version, holder, token) for version, holder, token in rows]

    def storage_bytes(self) -> int:
        with self._connection("measuring storage") as conn:
            row = conn.execute(
                "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint"
                " FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace"
                " WHERE n.nspname = %s AND c.relname = ANY(%s::text[]) AND c.relkind = 'r'",
                (self._schema, list(_TABLES)),
            ).fetchone()
        return 0 if row is None else int(row[0])

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if os.getpid() != self._pid:
            # A forked child: the connections are the parent's (closing one would end
            # its session, and a lock may have been copied held). Leave them alone.
            return
        with self._writer_lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        with self._pump_lock:
            if self._pump is not None:
                self._pump.close()
                self._pump = None
        self._pool.close()
