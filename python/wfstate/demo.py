"""A workflow simulator that drives wfstate the way an engine does, then reports on it.

``python -m wfstate.demo`` (``make demo``) runs N executions of a six-node order
workflow through one :class:`wfstate.StateManager` on a few worker threads::

    fetch -> validate -> enrich? -> charge -> notify? -> archive

Nodes start, fail and are retried (a failed node that runs again is a new attempt; after
``--max-attempts`` the execution fails, with the exception recorded as its error), the
optional branches ``enrich`` and ``notify`` are sometimes skipped, node outputs are
written to the variables and simulated durations are reported through ``metrics``.
Some executions are suspended for a manual approval and resumed, some are cancelled.
Meanwhile heartbeat threads increment a counter in the context of every execution in
flight, as other processes touching the same executions would; read-modify-write goes
through ``transact`` and meets real version conflicts.

Every figure of the summary is read back from the store (``list_executions``,
``get_history``, ``get_state``); the simulator's own bookkeeping serves only to
cross-check the store (the "Checks" section, and the exit status).

Time inside the workflow is simulated: nothing sleeps, durations are drawn from
per-node distributions. The demo uses only the public API of wfstate, so it must run
unchanged against any store; :func:`open_manager` is the one place that picks it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Final, Literal, TextIO

from wfstate import (
    UNSET,
    ConflictError,
    EventType,
    ExecutionStatus,
    HistoryEvictedError,
    HistoryOptions,
    JSONValue,
    NodeStatus,
    StateEvent,
    StateManager,
    StateUpdate,
    WorkflowState,
)

__all__ = [
    "WORKFLOW",
    "WORKFLOW_ID",
    "DemoConfig",
    "NodeSpec",
    "RunReport",
    "format_report",
    "main",
    "open_manager",
    "parse_args",
    "percentile",
    "run_demo",
]

WORKFLOW_ID: Final = "order-pipeline"
#: Statuses after which an execution takes no update (bar failed -> running).
FINAL_STATUSES: Final = frozenset(
    {ExecutionStatus.COMPLETED, ExecutionStatus.FAILED, ExecutionStatus.CANCELLED}
)
#: The node before which an execution that needs a manual approval is suspended.
APPROVAL_NODE: Final = "charge"


# -- the failures simulated nodes raise -----------------------------------------------
# Real exceptions, raised and caught, so that wfstate records their tracebacks.


class SimulatedNodeError(Exception):
    """The root of the failures the simulated nodes raise (besides builtin OSErrors)."""


class SchemaError(SimulatedNodeError):
    """The order does not match the schema the validator expects."""


class RateLimitedError(SimulatedNodeError):
    """A downstream API refused the call for now (HTTP 429)."""


class PaymentGatewayError(SimulatedNodeError):
    """The payment gateway failed to answer properly."""


class NotificationError(SimulatedNodeError):
    """The mail relay refused the message."""


class StorageUnavailableError(SimulatedNodeError):
    """The object store is overloaded."""


#: What ``except`` catches around a node body: every fault the simulator injects.
NODE_FAULTS: Final[tuple[type[Exception], ...]] = (SimulatedNodeError, OSError)

_FAULT_MESSAGES: Final[Mapping[type[Exception], str]] = {
    TimeoutError: "{service} did not answer within 5 s",
    ConnectionResetError: "connection reset by {service}",
    SchemaError: "field 'shipping.postcode' is missing",
    RateLimitedError: "{service} answered 429 Too Many Requests",
    PaymentGatewayError: "{service} answered 502 Bad Gateway",
    NotificationError: "{service} refused the connection",
    StorageUnavailableError: "{service} answered 503 Slow Down",
}


# -- the workflow -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Order:
    """The input of one execution; also its initial variables."""

    order_id: str
    amount_cents: int
    items: int
    customer_tier: str | None
    notify_opt_out: bool
    needs_approval: bool

    def variables(self) -> dict[str, JSONValue]:
        """The order as workflow variables."""
        return {
            "order_id": self.order_id,
            "amount_cents": self.amount_cents,
            "items": self.items,
            "customer_tier": self.customer_tier,
            "notify_opt_out": self.notify_opt_out,
            "needs_approval": self.needs_approval,
        }


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One node of the simulated workflow.

    Durations are log-normal: ``median_seconds`` and the ``spread`` (sigma of the log).
    ``faults`` are the exceptions an attempt may raise, calling ``service``;
    ``skip_when`` decides from the order whether the node's branch is skipped.
    """

    node_id: str
    _: KW_ONLY
    service: str
    median_seconds: float
    spread: float
    peak_memory_mib: float
    faults: tuple[type[Exception], ...]
    body: Callable[[Order], dict[str, JSONValue]]
    skip_when: Callable[[Order], bool] | None = None


