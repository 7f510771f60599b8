"""A workflow simulator that drives wfstate the way an engine does, crashes part-way,
recovers, and reports on it.

``python -m wfstate.demo`` (``make demo``) runs N executions of a six-node order
workflow on a durable store opened with :meth:`wfstate.StateManager.open` (by default
a new SQLite file in a new temporary directory), on a few worker threads::

    fetch -> validate -> enrich? -> charge -> notify? -> archive

Nodes start, fail and are retried (a failed node that runs again is a new attempt; after
``--max-attempts`` the execution fails, with the exception recorded as its error), the
optional branches ``enrich`` and ``notify`` are sometimes skipped, node outputs are
written to the variables and simulated durations are reported through ``metrics``.
Some orders wait for a manual approval: the execution is suspended and its worker
thread moves on to other work until the approval arrives (``--approval-delay``
executions later); some are cancelled. Meanwhile heartbeat threads increment a
counter in the context of every execution in flight, as a lease renewer in another
process would; read-modify-write goes through ``transact`` and meets real conflicts.

The crash. Phase 1 runs in a worker subprocess (``python -m wfstate.demo --worker``,
sync durability), which appends every write the store acknowledged (the call
returned) to a log file, one ``os.write`` per line. The parent watches the count of
finished executions on a pipe and, once ``--crash-at`` of them have finished, kills
the worker with SIGKILL: a real crash, with writes in flight. Phase 2 reopens the
store with ``StateManager.open``, takes what ``recover()`` returns, checks that every
acknowledged write is in the store, resumes each recovered execution from its stored
state (the next step is derived from its nodes, variables and context; an attempt
that was running when the worker died is recorded as failed, its outcome lost with
the worker) and runs the orders the worker never started. ``--store memory://`` runs
in one process without a crash: a store in memory dies with its process.

Every figure of the summary is read back from the store (``list_executions``,
``get_history``, ``get_state``); the simulator's own bookkeeping (the worker's log,
the parent's tallies) serves only to cross-check the store (the "Checks" section,
and the exit status).

Time inside the workflow is simulated: nothing sleeps. Every random choice comes
from a generator seeded by the run's seed, the order and the decision, so an
execution resumed after the crash takes the course it would have taken without it
(bar an attempt the crash interrupted). The demo uses only the public API of
wfstate, so it runs unchanged against any store.

This module must never count a write as acknowledged before the call that made it
has returned, nor take a figure of the summary from its own bookkeeping.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import KW_ONLY, dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal, Protocol, TextIO

import wfstate
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
    "CrashReport",
    "DemoConfig",
    "Ledger",
    "NodeSpec",
    "RunReport",
    "Tally",
    "config_argv",
    "format_report",
    "main",
    "open_manager",
    "parse_args",
    "percentile",
    "read_ledger",
    "run_demo",
]

WORKFLOW_ID: Final = "order-pipeline"
#: Statuses after which an execution takes no update (bar failed -> running).
FINAL_STATUSES: Final = frozenset(
    {ExecutionStatus.COMPLETED, ExecutionStatus.FAILED, ExecutionStatus.CANCELLED}
)
#: The statuses of executions that ``recover()`` returns.
ACTIVE_STATUSES: Final = frozenset({ExecutionStatus.RUNNING, ExecutionStatus.SUSPENDED})
#: The node before which an order that needs a manual approval waits for it.
APPROVAL_NODE: Final = "charge"
#: The ``actor`` of the writes of each kind of writer (recorded on every event).
WORKER_ACTOR: Final = "worker"
HEARTBEAT_ACTOR: Final = "heartbeat"
#: The file name of the default store, in a new temporary directory.
DEFAULT_DATABASE_NAME: Final = "wfstate-demo.db"
#: The worker's log of acknowledged writes, in the run's work directory.
LEDGER_NAME: Final = "acknowledged.log"


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


class WorkerLostError(Exception):
    """Not raised: the type of the error recorded on an attempt that was running when
    its worker process died, written by the process that recovers the execution."""


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

    @classmethod
    def from_variables(cls, variables: Mapping[str, Any]) -> Order:
        """The order an execution was created for, read back from its variables (the
        nodes write their outputs under their own names, so these stay as created)."""
        tier = variables["customer_tier"]
        return cls(
            order_id=str(variables["order_id"]),
            amount_cents=int(variables["amount_cents"]),
            items=int(variables["items"]),
            customer_tier=None if tier is None else str(tier),
            notify_opt_out=bool(variables["notify_opt_out"]),
            needs_approval=bool(variables["needs_approval"]),
        )

    @property
    def index(self) -> int:
        """The order's number in the run (``ord-00042`` is 42): it seeds its choices."""
        return int(self.order_id.removeprefix("ord-"))


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


#: Each node's position in the workflow.
_POSITION: Final[Mapping[str, int]] = {spec.node_id: index for index, spec in enumerate(WORKFLOW)}


# -- configuration ------------------------------------------------------------------

