"""The Rust core and the pure-Python reference model agree on every observable result.

A hypothesis state machine sends the same random operations to a ``wfstate.StateManager``
and to a ``ReferenceStateManager`` (tests/reference_model.py): creations with fixed,
duplicate, invalid and generated ids; updates as ``StateUpdate`` objects and as dicts,
with legal and illegal transitions, nested and invalid JSON, right and stale
``expected_version``; ``transact`` with forced conflicts; reads of past versions,
filtered histories and execution lists; and ``close``. After every step both sides must
have returned the same value or raised the same error class, and every execution's
state and history must be the same.

What cannot be equal is compared by shape: timestamps (present or not, aware, never
going backwards), measured ``duration``s (a non-negative number) and ``seq`` (the
order of events, not the numbers). Generated execution ids are paired up. This module
never asserts anything about time taken.
"""

from __future__ import annotations

import enum
import functools
import json
import math
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any, TypeAlias

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from reference_model import (
    EXECUTION_TRANSITIONS,
    NODE_TRANSITIONS,
    ReferenceStateManager,
    RefWorkflowState,
)
from wfstate import (
    UNSET,
    ClosedError,
    ConflictError,
    EventType,
    ExecutionStatus,
    HistoryOptions,
    NodeStatus,
    StateManager,
    StateUpdate,
)

#: Small enough that generated payloads cross it in both directions.
MAX_UPDATE_BYTES = 400
#: Far more events than one run records, so nothing is ever evicted.
RING_CAPACITY = 1 << 20

EXECUTION_IDS = ["e1", "e2", "é3", "x" * 255]
BAD_IDS: list[Any] = ["", "x" * 256, 7, b"e1"]
WORKFLOW_IDS: list[Any] = ["wf-a", "wf-b", "w" * 255]
NODE_IDS = ["a", "b", "ç"]
BAD_NODE_IDS: list[Any] = ["", "n" * 256, 3]
ACTORS: list[Any] = [None, "alice", "b" * 255]
BAD_ACTORS: list[Any] = ["", "b" * 256, 1]
VARIABLE_NAMES = ["x", "y", "", "ключ"]

Side: TypeAlias = str  # "rust" or "ref"


# -- strategies ----------------------------------------------------------------------


class Colour(enum.StrEnum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 2**40


class EngineFailure(Exception):
    """An exception from user code, recorded as an update's error."""


class FnFailure(Exception):
    """Raised by a ``transact`` function: must propagate unchanged."""


_EMPTY_LEAF = object()


def nest(depth: int, kind: str, leaf: object) -> object:
    """``depth`` lists or dicts inside each other, the innermost holding ``leaf``."""
    value: object = [] if kind == "list" else {}
    if leaf is not _EMPTY_LEAF:
        value = [leaf] if kind == "list" else {"k": leaf}
    for _ in range(depth - 1):
        value = [value] if kind == "list" else {"k": value}
    return value


def big_text(length: int, char: str) -> str:
    return char * length


def mostly(
    usual: st.SearchStrategy[Any], *rare: st.SearchStrategy[Any], one_in: int = 10
) -> st.SearchStrategy[Any]:
    """``usual``, except one time in ``one_in``: one of ``rare``."""
    rare_values = st.one_of(*rare)
    return st.integers(min_value=1, max_value=one_in).flatmap(
        lambda i: rare_values if i == 1 else usual
    )


#: Long strings of one- to six-byte JSON characters, to cross ``MAX_UPDATE_BYTES``.
big_strings: st.SearchStrategy[Any] = st.builds(
    big_text,
    st.integers(min_value=20, max_value=200),
    st.sampled_from(["x", "é", "\n", '"', "\x01", "😀"]),
)

json_scalars: st.SearchStrategy[Any] = mostly(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**64 - 1),
        st.sampled_from([-(2**63), 2**63 - 1, 2**63, 2**64 - 1]),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=5),
        st.sampled_from([Colour.RED, Level.HIGH, ExecutionStatus.FAILED]),
    ),
    big_strings,
    one_in=12,
)

#: Valid JSON values, with tuples, OrderedDicts and enum members among them.
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(st.text(max_size=3), children, max_size=3),
        st.dictionaries(st.text(max_size=3), children, max_size=2).map(OrderedDict),
    ),
    max_leaves=5,
)

invalid_leaves: st.SearchStrategy[Any] = st.sampled_from(
    [
        math.nan,
        math.inf,
        -math.inf,
        2**64,
        -(2**63) - 1,
        b"bytes",
        {1, 2},
        frozenset(),
        object(),
        {1: "non-str key"},
        {("tuple",): "key"},
        complex(1, 2),
        MappingProxyType({"nested": "mapping"}),
        "\ud800",  # a lone surrogate: not encodable as UTF-8
    ]
)

#: Values nested around the 64-level limit, valid and not.
deep_values: st.SearchStrategy[Any] = st.builds(
    nest,
    st.integers(min_value=62, max_value=66),
    st.sampled_from(["list", "dict"]),
    st.sampled_from([_EMPTY_LEAF, 1, None]),
)

invalid_values: st.SearchStrategy[Any] = st.one_of(
    invalid_leaves,
    st.tuples(json_values, invalid_leaves).map(list),
    st.builds(lambda bad: {"k": [bad]}, invalid_leaves),
    deep_values,
)