def _fetch(order: Order) -> dict[str, JSONValue]:
    return {"items": order.items, "warehouse": "eu-west-1"}


def _validate(order: Order) -> dict[str, JSONValue]:
    return {"valid": True, "checks": 7}


def _enrich(order: Order) -> dict[str, JSONValue]:
    discount_pct = {"gold": 10, "silver": 5}.get(order.customer_tier or "", 0)
    return {"customer_tier": order.customer_tier, "discount_pct": discount_pct}


def _charge(order: Order) -> dict[str, JSONValue]:
    return {"charge_id": f"ch_{order.order_id}", "amount_cents": order.amount_cents}


def _notify(order: Order) -> dict[str, JSONValue]:
    return {"channel": "email", "template": "order-confirmed"}


def _archive(order: Order) -> dict[str, JSONValue]:
    return {"archive_key": f"orders/{order.order_id}.json"}


WORKFLOW: Final[tuple[NodeSpec, ...]] = (
    NodeSpec(
        "fetch",
        service="the order service",
        median_seconds=0.080,
        spread=0.5,
        peak_memory_mib=40,
        faults=(TimeoutError, ConnectionResetError),
        body=_fetch,
    ),
    NodeSpec(
        "validate",
        service="the validator",
        median_seconds=0.012,
        spread=0.3,
        peak_memory_mib=15,
        faults=(SchemaError,),
        body=_validate,
    ),
    NodeSpec(
        "enrich",
        service="the CRM API",
        median_seconds=0.250,
        spread=0.6,
        peak_memory_mib=60,
        faults=(RateLimitedError, TimeoutError),
        body=_enrich,
        skip_when=lambda order: order.customer_tier is None,  # no profile to enrich from
    ),
    NodeSpec(
        "charge",
        service="the payment gateway",
        median_seconds=0.600,
        spread=0.4,
        peak_memory_mib=30,
        faults=(PaymentGatewayError, TimeoutError),
        body=_charge,
    ),
    NodeSpec(
        "notify",
        service="the mail relay",
        median_seconds=0.090,
        spread=0.5,
        peak_memory_mib=20,
        faults=(NotificationError, RateLimitedError),
        body=_notify,
        skip_when=lambda order: order.notify_opt_out,
    ),
    NodeSpec(
        "archive",
        service="the object store",
        median_seconds=0.150,
        spread=0.3,
        peak_memory_mib=80,
        faults=(StorageUnavailableError,),
        body=_archive,
    ),
)


def _call_node(spec: NodeSpec, order: Order, fault: type[Exception] | None) -> dict[str, JSONValue]:
    """Run a node body, or raise the fault the simulator drew for this attempt."""
    if fault is not None:
        message = _FAULT_MESSAGES[fault].format(service=spec.service)
        raise fault(f"{message} (order {order.order_id})")
    return spec.body(order)


# -- configuration ------------------------------------------------------------------

