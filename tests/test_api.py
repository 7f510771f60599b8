"""The public API of the in-memory StateManager against docs/semantics.md.

Every expectation here comes from the contract; where a figure cannot be known in
advance (times, generated ids, durations) it is checked against what the store itself
reports elsewhere (the node's times, the unfiltered history) or against the wall clock.
"""

from __future__ import annotations

import enum
import itertools
import json
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal

import pytest

from wfstate import (
    UNSET,
    AlreadyExistsError,
    BackpressureError,
    ClosedError,
    ConflictError,
    EventCursor,
    EventType,
    ExecutionHistory,
    ExecutionStatus,
    HistoryEvictedError,
    HistoryOptions,
    InvalidTransitionError,
    NodeState,
    NodeStatus,
    NotFoundError,
    StateEvent,
    StateManager,
    StateUpdate,
    WfstateError,
    WorkflowState,
)

# Python and the core read the same realtime clock; the slack only absorbs rounding
# to microseconds.
CLOCK_SLACK = timedelta(milliseconds=1)

Form = Literal["dataclass", "dict"]


@pytest.fixture(params=["dataclass", "dict"])
def form(request: pytest.FixtureRequest) -> Form:
    """Each update is given once as a StateUpdate and once as a plain dict."""
    value: Form = request.param
    return value


def make_update(form: Form, **fields: Any) -> StateUpdate | dict[str, Any]:
    if form == "dataclass":
        return StateUpdate(**fields)
    return dict(fields)


def history(manager: StateManager, execution_id: str) -> list[StateEvent]:
    return manager.get_history(execution_id).events


def events_of(manager: StateManager, execution_id: str, version: int) -> list[StateEvent]:
    return [event for event in history(manager, execution_id) if event.version == version]


def snapshot(
    manager: StateManager, execution_id: str, *, after_version: int | None = None
) -> tuple[WorkflowState, list[StateEvent]]:
    """The current state and the history (after ``after_version`` when the ring is small)."""
    events = manager.get_history(execution_id, HistoryOptions(after_version=after_version))
    return manager.get_state(execution_id), events.events


def now() -> datetime:
    return datetime.now(UTC)


def assert_utc(moment: datetime | None) -> datetime:
    assert moment is not None
    assert moment.tzinfo is not None
    assert moment.utcoffset() == timedelta(0)
    return moment


def read_events(cursor: EventCursor, count: int, *, deadline: float = 5.0) -> list[StateEvent]:
    """Read exactly ``count`` events, waiting at most ``deadline`` seconds in all."""
    events: list[StateEvent] = []
    give_up = time.monotonic() + deadline
    while len(events) < count and time.monotonic() < give_up:
        events.extend(cursor.read(max_events=count - len(events), timeout=0.1))
    return events


def drain(cursor: EventCursor) -> list[StateEvent]:
    """Read until the cursor has nothing more to give."""
    events: list[StateEvent] = []
    while batch := cursor.read(max_events=1000, timeout=0.05):
        events.extend(batch)
    return events


# -- create_execution ---------------------------------------------------------------


def test_create_execution_initial_state(manager: StateManager) -> None:
    before = now()
    state = manager.create_execution(
        "order-1",
        workflow_id="checkout",
        variables={"amount": 12, "items": ["a", "b"]},
        context={"tenant": "t1"},
        actor="api",
    )
    after = now()

    assert state.execution_id == "order-1"
    assert state.workflow_id == "checkout"
    assert state.status is ExecutionStatus.RUNNING
    assert state.current_node is None
    assert state.nodes == {}
    assert state.variables == {"amount": 12, "items": ["a", "b"]}
    assert state.context == {"tenant": "t1"}
    assert state.version == 1
    created_at = assert_utc(state.created_at)
    assert before - CLOCK_SLACK <= created_at <= after + CLOCK_SLACK
    assert assert_utc(state.updated_at) >= created_at
    assert manager.get_state("order-1") == state
    assert len(manager) == 1


def test_create_execution_defaults(manager: StateManager) -> None:
    state = manager.create_execution("order-2", workflow_id="checkout")
    assert state.variables == {}
    assert state.context == {}
    (event,) = history(manager, "order-2")
    assert event.actor is None
    assert event.data == {"workflow_id": "checkout", "variables": {}, "context": {}}


def test_create_execution_records_execution_created(manager: StateManager) -> None:
    state = manager.create_execution(
        "order-3",
        workflow_id="checkout",
        variables={"amount": 12},
        context={"tenant": "t1"},
        actor="api",
    )
    (event,) = history(manager, "order-3")
    assert event.type is EventType.EXECUTION_CREATED
    assert event.execution_id == "order-3"
    assert event.version == 1
    assert event.node_id is None
    assert event.actor == "api"
    assert event.data == {
        "workflow_id": "checkout",
        "variables": {"amount": 12},
        "context": {"tenant": "t1"},
    }
    assert assert_utc(event.timestamp) >= state.created_at - CLOCK_SLACK


def test_generated_ids_are_unique_uuid7_strings(manager: StateManager) -> None:
    ids: list[str] = []
    for _ in range(200):
        before_ms = time.time_ns() // 1_000_000
        state = manager.create_execution(None, workflow_id="wf")
        after_ms = time.time_ns() // 1_000_000
        assert isinstance(state.execution_id, str)
        parsed = uuid.UUID(state.execution_id)
        assert str(parsed) == state.execution_id  # canonical lower-case hyphenated form
        assert parsed.version == 7
        # UUIDv7 carries its creation time in milliseconds in the first 48 bits.
        assert before_ms - 1 <= parsed.int >> 80 <= after_ms + 1
        assert manager.get_state(state.execution_id) == state
        ids.append(state.execution_id)
    assert len(set(ids)) == len(ids)
    assert len(manager) == len(ids)
    timestamps = [uuid.UUID(execution_id).int >> 80 for execution_id in ids]
    assert timestamps == sorted(timestamps)


def test_duplicate_id_raises_already_exists_and_changes_nothing(manager: StateManager) -> None:
    manager.create_execution("dup", workflow_id="first", variables={"a": 1})
    before = snapshot(manager, "dup")
    with pytest.raises(AlreadyExistsError) as info:
        manager.create_execution("dup", workflow_id="second", variables={"a": 2})
    assert isinstance(info.value, WfstateError)
    assert snapshot(manager, "dup") == before
    assert manager.get_state("dup").workflow_id == "first"
    assert len(manager) == 1


def test_duplicate_of_generated_id_raises(manager: StateManager) -> None:
    generated = manager.create_execution(None, workflow_id="wf").execution_id
    with pytest.raises(AlreadyExistsError):
        manager.create_execution(generated, workflow_id="other")
    assert manager.get_state(generated).workflow_id == "wf"


# -- update_state: one field at a time ----------------------------------------------


def test_update_status(manager: StateManager, form: Form) -> None:
    manager.create_execution("e", workflow_id="wf")
    version = manager.update_state(
        "e", make_update(form, status=ExecutionStatus.SUSPENDED), actor="scheduler"
    )
    assert version == 2
    state = manager.get_state("e")
    assert state.version == 2
    assert state.status is ExecutionStatus.SUSPENDED
    (event,) = events_of(manager, "e", 2)
    assert event.type is EventType.STATUS_CHANGE
    assert event.data == {"from": "running", "to": "suspended"}
    assert event.node_id is None
    assert event.actor == "scheduler"
    assert event.execution_id == "e"


def test_update_current_node_set_and_clear(manager: StateManager, form: Form) -> None:
    manager.create_execution("e", workflow_id="wf")
    assert manager.update_state("e", make_update(form, current_node="charge")) == 2
    assert manager.get_state("e").current_node == "charge"
    (event,) = events_of(manager, "e", 2)
    assert event.type is EventType.CURRENT_NODE_CHANGED
    assert event.data == {"from": None, "to": "charge"}

    assert manager.update_state("e", make_update(form, current_node="ship")) == 3
    (event,) = events_of(manager, "e", 3)
    assert event.data == {"from": "charge", "to": "ship"}

    assert manager.update_state("e", make_update(form, current_node=None)) == 4
    assert manager.get_state("e").current_node is None
    (event,) = events_of(manager, "e", 4)
    assert event.type is EventType.CURRENT_NODE_CHANGED
    assert event.data == {"from": "ship", "to": None}


def test_unset_current_node_leaves_it(manager: StateManager) -> None:
    manager.create_execution("e", workflow_id="wf")
    manager.update_state("e", {"current_node": "charge"})
    manager.update_state("e", StateUpdate(current_node=UNSET, variables={"a": 1}))
    assert manager.get_state("e").current_node == "charge"
    assert [event.type for event in events_of(manager, "e", 3)] == [EventType.VARIABLES_CHANGED]


def test_update_variables_merge(manager: StateManager, form: Form) -> None:
    manager.create_execution("e", workflow_id="wf", variables={"a": 1, "b": {"x": 1}})
    assert manager.update_state("e", make_update(form, variables={"b": {"y": 2}, "c": [3]})) == 2
    # Merged key by key at the top level: "b" is replaced, not deep-merged.
    assert manager.get_state("e").variables == {"a": 1, "b": {"y": 2}, "c": [3]}
    (event,) = events_of(manager, "e", 2)
    assert event.type is EventType.VARIABLES_CHANGED
    assert event.data == {"set": {"b": {"y": 2}, "c": [3]}, "unset": []}


