"""Type stubs of the Rust core, ``wfstate._core``. Hand-written; checked by stubtest."""

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal, TypeVar, final

from wfstate._model import EventType, ExecutionStatus, NodeStatus, StateUpdate
from wfstate.store.base import LoadedExecution

_T = TypeVar("_T")

#: ``Core.apply_unless``'s mask: an update that sets the status.
CRITICAL_STATUS: int
#: An update that moves a node to ``failed``.
CRITICAL_NODE_FAILED: int
#: An update that records an error.
CRITICAL_ERROR: int
#: An update that names at least one node (``nodes``).
CRITICAL_NODES: int
#: Every update.
CRITICAL_ALL: int

__all__ = [
    "CRITICAL_ALL",
    "CRITICAL_ERROR",
    "CRITICAL_NODES",
    "CRITICAL_NODE_FAILED",
    "CRITICAL_STATUS",
    "Core",
    "EventCursor",
    "NodeState",
    "PgWriter",
    "PreparedUpdate",
    "RecordBatch",
    "SnapshotTracker",
    "SqliteWriter",
    "StateEvent",
    "VersionRecord",
    "WorkflowState",
    "advance",
    "bind_types",
    "decode_data",
    "decode_history",
    "new_execution_id",
    "pg_write_parameters",
    "rebuild",
    "sqlite_write_rows",
]

@final
class NodeState:
    """The state of one node of an execution. Immutable."""

    @property
    def status(self) -> NodeStatus: ...
    @property
    def attempts(self) -> int: ...
    @property
    def started_at(self) -> datetime | None: ...
    @property
    def finished_at(self) -> datetime | None: ...
    @property
    def error(self) -> dict[str, Any] | None: ...
    def to_dict(self) -> dict[str, Any]: ...
    def __eq__(self, value: object, /) -> bool: ...
    def __ne__(self, value: object, /) -> bool: ...
    __hash__: None  # type: ignore[assignment]

@final
class WorkflowState:
    """One version of an execution's state. Immutable; mutable fields are copies."""

    @property
    def execution_id(self) -> str: ...
    @property
    def workflow_id(self) -> str: ...
    @property
    def status(self) -> ExecutionStatus: ...
    @property
    def current_node(self) -> str | None: ...
    @property
    def nodes(self) -> dict[str, NodeState]: ...
    @property
    def variables(self) -> dict[str, Any]: ...
    @property
    def context(self) -> dict[str, Any]: ...
    @property
    def version(self) -> int: ...
    @property
    def error_count(self) -> int: ...
    @property
    def forked_from(self) -> tuple[str, int] | None: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def updated_at(self) -> datetime: ...
    def to_dict(self) -> dict[str, Any]: ...
    def __eq__(self, value: object, /) -> bool: ...
    def __ne__(self, value: object, /) -> bool: ...
    __hash__: None  # type: ignore[assignment]