ProgressMode = Literal["auto", "bar", "lines", "off"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoConfig:
    """Everything a run depends on; ``parse_args`` builds it from the command line."""

    executions: int = 1000
    seed: int = 1
    threads: int = 4
    failure_rate: float = 0.08
    retry_failure_rate: float = 0.4
    max_attempts: int = 3
    skip_rate: float = 0.25
    suspend_rate: float = 0.05
    cancel_rate: float = 0.03
    heartbeat_threads: int = 2
    heartbeat_interval: float = 0.002
    store: str = "memory://"
    progress: ProgressMode = "auto"
    timeline: bool = True


def open_manager(store: str, *, executions: int) -> StateManager:
    """The StateManager the demo runs against, picked by ``--store``.

    Only ``memory://`` exists today. When persistence lands this becomes
    ``return StateManager.open(store)`` (``sqlite:///demo.db``) for any other URL, and
    nothing else in the demo changes. The demo reads back what it wrote, so it wants an
    empty store: ``run_demo`` refuses one that holds executions already.
    """
    if store != "memory://":
        raise SystemExit(
            f"--store {store!r}: only memory:// exists until persistence (SQLite) lands"
        )
    # The summary reads every execution's history back from the event ring: make it
    # big enough for the run (about 40 events an execution, heartbeats included).
    return StateManager(ring_capacity=max(100_000, executions * 64))


# -- progress -----------------------------------------------------------------------


class Progress:
    """Executions finished so far, on ``stream``: a bar redrawn in place on a terminal,
    a line every couple of seconds otherwise (logs, CI). Thread-safe."""

    BAR_WIDTH: Final = 30

    def __init__(self, total: int, stream: TextIO, mode: ProgressMode) -> None:
        if mode == "auto":
            mode = "bar" if stream.isatty() else "lines"
        self._total = total
        self._stream = stream
        self._mode = mode
        self._interval = 0.1 if mode == "bar" else 2.0
        self._lock = threading.Lock()
        self._done = 0
        self._started = time.perf_counter()
        self._next_draw = self._started + self._interval
        self._drawn_width = 0

    def advance(self) -> None:
        """Count one finished execution; redraw if it is time to."""
        with self._lock:
            self._done += 1
            now = time.perf_counter()
            if self._mode != "off" and now >= self._next_draw and self._done < self._total:
                self._draw(now)
                self._next_draw = now + self._interval

    def close(self) -> None:
        """Draw the final state (and end the bar's line)."""
        with self._lock:
            if self._mode == "off":
                return
            self._draw(time.perf_counter())
            if self._mode == "bar":
                self._stream.write("\n")
                self._stream.flush()

    def _draw(self, now: float) -> None:
        elapsed = now - self._started
        fraction = self._done / self._total if self._total else 1.0
        rate = self._done / elapsed if elapsed > 0 else 0.0
        figures = (
            f"{self._done:>{len(f'{self._total:,}')},}/{self._total:,} {fraction:4.0%}"
            f"  {rate:,.0f} executions/s  {elapsed:.1f} s"
        )
        if self._mode == "lines":
            self._stream.write(f"wfstate demo: {figures}\n")
        else:
            filled = round(fraction * self.BAR_WIDTH)
            text = f"[{'#' * filled}{'-' * (self.BAR_WIDTH - filled)}] {figures}"
            self._stream.write("\r" + text.ljust(self._drawn_width))
            self._drawn_width = len(text)
        self._stream.flush()


# -- the simulation -----------------------------------------------------------------


class InFlight:
    """The ids of the executions the workers are running right now. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids: set[str] = set()

    def add(self, execution_id: str) -> None:
        """Register an execution that just started."""
        with self._lock:
            self._ids.add(execution_id)

    def discard(self, execution_id: str) -> None:
        """Forget an execution that ended."""
        with self._lock:
            self._ids.discard(execution_id)

    def snapshot(self) -> list[str]:
        """The ids in flight, sorted (so that heartbeats visit them in a fixed order)."""
        with self._lock:
            return sorted(self._ids)


@dataclass(slots=True)
class Outcome:
    """What a worker saw of one execution: kept only to cross-check the store."""

    execution_id: str
    status: ExecutionStatus
    updates: int
    transact_retries: int


class _Writer:
    """The writes of one worker to one execution, counted as the store acknowledges them."""

    __slots__ = ("execution_id", "retries", "sm", "updates")

    def __init__(self, sm: StateManager, execution_id: str) -> None:
        self.sm = sm
        self.execution_id = execution_id
        self.updates = 0
        self.retries = 0

    def apply(self, update: StateUpdate | Mapping[str, Any]) -> int:
        """``update_state`` without a version check: this worker owns the statuses."""
        version = self.sm.update_state(self.execution_id, update, actor="worker")
        self.updates += 1
        return version

    def transact(self, fn: Callable[[WorkflowState], StateUpdate | None]) -> int:
        """``transact``, counting the calls of ``fn`` beyond the first as conflict retries."""
        calls = 0
        wrote = False

        def counted(state: WorkflowState) -> StateUpdate | None:
            nonlocal calls, wrote
            calls += 1
            update = fn(state)
            wrote = update is not None
            return update

        version = self.sm.transact(self.execution_id, counted, actor="worker")
        self.retries += calls - 1
        self.updates += wrote
        return version


def _node_metrics(
    spec: NodeSpec, rng: random.Random, duration: float
) -> dict[str, dict[str, float]]:
    peak_memory = rng.lognormvariate(math.log(spec.peak_memory_mib * 2**20), 0.3)
    return {
        spec.node_id: {
            "duration": round(duration, 6),
            # The nodes wait on I/O: CPU time is a small share of the duration.
            "cpu_time": round(duration * rng.uniform(0.05, 0.4), 6),
            "peak_memory": float(round(peak_memory)),
        }
    }


def _complete_node(
    spec: NodeSpec, output: dict[str, JSONValue], metrics: dict[str, dict[str, float]]
) -> Callable[[WorkflowState], StateUpdate]:
    """The read-modify-write that completes a node: ``nodes_done`` is derived from the
    state it is applied to, so it must go through ``transact``."""

    def update(state: WorkflowState) -> StateUpdate:
        done = sum(
            node.status in (NodeStatus.COMPLETED, NodeStatus.SKIPPED)
            for node in state.nodes.values()
        )
        return StateUpdate(
            nodes={spec.node_id: NodeStatus.COMPLETED},
            variables={spec.node_id: output, "nodes_done": done + 1},
            metrics=metrics,
        )

    return update


def _cancel(state: WorkflowState) -> StateUpdate | None:
    """An operator's cancellation: a no-op when the execution ended already."""
    if state.status in FINAL_STATUSES:
        return None
    return StateUpdate(
        status=ExecutionStatus.CANCELLED, current_node=None, context={"cancelled_by": "operator"}
    )


def _new_order(rng: random.Random, index: int, config: DemoConfig) -> Order:
    has_profile = rng.random() >= config.skip_rate
    return Order(
        order_id=f"ord-{index:05d}",
        amount_cents=round(rng.lognormvariate(math.log(4_500), 0.8)),
        items=rng.randint(1, 6),
        customer_tier=rng.choice(("gold", "silver", "bronze")) if has_profile else None,
        notify_opt_out=rng.random() < config.skip_rate * 0.4,
        needs_approval=rng.random() < config.suspend_rate,
    )


def run_execution(sm: StateManager, index: int, config: DemoConfig, in_flight: InFlight) -> Outcome:
    """Drive one execution from creation to a final status.

    Its random choices come from its own generator, seeded by ``(seed, index)``, so an
    execution's course does not depend on the thread that runs it.
    """
    rng = random.Random(f"{config.seed}:{index}")
    order = _new_order(rng, index, config)
    cancel_before = rng.randrange(len(WORKFLOW)) if rng.random() < config.cancel_rate else None

    state = sm.create_execution(
        None,
        workflow_id=WORKFLOW_ID,
        variables=order.variables(),
        context={"submitted_by": "wfstate.demo", "seed": config.seed},
        actor="worker",
    )
    writer = _Writer(sm, state.execution_id)

    def outcome(status: ExecutionStatus) -> Outcome:
        return Outcome(state.execution_id, status, writer.updates, writer.retries)

    in_flight.add(state.execution_id)
    try:
        # The plan: every node pending, in one update.
        writer.apply({"nodes": {spec.node_id: "pending" for spec in WORKFLOW}})
        for position, spec in enumerate(WORKFLOW):
            if order.needs_approval and spec.node_id == APPROVAL_NODE:
                writer.apply(
                    StateUpdate(
                        status=ExecutionStatus.SUSPENDED,
                        context={"waiting_for": "manual approval"},
                    )
                )
                if cancel_before == position:  # rejected while waiting: suspended -> cancelled
                    writer.transact(_cancel)
                    return outcome(ExecutionStatus.CANCELLED)
                writer.apply(
                    StateUpdate(
                        status=ExecutionStatus.RUNNING,
                        context={"waiting_for": None, "approved_by": "ops"},
                    )
                )
            if cancel_before == position:
                writer.transact(_cancel)
                return outcome(ExecutionStatus.CANCELLED)
            if spec.skip_when is not None and spec.skip_when(order):
                writer.apply({"nodes": {spec.node_id: "skipped"}})  # a dict works too
                continue
            for attempt in range(1, config.max_attempts + 1):
                start = StateUpdate(nodes={spec.node_id: NodeStatus.RUNNING})
                if attempt == 1:
                    start = StateUpdate(
                        nodes={spec.node_id: NodeStatus.RUNNING}, current_node=spec.node_id
                    )
                writer.apply(start)
                duration = rng.lognormvariate(math.log(spec.median_seconds), spec.spread)
                failure_rate = config.failure_rate if attempt == 1 else config.retry_failure_rate
                fault = rng.choice(spec.faults) if rng.random() < failure_rate else None
                metrics = _node_metrics(spec, rng, duration)
                try:
                    output = _call_node(spec, order, fault)
                except NODE_FAULTS as exc:
                    gave_up = attempt == config.max_attempts
                    writer.apply(
                        StateUpdate(
                            status=ExecutionStatus.FAILED if gave_up else None,
                            current_node=None if gave_up else UNSET,
                            nodes={spec.node_id: NodeStatus.FAILED},
                            error=exc,
                            metrics=metrics,
                        )
                    )
                    if gave_up:
                        return outcome(ExecutionStatus.FAILED)
                    continue
                writer.transact(_complete_node(spec, output, metrics))
                break
        writer.apply(StateUpdate(status=ExecutionStatus.COMPLETED, current_node=None))
        return outcome(ExecutionStatus.COMPLETED)
    finally:
        in_flight.discard(state.execution_id)


@dataclass(slots=True)
class HeartbeatTally:
    """What one heartbeat thread did, as the store acknowledged it."""

    writes: int = 0
    conflicts_retried: int = 0
    gave_up: int = 0


def _heartbeat(sm: StateManager, execution_id: str, tally: HeartbeatTally) -> None:
    calls = 0
    wrote = False

    def beat(state: WorkflowState) -> StateUpdate | None:
        nonlocal calls, wrote
        calls += 1
        wrote = state.status not in FINAL_STATUSES
        if not wrote:
            return None
        return StateUpdate(context={"heartbeats": state.context.get("heartbeats", 0) + 1})

    try:
        sm.transact(execution_id, beat, actor="heartbeat")
    except ConflictError:
        tally.gave_up += 1
        wrote = False
    tally.conflicts_retried += calls - 1
    tally.writes += wrote


def _heartbeat_loop(
    sm: StateManager,
    in_flight: InFlight,
    stop: threading.Event,
    interval: float,
    tally: HeartbeatTally,
) -> None:
    """Every ``interval`` seconds, increment ``context["heartbeats"]`` of each execution
    in flight: a second writer on the same executions, like a lease renewer would be."""
    while not stop.wait(interval):
        for execution_id in in_flight.snapshot():
            _heartbeat(sm, execution_id, tally)


# -- reading the results back -------------------------------------------------------


@dataclass(slots=True)
class NodeReport:
    """The figures of one node over every execution of the run."""

    started: int = 0
    completed: int = 0
    skipped: int = 0
    attempts: int = 0
    failed_attempts: int = 0
    durations: list[float] = field(default_factory=list)

    @property
    def retries(self) -> int:
        """Attempts beyond each execution's first."""
        return self.attempts - self.started


@dataclass(slots=True)
class FailedTimeline:
    """The whole history of one failed execution, for the summary."""

    state: WorkflowState
    events: list[StateEvent]
    before_failure: WorkflowState | None


@dataclass(slots=True)
class RunReport:
    """Everything the summary prints, read back from the store after the run."""

    config: DemoConfig
    elapsed: float
    status_counts: Counter[str]
    worker_status_counts: Counter[str]
    suspended: int
    resumed: int
    cancelled_while_suspended: int
    nodes: dict[str, NodeReport]
    error_types: Counter[str]
    error_count_from_summaries: int
    evicted_histories: int
    creations: int
    worker_updates: int
    worker_transact_retries: int
    heartbeats: HeartbeatTally
    heartbeat_counters: int
    store_updates: int
    timeline: FailedTimeline | None

    @property
    def acknowledged_updates(self) -> int:
        """Updates the store acknowledged to the workers and the heartbeat threads."""
        return self.worker_updates + self.heartbeats.writes

    @property
    def throughput(self) -> float:
        """Updates per second of wall time over the run."""
        return self.store_updates / self.elapsed if self.elapsed > 0 else 0.0

    def checks(self) -> list[tuple[bool, str]]:
        """Cross-checks of the store against the simulator's own bookkeeping."""
        error_events = sum(self.error_types.values())
        return [
            (
                self.store_updates == self.acknowledged_updates,
                f"updates in the store = updates acknowledged ({self.acknowledged_updates:,})",
            ),
            (
                self.heartbeat_counters == self.heartbeats.writes,
                f"heartbeat counters in context = heartbeat writes acknowledged "
                f"({self.heartbeats.writes:,}): no lost update",
            ),
            (
                self.status_counts == self.worker_status_counts,
                "status counts in the store = outcomes the workers saw",
            ),
            (
                self.evicted_histories == 0 and error_events == self.error_count_from_summaries,
                f"error events = history summaries' error_count ({error_events:,})",
            ),
        ]


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile of sorted values, interpolating linearly between ranks."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    position = (len(sorted_values) - 1) * fraction
    lower = math.floor(position)
    upper = min(lower + 1, len(sorted_values) - 1)
    weight = position - lower
    return sorted_values[lower] * (1 - weight) + sorted_values[upper] * weight


_HISTORY_TYPES: Final = (
    EventType.STATUS_CHANGE,
    EventType.NODE_COMPLETE,
    EventType.NODE_FAILED,
    EventType.ERROR,
)


def collect_report(
    sm: StateManager,
    config: DemoConfig,
    outcomes: list[Outcome],
    heartbeats: HeartbeatTally,
    elapsed: float,
) -> RunReport:
    """Read the run back from the store and put the summary's figures together."""
    states = sm.list_executions(workflow_id=WORKFLOW_ID, limit=max(1, len(outcomes)))
    nodes = {spec.node_id: NodeReport() for spec in WORKFLOW}
    error_types: Counter[str] = Counter()
    error_count_from_summaries = 0
    evicted = 0
    suspended = 0
    resumed = 0
    cancelled_while_suspended = 0
    first_failed: WorkflowState | None = None

    for state in states:
        for node_id, node in state.nodes.items():
            report = nodes[node_id]
            report.attempts += node.attempts
            report.started += node.attempts > 0
            report.skipped += node.status is NodeStatus.SKIPPED
        if first_failed is None and state.status is ExecutionStatus.FAILED:
            first_failed = state
        try:
            history = sm.get_history(state.execution_id, HistoryOptions(types=_HISTORY_TYPES))
        except HistoryEvictedError:
            evicted += 1
            continue
        error_count_from_summaries += history.summary.error_count
        for event in history.events:
            if event.type is EventType.NODE_COMPLETE and event.node_id is not None:
                nodes[event.node_id].completed += 1
                nodes[event.node_id].durations.append(float(event.data["duration"]))
            elif event.type is EventType.NODE_FAILED and event.node_id is not None:
                nodes[event.node_id].failed_attempts += 1
            elif event.type is EventType.ERROR:
                error_types[str(event.data["type"])] += 1
            elif event.type is EventType.STATUS_CHANGE:
                change = (event.data["from"], event.data["to"])
                suspended += change[1] == "suspended"
                resumed += change == ("suspended", "running")
                cancelled_while_suspended += change == ("suspended", "cancelled")
    for report in nodes.values():
        report.durations.sort()

    timeline = None
    if first_failed is not None:
        execution_id = first_failed.execution_id
        try:
            events = sm.get_history(execution_id).events
            before = sm.get_state(execution_id, version=first_failed.version - 1)
        except HistoryEvictedError:
            pass
        else:
            timeline = FailedTimeline(first_failed, events, before)

    return RunReport(
        config=config,
        elapsed=elapsed,
        status_counts=Counter(str(state.status) for state in states),
        worker_status_counts=Counter(str(outcome.status) for outcome in outcomes),
        suspended=suspended,
        resumed=resumed,
        cancelled_while_suspended=cancelled_while_suspended,
        nodes=nodes,
        error_types=error_types,
        error_count_from_summaries=error_count_from_summaries,
        evicted_histories=evicted,
        creations=len(outcomes),
        worker_updates=sum(outcome.updates for outcome in outcomes),
        worker_transact_retries=sum(outcome.transact_retries for outcome in outcomes),
        heartbeats=heartbeats,
        heartbeat_counters=sum(int(state.context.get("heartbeats", 0)) for state in states),
        store_updates=sum(state.version - 1 for state in states),
        timeline=timeline,
    )


def run_demo(config: DemoConfig, *, progress_stream: TextIO | None = None) -> RunReport:
    """Run the simulation on a fresh manager and read the results back."""
    with open_manager(config.store, executions=config.executions) as sm:
        if len(sm):
            raise SystemExit(f"--store {config.store!r} holds executions already; use a new one")
        progress = Progress(config.executions, progress_stream or sys.stderr, config.progress)
        in_flight = InFlight()
        stop = threading.Event()
        tallies = [HeartbeatTally() for _ in range(config.heartbeat_threads)]
        heartbeat_threads = [
            threading.Thread(
                target=_heartbeat_loop,
                args=(sm, in_flight, stop, config.heartbeat_interval, tally),
                name=f"wfstate-demo-heartbeat-{number}",
                daemon=True,
            )
            for number, tally in enumerate(tallies)
        ]

        def run_one(index: int) -> Outcome:
            outcome = run_execution(sm, index, config, in_flight)
            progress.advance()
            return outcome

        started = time.perf_counter()
        for thread in heartbeat_threads:
            thread.start()
        try:
            with ThreadPoolExecutor(
                max_workers=config.threads, thread_name_prefix="wfstate-demo-worker"
            ) as pool:
                outcomes = list(pool.map(run_one, range(config.executions)))
        finally:
            stop.set()
            for thread in heartbeat_threads:
                thread.join()
            elapsed = time.perf_counter() - started
            progress.close()

        heartbeats = HeartbeatTally(
            writes=sum(tally.writes for tally in tallies),
            conflicts_retried=sum(tally.conflicts_retried for tally in tallies),
            gave_up=sum(tally.gave_up for tally in tallies),
        )
        return collect_report(sm, config, outcomes, heartbeats, elapsed)


# -- the summary --------------------------------------------------------------------


def _format_seconds(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.2f} s"


def _short(value: Any, width: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return text if len(text) <= width else text[: width - 3] + "..."


def _describe_event(event: StateEvent) -> str:
    """A one-line summary of an event's data."""
    data = event.data
    match event.type:
        case EventType.EXECUTION_CREATED:
            return f"workflow_id={data['workflow_id']} variables={_short(data['variables'], 40)}"
        case (
            EventType.STATUS_CHANGE
            | EventType.CURRENT_NODE_CHANGED
            | EventType.NODE_PENDING
            | EventType.NODE_SKIPPED
        ):
            return f"{data['from']} -> {data['to']}"
        case EventType.NODE_START:
            return f"{data['from']} -> running, attempt {data['attempt']}"
        case EventType.NODE_COMPLETE | EventType.NODE_FAILED:
            return f"attempt {data['attempt']}, {_format_seconds(float(data['duration']))}"
        case EventType.ERROR:
            return _short(f"{data['type']}: {data['message']}", 100)
        case EventType.VARIABLES_CHANGED:
            names = [*data["set"], *(f"-{name}" for name in data["unset"])]
            return "set " + ", ".join(names)
        case EventType.CONTEXT_CHANGED:
            return "set " + _short(data["set"])
        case _:
            return _short(data)


def _format_timeline(timeline: FailedTimeline) -> list[str]:
    state = timeline.state
    events = timeline.events
    lines = [
        f"Timeline of failed execution {state.execution_id} "
        f"(order {state.variables.get('order_id')}, {len(events)} events; offsets are wall time)",
        f"  {'offset':>10}  {'ver':>3}  {'event':<20}  {'node':<8}  data",
    ]
    for event in events:
        offset_ms = (event.timestamp - state.created_at).total_seconds() * 1000
        lines.append(
            f"  {f'+{offset_ms:.3f} ms':>10}  {event.version:>3}  {event.type:<20}  "
            f"{event.node_id or '-':<8}  {_describe_event(event)}"
        )
    failed_nodes = [
        (node_id, node) for node_id, node in state.nodes.items() if node.status is NodeStatus.FAILED
    ]
    for node_id, node in failed_nodes:
        error = node.error or {}
        traceback_text = str((error.get("details") or {}).get("traceback", ""))
        lines.append(f"  {node_id} failed after {node.attempts} attempts; recorded traceback ends:")
        lines.extend(f"    {line}" for line in traceback_text.rstrip().splitlines()[-3:])
    before = timeline.before_failure
    if before is not None and before.current_node is not None:
        node = before.nodes[before.current_node]
        lines.append(
            f"  get_state(version={before.version}), just before: status {before.status}, "
            f"{before.current_node} {node.status} (attempt {node.attempts})"
        )
    return lines


def format_report(report: RunReport) -> str:
    """The summary printed at the end of a run."""
    config = report.config
    total = sum(report.status_counts.values())
    path = " -> ".join(
        spec.node_id + ("?" if spec.skip_when is not None else "") for spec in WORKFLOW
    )
    lines = [
        f"wfstate demo: {config.executions:,} executions of {WORKFLOW_ID!r} ({path})",
        f"  store {config.store}, {config.threads} worker threads, "
        f"{config.heartbeat_threads} heartbeat threads, seed {config.seed}, "
        f"failure rate {config.failure_rate:.0%} ({config.retry_failure_rate:.0%} on a retry), "
        f"at most {config.max_attempts} attempts",
        "",
        "Executions by status",
    ]
    for status in ExecutionStatus:
        count = report.status_counts.get(str(status), 0)
        share = count / total if total else 0.0
        lines.append(f"  {status:<10} {count:>7,}  {share:6.1%}")
    lines += [
        f"  {'total':<10} {total:>7,}",
        f"  suspended for an approval: {report.suspended:,}, resumed: {report.resumed:,}, "
        f"cancelled while suspended: {report.cancelled_while_suspended:,}",
        "",
        "Nodes (durations are simulated seconds, from the node_complete events)",
        f"  {'node':<9}{'started':>9}{'completed':>11}{'skipped':>9}{'attempts':>10}"
        f"{'retries':>9}{'failed':>8}{'p50':>9}{'p95':>9}",
    ]
    for node_id, node in report.nodes.items():
        p50 = _format_seconds(percentile(node.durations, 0.50)) if node.durations else "-"
        p95 = _format_seconds(percentile(node.durations, 0.95)) if node.durations else "-"
        lines.append(
            f"  {node_id:<9}{node.started:>9,}{node.completed:>11,}{node.skipped:>9,}"
            f"{node.attempts:>10,}{node.retries:>9,}{node.failed_attempts:>8,}{p50:>9}{p95:>9}"
        )
    lines += [
        "  (attempts = completed + failed; retries = attempts - started)",
        "",
        "Errors by type (error events)",
    ]
    width = max((len(name) for name in report.error_types), default=5)
    for error_type, count in report.error_types.most_common():
        lines.append(f"  {error_type:<{width}}  {count:>6,}")
    lines += [
        f"  {'total':<{width}}  {sum(report.error_types.values()):>6,}",
        "",
        "Writes",
        f"  creations                 {report.creations:>9,}",
        f"  updates by workers        {report.worker_updates:>9,}"
        f"   (transact calls retried after a conflict: {report.worker_transact_retries:,})",
        f"  updates by heartbeats     {report.heartbeats.writes:>9,}"
        f"   (conflicts retried: {report.heartbeats.conflicts_retried:,}, "
        f"gave up: {report.heartbeats.gave_up:,})",
        f"  updates in the store      {report.store_updates:>9,}"
        "   (sum of version - 1 over the executions)",
        f"  throughput measured on this run: {report.store_updates:,} updates in "
        f"{report.elapsed:.2f} s = {report.throughput:,.0f} updates/s",
        f"    (wall time of the whole run on {config.threads} worker threads, the Python simulator",
        "    included: not a benchmark of the core; see `make bench` and BENCHMARKS.md)",
        "",
        "Checks",
    ]
    lines.extend(f"  {'ok' if passed else 'FAILED'}  {text}" for passed, text in report.checks())
    if report.evicted_histories:
        lines.append(f"  {report.evicted_histories:,} histories were evicted from the event ring")
    lines.append("")
    if report.timeline is not None:
        lines += _format_timeline(report.timeline)
    elif config.timeline:
        lines.append("No execution failed in this run: no timeline to show.")
    return "\n".join(lines)


# -- command line -------------------------------------------------------------------


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def parse_args(argv: Sequence[str] | None = None) -> DemoConfig:
    """The ``DemoConfig`` of a command line."""
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(
        prog="python -m wfstate.demo",
        description="Simulate workflow executions through wfstate and summarise them.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--executions", type=_positive_int, default=defaults.executions, help="executions to run"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seed of every random choice (each execution's course is "
        "reproducible; thread interleaving is not)",
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=defaults.threads,
        help="worker threads running executions",
    )
    parser.add_argument(
        "--failure-rate",
        type=_fraction,
        default=defaults.failure_rate,
        help="chance that a node's first attempt fails",
    )
    parser.add_argument(
        "--retry-failure-rate",
        type=_fraction,
        default=defaults.retry_failure_rate,
        help="chance that a retry fails too (faults tend to persist)",
    )
    parser.add_argument(
        "--max-attempts",
        type=_positive_int,
        default=defaults.max_attempts,
        help="attempts of a node before the execution fails",
    )
    parser.add_argument(
        "--skip-rate",
        type=_fraction,
        default=defaults.skip_rate,
        help="chance that the enrich branch is skipped (notify: 0.4 of it)",
    )
    parser.add_argument(
        "--suspend-rate",
        type=_fraction,
        default=defaults.suspend_rate,
        help="chance that an execution waits for a manual approval",
    )
    parser.add_argument(
        "--cancel-rate",
        type=_fraction,
        default=defaults.cancel_rate,
        help="chance that an operator cancels an execution",
    )
    parser.add_argument(
        "--heartbeat-threads",
        type=_non_negative_int,
        default=defaults.heartbeat_threads,
        help="threads writing heartbeats to the executions in flight",
    )
    parser.add_argument(
        "--heartbeat-ms",
        type=float,
        default=defaults.heartbeat_interval * 1000,
        help="pause between two heartbeat rounds of one thread",
    )
    parser.add_argument(
        "--store",
        default=defaults.store,
        help="where the state lives (only memory:// until persistence lands)",
    )
    parser.add_argument(
        "--progress",
        choices=("auto", "bar", "lines", "off"),
        default=defaults.progress,
        help="progress on stderr: a bar on a terminal, else periodic lines",
    )
    parser.add_argument(
        "--no-timeline",
        dest="timeline",
        action="store_false",
        help="do not print the timeline of a failed execution",
    )
    args = parser.parse_args(argv)
    if args.heartbeat_ms <= 0:
        parser.error("--heartbeat-ms must be positive")
    return DemoConfig(
        executions=args.executions,
        seed=args.seed,
        threads=args.threads,
        failure_rate=args.failure_rate,
        retry_failure_rate=args.retry_failure_rate,
        max_attempts=args.max_attempts,
        skip_rate=args.skip_rate,
        suspend_rate=args.suspend_rate,
        cancel_rate=args.cancel_rate,
        heartbeat_threads=args.heartbeat_threads,
        heartbeat_interval=args.heartbeat_ms / 1000,
        store=args.store,
        progress=args.progress,
        timeline=args.timeline,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; print the summary. Exit status 1 when a cross-check failed."""
    config = parse_args(argv)
    report = run_demo(config)
    if not config.timeline:
        report.timeline = None
    print(format_report(report))
    return 0 if all(passed for passed, _ in report.checks()) else 1


if __name__ == "__main__":
    # Run the copy of this module imported as ``wfstate.demo``, so that the simulated
    # exceptions are recorded as ``wfstate.demo.SchemaError``, not ``__main__.SchemaError``.
    from wfstate.demo import main as _main

    sys.exit(_main())