#: Any value a caller may pass: usually JSON, sometimes not.
any_values = mostly(json_values, invalid_values, one_in=8)

variable_names = st.one_of(st.sampled_from(VARIABLE_NAMES), st.text(max_size=4))
valid_objects = st.dictionaries(variable_names, json_values, max_size=3)
any_objects: st.SearchStrategy[Any] = mostly(
    st.dictionaries(variable_names, any_values, max_size=3),
    st.just({1: "non-str name"}),
    st.just(["not", "a", "mapping"]),
    st.dictionaries(st.sampled_from(VARIABLE_NAMES), json_values, max_size=2).map(MappingProxyType),
)

valid_errors: st.SearchStrategy[Any] = st.one_of(
    st.fixed_dictionaries({"type": st.text(max_size=8), "message": st.text(max_size=8)}),
    st.fixed_dictionaries(
        {"type": st.just("Timeout"), "message": st.text(max_size=8), "details": json_values}
    ),
    st.sampled_from([ValueError("boom"), KeyError("missing"), EngineFailure("engine failed")]),
)
any_errors: st.SearchStrategy[Any] = st.one_of(
    valid_errors,
    st.fixed_dictionaries({"type": st.just("E"), "message": st.just("m"), "details": any_values}),
    st.sampled_from(
        [
            {"type": "E"},
            {"message": "m"},
            {"type": 1, "message": "m"},
            {"type": "E", "message": "m", "extra": 1},
            "not a record",
            42,
        ]
    ),
)

valid_figures: st.SearchStrategy[Any] = st.one_of(
    st.floats(min_value=0, max_value=1e9, allow_nan=False),
    st.integers(min_value=0, max_value=2**40),
)
invalid_figures: st.SearchStrategy[Any] = st.sampled_from(
    [-1, -0.5, math.nan, math.inf, "fast", True, None, 2**64, [1.0]]
)
metric_names = st.sampled_from(["duration", "cpu_time", "peak_memory"])


def chance(data: st.DataObject, tenths: int) -> bool:
    """True ``tenths`` times in ten."""
    return data.draw(st.integers(min_value=0, max_value=9)) < tenths


def as_member_or_value(member: enum.StrEnum) -> st.SearchStrategy[Any]:
    return st.sampled_from([member, member.value])


def draw_execution_status(data: st.DataObject, state: RefWorkflowState | None, valid: bool) -> Any:
    allowed = sorted(EXECUTION_TRANSITIONS[state.status]) if state is not None else []
    if allowed and chance(data, 7):
        # Mostly the moves that keep the execution open, so runs get deep.
        open_statuses = {ExecutionStatus.RUNNING, ExecutionStatus.SUSPENDED}
        reopening = [status for status in allowed if status in open_statuses]
        if reopening and chance(data, 6):
            allowed = reopening
        return data.draw(st.sampled_from(allowed).flatmap(as_member_or_value))
    statuses = st.sampled_from(list(ExecutionStatus)).flatmap(as_member_or_value)
    if valid:
        return data.draw(statuses)
    return data.draw(st.one_of(statuses, st.sampled_from(["bogus", "RUNNING", 3])))


def draw_nodes(data: st.DataObject, state: RefWorkflowState | None, valid: bool) -> Any:
    if chance(data, 1) and chance(data, 3):
        # An empty mapping sets the field but moves no node: a version without events.
        return {} if valid else data.draw(st.sampled_from([["a"], "a", {"a": "done"}, {"a": None}]))
    ids: list[Any] = data.draw(
        st.lists(st.sampled_from(NODE_IDS), min_size=1, max_size=3, unique=True)
    )
    if not valid and chance(data, 3):
        ids.append(data.draw(st.sampled_from(BAD_NODE_IDS)))
    nodes: dict[Any, Any] = {}
    current = {} if state is None else state.stored_nodes
    for node_id in ids:
        node = current.get(node_id)
        allowed = sorted(NODE_TRANSITIONS[None if node is None else node.status])
        if allowed and chance(data, 8):
            nodes[node_id] = data.draw(st.sampled_from(allowed).flatmap(as_member_or_value))
        elif valid or chance(data, 5):
            nodes[node_id] = data.draw(
                st.sampled_from(list(NodeStatus)).flatmap(as_member_or_value)
            )
        else:
            nodes[node_id] = data.draw(st.sampled_from(["bogus", "PENDING", 1]))
    if chance(data, 1):
        return MappingProxyType(nodes)
    return nodes


def draw_metrics(data: st.DataObject, nodes: object, valid: bool) -> Any:
    if chance(data, 1) and chance(data, 3):
        if valid:
            return {}
        return data.draw(st.sampled_from([["a"], {"a": 1}, {"a": {"gpu_time": 1.0}}, {"a": []}]))
    candidates = list(NODE_IDS)
    if isinstance(nodes, Mapping):
        # Mostly the nodes this update moves: their events carry the figures.
        candidates += 3 * [node_id for node_id in nodes if isinstance(node_id, str)]
    ids: list[Any] = data.draw(
        st.lists(st.sampled_from(candidates), min_size=1, max_size=3, unique=True)
    )
    if not valid and chance(data, 3):
        ids.append(data.draw(st.sampled_from(BAD_NODE_IDS)))
    figures = valid_figures if valid else mostly(valid_figures, invalid_figures, one_in=3)
    return {
        node_id: data.draw(st.dictionaries(metric_names, figures, max_size=3)) for node_id in ids
    }


