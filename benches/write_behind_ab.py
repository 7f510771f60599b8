"""The PostgreSQL write-behind, native against psycopg (not part of ``make bench``).

``python -m benches.write_behind_ab [pairs]`` runs the async benchmark's round
(``benches/test_bench_durable.py``: 100,000 updates from 4 threads, then
``flush()``), 4 rounds per child process, with ``$WFSTATE_PG_NATIVE_WRITER`` at 1
(``_core.PgWriter``) and at 0 (psycopg), in alternating processes (default 4 pairs),
so that the machine's drift hits both alike.

It also measures the loss window under load: a third process reads the store's
versions every 2 ms and notes when they change. The largest gap between two
changes during the apply (or between its start or end and the nearest change) is
how far apart stored batches were, as another process sees them: what a crash
would lose at most, apart from the batch in flight. ``time.perf_counter`` is one
clock for every process here (``CLOCK_MONOTONIC``).

The rounds run in a database of their own, ``wfstate_write_behind_ab``, dropped at
the end. BENCHMARKS.md quotes the figures.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from wfstate import StateManager

from .test_bench_durable import ASYNC_THREADS, ASYNC_UPDATES, repeat, run_threads, wfstate_step

ROUNDS = 4
DATABASE = "wfstate_write_behind_ab"
SERVER = os.environ.get("WFSTATE_TEST_POSTGRES_URL", "postgresql://root@127.0.0.1:5432/test")


def _rounds(url: str, tag: str) -> None:
    """In a child: the rounds, printed as JSON (their start, end of apply, end)."""
    per_thread = ASYNC_UPDATES // ASYNC_THREADS
    out = []
    with StateManager.open(url, durability="async") as manager:
        for number in range(ROUNDS):
            prefix = f"{tag}-{number}-"
            workers = [
                repeat(wfstate_step(manager, f"{prefix}{k}", k), per_thread)
                for k in range(ASYNC_THREADS)
            ]
            manager.flush()
            time.sleep(0.1)
            start = time.perf_counter()
            run_threads(workers)
            applied = time.perf_counter()
            manager.flush(timeout=600)
            out.append({"start": start, "applied": applied, "end": time.perf_counter()})
    print(json.dumps(out))


def _poll(url: str, prefix: str, path: str) -> None:
    """In a child: each change of the summed versions of ``prefix``'s executions,
    as ``time version`` lines, until every round is stored (or killed)."""
    last = None
    done = ROUNDS * (ASYNC_UPDATES + ASYNC_THREADS)
    with psycopg.connect(url, autocommit=True) as conn, open(path, "w") as out:
        while True:
            row = conn.execute(
                "SELECT coalesce(sum(version), 0) FROM wfstate_executions"
                " WHERE execution_id LIKE %s",
                (prefix + "%",),
            ).fetchone()
            seen = time.perf_counter()
            total = int(row[0]) if row else 0
            if total != last:
                out.write(f"{seen} {total}\n")
                out.flush()
                last = total
            if total >= done:
                return
            time.sleep(0.002)


def _one(url: str, native: str, tag: str, directory: str) -> list[dict[str, float]]:
    """The rounds of one child with the native writer on ("1") or off ("0")."""
    path = str(Path(directory) / f"{tag}.txt")
    here = [sys.executable, "-m", "benches.write_behind_ab"]
    poller = subprocess.Popen([*here, "--poll", url, tag, path])
    try:
        child = subprocess.run(
            [*here, "--rounds", url, tag],
            env={**os.environ, "WFSTATE_PG_NATIVE_WRITER": native},
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        poller.kill()
        poller.wait()
    changes = [float(line.split()[0]) for line in Path(path).read_text().splitlines()]
    rounds = []
    for timed in json.loads(child.stdout):
        inside = [t for t in changes if timed["start"] <= t <= timed["applied"]]
        points = [timed["start"], *inside, timed["applied"]]
        rounds.append(
            {
                "round": timed["end"] - timed["start"],
                "apply": timed["applied"] - timed["start"],
                "gap": max(b - a for a, b in itertools.pairwise(points)),
            }
        )
    return rounds


def main(argv: list[str]) -> None:
    if argv[:1] == ["--rounds"]:
        _rounds(argv[1], argv[2])
        return
    if argv[:1] == ["--poll"]:
        _poll(argv[1], argv[2], argv[3])
        return
    pairs = int(argv[0]) if argv else 4
    base = SERVER.rsplit("/", 1)[0]
    with psycopg.connect(SERVER, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {DATABASE}")
        admin.execute(f"CREATE DATABASE {DATABASE}")
    url = f"{base}/{DATABASE}"
    StateManager.open(url).close()  # the tables, before the first poller reads them
    results: dict[str, list[list[dict[str, float]]]] = {"1": [], "0": []}
    names = {"1": "native ", "0": "psycopg"}
    try:
        with tempfile.TemporaryDirectory() as directory:
            for pair in range(pairs):
                for native in ("1", "0") if pair % 2 == 0 else ("0", "1"):
                    rounds = _one(url, native, f"p{pair}n{native}", directory)
                    results[native].append(rounds)
                    median = statistics.median(r["round"] for r in rounds)
                    gaps = [round(r["gap"] * 1e3) for r in rounds]
                    print(
                        f"pair {pair} {names[native]}: {ASYNC_UPDATES / median:9,.0f} updates/s"
                        f" (median round {median * 1e3:.0f} ms, apply"
                        f" {statistics.median(r['apply'] for r in rounds) * 1e3:.0f} ms);"
                        f" largest gap between stored batches during the apply: {gaps} ms",
                        flush=True,
                    )
    finally:
        with psycopg.connect(SERVER, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {DATABASE}")
    for native in ("1", "0"):
        medians = [statistics.median(r["round"] for r in rounds) for rounds in results[native]]
        gaps = sorted(round(r["gap"] * 1e3) for rounds in results[native] for r in rounds)
        rates = [f"{ASYNC_UPDATES / m:,.0f}" for m in medians]
        print(
            f"{names[native]}: {ASYNC_UPDATES / statistics.median(medians):,.0f} updates/s"
            f" (per process {', '.join(rates)}); gaps {gaps[0]}-{gaps[-1]} ms,"
            f" median {statistics.median(gaps):.0f} ms"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
