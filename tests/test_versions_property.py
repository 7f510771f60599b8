"""Every past version rebuilt from the store equals the state acknowledged for it.

Hypothesis draws small random histories: creations, updates of every kind (legal or
not: a refused update writes nothing) and forks, on a few executions, in either write
mode and under a snapshot policy that snapshots often or one that never does. The
state right after each version is recorded as the manager returned it. Then the
store is reopened, so that nothing comes from the in-memory ring any more, and
``get_state(id, version=n)`` (snapshot + replay) must give back exactly that state
for every version of every execution; the store itself must hold versions 1..n, and
its snapshots must be where the policy puts them.
"""

from __future__ import annotations

import itertools
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, TypeAlias

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import reset_postgres_database
from durable_support import loaded, replayed, stored_versions
from wfstate import (
    AlreadyExistsError,
    InvalidTransitionError,
    NotFoundError,
    SnapshotPolicy,
    StateManager,
    ValidationError,
    WorkflowState,
)
from wfstate.store import open_store

EXECUTIONS = ("e0", "e1", "e2")
NODES = ("n1", "n2")
NAMES = ("a", "b", "c")
EXECUTION_STATUSES = ("running", "suspended", "completed", "failed", "cancelled")
NODE_STATUSES = ("pending", "running", "completed", "failed", "skipped")

SNAPSHOT_OFTEN = SnapshotPolicy(every_versions=3)
SNAPSHOT_NEVER = SnapshotPolicy(
    every_versions=None, when_deltas_outweigh=False, at_final_status=False
)

Create: TypeAlias = tuple[Literal["create"], str, dict[str, Any]]
Update: TypeAlias = tuple[Literal["update"], str, dict[str, Any]]
Fork: TypeAlias = tuple[Literal["fork"], str, int]
Operation: TypeAlias = Create | Update | Fork

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=6,
)


def variables() -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(NAMES), json_values, min_size=1, max_size=2)


@st.composite
def data_updates(draw: st.DrawFn) -> dict[str, Any]:
    """Variables, context and the current node: legal on any execution not final."""
    fields = draw(
        st.sets(
            st.sampled_from(["variables", "unset_variables", "context", "current_node"]),
            min_size=1,
            max_size=3,
        )
    )
    update: dict[str, Any] = {}
    if "variables" in fields:
        update["variables"] = draw(variables())
    if "unset_variables" in fields:
        update["unset_variables"] = draw(
            st.lists(
                st.sampled_from([n for n in NAMES if n not in update.get("variables", {})]),
                max_size=2,
            )
        )
    if "context" in fields:
        update["context"] = draw(variables())
    if "current_node" in fields:
        update["current_node"] = draw(st.sampled_from([None, *NODES]))
    return update


@st.composite
def node_updates(draw: st.DrawFn) -> dict[str, Any]:
    """Node moves (legal or not), sometimes with metrics or an error."""
    update: dict[str, Any] = {
        "nodes": draw(
            st.dictionaries(st.sampled_from(NODES), st.sampled_from(NODE_STATUSES), min_size=1)
        )
    }
    if draw(st.booleans()):
        update["metrics"] = {
            draw(st.sampled_from(NODES)): {
                "duration": draw(st.floats(min_value=0, max_value=1e6)),
                "peak_memory": draw(st.integers(min_value=0, max_value=2**40)),
            }
        }
    if "failed" in update["nodes"].values() or draw(st.integers(0, 4)) == 0:
        update["error"] = {
            "type": draw(st.sampled_from(["ValueError", "Timeout"])),
            "message": draw(st.text(max_size=10)),
            "details": draw(st.dictionaries(st.sampled_from(NAMES), json_values, max_size=2)),
        }
    if draw(st.booleans()):
        update.update(draw(data_updates()))
    return update


status_updates = st.builds(
    lambda status, extra: {"status": status, **extra},
    # Final statuses end an execution's history: drawn less often.
    st.sampled_from(["suspended", "running", "suspended", "running", *EXECUTION_STATUSES]),
    st.sampled_from([{}, {"current_node": None}, {"variables": {"a": 1}}]),
)


def operations_on(execution_ids: st.SearchStrategy[str]) -> st.SearchStrategy[Operation]:
    """Mostly updates that apply; status changes (which may end an execution) and
    forks now and then."""
    return st.one_of(
        st.tuples(st.just("update"), execution_ids, data_updates()),
        st.tuples(st.just("update"), execution_ids, data_updates()),
        st.tuples(st.just("update"), execution_ids, node_updates()),
        st.tuples(st.just("update"), execution_ids, node_updates()),
        st.tuples(st.just("update"), execution_ids, status_updates),
        st.tuples(
            st.just("create"),
            execution_ids,
            st.dictionaries(st.sampled_from(NAMES), json_values, max_size=2),
        ),
        st.tuples(st.just("fork"), execution_ids, st.integers(0, 6)),
    )


