"""How fast 16 Python threads can finish blocking sync calls at all (not part of ``make bench``).

``python -m benches.thread_ceiling [write_us ...]`` runs the group-commit goal's
shape with no store and no wfstate: 16 threads each call ``commit()`` in a loop.
A caller that finds nobody writing leads. It takes every caller queued so far,
"writes" them with one GIL-free wait of ``write_us`` microseconds (``time.sleep``,
a store costing no CPU), and wakes them. Each caller blocks on a lock of its own,
the cheapest wait Python has. The default ``write_us`` are 100 and 150: the time a
SQLite group commit of about ten updates takes here.

It also times the group-commit goal's baseline: one raw SQLite client doing
autocommit INSERTs, as ``benches/test_bench_durable.py`` builds it.

The updates/s it prints bound what any group commit of Python threads can reach
on this machine, whatever the store. BENCHMARKS.md quotes the figures.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from .test_bench_durable import sqlite_connect, sqlite_create_rows_table, sqlite_insert_step

THREADS = 16
PER_THREAD = 2_000
ROUNDS = 5


class _Ceiling:
    """Leader/follower group commit whose write is one GIL-free sleep."""

    def __init__(self, write_s: float) -> None:
        self._write_s = write_s
        self._lock = threading.Lock()
        self._queue: list[threading.Lock] = []
        self._busy = False

    def commit(self) -> None:
        with self._lock:
            if self._busy:
                wake = threading.Lock()
                wake.acquire()
                self._queue.append(wake)
            else:
                self._busy = True
                wake = None
        if wake is not None:
            wake.acquire()  # released once "written"
            return
        while True:  # lead until nobody is queued
            with self._lock:
                batch, self._queue = self._queue, []
            time.sleep(self._write_s)
            for waiter in batch:
                waiter.release()
            with self._lock:
                if not self._queue:
                    self._busy = False
                    return


def ceiling(write_us: float) -> tuple[float, float]:
    """(updates/s, CPU µs per update) of one round."""
    group = _Ceiling(write_us / 1e6)

    def work() -> None:
        for _ in range(PER_THREAD):
            group.commit()

    threads = [threading.Thread(target=work) for _ in range(THREADS)]
    start, cpu = time.perf_counter(), time.process_time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    updates = THREADS * PER_THREAD
    return updates / wall, cpu / updates * 1e6


def raw_sqlite_rate(directory: Path) -> float:
    connection = sqlite_connect(directory / "raw.db")
    try:
        sqlite_create_rows_table(connection, "raw_deltas")
        step = sqlite_insert_step(connection, "client-0")
        rates = []
        for _ in range(ROUNDS):
            start = time.perf_counter()
            for _ in range(1_000):
                step()
            rates.append(1_000 / (time.perf_counter() - start))
        return statistics.median(rates)
    finally:
        connection.close()


def main(arguments: list[str]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        raw = raw_sqlite_rate(Path(directory))
    print(f"raw SQLite autocommit INSERT, 1 client: {raw:,.0f}/s (3x: {3 * raw:,.0f}/s)")
    for write_us in [float(a) for a in arguments] or [100.0, 150.0]:
        results = sorted(ceiling(write_us) for _ in range(ROUNDS))
        rate, cpu = results[len(results) // 2]
        print(
            f"{THREADS} threads, GIL-free write of {write_us:g} us: {rate:,.0f}/s "
            f"({rate / raw:.2f}x the raw client), {cpu:.1f} us CPU per update"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
