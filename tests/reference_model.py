"""A pure-Python reference implementation of the wfstate in-memory semantics.

``ReferenceStateManager`` implements docs/semantics.md a second time, as plainly as
possible: the property tests (tests/test_model_property.py) drive it and the Rust-backed
``wfstate.StateManager`` side by side and demand the same versions, states, events and
errors; the benchmarks use it as the pure-Python baseline. It keeps every version (no
event ring, so ``HistoryEvictedError`` never happens) and serialises calls with one
``threading.Lock``.

It must never call into the Rust core (``wfstate._core``) or reuse its helpers: an
independent second implementation is its whole point. Only the public value types
(statuses, ``StateUpdate``, ``HistoryOptions``) and the error classes are shared.

States share their unchanged dicts with the previous version (copy-on-write); stored
JSON is normalised into fresh containers on the way in and never mutated afterwards,
and every accessor that hands out a dict returns a fresh copy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final, NamedTuple, Self, TypeAlias

from wfstate._model import (
    UNSET,
    EventType,
    ExecutionStatus,
    HistoryOptions,
    HistorySummary,
    NodeStatus,
    StateUpdate,
    _exception_to_error,
    _Unset,
)
from wfstate.errors import (
    AlreadyExistsError,
    ClosedError,
    ConflictError,
    InvalidTransitionError,
    NotFoundError,
    ValidationError,
)

__all__ = [
    "EXECUTION_TRANSITIONS",
    "NODE_TRANSITIONS",
    "RefEvent",
    "RefExecutionHistory",
    "RefNodeState",
    "RefUpdateFn",
    "RefWorkflowState",
    "ReferenceStateManager",
]

#: A normalised JSON value: what the store keeps (tuples already turned into lists).
Json: TypeAlias = bool | int | float | str | list["Json"] | dict[str, "Json"] | None

MAX_ID_LENGTH: Final = 255
MAX_JSON_DEPTH: Final = 64
MIN_INT: Final = -(2**63)
MAX_INT: Final = 2**64 - 1

_S = ExecutionStatus
_N = NodeStatus

#: Execution status -> the statuses it may move to (docs/semantics.md, "Transition tables").
EXECUTION_TRANSITIONS: Final[Mapping[ExecutionStatus, frozenset[ExecutionStatus]]] = {
    _S.RUNNING: frozenset({_S.SUSPENDED, _S.COMPLETED, _S.FAILED, _S.CANCELLED}),
    _S.SUSPENDED: frozenset({_S.RUNNING, _S.FAILED, _S.CANCELLED}),
    _S.FAILED: frozenset({_S.RUNNING}),
    _S.COMPLETED: frozenset(),
    _S.CANCELLED: frozenset(),
}

#: Node status (``None``: the node is absent) -> the statuses it may move to.
NODE_TRANSITIONS: Final[Mapping[NodeStatus | None, frozenset[NodeStatus]]] = {
    None: frozenset({_N.PENDING, _N.RUNNING, _N.SKIPPED}),
    _N.PENDING: frozenset({_N.RUNNING, _N.SKIPPED}),
    _N.RUNNING: frozenset({_N.COMPLETED, _N.FAILED}),
    _N.FAILED: frozenset({_N.RUNNING, _N.SKIPPED}),
    _N.COMPLETED: frozenset(),
    _N.SKIPPED: frozenset(),
}

_NODE_EVENT: Final[Mapping[NodeStatus, EventType]] = {
    _N.PENDING: EventType.NODE_PENDING,
    _N.RUNNING: EventType.NODE_START,
    _N.COMPLETED: EventType.NODE_COMPLETE,
    _N.FAILED: EventType.NODE_FAILED,
    _N.SKIPPED: EventType.NODE_SKIPPED,
}

_UPDATE_FIELDS: Final = frozenset(
    {
        "status",
        "current_node",
        "variables",
        "unset_variables",
        "context",
        "nodes",
        "error",
        "metrics",
    }
)
_ERROR_KEYS: Final = frozenset({"type", "message", "details"})
_METRIC_NAMES: Final = frozenset({"duration", "cpu_time", "peak_memory"})


# -- values --------------------------------------------------------------------------


def _copy_json(value: Json) -> Json:
    """A deep copy of a normalised JSON value (scalars are immutable and shared)."""
    if type(value) is dict:
        return {key: _copy_json(item) for key, item in value.items()}
    if type(value) is list:
        return [_copy_json(item) for item in value]
    return value


def _copy_object(value: dict[str, Json]) -> dict[str, Json]:
    return {key: _copy_json(item) for key, item in value.items()}


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


@dataclass(frozen=True, slots=True)
class RefNodeState:
    """The state of one node, like ``wfstate.NodeState``; ``error`` is a fresh copy."""

    status: NodeStatus
    attempts: int
    started_at: datetime | None
    finished_at: datetime | None
    stored_error: dict[str, Json] | None = field(repr=False)

    @property
    def error(self) -> dict[str, Json] | None:
        return None if self.stored_error is None else _copy_object(self.stored_error)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status.value,
            "attempts": self.attempts,
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class RefWorkflowState:
    """One version of an execution, like ``wfstate.WorkflowState``.

    ``nodes``, ``variables`` and ``context`` return fresh copies; the ``stored_*``
    fields are the store's own (shared, never mutated) dicts.
    """

    execution_id: str
    workflow_id: str
    status: ExecutionStatus
    current_node: str | None
    stored_nodes: dict[str, RefNodeState] = field(repr=False)
    stored_variables: dict[str, Json] = field(repr=False)
    stored_context: dict[str, Json] = field(repr=False)
    version: int
    created_at: datetime
    updated_at: datetime

    @property
    def nodes(self) -> dict[str, RefNodeState]:
        return dict(self.stored_nodes)

    @property
    def variables(self) -> dict[str, Json]:
        return _copy_object(self.stored_variables)

    @property
    def context(self) -> dict[str, Json]:
        return _copy_object(self.stored_context)

    def to_dict(self) -> dict[str, Any]:
        return {
            "execution_id": self.execution_id,
            "workflow_id": self.workflow_id,
            "status": self.status.value,
            "current_node": self.current_node,
            "nodes": {node_id: node.to_dict() for node_id, node in self.stored_nodes.items()},
            "variables": self.variables,
            "context": self.context,
            "version": self.version,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class RefEvent:
    """One recorded change, like ``wfstate.StateEvent``; ``data`` is a fresh copy."""

    seq: int
    execution_id: str
    version: int
    timestamp: datetime
    type: EventType
    node_id: str | None
    actor: str | None
    stored_data: dict[str, Json] = field(repr=False)

    @property
    def data(self) -> dict[str, Json]:
        return _copy_object(self.stored_data)

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "execution_id": self.execution_id,
            "version": self.version,
            "timestamp": self.timestamp.isoformat(),
            "type": self.type.value,
            "node_id": self.node_id,
            "actor": self.actor,
            "data": self.data,
        }


class RefExecutionHistory(NamedTuple):
    """Like ``wfstate.ExecutionHistory``, holding ``RefEvent``s."""

    execution_id: str
    events: list[RefEvent]
    summary: HistorySummary


#: What ``ReferenceStateManager.transact`` calls.
RefUpdateFn = Callable[[RefWorkflowState], "StateUpdate | Mapping[str, Any] | None"]


# -- validation ----------------------------------------------------------------------


def _text(value: str, name: str) -> str:
    """``value`` as a plain ``str``; a lone surrogate cannot be stored as UTF-8 JSON."""
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ValidationError(f"{name} is not valid Unicode") from None
    return str.__str__(value)


def _check_id(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{name} must be a str, not {type(value).__name__}")
    if not 1 <= len(value) <= MAX_ID_LENGTH:
        raise ValidationError(f"{name} must be 1 to {MAX_ID_LENGTH} characters long")
    return _text(value, name)


def _check_optional_id(value: object, name: str) -> str | None:
    return None if value is None else _check_id(value, name)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _to_json(value: object, depth: int) -> Json:
    """``value`` normalised to plain JSON, in fresh containers.

    ``depth`` is the number of containers around ``value`` inside the value being
    checked: a variable's value itself is at depth 0, so a value may nest at most
    ``MAX_JSON_DEPTH`` lists and dicts. Subclasses (an ``IntEnum``, a ``StrEnum``)
    become their base value; ``bool`` is tested before ``int`` (``True`` is an int).
    """
    if value is None:
        return None
    if isinstance(value, str):
        return _text(value, "a str")
    if isinstance(value, bool):
        return value is True
    if isinstance(value, int):
        number = int.__int__(value)
        if not MIN_INT <= number <= MAX_INT:
            raise ValidationError(f"the int {number} does not fit in 64 bits")
        return number
    if isinstance(value, float):
        real = float.__float__(value)
        if not math.isfinite(real):
            raise ValidationError(f"{real} is not a finite number")
        return real
    if isinstance(value, dict | list | tuple):
        if depth >= MAX_JSON_DEPTH:
            raise ValidationError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(value, dict):
            result: dict[str, Json] = {}
            for key, item in value.items():
                if not isinstance(key, str):
                    raise ValidationError(f"JSON keys must be str, not {type(key).__name__}")
                result[_text(key, "a key")] = _to_json(item, depth + 1)
            return result
        return [_to_json(item, depth + 1) for item in value]
    raise ValidationError(f"a {type(value).__name__} is not a JSON value")


def _json_object(value: object, name: str) -> dict[str, Json]:
    """A mapping of names to JSON values (variables, context), normalised."""
    if not isinstance(value, Mapping):
        raise ValidationError(f"{name} must be a mapping, not {type(value).__name__}")
    result: dict[str, Json] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise ValidationError(f"{name} keys must be str, not {type(key).__name__}")
        result[_text(key, "a key")] = _to_json(item, 0)
    return result


def _execution_status(value: object) -> ExecutionStatus:
    if isinstance(value, str):
        try:
            return ExecutionStatus(str.__str__(value))
        except ValueError:
            pass
    raise ValidationError(f"{value!r} is not an execution status")


def _node_status(value: object) -> NodeStatus:
    if isinstance(value, str):
        try:
            return NodeStatus(str.__str__(value))
        except ValueError:
            pass
    raise ValidationError(f"{value!r} is not a node status")


def _event_type(value: object) -> EventType:
    if isinstance(value, str):
        try:
            return EventType(str.__str__(value))
        except ValueError:
            pass
    raise ValidationError(f"{value!r} is not an event type")


def _error_record(value: object) -> dict[str, Json]:
    """A failure record ``{"type", "message", "details"}`` from a mapping or an exception."""
    if isinstance(value, BaseException):
        value = _exception_to_error(value)
    if not isinstance(value, Mapping):
        raise ValidationError(f"error must be a mapping or an exception, not {value!r}")
    for key in value:
        if key not in _ERROR_KEYS:
            raise ValidationError(f"error has an unknown key {key!r}")
    error_type = value.get("type")
    message = value.get("message")
    if not isinstance(error_type, str) or not isinstance(message, str):
        raise ValidationError("error needs a str 'type' and a str 'message'")
    return {
        "type": _text(error_type, "error type"),
        "message": _text(message, "error message"),
        "details": _to_json(value.get("details"), 0),
    }


def _metrics(value: object) -> dict[str, dict[str, Json]]:
    if not isinstance(value, Mapping):
        raise ValidationError(f"metrics must be a mapping, not {type(value).__name__}")
    result: dict[str, dict[str, Json]] = {}
    for node_id, figures in value.items():
        clean_id = _check_id(node_id, "a node id in metrics")
        if not isinstance(figures, Mapping):
            raise ValidationError(f"metrics of {clean_id!r} must be a mapping")
        clean: dict[str, Json] = {}
        for name, figure in figures.items():
            if name not in _METRIC_NAMES:
                raise ValidationError(f"unknown metric {name!r}")
            if not isinstance(figure, int | float) or isinstance(figure, bool):
                raise ValidationError(f"metric {name!r} must be a number, not {figure!r}")
            number = _to_json(figure, 0)
            assert isinstance(number, int | float)
            if number < 0:
                raise ValidationError(f"metric {name!r} must not be negative")
            clean[str.__str__(name)] = number
        result[clean_id] = clean
    return result


# -- sizes ---------------------------------------------------------------------------


def _float_size(number: float) -> int:
    """The length of ``number`` as serde_json writes it (with the zmij algorithm).

    Python's ``repr`` and zmij pick the same shortest round-trip digits but place
    them differently: zmij writes ``0.00001``, ``1e-7`` and ``1e+16`` where Python
    writes ``1e-05``, ``1e-07`` and ``1e+16``. Both are compact JSON; the store keeps
    serde_json's form, so its length is the measure.
    """
    if number == 0.0:
        return 4 if math.copysign(1.0, number) < 0 else 3  # "-0.0" / "0.0"
    sign = 1 if number < 0 else 0
    mantissa, _, exponent_text = repr(abs(number)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = (whole + fraction).lstrip("0")
    exponent = int(exponent_text or 0) - len(fraction)
    significant = digits.rstrip("0")
    exponent += len(digits) - len(significant)
    length = len(significant)
    lead = length + exponent - 1  # the power of ten of the leading digit
    if -5 <= lead <= 15:
        if exponent >= 0:  # 1234e7 -> 12340000000.0
            return sign + lead + 3
        if lead >= 0:  # 1234e-2 -> 12.34
            return sign + length + 1
        return sign + length + 1 - lead  # 1234e-6 -> 0.001234
    # 1e+30, 1.234e+33, 1e-7: "e", the exponent's sign, its digits without padding
    return sign + length + (length > 1) + 2 + len(str(abs(lead)))


def _str_size(text: str) -> int:
    """The length of ``text`` as a UTF-8 JSON string literal, quotes and escapes included."""
    return len(json.dumps(text, ensure_ascii=False).encode())


def _json_size(value: Json) -> int:
    """The length in bytes of ``value`` as compact UTF-8 JSON (no spaces)."""
    if value is None or value is True:
        return 4
    if value is False:
        return 5
    if isinstance(value, str):
        return _str_size(value)
    if isinstance(value, int):
        return len(str(value))
    if isinstance(value, float):
        return _float_size(value)
    if isinstance(value, list):
        return 1 + sum(_json_size(item) + 1 for item in value) + (not value)
    return (
        1
        + sum(_str_size(key) + 1 + _json_size(item) + 1 for key, item in value.items())
        + (not value)
    )


# -- updates -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Update:
    """A validated update; ``None`` (``UNSET`` for current_node) means not given."""

    status: ExecutionStatus | None
    nodes: dict[str, NodeStatus] | None
    error: dict[str, Json] | None
    metrics: dict[str, dict[str, Json]] | None
    current_node: str | _Unset | None
    variables: dict[str, Json] | None
    unset_variables: list[str] | None
    context: dict[str, Json] | None

    def is_empty(self) -> bool:
        return (
            self.status is None
            and self.nodes is None
            and self.error is None
            and self.metrics is None
            and isinstance(self.current_node, _Unset)
            and self.variables is None
            and self.unset_variables is None
            and self.context is None
        )

    def payload_size(self) -> int:
        """The compact JSON size of the data the update carries, part by part."""
        parts: tuple[Json, ...] = (self.variables, self.context, self.error)
        size = sum(_json_size(part) for part in parts if part is not None)
        if self.metrics is not None:
            size += _json_size(dict(self.metrics))
        return size


def _unset_names(value: object) -> list[str]:
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        raise ValidationError("unset_variables must be a collection of names")
    names = []
    for name in value:
        if not isinstance(name, str):
            raise ValidationError(f"unset_variables holds {name!r}, which is not a str")
        names.append(_text(name, "a variable name"))
    return names


def _parse_update(update: object, max_update_bytes: int) -> _Update:
    """Check the shape of ``update`` (docs/semantics.md, check 1) and normalise it."""
    fields: dict[str, Any]
    if isinstance(update, StateUpdate):
        fields = {name: getattr(update, name) for name in _UPDATE_FIELDS}
    elif isinstance(update, dict):
        for key in update:
            if key not in _UPDATE_FIELDS:
                raise ValidationError(f"unknown update field {key!r}")
        fields = {"current_node": UNSET, **update}
    else:
        raise ValidationError(
            f"an update must be a StateUpdate or a dict, not {type(update).__name__}"
        )

    def given(name: str) -> Any:
        return fields.get(name)

    nodes: dict[str, NodeStatus] | None = None
    if (raw_nodes := given("nodes")) is not None:
        if not isinstance(raw_nodes, Mapping):
            raise ValidationError(f"nodes must be a mapping, not {type(raw_nodes).__name__}")
        nodes = {
            _check_id(node_id, "a node id"): _node_status(node_status)
            for node_id, node_status in raw_nodes.items()
        }
    raw_current = fields["current_node"]
    parsed = _Update(
        status=None if (raw := given("status")) is None else _execution_status(raw),
        nodes=nodes,
        error=None if (raw := given("error")) is None else _error_record(raw),
        metrics=None if (raw := given("metrics")) is None else _metrics(raw),
        current_node=(
            raw_current
            if isinstance(raw_current, _Unset)
            else _check_optional_id(raw_current, "current_node")
        ),
        variables=None if (raw := given("variables")) is None else _json_object(raw, "variables"),
        unset_variables=None if (raw := given("unset_variables")) is None else _unset_names(raw),
        context=None if (raw := given("context")) is None else _json_object(raw, "context"),
    )
    # An empty nodes or metrics map changes nothing and records nothing: not given.
    if parsed.nodes is not None and not parsed.nodes:
        parsed = dataclasses.replace(parsed, nodes=None)
    if parsed.metrics is not None and not parsed.metrics:
        parsed = dataclasses.replace(parsed, metrics=None)
    if parsed.is_empty():
        raise ValidationError("an update must set at least one field")
    if (
        parsed.variables is not None
        and parsed.unset_variables is not None
        and not parsed.variables.keys().isdisjoint(parsed.unset_variables)
    ):
        raise ValidationError("a variable cannot be both set and unset in one update")
    size = parsed.payload_size()
    if size > max_update_bytes:
        raise ValidationError(f"the update carries {size} bytes of JSON, over {max_update_bytes}")
    return parsed


# -- applying an update --------------------------------------------------------------

#: An event before it gets its seq: (type, node_id, data).
_Change: TypeAlias = tuple[EventType, str | None, dict[str, Json]]


def _apply(
    state: RefWorkflowState, update: _Update, now: datetime
) -> tuple[RefWorkflowState, list[_Change]]:
    """The next version of ``state`` and its events; raises InvalidTransitionError."""
    old_status = state.status
    if not EXECUTION_TRANSITIONS[old_status] or (
        old_status is _S.FAILED and update.status is not _S.RUNNING
    ):
        raise InvalidTransitionError(
            f"execution {state.execution_id!r} is {old_status.value} and accepts no update"
        )
    changes: list[_Change] = []

    status = old_status
    if update.status is not None:
        if update.status not in EXECUTION_TRANSITIONS[old_status]:
            raise InvalidTransitionError(
                f"execution cannot go from {old_status.value} to {update.status.value}"
            )
        status = update.status
        changes.append(
            (EventType.STATUS_CHANGE, None, {"from": old_status.value, "to": status.value})
        )

    metrics = update.metrics or {}
    nodes = state.stored_nodes
    failed_nodes: list[str] = []
    if update.nodes is not None:
        nodes = dict(nodes)
        for node_id, new_status in update.nodes.items():
            node = nodes.get(node_id)
            node_status = None if node is None else node.status
            if new_status not in NODE_TRANSITIONS[node_status]:
                shown = "absent" if node_status is None else node_status.value
                raise InvalidTransitionError(
                    f"node {node_id!r} cannot go from {shown} to {new_status.value}"
                )
            data: dict[str, Json] = {
                "from": None if new_status is _N.PENDING else (node_status or _N.PENDING).value,
                "to": new_status.value,
            }
            if new_status is _N.PENDING:
                new_node = RefNodeState(_N.PENDING, 0, None, None, None)
            elif new_status is _N.RUNNING:
                attempts = (0 if node is None else node.attempts) + 1
                new_node = RefNodeState(_N.RUNNING, attempts, now, None, None)
                data["attempt"] = attempts
            elif new_status is _N.SKIPPED:
                new_node = (
                    RefNodeState(_N.SKIPPED, 0, None, now, None)
                    if node is None
                    else RefNodeState(
                        _N.SKIPPED, node.attempts, node.started_at, now, node.stored_error
                    )
                )
            else:  # completed or failed: the node is running
                assert node is not None
                assert node.started_at is not None
                is_failed = new_status is _N.FAILED
                new_node = RefNodeState(
                    new_status,
                    node.attempts,
                    node.started_at,
                    now,
                    update.error if is_failed else node.stored_error,
                )
                reported = metrics.get(node_id, {}).get("duration")
                data["attempt"] = node.attempts
                data["duration"] = (
                    (now - node.started_at).total_seconds() if reported is None else reported
                )
                if is_failed:
                    failed_nodes.append(node_id)
            if node_id in metrics:
                data["metrics"] = metrics[node_id]
            nodes[node_id] = new_node
            changes.append((_NODE_EVENT[new_status], node_id, data))

    if update.error is not None:
        error_node = failed_nodes[0] if len(failed_nodes) == 1 else None
        changes.append((EventType.ERROR, error_node, update.error))

    moved = update.nodes or {}
    changes.extend(
        (EventType.NODE_METRICS, node_id, {"metrics": figures})
        for node_id, figures in metrics.items()
        if node_id not in moved
    )

    current_node = state.current_node
    if not isinstance(update.current_node, _Unset):
        changes.append(
            (
                EventType.CURRENT_NODE_CHANGED,
                None,
                {"from": current_node, "to": update.current_node},
            )
        )
        current_node = update.current_node

    variables = state.stored_variables
    if update.variables is not None or update.unset_variables is not None:
        variables = dict(variables)
        set_variables = update.variables or {}
        variables.update(set_variables)
        removed: list[Json] = []
        for name in update.unset_variables or ():
            if name in variables:
                del variables[name]
                removed.append(name)
        changes.append(
            (EventType.VARIABLES_CHANGED, None, {"set": set_variables, "unset": removed})
        )

    context = state.stored_context
    if update.context is not None:
        context = {**context, **update.context}
        changes.append((EventType.CONTEXT_CHANGED, None, {"set": update.context}))

    new_state = RefWorkflowState(
        execution_id=state.execution_id,
        workflow_id=state.workflow_id,
        status=status,
        current_node=current_node,
        stored_nodes=nodes,
        stored_variables=variables,
        stored_context=context,
        version=state.version + 1,
        created_at=state.created_at,
        updated_at=now,
    )
    return new_state, changes


# -- the manager ---------------------------------------------------------------------


@dataclass(slots=True)
class _Execution:
    """Everything held about one execution: every version and every event."""

    states: list[RefWorkflowState]
    events: list[RefEvent]
    error_count: int = 0


def _uuid7() -> str:
    """A UUIDv7 string: 48 bits of Unix milliseconds, then random bits."""
    millis = time.time_ns() // 1_000_000
    random_bits = int.from_bytes(os.urandom(10), "big")
    value = (millis & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76 | ((random_bits >> 62) & 0xFFF) << 64
    value |= 0b10 << 62 | (random_bits & ((1 << 62) - 1))
    return str(uuid.UUID(int=value))


def _to_utc(moment: object, name: str) -> datetime:
    """``moment`` as an aware UTC datetime, checked the way ``StateManager`` checks it."""
    if not isinstance(moment, datetime):
        raise ValidationError(f"{name} must be a datetime, not {type(moment).__name__}")
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValidationError(f"{name} must be timezone-aware (use datetime.now(UTC))")
    return moment.astimezone(UTC)


def _enum_values(values: object, name: str) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Iterable):
        raise ValidationError(f"{name} must be a collection of values")
    result = []
    for value in values:
        if not isinstance(value, str):
            raise ValidationError(f"{name} holds {value!r}, which is not a status or type")
        result.append(str(value))
    return result


class ReferenceStateManager:
    """The plain-Python twin of ``wfstate.StateManager``: same methods, events, errors.

    Every call checks its whole input first (``ValidationError``), then that the
    manager is open (``ClosedError``), then the existence, version and transition
    checks of docs/semantics.md in that order. Nothing is evicted, so every past
    version and event stays readable.

    Example::

        with ReferenceStateManager() as sm:
            sm.create_execution("order-42", workflow_id="checkout")
            sm.update_state("order-42", {"nodes": {"charge": "running"}})
    """

    def __init__(self, *, max_update_bytes: int = 1_048_576) -> None:
        if not _is_int(max_update_bytes) or max_update_bytes < 1:
            raise ValidationError(
                f"max_update_bytes must be a positive int, not {max_update_bytes!r}"
            )
        self._max_update_bytes = max_update_bytes
        self._lock = threading.Lock()
        self._executions: dict[str, _Execution] = {}  # in creation order
        self._next_seq = 1  # like the core's ring: the first event ever recorded is seq 1
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------

    def close(self) -> None:
        """Close the manager; later calls raise ``ClosedError``. Idempotent."""
        self._closed = True

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._closed

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._executions)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the state manager is closed")

    def _execution(self, execution_id: str) -> _Execution:
        self._check_open()
        execution = self._executions.get(execution_id)
        if execution is None:
            raise NotFoundError(f"no execution {execution_id!r}")
        return execution

    def _record(
        self,
        execution: _Execution,
        state: RefWorkflowState,
        changes: list[_Change],
        actor: str | None,
    ) -> None:
        """Make ``state`` current and append its events, numbered from the global seq."""
        seq = self._next_seq
        for event_type, node_id, data in changes:
            execution.events.append(
                RefEvent(
                    seq=seq,
                    execution_id=state.execution_id,
                    version=state.version,
                    timestamp=state.updated_at,
                    type=event_type,
                    node_id=node_id,
                    actor=actor,
                    stored_data=data,
                )
            )
            if event_type is EventType.ERROR:
                execution.error_count += 1
            seq += 1
        self._next_seq = seq
        execution.states.append(state)

    # -- writes ------------------------------------------------------------------

    def create_execution(
        self,
        execution_id: str | None = None,
        *,
        workflow_id: str,
        variables: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        actor: str | None = None,
    ) -> RefWorkflowState:
        """Create an execution at version 1, status running; return its state."""
        new_id = None if execution_id is None else _check_id(execution_id, "execution_id")
        workflow_id = _check_id(workflow_id, "workflow_id")
        clean_variables = None if variables is None else _json_object(variables, "variables")
        clean_context = None if context is None else _json_object(context, "context")
        size = sum(
            _json_size(part) for part in (clean_variables, clean_context) if part is not None
        )
        if size > self._max_update_bytes:
            raise ValidationError(
                f"the creation carries {size} bytes of JSON, over {self._max_update_bytes}"
            )
        actor = _check_optional_id(actor, "actor")
        with self._lock:
            self._check_open()
            if new_id is None:
                new_id = _uuid7()
            elif new_id in self._executions:
                raise AlreadyExistsError(f"execution {new_id!r} exists already")
            now = datetime.now(UTC)
            state = RefWorkflowState(
                execution_id=new_id,
                workflow_id=workflow_id,
                status=_S.RUNNING,
                current_node=None,
                stored_nodes={},
                stored_variables=clean_variables or {},
                stored_context=clean_context or {},
                version=1,
                created_at=now,
                updated_at=now,
            )
            data: dict[str, Json] = {
                "workflow_id": workflow_id,
                "variables": state.stored_variables,
                "context": state.stored_context,
            }
            execution = _Execution(states=[], events=[])
            self._executions[new_id] = execution
            self._record(execution, state, [(EventType.EXECUTION_CREATED, None, data)], actor)
            return state

    def update_state(
        self,
        execution_id: str,
        update: StateUpdate | Mapping[str, Any],
        *,
        expected_version: int | None = None,
        actor: str | None = None,
    ) -> int:
        """Apply one update atomically and return the new version."""
        # 1. the shape of the input
        execution_id = _check_id(execution_id, "execution_id")
        parsed = _parse_update(update, self._max_update_bytes)
        if expected_version is not None and (not _is_int(expected_version) or expected_version < 1):
            raise ValidationError(
                f"expected_version must be an int of at least 1, not {expected_version!r}"
            )
        actor = _check_optional_id(actor, "actor")
        with self._lock:
            # 2. existence
            execution = self._execution(execution_id)
            current = execution.states[-1]
            # 3. the version
            if expected_version is not None and expected_version != current.version:
                raise ConflictError(execution_id, expected_version, current.version)
            # 4. transitions: computing the next state checks them
            now = datetime.now(UTC)
            if now < current.updated_at:  # a clock step back is clamped
                now = current.updated_at
            new_state, changes = _apply(current, parsed, now)
            self._record(execution, new_state, changes, actor)
            return new_state.version

    def transact(
        self,
        execution_id: str,
        fn: RefUpdateFn,
        *,
        retries: int = 10,
        actor: str | None = None,
    ) -> int:
        """Read-modify-write with optimistic concurrency; return the resulting version.

        ``fn`` runs outside the lock, so it may itself call this manager.
        """
        if not _is_int(retries) or retries < 0:
            raise ValidationError(f"retries must be a non-negative int, not {retries!r}")
        attempt = 0
        while True:
            state = self.get_state(execution_id)
            update = fn(state)
            if update is None:
                return state.version
            try:
                return self.update_state(
                    execution_id, update, expected_version=state.version, actor=actor
                )
            except ConflictError:
                attempt += 1
                if attempt > retries:
                    raise

    # -- reads -------------------------------------------------------------------

    def get_state(self, execution_id: str, *, version: int | None = None) -> RefWorkflowState:
        """The current state, or the state as it was right after ``version``."""
        execution_id = _check_id(execution_id, "execution_id")
        if version is not None and (not _is_int(version) or version < 1):
            raise ValidationError(f"version must be an int of at least 1, not {version!r}")
        with self._lock:
            states = self._execution(execution_id).states
            if version is None:
                return states[-1]
            if version > len(states):
                raise NotFoundError(
                    f"execution {execution_id!r} has no version {version}: "
                    f"its latest is {len(states)}"
                )
            return states[version - 1]

    def get_history(
        self, execution_id: str, options: HistoryOptions | None = None
    ) -> RefExecutionHistory:
        """The events of an execution that match ``options``, oldest first, and a summary."""
        if options is None:
            options = HistoryOptions()
        elif not isinstance(options, HistoryOptions):
            raise ValidationError(f"options must be a HistoryOptions, not {type(options).__name__}")
        since = None if options.since is None else _to_utc(options.since, "since")
        until = None if options.until is None else _to_utc(options.until, "until")
        types = (
            None
            if options.types is None
            else {_event_type(name) for name in _enum_values(options.types, "types")}
        )
        execution_id = _check_id(execution_id, "execution_id")
        node_id = _check_optional_id(options.node_id, "node_id")
        after_version = options.after_version
        if after_version is not None and (not _is_int(after_version) or after_version < 0):
            raise ValidationError(
                f"after_version must be a non-negative int, not {after_version!r}"
            )
        limit = options.limit
        if limit is not None and (not _is_int(limit) or limit < 0):
            raise ValidationError(f"limit must be a non-negative int, not {limit!r}")
        with self._lock:
            execution = self._execution(execution_id)
            matched: list[RefEvent] = []
            for event in execution.events:
                if limit is not None and len(matched) >= limit:
                    break
                if (
                    (after_version is None or event.version > after_version)
                    and (since is None or event.timestamp >= since)
                    and (until is None or event.timestamp < until)
                    and (types is None or event.type in types)
                    and (node_id is None or event.node_id == node_id)
                ):
                    matched.append(event)
            state = execution.states[-1]
            summary = HistorySummary(
                duration=state.updated_at - state.created_at,
                node_count=len(state.stored_nodes),
                error_count=execution.error_count,
            )
        return RefExecutionHistory(execution_id=execution_id, events=matched, summary=summary)

    def list_executions(
        self,
        *,
        status: ExecutionStatus | str | Iterable[ExecutionStatus | str] | None = None,
        workflow_id: str | None = None,
        limit: int = 100,
    ) -> list[RefWorkflowState]:
        """Executions in creation order, filtered by status (one or several) and workflow."""
        names: list[str] | None
        if status is None:
            names = None
        elif isinstance(status, str):
            names = [status]
        else:
            names = _enum_values(status, "status")
        statuses = None if names is None else {_execution_status(name) for name in names}
        workflow_id = _check_optional_id(workflow_id, "workflow_id")
        if not _is_int(limit) or limit < 0:
            raise ValidationError(f"limit must be a non-negative int, not {limit!r}")
        result: list[RefWorkflowState] = []
        with self._lock:
            self._check_open()
            for execution in self._executions.values():
                if len(result) >= limit:
                    break
                state = execution.states[-1]
                if (statuses is None or state.status in statuses) and (
                    workflow_id is None or state.workflow_id == workflow_id
                ):
                    result.append(state)
        return result