ProgressMode = Literal["auto", "bar", "lines", "off"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoConfig:
    """Everything a run depends on; ``parse_args`` builds it from the command line.

    ``store`` None means a new SQLite file in a new temporary directory, removed at
    exit unless ``keep_store``. ``crash_at`` is the share of the executions that must
    have finished when the worker process is killed; None runs in one process,
    without a crash (always so on ``memory://``).
    """

    executions: int = 1000
    seed: int = 1
    threads: int = 4
    failure_rate: float = 0.08
    retry_failure_rate: float = 0.4
    max_attempts: int = 3
    skip_rate: float = 0.25
    suspend_rate: float = 0.05
    cancel_rate: float = 0.03
    approval_delay: int = 100
    heartbeat_threads: int = 2
    heartbeat_interval: float = 0.002
    store: str | None = None
    keep_store: bool = False
    crash_at: float | None = 0.4
    progress: ProgressMode = "auto"
    timeline: bool = True


def _is_memory_store(store: str) -> bool:
    """Whether ``store`` is a store in memory (which cannot outlive a crash)."""
    return store.lower().startswith("memory://")


def open_manager(store: str, *, executions: int) -> StateManager:
    """The StateManager the demo runs against: ``StateManager.open(store)``, sync.

    Every write returns once it is committed (group commit shares transactions
    between concurrent writers), so what the worker logs as acknowledged is durable.
    """
    # The summary reads histories back; from the ring when it still holds them (about
    # 40 events an execution, heartbeats included), else from the store.
    return StateManager.open(store, durability="sync", ring_capacity=max(100_000, executions * 64))


def _require_empty(sm: StateManager, store: str) -> None:
    """Refuse a store that holds executions: the summary reads back all it holds."""
    if sm.list_executions(limit=1):
        raise SystemExit(
            f"--store {store}: the store holds executions already, and the demo reads "
            "back everything it holds; give a new one (or omit --store for a new SQLite file)"
        )


# -- progress -----------------------------------------------------------------------


class FinishedSink(Protocol):
    """Where a simulation reports each execution that reached a final status."""

    def advance(self, count: int = 1) -> None:
        """Count ``count`` more finished executions."""
        ...


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

    def advance(self, count: int = 1) -> None:
        """Count ``count`` finished executions; redraw if it is time to."""
        with self._lock:
            self._done += count
            now = time.perf_counter()
            if self._mode != "off" and now >= self._next_draw and self._done < self._total:
                self._draw(now)
                self._next_draw = now + self._interval

    def set_done(self, done: int) -> None:
        """Set the count (after a crash, to what the store holds as finished)."""
        with self._lock:
            self._done = done

    def note(self, text: str) -> None:
        """Print one line of news between progress updates."""
        with self._lock:
            if self._mode == "off":
                return
            if self._drawn_width:
                self._stream.write("\r" + " " * self._drawn_width + "\r")
                self._drawn_width = 0
            self._stream.write(f"wfstate demo: {text}\n")
            self._stream.flush()

    def close(self) -> None:
        """Draw the final state (and end the bar's line)."""
        with self._lock:
            if self._mode == "off":
                return
            self._draw(time.perf_counter())
            if self._mode == "bar":
                self._stream.write("\n")
                self._stream.flush()
                self._drawn_width = 0

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


# The worker's reports to the parent on its pipe: one byte each, so that a write is
# never torn, whatever the moment of the kill.
_STARTED: Final = b"S"
_FINISHED: Final = b"+"


class _PipeSink:
    """The worker's side of the pipe: a byte per finished execution."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def started(self) -> None:
        """Tell the parent that the simulation starts (the store is open)."""
        os.write(self._fd, _STARTED)

    def advance(self, count: int = 1) -> None:
        """Report ``count`` finished executions."""
        os.write(self._fd, _FINISHED * count)


# -- the ledger of acknowledged writes ------------------------------------------------

#: The kinds of ledger lines: ``kind execution_id version detail``.
#: create/worker/heartbeat: a write the store acknowledged, at ``version`` (detail: the
#: conflicts ``transact`` retried first); heartbeat-noop: a heartbeat that found the
#: execution final and wrote nothing; heartbeat-gave-up: one that ran out of retries;
#: finished: the execution reached the final status ``detail`` at ``version``.
LedgerKind = Literal[
    "create", "worker", "heartbeat", "heartbeat-noop", "heartbeat-gave-up", "finished"
]


@dataclass(slots=True)
class Tally:
    """What the store acknowledged to one process's writers, as its ledger recorded it."""

    creations: int = 0
    worker_updates: int = 0
    worker_transact_retries: int = 0
    heartbeat_writes: int = 0
    heartbeat_conflicts_retried: int = 0
    heartbeat_gave_up: int = 0
    #: execution id -> the versions acknowledged (1 is the creation).
    versions: dict[str, set[int]] = field(default_factory=dict)
    #: execution id -> the final status its worker saw.
    outcomes: dict[str, ExecutionStatus] = field(default_factory=dict)

    def add(self, kind: str, execution_id: str, version: int, detail: str) -> None:
        """Count one ledger entry."""
        if kind in ("create", "worker", "heartbeat"):
            self.versions.setdefault(execution_id, set()).add(version)
        match kind:
            case "create":
                self.creations += 1
            case "worker":
                self.worker_updates += 1
                self.worker_transact_retries += int(detail)
            case "heartbeat":
                self.heartbeat_writes += 1
                self.heartbeat_conflicts_retried += int(detail)
            case "heartbeat-noop":
                self.heartbeat_conflicts_retried += int(detail)
            case "heartbeat-gave-up":
                self.heartbeat_gave_up += 1
                self.heartbeat_conflicts_retried += int(detail)
            case "finished":
                self.outcomes[execution_id] = ExecutionStatus(detail)
            case _:
                raise ValueError(f"unknown ledger entry {kind!r}")

    @property
    def acknowledged(self) -> int:
        """Writes acknowledged: creations and updates."""
        return sum(len(versions) for versions in self.versions.values())

    @property
    def updates(self) -> int:
        """Updates acknowledged (creations not included)."""
        return self.worker_updates + self.heartbeat_writes

    def in_flight(self) -> set[str]:
        """Executions created and not finished, as far as the ledger knows."""
        return {
            execution_id
            for execution_id, versions in self.versions.items()
            if 1 in versions and execution_id not in self.outcomes
        }

    @classmethod
    def merged(cls, *tallies: Tally) -> Tally:
        """The sum of several processes' tallies."""
        total = cls()
        for tally in tallies:
            total.creations += tally.creations
            total.worker_updates += tally.worker_updates
            total.worker_transact_retries += tally.worker_transact_retries
            total.heartbeat_writes += tally.heartbeat_writes
            total.heartbeat_conflicts_retried += tally.heartbeat_conflicts_retried
            total.heartbeat_gave_up += tally.heartbeat_gave_up
            for execution_id, versions in tally.versions.items():
                total.versions.setdefault(execution_id, set()).update(versions)
            total.outcomes.update(tally.outcomes)
        return total


class Ledger:
    """Records each acknowledged write in a :class:`Tally` and, given a ``path``,
    appends it to that file: one ``os.write`` of one whole line, made after the call
    returned, so a SIGKILL leaves every line logged so far intact (the page cache
    outlives the process). Thread-safe."""

    __slots__ = ("_fd", "_lock", "tally")

    def __init__(self, path: str | None = None) -> None:
        self.tally = Tally()
        self._lock = threading.Lock()
        self._fd = (
            None
            if path is None
            else os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_EXCL, 0o644)
        )

    def record(self, kind: LedgerKind, execution_id: str, version: int, detail: object = 0) -> None:
        """Record one entry (see :data:`LedgerKind`)."""
        text = str(detail)
        with self._lock:
            self.tally.add(kind, execution_id, version, text)
        if self._fd is not None:
            # O_APPEND: each line lands whole at the end, whichever thread writes it.
            os.write(self._fd, f"{kind} {execution_id} {version} {text}\n".encode())

    def close(self) -> None:
        """Close the file (the tally stays readable)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_ledger(path: str | os.PathLike[str]) -> Tally:
    """The tally of a ledger file; a last line without its newline is ignored (a
    writer killed in the middle of it never had that write acknowledged)."""
    tally = Tally()
    text = Path(path).read_text(encoding="utf-8")
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        kind, execution_id, version, detail = line.split()
        tally.add(kind, execution_id, int(version), detail)
    return tally


# -- the simulation -----------------------------------------------------------------


class InFlight:
    """The ids of the executions the worker threads are driving right now. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids: set[str] = set()

    def add(self, execution_id: str) -> None:
        """Register an execution a worker thread took up."""
        with self._lock:
            self._ids.add(execution_id)

    def discard(self, execution_id: str) -> None:
        """Forget an execution that ended or waits for its approval."""
        with self._lock:
            self._ids.discard(execution_id)

    def snapshot(self) -> list[str]:
        """The ids in flight, sorted (so that heartbeats visit them in a fixed order)."""
        with self._lock:
            return sorted(self._ids)


@dataclass(frozen=True, slots=True)
class Simulation:
    """What every worker thread of one process shares."""

    sm: StateManager
    config: DemoConfig
    ledger: Ledger
    in_flight: InFlight


class _Writer:
    """The writes of one worker thread to one execution, logged once acknowledged."""

    __slots__ = ("execution_id", "ledger", "sm", "version")

    def __init__(self, sim: Simulation, state: WorkflowState) -> None:
        self.sm = sim.sm
        self.ledger = sim.ledger
        self.execution_id = state.execution_id
        self.version = state.version

    def apply(self, update: StateUpdate | Mapping[str, Any]) -> int:
        """``update_state`` without a version check: this worker owns the statuses."""
        version = self.sm.update_state(self.execution_id, update, actor=WORKER_ACTOR)
        self.ledger.record("worker", self.execution_id, version)
        self.version = version
        return version

    def transact(self, fn: Callable[[WorkflowState], StateUpdate | None]) -> int:
        """``transact``, logging the calls of ``fn`` beyond the first as conflict retries."""
        calls = 0
        wrote = False

        def counted(state: WorkflowState) -> StateUpdate | None:
            nonlocal calls, wrote
            calls += 1
            update = fn(state)
            wrote = update is not None
            return update

        version = self.sm.transact(self.execution_id, counted, actor=WORKER_ACTOR)
        if wrote:
            self.ledger.record("worker", self.execution_id, version, calls - 1)
        self.version = version
        return version