@st.composite
def histories(draw: st.DrawFn) -> list[Operation]:
    """One to three executions created, then up to 40 operations on them."""
    count = draw(st.integers(1, len(EXECUTIONS)))
    created: list[Operation] = [
        ("create", execution_id, draw(st.dictionaries(st.sampled_from(NAMES), json_values)))
        for execution_id in EXECUTIONS[:count]
    ]
    rest = draw(
        st.lists(operations_on(st.sampled_from(EXECUTIONS[:count])), min_size=8, max_size=40)
    )
    return created + rest


@pytest.fixture(scope="module")
def sqlite_directory() -> Iterator[Path]:
    """Where the SQLite examples keep their files: module-scoped, as hypothesis runs
    many examples in one test call, each with a fresh file of its own."""
    with tempfile.TemporaryDirectory(prefix="wfstate-property-") as directory:
        yield Path(directory)


def run(manager: StateManager, history: list[Operation]) -> dict[str, dict[int, WorkflowState]]:
    """Apply the history; the state acknowledged for every version written."""
    states: dict[str, dict[int, WorkflowState]] = {}
    forks = itertools.count()

    def record(state: WorkflowState) -> None:
        versions = states.setdefault(state.execution_id, {})
        assert state.version not in versions
        assert state.version == len(versions) + 1, "versions are contiguous"
        versions[state.version] = state

    for operation in history:
        kind, execution_id, argument = operation
        try:
            if kind == "create":
                assert isinstance(argument, dict)
                record(manager.create_execution(execution_id, workflow_id="wf", variables=argument))
            elif kind == "update":
                assert isinstance(argument, dict)
                version = manager.update_state(execution_id, argument)
                state = manager.get_state(execution_id)
                assert state.version == version
                record(state)
            else:
                assert isinstance(argument, int)
                current = manager.get_state(execution_id).version
                version = max(1, current - argument)
                copy = manager.fork(
                    execution_id, version=version, new_execution_id=f"fork-{next(forks)}"
                )
                record(copy)
                record(manager.get_state(execution_id))
        except (AlreadyExistsError, InvalidTransitionError, NotFoundError, ValidationError):
            continue  # refused: nothing was written
    return states


def check_history(
    url: str,
    policy: SnapshotPolicy,
    history: list[Operation],
    durability: Literal["sync", "async"],
) -> None:
    with StateManager.open(url, durability=durability, snapshot_policy=policy) as manager:
        states = run(manager, history)
    written = sum(len(versions) for versions in states.values())
    deepest = max((len(versions) for versions in states.values()), default=0)
    event(f"versions written: {'1-9' if written < 10 else '10-29' if written < 30 else '30+'}")
    depth = "1-4" if deepest < 5 else "5-9" if deepest < 10 else "10+"
    event(f"versions of the deepest execution: {depth}")

    with StateManager.open(url, snapshot_policy=policy) as reopened:
        for execution_id, versions in states.items():
            assert reopened.get_state(execution_id) == versions[len(versions)]
            for version, state in versions.items():
                assert reopened.get_state(execution_id, version=version) == state, (
                    execution_id,
                    version,
                )
            with pytest.raises(NotFoundError):
                reopened.get_state(execution_id, version=len(versions) + 1)

    store = open_store(url)
    try:
        assert sorted(store.list_execution_ids()) == sorted(states)
        for execution_id, versions in states.items():
            latest = versions[len(versions)]
            assert stored_versions(store, execution_id) == list(range(1, latest.version + 1))
            assert replayed(store, execution_id) == latest
            assert loaded(store, execution_id) == latest
            newest = store.load(execution_id)
            assert newest is not None
            if policy is SNAPSHOT_NEVER:
                assert newest.snapshot is None
                assert newest.snapshot_version == 0
            elif latest.version >= 4:
                # Every three versions at least: never more than two deltas to replay.
                assert newest.snapshot is not None
                assert latest.version - newest.snapshot_version < 3, (
                    execution_id,
                    latest.version,
                    newest.snapshot_version,
                )
    finally:
        store.close()


POLICIES = pytest.mark.parametrize(
    "policy", [SNAPSHOT_OFTEN, SNAPSHOT_NEVER], ids=["snapshot-often", "snapshot-never"]
)
EXAMPLE_SETTINGS = settings(
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


@POLICIES
@settings(EXAMPLE_SETTINGS, max_examples=20)
@given(history=histories(), durability=st.sampled_from(["sync", "async"]))
def test_every_version_rebuilt_from_sqlite_equals_the_acknowledged_state(
    sqlite_directory: Path,
    policy: SnapshotPolicy,
    history: list[Operation],
    durability: Literal["sync", "async"],
) -> None:
    url = f"sqlite:///{sqlite_directory / uuid.uuid4().hex}.db"
    check_history(url, policy, history, durability)


@POLICIES
@settings(EXAMPLE_SETTINGS, max_examples=8)
@given(history=histories(), durability=st.sampled_from(["sync", "async"]))
def test_every_version_rebuilt_from_postgresql_equals_the_acknowledged_state(
    postgres_database_url: str,
    policy: SnapshotPolicy,
    history: list[Operation],
    durability: Literal["sync", "async"],
) -> None:
    reset_postgres_database(postgres_database_url)
    check_history(postgres_database_url, policy, history, durability)
