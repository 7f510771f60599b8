"""Every malformed input of docs/semantics.md raises ValidationError and changes nothing.

A rejected call must leave the store exactly as it was: the same current state, the
same version, the same history and the same set of executions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from wfstate import (
    ConflictError,
    HistoryOptions,
    InvalidTransitionError,
    NotFoundError,
    StateEvent,
    StateManager,
    StateUpdate,
    ValidationError,
    WfstateError,
    WorkflowState,
)

EXECUTION = "exec-1"


@dataclass(frozen=True)
class Snapshot:
    state: WorkflowState
    events: list[StateEvent]
    executions: list[WorkflowState]


def take_snapshot(manager: StateManager) -> Snapshot:
    return Snapshot(
        state=manager.get_state(EXECUTION),
        events=manager.get_history(EXECUTION).events,
        executions=manager.list_executions(limit=1000),
    )


@contextmanager
def rejected(manager: StateManager) -> Iterator[None]:
    """The body must raise ValidationError (a ValueError too) and change nothing."""
    before = take_snapshot(manager)
    with pytest.raises(ValidationError) as info:
        yield
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, WfstateError)
    after = take_snapshot(manager)
    assert after.state == before.state
    assert after.state.version == before.state.version
    assert after.events == before.events
    assert after.executions == before.executions


@pytest.fixture
def execution(manager: StateManager) -> str:
    """An execution a few versions old, with a running node "a" and variables."""
    manager.create_execution(
        EXECUTION, workflow_id="wf", variables={"keep": 1, "drop": 2}, context={"c": 1}
    )
    manager.update_state(EXECUTION, {"nodes": {"a": "running"}, "current_node": "a"})
    manager.update_state(EXECUTION, {"variables": {"n": 1}})
    assert manager.get_state(EXECUTION).version == 3
    return EXECUTION


def nested_lists(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def nested_dicts(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = {"k": value}
    return value


def create_with(manager: StateManager, where: str, value: Any) -> WorkflowState:
    """Create execution "new" with ``value`` as its variables or its context."""
    if where == "variables":
        return manager.create_execution("new", workflow_id="wf", variables=value)
    return manager.create_execution("new", workflow_id="wf", context=value)


class Opaque:
    """An arbitrary object: not JSON."""


BAD_VALUES = [
    pytest.param(math.nan, id="nan"),
    pytest.param(math.inf, id="inf"),
    pytest.param(-math.inf, id="-inf"),
    pytest.param([1, [2, math.nan]], id="nested-nan"),
    pytest.param({"a": {"b": math.inf}}, id="nested-inf"),
    pytest.param((1, -math.inf), id="nan-in-tuple"),
    pytest.param(Opaque(), id="object"),
    pytest.param(object(), id="bare-object"),
    pytest.param({1, 2}, id="set"),
    pytest.param(frozenset({1}), id="frozenset"),
    pytest.param(b"bytes", id="bytes"),
    pytest.param(bytearray(b"bytes"), id="bytearray"),
    pytest.param([b"bytes"], id="nested-bytes"),
    pytest.param(datetime(2024, 1, 1, tzinfo=UTC), id="datetime"),
    pytest.param(Decimal("1.5"), id="decimal"),
    pytest.param(complex(1, 2), id="complex"),
    pytest.param({1: "one"}, id="int-key"),
    pytest.param({"a": {None: 1}}, id="nested-none-key"),
    pytest.param({("a", "b"): 1}, id="tuple-key"),
    pytest.param(2**64, id="int-2**64"),
    pytest.param(-(2**63) - 1, id="int-below-min"),
    pytest.param(10**30, id="int-huge"),
    pytest.param([2**64], id="nested-big-int"),
    pytest.param(nested_lists(80), id="lists-80-deep"),
    pytest.param(nested_dicts(80), id="dicts-80-deep"),
    pytest.param(nested_lists(5000), id="lists-5000-deep"),
    pytest.param(len, id="function"),
]

OVERLONG = "x" * 256
BAD_IDS = [
    pytest.param("", id="empty"),
    pytest.param(OVERLONG, id="256-chars"),
    pytest.param("€" * 256, id="256-multibyte-chars"),
    pytest.param(123, id="int"),
    pytest.param(b"bytes", id="bytes"),
    pytest.param(1.5, id="float"),
]
BAD_REQUIRED_IDS = [*BAD_IDS, pytest.param(None, id="None"), pytest.param(["a"], id="list")]
GOOD_IDS = [
    pytest.param("x", id="1-char"),
    pytest.param("x" * 255, id="255-chars"),
    pytest.param("é" * 255, id="255-two-byte-chars"),
    pytest.param("€" * 255, id="255-three-byte-chars"),
]


# -- JSON values -------------------------------------------------------------------


@pytest.mark.parametrize("value", BAD_VALUES)
def test_bad_value_in_update_variables(
    manager: StateManager, execution: str, value: object
) -> None:
    with rejected(manager):
        manager.update_state(execution, {"variables": {"v": value}})


@pytest.mark.parametrize("value", BAD_VALUES)
def test_bad_value_in_update_context(manager: StateManager, execution: str, value: object) -> None:
    with rejected(manager):
        manager.update_state(execution, StateUpdate(context={"v": value}))  # type: ignore[dict-item]


@pytest.mark.parametrize("value", BAD_VALUES)
def test_bad_value_in_error_details(manager: StateManager, execution: str, value: object) -> None:
    record = {"type": "E", "message": "m", "details": {"v": value}}
    with rejected(manager):
        manager.update_state(execution, {"nodes": {"a": "failed"}, "error": record})


@pytest.mark.parametrize("where", ["variables", "context"])
@pytest.mark.parametrize("value", BAD_VALUES)
def test_bad_value_in_create(
    manager: StateManager, execution: str, value: object, where: str
) -> None:
    with rejected(manager):
        create_with(manager, where, {"v": value})
    with pytest.raises(NotFoundError):
        manager.get_state("new")


@pytest.mark.parametrize(
    "mapping",
    [
        pytest.param({1: "a"}, id="int-key"),
        pytest.param({None: "a"}, id="none-key"),
        pytest.param({b"k": "a"}, id="bytes-key"),
        pytest.param({"ok": 1, 2: "a"}, id="mixed-keys"),
    ],
)
@pytest.mark.parametrize("where", ["variables", "context"])
def test_non_string_top_level_keys(
    manager: StateManager, execution: str, mapping: dict[Any, Any], where: str
) -> None:
    with rejected(manager):
        manager.update_state(execution, {where: mapping})
    with rejected(manager):
        create_with(manager, where, mapping)


@pytest.mark.parametrize("value", [2**64 - 1, -(2**63)])
def test_int_range_boundaries_are_accepted(
    manager: StateManager, execution: str, value: int
) -> None:
    manager.update_state(execution, {"variables": {"v": value}})
    assert manager.get_state(execution).variables["v"] == value


def _accepts(manager: StateManager, where: str, value: Any) -> bool:
    """Whether one update with ``value`` as a variable, context or error detail is accepted."""
    execution_id = f"depth-{len(manager)}"
    manager.create_execution(execution_id, workflow_id="wf")
    update: dict[str, Any]
    if where == "details":
        update = {"error": {"type": "E", "message": "m", "details": value}}
    else:
        update = {where: {"v": value}}
    try:
        manager.update_state(execution_id, update)
    except ValidationError:
        assert manager.get_state(execution_id).version == 1
        return False
    return True


@pytest.mark.parametrize("nest", [nested_lists, nested_dicts], ids=["lists", "dicts"])
def test_nesting_limit_is_one_rule_for_every_json_value(
    manager: StateManager, nest: Callable[[int], Any]
) -> None:
    """Variables, context and error details are all "JSON values" with one depth limit.

    Whether the limit counts the value itself or its container as a level, a value is
    accepted in all three places or rejected in all three.
    """
    places = ("variables", "context", "details")
    for depth in (60, 63):
        assert all(_accepts(manager, where, nest(depth)) for where in places), depth
    for depth in (66, 70):
        assert not any(_accepts(manager, where, nest(depth)) for where in places), depth
    for depth in (64, 65):
        outcomes = {where: _accepts(manager, where, nest(depth)) for where in places}
        assert len(set(outcomes.values())) == 1, (depth, outcomes)


@pytest.mark.parametrize("bad", [[("a", 1)], "text", 5, 1.5], ids=["pairs", "str", "int", "float"])
@pytest.mark.parametrize("where", ["variables", "context"])
def test_non_mapping_variables_or_context(
    manager: StateManager, execution: str, where: str, bad: object
) -> None:
    with rejected(manager):
        manager.update_state(execution, {where: bad})
    with rejected(manager):
        create_with(manager, where, bad)


# -- identifiers -------------------------------------------------------------------


@pytest.mark.parametrize("bad_id", BAD_IDS)
def test_bad_execution_id_in_create(manager: StateManager, execution: str, bad_id: Any) -> None:
    with rejected(manager):
        manager.create_execution(bad_id, workflow_id="wf")


@pytest.mark.parametrize("bad_id", BAD_REQUIRED_IDS)
def test_bad_workflow_id(manager: StateManager, execution: str, bad_id: Any) -> None:
    with rejected(manager):
        manager.create_execution("new", workflow_id=bad_id)


@pytest.mark.parametrize("bad_id", BAD_IDS)
def test_bad_actor(manager: StateManager, execution: str, bad_id: Any) -> None:
    with rejected(manager):
        manager.create_execution("new", workflow_id="wf", actor=bad_id)
    with rejected(manager):
        manager.update_state(execution, {"variables": {"n": 2}}, actor=bad_id)


@pytest.mark.parametrize("bad_id", BAD_IDS)
def test_bad_node_id(manager: StateManager, execution: str, bad_id: Any) -> None:
    with rejected(manager):
        manager.update_state(execution, {"nodes": {bad_id: "running"}})
    with rejected(manager):
        manager.update_state(execution, {"metrics": {bad_id: {"cpu_time": 1.0}}})
    with rejected(manager):
        manager.update_state(execution, {"current_node": bad_id})


@pytest.mark.parametrize("bad_id", BAD_REQUIRED_IDS)
def test_bad_execution_id_in_update_and_reads(
    manager: StateManager, execution: str, bad_id: Any
) -> None:
    with rejected(manager):
        manager.update_state(bad_id, {"variables": {"n": 2}})
    with rejected(manager):
        manager.get_state(bad_id)
    with rejected(manager):
        manager.get_history(bad_id)


@pytest.mark.parametrize("good_id", GOOD_IDS)
def test_ids_of_1_to_255_code_points_are_accepted(manager: StateManager, good_id: str) -> None:
    state = manager.create_execution(good_id, workflow_id=good_id, actor=good_id)
    assert state.execution_id == good_id
    assert state.workflow_id == good_id
    manager.update_state(
        good_id, {"nodes": {good_id: "running"}, "current_node": good_id}, actor=good_id
    )
    state = manager.get_state(good_id)
    assert list(state.nodes) == [good_id]
    assert state.current_node == good_id
    events = manager.get_history(good_id).events
    assert [event.actor for event in events] == [good_id, good_id, good_id]


# -- update shape ------------------------------------------------------------------


@pytest.mark.parametrize(
    "update",
    [
        pytest.param({}, id="empty-dict"),
        pytest.param(StateUpdate(), id="empty-dataclass"),
        pytest.param({"bogus": 1}, id="unknown-key"),
        pytest.param({"variables": {"n": 2}, "Variables": {"n": 3}}, id="unknown-key-and-known"),
        pytest.param({"node": {"a": "completed"}}, id="misspelt-nodes"),
        pytest.param({"variables": {"x": 1}, "unset_variables": ["y", "x"]}, id="set-and-unset"),
        pytest.param({"unset_variables": [1]}, id="unset-non-str"),
        pytest.param({"unset_variables": "keep"}, id="unset-bare-string"),
        pytest.param({"status": "done"}, id="unknown-status"),
        pytest.param({"status": "RUNNING"}, id="status-wrong-case"),
        pytest.param({"status": "pending"}, id="node-status-as-status"),
        pytest.param({"status": 1}, id="status-int"),
        pytest.param({"nodes": {"a": "done"}}, id="unknown-node-status"),
        pytest.param({"nodes": {"a": "cancelled"}}, id="execution-status-as-node-status"),
        pytest.param({"nodes": {"a": None}}, id="node-status-none"),
        pytest.param({"nodes": {"a": 3}}, id="node-status-int"),
        pytest.param({"nodes": ["a"]}, id="nodes-not-mapping"),
        pytest.param({"metrics": ["a"]}, id="metrics-not-mapping"),
        pytest.param("status", id="str-update"),
        pytest.param(42, id="int-update"),
        pytest.param(None, id="none-update"),
        pytest.param(["status", "running"], id="list-update"),
    ],
)
def test_bad_update_shape(manager: StateManager, execution: str, update: Any) -> None:
    with rejected(manager):
        manager.update_state(execution, update)


def test_bad_field_with_good_fields_rejects_all(manager: StateManager, execution: str) -> None:
    with rejected(manager):
        manager.update_state(
            execution,
            {
                "status": "suspended",
                "nodes": {"a": "completed"},
                "variables": {"ok": 1, "bad": math.nan},
                "context": {"k": "v"},
            },
        )


# -- metrics -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "figures",
    [
        pytest.param({"latency": 1.0}, id="unknown-key"),
        pytest.param({"duration": 1.0, "gpu_time": 1.0}, id="unknown-key-among-good"),
        pytest.param({"duration": -1.0}, id="negative-duration"),
        pytest.param({"cpu_time": -0.001}, id="negative-cpu"),
        pytest.param({"peak_memory": -1}, id="negative-memory"),
        pytest.param({"duration": math.nan}, id="nan"),
        pytest.param({"cpu_time": math.inf}, id="inf"),
        pytest.param({"duration": "1.0"}, id="string"),
        pytest.param({"duration": None}, id="none"),
        pytest.param({"duration": [1.0]}, id="list"),
        pytest.param({"duration": True}, id="bool"),
        pytest.param({1: 1.0}, id="int-key"),
        pytest.param(5, id="not-a-mapping"),
        pytest.param([("duration", 1.0)], id="pairs"),
    ],
)
@pytest.mark.parametrize("moves_node", [False, True], ids=["node-metrics", "with-node-event"])
def test_bad_metrics(manager: StateManager, execution: str, figures: Any, moves_node: bool) -> None:
    update: dict[str, Any] = {"metrics": {"a": figures}}
    if moves_node:
        update["nodes"] = {"a": "completed"}
    with rejected(manager):
        manager.update_state(execution, update)


def test_good_metrics_are_accepted(manager: StateManager, execution: str) -> None:
    figures = {"duration": 0.0, "cpu_time": 0, "peak_memory": 2**40}
    manager.update_state(execution, {"nodes": {"a": "completed"}, "metrics": {"a": figures}})
    event = manager.get_history(execution).events[-1]
    assert event.data["metrics"] == figures


# -- error records -----------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        pytest.param({"message": "m"}, id="no-type"),
        pytest.param({"type": "E"}, id="no-message"),
        pytest.param({}, id="empty"),
        pytest.param({"type": 1, "message": "m"}, id="type-int"),
        pytest.param({"type": None, "message": "m"}, id="type-none"),
        pytest.param({"type": "E", "message": None}, id="message-none"),
        pytest.param({"type": "E", "message": b"m"}, id="message-bytes"),
        pytest.param({"type": "E", "message": "m", "details": math.nan}, id="details-nan"),
        pytest.param({"type": "E", "message": "m", "details": Opaque()}, id="details-object"),
        pytest.param({"type": "E", "message": "m", "details": {1: 2}}, id="details-int-key"),
        pytest.param({"type": "E", "message": "m", "extra": 1}, id="unknown-key"),
        pytest.param("boom", id="str"),
        pytest.param(42, id="int"),
        pytest.param(["E", "m"], id="list"),
        pytest.param(ValueError, id="exception-class"),
    ],
)
def test_bad_error_record(manager: StateManager, execution: str, error: Any) -> None:
    with rejected(manager):
        manager.update_state(execution, {"nodes": {"a": "failed"}, "error": error})
    with rejected(manager):
        manager.update_state(execution, {"status": "failed", "error": error})


# -- sizes -------------------------------------------------------------------------


@pytest.fixture
def small_manager() -> Iterator[StateManager]:
    with StateManager(max_update_bytes=256) as manager:
        manager.create_execution(EXECUTION, workflow_id="wf")
        manager.update_state(EXECUTION, {"nodes": {"a": "running"}})
        yield manager


def test_update_within_max_update_bytes_is_accepted(small_manager: StateManager) -> None:
    small_manager.update_state(EXECUTION, {"variables": {"blob": "a" * 100}})
    assert small_manager.get_state(EXECUTION).variables == {"blob": "a" * 100}


@pytest.mark.parametrize(
    "update",
    [
        pytest.param({"variables": {"blob": "a" * 300}}, id="variables"),
        pytest.param({"context": {"blob": "a" * 300}}, id="context"),
        pytest.param({"variables": {f"k{i}": i for i in range(60)}}, id="many-keys"),
        pytest.param(
            {"variables": {"blob": "a" * 150}, "context": {"blob": "b" * 150}},
            id="variables-plus-context",
        ),
        pytest.param(
            {
                "nodes": {"a": "failed"},
                "error": {"type": "E", "message": "m", "details": {"blob": "a" * 300}},
            },
            id="error",
        ),
    ],
)
def test_update_over_max_update_bytes(small_manager: StateManager, update: dict[str, Any]) -> None:
    with rejected(small_manager):
        small_manager.update_state(EXECUTION, update)


def test_create_over_max_update_bytes(small_manager: StateManager) -> None:
    with rejected(small_manager):
        small_manager.create_execution("big", workflow_id="wf", variables={"blob": "a" * 300})
    with rejected(small_manager):
        small_manager.create_execution("big", workflow_id="wf", context={"blob": "a" * 300})
    with pytest.raises(NotFoundError):
        small_manager.get_state("big")


# -- reads -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(HistoryOptions(since=datetime(2024, 1, 1)), id="naive-since"),
        pytest.param(HistoryOptions(until=datetime(2999, 1, 1)), id="naive-until"),
        pytest.param(HistoryOptions(since="2024-01-01T00:00:00Z"), id="since-string"),  # type: ignore[arg-type]
        pytest.param(HistoryOptions(types="node_start"), id="types-bare-string"),
        pytest.param(HistoryOptions(types=["bogus"]), id="types-unknown"),
        pytest.param(HistoryOptions(types=[1]), id="types-int"),  # type: ignore[list-item]
        pytest.param(HistoryOptions(node_id=""), id="node-id-empty"),
        pytest.param(HistoryOptions(after_version=-1), id="after-version-negative"),
        pytest.param(HistoryOptions(after_version="1"), id="after-version-string"),  # type: ignore[arg-type]
        pytest.param(HistoryOptions(limit=-1), id="limit-negative"),
        pytest.param(HistoryOptions(limit=True), id="limit-bool"),
        pytest.param({"node_id": "a"}, id="dict-not-options"),
    ],
)
def test_bad_history_options(manager: StateManager, execution: str, options: Any) -> None:
    with rejected(manager):
        manager.get_history(execution, options)


@pytest.mark.parametrize(
    "arguments",
    [
        pytest.param({"status": "done"}, id="unknown-status"),
        pytest.param({"status": ["running", "done"]}, id="unknown-status-in-list"),
        pytest.param({"status": "pending"}, id="node-status"),
        pytest.param({"status": [1]}, id="status-int"),
        pytest.param({"workflow_id": ""}, id="workflow-id-empty"),
        pytest.param({"workflow_id": OVERLONG}, id="workflow-id-256"),
        pytest.param({"limit": -1}, id="limit-negative"),
        pytest.param({"limit": "10"}, id="limit-string"),
        pytest.param({"limit": True}, id="limit-bool"),
    ],
)
def test_bad_list_executions_arguments(
    manager: StateManager, execution: str, arguments: dict[str, Any]
) -> None:
    with rejected(manager):
        manager.list_executions(**arguments)


@pytest.mark.parametrize(
    "version",
    [
        pytest.param(0, id="zero"),
        pytest.param(-1, id="negative"),
        pytest.param("1", id="string"),
        pytest.param(1.0, id="float"),
        pytest.param(False, id="False"),
        pytest.param(True, id="True"),  # a bool is not a version, though True == 1
        pytest.param([1], id="list"),
    ],
)
def test_bad_version_argument(manager: StateManager, execution: str, version: Any) -> None:
    with rejected(manager):
        manager.get_state(execution, version=version)


@pytest.mark.parametrize(
    "expected_version",
    [
        pytest.param("3", id="string"),
        pytest.param(3.0, id="float"),
        pytest.param(True, id="True"),
        pytest.param([3], id="list"),
    ],
)
def test_bad_expected_version(manager: StateManager, execution: str, expected_version: Any) -> None:
    with rejected(manager):
        manager.update_state(execution, {"variables": {"n": 2}}, expected_version=expected_version)


@pytest.mark.parametrize(
    "retries",
    [
        pytest.param(-1, id="negative"),
        pytest.param("3", id="string"),
        pytest.param(1.5, id="float"),
        pytest.param(True, id="bool"),
        pytest.param(None, id="None"),
    ],
)
def test_bad_transact_retries(manager: StateManager, execution: str, retries: Any) -> None:
    calls: list[WorkflowState] = []

    def increment(state: WorkflowState) -> dict[str, Any]:
        calls.append(state)
        return {"variables": {"n": state.variables["n"] + 1}}

    with rejected(manager):
        manager.transact(execution, increment, retries=retries)
    assert calls == []


def test_transact_fn_returning_bad_update(manager: StateManager, execution: str) -> None:
    bad_updates: list[Any] = [{}, {"bogus": 1}, {"variables": {"v": math.nan}}, "update"]
    for bad in bad_updates:

        def give(state: WorkflowState, bad: Any = bad) -> Any:
            return bad

        with rejected(manager):
            manager.transact(execution, give)


# -- order of checks ---------------------------------------------------------------


def test_validation_comes_before_not_found(manager: StateManager, execution: str) -> None:
    with rejected(manager):
        manager.update_state("unknown", {"status": "done"})
    with rejected(manager):
        manager.update_state("unknown", {})
    with rejected(manager):
        manager.get_state("unknown", version=0)


def test_not_found_comes_before_conflict(manager: StateManager, execution: str) -> None:
    with pytest.raises(NotFoundError) as info:
        manager.update_state("unknown", {"variables": {"n": 2}}, expected_version=99)
    assert isinstance(info.value, KeyError)


def test_conflict_comes_before_invalid_transition(manager: StateManager, execution: str) -> None:
    manager.update_state(execution, {"status": "completed"})
    before = take_snapshot(manager)
    with pytest.raises(ConflictError) as info:
        manager.update_state(execution, {"variables": {"n": 2}}, expected_version=2)
    assert info.value.expected == 2
    assert info.value.actual == 4
    with pytest.raises(InvalidTransitionError):
        manager.update_state(execution, {"variables": {"n": 2}}, expected_version=4)
    assert take_snapshot(manager) == before


def test_validation_comes_before_conflict_and_transition(
    manager: StateManager, execution: str
) -> None:
    manager.update_state(execution, {"status": "completed"})
    with rejected(manager):
        manager.update_state(execution, {"variables": {"v": math.nan}}, expected_version=1)


def test_unknown_execution_is_not_found(manager: StateManager, execution: str) -> None:
    calls: list[WorkflowState] = []

    def record(state: WorkflowState) -> None:
        calls.append(state)

    operations: list[Callable[[], object]] = [
        lambda: manager.update_state("unknown", {"variables": {"n": 2}}),
        lambda: manager.get_state("unknown"),
        lambda: manager.get_state("unknown", version=1),
        lambda: manager.get_history("unknown"),
        lambda: manager.transact("unknown", record),
    ]
    before = take_snapshot(manager)
    for operation in operations:
        with pytest.raises(NotFoundError) as info:
            operation()
        assert isinstance(info.value, KeyError)
    assert calls == []
    assert take_snapshot(manager) == before