def _seeded(config: DemoConfig, index: int, *decision: object) -> random.Random:
    """The generator of one decision about order ``index``: the same in any process,
    whichever thread makes it and whether or not a crash came before."""
    return random.Random(":".join(map(str, (config.seed, index, *decision))))


def _new_order(config: DemoConfig, index: int) -> Order:
    rng = _seeded(config, index)
    has_profile = rng.random() >= config.skip_rate
    return Order(
        order_id=f"ord-{index:05d}",
        amount_cents=round(rng.lognormvariate(math.log(4_500), 0.8)),
        items=rng.randint(1, 6),
        customer_tier=rng.choice(("gold", "silver", "bronze")) if has_profile else None,
        notify_opt_out=rng.random() < config.skip_rate * 0.4,
        needs_approval=rng.random() < config.suspend_rate,
    )


def _cancel_position(config: DemoConfig, index: int) -> int | None:
    """The position of the node before which an operator cancels the order, if any."""
    rng = _seeded(config, index, "operator")
    return rng.randrange(len(WORKFLOW)) if rng.random() < config.cancel_rate else None


@dataclass(frozen=True, slots=True)
class _AttemptDraw:
    duration: float
    fault: type[Exception] | None
    metrics: dict[str, dict[str, float]]


def _draw_attempt(config: DemoConfig, order: Order, spec: NodeSpec, attempt: int) -> _AttemptDraw:
    """How attempt ``attempt`` of a node goes: its duration, fault and metrics."""
    rng = _seeded(config, order.index, spec.node_id, attempt)
    duration = rng.lognormvariate(math.log(spec.median_seconds), spec.spread)
    failure_rate = config.failure_rate if attempt == 1 else config.retry_failure_rate
    fault = rng.choice(spec.faults) if rng.random() < failure_rate else None
    peak_memory = rng.lognormvariate(math.log(spec.peak_memory_mib * 2**20), 0.3)
    metrics = {
        spec.node_id: {
            "duration": round(duration, 6),
            # The nodes wait on I/O: CPU time is a small share of the duration.
            "cpu_time": round(duration * rng.uniform(0.05, 0.4), 6),
            "peak_memory": float(round(peak_memory)),
        }
    }
    return _AttemptDraw(duration, fault, metrics)


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


def _lost_attempt(spec: NodeSpec, attempt: int) -> dict[str, JSONValue]:
    """The error recorded on an attempt whose worker died while it ran."""
    return {
        "type": f"{__name__}.{WorkerLostError.__name__}",
        "message": f"attempt {attempt} of {spec.node_id} was running when its worker "
        "process died; its outcome is unknown",
        "details": {"recovered_by_pid": os.getpid()},
    }


@dataclass(frozen=True, slots=True)
class Task:
    """One stretch of work for a worker thread: start order ``index``, or continue the
    stored execution ``execution_id`` (recovered, or approved while it waited)."""

    index: int | None = None
    execution_id: str | None = None


def drive(sim: Simulation, task: Task) -> tuple[str, ExecutionStatus | None]:
    """Drive one execution from where its state says it is to a final status, or
    until it waits for an approval (then the status is None).

    The next step is derived from the stored state alone, so the same code starts a
    new order, continues an approved one and resumes one recovered after a crash.
    """
    sm = sim.sm
    if task.execution_id is None:
        assert task.index is not None
        order = _new_order(sim.config, task.index)
        state = sm.create_execution(
            None,
            workflow_id=WORKFLOW_ID,
            variables=order.variables(),
            context={"submitted_by": "wfstate.demo", "seed": sim.config.seed},
            actor=WORKER_ACTOR,
        )
        sim.ledger.record("create", state.execution_id, state.version)
    else:
        state = sm.get_state(task.execution_id)
        order = Order.from_variables(state.variables)
    writer = _Writer(sim, state)
    sim.in_flight.add(state.execution_id)
    try:
        status = _continue(sim, writer, state, order)
    finally:
        sim.in_flight.discard(state.execution_id)
    if status is not None:
        sim.ledger.record("finished", state.execution_id, writer.version, status)
    return state.execution_id, status


def _continue(
    sim: Simulation, writer: _Writer, state: WorkflowState, order: Order
) -> ExecutionStatus | None:
    config = sim.config
    cancel_before = _cancel_position(config, order.index)
    if not state.nodes:
        # The plan: every node pending, in one update.
        writer.apply({"nodes": {spec.node_id: "pending" for spec in WORKFLOW}})
    approved = state.context.get("approved_by") is not None
    if state.status is ExecutionStatus.SUSPENDED:
        # The approver answers: rejected while waiting (suspended -> cancelled), or approved.
        if cancel_before == _POSITION[APPROVAL_NODE]:
            writer.transact(_cancel)
            return ExecutionStatus.CANCELLED
        writer.apply(
            StateUpdate(
                status=ExecutionStatus.RUNNING,
                context={"waiting_for": None, "approved_by": "ops"},
            )
        )
        approved = True
    for position, spec in enumerate(WORKFLOW):
        node = state.nodes.get(spec.node_id)
        status = NodeStatus.PENDING if node is None else node.status
        attempts = 0 if node is None else node.attempts
        if status in (NodeStatus.COMPLETED, NodeStatus.SKIPPED):
            continue
        if status is NodeStatus.PENDING:
            if order.needs_approval and spec.node_id == APPROVAL_NODE and not approved:
                writer.apply(
                    StateUpdate(
                        status=ExecutionStatus.SUSPENDED,
                        context={"waiting_for": "manual approval"},
                    )
                )
                return None
            if cancel_before == position:
                writer.transact(_cancel)
                return ExecutionStatus.CANCELLED
            if spec.skip_when is not None and spec.skip_when(order):
                writer.apply({"nodes": {spec.node_id: "skipped"}})  # a dict works too
                continue
        elif status is NodeStatus.RUNNING:
            # Recovered after a crash: the attempt ran in the dead worker and its result
            # is lost. Record it as failed; it counts against the attempts, as it would
            # in an engine whose worker died.
            gave_up = attempts >= config.max_attempts
            writer.apply(
                StateUpdate(
                    status=ExecutionStatus.FAILED if gave_up else None,
                    current_node=None if gave_up else UNSET,
                    nodes={spec.node_id: NodeStatus.FAILED},
                    error=_lost_attempt(spec, attempts),
                )
            )
            if gave_up:
                return ExecutionStatus.FAILED
        # Pending, failed (a retry is due) or just recorded as lost: run the attempts left.
        if not _run_attempts(writer, config, spec, order, first_attempt=attempts + 1):
            return ExecutionStatus.FAILED
    writer.apply(StateUpdate(status=ExecutionStatus.COMPLETED, current_node=None))
    return ExecutionStatus.COMPLETED