def test_update_unset_variables(manager: StateManager, form: Form) -> None:
    manager.create_execution("e", workflow_id="wf", variables={"a": 1, "b": 2, "c": 3})
    version = manager.update_state(
        "e", make_update(form, variables={"d": 4}, unset_variables=["c", "absent", "a"])
    )
    assert version == 2
    assert manager.get_state("e").variables == {"b": 2, "d": 4}
    (event,) = events_of(manager, "e", 2)
    assert event.type is EventType.VARIABLES_CHANGED
    # Only the names that existed, in the order given.
    assert event.data == {"set": {"d": 4}, "unset": ["c", "a"]}


def test_update_unset_variables_alone(manager: StateManager, form: Form) -> None:
    manager.create_execution("e", workflow_id="wf", variables={"a": 1, "b": 2})
    assert manager.update_state("e", make_update(form, unset_variables=("b",))) == 2
    assert manager.get_state("e").variables == {"a": 1}
    (event,) = events_of(manager, "e", 2)
    assert event.data == {"set": {}, "unset": ["b"]}


def test_update_context_merge(manager: StateManager, form: Form) -> None:
    manager.create_execution("e", workflow_id="wf", context={"tenant": "t1", "region": "eu"})
    assert manager.update_state("e", make_update(form, context={"region": "us", "n": 1})) == 2
    assert manager.get_state("e").context == {"tenant": "t1", "region": "us", "n": 1}
    (event,) = events_of(manager, "e", 2)
    assert event.type is EventType.CONTEXT_CHANGED
    assert event.data == {"set": {"region": "us", "n": 1}}


def test_update_error_without_node(manager: StateManager, form: Form) -> None:
    manager.create_execution("e", workflow_id="wf")
    record = {"type": "Timeout", "message": "gave up", "details": {"after": 30}}
    version = manager.update_state("e", make_update(form, status="failed", error=record))
    assert version == 2
    events = events_of(manager, "e", 2)
    assert [event.type for event in events] == [EventType.STATUS_CHANGE, EventType.ERROR]
    assert events[1].data == record
    assert events[1].node_id is None


def test_update_metrics_of_unmoved_node(manager: StateManager, form: Form) -> None:
    manager.create_execution("e", workflow_id="wf")
    manager.update_state("e", {"nodes": {"train": "running"}})
    figures = {"duration": 1.25, "cpu_time": 0.5, "peak_memory": 4096}
    assert manager.update_state("e", make_update(form, metrics={"train": figures})) == 3
    (event,) = events_of(manager, "e", 3)
    assert event.type is EventType.NODE_METRICS
    assert event.node_id == "train"
    assert event.data == {"metrics": figures}
    # Metrics do not move the node.
    node = manager.get_state("e").nodes["train"]
    assert node.status is NodeStatus.RUNNING
    assert node.attempts == 1


def test_every_field_in_one_update_emits_events_in_documented_order(
    manager: StateManager, form: Form
) -> None:
    manager.create_execution("e", workflow_id="wf", variables={"y": 0})
    manager.update_state("e", {"nodes": {"a": "running", "m": "running"}})
    record = {"type": "Timeout", "message": "took too long", "details": {"after": 30}}
    metrics_a = {"duration": 1.5, "cpu_time": 0.25, "peak_memory": 1024}
    metrics_m = {"duration": 0.5, "cpu_time": 0.125, "peak_memory": 2048}
    update = make_update(
        form,
        status=ExecutionStatus.FAILED,
        nodes={"a": NodeStatus.FAILED, "b": "pending", "c": NodeStatus.SKIPPED},
        error=record,
        metrics={"a": metrics_a, "m": metrics_m},
        current_node="c",
        variables={"x": 1},
        unset_variables=["y"],
        context={"k": "v"},
    )
    assert manager.update_state("e", update, actor="engine") == 3

    events = events_of(manager, "e", 3)
    assert [(event.type, event.node_id) for event in events] == [
        (EventType.STATUS_CHANGE, None),
        (EventType.NODE_FAILED, "a"),
        (EventType.NODE_PENDING, "b"),
        (EventType.NODE_SKIPPED, "c"),
        (EventType.ERROR, "a"),  # the update fails exactly one node
        (EventType.NODE_METRICS, "m"),
        (EventType.CURRENT_NODE_CHANGED, None),
        (EventType.VARIABLES_CHANGED, None),
        (EventType.CONTEXT_CHANGED, None),
    ]
    assert [event.data for event in events] == [
        {"from": "running", "to": "failed"},
        {
            "from": "running",
            "to": "failed",
            "attempt": 1,
            "duration": 1.5,  # the reported figure wins over the wall time
            "metrics": metrics_a,
        },
        {"from": None, "to": "pending"},
        {"from": "pending", "to": "skipped"},
        record,
        {"metrics": metrics_m},
        {"from": None, "to": "c"},
        {"set": {"x": 1}, "unset": ["y"]},
        {"set": {"k": "v"}},
    ]
    assert all(event.actor == "engine" for event in events)
    assert all(event.execution_id == "e" for event in events)
    seqs = [event.seq for event in events]
    assert seqs == sorted(set(seqs))

    state = manager.get_state("e")
    assert state.version == 3
    assert state.status is ExecutionStatus.FAILED
    assert state.current_node == "c"
    assert state.variables == {"x": 1}
    assert state.context == {"k": "v"}
    assert {node_id: node.status for node_id, node in state.nodes.items()} == {
        "a": NodeStatus.FAILED,
        "m": NodeStatus.RUNNING,
        "b": NodeStatus.PENDING,
        "c": NodeStatus.SKIPPED,
    }
    assert state.nodes["a"].error == record
    assert state.nodes["m"].error is None


# -- nodes -------------------------------------------------------------------------


def test_node_pending_creates_node_with_zero_attempts(manager: StateManager, form: Form) -> None:
    manager.create_execution("e", workflow_id="wf")
    manager.update_state("e", make_update(form, nodes={"a": NodeStatus.PENDING}))
    node = manager.get_state("e").nodes["a"]
    assert node.status is NodeStatus.PENDING
    assert node.attempts == 0
    assert node.started_at is None
    assert node.finished_at is None
    assert node.error is None
    (event,) = events_of(manager, "e", 2)
    assert event.type is EventType.NODE_PENDING
    assert event.node_id == "a"
    assert event.data == {"from": None, "to": "pending"}


def test_node_start_from_pending(manager: StateManager) -> None:
    manager.create_execution("e", workflow_id="wf")
    manager.update_state("e", {"nodes": {"a": "pending"}})
    before = now()
    manager.update_state("e", {"nodes": {"a": "running"}})
    after = now()
    node = manager.get_state("e").nodes["a"]
    assert node.status is NodeStatus.RUNNING
    assert node.attempts == 1
    assert before - CLOCK_SLACK <= assert_utc(node.started_at) <= after + CLOCK_SLACK
    assert node.finished_at is None
    (event,) = events_of(manager, "e", 3)
    assert event.type is EventType.NODE_START
    assert event.data == {"from": "pending", "to": "running", "attempt": 1}


def test_node_start_from_absent_counts_as_pending(manager: StateManager) -> None:
    manager.create_execution("e", workflow_id="wf")
    manager.update_state("e", {"nodes": {"a": "running"}})
    (event,) = events_of(manager, "e", 2)
    assert event.type is EventType.NODE_START
    assert event.data == {"from": "pending", "to": "running", "attempt": 1}
    assert manager.get_state("e").nodes["a"].attempts == 1


def test_node_complete_duration_is_wall_time(manager: StateManager) -> None:
    manager.create_execution("e", workflow_id="wf")
    manager.update_state("e", {"nodes": {"a": "running"}})
    time.sleep(0.05)
    before = now()
    manager.update_state("e", {"nodes": {"a": "completed"}})
    after = now()
    node = manager.get_state("e").nodes["a"]
    assert node.status is NodeStatus.COMPLETED
    assert node.attempts == 1
    started_at = assert_utc(node.started_at)
    finished_at = assert_utc(node.finished_at)
    assert before - CLOCK_SLACK <= finished_at <= after + CLOCK_SLACK
    (event,) = events_of(manager, "e", 3)
    assert event.type is EventType.NODE_COMPLETE
    assert set(event.data) == {"from", "to", "attempt", "duration"}
    assert event.data["from"] == "running"
    assert event.data["to"] == "completed"
    assert event.data["attempt"] == 1
    duration = event.data["duration"]
    assert duration >= 0.045
    assert duration == pytest.approx((finished_at - started_at).total_seconds(), abs=0.005)


