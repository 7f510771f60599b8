"""One process of the multi-process benchmark (``test_bench_multiprocess.py``).

Started once per benchmark, it connects, then obeys lines on stdin: ``run N`` does N
operations and answers one JSON line with its counters; ``quit`` ends it. The parent
times the rounds, so process start-up and connecting are never in a figure.

Modes (``--mode``):

- ``transact``: ``StateManager.transact`` (sync, PostgreSQL) incrementing this
  process's counter in a random execution of ``--executions`` (shared by every
  process for the hot set; ``--prefix`` names this process's own for the baseline);
- ``raw``: the raw driver's least work for the same committed, history-keeping
  increment: one autocommit statement that increments a counter row and inserts a
  history row (a prepared psycopg statement, one round trip).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from typing import Any

import psycopg

from wfstate import ConflictError, StateManager, WorkflowState


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--mode", choices=["transact", "raw"], required=True)
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--executions", type=int, required=True)
    arguments = parser.parse_args()
    ids = [f"{arguments.prefix}-{n:03d}" for n in range(arguments.executions)]
    rng = random.Random(arguments.worker)
    counter = f"w{arguments.worker}"
    if arguments.mode == "transact":
        manager = StateManager.open(arguments.url)

        def bump(state: WorkflowState) -> dict[str, Any]:
            return {"variables": {counter: state.variables.get(counter, 0) + 1}}

        given_up = 0

        def operation() -> None:
            nonlocal given_up
            try:
                manager.transact(rng.choice(ids), bump, retries=100)
            except ConflictError:
                given_up += 1

        def counters() -> dict[str, int]:
            stats = manager.stats()
            return {
                "conflicts": stats["conflicts"],
                "conflicts_resolved": stats["conflicts_resolved"],
                "transact_retries": stats["transact_retries"],
                "merges": stats["merges"],
                "given_up": given_up,
            }
    else:
        connection = psycopg.connect(arguments.url, autocommit=True)
        statement = (
            "WITH bumped AS (UPDATE raw_counters SET value = value + 1 WHERE id = %s"
            " RETURNING id, value) INSERT INTO raw_history (id, value, recorded_at)"
            " SELECT id, value, clock_timestamp() FROM bumped"
        )

        def operation() -> None:
            connection.execute(statement, (rng.choice(ids),), prepare=True)

        def counters() -> dict[str, int]:
            return {}

    print("ready", flush=True)
    for line in sys.stdin:
        command = line.split()
        if command[0] == "quit":
            break
        for _ in range(int(command[1])):
            operation()
        print(json.dumps(counters()), flush=True)


if __name__ == "__main__":
    main()