def _run_attempts(
    writer: _Writer, config: DemoConfig, spec: NodeSpec, order: Order, *, first_attempt: int
) -> bool:
    """Run a node from attempt ``first_attempt`` on: True once it completed, False when
    its last attempt failed (and with it the execution)."""
    if first_attempt > config.max_attempts:
        raise RuntimeError(
            f"{spec.node_id} of {writer.execution_id} used its {config.max_attempts} attempts, "
            "yet the execution was not failed"
        )
    for attempt in range(first_attempt, config.max_attempts + 1):
        if attempt == 1:
            writer.apply(
                StateUpdate(nodes={spec.node_id: NodeStatus.RUNNING}, current_node=spec.node_id)
            )
        else:
            writer.apply(StateUpdate(nodes={spec.node_id: NodeStatus.RUNNING}))
        draw = _draw_attempt(config, order, spec, attempt)
        try:
            output = _call_node(spec, order, draw.fault)
        except NODE_FAULTS as exc:
            gave_up = attempt == config.max_attempts
            writer.apply(
                StateUpdate(
                    status=ExecutionStatus.FAILED if gave_up else None,
                    current_node=None if gave_up else UNSET,
                    nodes={spec.node_id: NodeStatus.FAILED},
                    error=exc,
                    metrics=draw.metrics,
                )
            )
            continue
        writer.transact(_complete_node(spec, output, draw.metrics))
        return True
    return False


class Scheduler:
    """Hands the worker threads their next task. Thread-safe.

    First the executions to resume (recovered after a crash), then the ones waiting
    for an approval that is due (it arrives once ``approval_delay`` more executions
    have finished, or at once when no new order is left), then new orders. A thread
    with nothing to take waits while others may still hand back a suspended execution.
    """

    def __init__(
        self,
        *,
        indices: Iterable[int],
        resume: Iterable[str] = (),
        waiting: Iterable[str] = (),
        approval_delay: int,
    ) -> None:
        self._cond = threading.Condition()
        self._indices = deque(indices)
        self._resume = deque(resume)
        # (finished count at which the approval arrives, execution id), due order.
        self._waiting = deque((0, execution_id) for execution_id in waiting)
        self._approval_delay = approval_delay
        self._finished = 0
        self._active = 0
        self._aborted = False

    def next(self) -> Task | None:
        """The next task, or None when every execution has reached a final status."""
        with self._cond:
            while not self._aborted:
                task = self._take()
                if task is not None:
                    self._active += 1
                    return task
                if self._active == 0:
                    return None
                self._cond.wait()
            return None

    def _take(self) -> Task | None:
        if self._resume:
            return Task(execution_id=self._resume.popleft())
        if self._waiting and (self._waiting[0][0] <= self._finished or not self._indices):
            return Task(execution_id=self._waiting.popleft()[1])
        if self._indices:
            return Task(index=self._indices.popleft())
        return None

    def done(self, execution_id: str, status: ExecutionStatus | None) -> None:
        """A task ended: the execution is final, or waits for its approval (None)."""
        with self._cond:
            self._active -= 1
            if status is None:
                self._waiting.append((self._finished + self._approval_delay, execution_id))
            else:
                self._finished += 1
            self._cond.notify_all()

    def abort(self) -> None:
        """Stop handing out tasks (a worker thread failed)."""
        with self._cond:
            self._aborted = True
            self._cond.notify_all()


def _heartbeat(sm: StateManager, ledger: Ledger, execution_id: str) -> None:
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
        version = sm.transact(execution_id, beat, actor=HEARTBEAT_ACTOR)
    except ConflictError:
        ledger.record("heartbeat-gave-up", execution_id, 0, calls - 1)
        return
    if wrote:
        ledger.record("heartbeat", execution_id, version, calls - 1)
    elif calls > 1:
        ledger.record("heartbeat-noop", execution_id, 0, calls - 1)


def _heartbeat_loop(sim: Simulation, stop: threading.Event) -> None:
    """Every ``heartbeat_interval`` seconds, increment ``context["heartbeats"]`` of each
    execution in flight: a second writer on the same executions, like a lease renewer."""
    while not stop.wait(sim.config.heartbeat_interval):
        for execution_id in sim.in_flight.snapshot():
            _heartbeat(sim.sm, sim.ledger, execution_id)


def _work_loop(sim: Simulation, scheduler: Scheduler, sink: FinishedSink) -> None:
    try:
        while (task := scheduler.next()) is not None:
            execution_id, status = drive(sim, task)
            scheduler.done(execution_id, status)
            if status is not None:
                sink.advance()
    except BaseException:
        scheduler.abort()
        raise


def simulate(
    sm: StateManager,
    config: DemoConfig,
    ledger: Ledger,
    scheduler: Scheduler,
    sink: FinishedSink,
) -> float:
    """Run the scheduler's tasks on ``config.threads`` worker threads, with the
    heartbeat threads alongside; return the wall time it took."""
    sim = Simulation(sm, config, ledger, InFlight())
    stop = threading.Event()
    heartbeat_threads = [
        threading.Thread(
            target=_heartbeat_loop,
            args=(sim, stop),
            name=f"wfstate-demo-heartbeat-{number}",
            daemon=True,
        )
        for number in range(config.heartbeat_threads)
    ]
    started = time.perf_counter()
    for thread in heartbeat_threads:
        thread.start()
    try:
        with ThreadPoolExecutor(
            max_workers=config.threads, thread_name_prefix="wfstate-demo-worker"
        ) as pool:
            futures = [pool.submit(_work_loop, sim, scheduler, sink) for _ in range(config.threads)]
            for future in futures:
                future.result()
    finally:
        stop.set()
        for thread in heartbeat_threads:
            thread.join()
    return time.perf_counter() - started


# -- phase 1: the worker process, and its crash -------------------------------------


def _run_worker(config: DemoConfig, ledger_path: str, report_fd: int) -> int:
    """``--worker``: phase 1, in the process the parent kills. It runs every order on
    an empty store, logs each acknowledged write to ``ledger_path`` and reports each
    finished execution on ``report_fd``. It reaches its end only if nobody kills it."""
    if config.store is None:
        raise SystemExit("--worker needs --store")
    sink = _PipeSink(report_fd)
    ledger = Ledger(ledger_path)
    try:
        with open_manager(config.store, executions=config.executions) as sm:
            _require_empty(sm, config.store)
            sink.started()
            scheduler = Scheduler(
                indices=range(config.executions), approval_delay=config.approval_delay
            )
            simulate(sm, config, ledger, scheduler, sink)
    finally:
        ledger.close()
    return 0


@dataclass(slots=True)
class WorkerRun:
    """Phase 1 as the parent saw it."""

    pid: int
    #: Finished executions the worker had to report before the kill.
    kill_after: int
    killed: bool
    #: Seconds from the worker's start of the simulation to the kill (or its exit).
    elapsed: float
    #: Finished executions the worker reported on its pipe, in all.
    finished_reported: int
    #: The worker's ledger, read back after its death.
    tally: Tally


def _worker_environment() -> dict[str, str]:
    """The parent's environment with this wfstate first on the path: the worker must
    run the same code, however the parent found it."""
    environment = dict(os.environ)
    root = str(Path(wfstate.__file__).resolve().parent.parent)
    environment["PYTHONPATH"] = os.pathsep.join(
        path for path in (root, environment.get("PYTHONPATH")) if path
    )
    return environment