def test_node_complete_with_metrics(manager: StateManager) -> None:
    manager.create_execution("e", workflow_id="wf")
    manager.update_state("e", {"nodes": {"a": "running"}})
    figures = {"duration": 2.5, "cpu_time": 1.0, "peak_memory": 1 << 20}
    manager.update_state("e", {"nodes": {"a": "completed"}, "metrics": {"a": figures}})
    (event,) = events_of(manager, "e", 3)
    assert event.type is EventType.NODE_COMPLETE
    assert event.data == {
        "from": "running",
        "to": "completed",
        "attempt": 1,
        "duration": 2.5,
        "metrics": figures,
    }


def test_metrics_without_duration_keep_wall_time(manager: StateManager) -> None:
    manager.create_execution("e", workflow_id="wf")
    manager.update_state("e", {"nodes": {"a": "running"}})
    time.sleep(0.03)
    manager.update_state("e", {"nodes": {"a": "completed"}, "metrics": {"a": {"cpu_time": 0.5}}})
    (event,) = events_of(manager, "e", 3)
    node = manager.get_state("e").nodes["a"]
    wall = (assert_utc(node.finished_at) - assert_utc(node.started_at)).total_seconds()
    assert event.data["duration"] == pytest.approx(wall, abs=0.005)
    assert event.data["duration"] >= 0.025
    assert event.data["metrics"]["cpu_time"] == 0.5


def test_node_skipped_from_absent_and_failed(manager: StateManager) -> None:
    manager.create_execution("e", workflow_id="wf")
    manager.update_state("e", {"nodes": {"a": "skipped"}})
    node = manager.get_state("e").nodes["a"]
    assert node.status is NodeStatus.SKIPPED
    assert node.attempts == 0
    assert node.finished_at is not None
    (event,) = events_of(manager, "e", 2)
    assert event.type is EventType.NODE_SKIPPED
    assert event.data == {"from": "pending", "to": "skipped"}

    manager.update_state("e", {"nodes": {"b": "running"}})
    manager.update_state("e", {"nodes": {"b": "failed"}})
    manager.update_state("e", {"nodes": {"b": "skipped"}, "metrics": {"b": {"cpu_time": 0.1}}})
    (event,) = events_of(manager, "e", 5)
    assert event.type is EventType.NODE_SKIPPED
    assert event.data == {"from": "failed", "to": "skipped", "metrics": {"cpu_time": 0.1}}
    assert manager.get_state("e").nodes["b"].attempts == 1


def test_node_attempts_count_restarts_after_failure(manager: StateManager) -> None:
    manager.create_execution("e", workflow_id="wf")
    record = {"type": "Flaky", "message": "try again", "details": None}
    previous_start: datetime | None = None
    for attempt in (1, 2, 3):
        version = manager.update_state("e", {"nodes": {"a": "running"}})
        node = manager.get_state("e").nodes["a"]
        assert node.status is NodeStatus.RUNNING
        assert node.attempts == attempt
        assert node.finished_at is None
        assert node.error is None  # a new attempt clears the previous error
        started_at = assert_utc(node.started_at)
        if previous_start is not None:
            assert started_at > previous_start
        previous_start = started_at
        (event,) = events_of(manager, "e", version)
        assert event.type is EventType.NODE_START
        expected_from = "pending" if attempt == 1 else "failed"
        assert event.data == {"from": expected_from, "to": "running", "attempt": attempt}
        time.sleep(0.002)

        if attempt < 3:
            version = manager.update_state("e", {"nodes": {"a": "failed"}, "error": record})
            node = manager.get_state("e").nodes["a"]
            assert node.status is NodeStatus.FAILED
            assert node.attempts == attempt
            assert node.error == record
            assert assert_utc(node.finished_at) >= started_at
            node_event, error_event = events_of(manager, "e", version)
            assert node_event.type is EventType.NODE_FAILED
            assert node_event.data["attempt"] == attempt
            assert node_event.data["from"] == "running"
            assert node_event.data["to"] == "failed"
            assert error_event.type is EventType.ERROR
            assert error_event.node_id == "a"
            assert error_event.data == record
            time.sleep(0.002)

    version = manager.update_state("e", {"nodes": {"a": "completed"}})
    (event,) = events_of(manager, "e", version)
    assert event.data["attempt"] == 3
    assert manager.get_state("e").nodes["a"].attempts == 3


def test_node_failed_without_error_stores_none(manager: StateManager) -> None:
    manager.create_execution("e", workflow_id="wf")
    manager.update_state("e", {"nodes": {"a": "running"}})
    manager.update_state("e", {"nodes": {"a": "failed"}})
    assert manager.get_state("e").nodes["a"].error is None
    assert [event.type for event in events_of(manager, "e", 3)] == [EventType.NODE_FAILED]


def test_error_attached_to_every_failed_node(manager: StateManager) -> None:
    manager.create_execution("e", workflow_id="wf")
    manager.update_state("e", {"nodes": {"a": "running", "b": "running", "c": "running"}})
    record = {"type": "Crash", "message": "worker lost", "details": {"worker": 7}}
    manager.update_state("e", {"nodes": {"a": "failed", "b": "failed"}, "error": record})
    nodes = manager.get_state("e").nodes
    assert nodes["a"].error == record
    assert nodes["b"].error == record
    assert nodes["c"].error is None
    events = events_of(manager, "e", 3)
    assert [(event.type, event.node_id) for event in events] == [
        (EventType.NODE_FAILED, "a"),
        (EventType.NODE_FAILED, "b"),
        (EventType.ERROR, None),  # two nodes failed: the error is about none of them alone
    ]
    assert events[2].data == record


def test_error_without_details(manager: StateManager) -> None:
    manager.create_execution("e", workflow_id="wf")
    manager.update_state("e", {"nodes": {"a": "running"}})
    manager.update_state(
        "e", {"nodes": {"a": "failed"}, "error": {"type": "Oops", "message": "no details"}}
    )
    error = manager.get_state("e").nodes["a"].error
    assert error is not None
    assert error["type"] == "Oops"
    assert error["message"] == "no details"
    (_, event) = events_of(manager, "e", 3)
    assert event.data["type"] == "Oops"
    assert event.data["message"] == "no details"


class PaymentDeclinedError(Exception):
    """An application exception with a module outside builtins."""


def _fail_in_helper() -> None:
    raise ValueError("boom at depth")


def _raised(fn: Callable[[], None]) -> BaseException:
    try:
        fn()
    except Exception as exc:
        return exc
    raise AssertionError("fn did not raise")


def test_error_from_builtin_exception(manager: StateManager, form: Form) -> None:
    manager.create_execution("e", workflow_id="wf")
    manager.update_state("e", {"nodes": {"a": "running"}})
    exc = _raised(_fail_in_helper)
    manager.update_state("e", make_update(form, nodes={"a": "failed"}, error=exc))
    error = manager.get_state("e").nodes["a"].error
    assert error is not None
    assert error["type"] == "ValueError"
    assert error["message"] == "boom at depth"
    traceback_text = error["details"]["traceback"]
    assert isinstance(traceback_text, str)
    assert "_fail_in_helper" in traceback_text
    assert "ValueError: boom at depth" in traceback_text
    (_, event) = events_of(manager, "e", 3)
    assert event.type is EventType.ERROR
    assert event.data == error


def test_error_from_application_exception(manager: StateManager) -> None:
    manager.create_execution("e", workflow_id="wf")
    manager.update_state("e", {"nodes": {"a": "running"}})

    def decline() -> None:
        raise PaymentDeclinedError("card 4242 declined")

    exc = _raised(decline)
    manager.update_state("e", StateUpdate(nodes={"a": "failed"}, error=exc))
    error = manager.get_state("e").nodes["a"].error
    assert error is not None
    qualified = f"{PaymentDeclinedError.__module__}.{PaymentDeclinedError.__qualname__}"
    assert error["type"] == qualified
    assert error["message"] == "card 4242 declined"
    assert "decline" in error["details"]["traceback"]


# -- enum members and string values -----------------------------------------------


@pytest.mark.parametrize(
    "status", [ExecutionStatus.SUSPENDED, "suspended"], ids=["member", "string"]
)
def test_execution_status_member_or_string(
    manager: StateManager, status: ExecutionStatus | str
) -> None:
    manager.create_execution("e", workflow_id="wf")
    manager.update_state("e", {"status": status})
    state = manager.get_state("e")
    assert state.status is ExecutionStatus.SUSPENDED
    (event,) = events_of(manager, "e", 2)
    assert event.data == {"from": "running", "to": "suspended"}


@pytest.mark.parametrize("status", [NodeStatus.RUNNING, "running"], ids=["member", "string"])
def test_node_status_member_or_string(manager: StateManager, status: NodeStatus | str) -> None:
    manager.create_execution("e", workflow_id="wf")
    manager.update_state("e", StateUpdate(nodes={"a": status}))
    node = manager.get_state("e").nodes["a"]
    assert node.status is NodeStatus.RUNNING
    (event,) = events_of(manager, "e", 2)
    assert event.type is EventType.NODE_START


