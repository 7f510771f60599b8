"""The public value types of wfstate: statuses, event types, updates, history queries.

The state and event objects themselves (``WorkflowState``, ``NodeState``,
``StateEvent``) are immutable classes of the Rust core; they are re-exported from
``wfstate``. This module holds what a caller builds and passes in, and the small
result records built in Python. It must stay free of I/O and of the Rust core, so
that the core can import it at start-up.
"""

from __future__ import annotations

import enum
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TypeAlias

if TYPE_CHECKING:
    from wfstate._core import StateEvent

__all__ = [
    "UNSET",
    "EventType",
    "ExecutionHistory",
    "ExecutionStatus",
    "HistoryOptions",
    "HistorySummary",
    "JSONValue",
    "NodeStatus",
    "StateUpdate",
]

#: What wfstate accepts as a variable, context or detail value: JSON, with tuples
#: read as lists. Floats must be finite, integers fit in 64 bits, keys are strings.
JSONValue: TypeAlias = (
    bool
    | int
    | float
    | str
    | list["JSONValue"]
    | tuple["JSONValue", ...]
    | dict[str, "JSONValue"]
    | None
)


class ExecutionStatus(enum.StrEnum):
    """The status of a whole execution.

    Allowed transitions (anything else raises ``InvalidTransitionError``)::

        running   -> suspended, completed, failed, cancelled
        suspended -> running, failed, cancelled
        failed    -> running          (resume after a failure)
        completed, cancelled: final

    An execution that is completed, failed or cancelled accepts no update, except
    a failed one that the same update sets running again.
    """

    RUNNING = "running"
    SUSPENDED = "suspended"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class NodeStatus(enum.StrEnum):
    """The status of one node (step) of an execution.

    Allowed transitions (a node not yet in ``state.nodes`` counts as pending)::

        (absent)  -> pending, running, skipped
        pending   -> running, skipped
        running   -> completed, failed
        failed    -> running (a new attempt: attempts + 1), skipped
        completed, skipped: final
    """

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"


class EventType(enum.StrEnum):
    """The kind of a history event. One update emits one event per change."""

    EXECUTION_CREATED = "execution_created"
    EXECUTION_FORKED = "execution_forked"
    STATUS_CHANGE = "status_change"
    NODE_PENDING = "node_pending"
    NODE_START = "node_start"
    NODE_COMPLETE = "node_complete"
    NODE_FAILED = "node_failed"
    NODE_SKIPPED = "node_skipped"
    NODE_METRICS = "node_metrics"
    ERROR = "error"
    CURRENT_NODE_CHANGED = "current_node_changed"
    VARIABLES_CHANGED = "variables_changed"
    CONTEXT_CHANGED = "context_changed"


class _Unset(enum.Enum):
    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


#: The default of ``StateUpdate.current_node``: leave the current node as it is.
#: (``None`` clears it.)
UNSET: Final = _Unset.UNSET


@dataclass(frozen=True, slots=True, kw_only=True)
class StateUpdate:
    """One atomic change to an execution. Every field is optional; at least one is set.

    A plain ``dict`` with the same keys is accepted wherever a ``StateUpdate`` is.

    - ``status``: the new execution status (a member or its string value).
    - ``current_node``: the node the engine is at; ``None`` clears it, ``UNSET``
      (the default) leaves it.
    - ``variables``: merged into the workflow variables, key by key.
    - ``unset_variables``: names removed from the variables (absent names are ignored).
    - ``context``: merged into the execution context, key by key.
    - ``nodes``: node id -> new ``NodeStatus``, applied in the mapping's order.
    - ``error``: a failure record: a mapping with ``type`` and ``message`` (strings)
      and optional JSON ``details``, or an exception (its type, message and
      traceback are recorded). It is attached to every node this update fails.
    - ``metrics``: node id -> figures the engine measured: ``duration`` and
      ``cpu_time`` in seconds, ``peak_memory`` in bytes.
    """

    status: ExecutionStatus | str | None = None
    current_node: str | _Unset | None = UNSET
    variables: Mapping[str, JSONValue] | None = None
    unset_variables: Iterable[str] | None = None
    context: Mapping[str, JSONValue] | None = None
    nodes: Mapping[str, NodeStatus | str] | None = None
    error: Mapping[str, Any] | BaseException | None = None
    metrics: Mapping[str, Mapping[str, float]] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HistoryOptions:
    """Filters for ``StateManager.get_history``; every one is optional.

    - ``since`` / ``until``: event time, ``since <= timestamp < until`` (aware datetimes).
    - ``types``: only events of these types.
    - ``node_id``: only events about this node.
    - ``after_version``: only events of versions greater than this one.
    - ``limit``: at most this many events (the oldest matching ones).

    Events always come oldest first, in the order they were recorded.
    """

    since: datetime | None = None
    until: datetime | None = None
    types: Iterable[EventType | str] | None = None
    node_id: str | None = None
    after_version: int | None = None
    limit: int | None = None


class HistorySummary(NamedTuple):
    """Figures about a whole execution, whatever the filters of the query were.

    ``duration`` runs from creation to the latest update; ``node_count`` is the
    number of nodes in the current state; ``error_count`` the number of error
    events ever recorded.
    """

    duration: timedelta
    node_count: int
    error_count: int


class ExecutionHistory(NamedTuple):
    """The events of one execution that matched a query, and its summary."""

    execution_id: str
    events: list[StateEvent]
    summary: HistorySummary


def _exception_to_error(exc: BaseException) -> dict[str, Any]:
    """The error record of an exception: its type, message and traceback.

    Called by the Rust core when ``StateUpdate.error`` is an exception.
    """
    exc_type = type(exc)
    type_name = (
        exc_type.__qualname__
        if exc_type.__module__ == "builtins"
        else f"{exc_type.__module__}.{exc_type.__qualname__}"
    )
    return {
        "type": type_name,
        "message": str(exc),
        "details": {"traceback": "".join(traceback.format_exception(exc))},
    }