def _run_worker_until_killed(config: DemoConfig, workdir: str, progress: Progress) -> WorkerRun:
    """Start the worker process, follow its progress and kill it with SIGKILL once
    ``crash_at`` of the executions have finished."""
    assert config.store is not None
    assert config.crash_at is not None
    ledger_path = os.path.join(workdir, LEDGER_NAME)
    kill_after = math.floor(config.crash_at * config.executions)
    command = [
        sys.executable,
        "-m",
        "wfstate.demo",
        "--worker",
        f"--ledger={ledger_path}",
        *config_argv(config),
    ]
    read_fd, write_fd = os.pipe()
    try:
        try:
            process = subprocess.Popen(
                [*command, f"--report-fd={write_fd}"],
                pass_fds=(write_fd,),
                env=_worker_environment(),
                stdin=subprocess.DEVNULL,
            )
        finally:
            # Only the worker holds the write end now: the pipe ends when it does.
            os.close(write_fd)
        try:
            progress.note(
                f"phase 1: worker process {process.pid} runs the executions; it is killed "
                f"with SIGKILL once {kill_after:,} of them have finished"
            )
            started_at: float | None = None
            stopped_at: float | None = None
            finished = 0
            while chunk := os.read(read_fd, 4096):
                if started_at is None and _STARTED in chunk:
                    started_at = time.perf_counter()
                count = chunk.count(_FINISHED)
                finished += count
                if stopped_at is not None:
                    continue  # what the worker reported before the kill landed
                progress.advance(count)
                if started_at is not None and finished >= kill_after:
                    os.kill(process.pid, signal.SIGKILL)
                    stopped_at = time.perf_counter()
            killed = stopped_at is not None
            if stopped_at is None:
                stopped_at = time.perf_counter()
            returncode = process.wait()
        finally:
            if process.poll() is None:  # the parent itself failed: leave no worker behind
                process.kill()
                process.wait()
    finally:
        os.close(read_fd)
    if started_at is None or (not killed and returncode != 0):
        raise SystemExit(
            f"the worker process {process.pid} failed (exit status {returncode}) "
            "before it could be killed; its error is above"
        )
    return WorkerRun(
        pid=process.pid,
        kill_after=kill_after,
        killed=killed,
        elapsed=stopped_at - started_at,
        finished_reported=finished,
        tally=read_ledger(ledger_path),
    )


# -- phase 2: recovery --------------------------------------------------------------


@dataclass(slots=True)
class CrashReport:
    """How phase 1 ended and what the recovery found, with the checks across the crash."""

    worker: WorkerRun
    executions: int
    writer_threads: int
    reopen_seconds: float
    recover_seconds: float
    #: What ``recover()`` returned: execution id -> status.
    recovered: dict[str, ExecutionStatus]
    #: Every execution in the store at the reopen: id -> stored version.
    versions_at_reopen: dict[str, int]
    #: Executions the store held as running or suspended at the reopen.
    unfinished_in_store: set[str]
    finished_in_store: int
    store_updates_at_reopen: int
    #: Acknowledged (execution, version) pairs the store does not hold.
    lost: int
    # Writes the store committed that the worker never logged as acknowledged: the
    # kill landed between the commit and the log line (at most one per thread).
    unacknowledged_creations: int
    unacknowledged_worker_updates: int
    unacknowledged_heartbeats: int
    #: Executions whose final write was committed but not acknowledged.
    unacknowledged_outcomes: dict[str, ExecutionStatus]

    @property
    def acknowledged(self) -> int:
        """Writes the worker logged as acknowledged (creations included)."""
        return self.worker.tally.acknowledged

    @property
    def unacknowledged_updates(self) -> int:
        """Updates (not creations) committed without being acknowledged."""
        return self.unacknowledged_worker_updates + self.unacknowledged_heartbeats

    @property
    def unacknowledged(self) -> int:
        """Every write committed without being acknowledged."""
        return self.unacknowledged_creations + self.unacknowledged_updates

    @property
    def never_started(self) -> int:
        """Orders of which the store holds no execution: phase 2 starts them."""
        return self.executions - len(self.versions_at_reopen)

    def checks(self) -> list[tuple[bool, str]]:
        """The cross-checks that span the crash."""
        logged_in_flight = self.worker.tally.in_flight()
        accounted = set(self.recovered) | set(self.unacknowledged_outcomes)
        return [
            (
                self.lost == 0,
                f"acknowledged before the crash: {self.acknowledged:,} updates, "
                f"found in the store: {self.acknowledged - self.lost:,}, lost: {self.lost:,}",
            ),
            (
                set(self.recovered) == self.unfinished_in_store,
                f"recover() returned every execution the store holds running or suspended "
                f"({len(self.recovered):,})",
            ),
            (
                logged_in_flight <= accounted,
                f"every execution the worker's log shows unfinished ({len(logged_in_flight):,}) "
                "was recovered, or its final write was committed",
            ),
            (
                self.unacknowledged <= self.writer_threads,
                f"writes committed but not acknowledged at the kill: {self.unacknowledged:,} "
                f"(sync writes: at most one per writer thread, {self.writer_threads})",
            ),
        ]


def _examine_crash(
    sm: StateManager,
    config: DemoConfig,
    worker: WorkerRun,
    at_reopen: Sequence[WorkflowState],
    recovered: Sequence[WorkflowState],
    *,
    reopen_seconds: float,
    recover_seconds: float,
) -> CrashReport:
    """Compare the store, as the reopen found it, with the worker's ledger."""
    tally = worker.tally
    stored = {state.execution_id: state for state in at_reopen}
    lost = 0
    for execution_id, versions in tally.versions.items():
        state = stored.get(execution_id)
        highest = 0 if state is None else state.version
        lost += sum(version > highest for version in versions)
    unacknowledged_creations = 0
    unacknowledged_worker_updates = 0
    unacknowledged_heartbeats = 0
    unacknowledged_outcomes: dict[str, ExecutionStatus] = {}
    for state in at_reopen:
        acknowledged = tally.versions.get(state.execution_id, set())
        missing = [v for v in range(1, state.version + 1) if v not in acknowledged]
        if missing and missing[0] == 1:
            unacknowledged_creations += 1
            missing = missing[1:]
        if missing:
            # Who wrote them? The events say (their actor), read back from the store.
            history = sm.get_history(
                state.execution_id, HistoryOptions(after_version=missing[0] - 1)
            )
            actors = {event.version: event.actor for event in history.events}
            for version in missing:
                if actors.get(version) == HEARTBEAT_ACTOR:
                    unacknowledged_heartbeats += 1
                else:
                    unacknowledged_worker_updates += 1
        if state.status in FINAL_STATUSES and state.execution_id not in tally.outcomes:
            unacknowledged_outcomes[state.execution_id] = state.status
    return CrashReport(
        worker=worker,
        executions=config.executions,
        writer_threads=config.threads + config.heartbeat_threads,
        reopen_seconds=reopen_seconds,
        recover_seconds=recover_seconds,
        recovered={state.execution_id: state.status for state in recovered},
        versions_at_reopen={state.execution_id: state.version for state in at_reopen},
        unfinished_in_store={
            state.execution_id for state in at_reopen if state.status in ACTIVE_STATUSES
        },
        finished_in_store=sum(state.status in FINAL_STATUSES for state in at_reopen),
        store_updates_at_reopen=sum(state.version - 1 for state in at_reopen),
        lost=lost,
        unacknowledged_creations=unacknowledged_creations,
        unacknowledged_worker_updates=unacknowledged_worker_updates,
        unacknowledged_heartbeats=unacknowledged_heartbeats,
        unacknowledged_outcomes=unacknowledged_outcomes,
    )


