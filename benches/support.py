"""What the benchmarks share besides the workload: the stores, typing and reporting.

``AnyStore`` is any of the three implementations every group runs, and
``create_running`` puts one execution of the workload into any of them.
Suites whose groups are not wfstate against these two baselines (the durable ones)
add a section of their own to the end-of-run summary through ``SUMMARY_SECTIONS``.

pytest-benchmark's ``benchmark`` fixture carries no annotations, so ``Benchmark`` types
the few parts of it the suites use. ``Reporter`` stores a benchmark's own figures
(percentiles, throughput, memory) in its ``extra_info`` and keeps them, with the
timings, for the per-group ratio summary that conftest prints at the end of the run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias

from reference_model import ReferenceStateManager
from wfstate import StateManager

from .workload import NODE_ID, WORKFLOW_ID, DictLockStore, initial_variables

__all__ = [
    "RESULTS",
    "SUMMARY_SECTIONS",
    "AnyStore",
    "Benchmark",
    "Reporter",
    "Result",
    "create_running",
    "percentiles",
]

#: wfstate or one of its two baselines.
AnyStore: TypeAlias = StateManager | ReferenceStateManager | DictLockStore


def create_running(store: AnyStore, execution_id: str) -> None:
    """Create ``execution_id`` with its 20 variables and its node running (attempt 1)."""
    if isinstance(store, DictLockStore):
        store.create_execution(execution_id, initial_variables())
        store.update_state(execution_id, "running", "var_00", 0)
    else:
        store.create_execution(execution_id, workflow_id=WORKFLOW_ID, variables=initial_variables())
        store.update_state(execution_id, {"nodes": {NODE_ID: "running"}})


class _Stats(Protocol):
    data: list[float]
    median: float
    mean: float


class _Metadata(Protocol):
    stats: _Stats


class Benchmark(Protocol):
    """The parts of pytest-benchmark's ``benchmark`` fixture used here."""

    extra_info: dict[str, Any]
    stats: _Metadata | None

    def __call__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any: ...

    def pedantic(
        self,
        target: Callable[..., Any],
        args: tuple[Any, ...] = ...,
        kwargs: dict[str, Any] | None = ...,
        setup: Callable[[], Any] | None = ...,
        teardown: Callable[..., Any] | None = ...,
        rounds: int = ...,
        warmup_rounds: int = ...,
        iterations: int = ...,
    ) -> Any: ...


@dataclass
class Result:
    """One benchmark's timings (seconds per round) and its own figures."""

    group: str
    implementation: str
    median: float
    mean: float
    figures: dict[str, Any] = field(default_factory=dict)


#: Every result of this run, in the order the benchmarks ran.
RESULTS: list[Result] = []

#: Extra sections of the end-of-run summary: (title, a function of every result of
#: the run that returns the section's lines, or none when it has nothing to say).
SUMMARY_SECTIONS: list[tuple[str, Callable[[Sequence[Result]], list[str]]]] = []


class Reporter:
    """Puts a benchmark's figures in ``extra_info`` and keeps them for the summary."""

    def __init__(self, benchmark: Benchmark) -> None:
        self._benchmark = benchmark

    @property
    def timings(self) -> list[float]:
        """Every round's duration in seconds (empty when benchmarks are disabled)."""
        metadata = self._benchmark.stats
        return [] if metadata is None else list(metadata.stats.data)

    def record(self, group: str, implementation: str, **figures: Any) -> None:
        self._benchmark.extra_info.update(figures)
        metadata = self._benchmark.stats
        if metadata is None:  # benchmarks disabled: the function ran once, untimed
            return
        RESULTS.append(
            Result(
                group=group,
                implementation=implementation,
                median=metadata.stats.median,
                mean=metadata.stats.mean,
                figures=figures,
            )
        )


def percentiles(durations: list[float], *points: float) -> dict[str, float]:
    """Nearest-rank percentiles of per-call durations (seconds), in microseconds."""
    ordered = sorted(durations)
    result: dict[str, float] = {}
    if not ordered:
        return result
    for point in points:
        rank = min(len(ordered) - 1, max(0, -(-point * len(ordered) // 100) - 1))
        label = f"p{point:g}".replace(".", "_")
        result[f"{label}_us"] = ordered[int(rank)] * 1e6
    return result