def draw_update(
    data: st.DataObject, state: RefWorkflowState | None, *, valid: bool | None = None
) -> Any:
    """A random update, a StateUpdate or a dict, steered by ``state`` towards legal moves.

    Unless ``valid`` says, four in five are well-formed (their transitions may still
    be illegal); the rest may hold a malformed field.
    """
    if valid is None:
        valid = chance(data, 8)
    fields: dict[str, Any] = {}
    if chance(data, 2):
        fields["status"] = draw_execution_status(data, state, valid)
    if chance(data, 7):
        fields["nodes"] = draw_nodes(data, state, valid)
    fails_a_node = isinstance(fields.get("nodes"), Mapping) and any(
        status == NodeStatus.FAILED for status in fields["nodes"].values()
    )
    if chance(data, 7 if fails_a_node else 2):
        fields["error"] = data.draw(valid_errors if valid else any_errors)
    finishes_a_node = isinstance(fields.get("nodes"), Mapping) and any(
        status in (NodeStatus.COMPLETED, NodeStatus.FAILED) for status in fields["nodes"].values()
    )
    if chance(data, 5 if finishes_a_node else 2):
        fields["metrics"] = draw_metrics(data, fields.get("nodes"), valid)
    if chance(data, 2):
        current_nodes = [None, *NODE_IDS, UNSET]
        fields["current_node"] = data.draw(
            st.sampled_from(current_nodes if valid else [*current_nodes, *BAD_NODE_IDS])
        )
    if chance(data, 3):
        fields["variables"] = data.draw(valid_objects if valid else any_objects)
    if chance(data, 2):
        names = st.lists(st.sampled_from(VARIABLE_NAMES), max_size=3)
        fields["unset_variables"] = data.draw(
            st.one_of(names, names.map(tuple))
            if valid
            else mostly(names, st.sampled_from(["x", [1], {"x": 1}]), one_in=3)
        )
    if chance(data, 2):
        fields["context"] = data.draw(valid_objects if valid else any_objects)
    forms = ["StateUpdate", "dict"] if valid else ["StateUpdate", "dict", "unknown key", "other"]
    form = data.draw(st.sampled_from(forms))
    if form == "StateUpdate":
        return StateUpdate(**fields)
    if form == "unknown key":
        return {**fields, data.draw(st.sampled_from(["bogus", 1, "Status"])): 1}
    if form == "other":
        return data.draw(st.sampled_from([["status", "running"], "status=running", None]))
    if fields.get("current_node") is UNSET and chance(data, 5):
        del fields["current_node"]
    return fields


# -- comparing -----------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one call did: returned ``value`` or raised ``error``."""

    value: Any = None
    error: Exception | None = None


def attempt(call: Callable[[], Any]) -> Outcome:
    try:
        return Outcome(value=call())
    except Exception as error:
        return Outcome(error=error)


def typed(value: Any) -> Any:
    """A JSON value with its types made visible, so ``True != 1`` and ``1 != 1.0``."""
    kind = type(value)
    if value is None or kind is str:
        return value
    if kind is bool or kind is int or kind is float:
        return (kind.__name__, value)
    if kind is list:
        return ("list", [typed(item) for item in value])
    if kind is dict and all(type(key) is str for key in value):
        return ("dict", {key: typed(item) for key, item in value.items()})
    return ("unexpected type", kind.__name__, repr(value))


def parse_time(text: Any, what: str) -> datetime:
    assert type(text) is str, f"{what}: {text!r} is not an ISO-8601 string"
    moment = datetime.fromisoformat(text)
    assert moment.utcoffset() == timedelta(0), f"{what}: {text!r} is not UTC"
    return moment


def is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and value >= 0


class Pairing:
    """Pairs the ids each side generated for one ``create_execution(None, ...)``."""

    def __init__(self) -> None:
        self.ref_to_rust: dict[str, str] = {}

    def __call__(self, execution_id: str, side: Side) -> str:
        if side == "ref":
            return self.ref_to_rust.get(execution_id, execution_id)
        return execution_id


def state_view(state: Any, side: Side, ids: Pairing) -> dict[str, Any]:
    """The comparable content of a state's ``to_dict()``; checks what cannot compare."""
    d = state.to_dict()
    assert set(d) == {
        "execution_id",
        "workflow_id",
        "status",
        "current_node",
        "nodes",
        "variables",
        "context",
        "version",
        "created_at",
        "updated_at",
    }, f"{side}: state keys {sorted(d)}"
    created = parse_time(d["created_at"], f"{side} created_at")
    updated = parse_time(d["updated_at"], f"{side} updated_at")
    assert created <= updated, f"{side}: updated_at {updated} before created_at {created}"
    assert state.created_at == created
    assert state.updated_at == updated
    assert state.version == d["version"]
    assert isinstance(state.status, ExecutionStatus)
    nodes = {}
    for node_id, node in d["nodes"].items():
        times = {}
        for name in ("started_at", "finished_at"):
            if node[name] is not None:
                moment = parse_time(node[name], f"{side} node {node_id} {name}")
                assert created <= moment <= updated, f"{side}: node {node_id} {name} {moment}"
                times[name] = moment
        if len(times) == 2:
            assert times["started_at"] <= times["finished_at"]
        nodes[node_id] = {
            "status": node["status"],
            "attempts": node["attempts"],
            "started_at": "started_at" in times,
            "finished_at": "finished_at" in times,
            "error": typed(node["error"]),
        }
    return {
        "execution_id": ids(d["execution_id"], side),
        "workflow_id": d["workflow_id"],
        "status": d["status"],
        "current_node": d["current_node"],
        "nodes": nodes,
        "variables": typed(d["variables"]),
        "context": typed(d["context"]),
        "version": d["version"],
    }