def _run_with_crash(config: DemoConfig, workdir: str, progress: Progress) -> RunReport:
    assert config.store is not None
    with open_manager(config.store, executions=config.executions) as sm:
        _require_empty(sm, config.store)
    worker = _run_worker_until_killed(config, workdir, progress)
    if worker.killed:
        progress.note(
            f"killed worker process {worker.pid} (SIGKILL) after {worker.finished_reported:,} "
            "executions finished; reopening the store to recover"
        )
    else:
        progress.note(f"worker process {worker.pid} finished before the kill point")

    # Phase 2, in this process: the resumed run, on the store the worker left.
    started = time.perf_counter()
    sm = open_manager(config.store, executions=config.executions)
    reopen_seconds = time.perf_counter() - started
    with sm:
        started = time.perf_counter()
        recovered = sm.recover()
        recover_seconds = time.perf_counter() - started
        at_reopen = sm.list_executions(workflow_id=WORKFLOW_ID, limit=config.executions)
        crash = _examine_crash(
            sm,
            config,
            worker,
            at_reopen,
            recovered,
            reopen_seconds=reopen_seconds,
            recover_seconds=recover_seconds,
        )
        progress.set_done(crash.finished_in_store)
        started_orders = {Order.from_variables(state.variables).index for state in at_reopen}
        scheduler = Scheduler(
            indices=[index for index in range(config.executions) if index not in started_orders],
            resume=[s.execution_id for s in recovered if s.status is ExecutionStatus.RUNNING],
            # Their approval was already on its way before the crash.
            waiting=[s.execution_id for s in recovered if s.status is ExecutionStatus.SUSPENDED],
            approval_delay=config.approval_delay,
        )
        ledger = Ledger()
        elapsed = simulate(sm, config, ledger, scheduler, progress)
        progress.close()
        return collect_report(
            sm,
            config,
            tally=Tally.merged(worker.tally, ledger.tally),
            elapsed=worker.elapsed + elapsed,
            crash=crash,
        )


def _run_in_process(config: DemoConfig, progress: Progress) -> RunReport:
    assert config.store is not None
    with open_manager(config.store, executions=config.executions) as sm:
        _require_empty(sm, config.store)
        ledger = Ledger()
        scheduler = Scheduler(
            indices=range(config.executions), approval_delay=config.approval_delay
        )
        elapsed = simulate(sm, config, ledger, scheduler, progress)
        progress.close()
        return collect_report(sm, config, tally=ledger.tally, elapsed=elapsed, crash=None)


def run_demo(config: DemoConfig, *, progress_stream: TextIO | None = None) -> RunReport:
    """Run the simulation (with its crash, unless in memory or ``crash_at`` is None)
    and read the results back from the store."""
    progress = Progress(config.executions, progress_stream or sys.stderr, config.progress)
    # The work directory holds the worker's log and, by default, the store.
    workdir = tempfile.mkdtemp(prefix="wfstate-demo-")
    try:
        if config.store is None:
            config = replace(config, store=f"sqlite:///{Path(workdir) / DEFAULT_DATABASE_NAME}")
            if config.keep_store:
                store_note = f"a new SQLite file, kept with the worker's log in {workdir}"
            else:
                store_note = (
                    "a new SQLite file in a temporary directory, removed at exit "
                    "unless --keep-store"
                )
        elif _is_memory_store(config.store):
            store_note = "in memory: it ends with the process"
        else:
            store_note = "given with --store"
            if config.keep_store:
                store_note += f"; the worker's log is kept in {workdir}"
        assert config.store is not None
        progress.note(f"store {config.store} ({store_note})")
        if config.crash_at is None or _is_memory_store(config.store):
            report = _run_in_process(config, progress)
        else:
            report = _run_with_crash(config, workdir, progress)
    finally:
        if not config.keep_store:
            shutil.rmtree(workdir, ignore_errors=True)
    report.store_note = store_note
    return report


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
    #: The version the execution was at when the worker was killed, if it was recovered.
    crashed_at_version: int | None = None


@dataclass(slots=True)
class RunReport:
    """Everything the summary prints, read back from the store after the run."""

    config: DemoConfig
    elapsed: float
    status_counts: Counter[str]
    outcome_counts: Counter[str]
    suspended: int
    resumed: int
    cancelled_while_suspended: int
    nodes: dict[str, NodeReport]
    error_types: Counter[str]
    error_count_from_summaries: int
    evicted_histories: int
    executions: int
    distinct_orders: int
    tally: Tally
    heartbeat_counters: int
    store_updates: int
    crash: CrashReport | None
    recovered_outcomes: Counter[str]
    timeline: FailedTimeline | None
    #: What the store is, and whether it outlives the run.
    store_note: str = ""

    @property
    def throughput(self) -> float:
        """Updates per second of wall time over the simulation (both phases)."""
        return self.store_updates / self.elapsed if self.elapsed > 0 else 0.0

    def checks(self) -> list[tuple[bool, str]]:
        """Cross-checks of the store against the simulator's own bookkeeping."""
        crash = self.crash
        unacknowledged_creations = 0 if crash is None else crash.unacknowledged_creations
        unacknowledged_updates = 0 if crash is None else crash.unacknowledged_updates
        unacknowledged_heartbeats = 0 if crash is None else crash.unacknowledged_heartbeats
        unacknowledged_outcomes = 0 if crash is None else len(crash.unacknowledged_outcomes)
        tally = self.tally
        error_events = sum(self.error_types.values())
        checks = [] if crash is None else crash.checks()
        checks += [
            (
                self.executions == self.distinct_orders == self.config.executions,
                f"every order ran exactly once: {self.executions:,} executions, "
                f"{self.distinct_orders:,} distinct order ids",
            ),
            (
                self.executions == tally.creations + unacknowledged_creations,
                f"executions in the store = creations acknowledged ({tally.creations:,})"
                + _plus_unacknowledged(crash, unacknowledged_creations),
            ),
            (
                self.store_updates == tally.updates + unacknowledged_updates,
                f"updates in the store = updates acknowledged ({tally.updates:,})"
                + _plus_unacknowledged(crash, unacknowledged_updates),
            ),
            (
                self.heartbeat_counters == tally.heartbeat_writes + unacknowledged_heartbeats,
                f"heartbeat counters in context = heartbeat writes acknowledged "
                f"({tally.heartbeat_writes:,})"
                + _plus_unacknowledged(crash, unacknowledged_heartbeats)
                + ": no lost update",
            ),
            (
                self.status_counts == self.outcome_counts,
                "status counts in the store = outcomes the workers saw"
                + (
                    ""
                    if crash is None
                    else f" (the killed worker's from its log; {unacknowledged_outcomes} "
                    "whose final write it never saw acknowledged, as stored)"
                ),
            ),
            (
                self.evicted_histories == 0 and error_events == self.error_count_from_summaries,
                f"error events = history summaries' error_count ({error_events:,})",
            ),
        ]
        return checks


