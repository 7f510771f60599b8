"""Field-level merge: whether a plain update can be re-based on newer versions.

An update made without ``expected_version`` is based on the version its process
held in memory. When another process stored newer versions first, the update is
re-applied on top of them if, field by field, it changes nothing they changed.
The fields (the same names ``ConflictError.fields`` reports):

====================  ======================================  =========================
field                 an update changes it with               a stored version changed
                                                              it with the event
====================  ======================================  =========================
``status``            ``status``                              ``status_change``
``current_node``      ``current_node``                        ``current_node_changed``
``variables.<name>``  ``variables`` (set), ``unset_variables``  ``variables_changed``
``context.<name>``    ``context``                             ``context_changed``
``nodes.<id>``        ``nodes``                               ``node_*`` status events
====================  ======================================  =========================

Errors and node metrics are appended records (an error adds one to ``error_count``):
they commute with everything and never conflict. Neither does a fork link. The
re-based update is validated again against the newer state, so a transition the
newer versions made impossible (a node they completed, an execution they
cancelled) raises ``InvalidTransitionError`` instead of merging.

This module only reads: it must never decide a merge from anything but the fields
the stored versions' events name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from wfstate._core import StateEvent
from wfstate._model import UNSET, StateUpdate

__all__ = ["fields_of_events", "fields_of_update"]

_NODE_STATUS_EVENTS = frozenset(
    {"node_pending", "node_start", "node_complete", "node_failed", "node_skipped"}
)


def fields_of_update(update: StateUpdate | Mapping[str, Any]) -> frozenset[str]:
    """The fields an update (already validated by the core) changes."""
    if isinstance(update, StateUpdate):
        status: object = update.status
        current_node_given = update.current_node is not UNSET
        variables: Any = update.variables
        unset: Any = update.unset_variables
        context: Any = update.context
        nodes: Any = update.nodes
    else:
        status = update.get("status")
        current_node_given = "current_node" in update and update["current_node"] is not UNSET
        variables = update.get("variables")
        unset = update.get("unset_variables")
        context = update.get("context")
        nodes = update.get("nodes")
    fields: set[str] = set()
    if status is not None:
        fields.add("status")
    if current_node_given:
        fields.add("current_node")
    fields.update(f"variables.{name}" for name in variables or ())
    fields.update(f"variables.{name}" for name in unset or ())
    fields.update(f"context.{name}" for name in context or ())
    fields.update(f"nodes.{node_id}" for node_id in nodes or ())
    return frozenset(fields)


def fields_of_events(events: Iterable[StateEvent]) -> frozenset[str]:
    """The fields stored versions changed, from their events."""
    fields: set[str] = set()
    for event in events:
        kind = str(event.type)
        if kind == "status_change":
            fields.add("status")
        elif kind == "current_node_changed":
            fields.add("current_node")
        elif kind in _NODE_STATUS_EVENTS:
            fields.add(f"nodes.{event.node_id}")
        elif kind == "variables_changed":
            data = event.data
            fields.update(f"variables.{name}" for name in data.get("set", {}))
            fields.update(f"variables.{name}" for name in data.get("unset", ()))
        elif kind == "context_changed":
            fields.update(f"context.{name}" for name in event.data.get("set", {}))
        elif kind == "execution_created":
            fields.add("*")
    return frozenset(fields)