@final
class StateEvent:
    """One recorded change. Immutable; ``data`` is a copy."""

    @property
    def seq(self) -> int: ...
    @property
    def execution_id(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def timestamp(self) -> datetime: ...
    @property
    def type(self) -> EventType: ...
    @property
    def node_id(self) -> str | None: ...
    @property
    def actor(self) -> str | None: ...
    @property
    def data(self) -> dict[str, Any]: ...
    @property
    def encoded_data(self) -> bytes: ...
    def to_dict(self) -> dict[str, Any]: ...
    def __eq__(self, value: object, /) -> bool: ...
    def __ne__(self, value: object, /) -> bool: ...
    __hash__: None  # type: ignore[assignment]

@final
class PreparedUpdate:
    """An update checked and computed, not yet visible. Publish it with ``Core.publish``.

    It keeps ring room for its events until published (while a durable cursor is
    open, ``Core.prepare*`` wait for that room, or raise ``BackpressureError``, as a
    publish would); ``release()`` gives the room back when it will not be published."""

    @property
    def execution_id(self) -> str: ...
    @property
    def base_version(self) -> int: ...
    @property
    def version(self) -> int: ...
    @property
    def state(self) -> WorkflowState: ...
    @property
    def events(self) -> list[StateEvent]: ...
    def record(self) -> VersionRecord: ...
    def release(self) -> None: ...

@final
class VersionRecord:
    """One version as a store writes it: the execution's row and the version's delta."""

    @property
    def execution_id(self) -> str: ...
    @property
    def workflow_id(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def base_version(self) -> int: ...
    @property
    def status(self) -> str: ...
    @property
    def created_at_us(self) -> int: ...
    @property
    def updated_at_us(self) -> int: ...
    @property
    def actor(self) -> str | None: ...
    @property
    def delta(self) -> bytes: ...
    @property
    def event_types(self) -> list[str]: ...
    @property
    def event_mask(self) -> int: ...
    @property
    def node_ids(self) -> list[str]: ...
    @property
    def last_seq(self) -> int: ...
    @property
    def forked_from(self) -> tuple[str, int] | None: ...
    @property
    def state(self) -> WorkflowState: ...
    def snapshot(self) -> bytes: ...
    def pg_parameters(
        self, snapshot: bytes | None, lease: tuple[str, int] | None
    ) -> dict[str, bytes | None]: ...
    def sqlite_update_rows(
        self, snapshot: bytes | None
    ) -> tuple[tuple[Any, ...], list[tuple[Any, ...]], list[tuple[str, int, bytes]]]: ...

@final
class EventCursor:
    """A reader of the event ring with its own position.

    A durable cursor holds back eviction: an event stays in the ring until every
    durable cursor has committed past it.
    """

    @property
    def position(self) -> int: ...
    @property
    def committed(self) -> int: ...
    @property
    def durable(self) -> bool: ...
    @property
    def missed(self) -> int: ...
    def read(self, max_events: int = 1000, timeout: float | None = None) -> list[StateEvent]: ...
    def read_records(
        self, max_events: int = 1000, timeout: float | None = None
    ) -> list[VersionRecord]: ...
    def read_batch(
        self,
        max_events: int = 1000,
        timeout: float | None = None,
        skip_before: Mapping[str, int] | None = None,
    ) -> RecordBatch: ...
    def commit(self, seq: int | None = None) -> None: ...
    def close(self) -> None: ...

@final
class RecordBatch:
    """Versions a durable cursor read, kept in Rust and encoded for a store at once."""

    def __len__(self) -> int: ...
    @property
    def dropped(self) -> int: ...
    def records(self) -> list[VersionRecord]: ...
    def chains(self) -> list[tuple[str, int, int, str, int, int, int]]: ...
    def pg_parameters(
        self, snapshot: Sequence[bool]
    ) -> tuple[dict[str, bytes], list[int], bool, bool]: ...
    def pg_copy(self, exclude: set[str] | None = None) -> bytes: ...
    def sqlite_rows(
        self, snapshot: Sequence[bool]
    ) -> tuple[
        list[
            tuple[
                str,
                int,
                tuple[Any, ...],
                list[tuple[Any, ...]],
                list[tuple[str, int, bytes]],
            ]
        ],
        list[int],
    ]: ...

@final
class SqliteWriter:
    """The SQLite store's native writer: write transactions without the GIL, on the
    ``sqlite3`` module's own SQLite library (``ValueError`` when it cannot be
    reached), group-committing the callers of every thread."""

    def __new__(
        cls,
        path: str,
        statements: dict[str, str],
        pragmas: Sequence[str],
        timeout: float,
        module_path: str,
        expected_version: str,
        *,
        max_batch: int = 1000,
        newer_limit: int = 64,
    ) -> SqliteWriter: ...
    def write_items(
        self,
        items: Sequence[tuple[VersionRecord, bytes | None, tuple[str, int] | None]],
    ) -> list[tuple[list[int], tuple[Any, ...]]]: ...
    def apply(
        self,
        core: Core,
        tracker: SnapshotTracker,
        execution_id: str,
        update: StateUpdate | Mapping[str, Any],
        expected_version: int | None = None,
        actor: str | None = None,
    ) -> tuple[int, tuple[Any, ...] | None]: ...
    def write_batch(
        self, batch: RecordBatch, snapshot: Sequence[bool]
    ) -> tuple[list[tuple[str, tuple[Any, ...]]], list[int]]: ...
    def exclusive(self, operation: Callable[[], _T]) -> _T: ...
    def pump(
        self,
        cursor: EventCursor,
        tracker: SnapshotTracker,
        max_events: int,
        timeout: float,
        skip_before: dict[str, int] | None = None,
        keep_going: float = 0.0,
    ) -> tuple[
        RecordBatch,
        list[tuple[str, int, int, str, int, int, int]],
        list[bool],
        list[tuple[str, tuple[Any, ...]]] | None,
        list[int] | None,
        Exception | None,
        tuple[int, int, int],
    ]: ...
    def stats(self) -> tuple[int, int]: ...
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...

@final
class PgWriter:
    """The PostgreSQL store's native write-behind: its batches written without the
    GIL through the libpq psycopg uses (``ValueError`` when it cannot be reached)."""

    def __new__(
        cls,
        module_path: str,
        expected_version: int,
        statements: dict[int, tuple[str, list[tuple[str, int]]]],
        copy_statement: str,
        copy_threshold: int,
    ) -> PgWriter: ...
    def pump(
        self,
        connection: int,
        cursor: EventCursor,
        tracker: SnapshotTracker,
        max_events: int,
        timeout: float,
        skip_before: dict[str, int] | None = None,
        keep_going: float = 0.0,
    ) -> tuple[
        RecordBatch,
        list[tuple[str, int, int, str, int, int, int]],
        list[bool],
        Literal["stored", "refused", "failed"] | None,
        list[int] | None,
        tuple[str, str | None] | None,
        tuple[int, int, int],
    ]: ...

@final
class SnapshotTracker:
    """Which versions are stored with a whole-state snapshot, per ``SnapshotPolicy``."""

    def __new__(
        cls, *, every_versions: int | None, when_deltas_outweigh: bool, at_final_status: bool
    ) -> SnapshotTracker: ...
    def seed(self, loaded: LoadedExecution) -> None: ...
    def caught_up(
        self,
        execution_id: str,
        snapshot_version: int,
        newer: Iterable[tuple[int, int, str | None, bytes]],
    ) -> None: ...
    def snapshot_for(self, record: VersionRecord) -> bytes | None: ...
    def decide_chain(
        self,
        execution_id: str,
        base_version: int,
        last_version: int,
        last_status: str,
        delta_bytes: int,
        first_delta_bytes: int,
    ) -> bool: ...
    def snapshotted(self, execution_id: str, size: int) -> None: ...
    def undo(self, execution_id: str, version: int) -> None: ...

@final
class Core:
    """The concurrent state map and event ring. Use ``wfstate.StateManager`` instead."""

    def __new__(
        cls,
        *,
        ring_capacity: int = 100000,
        block_on_full: bool = True,
        ring_full_timeout: float = 5.0,
        max_update_bytes: int = 1048576,
    ) -> Core: ...
    def create(
        self,
        execution_id: str | None,
        workflow_id: str,
        variables: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        actor: str | None = None,
    ) -> WorkflowState: ...
    def apply(
        self,
        execution_id: str,
        update: StateUpdate | Mapping[str, Any],
        expected_version: int | None = None,
        actor: str | None = None,
    ) -> int: ...
    def apply_unless(
        self,
        execution_id: str,
        update: StateUpdate | Mapping[str, Any],
        expected_version: int | None = None,
        actor: str | None = None,
        critical: int = 0,
    ) -> int | None: ...
    def prepare(
        self,
        execution_id: str,
        update: StateUpdate | Mapping[str, Any],
        expected_version: int | None = None,
        actor: str | None = None,
    ) -> PreparedUpdate: ...
    def publish(self, prepared: PreparedUpdate, *, persisted: bool = True) -> int: ...
    def prepare_create(
        self,
        execution_id: str | None,
        workflow_id: str,
        variables: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        actor: str | None = None,
    ) -> PreparedUpdate: ...
    def prepare_fork(
        self,
        source: WorkflowState,
        new_execution_id: str | None = None,
        actor: str | None = None,
    ) -> PreparedUpdate: ...
    def prepare_fork_link(
        self,
        execution_id: str,
        forked_version: int,
        new_execution_id: str,
        actor: str | None = None,
    ) -> PreparedUpdate: ...
    def install(self, state: WorkflowState) -> WorkflowState: ...
    def refresh(self, state: WorkflowState) -> WorkflowState: ...
    def replace(self, state: WorkflowState) -> int: ...
    def get(self, execution_id: str) -> WorkflowState: ...
    def get_version(self, execution_id: str, version: int) -> WorkflowState: ...
    def history(
        self,
        execution_id: str,
        since_us: int | None = None,
        until_us: int | None = None,
        types: Iterable[str] | None = None,
        node_id: str | None = None,
        after_version: int | None = None,
        limit: int | None = None,
    ) -> tuple[list[StateEvent], tuple[int, int, int]]: ...
    def list(
        self,
        statuses: Iterable[str] | None = None,
        workflow_id: str | None = None,
        limit: int | None = None,
    ) -> list[WorkflowState]: ...
    def open_cursor(self, *, durable: bool = False, from_oldest: bool = False) -> EventCursor: ...
    def stats(self) -> dict[str, int]: ...
    def close(self) -> None: ...
    @property
    def closed(self) -> bool: ...
    def __len__(self) -> int: ...

def bind_types(
    execution_status: type[ExecutionStatus],
    node_status: type[NodeStatus],
    event_type: type[EventType],
    state_update: type[StateUpdate],
    exception_to_error: Callable[[BaseException], dict[str, Any]],
) -> None: ...
def decode_data(encoded: bytes) -> dict[str, Any]: ...
def new_execution_id() -> str: ...
def rebuild(
    execution_id: str,
    snapshot: bytes | None,
    deltas: Sequence[tuple[int, int, bytes]],
) -> WorkflowState: ...
def pg_write_parameters(
    items: Sequence[tuple[VersionRecord, bytes | None, tuple[str, int] | None]],
) -> tuple[dict[str, bytes], bool, bool, bool]: ...
def sqlite_write_rows(
    items: Sequence[tuple[VersionRecord, bytes | None, tuple[str, int] | None]],
) -> list[
    tuple[str, list[int], int, tuple[Any, ...], list[tuple[Any, ...]], list[tuple[str, int, bytes]]]
]: ...
def advance(state: WorkflowState, deltas: Sequence[tuple[int, int, bytes]]) -> WorkflowState: ...
def decode_history(
    execution_id: str,
    deltas: Sequence[tuple[int, int, str | None, bytes]],
    since_us: int | None = None,
    until_us: int | None = None,
    types: Iterable[str] | None = None,
    node_id: str | None = None,
    after_version: int | None = None,
    limit: int | None = None,
) -> list[StateEvent]: ...