def _plus_unacknowledged(crash: CrashReport | None, count: int) -> str:
    return "" if crash is None else f" + committed, unacknowledged at the kill ({count:,})"


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
    *,
    tally: Tally,
    elapsed: float,
    crash: CrashReport | None,
) -> RunReport:
    """Read the run back from the store and put the summary's figures together.

    Histories of what the killed worker wrote come from the store (the ring of this
    process never held them); ``get_history`` reads them there by itself.
    """
    # One more than expected, so that a duplicated execution would show.
    states = sm.list_executions(workflow_id=WORKFLOW_ID, limit=config.executions + 1)
    nodes = {spec.node_id: NodeReport() for spec in WORKFLOW}
    error_types: Counter[str] = Counter()
    error_count_from_summaries = 0
    evicted = 0
    suspended = 0
    resumed = 0
    cancelled_while_suspended = 0
    recovered = {} if crash is None else crash.recovered

    for state in states:
        for node_id, node in state.nodes.items():
            report = nodes[node_id]
            report.attempts += node.attempts
            report.started += node.attempts > 0
            report.skipped += node.status is NodeStatus.SKIPPED
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

    outcome_counts = Counter(str(status) for status in tally.outcomes.values())
    if crash is not None:
        outcome_counts.update(str(status) for status in crash.unacknowledged_outcomes.values())

    return RunReport(
        config=config,
        elapsed=elapsed,
        status_counts=Counter(str(state.status) for state in states),
        outcome_counts=outcome_counts,
        suspended=suspended,
        resumed=resumed,
        cancelled_while_suspended=cancelled_while_suspended,
        nodes=nodes,
        error_types=error_types,
        error_count_from_summaries=error_count_from_summaries,
        evicted_histories=evicted,
        executions=len(states),
        distinct_orders=len({state.variables.get("order_id") for state in states}),
        tally=tally,
        heartbeat_counters=sum(int(state.context.get("heartbeats", 0)) for state in states),
        store_updates=sum(state.version - 1 for state in states),
        crash=crash,
        recovered_outcomes=Counter(
            str(state.status) for state in states if state.execution_id in recovered
        ),
        timeline=_failed_timeline(sm, states, crash),
    )


def _failed_timeline(
    sm: StateManager, states: Sequence[WorkflowState], crash: CrashReport | None
) -> FailedTimeline | None:
    """The history of a failed execution: one that spans the crash if any does."""
    failed = [state for state in states if state.status is ExecutionStatus.FAILED]
    if not failed:
        return None
    recovered = {} if crash is None else crash.recovered
    chosen = next((state for state in failed if state.execution_id in recovered), failed[0])
    execution_id = chosen.execution_id
    try:
        events = sm.get_history(execution_id).events
        before = sm.get_state(execution_id, version=chosen.version - 1)
    except HistoryEvictedError:
        return None
    crashed_at = None
    if crash is not None and execution_id in recovered:
        crashed_at = crash.versions_at_reopen[execution_id]
    return FailedTimeline(chosen, events, before, crashed_at)


# -- the summary --------------------------------------------------------------------


def _format_seconds(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.2f} s"


def _rate(count: int, seconds: float) -> str:
    return f"{count / seconds:,.0f}/s" if seconds > 0 else "-"


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
    crashed_at = timeline.crashed_at_version
    lines = [
        f"Timeline of failed execution {state.execution_id} "
        f"(order {state.variables.get('order_id')}, {len(events)} events; offsets are wall time"
        + (", across the crash)" if crashed_at is not None else ")"),
        f"  {'offset':>10}  {'ver':>3}  {'event':<20}  {'node':<8}  {'actor':<9}  data",
    ]
    marked = False
    for event in events:
        if crashed_at is not None and not marked and event.version > crashed_at:
            lines.append(
                f"  {'':>10}  ---  the worker process was killed here (SIGKILL) at version "
                f"{crashed_at}; recover() returned the execution and this process resumed it"
            )
            marked = True
        offset_ms = (event.timestamp - state.created_at).total_seconds() * 1000
        lines.append(
            f"  {f'+{offset_ms:.3f} ms':>10}  {event.version:>3}  {event.type:<20}  "
            f"{event.node_id or '-':<8}  {event.actor or '-':<9}  {_describe_event(event)}"
        )
    failed_nodes = [
        (node_id, node) for node_id, node in state.nodes.items() if node.status is NodeStatus.FAILED
    ]
    for node_id, node in failed_nodes:
        error = node.error or {}
        traceback_text = str((error.get("details") or {}).get("traceback", ""))
        if traceback_text:
            lines.append(
                f"  {node_id} failed after {node.attempts} attempts; recorded traceback ends:"
            )
            lines.extend(f"    {line}" for line in traceback_text.rstrip().splitlines()[-3:])
        else:
            lines.append(
                f"  {node_id} failed after {node.attempts} attempts; recorded error: "
                f"{error.get('type')}: {error.get('message')}"
            )
    before = timeline.before_failure
    if before is not None and before.current_node is not None:
        node = before.nodes[before.current_node]
        lines.append(
            f"  get_state(version={before.version}), just before: status {before.status}, "
            f"{before.current_node} {node.status} (attempt {node.attempts})"
        )
    return lines


def _format_crash(report: RunReport) -> list[str]:
    config = report.config
    crash = report.crash
    lines = ["Crash and recovery"]
    if crash is None:
        assert config.store is not None
        if _is_memory_store(config.store):
            lines.append(
                "  none in this run: a memory:// store lives and dies with its process, so a "
                "crash would leave nothing to recover (the SQLite default shows it)"
            )
        else:
            lines.append("  none in this run (--no-crash)")
        return lines
    worker = crash.worker
    tally = worker.tally
    in_flight = tally.in_flight()
    recovered = Counter(str(status) for status in crash.recovered.values())
    lost_attempts = report.error_types.get(f"{__name__}.{WorkerLostError.__name__}", 0)
    assert config.crash_at is not None
    if worker.killed:
        lines.append(
            f"  phase 1: worker process {worker.pid} (sync durability), killed with SIGKILL "
            f"{worker.elapsed:.2f} s in, once {worker.kill_after:,} executions had finished "
            f"(--crash-at {config.crash_at:.0%})"
        )
    else:
        lines.append(
            f"  phase 1: worker process {worker.pid} finished every execution before "
            f"{worker.kill_after:,} were reported finished: nothing to kill"
        )
    lines += [
        f"    at the kill: {len(tally.outcomes):,} finished, {len(in_flight):,} in flight "
        f"(per its log), {crash.never_started:,} never started",
        f"  acknowledged before the crash: {crash.acknowledged:,} updates, "
        f"found in the store: {crash.acknowledged - crash.lost:,}, lost: {crash.lost:,}",
        "    (creations included; the worker logged each write after update_state,",
        "    create_execution or transact returned"
        + (
            ", and the store holds every one)"
            if crash.lost == 0
            else f": {crash.lost:,} of them are missing from the store)"
        ),
        f"  committed but not yet acknowledged when killed: {crash.unacknowledged:,} "
        f"(creations {crash.unacknowledged_creations}, "
        f"worker updates {crash.unacknowledged_worker_updates}, "
        f"heartbeats {crash.unacknowledged_heartbeats}; "
        f"final writes among them {len(crash.unacknowledged_outcomes)})",
        f"  reopen: StateManager.open {_format_seconds(crash.reopen_seconds)} "
        "(it reloads the unfinished executions), "
        f"recover() {crash.recover_seconds * 1000:.2f} ms -> {len(crash.recovered):,} executions "
        f"({recovered.get('running', 0):,} running, {recovered.get('suspended', 0):,} suspended)",
        f"  phase 2: resumed the {len(crash.recovered):,} from their stored state "
        f"(attempts lost with the worker, recorded as failed: {lost_attempts}), "
        f"then ran the {crash.never_started:,} never started",
        "    the recovered ended: "
        + (
            ", ".join(
                f"{status} {report.recovered_outcomes.get(str(status), 0):,}"
                for status in sorted(FINAL_STATUSES)
            )
        ),
    ]
    return lines