def _figures(metrics: Any) -> Any:
    if not isinstance(metrics, dict):
        return typed(metrics)
    # Metric figures are numbers; whether 3 is kept as 3 or 3.0 is not part of the contract.
    return {
        name: float(figure) if is_number(figure) else typed(figure)
        for name, figure in metrics.items()
    }


def event_view(event: Any, side: Side, ids: Pairing) -> dict[str, Any]:
    """The comparable content of an event's ``to_dict()`` (no seq, no timestamp)."""
    d = event.to_dict()
    assert set(d) == {
        "seq",
        "execution_id",
        "version",
        "timestamp",
        "type",
        "node_id",
        "actor",
        "data",
    }, f"{side}: event keys {sorted(d)}"
    assert event.timestamp == parse_time(d["timestamp"], f"{side} event timestamp")
    assert isinstance(event.type, EventType)
    data = dict(d["data"])
    if "metrics" in data:
        data["metrics"] = _figures(data["metrics"])
    if d["type"] in ("node_complete", "node_failed"):
        duration = data.pop("duration", None)
        assert is_number(duration), f"{side}: {d['type']} duration {duration!r}"
        metrics = data.get("metrics")
        if isinstance(metrics, dict) and "duration" in metrics:
            data["duration"] = float(duration)  # the reported figure: deterministic
    return {
        "execution_id": ids(d["execution_id"], side),
        "version": d["version"],
        "type": d["type"],
        "node_id": d["node_id"],
        "actor": d["actor"],
        "data": typed(data),
    }


def events_view(events: list[Any], side: Side, ids: Pairing) -> list[dict[str, Any]]:
    seqs = [event.seq for event in events]
    assert seqs == sorted(set(seqs)), f"{side}: seqs not increasing: {seqs}"
    moments = [event.timestamp for event in events]
    assert moments == sorted(moments), f"{side}: event timestamps go backwards"
    return [event_view(event, side, ids) for event in events]


def describe(error: Exception | None) -> str:
    return "no error" if error is None else f"{type(error).__name__}: {error}"


def assert_same_outcome(
    what: str, rust: Outcome, ref: Outcome, view: Callable[[Any, Side], Any]
) -> None:
    """Same error class (and conflict versions), or the same returned value."""
    if rust.error is not None or ref.error is not None:
        assert type(rust.error) is type(ref.error), (
            f"{what}: rust raised {describe(rust.error)}; reference raised {describe(ref.error)}"
        )
        if isinstance(rust.error, ConflictError) and isinstance(ref.error, ConflictError):
            assert (rust.error.expected, rust.error.actual) == (
                ref.error.expected,
                ref.error.actual,
            ), f"{what}: {rust.error} vs {ref.error}"
        return
    rust_view = view(rust.value, "rust")
    ref_view = view(ref.value, "ref")
    assert rust_view == ref_view, f"{what}:\n  rust:      {rust_view!r}\n  reference: {ref_view!r}"


# -- the state machine ---------------------------------------------------------------