def test_history_types_member_or_string(manager: StateManager) -> None:
    manager.create_execution("e", workflow_id="wf")
    manager.update_state("e", {"nodes": {"a": "running"}, "variables": {"x": 1}})
    by_member = manager.get_history("e", HistoryOptions(types=[EventType.NODE_START]))
    by_string = manager.get_history("e", HistoryOptions(types=["node_start"]))
    assert [event.type for event in by_member.events] == [EventType.NODE_START]
    assert by_member.events == by_string.events


@pytest.mark.parametrize(
    "status",
    [ExecutionStatus.SUSPENDED, "suspended", [ExecutionStatus.SUSPENDED], ("suspended",)],
    ids=["member", "string", "member-list", "string-tuple"],
)
def test_list_executions_status_member_or_string(
    manager: StateManager, status: ExecutionStatus | str | list[ExecutionStatus] | tuple[str]
) -> None:
    manager.create_execution("running", workflow_id="wf")
    manager.create_execution("suspended", workflow_id="wf")
    manager.update_state("suspended", {"status": "suspended"})
    listed = manager.list_executions(status=status)
    assert [state.execution_id for state in listed] == ["suspended"]


def test_returned_types_are_enum_members(manager: StateManager) -> None:
    manager.create_execution("e", workflow_id="wf")
    manager.update_state("e", {"nodes": {"a": "running"}})
    state = manager.get_state("e")
    assert type(state.status) is ExecutionStatus
    assert type(state.nodes["a"].status) is NodeStatus
    assert all(type(event.type) is EventType for event in history(manager, "e"))


# -- transition tables -------------------------------------------------------------

EXECUTION_ALLOWED = {
    ("running", "suspended"),
    ("running", "completed"),
    ("running", "failed"),
    ("running", "cancelled"),
    ("suspended", "running"),
    ("suspended", "failed"),
    ("suspended", "cancelled"),
    ("failed", "running"),
}
EXECUTION_PATHS: dict[str, list[str]] = {
    "running": [],
    "suspended": ["suspended"],
    "failed": ["failed"],
    "completed": ["completed"],
    "cancelled": ["cancelled"],
}
EXECUTION_DISALLOWED = sorted(
    (old, new)
    for old in EXECUTION_PATHS
    for new in EXECUTION_PATHS
    if (old, new) not in EXECUTION_ALLOWED
)

ABSENT = "absent"
NODE_ALLOWED = {
    (ABSENT, "pending"),
    (ABSENT, "running"),
    (ABSENT, "skipped"),
    ("pending", "running"),
    ("pending", "skipped"),
    ("running", "completed"),
    ("running", "failed"),
    ("failed", "running"),
    ("failed", "skipped"),
}
NODE_PATHS: dict[str, list[str]] = {
    ABSENT: [],
    "pending": ["pending"],
    "running": ["running"],
    "failed": ["running", "failed"],
    "completed": ["running", "completed"],
    "skipped": ["skipped"],
}
NODE_DISALLOWED = sorted(
    (old, new)
    for old in NODE_PATHS
    for new in ("pending", "running", "completed", "failed", "skipped")
    if (old, new) not in NODE_ALLOWED
)


def _execution_at(manager: StateManager, status: str) -> str:
    manager.create_execution("e", workflow_id="wf")
    for step in EXECUTION_PATHS[status]:
        manager.update_state("e", {"status": step})
    assert manager.get_state("e").status == status
    return "e"


def _node_at(manager: StateManager, status: str) -> str:
    manager.create_execution("e", workflow_id="wf")
    for step in NODE_PATHS[status]:
        manager.update_state("e", {"nodes": {"a": step}})
    nodes = manager.get_state("e").nodes
    if status == ABSENT:
        assert "a" not in nodes
    else:
        assert nodes["a"].status == status
    return "e"


@pytest.mark.parametrize("as_member", [True, False], ids=["member", "string"])
@pytest.mark.parametrize(("old", "new"), sorted(EXECUTION_ALLOWED))
def test_execution_transition_allowed(
    manager: StateManager, old: str, new: str, as_member: bool
) -> None:
    execution_id = _execution_at(manager, old)
    version = manager.get_state(execution_id).version
    target: ExecutionStatus | str = ExecutionStatus(new) if as_member else new
    assert manager.update_state(execution_id, {"status": target}) == version + 1
    state = manager.get_state(execution_id)
    assert state.status == new
    assert state.version == version + 1
    (event,) = events_of(manager, execution_id, version + 1)
    assert event.type is EventType.STATUS_CHANGE
    assert event.data == {"from": old, "to": new}


@pytest.mark.parametrize(("old", "new"), EXECUTION_DISALLOWED)
def test_execution_transition_disallowed(manager: StateManager, old: str, new: str) -> None:
    execution_id = _execution_at(manager, old)
    before = snapshot(manager, execution_id)
    with pytest.raises(InvalidTransitionError) as info:
        manager.update_state(execution_id, {"status": new})
    assert isinstance(info.value, WfstateError)
    assert snapshot(manager, execution_id) == before


@pytest.mark.parametrize("as_member", [True, False], ids=["member", "string"])
@pytest.mark.parametrize(("old", "new"), sorted(NODE_ALLOWED))
def test_node_transition_allowed(
    manager: StateManager, old: str, new: str, as_member: bool
) -> None:
    execution_id = _node_at(manager, old)
    version = manager.get_state(execution_id).version
    target: NodeStatus | str = NodeStatus(new) if as_member else new
    assert manager.update_state(execution_id, {"nodes": {"a": target}}) == version + 1
    assert manager.get_state(execution_id).nodes["a"].status == new
    (event,) = events_of(manager, execution_id, version + 1)
    assert event.node_id == "a"
    assert event.data["to"] == new
    if new != "pending":
        assert event.data["from"] == ("pending" if old == ABSENT else old)


@pytest.mark.parametrize(("old", "new"), NODE_DISALLOWED)
def test_node_transition_disallowed(manager: StateManager, old: str, new: str) -> None:
    execution_id = _node_at(manager, old)
    before = snapshot(manager, execution_id)
    with pytest.raises(InvalidTransitionError):
        manager.update_state(execution_id, {"nodes": {"a": new}})
    assert snapshot(manager, execution_id) == before


def test_one_bad_node_rejects_the_whole_update(manager: StateManager) -> None:
    manager.create_execution("e", workflow_id="wf")
    manager.update_state("e", {"nodes": {"done": "running"}})
    manager.update_state("e", {"nodes": {"done": "completed"}})
    before = snapshot(manager, "e")
    with pytest.raises(InvalidTransitionError):
        manager.update_state(
            "e",
            {
                "status": "suspended",
                "nodes": {"fresh": "running", "done": "running"},
                "variables": {"x": 1},
            },
        )
    assert snapshot(manager, "e") == before


@pytest.mark.parametrize("final", ["completed", "cancelled"])
@pytest.mark.parametrize(
    "update",
    [
        {"variables": {"x": 1}},
        {"context": {"x": 1}},
        {"current_node": "a"},
        {"nodes": {"a": "running"}},
        {"status": "running"},
        {"status": "running", "variables": {"x": 1}},
    ],
    ids=["variables", "context", "current_node", "nodes", "status", "status+variables"],
)
def test_final_execution_accepts_no_update(
    manager: StateManager, final: str, update: dict[str, Any]
) -> None:
    execution_id = _execution_at(manager, final)
    before = snapshot(manager, execution_id)
    with pytest.raises(InvalidTransitionError):
        manager.update_state(execution_id, update)
    assert snapshot(manager, execution_id) == before


@pytest.mark.parametrize(
    "update",
    [
        {"variables": {"x": 1}},
        {"context": {"x": 1}},
        {"current_node": "a"},
        {"nodes": {"a": "running"}},
        {"status": "suspended"},
    ],
    ids=["variables", "context", "current_node", "nodes", "status-suspended"],
)
def test_failed_execution_accepts_only_resume(
    manager: StateManager, update: dict[str, Any]
) -> None:
    execution_id = _execution_at(manager, "failed")
    before = snapshot(manager, execution_id)
    with pytest.raises(InvalidTransitionError):
        manager.update_state(execution_id, update)
    assert snapshot(manager, execution_id) == before


def test_failed_execution_resumes_with_retry(manager: StateManager) -> None:
    manager.create_execution("e", workflow_id="wf")
    manager.update_state("e", {"nodes": {"a": "running"}})
    record = {"type": "Boom", "message": "broke", "details": None}
    manager.update_state("e", {"status": "failed", "nodes": {"a": "failed"}, "error": record})
    version = manager.update_state(
        "e", {"status": "running", "nodes": {"a": "running"}, "variables": {"retry": True}}
    )
    assert version == 4
    state = manager.get_state("e")
    assert state.status is ExecutionStatus.RUNNING
    assert state.nodes["a"].attempts == 2
    assert state.nodes["a"].error is None
    assert state.variables == {"retry": True}
    events = events_of(manager, "e", 4)
    assert [event.type for event in events] == [
        EventType.STATUS_CHANGE,
        EventType.NODE_START,
        EventType.VARIABLES_CHANGED,
    ]
    assert events[0].data == {"from": "failed", "to": "running"}
    assert events[1].data == {"from": "failed", "to": "running", "attempt": 2}
    # Resumed, it accepts ordinary updates again.
    assert manager.update_state("e", {"variables": {"y": 2}}) == 5


