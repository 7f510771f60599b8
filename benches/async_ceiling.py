"""How close any write-behind can come to the async goal here (not part of ``make bench``).

``python -m benches.async_ceiling [postgresql|sqlite ...]`` runs the two halves of
the async benchmark's round (``benches/test_bench_durable.py``) with nothing of
wfstate's store in between, first one after the other, then at the same time:

- *apply*: 4 threads make the round's 100,000 updates on a ``StateManager`` with
  no store at all, in a child process of its own (so it never waits for this
  process's GIL);
- *write*: the rows wfstate stores for those updates (``same_rows``), written into
  a table that wfstate created, in one transaction, with the least client work the
  driver allows: on PostgreSQL one binary COPY of bytes encoded beforehand (the
  server's ingest alone), on SQLite one ``executemany`` of tuples made beforehand.

"Together" is a write-behind that costs nothing: the apply and the write overlap
perfectly, each on its own process. Its rate is an upper bound for wfstate's async
round on this machine. The tool prints it next to the benchmark's judged baseline
(``raw``: the 4-column rows, written as ``test_async_*`` writes them), timed in the
same run, and the ratio the goal asks to be at least 0.7x. BENCHMARKS.md quotes
the figures.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

from wfstate import StateManager

from .test_bench_durable import (
    _SAME_ROWS_COLUMNS,
    ASYNC_THREADS,
    ASYNC_UPDATES,
    _rows,
    pg_copy,
    pg_copy_same_rows,
    pg_create_rows_table,
    pg_same_rows,
    repeat,
    run_threads,
    same_rows,
    sqlite_connect,
    sqlite_create_rows_table,
    sqlite_executemany,
    sqlite_url,
    wfstate_step,
)

#: Pairs of rounds: one alone (write, then apply), one together.
PAIRS = 4
GOAL = 0.7


def _apply_rounds(rounds: int) -> None:
    """The child: one round per line read, timed; prints the milliseconds."""
    per_thread = ASYNC_UPDATES // ASYNC_THREADS
    with StateManager(ring_capacity=2 * ASYNC_UPDATES) as manager:
        for number in range(rounds):
            workers = [
                repeat(wfstate_step(manager, f"ceiling-{number}-{k}", k), per_thread)
                for k in range(ASYNC_THREADS)
            ]
            print("ready", flush=True)
            sys.stdin.readline()
            start = time.perf_counter()
            run_threads(workers)
            print(f"{time.perf_counter() - start:.6f}", flush=True)


class _Applier:
    """The applying child: ``start()`` lets its next round go, ``result()`` waits for
    the round's seconds."""

    def __init__(self, rounds: int) -> None:
        self._child = subprocess.Popen(
            [sys.executable, "-m", "benches.async_ceiling", "--apply", str(rounds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if self._child.stdin is None or self._child.stdout is None:
            raise RuntimeError("the applying child has no pipes")
        self._input, self._output = self._child.stdin, self._child.stdout

    def start(self) -> None:
        if self._output.readline().strip() != "ready":
            raise RuntimeError("the applying child did not start")
        self._input.write("go\n")
        self._input.flush()

    def result(self) -> float:
        return float(self._output.readline())

    def close(self) -> None:
        self._input.close()
        self._child.wait(timeout=60)


def _timed(action: Callable[[], None]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def _measure(
    name: str, raw: Callable[[], None], write: Callable[[], None], empty: Callable[[], None]
) -> None:
    """``empty`` (untimed) empties both tables before each write."""
    applier = _Applier(2 * PAIRS)
    alone: dict[str, list[float]] = {"raw": [], "write": [], "apply": []}
    together: list[float] = []
    try:
        for _ in range(PAIRS):
            empty()
            alone["raw"].append(_timed(raw))
            alone["write"].append(_timed(write))
            applier.start()
            alone["apply"].append(applier.result())
            empty()
            start = time.perf_counter()
            applier.start()
            write()
            applier.result()
            together.append(time.perf_counter() - start)
    finally:
        applier.close()

    def rate(seconds: list[float]) -> float:
        return ASYNC_UPDATES / statistics.median(seconds)

    print(f"{name}: medians of {PAIRS} rounds of {ASYNC_UPDATES:,} updates")
    for part, seconds in alone.items():
        print(
            f"  {part:<9} alone {statistics.median(seconds) * 1e3:7.1f} ms  {rate(seconds):9,.0f}/s"
        )
    best = rate(together)
    print(f"  together        {statistics.median(together) * 1e3:7.1f} ms  {best:9,.0f}/s")
    ratio = best / rate(alone["raw"])
    print(f"  ceiling against the raw baseline: {ratio:.2f}x (the goal: {GOAL}x)")


def _postgresql() -> None:
    base = "postgresql://root@127.0.0.1:5432/"
    with psycopg.connect(base + "test", autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS wfstate_async_ceiling")
        admin.execute("CREATE DATABASE wfstate_async_ceiling")
    url = base + "wfstate_async_ceiling"
    try:
        StateManager.open(url).close()
        with psycopg.connect(url) as conn:
            pg_create_rows_table(conn, "raw_deltas")
            pg_copy_same_rows(conn, pg_same_rows(0))
            conn.commit()
            columns = _SAME_ROWS_COLUMNS.replace("recorded_at_us", "recorded_at")
            encoded = bytearray()
            query = f"COPY (SELECT {columns} FROM wfstate_deltas) TO STDOUT (FORMAT BINARY)"
            with conn.cursor().copy(query) as copy:
                for chunk in copy:
                    encoded += chunk
            payload = bytes(encoded)
            raw_rows = _rows(0)

            def empty() -> None:
                conn.execute("TRUNCATE raw_deltas, wfstate_deltas")
                conn.commit()

            def raw() -> None:
                pg_copy(conn, "raw_deltas", raw_rows)

            def write() -> None:
                statement = f"COPY wfstate_deltas ({columns}) FROM STDIN (FORMAT BINARY)"
                with conn.transaction(), conn.cursor().copy(statement) as copy:
                    copy.write(payload)

            _measure("postgresql", raw, write, empty)
    finally:
        with psycopg.connect(base + "test", autocommit=True) as admin:
            admin.execute("DROP DATABASE IF EXISTS wfstate_async_ceiling")


def _sqlite() -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "ceiling.db"
        StateManager.open(sqlite_url(path)).close()
        conn = sqlite_connect(path)
        try:
            sqlite_create_rows_table(conn, "raw_deltas")
            rows = same_rows(0)
            raw_rows = _rows(0)
            insert = (
                f"INSERT INTO wfstate_deltas ({_SAME_ROWS_COLUMNS}) VALUES ({', '.join('?' * 9)})"
            )

            def empty() -> None:
                conn.execute("DELETE FROM raw_deltas")
                conn.execute("DELETE FROM wfstate_deltas")

            def raw() -> None:
                sqlite_executemany(conn, raw_rows)

            def write() -> None:
                conn.execute("BEGIN")
                conn.executemany(insert, rows)
                conn.execute("COMMIT")

            _measure("sqlite", raw, write, empty)
        finally:
            conn.close()


def main(argv: list[str]) -> None:
    if argv[:1] == ["--apply"]:
        _apply_rounds(int(argv[1]))
        return
    for backend in argv or ["postgresql", "sqlite"]:
        {"postgresql": _postgresql, "sqlite": _sqlite}[backend]()


if __name__ == "__main__":
    main(sys.argv[1:])
