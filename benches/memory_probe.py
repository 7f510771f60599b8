"""Memory per execution in a fresh interpreter: ``python -m benches.memory_probe IMPL COUNT``.

Creates COUNT executions of 20 variables each in a new store of IMPL (``wfstate``,
``reference`` or ``dict_lock``) and prints, as one JSON object, the growth of the
resident set size read from /proc/self/statm (the Rust core allocates with mimalloc,
which tracemalloc cannot see) and that growth divided by COUNT.

It runs in a process of its own because RSS only tells the truth in a process that has
not freed anything yet: memory released by an earlier benchmark stays mapped and would
be reused, hiding the growth. Speed is not its business (pytest-benchmark times the
whole probe); the creation time it prints, net of building the input, is a by-product.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from typing import Any

from reference_model import ReferenceStateManager
from wfstate import StateManager

from .workload import WORKFLOW_ID, DictLockStore, initial_variables

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE_SIZE


def measure(implementation: str, count: int) -> dict[str, Any]:
    store: StateManager | ReferenceStateManager | DictLockStore
    if implementation == "wfstate":
        store = StateManager()
    elif implementation == "reference":
        store = ReferenceStateManager()
    elif implementation == "dict_lock":
        store = DictLockStore()
    else:
        raise SystemExit(f"unknown implementation {implementation!r}")
    # Each execution's variables are built in the loop and dropped by the caller right
    # after: the growth is what the store keeps (the Python stores keep the caller's
    # value objects, the Rust core copies them), not the caller's input.
    gc.collect()
    before = resident_bytes()
    started = time.perf_counter()
    if isinstance(store, DictLockStore):
        for index in range(count):
            store.create_execution(f"execution-{index:07d}", initial_variables(salt=index))
    else:
        for index in range(count):
            store.create_execution(
                f"execution-{index:07d}",
                workflow_id=WORKFLOW_ID,
                variables=initial_variables(salt=index),
            )
    elapsed = time.perf_counter() - started
    gc.collect()
    after = resident_bytes()
    assert len(store) == count
    # What building the ids and variables alone costs, to subtract from the above.
    started = time.perf_counter()
    for index in range(count):
        _ = f"execution-{index:07d}", initial_variables(salt=index)
    input_elapsed = time.perf_counter() - started
    return {
        "executions": count,
        "rss_growth_mib": (after - before) / 2**20,
        "bytes_per_execution": (after - before) / count,
        "create_us_per_execution": (elapsed - input_elapsed) / count * 1e6,
    }


def main() -> None:
    implementation, count = sys.argv[1], int(sys.argv[2])
    print(json.dumps(measure(implementation, count)))


if __name__ == "__main__":
    main()