# -- optimistic concurrency ---------------------------------------------------------


def test_expected_version_matches(manager: StateManager) -> None:
    manager.create_execution("e", workflow_id="wf")
    assert manager.update_state("e", {"variables": {"a": 1}}, expected_version=1) == 2
    assert manager.update_state("e", {"variables": {"a": 2}}, expected_version=2) == 3
    assert manager.get_state("e").variables == {"a": 2}


@pytest.mark.parametrize("stale", [1, 2, 4, 99])
def test_conflict_error_carries_versions(manager: StateManager, stale: int) -> None:
    manager.create_execution("e", workflow_id="wf")
    manager.update_state("e", {"variables": {"a": 1}})
    manager.update_state("e", {"variables": {"a": 2}})
    before = snapshot(manager, "e")
    with pytest.raises(ConflictError) as info:
        manager.update_state("e", {"variables": {"a": 3}}, expected_version=stale)
    assert info.value.expected == stale
    assert info.value.actual == 3
    assert info.value.execution_id == "e"
    assert isinstance(info.value, WfstateError)
    assert snapshot(manager, "e") == before


# -- transact ----------------------------------------------------------------------


def test_transact_applies_update_to_read_state(manager: StateManager) -> None:
    manager.create_execution("e", workflow_id="wf", variables={"n": 5})
    seen: list[int] = []

    def double(state: WorkflowState) -> dict[str, Any]:
        seen.append(state.version)
        return {"variables": {"n": state.variables["n"] * 2}}

    assert manager.transact("e", double, actor="tx") == 2
    assert seen == [1]
    assert manager.get_state("e").variables == {"n": 10}
    (event,) = events_of(manager, "e", 2)
    assert event.actor == "tx"


def test_transact_none_writes_nothing(manager: StateManager) -> None:
    manager.create_execution("e", workflow_id="wf")
    manager.update_state("e", {"variables": {"a": 1}})
    before = snapshot(manager, "e")
    assert manager.transact("e", lambda state: None) == 2
    assert snapshot(manager, "e") == before


def test_transact_exception_propagates_and_writes_nothing(manager: StateManager) -> None:
    manager.create_execution("e", workflow_id="wf")
    before = snapshot(manager, "e")

    def explode(state: WorkflowState) -> StateUpdate:
        raise LookupError("from fn")

    with pytest.raises(LookupError, match="from fn"):
        manager.transact("e", explode)
    assert snapshot(manager, "e") == before


def test_transact_retries_then_raises_last_conflict(manager: StateManager) -> None:
    manager.create_execution("e", workflow_id="wf", variables={"n": 0})
    calls: list[int] = []

    def always_raced(state: WorkflowState) -> dict[str, Any]:
        calls.append(state.version)
        # Another writer gets in between the read and the write every time.
        manager.update_state("e", {"variables": {"other": len(calls)}})
        return {"variables": {"n": state.variables["n"] + 1}}

    with pytest.raises(ConflictError) as info:
        manager.transact("e", always_raced, retries=3)
    assert len(calls) == 4  # the first call and 3 retries
    assert calls == [1, 2, 3, 4]
    assert info.value.expected == 4
    assert info.value.actual == 5
    state = manager.get_state("e")
    assert state.variables == {"n": 0, "other": 4}
    assert state.version == 5


def test_transact_succeeds_after_a_conflict(manager: StateManager) -> None:
    manager.create_execution("e", workflow_id="wf", variables={"n": 0})
    calls: list[int] = []

    def raced_once(state: WorkflowState) -> dict[str, Any]:
        calls.append(state.version)
        if len(calls) == 1:
            manager.update_state("e", {"variables": {"n": 100}})
        return {"variables": {"n": state.variables["n"] + 1}}

    assert manager.transact("e", raced_once, retries=1) == 3
    assert calls == [1, 2]
    assert manager.get_state("e").variables == {"n": 101}


# -- reads of past versions ---------------------------------------------------------


def test_get_state_of_past_versions(manager: StateManager) -> None:
    manager.create_execution("e", workflow_id="wf", variables={"a": 1}, context={"c": 0})
    recorded = {1: manager.get_state("e")}
    updates: list[dict[str, Any]] = [
        {"nodes": {"a": "running"}, "current_node": "a"},
        {"variables": {"b": [1, 2]}, "context": {"c": 1}},
        {"metrics": {"a": {"cpu_time": 0.5}}},
        {"nodes": {"a": "failed"}, "error": {"type": "E", "message": "m", "details": None}},
        {"nodes": {"a": "running", "b": "pending"}, "unset_variables": ["a"]},
        {"status": "suspended", "current_node": None},
        {"status": "running"},
        {"nodes": {"a": "completed", "b": "skipped"}},
    ]
    for update in updates:
        version = manager.update_state("e", update)
        recorded[version] = manager.get_state("e")
        time.sleep(0.001)
    assert sorted(recorded) == list(range(1, len(updates) + 2))
    for version, state in recorded.items():
        past = manager.get_state("e", version=version)
        assert past == state
        assert past.version == version
        assert past.to_dict() == state.to_dict()
    # Past states differ from one another: the check above is not vacuous.
    assert len({json.dumps(state.to_dict(), sort_keys=True) for state in recorded.values()}) == (
        len(recorded)
    )


def test_get_state_of_current_version(manager: StateManager) -> None:
    manager.create_execution("e", workflow_id="wf")
    manager.update_state("e", {"variables": {"a": 1}})
    assert manager.get_state("e", version=2) == manager.get_state("e")


@pytest.mark.parametrize("version", [3, 4, 1000])
def test_get_state_of_future_version_not_found(manager: StateManager, version: int) -> None:
    manager.create_execution("e", workflow_id="wf")
    manager.update_state("e", {"variables": {"a": 1}})
    with pytest.raises(NotFoundError) as info:
        manager.get_state("e", version=version)
    assert isinstance(info.value, KeyError)


def test_unknown_execution_not_found(manager: StateManager) -> None:
    manager.create_execution("known", workflow_id="wf")
    calls: list[WorkflowState] = []

    def record(state: WorkflowState) -> None:
        calls.append(state)

    readers: list[Callable[[], object]] = [
        lambda: manager.get_state("unknown"),
        lambda: manager.get_state("unknown", version=1),
        lambda: manager.get_history("unknown"),
        lambda: manager.update_state("unknown", {"variables": {"a": 1}}),
        lambda: manager.transact("unknown", record),
    ]
    for call in readers:
        with pytest.raises(NotFoundError) as info:
            call()
        assert isinstance(info.value, KeyError)
        assert isinstance(info.value, WfstateError)
    assert calls == []
    assert len(manager) == 1


def _small_ring_manager(capacity: int = 16) -> StateManager:
    return StateManager(ring_capacity=capacity)


def test_evicted_version_raises_history_evicted() -> None:
    with _small_ring_manager(16) as manager:
        manager.create_execution("e", workflow_id="wf")
        states = {1: manager.get_state("e")}
        for index in range(40):
            version = manager.update_state("e", {"variables": {"i": index}})
            states[version] = manager.get_state("e")
        assert manager.get_state("e").version == 41
        for version in (1, 2, 10):
            with pytest.raises(HistoryEvictedError) as info:
                manager.get_state("e", version=version)
            assert isinstance(info.value, WfstateError)
        # The newest versions are still in the ring.
        for version in (40, 41):
            assert manager.get_state("e", version=version) == states[version]
        with pytest.raises(HistoryEvictedError):
            manager.get_history("e")
        with pytest.raises(HistoryEvictedError):
            manager.get_history("e", HistoryOptions(after_version=1))
        # A query that only asks for events still held is answered.
        recent = manager.get_history("e", HistoryOptions(after_version=39))
        assert [event.version for event in recent.events] == [40, 41]
        assert [event.data for event in recent.events] == [
            {"set": {"i": 38}, "unset": []},
            {"set": {"i": 39}, "unset": []},
        ]


def test_busy_execution_evicts_history_of_quiet_one() -> None:
    with _small_ring_manager(16) as manager:
        manager.create_execution("quiet", workflow_id="wf")
        manager.create_execution("busy", workflow_id="wf")
        for index in range(40):
            manager.update_state("busy", {"variables": {"i": index}})
        with pytest.raises(HistoryEvictedError):
            manager.get_history("quiet")
        # The current state itself is never evicted.
        assert manager.get_state("quiet").version == 1
        recent = manager.get_history("busy", HistoryOptions(after_version=38))
        assert [event.version for event in recent.events] == [39, 40, 41]


def test_current_version_stays_readable_after_its_events_were_evicted() -> None:
    """docs/semantics.md: the current version is always available, even when the ring
    evicted its events; older versions of that execution are not."""
    with _small_ring_manager(16) as manager:
        manager.create_execution("quiet", workflow_id="wf")
        manager.update_state("quiet", {"variables": {"x": 1}})
        manager.create_execution("busy", workflow_id="wf")
        for index in range(40):
            manager.update_state("busy", {"variables": {"i": index}})
        current = manager.get_state("quiet", version=2)
        assert current == manager.get_state("quiet")
        assert current.variables == {"x": 1}
        with pytest.raises(HistoryEvictedError):
            manager.get_state("quiet", version=1)


