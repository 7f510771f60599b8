"""Many processes on one PostgreSQL: ``transact`` under contention (issue "many processes").

Group ``multiprocess_transact_pg``, one run: 8 processes each do ``transact``
increments (sync mode) of their own counter variable in random executions, and
pytest-benchmark times each round (every process doing ``OPS_PER_ROUND``):

- ``hot_set``: all 8 processes on the same 100 executions, so they conflict: the
  figures are committed updates per second, conflicts per 1,000 updates, the share of
  conflicts resolved by a retry or a merge (goal: at least 99.9%) and retries per
  committed update. Goal: at least 2,000 committed updates per second.
- ``own_executions``: the baseline without contention: each process on 100
  executions of its own.
- ``raw_hot_set``: the raw driver's least work for the same result on the hot set:
  one prepared autocommit statement per increment that updates a counter row and
  inserts a history row, from 8 processes.

Processes start (and connect) before the first round; nothing here asserts a speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Final

import psycopg
import pytest

from wfstate import StateManager

from .support import Benchmark, Reporter

PROCESSES: Final = 8
EXECUTIONS: Final = 100
OPS_PER_ROUND: Final = 250
ROUNDS: Final = 5
RATE_GOAL: Final = 2_000
RESOLVED_GOAL: Final = 0.999
WORKER: Final = Path(__file__).resolve().parent / "mp_worker.py"


class Pool:
    """The benchmark's processes, driven by lines on their stdin."""

    def __init__(self, url: str, mode: str, prefixes: list[str]) -> None:
        self.processes = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(WORKER),
                    f"--url={url}",
                    f"--mode={mode}",
                    f"--worker={number}",
                    f"--prefix={prefix}",
                    f"--executions={EXECUTIONS}",
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for number, prefix in enumerate(prefixes)
        ]
        for process in self.processes:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == "ready"
        self.counters: list[dict[str, int]] = [{} for _ in self.processes]

    def round(self) -> None:
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.write(f"run {OPS_PER_ROUND}\n")
            process.stdin.flush()
        for position, process in enumerate(self.processes):
            assert process.stdout is not None
            self.counters[position] = json.loads(process.stdout.readline())

    def total(self, name: str) -> int:
        return sum(counters.get(name, 0) for counters in self.counters)

    def close(self) -> None:
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.write("quit\n")
            process.stdin.close()
        for process in self.processes:
            process.wait(timeout=30)
            assert process.stdout is not None
            process.stdout.close()


def create(url: str, prefixes: set[str]) -> None:
    with StateManager.open(url) as manager:
        for prefix in sorted(prefixes):
            for number in range(EXECUTIONS):
                manager.create_execution(f"{prefix}-{number:03d}", workflow_id="bench")


@pytest.mark.parametrize("contender", ["hot_set", "own_executions", "raw_hot_set"])
@pytest.mark.benchmark(group="multiprocess_transact_pg")
def test_multiprocess_transact_pg(
    benchmark: Benchmark, reporter: Reporter, contender: str, pg_url: str
) -> None:
    if contender == "own_executions":
        prefixes = [f"own{number}" for number in range(PROCESSES)]
    else:
        prefixes = ["hot"] * PROCESSES
    if contender == "raw_hot_set":
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("CREATE TABLE raw_counters (id text PRIMARY KEY, value bigint NOT NULL)")
            conn.execute(
                "CREATE TABLE raw_history (id text NOT NULL, value bigint NOT NULL,"
                " recorded_at timestamptz NOT NULL, PRIMARY KEY (id, value))"
            )
            conn.execute(
                "INSERT INTO raw_counters SELECT 'hot-' || lpad(n::text, 3, '0'), 0"
                " FROM generate_series(0, %s) AS n",
                (EXECUTIONS - 1,),
            )
        mode = "raw"
    else:
        create(pg_url, set(prefixes))
        mode = "transact"
    pool = Pool(pg_url, mode, prefixes)
    try:
        pool.round()  # warm-up: prepared statements, every execution in memory
        before = {
            name: pool.total(name)
            for name in (
                "conflicts",
                "conflicts_resolved",
                "transact_retries",
                "merges",
                "given_up",
            )
        }
        benchmark.pedantic(pool.round, rounds=ROUNDS, warmup_rounds=0, iterations=1)
        after = {name: pool.total(name) for name in before}
    finally:
        pool.close()
    per_round = PROCESSES * OPS_PER_ROUND
    figures: dict[str, Any] = {"per_round": per_round}
    timings = reporter.timings
    if timings:
        figures["per_s"] = per_round / sorted(timings)[len(timings) // 2]
    if mode == "transact":
        updates = per_round * ROUNDS
        conflicts = after["conflicts"] - before["conflicts"]
        resolved = after["conflicts_resolved"] - before["conflicts_resolved"]
        figures.update(
            conflicts_per_1000=1000 * conflicts / updates,
            resolved_share=resolved / conflicts if conflicts else 1.0,
            retries_per_success=(after["transact_retries"] - before["transact_retries"]) / updates,
            given_up=after["given_up"] - before["given_up"],
        )
        if contender == "hot_set" and "per_s" in figures:
            figures["goal_met"] = (
                figures["per_s"] >= RATE_GOAL and figures["resolved_share"] >= RESOLVED_GOAL
            )
    reporter.record("multiprocess_transact_pg", contender, **figures)
    print(f"multiprocess_transact_pg[{contender}]", figures)