def _format_writes(report: RunReport) -> list[str]:
    config = report.config
    tally = report.tally
    crash = report.crash
    if crash is None:
        return [
            "Writes",
            f"  creations                 {tally.creations:>9,}",
            f"  updates by workers        {tally.worker_updates:>9,}"
            f"   (transact calls retried after a conflict: {tally.worker_transact_retries:,})",
            f"  updates by heartbeats     {tally.heartbeat_writes:>9,}"
            f"   (conflicts retried: {tally.heartbeat_conflicts_retried:,}, "
            f"gave up: {tally.heartbeat_gave_up:,})",
            f"  updates in the store      {report.store_updates:>9,}"
            "   (sum of version - 1 over the executions)",
            f"  throughput measured on this run: {report.store_updates:,} updates in "
            f"{report.elapsed:.2f} s = {report.throughput:,.0f} updates/s",
            f"    (wall time on {config.threads} worker threads, sync writes, the Python "
            "simulator included:",
            "    not a benchmark of the core; see `make bench` and BENCHMARKS.md)",
        ]
    before = crash.worker.tally
    before_elapsed = crash.worker.elapsed
    before_updates = crash.store_updates_at_reopen
    after_elapsed = report.elapsed - before_elapsed
    after_updates = report.store_updates - before_updates

    def row(label: str, total: int, killed: int, note: str = "") -> str:
        return f"  {label:<26}{total:>9,}{killed:>16,}{total - killed:>16,}{note}"

    return [
        f"Writes{'total':>31}{'worker process':>16}{'after recovery':>16}",
        row("creations", tally.creations, before.creations),
        row("updates by workers", tally.worker_updates, before.worker_updates),
        row("updates by heartbeats", tally.heartbeat_writes, before.heartbeat_writes),
        row("committed, unacknowledged", crash.unacknowledged_updates, crash.unacknowledged_updates)
        + "   (updates the kill caught)",
        row("updates in the store", report.store_updates, crash.store_updates_at_reopen)
        + "   (sum of version - 1)",
        f"  transact calls retried after a conflict: {tally.worker_transact_retries:,} by "
        f"workers, {tally.heartbeat_conflicts_retried:,} by heartbeats "
        f"(gave up: {tally.heartbeat_gave_up:,})",
        f"  throughput measured on this run: {report.store_updates:,} updates in "
        f"{report.elapsed:.2f} s = {report.throughput:,.0f} updates/s",
        f"    worker process until killed: {before_updates:,} in {before_elapsed:.2f} s = "
        f"{_rate(before_updates, before_elapsed)}"
        f"; after recovery: {after_updates:,} in {after_elapsed:.2f} s = "
        f"{_rate(after_updates, after_elapsed)}",
        f"    (wall time on {config.threads} worker threads, sync writes, the Python simulator "
        "included:",
        "    not a benchmark of the core; see `make bench` and BENCHMARKS.md)",
    ]


def format_report(report: RunReport) -> str:
    """The summary printed at the end of a run."""
    config = report.config
    total = sum(report.status_counts.values())
    path = " -> ".join(
        spec.node_id + ("?" if spec.skip_when is not None else "") for spec in WORKFLOW
    )
    lines = [
        f"wfstate demo: {config.executions:,} executions of {WORKFLOW_ID!r} ({path})",
        f"  store {config.store} ({report.store_note}), sync durability",
        f"  {config.threads} worker threads, {config.heartbeat_threads} heartbeat threads, "
        f"seed {config.seed}, failure rate {config.failure_rate:.0%} "
        f"({config.retry_failure_rate:.0%} on a retry), at most {config.max_attempts} attempts",
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
    lines += [f"  {'total':<{width}}  {sum(report.error_types.values()):>6,}", ""]
    lines += _format_crash(report)
    lines.append("")
    lines += _format_writes(report)
    lines += ["", "Checks"]
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


def _crash_fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1)")
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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows the defaults, except the ones a flag or the help text already says."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(
        prog="python -m wfstate.demo",
        description="Simulate workflow executions through wfstate, crash the worker "
        "part-way, recover, and summarise.",
        formatter_class=_HelpFormatter,
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
        help="chance that an order waits for a manual approval",
    )
    parser.add_argument(
        "--cancel-rate",
        type=_fraction,
        default=defaults.cancel_rate,
        help="chance that an operator cancels an execution",
    )
    parser.add_argument(
        "--approval-delay",
        type=_non_negative_int,
        default=defaults.approval_delay,
        help="executions that finish while an order waits for its approval (suspended)",
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
        help="the store's URL, for StateManager.open (default: sqlite:///<a new temporary "
        f"directory>/{DEFAULT_DATABASE_NAME}); it must hold no executions",
    )
    parser.add_argument(
        "--keep-store",
        action="store_true",
        help="keep the work directory: the worker's log, and the default store",
    )
    crash = parser.add_mutually_exclusive_group()
    crash.add_argument(
        "--crash-at",
        type=_crash_fraction,
        default=defaults.crash_at,
        help="kill the worker process (SIGKILL) once this share of the executions has "
        "finished, then recover; ignored on memory://",
    )
    crash.add_argument(
        "--no-crash",
        dest="crash_at",
        action="store_const",
        const=None,
        help="run in one process, without the crash",
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
    # The worker process's own options (phase 1), given by the parent.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ledger", help=argparse.SUPPRESS)
    parser.add_argument("--report-fd", type=int, help=argparse.SUPPRESS)
    return parser


def _config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> DemoConfig:
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
        approval_delay=args.approval_delay,
        heartbeat_threads=args.heartbeat_threads,
        heartbeat_interval=args.heartbeat_ms / 1000,
        store=args.store,
        keep_store=args.keep_store,
        crash_at=args.crash_at,
        progress=args.progress,
        timeline=args.timeline,
    )


def parse_args(argv: Sequence[str] | None = None) -> DemoConfig:
    """The ``DemoConfig`` of a command line."""
    parser = _parser()
    return _config(parser, parser.parse_args(argv))


def config_argv(config: DemoConfig) -> list[str]:
    """The command line of ``config`` (``parse_args`` gives it back): what the worker
    process is started with, so that it simulates exactly what the parent would."""
    argv = [
        f"--executions={config.executions}",
        f"--seed={config.seed}",
        f"--threads={config.threads}",
        f"--failure-rate={config.failure_rate!r}",
        f"--retry-failure-rate={config.retry_failure_rate!r}",
        f"--max-attempts={config.max_attempts}",
        f"--skip-rate={config.skip_rate!r}",
        f"--suspend-rate={config.suspend_rate!r}",
        f"--cancel-rate={config.cancel_rate!r}",
        f"--approval-delay={config.approval_delay}",
        f"--heartbeat-threads={config.heartbeat_threads}",
        f"--heartbeat-ms={config.heartbeat_interval * 1000!r}",
        f"--progress={config.progress}",
    ]
    if config.store is not None:
        argv.append(f"--store={config.store}")
    if config.keep_store:
        argv.append("--keep-store")
    argv.append("--no-crash" if config.crash_at is None else f"--crash-at={config.crash_at!r}")
    if not config.timeline:
        argv.append("--no-timeline")
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; print the summary. Exit status 1 when a cross-check failed."""
    parser = _parser()
    args = parser.parse_args(argv)
    config = _config(parser, args)
    if args.worker:
        if args.ledger is None or args.report_fd is None:
            parser.error("--worker needs --ledger and --report-fd")
        return _run_worker(config, args.ledger, args.report_fd)
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