# -- get_history filters and summary ------------------------------------------------


@pytest.fixture
def busy_execution(manager: StateManager) -> str:
    """An execution with events of several types, nodes and versions, spread in time."""
    manager.create_execution("h", workflow_id="wf", variables={"n": 0})
    updates: list[dict[str, Any]] = [
        {"nodes": {"a": "running"}, "current_node": "a"},
        {"variables": {"n": 1}},
        {"nodes": {"a": "failed"}, "error": {"type": "E", "message": "one", "details": None}},
        {"nodes": {"a": "running", "b": "pending"}},
        {"metrics": {"a": {"cpu_time": 0.1}}, "context": {"k": 1}},
        {"nodes": {"a": "completed", "b": "running"}, "current_node": "b"},
        {"status": "failed", "error": {"type": "E", "message": "two", "details": None}},
        {"status": "running", "variables": {"n": 2}},
    ]
    for update in updates:
        time.sleep(0.003)
        manager.update_state("h", update)
    return "h"


def test_history_is_oldest_first_with_increasing_seq(
    manager: StateManager, busy_execution: str
) -> None:
    events = history(manager, busy_execution)
    assert events[0].type is EventType.EXECUTION_CREATED
    assert [event.seq for event in events] == sorted({event.seq for event in events})
    versions = [event.version for event in events]
    assert versions == sorted(versions)
    assert set(versions) == set(range(1, 10))
    timestamps = [assert_utc(event.timestamp) for event in events]
    assert timestamps == sorted(timestamps)


@pytest.mark.parametrize("cut_index", [1, 5, 9])
def test_history_since_until(manager: StateManager, busy_execution: str, cut_index: int) -> None:
    events = history(manager, busy_execution)
    cut = events[cut_index].timestamp
    since = manager.get_history(busy_execution, HistoryOptions(since=cut)).events
    until = manager.get_history(busy_execution, HistoryOptions(until=cut)).events
    assert since == [event for event in events if event.timestamp >= cut]
    assert until == [event for event in events if event.timestamp < cut]
    assert since
    assert until
    assert len(since) + len(until) == len(events)
    # Any aware timezone names the same instant.
    plus_two = cut.astimezone(timezone(timedelta(hours=2)))
    assert manager.get_history(busy_execution, HistoryOptions(since=plus_two)).events == since
    window = manager.get_history(
        busy_execution, HistoryOptions(since=events[1].timestamp, until=cut)
    ).events
    assert window == [event for event in events if events[1].timestamp <= event.timestamp < cut]


def test_history_types(manager: StateManager, busy_execution: str) -> None:
    events = history(manager, busy_execution)
    wanted = {EventType.NODE_START, EventType.ERROR}
    filtered = manager.get_history(
        busy_execution, HistoryOptions(types=[EventType.NODE_START, "error"])
    ).events
    assert filtered == [event for event in events if event.type in wanted]
    assert {event.type for event in filtered} == wanted


def test_history_node_id(manager: StateManager, busy_execution: str) -> None:
    events = history(manager, busy_execution)
    filtered = manager.get_history(busy_execution, HistoryOptions(node_id="a")).events
    assert filtered == [event for event in events if event.node_id == "a"]
    assert {event.type for event in filtered} >= {
        EventType.NODE_START,
        EventType.NODE_FAILED,
        EventType.NODE_COMPLETE,
        EventType.NODE_METRICS,
        EventType.ERROR,
    }
    assert manager.get_history(busy_execution, HistoryOptions(node_id="nope")).events == []


@pytest.mark.parametrize("after_version", [0, 1, 4, 9])
def test_history_after_version(
    manager: StateManager, busy_execution: str, after_version: int
) -> None:
    events = history(manager, busy_execution)
    filtered = manager.get_history(
        busy_execution, HistoryOptions(after_version=after_version)
    ).events
    assert filtered == [event for event in events if event.version > after_version]


@pytest.mark.parametrize("limit", [0, 1, 3, 1000])
def test_history_limit(manager: StateManager, busy_execution: str, limit: int) -> None:
    events = history(manager, busy_execution)
    limited = manager.get_history(busy_execution, HistoryOptions(limit=limit)).events
    assert limited == events[:limit]
    nodes_only = manager.get_history(
        busy_execution, HistoryOptions(types=["node_start"], limit=limit)
    ).events
    assert nodes_only == [event for event in events if event.type == "node_start"][:limit]


def test_history_combined_filters(manager: StateManager, busy_execution: str) -> None:
    events = history(manager, busy_execution)
    filtered = manager.get_history(
        busy_execution,
        HistoryOptions(node_id="a", after_version=3, types=["node_start", "node_complete"]),
    ).events
    assert filtered == [
        event
        for event in events
        if event.node_id == "a"
        and event.version > 3
        and event.type in {EventType.NODE_START, EventType.NODE_COMPLETE}
    ]
    assert filtered


def test_history_summary(manager: StateManager, busy_execution: str) -> None:
    result = manager.get_history(busy_execution)
    assert isinstance(result, ExecutionHistory)
    assert result.execution_id == busy_execution
    state = manager.get_state(busy_execution)
    errors = [event for event in result.events if event.type is EventType.ERROR]
    assert len(errors) == 2
    assert result.summary.error_count == len(errors)
    assert result.summary.node_count == len(state.nodes) == 2
    assert result.summary.duration == state.updated_at - state.created_at
    assert result.summary.duration > timedelta(0)
    # The summary describes the whole execution whatever the filters.
    filtered = manager.get_history(busy_execution, HistoryOptions(types=["node_start"], limit=1))
    assert filtered.summary == result.summary


# -- list_executions ---------------------------------------------------------------


@pytest.fixture
def several_executions(manager: StateManager) -> list[str]:
    spec = [
        ("x1", "wf-a", []),
        ("x2", "wf-b", ["suspended"]),
        ("x3", "wf-a", ["failed"]),
        ("x4", "wf-a", ["completed"]),
        ("x5", "wf-b", []),
        ("x6", "wf-a", ["suspended", "cancelled"]),
        ("x7", "wf-a", ["suspended"]),
    ]
    for execution_id, workflow_id, steps in spec:
        manager.create_execution(execution_id, workflow_id=workflow_id)
        for step in steps:
            manager.update_state(execution_id, {"status": step})
    # Updating an old execution must not move it in the creation order.
    manager.update_state("x1", {"variables": {"touched": True}})
    return [execution_id for execution_id, _, _ in spec]


def test_list_executions_all_in_creation_order(
    manager: StateManager, several_executions: list[str]
) -> None:
    listed = manager.list_executions()
    assert [state.execution_id for state in listed] == several_executions
    assert listed == [manager.get_state(execution_id) for execution_id in several_executions]


def test_list_executions_single_status(
    manager: StateManager, several_executions: list[str]
) -> None:
    listed = manager.list_executions(status="suspended")
    assert [state.execution_id for state in listed] == ["x2", "x7"]
    listed = manager.list_executions(status=ExecutionStatus.RUNNING)
    assert [state.execution_id for state in listed] == ["x1", "x5"]


def test_list_executions_several_statuses(
    manager: StateManager, several_executions: list[str]
) -> None:
    listed = manager.list_executions(status=["failed", ExecutionStatus.CANCELLED, "completed"])
    assert [state.execution_id for state in listed] == ["x3", "x4", "x6"]
    listed = manager.list_executions(status={ExecutionStatus.RUNNING})
    assert [state.execution_id for state in listed] == ["x1", "x5"]


def test_list_executions_workflow_and_limit(
    manager: StateManager, several_executions: list[str]
) -> None:
    listed = manager.list_executions(workflow_id="wf-b")
    assert [state.execution_id for state in listed] == ["x2", "x5"]
    listed = manager.list_executions(workflow_id="wf-a", status=["suspended", "running"])
    assert [state.execution_id for state in listed] == ["x1", "x7"]
    listed = manager.list_executions(limit=3)
    assert [state.execution_id for state in listed] == several_executions[:3]
    listed = manager.list_executions(workflow_id="wf-a", limit=2)
    assert [state.execution_id for state in listed] == ["x1", "x3"]
    assert manager.list_executions(workflow_id="nope") == []
    assert manager.list_executions(limit=0) == []


def test_list_executions_default_limit_is_100(manager: StateManager) -> None:
    created = [manager.create_execution(f"n{index:03}", workflow_id="wf") for index in range(120)]
    listed = manager.list_executions()
    assert [state.execution_id for state in listed] == [
        state.execution_id for state in created[:100]
    ]
    assert len(manager.list_executions(limit=1000)) == 120


# -- values ------------------------------------------------------------------------


class Priority(enum.IntEnum):
    HIGH = 1


class Colour(enum.StrEnum):
    RED = "red"


