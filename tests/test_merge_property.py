"""Two processes' plain updates on one execution: merged field by field, never lost.

Hypothesis draws a sequence of plain updates (no ``expected_version``), each made by
one of two managers on one SQLite store (standing for two processes whose copies go
stale as the other writes). A pure model predicts every outcome from the documented
rule (docs/semantics.md, "Concurrent writers"):

- a manager whose copy is current applies the update as a single process would
  (an in-memory ``StateManager`` is the reference), or gets its
  ``InvalidTransitionError``;
- a manager whose copy is stale gets ``ConflictError`` with ``.fields`` exactly the
  fields both its update and the versions it has not seen changed; otherwise the
  update applies on top of the newer versions as the reference says.

After every step the stored execution equals the reference, so no update is ever
lost or overwritten, and a refused one writes nothing.
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from wfstate import ConflictError, InvalidTransitionError, StateManager, WorkflowState

NAMES = ("a", "b", "c")
NODES = ("n1", "n2")

updates = st.one_of(
    st.fixed_dictionaries(
        {"variables": st.dictionaries(st.sampled_from(NAMES), st.integers(0, 3), min_size=1)}
    ),
    st.fixed_dictionaries({"unset_variables": st.lists(st.sampled_from(NAMES), min_size=1)}),
    st.fixed_dictionaries(
        {"context": st.dictionaries(st.sampled_from(NAMES), st.integers(0, 3), min_size=1)}
    ),
    st.fixed_dictionaries(
        {
            "nodes": st.dictionaries(
                st.sampled_from(NODES),
                st.sampled_from(["pending", "running", "completed", "failed", "skipped"]),
                min_size=1,
            )
        }
    ),
    st.fixed_dictionaries({"status": st.sampled_from(["suspended", "running"])}),
    st.fixed_dictionaries({"current_node": st.sampled_from([None, *NODES])}),
    st.fixed_dictionaries(
        {
            "variables": st.dictionaries(st.sampled_from(NAMES), st.integers(0, 3), min_size=1),
            "nodes": st.dictionaries(
                st.sampled_from(NODES), st.sampled_from(["running", "completed"]), min_size=1
            ),
        }
    ),
)


def fields_changed(before: WorkflowState, update: dict[str, Any]) -> set[str]:
    """The fields a version made from ``update`` on ``before`` changed (independent of
    wfstate's own code: names removed only if they existed, as the events record)."""
    fields: set[str] = set()
    if "status" in update:
        fields.add("status")
    if "current_node" in update:
        fields.add("current_node")
    fields.update(f"variables.{name}" for name in update.get("variables", {}))
    fields.update(
        f"variables.{name}"
        for name in update.get("unset_variables", ())
        if name in before.variables
    )
    fields.update(f"context.{name}" for name in update.get("context", {}))
    fields.update(f"nodes.{node}" for node in update.get("nodes", {}))
    return fields


def fields_asked(update: dict[str, Any]) -> set[str]:
    """The fields an update names (what the merge compares)."""
    fields: set[str] = {key for key in ("status", "current_node") if key in update}
    fields.update(f"variables.{name}" for name in update.get("variables", {}))
    fields.update(f"variables.{name}" for name in update.get("unset_variables", ()))
    fields.update(f"context.{name}" for name in update.get("context", {}))
    fields.update(f"nodes.{node}" for node in update.get("nodes", {}))
    return fields


def projection(state: WorkflowState) -> tuple[Any, ...]:
    return (
        state.version,
        str(state.status),
        state.current_node,
        state.variables,
        state.context,
        {node: (str(n.status), n.attempts) for node, n in state.nodes.items()},
        state.error_count,
    )


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(steps=st.lists(st.tuples(st.integers(0, 1), updates), min_size=1, max_size=14))
def test_two_writers_merge_field_by_field(steps: list[tuple[int, dict[str, Any]]]) -> None:
    directory = tempfile.mkdtemp(prefix="wfstate-merge-")
    url = f"sqlite:///{directory}/merge.db"
    managers = [StateManager.open(url), StateManager.open(url)]
    reference = StateManager()
    try:
        initial = {"a": 0, "b": 0}
        managers[0].create_execution("e", workflow_id="wf", variables=initial)
        managers[1].get_state("e")
        reference.create_execution("e", workflow_id="wf", variables=initial)
        seen = [1, 1]  # the version each manager's copy holds
        changed: dict[int, set[str]] = {}  # version -> fields it changed
        for writer, update in steps:
            manager = managers[writer]
            current = reference.get_state("e")
            stale = seen[writer] < current.version
            missed: set[str] = set()
            for version in range(seen[writer] + 1, current.version + 1):
                missed |= changed[version]
            shared = fields_asked(update) & missed if stale else set()
            if shared:
                with pytest.raises(ConflictError) as conflict:
                    manager.update_state("e", update)
                assert conflict.value.fields == shared, (update, missed)
                event("conflict on shared fields")
                seen[writer] = current.version
            else:
                try:
                    expected_version = reference.update_state("e", update)
                except InvalidTransitionError:
                    with pytest.raises(InvalidTransitionError):
                        manager.update_state("e", update)
                    if stale:
                        seen[writer] = current.version
                else:
                    changed[expected_version] = fields_changed(current, update)
                    assert manager.update_state("e", update) == expected_version
                    if stale:
                        event("stale update merged")
                    seen[writer] = expected_version
            # The writer's copy is current after every call, whatever its outcome.
            assert projection(manager.get_state("e")) == projection(reference.get_state("e"))
        with StateManager.open(url) as fresh:
            assert projection(fresh.get_state("e")) == projection(reference.get_state("e"))
    finally:
        for manager in managers:
            manager.close()
        reference.close()
        shutil.rmtree(directory, ignore_errors=True)
