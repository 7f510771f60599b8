"""The benchmark workload and the simplest alternative store, shared by every bench.

The workload is the one of the issue: an execution holding 20 variables, and updates
that each move one node and set one variable. The node alternates running -> failed ->
running ... (``failed -> running`` is a new attempt), so the update stream stays legal
however many rounds a benchmark runs.

``DictLockStore`` is the baseline every group measures against: a ``dict`` guarded by
one ``threading.Lock``, doing the least work that still keeps immutable snapshots and an
event list. It checks nothing and validates nothing; it is the floor of a Python store,
not a competitor. Nothing here may call into the Rust core.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from typing import Any, Final

__all__ = [
    "HISTORY_LIMIT",
    "NODE_ID",
    "VARIABLE_COUNT",
    "WORKFLOW_ID",
    "BaselineUpdate",
    "DictLockStore",
    "baseline_updates",
    "initial_variables",
    "updates",
]

#: Variables held by every benchmarked execution.
VARIABLE_COUNT: Final = 20
#: The node the updates move back and forth.
NODE_ID: Final = "step"
WORKFLOW_ID: Final = "bench"
#: Events asked of ``get_history``.
HISTORY_LIMIT: Final = 100

#: One update of the baseline: (node status, variable name, variable value).
BaselineUpdate = tuple[str, str, int]


def initial_variables(salt: int = 0) -> dict[str, Any]:
    """Twenty variables of the kinds a workflow carries: ids, amounts, flags, names.

    ``salt`` makes the values of one execution differ from another's, so that a
    store holding many executions cannot share them.
    """
    variables: dict[str, Any] = {}
    for index in range(VARIABLE_COUNT):
        name = f"var_{index:02d}"
        match index % 4:
            case 0:
                variables[name] = salt * VARIABLE_COUNT + index
            case 1:
                variables[name] = f"value-{salt}-{index}"
            case 2:
                variables[name] = (salt + index) * 0.5
            case _:
                variables[name] = index % 8 == 3
    return variables


def _cycle() -> list[BaselineUpdate]:
    # 20 steps: an even length, so that "failed" follows the last "running" when the
    # cycle wraps around; each step sets the next of the 20 variables.
    return [
        ("failed" if step % 2 == 0 else "running", f"var_{step:02d}", step)
        for step in range(VARIABLE_COUNT)
    ]


def updates() -> Iterator[dict[str, Any]]:
    """Endless legal updates for an execution whose node is running."""
    return itertools.cycle(
        [
            {"nodes": {NODE_ID: status}, "variables": {name: value}}
            for status, name, value in _cycle()
        ]
    )


def baseline_updates() -> Iterator[BaselineUpdate]:
    """The same stream as ``updates()``, as the baseline's plain arguments."""
    return itertools.cycle(_cycle())


class DictLockStore:
    """Executions in a dict behind one lock: the least a thread-safe store can do.

    An execution is a dict ``{"version", "nodes", "variables"}`` that is never mutated
    once stored (a reader may hold it): an update builds the next one from shallow
    copies. Events are dicts appended to a per-execution list.
    """

    __slots__ = ("_events", "_executions", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._executions: dict[str, dict[str, Any]] = {}
        self._events: dict[str, list[dict[str, Any]]] = {}

    def create_execution(self, execution_id: str, variables: dict[str, Any]) -> dict[str, Any]:
        state = {"version": 1, "nodes": {}, "variables": dict(variables)}
        with self._lock:
            self._executions[execution_id] = state
            self._events[execution_id] = [
                {"version": 1, "type": "execution_created", "variables": state["variables"]}
            ]
        return state

    def update_state(self, execution_id: str, node_status: str, variable: str, value: int) -> int:
        with self._lock:
            current = self._executions[execution_id]
            version: int = current["version"] + 1
            self._executions[execution_id] = {
                "version": version,
                "nodes": {**current["nodes"], NODE_ID: node_status},
                "variables": {**current["variables"], variable: value},
            }
            self._events[execution_id].append(
                {
                    "version": version,
                    "timestamp": time.time(),
                    "node_id": NODE_ID,
                    "to": node_status,
                    "set": {variable: value},
                }
            )
            return version

    def get_state(self, execution_id: str) -> dict[str, Any]:
        with self._lock:
            return self._executions[execution_id]

    def get_history(self, execution_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return self._events[execution_id][-HISTORY_LIMIT:]

    def __len__(self) -> int:
        return len(self._executions)
