"""wfstate: the state store that workflow engines embed.

A Rust core holds every execution's current state in a concurrent map with
versioned compare-and-swap, and its history in a bounded event ring; this package
is the typed Python API over it. Start with :class:`StateManager`.
"""

from __future__ import annotations

from wfstate import _core, _model
from wfstate._core import EventCursor, NodeState, StateEvent, VersionRecord, WorkflowState
from wfstate._lease import Heartbeat, Lease
from wfstate._model import (
    UNSET,
    EventType,
    ExecutionHistory,
    ExecutionStatus,
    HistoryOptions,
    HistorySummary,
    JSONValue,
    NodeStatus,
    StateUpdate,
)
from wfstate.errors import (
    AlreadyExistsError,
    BackpressureError,
    ClosedError,
    ConflictError,
    HistoryEvictedError,
    InvalidTransitionError,
    LeaseHeldError,
    LeaseLostError,
    NotFoundError,
    StoreUnavailableError,
    ValidationError,
    WfstateError,
)
from wfstate.manager import Durability, ManagerStats, SnapshotPolicy, StateManager, UpdateFn

_core.bind_types(ExecutionStatus, NodeStatus, EventType, StateUpdate, _model._exception_to_error)

__version__ = "0.1.0"

__all__ = [
    "UNSET",
    "AlreadyExistsError",
    "BackpressureError",
    "ClosedError",
    "ConflictError",
    "Durability",
    "EventCursor",
    "EventType",
    "ExecutionHistory",
    "ExecutionStatus",
    "Heartbeat",
    "HistoryEvictedError",
    "HistoryOptions",
    "HistorySummary",
    "InvalidTransitionError",
    "JSONValue",
    "Lease",
    "LeaseHeldError",
    "LeaseLostError",
    "ManagerStats",
    "NodeState",
    "NodeStatus",
    "NotFoundError",
    "SnapshotPolicy",
    "StateEvent",
    "StateManager",
    "StateUpdate",
    "StoreUnavailableError",
    "UpdateFn",
    "ValidationError",
    "VersionRecord",
    "WfstateError",
    "WorkflowState",
    "__version__",
]
