"""The StateManager: the public entry point of wfstate.

It is a thin shell over the Rust core (``wfstate._core.Core``): every state change is
one call into Rust, which checks the version, validates, applies, bumps the version
and records the events atomically. This module only adapts arguments (datetimes,
enums, options) and implements the retry loop of ``transact``. It must never hold a
lock of its own around a core call or copy state in Python.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, Self

from wfstate import _core
from wfstate._core import EventCursor, WorkflowState
from wfstate._model import (
    ExecutionHistory,
    ExecutionStatus,
    HistoryOptions,
    HistorySummary,
    StateUpdate,
)
from wfstate.errors import ConflictError, ValidationError

__all__ = ["StateManager", "UpdateFn"]

#: What ``transact`` calls: it gets the current state and returns the update to
#: apply to exactly that version, or ``None`` to write nothing.
UpdateFn = Callable[[WorkflowState], "StateUpdate | Mapping[str, Any] | None"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _to_micros(moment: datetime, name: str) -> int:
    if not isinstance(moment, datetime):
        raise ValidationError(f"{name} must be a datetime, not {type(moment).__name__}")
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValidationError(f"{name} must be timezone-aware (use datetime.now(UTC))")
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


class StateManager:
    """A concurrent, versioned home for the state and history of workflow executions.

    Every method is thread-safe. States and events it returns are immutable (their
    dict fields are fresh copies), so nothing a caller does to them changes the store.

    ``ring_capacity`` bounds the in-memory event history (in events). When a durable
    reader (``open_cursor(durable=True)``) has not taken the oldest events yet and the
    ring is full, ``on_ring_full="block"`` waits up to ``ring_full_timeout`` seconds
    for room and ``on_ring_full="error"`` fails at once; both raise
    ``BackpressureError`` without applying the update. ``max_update_bytes`` bounds the
    JSON payload of one update or creation.

    Example::

        with StateManager() as sm:
            state = sm.create_execution("order-42", workflow_id="checkout")
            sm.update_state("order-42", {"nodes": {"charge": "running"}})
    """

    __slots__ = ("_core",)

    def __init__(
        self,
        *,
        ring_capacity: int = 100_000,
        on_ring_full: Literal["block", "error"] = "block",
        ring_full_timeout: float = 5.0,
        max_update_bytes: int = 1_048_576,
    ) -> None:
        if on_ring_full not in ("block", "error"):
            raise ValidationError(f"on_ring_full must be 'block' or 'error', not {on_ring_full!r}")
        self._core = _core.Core(
            ring_capacity=ring_capacity,
            block_on_full=on_ring_full == "block",
            ring_full_timeout=ring_full_timeout,
            max_update_bytes=max_update_bytes,
        )

    # -- lifecycle ---------------------------------------------------------------

    def close(self) -> None:
        """Close the manager; later calls raise ``ClosedError``. Idempotent."""
        self._core.close()

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._core.closed

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- writes ------------------------------------------------------------------

    def create_execution(
        self,
        execution_id: str | None = None,
        *,
        workflow_id: str,
        variables: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        actor: str | None = None,
    ) -> WorkflowState:
        """Create an execution at version 1, status running; return its state.

        An id is generated (a time-ordered UUIDv7) when ``execution_id`` is None.
        Raises ``AlreadyExistsError`` if the id is taken, ``ValidationError`` on bad input.
        """
        return self._core.create(execution_id, workflow_id, variables, context, actor)

    def update_state(
        self,
        execution_id: str,
        update: StateUpdate | Mapping[str, Any],
        *,
        expected_version: int | None = None,
        actor: str | None = None,
    ) -> int:
        """Apply one update atomically and return the new version.

        All or nothing: on any error the state, version and history are unchanged.
        With ``expected_version`` the update applies only to that version, else
        ``ConflictError`` (with ``.expected`` and ``.actual``). Also raises
        ``NotFoundError``, ``ValidationError``, ``InvalidTransitionError``.
        """
        return self._core.apply(execution_id, update, expected_version, actor)

    def transact(
        self,
        execution_id: str,
        fn: UpdateFn,
        *,
        retries: int = 10,
        actor: str | None = None,
    ) -> int:
        """Read-modify-write with optimistic concurrency; return the resulting version.

        Reads the state, calls ``fn(state)`` for an update and applies it with
        ``expected_version=state.version``. On a conflict it reads again and calls
        ``fn`` again, at most ``retries`` more times, then re-raises the
        ``ConflictError``. When ``fn`` returns None nothing is written.
        """
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ValidationError(f"retries must be a non-negative int, not {retries!r}")
        core = self._core
        attempt = 0
        while True:
            state = core.get(execution_id)
            update = fn(state)
            if update is None:
                return state.version
            try:
                return core.apply(execution_id, update, state.version, actor)
            except ConflictError:
                attempt += 1
                if attempt > retries:
                    raise

    # -- reads -------------------------------------------------------------------

    def get_state(self, execution_id: str, *, version: int | None = None) -> WorkflowState:
        """The current state, or the state as it was right after ``version``.

        Past versions come from the in-memory ring; once their events were evicted
        this raises ``HistoryEvictedError``. Unknown ids and versions raise
        ``NotFoundError``.
        """
        if version is None:
            return self._core.get(execution_id)
        return self._core.get_version(execution_id, version)

    def get_history(
        self, execution_id: str, options: HistoryOptions | None = None
    ) -> ExecutionHistory:
        """The events of an execution that match ``options``, oldest first, and a summary.

        Raises ``HistoryEvictedError`` rather than return a partial history when
        events the query could match are no longer in memory.
        """
        if options is None:
            options = HistoryOptions()
        elif not isinstance(options, HistoryOptions):
            raise ValidationError(f"options must be a HistoryOptions, not {type(options).__name__}")
        since_us = None if options.since is None else _to_micros(options.since, "since")
        until_us = None if options.until is None else _to_micros(options.until, "until")
        types = None if options.types is None else _enum_values(options.types, "types")
        events, error_count = self._core.history(
            execution_id,
            since_us,
            until_us,
            types,
            options.node_id,
            options.after_version,
            options.limit,
        )
        state = self._core.get(execution_id)
        summary = HistorySummary(
            duration=state.updated_at - state.created_at,
            node_count=len(state.nodes),
            error_count=error_count,
        )
        return ExecutionHistory(execution_id=execution_id, events=events, summary=summary)

    def list_executions(
        self,
        *,
        status: ExecutionStatus | str | Iterable[ExecutionStatus | str] | None = None,
        workflow_id: str | None = None,
        limit: int = 100,
    ) -> list[WorkflowState]:
        """Executions in creation order, filtered by status (one or several) and workflow."""
        statuses: list[str] | None
        if status is None:
            statuses = None
        elif isinstance(status, str):
            statuses = [status]
        else:
            statuses = _enum_values(status, "status")
        return self._core.list(statuses, workflow_id, limit)

    def open_cursor(self, *, durable: bool = False, from_oldest: bool = False) -> EventCursor:
        """A reader of every execution's events, in the order they were recorded.

        A durable cursor holds back eviction until it ``commit()``s; a live cursor
        never blocks writers and counts what it ``missed`` if it falls behind.
        ``from_oldest`` starts at the oldest event still held instead of the next one.
        """
        return self._core.open_cursor(durable=durable, from_oldest=from_oldest)

    def stats(self) -> dict[str, int]:
        """Counters of the in-memory core: executions, ring size and capacity, memory."""
        return self._core.stats()

    def __len__(self) -> int:
        return len(self._core)


def _enum_values(values: Iterable[Any], name: str) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Iterable):
        raise ValidationError(f"{name} must be a collection of values")
    result = []
    for value in values:
        if not isinstance(value, str):
            raise ValidationError(f"{name} holds {value!r}, which is not a status or type")
        result.append(str(value))
    return result
