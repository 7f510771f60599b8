"""Where a sync write's time goes, layer by layer, interleaved (not part of ``make bench``).

``python -m benches.sync_breakdown [sqlite|postgresql]`` times, in one loop that
calls each layer once per round (so drift of the machine hits every layer alike):

- ``raw``: the raw driver's autocommit INSERT of a delta-sized row (the sync goal's
  baseline, as ``benches/test_bench_durable.py`` builds it);
- ``sql``: the store's own statements for one version on a bare connection (SQLite:
  ``BEGIN IMMEDIATE``, the UPDATE of the execution row, the INSERT of the delta,
  ``COMMIT``; PostgreSQL: the one-version write statement through psycopg);
- ``store``: ``Store.write([one version])``;
- ``manager``: ``StateManager.update_state`` (prepare, snapshot decision, group
  commit, store, publish).

It prints the median of each in microseconds. BENCHMARKS.md quotes its figures.
PostgreSQL comes from ``$WFSTATE_TEST_POSTGRES_URL``; a database ``wfstate_breakdown``
is created (dropped first) next to it.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from durable_support import Recorder  # on sys.path: see benches/__init__.py
from wfstate import StateManager
from wfstate.store import open_store
from wfstate.store import sqlite as sqlite_store
from wfstate.store.base import WriteItem

from .conftest import DEFAULT_POSTGRES_URL, POSTGRES_URL_ENV, with_database
from .test_bench_durable import (
    initial_variables,
    pg_connect,
    pg_create_rows_table,
    pg_insert_step,
    sqlite_connect,
    sqlite_create_rows_table,
    sqlite_insert_step,
    wfstate_step,
)

ROUNDS = 2_000
WARMUP = 100


def medians(layers: dict[str, Callable[[], object]]) -> dict[str, float]:
    timings: dict[str, list[float]] = {name: [] for name in layers}
    for _ in range(WARMUP):
        for step in layers.values():
            step()
    for _ in range(ROUNDS):
        for name, step in layers.items():
            start = time.perf_counter()
            step()
            timings[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e6 for name, values in timings.items()}


def store_steps(url: str) -> Callable[[], object]:
    """``store.write`` of one update per call, on an execution of its own (the
    records are made before the clock starts)."""
    store = open_store(url)
    recorder = Recorder()
    store.write([WriteItem(recorder.create("store", variables=initial_variables(1)))])
    items = iter(
        [
            WriteItem(
                recorder.update("store", {"variables": {f"v{number % 50}": f"{number:0190d}"}})
            )
            for number in range(WARMUP + ROUNDS)
        ]
    )

    def step() -> object:
        return store.write([next(items)])

    return step


def sqlite_layers(directory: Path) -> dict[str, Callable[[], object]]:
    manager = StateManager.open(f"sqlite:///{directory / 'manager.db'}")
    raw_connection = sqlite_connect(directory / "raw.db")
    sqlite_create_rows_table(raw_connection, "raw_deltas")
    store_step = store_steps(f"sqlite:///{directory / 'store.db'}")
    setup = open_store(f"sqlite:///{directory / 'sql.db'}")
    setup.write([WriteItem(Recorder().create("sql"))])
    setup.close()
    writer = sqlite_connect(directory / "sql.db")
    versions = iter(range(2, 10**9))
    payload = b"x" * 233

    def sql() -> object:
        version = next(versions)
        writer.execute("BEGIN IMMEDIATE")
        writer.execute(
            sqlite_store._UPDATE_EXECUTION, (version, "running", version, 0, "sql", version - 1)
        )
        writer.execute(
            sqlite_store._INSERT_DELTA,
            ("sql", version, version, None, 1024, "[]", payload, None, None),
        )
        return writer.execute("COMMIT")

    return {
        "raw": sqlite_insert_step(raw_connection, "raw"),
        "sql": sql,
        "store": store_step,
        "manager": wfstate_step(manager, "manager", 0),
    }


def postgres_layers() -> dict[str, Callable[[], object]]:
    import os

    import psycopg
    from psycopg import sql

    server = os.environ.get(POSTGRES_URL_ENV) or DEFAULT_POSTGRES_URL
    name = "wfstate_breakdown"
    with psycopg.connect(server, autocommit=True) as connection:
        connection.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = with_database(server, name)
    raw_connection = pg_connect(url)
    pg_create_rows_table(raw_connection, "raw_deltas")
    store_step = store_steps(url)
    manager = StateManager.open(url)
    return {
        "raw": pg_insert_step(raw_connection, "raw"),
        "store": store_step,
        "manager": wfstate_step(manager, "manager", 0),
    }


def main() -> None:
    backend = sys.argv[1] if len(sys.argv) > 1 else "sqlite"
    if backend == "sqlite":
        layers = sqlite_layers(Path(tempfile.mkdtemp(prefix="wfstate-breakdown-")))
    else:
        layers = postgres_layers()
    results = medians(layers)
    raw = results["raw"]
    for name, median in results.items():
        print(f"{backend:10} {name:8} p50 {median:8.1f} us  {median / raw:5.2f}x raw")


if __name__ == "__main__":
    main()
