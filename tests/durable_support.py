"""Helpers shared by the durable-store suites (contract, durability, property, crash).

It makes version records the way the manager does (prepare, then publish, in a core of
its own) and reads a store back in the two independent ways the checks compare: replay
of every delta from version 1, and the store's own snapshot-based ``load``. It never
writes to a store by itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from wfstate import StateManager, StateUpdate, VersionRecord, WorkflowState, _core
from wfstate.store import Store

#: A story touching every kind of change the core records, valid in this order from a
#: fresh execution: nodes in every status, errors, metrics, variables set and unset,
#: context, the current node, suspension and resumption, then completion.
STORY: tuple[Mapping[str, Any], ...] = (
    {"nodes": {"fetch": "running"}, "current_node": "fetch"},
    {
        "nodes": {"fetch": "completed"},
        "variables": {"rows": 3, "names": ["a", "b"]},
        "metrics": {"fetch": {"duration": 0.5, "cpu_time": 0.25, "peak_memory": 1024}},
    },
    {"nodes": {"charge": "running"}, "context": {"attempt": 1}, "current_node": "charge"},
    {
        "nodes": {"charge": "failed"},
        "error": {"type": "TimeoutError", "message": "slow", "details": {"after_s": 30}},
    },
    {"status": "suspended"},
    {"status": "running", "context": {"resumed": True}},
    {"nodes": {"charge": "running", "notify": "pending"}},
    {"nodes": {"charge": "completed", "notify": "skipped"}, "unset_variables": ["rows"]},
    {"variables": {"receipt": "r-1", "total": 12.5}},
    {"status": "completed", "current_node": None},
)


class Recorder:
    """Version records of executions, made in a core of its own as the manager does."""

    def __init__(self) -> None:
        self.core = _core.Core()

    def create(
        self,
        execution_id: str,
        *,
        workflow_id: str = "wf",
        variables: Mapping[str, Any] | None = None,
        actor: str | None = None,
    ) -> VersionRecord:
        prepared = self.core.prepare_create(execution_id, workflow_id, variables, None, actor)
        self.core.publish(prepared)
        return prepared.record()

    def update(
        self,
        execution_id: str,
        update: StateUpdate | Mapping[str, Any],
        *,
        actor: str | None = None,
    ) -> VersionRecord:
        prepared = self.core.prepare(execution_id, update, None, actor)
        self.core.publish(prepared)
        return prepared.record()

    def story(
        self, execution_id: str, *, workflow_id: str = "wf", length: int = len(STORY)
    ) -> list[VersionRecord]:
        """Version 1 (the creation) and then ``length`` updates of ``STORY``."""
        records = [self.create(execution_id, workflow_id=workflow_id, actor="creator")]
        for position, update in enumerate(STORY[:length]):
            actor = None if position % 2 else f"worker-{position}"
            records.append(self.update(execution_id, update, actor=actor))
        return records


def replayed(store: Store, execution_id: str, version: int | None = None) -> WorkflowState:
    """The execution rebuilt from every stored delta from version 1, no snapshot."""
    deltas = [
        (stored_version, recorded_at_us, delta)
        for stored_version, recorded_at_us, _, delta in store.read_deltas(execution_id)
        if version is None or stored_version <= version
    ]
    assert deltas, f"{execution_id!r} has no stored delta"
    return _core.rebuild(execution_id, None, deltas)


def loaded(store: Store, execution_id: str, version: int | None = None) -> WorkflowState:
    """The execution rebuilt as the manager does it: newest snapshot, then deltas."""
    found = store.load(execution_id, version=version)
    assert found is not None, f"{execution_id!r} version {version} is not stored"
    return _core.rebuild(execution_id, found.snapshot, found.deltas)


def stored_versions(store: Store, execution_id: str) -> list[int]:
    return [version for version, _, _, _ in store.read_deltas(execution_id)]


def comparable_events(events: Sequence[Any]) -> list[dict[str, Any]]:
    """Events as dicts without ``seq`` (the ring's order is not stored)."""
    result = []
    for event in events:
        as_dict: dict[str, Any] = event.to_dict()
        as_dict.pop("seq")
        result.append(as_dict)
    return result


def three_on_a_ring(source: StateManager) -> _core.EventCursor:
    """A durable cursor on ``source``'s ring, which then gets 303 versions: e-0..e-2
    created, 100 updates each of e-0 and e-1, alternating, then 100 of e-2 (the
    native writers' step tests)."""
    cursor = source._core.open_cursor(durable=True)
    for index in range(3):
        source.create_execution(f"e-{index}", workflow_id="w", variables={"n": 0})
    for n in range(1, 101):
        for index in (0, 1):
            source.update_state(f"e-{index}", {"variables": {"n": n}})
    for n in range(1, 101):
        source.update_state("e-2", {"variables": {"n": n}})
    return cursor
