"""The machinery between the Rust core and a durable store.

- ``SnapshotPolicy`` says which versions carry a snapshot; the core's
  ``SnapshotTracker`` (``snapshot_tracker``) keeps the count and decides.
- ``GroupCommitter`` is the sync write path: callers hand it their version records
  and block; whoever arrives while no write is in flight leads, writing every
  record queued so far in one transaction (one disk flush for many callers), then
  hands the lead to the next waiter. Each caller gets its own outcome. A store
  that groups its callers itself (``Store.groups_writes``: SQLite's native writer
  does it in Rust, its callers waiting without the GIL) is called directly.
- ``Flusher`` is the async write-behind path: a thread that reads whole versions
  from a durable ring cursor, writes them in batches and only then commits the
  cursor, so an event never leaves the ring before it is stored. It retries with
  backoff while the store is away and reports its lag.

Nothing here holds a lock while calling into the store, except the flusher's own
thread, which is the only one touching its cursor.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Final, Required, TypedDict

from wfstate import _core
from wfstate._core import RecordBatch, SnapshotTracker
from wfstate.errors import (
    ClosedError,
    ConflictError,
    NotFoundError,
    StoreUnavailableError,
    ValidationError,
    WfstateError,
)
from wfstate.store.base import Store, WriteItem

__all__ = [
    "CRITICAL_CHOICES",
    "DEFAULT_CRITICAL",
    "Flusher",
    "GroupCommitter",
    "ManagerStats",
    "SnapshotPolicy",
    "SnapshotTracker",
    "critical_mask",
    "snapshot_tracker",
]

#: What may make an update critical (written synchronously even in async mode).
CRITICAL_CHOICES: Final = frozenset({"status", "node_failed", "error", "nodes", "all"})
#: The default: execution status changes and node failures.
DEFAULT_CRITICAL: Final = ("status", "node_failed")
#: How long a fused write-behind step may go on through full batches (at most the
#: flush interval): ``flush()`` waiters hear of those batches when the step ends.
_KEEP_GOING: Final = 0.05


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotPolicy:
    """When a version is stored with a whole-state snapshot (bounding replay).

    A snapshot is written when any rule fires: ``every_versions`` versions since
    the last one; the deltas since the last one outweigh one snapshot
    (``when_deltas_outweigh``; before the first snapshot the creation's delta
    stands for its size); and at every final status (``at_final_status``).

    The write-behind (async mode) applies the rules once per execution and batch,
    at the execution's last version in the batch: replay is then bounded by the
    rule plus the versions of one batch.
    """

    every_versions: int | None = 100
    when_deltas_outweigh: bool = True
    at_final_status: bool = True

    def __post_init__(self) -> None:
        for name in ("when_deltas_outweigh", "at_final_status"):
            if not isinstance(getattr(self, name), bool):
                raise ValidationError(f"{name} must be a bool, not {getattr(self, name)!r}")
        if self.every_versions is not None and (
            not isinstance(self.every_versions, int) or self.every_versions < 1
        ):
            raise ValidationError(
                f"every_versions must be a positive int or None, not {self.every_versions!r}"
            )


def snapshot_tracker(policy: SnapshotPolicy) -> SnapshotTracker:
    """The core's ``SnapshotTracker`` applying ``policy`` (the bookkeeping is in Rust:
    the sync path asks it once per update)."""
    return SnapshotTracker(
        every_versions=policy.every_versions,
        when_deltas_outweigh=policy.when_deltas_outweigh,
        at_final_status=policy.at_final_status,
    )


class _Pending:
    __slots__ = ("error", "finished", "items", "outcomes", "wake")

    def __init__(self, items: Sequence[WriteItem]) -> None:
        self.items = items
        self.outcomes: list[WfstateError | None] = []
        self.error: BaseException | None = None
        self.finished = False
        # Only a caller that has to wait gets a (locked) lock to block on: a bare lock
        # is several times cheaper to make and to signal than a threading.Event.
        self.wake: threading.Lock | None = None

    def signal(self) -> None:
        if self.wake is not None:
            self.wake.release()


def _wait_through(wake: threading.Lock) -> BaseException | None:
    """Block until ``wake`` is released, through exceptions that signal handlers raise
    meanwhile (KeyboardInterrupt in the main thread); return the first of them.

    A group-commit caller cannot give up its wait halfway: the lead may be handed to
    it, and without a leader every later caller would wait forever.
    """
    interrupted: BaseException | None = None
    while True:
        try:
            wake.acquire()
        except BaseException as error:  # re-raised by the caller, once its part is done
            if interrupted is None:
                interrupted = error
        else:
            return interrupted


def _for_waiter(error: BaseException, store: Store) -> BaseException:
    """What a waiter gets when the leader's write of its items failed with ``error``.

    An ``Exception`` is the write's outcome, shared. An interruption of the leader's
    own thread (KeyboardInterrupt, SystemExit) is not the waiter's: it gets
    ``StoreUnavailableError``, the outcome unknown (as after a lost reply: memory
    stays behind, and the next write of the execution catches up if it was stored).
    """
    if isinstance(error, Exception):
        return error
    return StoreUnavailableError(
        f"the write carrying this update was interrupted in another thread ({error!r}); "
        f"whether {store.url} stored it is unknown",
        target=store.url,
    )


class GroupCommitter:
    """Sync writes of many threads, committed together (see the module docs)."""

    __slots__ = (
        "_batches",
        "_busy",
        "_direct",
        "_lock",
        "_max_batch",
        "_queue",
        "_store",
        "_writes",
    )

    def __init__(self, store: Store, *, max_batch: int) -> None:
        self._store = store
        # A store that groups its callers itself (SQLite's native writer, where they
        # wait without the GIL) is called directly.
        self._direct = store.groups_writes
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._queue: list[_Pending] = []
        self._busy = False
        self._batches = 0
        self._writes = 0

    def commit(self, items: Sequence[WriteItem]) -> list[WfstateError | None]:
        """Write ``items`` (all of one caller) durably; one outcome per item.

        Raises ``StoreUnavailableError`` when the transaction carrying them failed.
        """
        if self._direct:
            return self._store.write(items)
        with self._lock:
            alone = not self._busy
            if alone:
                self._busy = True
        if alone:
            # Nobody writing: write at once, without queueing (the sync path of one
            # thread), then hand the lead to whoever queued meanwhile.
            try:
                outcomes = self._store.write(items)
                self._batches += 1
                self._writes += len(items)
                return outcomes
            finally:
                self._release_lead()
        pending = _Pending(items)
        with self._lock:
            self._queue.append(pending)
            lead = not self._busy
            if lead:
                self._busy = True
            else:
                pending.wake = threading.Lock()
                pending.wake.acquire()
        interrupted: BaseException | None = None
        if not lead:
            assert pending.wake is not None
            # Released once: when our items are written, or to hand us the lead (then
            # our items head the queue).
            interrupted = _wait_through(pending.wake)
        if not pending.finished:
            self._lead(pending)
        if interrupted is not None:
            # Raised once this caller's part is done; its items may be stored (as
            # after a lost reply: the next write of the execution catches up).
            raise interrupted
        if pending.error is not None:
            raise pending.error
        return pending.outcomes

    def _lead(self, own: _Pending) -> None:
        batch: list[_Pending] = []
        try:
            with self._lock:
                size = 0
                while self._queue and (
                    not batch or size + len(self._queue[0].items) <= self._max_batch
                ):
                    taken = self._queue.pop(0)
                    batch.append(taken)
                    size += len(taken.items)
            items = [item for pending in batch for item in pending.items]
            try:
                outcomes = self._store.write(items)
            except BaseException as error:  # every waiter must learn the outcome
                for pending in batch:
                    pending.error = error if pending is own else _for_waiter(error, self._store)
            else:
                position = 0
                for pending in batch:
                    pending.outcomes = outcomes[position : position + len(pending.items)]
                    position += len(pending.items)
            self._batches += 1
            self._writes += len(items)
        finally:
            for pending in batch:
                pending.finished = True
                pending.signal()
            self._release_lead()

    def _release_lead(self) -> None:
        """Hand the lead to the first queued caller, or become idle."""
        with self._lock:
            if self._queue:
                self._queue[0].signal()
            else:
                self._busy = False

    def stats(self) -> tuple[int, int]:
        """(transactions written, versions they carried)."""
        if self._direct:
            return self._store.write_stats()
        return self._batches, self._writes


class ManagerStats(TypedDict, total=False):
    """What ``StateManager.stats()`` reports.

    Always: ``executions`` (held in memory), ``ring_events``, ``ring_capacity``,
    ``first_seq`` and ``next_seq`` (the sequence numbers the ring spans),
    ``cursors`` and ``durable_cursors``. With a store: ``store`` (its URL),
    ``durability``, ``group_commits`` and ``group_committed_versions`` (sync writes
    and the transactions that carried them). In async mode: ``pending_events`` (the
    write-behind lag), ``flush_batches``, ``flushed_versions``, ``flush_retries``,
    ``store_failing_for`` (seconds the store has been failing, or None),
    ``last_store_error``, ``refused_versions`` (write-behind versions the store refused
    because another writer changed the execution: lost, and the execution reset to the
    stored state) and ``last_refusal``.

    Always, about optimistic concurrency and leases: ``conflicts`` (version conflicts
    met by ``transact`` and by plain updates that another writer got ahead of),
    ``conflicts_resolved`` (those whose call then succeeded, by a retry or a merge),
    ``merges`` (plain updates re-based onto newer versions), ``transact_retries``
    and ``leases_lost`` (writes and renewals refused with ``LeaseLostError``).
    """

    executions: Required[int]
    ring_events: Required[int]
    ring_capacity: Required[int]
    first_seq: Required[int]
    next_seq: Required[int]
    cursors: Required[int]
    durable_cursors: Required[int]
    store: str
    durability: str
    group_commits: int
    group_committed_versions: int
    pending_events: int
    flush_batches: int
    flushed_versions: int
    flush_retries: int
    store_failing_for: float | None
    last_store_error: str | None
    refused_versions: int
    last_refusal: str | None
    conflicts: int
    conflicts_resolved: int
    merges: int
    transact_retries: int
    leases_lost: int


class Flusher:
    """The async write-behind thread (see the module docs)."""

    def __init__(
        self,
        core: _core.Core,
        store: Store,
        tracker: SnapshotTracker,
        *,
        flush_interval: float,
        max_batch: int,
        max_backoff: float = 5.0,
    ) -> None:
        self._core = core
        self._store = store
        self._tracker = tracker
        self._flush_interval = flush_interval
        self._max_batch = max_batch
        self._max_backoff = max_backoff
        self._cursor = core.open_cursor(durable=True)
        self._cond = threading.Condition()
        self._hurry = threading.Event()
        self._stopping = False
        self._committed = self._cursor.committed
        self._last_error: str | None = None
        self._failing_since: float | None = None
        self._retries = 0
        self._batches = 0
        self._versions = 0
        # Refused write-behind versions: reported by the next flush(), counted in stats.
        self._refusals: list[WfstateError] = []
        self._refused_versions = 0
        self._last_refusal: str | None = None
        # execution id -> the ring seq from which its events follow the stored state.
        self._reset_at: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, name="wfstate-flusher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._loop()
        except ClosedError:
            return  # stop() closed the cursor: whatever was pending is drained
        except BaseException as error:  # flush() and stats() report a dead flusher
            with self._cond:
                self._last_error = f"the flusher stopped: {error!r}"
                self._cond.notify_all()
            raise

    def _loop(self) -> None:
        batch: RecordBatch | None = None
        chains: list[tuple[str, int, int, str, int, int, int]] = []
        snapshot: list[bool] = []
        backoff = 0.0
        while True:
            written: tuple[dict[str, WfstateError], list[int]] | None = None
            failure: StoreUnavailableError | None = None
            if batch is None:
                if self._stopping and self._caught_up():
                    return
                pending = self._store.write_pending(
                    self._cursor,
                    self._tracker,
                    self._max_batch,
                    self._flush_interval,
                    self._reset_at,
                    min(self._flush_interval, _KEEP_GOING),
                )
                if pending is None:  # the store has no fused step: read, decide, write
                    read = self._cursor.read_batch(
                        self._max_batch, timeout=self._flush_interval, skip_before=self._reset_at
                    )
                    # Decided once per batch: a retry after a store failure sends the same.
                    chains = read.chains()
                    snapshot = [self._tracker.decide_chain(*chain[:6]) for chain in chains]
                else:
                    read, chains, snapshot = pending.batch, pending.chains, pending.snapshot
                    written, failure = pending.written, pending.error
                    self._stored_earlier(*pending.earlier)
                self._refused_versions += read.dropped
                if not len(read):
                    self._mark_committed()
                    continue
                batch = read
            if written is None and failure is None:
                try:
                    written = self._store.write_batch(batch, snapshot)
                except StoreUnavailableError as error:
                    failure = error
            if failure is not None:
                if self._stopping:
                    return  # close() gave up waiting: what is pending dies with the process
                backoff = self._failed(failure, backoff)
                continue
            assert written is not None  # a step with neither failed (batch not empty)
            refusals, sizes = written
            backoff = 0.0
            for chain, size in zip(chains, sizes, strict=True):
                if size:
                    self._tracker.snapshotted(chain[0], size)
            self._batches += 1
            self._versions += sum(chain[6] for chain in chains if chain[0] not in refusals)
            # Full: the read stopped at max_batch events (its versions may be fewer:
            # versions of several events, or stored by the sync path already).
            full = self._cursor.position - self._committed >= self._max_batch
            batch = None
            with self._cond:
                self._last_error = None
                self._failing_since = None
            if refusals:
                self._reconcile(
                    [
                        (chain[0], chain[1] + 1, chain[2])
                        for chain in chains
                        if chain[0] in refusals
                    ],
                    refusals,
                )
            self._mark_committed()
            if not full and not self._stopping:
                # Let a batch build up, unless someone waits for durability.
                self._hurry.wait(self._flush_interval)
                self._hurry.clear()

    def _stored_earlier(self, batches: int, versions: int, dropped: int) -> None:
        """Count the full batches a fused step stored whole (and took off the cursor)
        before the batch it returned, and tell ``flush()`` waiters."""
        self._batches += batches
        self._versions += versions
        self._refused_versions += dropped
        committed = self._cursor.committed
        if committed == self._committed:
            return
        with self._cond:
            self._committed = committed
            if batches:
                self._last_error = None
                self._failing_since = None
            self._cond.notify_all()

    def _failed(self, error: StoreUnavailableError, backoff: float) -> float:
        """Count a failed store call and wait a jittered, growing while."""
        self._retries += 1
        with self._cond:
            self._last_error = str(error)
            if self._failing_since is None:
                self._failing_since = time.monotonic()
            self._cond.notify_all()
        backoff = min(self._max_backoff, max(0.01, backoff * 2))
        self._hurry.wait(random.uniform(backoff / 2, backoff))
        self._hurry.clear()
        return backoff

    def _reconcile(
        self, refused: list[tuple[str, int, int]], refusals: dict[str, WfstateError]
    ) -> None:
        """The store refused these chains, as (execution, first version, last version):
        another writer changed the execution, or it cannot hold the data. Reset memory
        to what the store holds, so that later writes build on the stored version, and
        report the loss at the next flush()."""
        backoff = 0.0
        for execution_id, first, last in refused:
            while True:
                try:
                    loaded = self._store.load(execution_id)
                    break
                except StoreUnavailableError as error:
                    if self._stopping:
                        return
                    backoff = self._failed(error, backoff)
            self._refused_versions += last - first + 1
            if loaded is not None:
                stored = _core.rebuild(execution_id, loaded.snapshot, loaded.deltas)
                with contextlib.suppress(NotFoundError):
                    self._reset_at[execution_id] = self._core.replace(stored)
                self._tracker.seed(loaded)
            refusal = refusals[execution_id]
            message = (
                f"the store refused write-behind versions {first}..{last} of execution "
                f"{execution_id!r} ({refusal}); they are lost, and the execution was reset "
                "to the stored state"
            )
            report: WfstateError
            if isinstance(refusal, ConflictError):
                report = ConflictError(execution_id, refusal.expected, refusal.actual)
                report.args = (message,)
            else:
                report = StoreUnavailableError(message, target=self._store.url)
            with self._cond:
                self._last_refusal = message
                self._refusals.append(report)

    def _caught_up(self) -> bool:
        return self._cursor.position >= self._core.stats()["next_seq"]

    def _mark_committed(self) -> None:
        self._cursor.commit()
        with self._cond:
            self._committed = self._cursor.committed
            self._cond.notify_all()

    def flush(self, timeout: float | None, *, report: bool = True) -> None:
        """Block until every event recorded before the call is stored.

        With ``report``, then raise the first refusal since the last report (the
        store refused versions the write-behind held; see ``_reconcile``).
        """
        self._barrier(timeout)
        if report:
            with self._cond:
                refusals, self._refusals = self._refusals, []
            if refusals:
                raise refusals[0]

    def _barrier(self, timeout: float | None) -> None:
        target = self._core.stats()["next_seq"]
        deadline = None if timeout is None else time.monotonic() + timeout
        self._hurry.set()
        with self._cond:
            while self._committed < target:
                if not self._thread.is_alive():
                    raise StoreUnavailableError(
                        "the write-behind flusher has stopped", target=self._store.url
                    )
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    detail = f": {self._last_error}" if self._last_error else ""
                    raise StoreUnavailableError(
                        f"updates are not yet durable after {timeout}s "
                        f"({target - self._committed} events pending){detail}",
                        target=self._store.url,
                    )
                self._cond.wait(0.05 if remaining is None else min(remaining, 0.05))
                self._hurry.set()

    def stop(self, timeout: float | None) -> None:
        """Drain what is pending (waiting at most ``timeout``), then stop the thread."""
        try:
            self.flush(timeout)
        finally:
            self._stopping = True
            self._hurry.set()
            # Closing the cursor wakes the thread if it waits for events.
            self._cursor.close()
            self._thread.join(timeout=None if timeout is None else max(timeout, 0.1))

    def report(self, stats: ManagerStats) -> None:
        """Add the write-behind's figures to ``stats``."""
        next_seq = self._core.stats()["next_seq"]
        with self._cond:
            stats["pending_events"] = max(0, next_seq - self._committed)
            stats["flush_batches"] = self._batches
            stats["flushed_versions"] = self._versions
            stats["flush_retries"] = self._retries
            stats["store_failing_for"] = (
                None if self._failing_since is None else time.monotonic() - self._failing_since
            )
            stats["last_store_error"] = self._last_error
            stats["refused_versions"] = self._refused_versions
            stats["last_refusal"] = self._last_refusal


def check_critical(critical: Collection[str]) -> frozenset[str]:
    chosen = frozenset(critical)
    unknown = chosen - CRITICAL_CHOICES
    if unknown:
        raise ValidationError(
            f"unknown critical change(s) {sorted(unknown)} (choose from {sorted(CRITICAL_CHOICES)})"
        )
    return chosen


_CRITICAL_BITS: Final = {
    "status": _core.CRITICAL_STATUS,
    "node_failed": _core.CRITICAL_NODE_FAILED,
    "error": _core.CRITICAL_ERROR,
    "nodes": _core.CRITICAL_NODES,
    "all": _core.CRITICAL_ALL,
}


def critical_mask(critical: frozenset[str]) -> int:
    """``critical`` (checked by ``check_critical``) as ``Core.apply_unless`` takes it."""
    mask = 0
    for name in critical:
        mask |= _CRITICAL_BITS[name]
    return mask
