"""The durability benchmarks: sync, group-commit and async writes, and storage efficiency.

Each group runs wfstate on a real store (PostgreSQL, then SQLite) next to its
baseline in the same run: the raw driver doing the least work that the same
durability needs, without wfstate. The issue's goals, one group each:

- ``durable_sync_*``: one sync ``update_state`` per round against one autocommit INSERT
  of a row whose payload has the size of wfstate's delta for that update (psycopg with
  a prepared statement, as wfstate; stdlib sqlite3 with the store's PRAGMAs). Goal:
  the p50 at most 1.3x the raw INSERT's.
- ``durable_group_commit_*``: 16 threads in sync mode, each updating its own
  execution, against the single-client raw INSERT rate of the same run (and, for
  reference, 16 raw clients, each with its own connection). Goal: at least 3x the
  single-client rate.
- ``durable_async_*``: 100,000 async updates from 4 threads, timed from the first
  update to ``flush()`` returning, against 100,000 rows of the same size written raw
  in one transaction (``cursor.copy()`` on PostgreSQL, ``executemany`` on SQLite).
  Goals: at least 20,000 updates/s, and at least 0.7x the raw rate. For information,
  a third contender (``*_same_rows``) writes the rows wfstate itself stores, with all
  nine columns (made by an in-memory twin: ``same_rows``), into wfstate's own delta
  table, indexes included, with the same raw driver call.
- ``storage_efficiency``: 5 executions x 1,000 sync updates; the bytes the store uses
  against storing the whole state at every version (its JSON summed, and the same
  rows stored in an equivalent table). Goal: at most 20%.

The workload: an execution holds 50 variables of 190-character strings (about 10 KB
as JSON), and each update sets one variable to a new 190-character value. Updates
touch variables only, so that in async mode none is critical (a node failure or a
status change would be written synchronously). The values are base64 of SHA-256
digests, text that no compressor shrinks (like the random ids and tokens a workflow
carries), so that neither side wins by PostgreSQL's compression of values over ~2 kB
(wfstate's snapshots, the baseline's full states).

PostgreSQL: ``$WFSTATE_TEST_POSTGRES_URL`` (default ``postgresql://root@127.0.0.1:5432/test``).
The benchmarks never touch that database: the session creates ``wfstate_bench_<pid>``
next to it, every test starts from an empty ``public`` schema there, and the database
is dropped at the end. Without a server the PostgreSQL benchmarks are skipped (failed
under ``CI=true``).

Nothing here asserts a duration: speed is a benchmark figure, never a test verdict.
The goals are checked in the end-of-run summary (``SUMMARY_SECTIONS``).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import itertools
import json
import os
import sqlite3
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import TupleRow
from psycopg.types.numeric import Int8

from wfstate import StateManager

from .support import RESULTS, SUMMARY_SECTIONS, Benchmark, Reporter, Result, percentiles

PgConnection = psycopg.Connection[TupleRow]

# -- sizes of the runs (the whole file takes about two minutes on 2 cores) -------------

#: Timed sync updates (one per round) after untimed ones that prepare the statements.
SYNC_ROUNDS: Final = 3_000
SYNC_WARMUP: Final = 200
#: Group commit: threads, updates per thread per round, timed rounds (after one warm-up).
GROUP_THREADS: Final = 16
GROUP_UPDATES_PER_THREAD: Final = 200
GROUP_ROUNDS: Final = 5
#: Rows per round of the single-client raw INSERT rate.
RAW_RATE_ROWS: Final = 1_000
#: Async: updates per round, shared by the threads, timed rounds.
ASYNC_UPDATES: Final = 100_000
ASYNC_THREADS: Final = 4
ASYNC_ROUNDS: Final = 3
#: Storage: executions (one thread each, sync mode), updates per execution.
STORAGE_EXECUTIONS: Final = 5
STORAGE_UPDATES: Final = 1_000

# -- the goals of the issue --------------------------------------------------------------

SYNC_P50_GOAL: Final = 1.3  # wfstate p50 / raw INSERT p50, at most
GROUP_COMMIT_GOAL: Final = 3.0  # 16-thread updates/s / single-client raw INSERTs/s, at least
ASYNC_RATE_GOAL: Final = 20_000.0  # updates/s, at least
ASYNC_COPY_GOAL: Final = 0.7  # wfstate updates/s / raw COPY rows/s, at least
STORAGE_GOAL: Final = 0.20  # wfstate bytes / full-state bytes, at most

# -- the workload ----------------------------------------------------------------------------

VARIABLE_COUNT: Final = 50
VALUE_CHARS: Final = 190
#: Values each variable takes in turn: the update stream repeats every 50 x 20 updates.
GENERATIONS: Final = 20
WORKFLOW_ID: Final = "bench-durable"


def _text(salt: int, index: int, generation: int) -> str:
    digest = b"".join(
        hashlib.sha256(f"{salt}/{index}/{generation}/{block}".encode()).digest()
        for block in range(5)
    )
    return base64.b64encode(digest).decode()[:VALUE_CHARS]


def _name(index: int) -> str:
    return f"var_{index:02d}"


def initial_variables(salt: int) -> dict[str, str]:
    """The 50 variables of a new execution (``salt`` keeps executions apart)."""
    return {_name(index): _text(salt, index, 0) for index in range(VARIABLE_COUNT)}


@functools.cache
def _update_cycle(salt: int) -> tuple[dict[str, Any], ...]:
    return tuple(
        {
            "variables": {
                _name(step % VARIABLE_COUNT): _text(
                    salt, step % VARIABLE_COUNT, 1 + step // VARIABLE_COUNT
                )
            }
        }
        for step in range(VARIABLE_COUNT * GENERATIONS)
    )


def updates(salt: int) -> Iterator[dict[str, Any]]:
    """Endless updates: update k sets variable k mod 50 to its next value."""
    return itertools.cycle(_update_cycle(salt))


def wfstate_step(manager: StateManager, execution_id: str, salt: int) -> Callable[[], int]:
    """Create ``execution_id``; return one update of it per call."""
    manager.create_execution(
        execution_id, workflow_id=WORKFLOW_ID, variables=initial_variables(salt)
    )
    stream = updates(salt)
    update = manager.update_state

    def step() -> int:
        return update(execution_id, next(stream))

    return step


@functools.cache
def delta_size() -> int:
    """The size of wfstate's delta for one update of the workload (the median of 200
    updates of an in-memory twin: the raw baselines write payloads of this size)."""
    with StateManager() as manager:
        cursor = manager.open_cursor()
        step = wfstate_step(manager, "probe", 0)
        for _ in range(200):
            step()
        records = cursor.read_records(1_000, timeout=0)
    sizes = sorted(len(record.delta) for record in records if record.base_version > 0)
    return sizes[len(sizes) // 2]


def payload() -> bytes:
    return os.urandom(delta_size())


def run_threads(workers: Sequence[Callable[[], object]]) -> None:
    """Run every worker on a thread of its own, started together behind a barrier."""
    barrier = threading.Barrier(len(workers))

    def run(worker: Callable[[], object]) -> None:
        barrier.wait(timeout=60)
        worker()

    with ThreadPoolExecutor(max_workers=len(workers)) as pool:
        futures = [pool.submit(run, worker) for worker in workers]
        for future in futures:
            future.result(timeout=600)


def repeat(step: Callable[[], object], times: int) -> Callable[[], None]:
    def worker() -> None:
        for _ in range(times):
            step()

    return worker


def median_rate(reporter: Reporter, per_round: int) -> dict[str, float]:
    """Operations per second of the median round and of the best one."""
    timings = sorted(reporter.timings)
    if not timings:
        return {}
    return {
        "per_s": per_round / statistics.median(timings),
        "best_per_s": per_round / timings[0],
    }


def commit_figures(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """Transactions of the sync path between two ``stats()`` and versions each carried."""
    commits = after["group_commits"] - before["group_commits"]
    versions = after["group_committed_versions"] - before["group_committed_versions"]
    return {"transactions": commits, "versions_per_transaction": versions / max(commits, 1)}


def measured(group: str, contender: str) -> dict[str, Any] | None:
    """The figures an earlier benchmark of this run recorded (None if it did not run)."""
    for result in reversed(RESULTS):
        if (result.group, result.implementation) == (group, contender):
            return result.figures
    return None


# -- PostgreSQL -----------------------------------------------------------------------------


def pg_connect(url: str, *, autocommit: bool = True) -> PgConnection:
    return psycopg.connect(url, autocommit=autocommit)


def pg_create_rows_table(conn: PgConnection, table: str) -> None:
    """The raw baselines' table: wfstate's delta table without the columns it adds
    (actor, event mask, node ids), the same key and column order."""
    conn.execute(
        sql.SQL(
            """CREATE TABLE IF NOT EXISTS {} (
                version bigint NOT NULL,
                recorded_at timestamptz NOT NULL,
                execution_id text COLLATE "C" NOT NULL,
                data bytea NOT NULL,
                PRIMARY KEY (execution_id, version)
            )"""
        ).format(sql.Identifier(table))
    )


def pg_insert_step(conn: PgConnection, execution_id: str) -> Callable[[], object]:
    """One autocommit INSERT per call, as a prepared statement (wfstate prepares too)."""
    statement = (
        sql.SQL("INSERT INTO {} (execution_id, version, recorded_at, data) VALUES (%s, %s, %s, %s)")
        .format(sql.Identifier("raw_deltas"))
        .as_bytes(conn)
    )
    data = payload()
    versions = itertools.count(1)
    execute = conn.execute

    def step() -> object:
        return execute(
            statement,
            (execution_id, Int8(next(versions)), datetime.now(UTC), data),
            prepare=True,
        )

    return step


def pg_copy(conn: PgConnection, table: str, rows: Sequence[tuple[Any, ...]]) -> None:
    """Binary COPY of (version, recorded_at, execution_id, data) rows, in one transaction."""
    statement = sql.SQL(
        "COPY {} (version, recorded_at, execution_id, data) FROM STDIN (FORMAT BINARY)"
    ).format(sql.Identifier(table))
    with conn.transaction(), conn.cursor() as cursor, cursor.copy(statement) as copy:
        copy.set_types(["int8", "timestamptz", "text", "bytea"])
        for row in rows:
            copy.write_row(row)


# -- SQLite -----------------------------------------------------------------------------------


def sqlite_connect(path: Path) -> sqlite3.Connection:
    """A connection as the SQLite store's write connection is set up (store/sqlite.py):
    autocommit (``isolation_level=None``), busy timeout 5 s, WAL, ``synchronous=FULL``."""
    conn = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


def sqlite_create_rows_table(conn: sqlite3.Connection, table: str) -> None:
    # Table names here are constants of this file, never input.
    conn.execute(
        f"""CREATE TABLE IF NOT EXISTS {table} (
            execution_id TEXT NOT NULL,
            version INTEGER NOT NULL,
            recorded_at_us INTEGER NOT NULL,
            data BLOB NOT NULL,
            PRIMARY KEY (execution_id, version)
        ) WITHOUT ROWID"""
    )


_SQLITE_INSERT: Final = (
    "INSERT INTO raw_deltas (execution_id, version, recorded_at_us, data) VALUES (?, ?, ?, ?)"
)


def sqlite_insert_step(conn: sqlite3.Connection, execution_id: str) -> Callable[[], object]:
    """One autocommit INSERT per call (sqlite3 caches the prepared statement)."""
    data = payload()
    versions = itertools.count(1)
    execute = conn.execute

    def step() -> object:
        return execute(_SQLITE_INSERT, (execution_id, next(versions), time.time_ns() // 1000, data))

    return step


def sqlite_executemany(conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """The async SQLite baseline: ``_rows`` into ``raw_deltas`` by one ``executemany``
    in one transaction, all rows stamped with one time."""
    recorded_at_us = time.time_ns() // 1000
    conn.execute("BEGIN")
    conn.executemany(
        _SQLITE_INSERT,
        ((execution_id, version, recorded_at_us, data) for version, _, execution_id, data in rows),
    )
    conn.execute("COMMIT")


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


# -- sync: one update against one autocommit INSERT ---------------------------------------


def _sync(
    benchmark: Benchmark,
    reporter: Reporter,
    group: str,
    contender: str,
    url: str,
    raw_step: Callable[[], Callable[[], object]],
) -> None:
    if contender == "wfstate":
        with StateManager.open(url, durability="sync") as manager:
            step: Callable[[], object] = wfstate_step(manager, "sync", 0)
            for _ in range(SYNC_WARMUP):
                step()
            before = dict(manager.stats())
            benchmark.pedantic(step, rounds=SYNC_ROUNDS, iterations=1)
            extra = commit_figures(before, dict(manager.stats()))
    else:
        step = raw_step()
        for _ in range(SYNC_WARMUP):
            step()
        benchmark.pedantic(step, rounds=SYNC_ROUNDS, iterations=1)
        extra = {}
    figures: dict[str, Any] = {**percentiles(reporter.timings, 50, 90, 99), **extra}
    figures["payload_bytes"] = delta_size()
    wfstate = measured(group, "wfstate")
    if contender != "wfstate" and wfstate and figures.get("p50_us"):
        # The goal's ratio, stored with the baseline (wfstate's figures come first).
        ratio = wfstate["p50_us"] / figures["p50_us"]
        figures.update(wfstate_p50_ratio=ratio, goal_max_ratio=SYNC_P50_GOAL)
        figures["goal_met"] = ratio <= SYNC_P50_GOAL
    reporter.record(group, contender, **figures)
    print(f"{group}[{contender}]", figures)


@pytest.mark.parametrize("contender", ["wfstate", "raw_insert"])
@pytest.mark.benchmark(group="durable_sync_pg")
def test_sync_pg(benchmark: Benchmark, reporter: Reporter, contender: str, pg_url: str) -> None:
    with pg_connect(pg_url) as conn:
        pg_create_rows_table(conn, "raw_deltas")
        _sync(
            benchmark,
            reporter,
            "durable_sync_pg",
            contender,
            pg_url,
            lambda: pg_insert_step(conn, "sync"),
        )


@pytest.mark.parametrize("backend", ["pg", "sqlite"])
@pytest.mark.benchmark(group="durable_sync_interleaved")
def test_sync_interleaved(
    benchmark: Benchmark, reporter: Reporter, backend: str, request: pytest.FixtureRequest
) -> None:
    """The sync goal's ratio with the two sides interleaved: before each timed
    ``update_state`` (pytest-benchmark's round), the raw INSERT runs once in the round's
    untimed setup and times itself. Both p50s then come from one sequence, so drift
    of the machine between two halves of a run cannot move the ratio (the groups
    above time 3,000 wfstate calls, then 3,000 raw ones). Reported next to them; the
    goal's verdict stays with the groups above."""
    raw_durations: list[float] = []
    connection: PgConnection | sqlite3.Connection
    if backend == "pg":
        url: str = request.getfixturevalue("pg_url")
        connection = pg_connect(url)
        pg_create_rows_table(connection, "raw_deltas")
        raw = pg_insert_step(connection, "raw")
    else:
        path = request.getfixturevalue("tmp_path") / "bench.db"
        url = sqlite_url(path)
        connection = sqlite_connect(path.with_name("raw.db"))
        sqlite_create_rows_table(connection, "raw_deltas")
        raw = sqlite_insert_step(connection, "raw")

    def raw_once() -> None:
        start = time.perf_counter()
        raw()
        raw_durations.append(time.perf_counter() - start)

    try:
        with StateManager.open(url, durability="sync") as manager:
            step = wfstate_step(manager, "sync", 0)
            for _ in range(SYNC_WARMUP):
                step()
                raw()
            benchmark.pedantic(step, setup=raw_once, rounds=SYNC_ROUNDS, iterations=1)
    finally:
        connection.close()
    wfstate = percentiles(reporter.timings, 50, 90, 99)
    figures: dict[str, Any] = {f"wfstate_{k}": v for k, v in wfstate.items()}
    figures.update({f"raw_{k}": v for k, v in percentiles(raw_durations, 50, 90, 99).items()})
    if "wfstate_p50_us" in figures and "raw_p50_us" in figures:
        figures["p50_ratio"] = figures["wfstate_p50_us"] / figures["raw_p50_us"]
    reporter.record(f"durable_sync_interleaved_{backend}", "wfstate", **figures)
    print(f"durable_sync_interleaved[{backend}]", figures)


@pytest.mark.parametrize("contender", ["wfstate", "raw_insert"])
@pytest.mark.benchmark(group="durable_sync_sqlite")
def test_sync_sqlite(
    benchmark: Benchmark, reporter: Reporter, contender: str, tmp_path: Path
) -> None:
    path = tmp_path / "bench.db"
    conn = sqlite_connect(path)
    try:
        sqlite_create_rows_table(conn, "raw_deltas")
        _sync(
            benchmark,
            reporter,
            "durable_sync_sqlite",
            contender,
            sqlite_url(path),
            lambda: sqlite_insert_step(conn, "sync"),
        )
    finally:
        conn.close()


# -- group commit: 16 threads in sync mode against one raw client ---------------------------

GROUP_CONTENDERS: Final = ("wfstate_16_threads", "raw_insert_1_client", "raw_insert_16_clients")


def _group_commit(
    benchmark: Benchmark,
    reporter: Reporter,
    group: str,
    contender: str,
    url: str,
    raw_steps: Callable[[int], list[Callable[[], object]]],
) -> None:
    extra: dict[str, Any] = {}
    if contender == "wfstate_16_threads":
        per_round = GROUP_THREADS * GROUP_UPDATES_PER_THREAD
        with StateManager.open(url, durability="sync") as manager:
            workers = [
                repeat(wfstate_step(manager, f"group-{thread}", thread), GROUP_UPDATES_PER_THREAD)
                for thread in range(GROUP_THREADS)
            ]
            run_threads(workers)  # warm-up, outside the statistics
            before = dict(manager.stats())
            benchmark.pedantic(
                run_threads, args=(workers,), rounds=GROUP_ROUNDS, warmup_rounds=0, iterations=1
            )
            extra = commit_figures(before, dict(manager.stats()))
    elif contender == "raw_insert_1_client":
        per_round = RAW_RATE_ROWS
        (step,) = raw_steps(1)
        benchmark.pedantic(
            repeat(step, RAW_RATE_ROWS), rounds=GROUP_ROUNDS, warmup_rounds=1, iterations=1
        )
    else:
        per_round = GROUP_THREADS * GROUP_UPDATES_PER_THREAD
        workers = [repeat(step, GROUP_UPDATES_PER_THREAD) for step in raw_steps(GROUP_THREADS)]
        benchmark.pedantic(
            run_threads, args=(workers,), rounds=GROUP_ROUNDS, warmup_rounds=1, iterations=1
        )
    figures: dict[str, Any] = {**median_rate(reporter, per_round), **extra}
    figures["per_round"] = per_round
    wfstate = measured(group, "wfstate_16_threads")
    if contender == "raw_insert_1_client" and wfstate and figures.get("per_s"):
        ratio = wfstate["per_s"] / figures["per_s"]
        figures.update(wfstate_16_threads_ratio=ratio, goal_min_ratio=GROUP_COMMIT_GOAL)
        figures["goal_met"] = ratio >= GROUP_COMMIT_GOAL
    reporter.record(group, contender, **figures)
    print(f"{group}[{contender}]", figures)


@pytest.mark.parametrize("contender", GROUP_CONTENDERS)
@pytest.mark.benchmark(group="durable_group_commit_pg")
def test_group_commit_pg(
    benchmark: Benchmark, reporter: Reporter, contender: str, pg_url: str
) -> None:
    connections: list[PgConnection] = []

    def raw_steps(clients: int) -> list[Callable[[], object]]:
        connections.extend(pg_connect(pg_url) for _ in range(clients))
        pg_create_rows_table(connections[0], "raw_deltas")
        return [pg_insert_step(conn, f"client-{n}") for n, conn in enumerate(connections)]

    try:
        _group_commit(benchmark, reporter, "durable_group_commit_pg", contender, pg_url, raw_steps)
    finally:
        for conn in connections:
            conn.close()


@pytest.mark.parametrize("contender", GROUP_CONTENDERS)
@pytest.mark.benchmark(group="durable_group_commit_sqlite")
def test_group_commit_sqlite(
    benchmark: Benchmark, reporter: Reporter, contender: str, tmp_path: Path
) -> None:
    path = tmp_path / "bench.db"
    connections: list[sqlite3.Connection] = []

    def raw_steps(clients: int) -> list[Callable[[], object]]:
        connections.extend(sqlite_connect(path) for _ in range(clients))
        sqlite_create_rows_table(connections[0], "raw_deltas")
        return [sqlite_insert_step(conn, f"client-{n}") for n, conn in enumerate(connections)]

    try:
        _group_commit(
            benchmark,
            reporter,
            "durable_group_commit_sqlite",
            contender,
            sqlite_url(path),
            raw_steps,
        )
    finally:
        for conn in connections:
            conn.close()


# -- async: 100,000 updates until flush() against one raw bulk write ------------------------


def _async_wfstate(benchmark: Benchmark, url: str) -> dict[str, Any]:
    per_thread = ASYNC_UPDATES // ASYNC_THREADS
    rounds = itertools.count()
    applied: list[float] = []
    drained: list[float] = []
    with StateManager.open(url, durability="async") as manager:

        def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
            number = next(rounds)
            workers = [
                repeat(wfstate_step(manager, f"async-{number}-{thread}", thread), per_thread)
                for thread in range(ASYNC_THREADS)
            ]
            manager.flush()  # the creations, before the clock starts
            return (workers,), {}

        def one_round(workers: list[Callable[[], None]]) -> None:
            start = time.perf_counter()
            run_threads(workers)
            middle = time.perf_counter()
            manager.flush(timeout=600)
            applied.append(middle - start)
            drained.append(time.perf_counter() - middle)

        before = manager.stats()
        benchmark.pedantic(one_round, setup=setup, rounds=ASYNC_ROUNDS, iterations=1)
        after = manager.stats()
    batches = after.get("flush_batches", 0) - before.get("flush_batches", 0)
    versions = after.get("flushed_versions", 0) - before.get("flushed_versions", 0)
    return {
        "apply_s_median": statistics.median(applied),
        "flush_wait_s_median": statistics.median(drained),
        "flush_batches": batches,
        "versions_per_batch": versions / max(batches, 1),
    }


def _rows(number: int) -> list[tuple[Any, ...]]:
    """ASYNC_UPDATES rows of delta size, spread over ASYNC_THREADS executions like wfstate's."""
    data = payload()
    now = datetime.now(UTC)
    per_execution = ASYNC_UPDATES // ASYNC_THREADS
    return [
        (version, now, f"copy-{number}-{execution}", data)
        for execution in range(ASYNC_THREADS)
        for version in range(1, per_execution + 1)
    ]


def same_rows(number: int) -> list[tuple[Any, ...]]:
    """The delta rows wfstate's write-behind stores in one async round, made by an
    in-memory twin running the round's update streams (``ASYNC_UPDATES`` updates on
    ``ASYNC_THREADS`` executions named ``same-<number>-<k>``): the nine values the SQLite
    store binds for each version (``RecordBatch.sqlite_rows``), in execution order like
    ``_rows``: execution id, version, recorded_at_us, actor, event mask, node ids (a
    JSON array), delta, lease owner, lease token."""
    per_execution = ASYNC_UPDATES // ASYNC_THREADS
    rows: list[tuple[Any, ...]] = []
    with StateManager(ring_capacity=ASYNC_UPDATES + ASYNC_THREADS) as twin:
        cursor = twin.open_cursor(durable=True)
        steps = [wfstate_step(twin, f"same-{number}-{k}", k) for k in range(ASYNC_THREADS)]
        cursor.read_batch(ASYNC_THREADS, timeout=0)  # the creations: stored before the clock
        cursor.commit()
        for step in steps:
            for _ in range(per_execution):
                step()
        batch = cursor.read_batch(ASYNC_UPDATES, timeout=0)
        chains, _ = batch.sqlite_rows([False] * len(batch.chains()))
        for _execution_id, _base, _execution_row, deltas, _snapshots in chains:
            rows.extend(deltas)
    assert len(rows) == ASYNC_UPDATES, len(rows)
    return rows


#: Raw contenders that write the same rows as wfstate (``same_rows``) into a table of
#: wfstate's own definition; the others write ``_rows`` into the 4-column raw table.
SAME_ROWS_CONTENDERS: Final = frozenset({"raw_copy_same_rows", "raw_executemany_same_rows"})


def _async(
    benchmark: Benchmark,
    reporter: Reporter,
    group: str,
    contender: str,
    url: str,
    raw_write: Callable[[list[tuple[Any, ...]]], None],
) -> None:
    extra: dict[str, Any] = {}
    if contender == "wfstate":
        extra = _async_wfstate(benchmark, url)
    else:
        rounds = itertools.count()
        make_rows = {
            "raw_copy_same_rows": pg_same_rows,
            "raw_executemany_same_rows": same_rows,
        }.get(contender, _rows)

        def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
            return (make_rows(next(rounds)),), {}

        benchmark.pedantic(raw_write, setup=setup, rounds=ASYNC_ROUNDS, iterations=1)
    figures: dict[str, Any] = {**median_rate(reporter, ASYNC_UPDATES), **extra}
    figures["payload_bytes"] = delta_size()
    if contender == "wfstate" and figures.get("per_s"):
        figures["goal_min_per_s"] = ASYNC_RATE_GOAL
        figures["goal_met"] = figures["per_s"] >= ASYNC_RATE_GOAL
    wfstate = measured(group, "wfstate")
    if contender != "wfstate" and wfstate and figures.get("per_s"):
        ratio = wfstate["per_s"] / figures["per_s"]
        figures["wfstate_ratio"] = ratio
        if contender not in SAME_ROWS_CONTENDERS:  # the goal is judged on the raw table
            figures.update(goal_min_ratio=ASYNC_COPY_GOAL, goal_met=ratio >= ASYNC_COPY_GOAL)
    reporter.record(group, contender, **figures)
    print(f"{group}[{contender}]", figures)


_SAME_ROWS_COLUMNS: Final = (
    "execution_id, version, recorded_at_us, actor, event_mask, node_ids, data,"
    " lease_owner, lease_token"
)


def pg_same_rows(number: int) -> list[tuple[Any, ...]]:
    """``same_rows`` as the values psycopg dumps for ``wfstate_deltas``' columns (the
    time as a datetime, the node ids as a list), converted before the clock starts."""
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return [
        (
            execution_id,
            version,
            epoch + timedelta(microseconds=at_us),
            actor,
            mask,
            json.loads(nodes),
            data,
            owner,
            token,
        )
        for execution_id, version, at_us, actor, mask, nodes, data, owner, token in same_rows(
            number
        )
    ]


def pg_copy_same_rows(conn: PgConnection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Binary COPY of ``pg_same_rows`` into wfstate's own ``wfstate_deltas``, in one
    transaction, each value encoded by psycopg as the raw baseline's are."""
    statement = sql.SQL(
        "COPY wfstate_deltas (execution_id, version, recorded_at, actor, event_mask, node_ids,"
        " data, lease_owner, lease_token) FROM STDIN (FORMAT BINARY)"
    )
    with conn.transaction(), conn.cursor() as cursor, cursor.copy(statement) as copy:
        copy.set_types(
            ["text", "int8", "timestamptz", "text", "int4", "text[]", "bytea", "text", "int8"]
        )
        for row in rows:
            copy.write_row(row)


@pytest.mark.parametrize("contender", ["wfstate", "raw_copy", "raw_copy_same_rows"])
@pytest.mark.benchmark(group="durable_async_pg")
def test_async_pg(benchmark: Benchmark, reporter: Reporter, contender: str, pg_url: str) -> None:
    if contender == "raw_copy_same_rows":
        StateManager.open(pg_url).close()  # wfstate's tables, empty
    with pg_connect(pg_url, autocommit=False) as conn:
        pg_create_rows_table(conn, "raw_deltas")
        conn.commit()
        _async(
            benchmark,
            reporter,
            "durable_async_pg",
            contender,
            pg_url,
            (
                (lambda rows: pg_copy_same_rows(conn, rows))
                if contender == "raw_copy_same_rows"
                else (lambda rows: pg_copy(conn, "raw_deltas", rows))
            ),
        )


@pytest.mark.parametrize("contender", ["wfstate", "raw_executemany", "raw_executemany_same_rows"])
@pytest.mark.benchmark(group="durable_async_sqlite")
def test_async_sqlite(
    benchmark: Benchmark, reporter: Reporter, contender: str, tmp_path: Path
) -> None:
    path = tmp_path / "bench.db"
    if contender == "raw_executemany_same_rows":
        StateManager.open(sqlite_url(path)).close()  # wfstate's tables, empty
    conn = sqlite_connect(path)

    def executemany_same_rows(rows: list[tuple[Any, ...]]) -> None:
        conn.execute("BEGIN")
        conn.executemany(
            f"INSERT INTO wfstate_deltas ({_SAME_ROWS_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        conn.execute("COMMIT")

    try:
        sqlite_create_rows_table(conn, "raw_deltas")
        _async(
            benchmark,
            reporter,
            "durable_async_sqlite",
            contender,
            sqlite_url(path),
            (
                executemany_same_rows
                if contender == "raw_executemany_same_rows"
                else functools.partial(sqlite_executemany, conn)
            ),
        )
        if contender == "wfstate":
            _check_same_rows(conn)
    finally:
        conn.close()


def _check_same_rows(conn: sqlite3.Connection) -> None:
    """``same_rows(0)`` is what wfstate stored in its first async round (the executions
    ``async-0-<k>``), but for the times: the same deltas, actors, masks and node ids."""
    stored = conn.execute(
        "SELECT execution_id, version, actor, event_mask, node_ids, data, lease_owner,"
        " lease_token FROM wfstate_deltas WHERE execution_id LIKE 'async-0-%' AND version > 1"
        " ORDER BY execution_id, version"
    ).fetchall()
    twin = [
        (execution_id.replace("same-0-", "async-0-"), version, *values)
        for execution_id, version, _recorded_at_us, *values in same_rows(0)
    ]
    assert stored == twin, "same_rows() no longer makes the rows wfstate stores"


# -- storage efficiency ---------------------------------------------------------------------


def _full_states() -> tuple[int, list[tuple[int, int, str, bytes]]]:
    """The workload of the storage run on an in-memory twin: the whole state at every
    version, as JSON (its size summed) and as the core's snapshot encoding (the rows of
    the full-state baseline table: version, recorded_at_us, execution_id, snapshot)."""
    json_bytes = 0
    rows: list[tuple[int, int, str, bytes]] = []
    with StateManager() as manager:
        cursor = manager.open_cursor()
        for execution in range(STORAGE_EXECUTIONS):
            step = wfstate_step(manager, f"storage-{execution}", execution)
            for _ in range(STORAGE_UPDATES):
                step()
            while records := cursor.read_records(1_000, timeout=0):
                for record in records:
                    state = record.state.to_dict()
                    json_bytes += len(json.dumps(state, separators=(",", ":")).encode())
                    rows.append(
                        (
                            record.version,
                            record.updated_at_us,
                            record.execution_id,
                            record.snapshot(),
                        )
                    )
    return json_bytes, rows


def _storage_run(url: str) -> dict[str, Any]:
    """5 executions, one sync writer thread each, 1,000 updates each; bytes as run."""
    with StateManager.open(url, durability="sync") as manager:
        workers = [
            repeat(wfstate_step(manager, f"storage-{execution}", execution), STORAGE_UPDATES)
            for execution in range(STORAGE_EXECUTIONS)
        ]
        run_threads(workers)
        return {"wfstate_bytes": manager.storage_bytes()}


_PG_WFSTATE_TABLES: Final = (
    "wfstate_schema_migrations",
    "wfstate_executions",
    "wfstate_deltas",
    "wfstate_snapshots",
)


def _pg_sizes(conn: PgConnection) -> tuple[int, int]:
    """(pg_total_relation_size of every wfstate table, of the full-state table)."""
    wfstate = conn.execute(
        "SELECT sum(pg_total_relation_size(c.oid))::bigint FROM pg_class AS c"
        " JOIN pg_namespace AS n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'public' AND c.relkind = 'r' AND c.relname = ANY(%s)",
        (list(_PG_WFSTATE_TABLES),),
    ).fetchone()
    full = conn.execute("SELECT pg_total_relation_size('public.full_states')").fetchone()
    assert wfstate is not None
    assert full is not None
    return int(wfstate[0]), int(full[0])


def _storage_pg(url: str, rows: list[tuple[int, int, str, bytes]]) -> dict[str, Any]:
    figures = _storage_run(url)
    with pg_connect(url) as conn:
        pg_create_rows_table(conn, "full_states")
        pg_copy(
            conn,
            "full_states",
            [
                (version, datetime.fromtimestamp(at / 1e6, UTC), eid, data)
                for version, at, eid, data in rows
            ],
        )
        wfstate, full = _pg_sizes(conn)
        assert wfstate == figures["wfstate_bytes"]
        figures["full_state_table_bytes"] = full
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM wfstate_deltas),"
            " (SELECT count(*) FROM wfstate_snapshots),"
            " (SELECT coalesce(sum(autovacuum_count), 0) FROM pg_stat_user_tables"
            "  WHERE relname = ANY(%s))",
            (list(_PG_WFSTATE_TABLES),),
        ).fetchone()
        assert counts is not None
        figures["deltas"], figures["snapshots"], figures["autovacuums_during_run"] = counts
        for table, size in conn.execute(
            "SELECT relname, pg_total_relation_size(relid) FROM pg_stat_user_tables"
            " WHERE relname = ANY(%s)",
            (list(_PG_WFSTATE_TABLES),),
        ):
            figures[f"bytes_{table.removeprefix('wfstate_')}"] = size
        # The same maintenance on both sides. Plain VACUUM marks the dead row versions
        # of the executions table (one per update) reusable but rarely shrinks a file;
        # VACUUM FULL rewrites every table compactly: the live data alone.
        conn.execute("VACUUM (ANALYZE)")
        figures["wfstate_bytes_vacuum"], figures["full_state_table_bytes_vacuum"] = _pg_sizes(conn)
        conn.execute("VACUUM (FULL, ANALYZE)")
        figures["wfstate_bytes_vacuum_full"], figures["full_state_table_bytes_vacuum_full"] = (
            _pg_sizes(conn)
        )
    return figures


def _sqlite_bytes(conn: sqlite3.Connection) -> int:
    """As ``SQLiteStore.storage_bytes``: pages in use times the page size."""
    (pages,) = conn.execute("PRAGMA page_count").fetchone()
    (free,) = conn.execute("PRAGMA freelist_count").fetchone()
    (page_size,) = conn.execute("PRAGMA page_size").fetchone()
    return int((pages - free) * page_size)


def _storage_sqlite(directory: Path, rows: list[tuple[int, int, str, bytes]]) -> dict[str, Any]:
    path = directory / "wfstate.db"
    figures = _storage_run(sqlite_url(path))
    conn = sqlite_connect(path)
    try:
        (figures["deltas"],) = conn.execute("SELECT count(*) FROM wfstate_deltas").fetchone()
        (figures["snapshots"],) = conn.execute("SELECT count(*) FROM wfstate_snapshots").fetchone()
        conn.execute("VACUUM")
        figures["wfstate_bytes_vacuum"] = _sqlite_bytes(conn)
    finally:
        conn.close()
    full = sqlite_connect(directory / "full_states.db")
    try:
        sqlite_create_rows_table(full, "full_states")
        full.execute("BEGIN")
        full.executemany(
            "INSERT INTO full_states (execution_id, version, recorded_at_us, data)"
            " VALUES (?, ?, ?, ?)",
            ((eid, version, at, data) for version, at, eid, data in rows),
        )
        full.execute("COMMIT")
        figures["full_state_table_bytes"] = _sqlite_bytes(full)
        full.execute("VACUUM")
        figures["full_state_table_bytes_vacuum"] = _sqlite_bytes(full)
    finally:
        full.close()
    return figures


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
@pytest.mark.benchmark(group="storage_efficiency")
def test_storage_efficiency(
    benchmark: Benchmark,
    reporter: Reporter,
    backend: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    """Bytes the store uses after 5 x 1,000 updates against the whole state stored at
    every version. One round: the time pytest-benchmark shows is the whole run and
    means nothing; the figures are in ``extra_info``."""
    json_bytes, rows = _full_states()

    def run() -> dict[str, Any]:
        if backend == "postgresql":
            return _storage_pg(request.getfixturevalue("pg_url"), rows)
        return _storage_sqlite(tmp_path, rows)

    figures: dict[str, Any] = benchmark.pedantic(run, rounds=1, iterations=1)
    figures["versions"] = len(rows)
    figures["full_state_json_bytes"] = json_bytes
    figures["full_state_snapshot_bytes"] = sum(len(row[3]) for row in rows)
    figures["ratio_to_json"] = figures["wfstate_bytes"] / json_bytes
    figures["ratio_to_table"] = figures["wfstate_bytes"] / figures["full_state_table_bytes"]
    figures["ratio_to_table_vacuum"] = (
        figures["wfstate_bytes_vacuum"] / figures["full_state_table_bytes_vacuum"]
    )
    if "wfstate_bytes_vacuum_full" in figures:
        figures["ratio_to_table_vacuum_full"] = (
            figures["wfstate_bytes_vacuum_full"] / figures["full_state_table_bytes_vacuum_full"]
        )
    figures["goal_max_ratio"] = STORAGE_GOAL
    figures["goal_met"] = max(figures["ratio_to_json"], figures["ratio_to_table"]) <= STORAGE_GOAL
    reporter.record(f"storage_efficiency[{backend}]", "wfstate", **figures)
    print(f"storage_efficiency[{backend}]", figures)


# -- the goals, in the end-of-run summary ---------------------------------------------------


def _verdict(met: bool) -> str:
    return "met" if met else "NOT MET"


def goal_lines(results: Sequence[Result]) -> list[str]:
    """Each goal of the issue: wfstate's figure, the baseline's, the ratio, the verdict."""
    found = {(result.group, result.implementation): result.figures for result in results}
    lines: list[str] = []
    for backend in ("pg", "sqlite"):
        wfstate = found.get((f"durable_sync_{backend}", "wfstate"))
        raw = found.get((f"durable_sync_{backend}", "raw_insert"))
        if wfstate and raw:
            ratio = wfstate["p50_us"] / raw["p50_us"]
            lines.append(
                f"durable_sync_{backend}: p50 {wfstate['p50_us']:,.0f} us vs raw INSERT "
                f"{raw['p50_us']:,.0f} us = {ratio:.2f}x (goal <= {SYNC_P50_GOAL}x): "
                f"{_verdict(ratio <= SYNC_P50_GOAL)}; p99 {wfstate['p99_us']:,.0f} vs "
                f"{raw['p99_us']:,.0f} us"
            )
        interleaved = found.get((f"durable_sync_interleaved_{backend}", "wfstate"))
        if interleaved and "p50_ratio" in interleaved:
            lines.append(
                f"  the same, interleaved: p50 {interleaved['wfstate_p50_us']:,.0f} us vs "
                f"{interleaved['raw_p50_us']:,.0f} us = {interleaved['p50_ratio']:.2f}x"
            )
        group = f"durable_group_commit_{backend}"
        threads = found.get((group, "wfstate_16_threads"))
        single = found.get((group, "raw_insert_1_client"))
        if threads and single:
            ratio = threads["per_s"] / single["per_s"]
            lines.append(
                f"{group}: 16 threads {threads['per_s']:,.0f} updates/s vs 1 raw client "
                f"{single['per_s']:,.0f} rows/s = {ratio:.2f}x (goal >= {GROUP_COMMIT_GOAL}x): "
                f"{_verdict(ratio >= GROUP_COMMIT_GOAL)}"
            )
        group = f"durable_async_{backend}"
        wfstate = found.get((group, "wfstate"))
        raw = found.get((group, "raw_copy" if backend == "pg" else "raw_executemany"))
        if wfstate:
            lines.append(
                f"{group}: {wfstate['per_s']:,.0f} updates/s (goal >= {ASYNC_RATE_GOAL:,.0f}): "
                f"{_verdict(wfstate['per_s'] >= ASYNC_RATE_GOAL)}"
            )
        if wfstate and raw:
            ratio = wfstate["per_s"] / raw["per_s"]
            lines.append(
                f"{group}: vs raw bulk write {raw['per_s']:,.0f} rows/s = {ratio:.2f}x "
                f"(goal >= {ASYNC_COPY_GOAL}x): {_verdict(ratio >= ASYNC_COPY_GOAL)}"
            )
        same = found.get(
            (group, f"{'raw_copy' if backend == 'pg' else 'raw_executemany'}_same_rows")
        )
        if wfstate and same:
            lines.append(
                f"  for information, vs the raw bulk write of wfstate's own rows (nine columns, "
                f"into its table) {same['per_s']:,.0f} rows/s = "
                f"{wfstate['per_s'] / same['per_s']:.2f}x"
            )
    for backend in ("postgresql", "sqlite"):
        storage = found.get((f"storage_efficiency[{backend}]", "wfstate"))
        if storage:
            met = max(storage["ratio_to_json"], storage["ratio_to_table"]) <= STORAGE_GOAL
            lines.append(
                f"storage_efficiency[{backend}]: {storage['wfstate_bytes']:,} B vs full-state "
                f"JSON {storage['full_state_json_bytes']:,} B = {storage['ratio_to_json']:.3f}, "
                f"vs full-state table {storage['full_state_table_bytes']:,} B = "
                f"{storage['ratio_to_table']:.3f} (goal <= {STORAGE_GOAL}): "
                f"{_verdict(met)}"
            )
    return lines


SUMMARY_SECTIONS.append(("wfstate durable benchmarks: the goals (same run)", goal_lines))