def test_values_round_trip(manager: StateManager) -> None:
    values: dict[str, Any] = {
        "none": None,
        "true": True,
        "false": False,
        "zero": 0,
        "min_int": -(2**63),
        "max_int": 2**64 - 1,
        "float": 0.1,
        "negative": -1.5e300,
        "text": "héllo ✓ \u0000 \U0001f600",
        "list": [1, "two", [3.0, None]],
        "dict": {"nested": {"deep": [{"k": "v"}]}},
        "empty_list": [],
        "empty_dict": {},
    }
    manager.create_execution("e", workflow_id="wf", variables=values, context=values)
    state = manager.get_state("e")
    assert state.variables == values
    assert state.context == values
    assert type(state.variables["max_int"]) is int
    assert type(state.variables["true"]) is bool
    assert type(state.variables["float"]) is float


def test_tuples_are_stored_as_lists(manager: StateManager) -> None:
    manager.create_execution("e", workflow_id="wf")
    manager.update_state("e", {"variables": {"pair": (1, (2, 3))}})
    value = manager.get_state("e").variables["pair"]
    assert value == [1, [2, 3]]
    assert type(value) is list
    assert type(value[1]) is list


def test_enum_subclasses_are_stored_as_base_values(manager: StateManager) -> None:
    manager.create_execution("e", workflow_id="wf", variables={"p": Priority.HIGH})
    manager.update_state("e", {"variables": {"c": Colour.RED}, "context": {"p": Priority.HIGH}})
    state = manager.get_state("e")
    assert state.variables == {"p": 1, "c": "red"}
    assert type(state.variables["p"]) is int
    assert type(state.variables["c"]) is str
    assert type(state.context["p"]) is int


def test_nesting_within_limit_is_accepted(manager: StateManager) -> None:
    value: Any = "leaf"
    for _ in range(32):
        value = [value]
    manager.create_execution("e", workflow_id="wf", variables={"deep": value})
    assert manager.get_state("e").variables["deep"] == value


# -- immutability and equality ------------------------------------------------------


def test_mutating_returned_dicts_never_changes_the_store(manager: StateManager) -> None:
    manager.create_execution(
        "e", workflow_id="wf", variables={"list": [1], "map": {"k": 1}}, context={"c": [1]}
    )
    record = {"type": "E", "message": "m", "details": {"items": [1]}}
    manager.update_state("e", {"nodes": {"a": "running"}})
    manager.update_state("e", {"nodes": {"a": "failed"}, "error": record})
    state = manager.get_state("e")
    pristine = state.to_dict()

    variables = state.variables
    variables["new"] = 1
    variables["list"].append(2)
    variables["map"]["k"] = 2
    context = state.context
    context["c"].append(2)
    context["other"] = True
    nodes = state.nodes
    del nodes["a"]
    nodes["b"] = state.nodes["a"]
    error = state.nodes["a"].error
    assert error is not None
    error["message"] = "changed"
    error["details"]["items"].append(2)

    assert state.variables == {"list": [1], "map": {"k": 1}}
    assert state.context == {"c": [1]}
    assert list(state.nodes) == ["a"]
    assert state.nodes["a"].error == record
    assert state.to_dict() == pristine
    assert manager.get_state("e").to_dict() == pristine
    assert manager.get_state("e", version=3).to_dict() == pristine


def test_mutating_event_data_never_changes_the_store(manager: StateManager) -> None:
    manager.create_execution("e", workflow_id="wf", variables={"list": [1]})
    (event,) = history(manager, "e")
    data = event.data
    data["variables"]["list"].append(2)
    data["workflow_id"] = "changed"
    assert event.data == {"workflow_id": "wf", "variables": {"list": [1]}, "context": {}}
    assert history(manager, "e")[0].data == event.data


def test_mutating_inputs_after_the_call_never_changes_the_store(manager: StateManager) -> None:
    variables: dict[str, Any] = {"list": [1]}
    manager.create_execution("e", workflow_id="wf", variables=variables)
    variables["list"].append(2)
    variables["late"] = True
    update_variables: dict[str, Any] = {"m": {"k": 1}}
    manager.update_state("e", {"variables": update_variables})
    update_variables["m"]["k"] = 2
    assert manager.get_state("e").variables == {"list": [1], "m": {"k": 1}}


def test_state_attributes_cannot_be_set(manager: StateManager) -> None:
    manager.create_execution("e", workflow_id="wf")
    manager.update_state("e", {"nodes": {"a": "running"}})
    state = manager.get_state("e")
    with pytest.raises(AttributeError):
        state.version = 99  # type: ignore[misc]
    with pytest.raises(AttributeError):
        state.status = ExecutionStatus.COMPLETED  # type: ignore[misc]
    with pytest.raises(AttributeError):
        state.extra = 1  # type: ignore[attr-defined]
    node = state.nodes["a"]
    with pytest.raises(AttributeError):
        node.attempts = 5  # type: ignore[misc]
    (event, *_) = history(manager, "e")
    with pytest.raises(AttributeError):
        event.version = 7  # type: ignore[misc]
    assert state.version == 2
    assert state.status is ExecutionStatus.RUNNING
    assert node.attempts == 1
    assert event.version == 1


def test_states_compare_by_value(manager: StateManager) -> None:
    manager.create_execution("e", workflow_id="wf", variables={"a": 1})
    first = manager.get_state("e")
    again = manager.get_state("e")
    assert first == again
    assert (first != again) is False
    manager.update_state("e", {"variables": {"a": 1}})
    second = manager.get_state("e")
    assert second != first  # the version (and updated_at) differ
    assert (second == first) is False
    assert first != first.to_dict()
    other = manager.create_execution("f", workflow_id="wf", variables={"a": 1})
    assert other != first
    manager.update_state("e", {"nodes": {"a": "running"}})
    node = manager.get_state("e").nodes["a"]
    assert node == manager.get_state("e").nodes["a"]
    manager.update_state("e", {"nodes": {"b": "running"}})
    assert node == manager.get_state("e").nodes["a"]
    assert node != manager.get_state("e").nodes["b"]  # started_at differs
    (created, *_) = history(manager, "e")
    assert created == history(manager, "e")[0]
    assert created != history(manager, "f")[0]


# -- to_dict -----------------------------------------------------------------------


def test_state_to_dict_shape(manager: StateManager) -> None:
    manager.create_execution("e", workflow_id="wf", variables={"v": [1]}, context={"c": 1})
    record = {"type": "E", "message": "m", "details": {"x": 1}}
    manager.update_state("e", {"nodes": {"a": "running", "p": "pending"}, "current_node": "a"})
    manager.update_state("e", {"nodes": {"a": "failed"}, "error": record})
    state = manager.get_state("e")
    as_dict = state.to_dict()
    assert set(as_dict) == {
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
    }
    assert as_dict["execution_id"] == "e"
    assert as_dict["workflow_id"] == "wf"
    assert type(as_dict["status"]) is str
    assert as_dict["status"] == "running"
    assert as_dict["current_node"] == "a"
    assert as_dict["variables"] == {"v": [1]}
    assert as_dict["context"] == {"c": 1}
    assert as_dict["version"] == 3
    assert datetime.fromisoformat(as_dict["created_at"]) == state.created_at
    assert datetime.fromisoformat(as_dict["updated_at"]) == state.updated_at
    assert as_dict["nodes"] == {node_id: node.to_dict() for node_id, node in state.nodes.items()}
    assert json.loads(json.dumps(as_dict)) == as_dict


def test_node_to_dict_shape(manager: StateManager) -> None:
    manager.create_execution("e", workflow_id="wf")
    record = {"type": "E", "message": "m", "details": {"x": 1}}
    manager.update_state("e", {"nodes": {"a": "running", "p": "pending"}})
    manager.update_state("e", {"nodes": {"a": "failed"}, "error": record})
    nodes = manager.get_state("e").nodes
    failed: NodeState = nodes["a"]
    as_dict = failed.to_dict()
    assert set(as_dict) == {"status", "attempts", "started_at", "finished_at", "error"}
    assert type(as_dict["status"]) is str
    assert as_dict["status"] == "failed"
    assert as_dict["attempts"] == 1
    assert datetime.fromisoformat(as_dict["started_at"]) == failed.started_at
    assert datetime.fromisoformat(as_dict["finished_at"]) == failed.finished_at
    assert as_dict["error"] == record
    assert nodes["p"].to_dict() == {
        "status": "pending",
        "attempts": 0,
        "started_at": None,
        "finished_at": None,
        "error": None,
    }
    assert json.loads(json.dumps(as_dict)) == as_dict


def test_event_to_dict_shape(manager: StateManager) -> None:
    manager.create_execution("e", workflow_id="wf")
    manager.update_state("e", {"nodes": {"a": "running"}}, actor="worker-1")
    (event,) = events_of(manager, "e", 2)
    as_dict = event.to_dict()
    assert type(as_dict["type"]) is str
    assert as_dict["type"] == "node_start"
    assert as_dict["seq"] == event.seq
    assert as_dict["execution_id"] == "e"
    assert as_dict["version"] == 2
    assert as_dict["node_id"] == "a"
    assert as_dict["actor"] == "worker-1"
    assert as_dict["data"] == event.data
    assert datetime.fromisoformat(as_dict["timestamp"]) == event.timestamp
    assert json.loads(json.dumps(as_dict)) == as_dict