class ModelComparison(RuleBasedStateMachine):
    """Drives the Rust-backed StateManager and the reference model in lock step."""

    def __init__(self) -> None:
        super().__init__()
        self.rust = StateManager(ring_capacity=RING_CAPACITY, max_update_bytes=MAX_UPDATE_BYTES)
        self.ref = ReferenceStateManager(max_update_bytes=MAX_UPDATE_BYTES)
        self.ids = Pairing()
        #: (rust id, reference id) of every execution either side may hold.
        self.known: list[tuple[str, str]] = [(eid, eid) for eid in EXECUTION_IDS]
        self.closed = False

    def teardown(self) -> None:
        try:
            if not self.closed:
                self.check_every_version()
        finally:
            self.rust.close()
            self.ref.close()

    # -- helpers -----------------------------------------------------------------

    def draw_target(self, data: st.DataObject) -> tuple[Any, Any]:
        """An execution id for each side: a fixed one, a generated pair or an invalid one."""
        if chance(data, 1):
            bad = data.draw(st.sampled_from(BAD_IDS))
            return bad, bad
        existing = [pair for pair in self.known if self.ref_state(pair[1]) is not None]
        if existing and chance(data, 8):
            return data.draw(st.sampled_from(existing))
        return data.draw(st.sampled_from(self.known))

    def ref_state(self, ref_id: Any) -> RefWorkflowState | None:
        try:
            return self.ref.get_state(ref_id)
        except Exception:
            return None

    def state_views(self, value: Any, side: Side) -> Any:
        return state_view(value, side, self.ids)

    def check_state(self, what: str, rust_id: Any, ref_id: Any, version: Any = None) -> None:
        assert_same_outcome(
            what,
            attempt(lambda: self.rust.get_state(rust_id, version=version)),
            attempt(lambda: self.ref.get_state(ref_id, version=version)),
            self.state_views,
        )

    def full_histories(self, rust_id: Any, ref_id: Any) -> tuple[Outcome, Outcome]:
        return attempt(lambda: self.rust.get_history(rust_id)), attempt(
            lambda: self.ref.get_history(ref_id)
        )

    def history_view(self, history: Any, side: Side) -> Any:
        summary = history.summary
        assert isinstance(summary.duration, timedelta)
        assert summary.duration >= timedelta(0)
        return {
            "execution_id": self.ids(history.execution_id, side),
            "events": events_view(history.events, side, self.ids),
            "node_count": summary.node_count,
            "error_count": summary.error_count,
        }

    def check_every_version(self) -> None:
        for rust_id, ref_id in self.known:
            state = self.ref_state(ref_id)
            if state is None:
                continue
            for version in range(1, state.version + 1):
                self.check_state(
                    f"get_state({ref_id!r}, version={version})", rust_id, ref_id, version
                )

    # -- writes ------------------------------------------------------------------

    @initialize(variables=valid_objects, context=valid_objects)
    def create_first(self, variables: Any, context: Any) -> None:
        """Every run starts with one execution, so updates have something to change."""
        assert_same_outcome(
            "create_execution('e1')",
            attempt(
                lambda: self.rust.create_execution(
                    "e1", workflow_id="wf-a", variables=variables, context=context
                )
            ),
            attempt(
                lambda: self.ref.create_execution(
                    "e1", workflow_id="wf-a", variables=variables, context=context
                )
            ),
            self.state_views,
        )

    @rule(data=st.data())
    def create(self, data: st.DataObject) -> None:
        execution_id = data.draw(
            mostly(st.sampled_from([*EXECUTION_IDS, None]), st.sampled_from(BAD_IDS)),
            label="execution_id",
        )
        workflow_id = data.draw(mostly(st.sampled_from(WORKFLOW_IDS), st.sampled_from(BAD_IDS)))
        variables = data.draw(mostly(st.none() | valid_objects, any_objects), label="variables")
        context = data.draw(mostly(st.none() | valid_objects, any_objects), label="context")
        actor = data.draw(mostly(st.sampled_from(ACTORS), st.sampled_from(BAD_ACTORS)))
        rust = attempt(
            lambda: self.rust.create_execution(
                execution_id,
                workflow_id=workflow_id,
                variables=variables,
                context=context,
                actor=actor,
            )
        )
        ref = attempt(
            lambda: self.ref.create_execution(
                execution_id,
                workflow_id=workflow_id,
                variables=variables,
                context=context,
                actor=actor,
            )
        )
        if execution_id is None and rust.error is None and ref.error is None:
            rust_id, ref_id = rust.value.execution_id, ref.value.execution_id
            for generated in (rust_id, ref_id):
                assert uuid.UUID(generated).version == 7, f"{generated} is not a UUIDv7"
            assert rust_id not in self.ids.ref_to_rust.values()
            self.ids.ref_to_rust[ref_id] = rust_id
            self.known.append((rust_id, ref_id))
        assert_same_outcome(
            f"create_execution({execution_id!r}, workflow_id={workflow_id!r}, "
            f"variables={variables!r}, context={context!r}, actor={actor!r})",
            rust,
            ref,
            self.state_views,
        )

    @rule(data=st.data())
    def update(self, data: st.DataObject) -> None:
        self.apply_random_update(data)

    @rule(data=st.data())
    def update_again(self, data: st.DataObject) -> None:
        """Updates are what the contract is mostly about: give them twice the steps."""
        self.apply_random_update(data)

    @rule(data=st.data())
    def advance(self, data: st.DataObject) -> None:
        """A few well-formed updates in a row on one open execution: runs get deep."""
        open_pairs = [
            pair
            for pair in self.known
            if (state := self.ref_state(pair[1])) is not None
            and EXECUTION_TRANSITIONS[state.status]
        ]
        if not open_pairs:
            return
        rust_id, ref_id = data.draw(st.sampled_from(open_pairs))
        for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
            update = draw_update(data, self.ref_state(ref_id), valid=True)
            assert_same_outcome(
                f"update_state({ref_id!r}, {update!r})",
                attempt(functools.partial(self.rust.update_state, rust_id, update)),
                attempt(functools.partial(self.ref.update_state, ref_id, update)),
                lambda version, side: version,
            )

    def apply_random_update(self, data: st.DataObject) -> None:
        rust_id, ref_id = self.draw_target(data)
        state = self.ref_state(ref_id)
        update = draw_update(data, state)
        current = 1 if state is None else state.version
        expected_version: Any = data.draw(
            mostly(
                st.one_of(
                    st.none(),
                    st.just(current),
                    st.integers(min_value=1, max_value=current + 1),
                ),
                st.sampled_from([0, -1, "1", True, 1.0, 2**63, 2**64]),
            ),
            label="expected_version",
        )
        actor = data.draw(mostly(st.sampled_from(ACTORS), st.sampled_from(BAD_ACTORS)))
        assert_same_outcome(
            f"update_state({ref_id!r}, {update!r}, expected_version={expected_version!r}, "
            f"actor={actor!r})",
            attempt(
                lambda: self.rust.update_state(
                    rust_id, update, expected_version=expected_version, actor=actor
                )
            ),
            attempt(
                lambda: self.ref.update_state(
                    ref_id, update, expected_version=expected_version, actor=actor
                )
            ),
            lambda version, side: version,
        )

    @rule(data=st.data())
    def transact(self, data: st.DataObject) -> None:
        rust_id, ref_id = self.draw_target(data)
        update = draw_update(data, self.ref_state(ref_id))
        interferences = data.draw(st.integers(min_value=0, max_value=3), label="interferences")
        retries = data.draw(
            mostly(st.integers(min_value=0, max_value=3), st.sampled_from([-1, True, "2"]))
        )
        returns = data.draw(st.sampled_from(["update", "update", "none", "raise"]))

        def make_fn(
            manager: StateManager | ReferenceStateManager, execution_id: Any, seen: list[Any]
        ) -> Callable[[Any], Any]:
            def fn(state: Any) -> Any:
                seen.append(state.version)
                if len(seen) <= interferences:
                    # Another writer gets in between: the transact must see a conflict.
                    manager.update_state(execution_id, {"context": {"interference": len(seen)}})
                if returns == "none":
                    return None
                if returns == "raise":
                    raise FnFailure("from fn")
                return update

            return fn

        rust_seen: list[Any] = []
        ref_seen: list[Any] = []
        what = (
            f"transact({ref_id!r}, -> {returns} {update!r}, interferences={interferences}, "
            f"retries={retries!r})"
        )
        assert_same_outcome(
            what,
            attempt(
                lambda: self.rust.transact(
                    rust_id, make_fn(self.rust, rust_id, rust_seen), retries=retries
                )
            ),
            attempt(
                lambda: self.ref.transact(
                    ref_id, make_fn(self.ref, ref_id, ref_seen), retries=retries
                )
            ),
            lambda version, side: version,
        )
        assert rust_seen == ref_seen, f"{what}: fn saw versions {rust_seen} vs {ref_seen}"

    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        if data.draw(st.integers(min_value=0, max_value=24), label="close?") != 0:
            return
        if not self.closed:
            self.check_every_version()
        for _ in range(2):  # idempotent
            self.rust.close()
            self.ref.close()
        self.closed = True

    # -- reads -------------------------------------------------------------------

    @rule(data=st.data())
    def get_state(self, data: st.DataObject) -> None:
        rust_id, ref_id = self.draw_target(data)
        state = self.ref_state(ref_id)
        current = 1 if state is None else state.version
        version = data.draw(
            st.one_of(
                st.none(),
                st.integers(min_value=1, max_value=current + 2),
                st.sampled_from([0, -1, "1", 1.0, True, 2**63, 2**64]),
            ),
            label="version",
        )
        self.check_state(f"get_state({ref_id!r}, version={version!r})", rust_id, ref_id, version)

    @rule(data=st.data())
    def get_history(self, data: st.DataObject) -> None:
        rust_id, ref_id = self.draw_target(data)
        state = self.ref_state(ref_id)
        current = 1 if state is None else state.version
        # Each filter is left out more often than not, so that queries match something.
        types: Any = None
        if chance(data, 3):
            types = data.draw(
                mostly(
                    st.lists(st.sampled_from(list(EventType)), min_size=1, max_size=4).flatmap(
                        lambda kinds: st.sampled_from([kinds, [kind.value for kind in kinds]])
                    ),
                    st.sampled_from([["bogus"], "error", [1], []]),
                ),
                label="types",
            )
        node_id: Any = None
        if chance(data, 3):
            node_id = data.draw(mostly(st.sampled_from(NODE_IDS), st.sampled_from(BAD_NODE_IDS)))
        after_version: Any = None
        if chance(data, 5):
            after_version = data.draw(
                mostly(
                    st.integers(min_value=0, max_value=current + 1),
                    st.sampled_from([-1, "1", True]),
                )
            )
        limit: Any = None
        if chance(data, 4):
            limit = data.draw(
                mostly(st.integers(min_value=0, max_value=6), st.sampled_from([-1, "3", 2.0]))
            )
        rust_since, ref_since, rust_until, ref_until = self.draw_time_bounds(data, rust_id, ref_id)
        rust_options = HistoryOptions(
            since=rust_since,
            until=rust_until,
            types=types,
            node_id=node_id,
            after_version=after_version,
            limit=limit,
        )
        ref_options = HistoryOptions(
            since=ref_since,
            until=ref_until,
            types=types,
            node_id=node_id,
            after_version=after_version,
            limit=limit,
        )
        assert_same_outcome(
            f"get_history({ref_id!r}, {ref_options!r})",
            attempt(lambda: self.rust.get_history(rust_id, rust_options)),
            attempt(lambda: self.ref.get_history(ref_id, ref_options)),
            self.history_view,
        )

    def draw_time_bounds(
        self, data: st.DataObject, rust_id: Any, ref_id: Any
    ) -> tuple[Any, Any, Any, Any]:
        """``since``/``until`` for each side, taken from each side's own event times.

        Only event positions where time strictly moves on (on both sides) are used, so
        that the same events fall on the same side of the bound on both sides.
        """
        kind = data.draw(st.sampled_from(["none", "events", "events", "invalid"]))
        if kind == "none":
            return None, None, None, None
        if kind == "invalid":
            bad = data.draw(st.sampled_from([datetime(2020, 1, 1), "yesterday", 0]))
            return bad, bad, None, None
        rust_full, ref_full = self.full_histories(rust_id, ref_id)
        if rust_full.error is not None or ref_full.error is not None:
            return None, None, None, None
        rust_times = [event.timestamp for event in rust_full.value.events]
        ref_times = [event.timestamp for event in ref_full.value.events]
        if len(rust_times) != len(ref_times):
            return None, None, None, None
        cuts = [
            position
            for position in range(len(rust_times))
            if position == 0
            or (
                rust_times[position] > rust_times[position - 1]
                and ref_times[position] > ref_times[position - 1]
            )
        ]
        since = data.draw(st.sampled_from([None, *cuts]))
        until = data.draw(st.sampled_from([None, *cuts]))
        far = timedelta(days=data.draw(st.integers(min_value=0, max_value=1)))
        return (
            None if since is None else rust_times[since] - far,
            None if since is None else ref_times[since] - far,
            None if until is None else rust_times[until],
            None if until is None else ref_times[until],
        )

    @rule(data=st.data())
    def list_executions(self, data: st.DataObject) -> None:
        status = data.draw(
            mostly(
                st.one_of(
                    st.none(),
                    st.sampled_from(list(ExecutionStatus)).flatmap(as_member_or_value),
                    st.lists(st.sampled_from(list(ExecutionStatus)), max_size=3),
                    st.frozensets(st.sampled_from([s.value for s in ExecutionStatus]), max_size=2),
                ),
                st.sampled_from(["bogus", ["running", "bogus"], [1], 1]),
            ),
            label="status",
        )
        workflow_id = data.draw(
            mostly(st.sampled_from([None, *WORKFLOW_IDS, "wf-none"]), st.sampled_from(BAD_IDS))
        )
        limit = data.draw(
            mostly(
                st.one_of(st.just(100), st.integers(min_value=0, max_value=4)),
                st.sampled_from([-1, "2", 1.5, True]),
            )
        )
        assert_same_outcome(
            f"list_executions(status={status!r}, workflow_id={workflow_id!r}, limit={limit!r})",
            attempt(
                lambda: self.rust.list_executions(
                    status=status, workflow_id=workflow_id, limit=limit
                )
            ),
            attempt(
                lambda: self.ref.list_executions(
                    status=status, workflow_id=workflow_id, limit=limit
                )
            ),
            lambda states, side: [self.state_views(state, side) for state in states],
        )

    # -- after every step --------------------------------------------------------

    @invariant()
    def both_hold_the_same_executions(self) -> None:
        if self.closed:
            assert self.rust.closed
            assert self.ref.closed
            for rust_id, ref_id in self.known[:1]:
                self.check_state("get_state after close", rust_id, ref_id)
            return
        assert len(self.rust) == len(self.ref)
        seq_order: dict[Side, list[tuple[int, tuple[str, int, int]]]] = {"rust": [], "ref": []}
        for rust_id, ref_id in self.known:
            self.check_state(f"get_state({ref_id!r})", rust_id, ref_id)
            rust, ref = self.full_histories(rust_id, ref_id)
            assert_same_outcome(f"get_history({ref_id!r})", rust, ref, self.history_view)
            if rust.error is not None:
                continue
            for side, outcome in (("rust", rust), ("ref", ref)):
                per_version: dict[int, int] = {}
                for event in outcome.value.events:
                    position = per_version.get(event.version, 0)
                    per_version[event.version] = position + 1
                    key = (self.ids(event.execution_id, side), event.version, position)
                    seq_order[side].append((event.seq, key))
        # seqs are global: both sides must interleave the executions' events alike.
        rust_order = [key for _, key in sorted(seq_order["rust"])]
        ref_order = [key for _, key in sorted(seq_order["ref"])]
        assert rust_order == ref_order, "events of different executions are ordered differently"
        if seq_order["rust"]:
            assert min(seq for seq, _ in seq_order["rust"]) == 1, "the core's first seq is not 1"

    @invariant()
    def handed_out_dicts_are_copies(self) -> None:
        if self.closed:
            return
        for rust_id, _ in self.known:
            try:
                state = self.rust.get_state(rust_id)
            except Exception:
                continue
            before = state.to_dict()
            state.variables["__changed__"] = True
            state.context.clear()
            for node in state.nodes.values():
                if node.error is not None:
                    node.error.clear()
            assert state.to_dict() == before
            assert self.rust.get_state(rust_id).to_dict() == before
            return


