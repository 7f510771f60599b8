"""The core benchmarks: update, read, history, memory, and updates from four threads.

Every group runs wfstate and its two baselines, the pure-Python reference model
(``tests/reference_model.py``) and a dict behind a ``threading.Lock``
(``workload.DictLockStore``), so each figure is read as a ratio from one run. The
issue's goals: ``update_state`` at least 3x faster than the reference model with a p99
under 10 us; ``get_state`` of an unchanged version within 2x of the dict+Lock read;
memory per execution reported. ``make bench`` runs this file; BENCHMARKS.md records it.

Nothing here asserts a duration: speed is a benchmark figure, never a test verdict.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from wfstate import HistoryOptions

from .support import AnyStore, Benchmark, Reporter, create_running, percentiles
from .workload import (
    HISTORY_LIMIT,
    DictLockStore,
    baseline_updates,
    updates,
)

#: Timed update calls, one per round (a round's time is one call: no averaging, so
#: the percentiles are those of single calls).
UPDATE_ROUNDS = 100_000
#: Untimed updates before them: enough for wfstate's event ring (100,000 events by
#: default, two per update) to be full, so that every timed update also evicts.
UPDATE_WARMUP = 50_000
#: Updates applied to the execution that get_history reads: 2 events each, so it
#: holds 2 + 2 * 150 = 302 events and the query returns the first 100 of them.
HISTORY_UPDATES = 150
#: Executions created by the memory probe, each with 20 variables.
MEMORY_EXECUTIONS = 100_000
#: The threads group: threads (besides one), updates per round (shared among the
#: threads), timed rounds.
THREADS = 4
UPDATES_PER_ROUND = 40_000
THREAD_ROUNDS = 5

#: The repository, from where ``python -m benches.memory_probe`` runs.
ROOT = Path(__file__).resolve().parent.parent


def update_step(store: AnyStore, execution_id: str) -> Callable[[], object]:
    """One legal update of ``execution_id`` per call: the node flips, one variable is set."""
    if isinstance(store, DictLockStore):
        baseline_stream = baseline_updates()
        update_baseline = store.update_state

        def step_baseline() -> object:
            return update_baseline(execution_id, *next(baseline_stream))

        return step_baseline
    stream = updates()
    update = store.update_state

    def step() -> object:
        return update(execution_id, next(stream))

    return step


@pytest.mark.benchmark(group="update_state")
def test_update_state(
    benchmark: Benchmark,
    reporter: Reporter,
    implementation: str,
    store: AnyStore,
    running_execution: str,
) -> None:
    step = update_step(store, running_execution)
    for _ in range(UPDATE_WARMUP):
        step()
    benchmark.pedantic(step, rounds=UPDATE_ROUNDS, iterations=1)
    figures = percentiles(reporter.timings, 50, 90, 99, 99.9)
    reporter.record("update_state", implementation, **figures)
    print(f"update_state[{implementation}]", figures)


@pytest.mark.benchmark(group="get_state")
def test_get_state(
    benchmark: Benchmark,
    reporter: Reporter,
    implementation: str,
    store: AnyStore,
    running_execution: str,
) -> None:
    # The version read is the same at every call: no update runs during the benchmark.
    step = update_step(store, running_execution)
    for _ in range(10):
        step()
    benchmark(store.get_state, running_execution)
    reporter.record("get_state", implementation)


@pytest.mark.benchmark(group="get_history")
def test_get_history(
    benchmark: Benchmark,
    reporter: Reporter,
    implementation: str,
    store: AnyStore,
    running_execution: str,
) -> None:
    step = update_step(store, running_execution)
    for _ in range(HISTORY_UPDATES):
        step()
    if isinstance(store, DictLockStore):
        events = benchmark(store.get_history, running_execution)
    else:
        options = HistoryOptions(limit=HISTORY_LIMIT)
        events = benchmark(store.get_history, running_execution, options).events
    assert len(events) == HISTORY_LIMIT
    reporter.record("get_history", implementation)


@pytest.mark.benchmark(group="memory")
def test_memory_per_execution(
    benchmark: Benchmark, reporter: Reporter, implementation: str
) -> None:
    """RSS growth per execution, in a fresh interpreter (see memory_probe.py).

    The time pytest-benchmark shows for this group is the whole probe process
    (interpreter start-up included); the figures are in ``extra_info``.
    """

    def probe() -> dict[str, float]:
        completed = subprocess.run(
            [sys.executable, "-m", "benches.memory_probe", implementation, str(MEMORY_EXECUTIONS)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        )
        figures: dict[str, float] = json.loads(completed.stdout)
        return figures

    figures = benchmark.pedantic(probe, rounds=1, iterations=1)
    reporter.record("memory", implementation, **figures)
    print(f"memory[{implementation}]", figures)


@pytest.mark.parametrize("threads", [1, THREADS], ids=lambda count: f"{count}t")
@pytest.mark.benchmark(group="update_state_threads")
def test_update_state_threads(
    benchmark: Benchmark, reporter: Reporter, implementation: str, store: AnyStore, threads: int
) -> None:
    """Threads each updating their own execution; a round is 40,000 updates in all.

    The one-thread row of each implementation is its own baseline: what the threads
    gain (or lose) over one thread doing the same updates, in the same run.
    """
    steps = []
    for thread in range(threads):
        execution_id = f"bench-thread-{thread}"
        create_running(store, execution_id)
        steps.append(update_step(store, execution_id))
    updates_per_thread = UPDATES_PER_ROUND // threads

    def work(step: Callable[[], object], barrier: threading.Barrier) -> None:
        barrier.wait(timeout=60)
        for _ in range(updates_per_thread):
            step()

    def one_round() -> None:
        barrier = threading.Barrier(threads)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            futures = [pool.submit(work, step, barrier) for step in steps]
            for future in futures:
                future.result(timeout=600)

    benchmark.pedantic(one_round, rounds=THREAD_ROUNDS, warmup_rounds=1, iterations=1)
    timings = sorted(reporter.timings)
    figures: dict[str, float] = {}
    if timings:
        figures["updates_per_s"] = UPDATES_PER_ROUND / timings[len(timings) // 2]
        figures["best_updates_per_s"] = UPDATES_PER_ROUND / timings[0]
    label = f"update_state_threads, {threads} thread{'s' if threads > 1 else ''}"
    reporter.record(label, implementation, **figures)
    print(f"{label} [{implementation}]", figures)