# -- lifecycle ---------------------------------------------------------------------


def test_close_is_idempotent_and_later_calls_raise_closed() -> None:
    manager = StateManager()
    manager.create_execution("e", workflow_id="wf")
    assert manager.closed is False
    manager.close()
    assert manager.closed is True
    manager.close()
    assert manager.closed is True
    calls: list[Callable[[], object]] = [
        lambda: manager.create_execution("f", workflow_id="wf"),
        lambda: manager.update_state("e", {"variables": {"a": 1}}),
        lambda: manager.transact("e", lambda state: {"variables": {"a": 1}}),
        lambda: manager.get_state("e"),
        lambda: manager.get_state("e", version=1),
        lambda: manager.get_history("e"),
        lambda: manager.list_executions(),
        lambda: manager.open_cursor(),
    ]
    for call in calls:
        with pytest.raises(ClosedError) as info:
            call()
        assert isinstance(info.value, WfstateError)


def test_context_manager_closes() -> None:
    with StateManager() as manager:
        assert manager.closed is False
        manager.create_execution("e", workflow_id="wf")
        assert manager.get_state("e").version == 1
    assert manager.closed is True
    with pytest.raises(ClosedError):
        manager.get_state("e")


def test_context_manager_closes_on_error() -> None:
    with pytest.raises(RuntimeError, match="inside"), StateManager() as manager:
        raise RuntimeError("inside")
    assert manager.closed is True


# -- event cursors -----------------------------------------------------------------


def test_live_cursor_reads_new_events_in_order(manager: StateManager) -> None:
    manager.create_execution("before", workflow_id="wf")
    cursor = manager.open_cursor()
    assert cursor.durable is False
    manager.create_execution("a", workflow_id="wf")
    manager.create_execution("b", workflow_id="wf")
    for index in range(5):
        manager.update_state("a", {"variables": {"i": index}})
        manager.update_state("b", {"nodes": {f"n{index}": "running"}})
    expected = history(manager, "a") + history(manager, "b")
    expected.sort(key=lambda event: event.seq)
    events = read_events(cursor, len(expected))
    assert events == expected
    seqs = [event.seq for event in events]
    assert all(earlier < later for earlier, later in itertools.pairwise(seqs))
    assert "before" not in {event.execution_id for event in events}
    assert cursor.missed == 0
    # New events keep coming in order after a read.
    manager.update_state("a", {"context": {"k": 1}})
    (later,) = read_events(cursor, 1)
    assert later.seq > seqs[-1]
    assert later == history(manager, "a")[-1]
    cursor.close()


def test_cursor_from_oldest_sees_earlier_events(manager: StateManager) -> None:
    manager.create_execution("a", workflow_id="wf")
    manager.update_state("a", {"variables": {"i": 1}})
    cursor = manager.open_cursor(from_oldest=True)
    events = read_events(cursor, 2)
    assert events == history(manager, "a")
    cursor.close()


def test_live_cursor_that_fell_behind_reports_missed() -> None:
    with _small_ring_manager(16) as manager:
        manager.create_execution("e", workflow_id="wf")
        cursor = manager.open_cursor()
        written = 50
        for index in range(written):
            manager.update_state("e", {"variables": {"i": index}})
        events = drain(cursor)
        assert cursor.missed > 0
        assert len(events) + cursor.missed == written
        # What it did read is the newest events, in order and without gaps.
        assert [event.version for event in events] == list(
            range(written + 2 - len(events), written + 2)
        )
        cursor.close()


def _fill_until_backpressure(manager: StateManager, execution_id: str, limit: int) -> int:
    """Write single-event updates until BackpressureError; return how many landed."""
    for written in range(limit):
        try:
            manager.update_state(execution_id, {"variables": {"i": written}})
        except BackpressureError:
            return written
    raise AssertionError(f"no BackpressureError after {limit} updates")


def test_durable_cursor_error_mode_backpressure_until_commit() -> None:
    with StateManager(ring_capacity=16, on_ring_full="error") as manager:
        manager.create_execution("e", workflow_id="wf")
        cursor = manager.open_cursor(durable=True)
        assert cursor.durable is True
        written = _fill_until_backpressure(manager, "e", 100)
        assert 0 < written <= 16
        before = snapshot(manager, "e", after_version=1)
        for _ in range(3):
            with pytest.raises(BackpressureError) as info:
                manager.update_state("e", {"variables": {"late": True}})
            assert isinstance(info.value, WfstateError)
        assert snapshot(manager, "e", after_version=1) == before
        assert manager.get_state("e").version == written + 1

        events = read_events(cursor, written)
        assert [event.version for event in events] == list(range(2, written + 2))
        # Reading alone does not free the ring: only commit() does.
        with pytest.raises(BackpressureError):
            manager.update_state("e", {"variables": {"late": True}})
        cursor.commit()
        assert manager.update_state("e", {"variables": {"late": True}}) == written + 2
        cursor.close()


def test_durable_cursor_block_mode_times_out() -> None:
    with StateManager(ring_capacity=16, on_ring_full="block", ring_full_timeout=0.05) as manager:
        manager.create_execution("e", workflow_id="wf")
        cursor = manager.open_cursor(durable=True)
        written = _fill_until_backpressure(manager, "e", 100)
        assert 0 < written <= 16
        before = snapshot(manager, "e", after_version=1)
        started = time.monotonic()
        with pytest.raises(BackpressureError):
            manager.update_state("e", {"variables": {"late": True}})
        waited = time.monotonic() - started
        assert 0.04 <= waited < 2.0
        assert snapshot(manager, "e", after_version=1) == before
        cursor.close()


def test_committing_reader_unblocks_writer() -> None:
    total = 40
    with StateManager(ring_capacity=16, on_ring_full="block", ring_full_timeout=10.0) as manager:
        manager.create_execution("e", workflow_id="wf")
        cursor = manager.open_cursor(durable=True)
        failures: list[BaseException] = []

        def write() -> None:
            try:
                for index in range(total):
                    manager.update_state("e", {"variables": {"i": index}})
            except BaseException as exc:
                failures.append(exc)

        writer = threading.Thread(target=write)
        writer.start()
        try:
            # Wait until the writer stalls on the full ring.
            stalled_at = -1
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                version = manager.get_state("e").version
                if version == stalled_at:
                    break
                stalled_at = version
                time.sleep(0.2)
            assert writer.is_alive()
            assert 1 < stalled_at <= 17
            assert manager.get_state("e").version == stalled_at

            events: list[StateEvent] = []
            deadline = time.monotonic() + 10.0
            while len(events) < total and time.monotonic() < deadline:
                batch = cursor.read(max_events=1000, timeout=0.1)
                events.extend(batch)
                if batch:
                    cursor.commit()
        finally:
            writer.join(timeout=15.0)
        assert not writer.is_alive()
        assert failures == []
        assert manager.get_state("e").version == total + 1
        assert [event.version for event in events] == list(range(2, total + 2))
        assert [event.data["set"]["i"] for event in events] == list(range(total))
        cursor.close()


# -- stats -------------------------------------------------------------------------


def test_stats_counts_executions_ring_and_cursors() -> None:
    # docs/semantics.md does not name the keys; these are the ones the core reports.
    with StateManager(ring_capacity=16) as manager:
        stats = manager.stats()
        assert all(type(value) is int and value >= 0 for value in stats.values())
        assert stats["executions"] == 0
        assert stats["ring_capacity"] == 16
        assert stats["ring_events"] == 0
        assert stats["cursors"] == stats["durable_cursors"] == 0

        manager.create_execution("a", workflow_id="wf")
        manager.create_execution("b", workflow_id="wf")
        manager.update_state("a", {"nodes": {"n": "running"}, "variables": {"x": 1}})
        live = manager.open_cursor()
        durable = manager.open_cursor(durable=True)
        stats = manager.stats()
        assert stats["executions"] == len(manager) == 2
        assert stats["ring_events"] == 4
        assert stats["next_seq"] - stats["first_seq"] == stats["ring_events"]
        assert stats["cursors"] == 2
        assert stats["durable_cursors"] == 1

        for index in range(30):
            manager.update_state("b", {"variables": {"i": index}})
            durable.read(timeout=0.1)
            durable.commit()
        stats = manager.stats()
        assert stats["ring_events"] == 16  # full, never over capacity
        assert stats["next_seq"] - stats["first_seq"] == 16
        live.close()
        durable.close()
        stats = manager.stats()
        assert stats["cursors"] == stats["durable_cursors"] == 0


def test_stats_after_close_raises_closed() -> None:
    """StateManager.close(): "later calls raise ClosedError" -- stats() included."""
    manager = StateManager()
    manager.close()
    with pytest.raises(ClosedError):
        manager.stats()


def test_closed_cursor_raises_closed(manager: StateManager) -> None:
    cursor = manager.open_cursor()
    cursor.close()
    cursor.close()  # idempotent like the manager's close()
    with pytest.raises(ClosedError):
        cursor.read(timeout=0.01)