ModelComparison.TestCase.settings = settings(
    max_examples=80,
    stateful_step_count=50,
    deadline=None,
    # One bug, shrunk, is a clearer report than several half-shrunk ones, and faster.
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestModelAgreement = ModelComparison.TestCase


def test_both_managers_are_context_managers() -> None:
    with StateManager() as rust, ReferenceStateManager() as ref:
        rust.create_execution("e", workflow_id="wf")
        ref.create_execution("e", workflow_id="wf")
    for manager in (rust, ref):
        assert manager.closed
        manager.close()  # idempotent
        with pytest.raises(ClosedError):
            manager.get_state("e")


# -- boundaries the random runs reach only rarely ------------------------------------

#: Above the size of the deepest values below, so that only the size cases reach it.
BOUNDARY_BYTES = 1000


def compact_size(value: Any) -> int:
    """Compact JSON size of ASCII data without floats (where Python and serde_json agree)."""
    return len(json.dumps(value, separators=(",", ":")))


def padded(make: Callable[[str], Any], size: int) -> Any:
    """``make(padding)`` with the padding chosen so its compact JSON is ``size`` bytes."""
    return make("x" * (size - compact_size(make(""))))


def error_record(padding: str) -> dict[str, Any]:
    return {"type": "E", "message": padding, "details": None}


def metrics_of_five_nodes(padding: str) -> dict[str, Any]:
    """Metrics whose node ids share ``padding`` (each id stays under 256 characters)."""
    return {
        name + padding[200 * index : 200 * (index + 1)]: {"duration": 1}
        for index, name in enumerate("abcde")
    }


Step = Callable[[Any], Any]

BOUNDARY_CASES: dict[str, list[Step]] = {
    "64 nested lists in a variable": [
        lambda sm: sm.update_state("e", {"variables": {"v": nest(64, "list", 1)}}),
    ],
    "65 nested lists, innermost empty, in a variable": [
        lambda sm: sm.update_state("e", {"variables": {"v": nest(65, "list", _EMPTY_LEAF)}}),
    ],
    "65 nested lists holding a scalar, in a variable": [
        lambda sm: sm.update_state("e", {"variables": {"v": nest(65, "list", 1)}}),
    ],
    "65 nested dicts, innermost empty, in error details": [
        lambda sm: sm.update_state(
            "e", {"error": {"type": "E", "message": "m", "details": nest(65, "dict", _EMPTY_LEAF)}}
        ),
    ],
    "65 nested lists, innermost empty, in a creation's context": [
        lambda sm: sm.create_execution(
            "deep", workflow_id="wf", context={"v": nest(65, "list", _EMPTY_LEAF)}
        ),
    ],
    "variables of exactly max_update_bytes": [
        lambda sm: sm.update_state(
            "e", {"variables": padded(lambda pad: {"v": pad}, BOUNDARY_BYTES)}
        ),
    ],
    "variables one byte over max_update_bytes": [
        lambda sm: sm.update_state(
            "e", {"variables": padded(lambda pad: {"v": pad}, BOUNDARY_BYTES + 1)}
        ),
    ],
    "context one byte over max_update_bytes": [
        lambda sm: sm.update_state(
            "e", {"context": padded(lambda pad: {"v": pad}, BOUNDARY_BYTES + 1)}
        ),
    ],
    "error record one byte over max_update_bytes": [
        lambda sm: sm.update_state(
            "e",
            {
                "error": {
                    "type": "E",
                    "message": padded(error_record, BOUNDARY_BYTES + 1)["message"],
                }
            },
        ),
    ],
    "metrics one byte over max_update_bytes": [
        lambda sm: sm.update_state(
            "e", {"metrics": padded(metrics_of_five_nodes, BOUNDARY_BYTES + 1)}
        ),
    ],
    "creation one byte over max_update_bytes": [
        lambda sm: sm.create_execution(
            "big", workflow_id="wf", variables=padded(lambda pad: {"v": pad}, BOUNDARY_BYTES + 1)
        ),
    ],
    "an update that records no event, then its version read back": [
        lambda sm: sm.update_state("e", {"nodes": {}}),
        lambda sm: sm.update_state("e", {"metrics": {}}),
        lambda sm: sm.update_state("e", {"variables": {"after": 1}}),
        lambda sm: sm.get_state("e", version=2),
        lambda sm: sm.get_state("e", version=3),
    ],
    "expected_version beyond 64 bits": [
        lambda sm: sm.update_state("e", {"variables": {"v": 1}}, expected_version=2**64),
    ],
    "a version beyond 64 bits": [
        lambda sm: sm.get_state("e", version=2**64),
    ],
}


@pytest.mark.parametrize("steps", BOUNDARY_CASES.values(), ids=BOUNDARY_CASES.keys())
def test_boundary_cases_agree(steps: list[Step]) -> None:
    rust = StateManager(max_update_bytes=BOUNDARY_BYTES)
    ref = ReferenceStateManager(max_update_bytes=BOUNDARY_BYTES)
    ids = Pairing()

    def view(value: Any, side: Side) -> Any:
        return state_view(value, side, ids) if hasattr(value, "to_dict") else value

    with rust, ref:
        rust.create_execution("e", workflow_id="wf")
        ref.create_execution("e", workflow_id="wf")
        for number, step in enumerate(steps, start=1):
            assert_same_outcome(
                f"step {number}",
                attempt(functools.partial(step, rust)),
                attempt(functools.partial(step, ref)),
                view,
            )
