"""The StateManager: the public entry point of wfstate.

In memory (``StateManager()``) every state change is one call into Rust, which checks
the version, validates, applies, bumps the version and records the events
atomically. With a durable store (``StateManager.open(url)``) a change is two-phase:
the core *prepares* it (nothing visible), the store *commits* it (the store checks
the version too), then the core *publishes* it — so in sync mode memory is never
ahead of the store. In async mode the core applies at once and a write-behind thread
stores the events in batches.

This module adapts arguments, routes each call to the right path and implements the
retry loops. It never holds a lock across a store call except the per-execution
write lock that keeps one execution's prepare/commit/publish in order.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Literal, Self

from wfstate import _core
from wfstate._core import EventCursor, PreparedUpdate, WorkflowState
from wfstate._durable import (
    DEFAULT_CRITICAL,
    Flusher,
    GroupCommitter,
    ManagerStats,
    SnapshotPolicy,
    SnapshotTracker,
    check_critical,
)
from wfstate._model import (
    ExecutionHistory,
    ExecutionStatus,
    HistoryOptions,
    HistorySummary,
    StateUpdate,
)
from wfstate.config import database_url
from wfstate.errors import (
    AlreadyExistsError,
    ConflictError,
    HistoryEvictedError,
    NotFoundError,
    ValidationError,
)
from wfstate.store import Store, open_store

__all__ = ["Durability", "ManagerStats", "SnapshotPolicy", "StateManager", "UpdateFn"]

#: What ``transact`` calls: it gets the current state and returns the update to
#: apply to exactly that version, or ``None`` to write nothing.
UpdateFn = Callable[[WorkflowState], "StateUpdate | Mapping[str, Any] | None"]

Durability = Literal["sync", "async"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_STRIPES = 1024
# How often a plain update_state (no expected_version) re-bases itself on a newer
# stored version written by another process before giving up.
_REBASE_ATTEMPTS = 20


def _to_micros(moment: datetime, name: str) -> int:
    if not isinstance(moment, datetime):
        raise ValidationError(f"{name} must be a datetime, not {type(moment).__name__}")
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValidationError(f"{name} must be timezone-aware (use datetime.now(UTC))")
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _positive(value: object, name: str, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(f"{name} must be a number, not {value!r}")
    if value < 0 or (value == 0 and not allow_zero) or value != value:
        raise ValidationError(f"{name} must be positive, not {value!r}")
    return float(value)


class StateManager:
    """A concurrent, versioned home for the state and history of workflow executions.

    ``StateManager()`` keeps everything in memory; ``StateManager.open(url)`` adds a
    durable store (SQLite by default, PostgreSQL, or ``memory://``). Every method is
    thread-safe. States and events it returns are immutable (their dict fields are
    fresh copies), so nothing a caller does to them changes the store.

    ``ring_capacity`` bounds the in-memory event history (in events). When a durable
    reader (``open_cursor(durable=True)``, or the async write-behind) has not taken
    the oldest events yet and the ring is full, ``on_ring_full="block"`` waits up to
    ``ring_full_timeout`` seconds for room and ``on_ring_full="error"`` fails at once;
    both raise ``BackpressureError`` without applying the update.
    ``max_update_bytes`` bounds the JSON payload of one update or creation.

    Example::

        with StateManager() as sm:
            state = sm.create_execution("order-42", workflow_id="checkout")
            sm.update_state("order-42", {"nodes": {"charge": "running"}})
    """

    __slots__ = (
        "_closed_lock",
        "_committer",
        "_core",
        "_critical",
        "_durability",
        "_flusher",
        "_recovered",
        "_store",
        "_stripes",
        "_tracker",
    )

    def __init__(
        self,
        *,
        ring_capacity: int = 100_000,
        on_ring_full: Literal["block", "error"] = "block",
        ring_full_timeout: float = 5.0,
        max_update_bytes: int = 1_048_576,
    ) -> None:
        if on_ring_full not in ("block", "error"):
            raise ValidationError(f"on_ring_full must be 'block' or 'error', not {on_ring_full!r}")
        self._core = _core.Core(
            ring_capacity=ring_capacity,
            block_on_full=on_ring_full == "block",
            ring_full_timeout=ring_full_timeout,
            max_update_bytes=max_update_bytes,
        )
        self._store: Store | None = None
        self._durability: Durability = "sync"
        self._committer: GroupCommitter | None = None
        self._flusher: Flusher | None = None
        self._tracker: SnapshotTracker | None = None
        self._critical: frozenset[str] = frozenset()
        self._recovered: list[str] = []
        self._stripes: list[threading.Lock] = []
        self._closed_lock = threading.Lock()

    @classmethod
    def open(
        cls,
        url: str | None = None,
        *,
        durability: Durability = "sync",
        connect_timeout: float = 5.0,
        flush_interval: float = 0.05,
        max_batch: int = 1000,
        critical: Collection[str] = DEFAULT_CRITICAL,
        snapshot_policy: SnapshotPolicy | None = None,
        ring_capacity: int = 100_000,
        on_ring_full: Literal["block", "error"] = "block",
        ring_full_timeout: float = 5.0,
        max_update_bytes: int = 1_048_576,
    ) -> StateManager:
        """Open a durable manager on the store at ``url``, recovering what it holds.

        ``url`` is ``sqlite:///path.db`` (the embedded default), ``postgresql://...``
        or ``memory://``; when None, ``$WFSTATE_DATABASE_URL``, else
        ``sqlite:///wfstate.db``. A malformed URL raises ``ValidationError``; a store
        that cannot be reached within ``connect_timeout`` seconds raises
        ``StoreUnavailableError`` naming it. Migrations are applied on open.

        ``durability="sync"``: an update returns once it is committed; concurrent
        callers share transactions (group commit). ``durability="async"``: updates
        apply in memory at once and a background flusher stores them in batches of
        up to ``max_batch`` versions, at least every ``flush_interval`` seconds; a
        crash loses at most what was applied in the last ``flush_interval`` plus
        one batch write. ``flush()`` waits for durability; ``close()`` drains.
        Updates matching ``critical`` ("status", "node_failed", "error", "nodes",
        "all") are written synchronously even in async mode.

        Executions that were running or suspended are reloaded (snapshot + deltas);
        ``recover()`` returns them.
        """
        if durability not in ("sync", "async"):
            raise ValidationError(f"durability must be 'sync' or 'async', not {durability!r}")
        _positive(connect_timeout, "connect_timeout")
        _positive(flush_interval, "flush_interval", allow_zero=True)
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValidationError(f"max_batch must be a positive int, not {max_batch!r}")
        critical_set = check_critical(critical)
        if snapshot_policy is None:
            snapshot_policy = SnapshotPolicy()
        manager = cls(
            ring_capacity=ring_capacity,
            on_ring_full=on_ring_full,
            ring_full_timeout=ring_full_timeout,
            max_update_bytes=max_update_bytes,
        )
        store = open_store(database_url(url), connect_timeout=connect_timeout)
        try:
            manager._attach(
                store,
                durability=durability,
                flush_interval=flush_interval,
                max_batch=max_batch,
                critical=critical_set,
                snapshot_policy=snapshot_policy,
            )
        except BaseException:
            store.close()
            manager._core.close()
            raise
        return manager

    def _attach(
        self,
        store: Store,
        *,
        durability: Durability,
        flush_interval: float,
        max_batch: int,
        critical: frozenset[str],
        snapshot_policy: SnapshotPolicy,
    ) -> None:
        self._store = store
        self._durability = durability
        self._critical = critical
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        self._tracker = SnapshotTracker(snapshot_policy)
        self._committer = GroupCommitter(store, max_batch=max_batch)
        for execution_id in store.active_execution_ids():
            if self._load(execution_id) is not None:
                self._recovered.append(execution_id)
        if durability == "async":
            self._flusher = Flusher(
                self._core,
                store,
                self._tracker,
                flush_interval=flush_interval,
                max_batch=max_batch,
            )

    # -- lifecycle ---------------------------------------------------------------

    def close(self, *, timeout: float | None = 30.0) -> None:
        """Close the manager; later calls raise ``ClosedError``. Idempotent.

        In async mode it first drains the write-behind (waiting at most ``timeout``
        seconds; ``StoreUnavailableError`` if the store stays away that long —
        what is not stored by then is lost with the process).
        """
        with self._closed_lock:
            if self._core.closed:
                return
            try:
                if self._flusher is not None:
                    self._flusher.stop(timeout)
            finally:
                self._core.close()
                if self._store is not None:
                    self._store.close()

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._core.closed

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def durability(self) -> Durability | None:
        """``"sync"`` or ``"async"`` with a store; None in memory."""
        return None if self._store is None else self._durability

    @property
    def store_url(self) -> str | None:
        """The store's URL (password hidden), or None in memory."""
        return None if self._store is None else self._store.url

    def flush(self, *, timeout: float | None = 30.0) -> None:
        """Wait until every update applied so far is durable (async mode).

        A no-op in memory and in sync mode. Raises ``StoreUnavailableError`` if the
        store does not take them within ``timeout`` seconds, and ``ConflictError``
        when, since the last ``flush()``, the store refused versions the write-behind
        held (another writer had changed that execution): those versions are lost and
        the execution was reset to the stored state (``stats()["refused_versions"]``).
        """
        if self._flusher is not None:
            self._flusher.flush(timeout)

    def _settle(self) -> None:
        """Before reading the store in async mode: let the write-behind catch up (a
        refusal is reported by the caller's next ``flush()``, not by a read)."""
        if self._flusher is not None:
            self._flusher.flush(timeout=30.0, report=False)

    def recover(self) -> list[WorkflowState]:
        """The executions that were running or suspended when the store was opened.

        Each is returned as it is now (its last durable state, unless updated since),
        so the engine can resume it. Executions that have since finished are left out.
        """
        states = []
        for execution_id in self._recovered:
            state = self.get_state(execution_id)
            if state.status in (ExecutionStatus.RUNNING, ExecutionStatus.SUSPENDED):
                states.append(state)
        return states

    # -- the durable write path --------------------------------------------------

    def _stripe(self, execution_id: str) -> threading.Lock:
        return self._stripes[hash(execution_id) % _STRIPES]

    def _load(self, execution_id: str, version: int | None = None) -> WorkflowState | None:
        """Rebuild a stored execution (at ``version``: not installed; else installed)."""
        assert self._store is not None
        loaded = self._store.load(execution_id, version=version)
        if loaded is None:
            return None
        state = _core.rebuild(execution_id, loaded.snapshot, loaded.deltas)
        if version is not None:
            return state
        assert self._tracker is not None
        installed = self._core.install(state)
        if installed.version == state.version:
            self._tracker.seed(loaded)
        return installed

    def _refresh(self, execution_id: str) -> None:
        """Move memory forward to the stored state (another writer got there first)."""
        assert self._store is not None
        assert self._tracker is not None
        loaded = self._store.load(execution_id)
        if loaded is None:
            return
        state = _core.rebuild(execution_id, loaded.snapshot, loaded.deltas)
        try:
            self._core.refresh(state)
        except NotFoundError:
            self._core.install(state)
        self._tracker.seed(loaded)

    def _commit(self, prepared: Sequence[PreparedUpdate]) -> None:
        """Store prepared versions synchronously, then publish them, in order."""
        assert self._committer is not None
        assert self._tracker is not None
        items = [self._tracker.decide(p.record()) for p in prepared]
        outcomes = self._committer.commit(items)
        for outcome, one in zip(outcomes, prepared, strict=True):
            if outcome is not None:
                if isinstance(outcome, ConflictError):
                    self._refresh(one.execution_id)
                raise outcome
            self._core.publish(one, persisted=True)

    def _is_critical(self, update: StateUpdate | Mapping[str, Any]) -> bool:
        critical = self._critical
        if not critical:
            return False
        if "all" in critical:
            return True
        get = update.get if isinstance(update, Mapping) else update.__getattribute__
        try:
            if "status" in critical and get("status") is not None:
                return True
            if "error" in critical and get("error") is not None:
                return True
            nodes = get("nodes")
        except AttributeError:
            return False  # not an update at all: the core will say so
        if not nodes or not isinstance(nodes, Mapping):
            return False
        if "nodes" in critical:
            return True
        return "node_failed" in critical and any(str(v) == "failed" for v in nodes.values())

    def _in_memory(self, execution_id: str) -> bool:
        try:
            self._core.get(execution_id)
        except NotFoundError:
            return False
        return True

    # -- writes ------------------------------------------------------------------

    def create_execution(
        self,
        execution_id: str | None = None,
        *,
        workflow_id: str,
        variables: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        actor: str | None = None,
    ) -> WorkflowState:
        """Create an execution at version 1, status running; return its state.

        An id is generated (a time-ordered UUIDv7) when ``execution_id`` is None.
        Raises ``AlreadyExistsError`` if the id is taken, ``ValidationError`` on bad input.
        """
        core = self._core
        if self._store is None or (self._durability == "async" and "all" not in self._critical):
            if self._store is not None and execution_id is not None:
                self._check_not_stored(execution_id)
            return core.create(execution_id, workflow_id, variables, context, actor)
        prepared = core.prepare_create(execution_id, workflow_id, variables, context, actor)
        with self._stripe(prepared.execution_id):
            self._commit([prepared])
        return prepared.state

    def _check_not_stored(self, execution_id: str) -> None:
        """Async creations are stored later: refuse an id the store holds already."""
        assert self._store is not None
        if self._store.current_versions([execution_id]):
            raise AlreadyExistsError(f"execution {execution_id!r} exists already")

    def update_state(
        self,
        execution_id: str,
        update: StateUpdate | Mapping[str, Any],
        *,
        expected_version: int | None = None,
        actor: str | None = None,
    ) -> int:
        """Apply one update atomically and return the new version.

        All or nothing: on any error the state, version and history are unchanged.
        With ``expected_version`` the update applies only to that version, else
        ``ConflictError`` (with ``.expected`` and ``.actual``). Also raises
        ``NotFoundError``, ``ValidationError``, ``InvalidTransitionError``; with a
        store, ``StoreUnavailableError`` (sync writes: nothing was applied).
        """
        if self._store is None:
            return self._core.apply(execution_id, update, expected_version, actor)
        if self._durability == "async" and not self._is_critical(update):
            return self._apply_async(execution_id, update, expected_version, actor)
        return self._apply_sync(execution_id, update, expected_version, actor)

    def _apply_async(
        self,
        execution_id: str,
        update: StateUpdate | Mapping[str, Any],
        expected_version: int | None,
        actor: str | None,
    ) -> int:
        with self._stripe(execution_id):
            try:
                return self._core.apply(execution_id, update, expected_version, actor)
            except NotFoundError:
                if self._load(execution_id) is None:
                    raise
            return self._core.apply(execution_id, update, expected_version, actor)

    def _apply_sync(
        self,
        execution_id: str,
        update: StateUpdate | Mapping[str, Any],
        expected_version: int | None,
        actor: str | None,
    ) -> int:
        core = self._core
        with self._stripe(execution_id):
            if self._flusher is not None:
                # Critical update in async mode: everything before it goes first.
                self._flusher.flush(timeout=30.0, report=False)
            for _attempt in range(_REBASE_ATTEMPTS):
                try:
                    prepared = core.prepare(execution_id, update, expected_version, actor)
                except NotFoundError:
                    if self._load(execution_id) is None:
                        raise
                    prepared = core.prepare(execution_id, update, expected_version, actor)
                try:
                    self._commit([prepared])
                except ConflictError:
                    # Another process wrote first; memory now holds its version.
                    if expected_version is not None:
                        raise
                    continue
                return prepared.version
            raise ConflictError(execution_id, prepared.base_version, core.get(execution_id).version)

    def transact(
        self,
        execution_id: str,
        fn: UpdateFn,
        *,
        retries: int = 10,
        actor: str | None = None,
    ) -> int:
        """Read-modify-write with optimistic concurrency; return the resulting version.

        Reads the state, calls ``fn(state)`` for an update and applies it with
        ``expected_version=state.version``. On a conflict it reads again and calls
        ``fn`` again, at most ``retries`` more times (with a short jittered backoff
        after the first few), then re-raises the ``ConflictError``. When ``fn``
        returns None nothing is written.
        """
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ValidationError(f"retries must be a non-negative int, not {retries!r}")
        attempt = 0
        while True:
            state = self.get_state(execution_id)
            update = fn(state)
            if update is None:
                return state.version
            try:
                return self.update_state(
                    execution_id, update, expected_version=state.version, actor=actor
                )
            except ConflictError:
                attempt += 1
                if attempt > retries:
                    raise
                if attempt > 2:
                    time.sleep(random.uniform(0, min(0.05, 0.0005 * 2**attempt)))

    def fork(
        self,
        execution_id: str,
        *,
        version: int | None = None,
        new_execution_id: str | None = None,
        actor: str | None = None,
    ) -> WorkflowState:
        """Start a new execution, running, from a version of ``execution_id``.

        The new execution's state is that version's (nodes, variables, context,
        current node); its ``forked_from`` and its first event name the source, and
        the source records an ``execution_forked`` event (a new version, allowed in
        any status). Returns the new execution's state.
        """
        source = self.get_state(execution_id, version=version)
        core = self._core
        new = core.prepare_fork(source, new_execution_id, actor)
        if self._store is None:
            core.publish(new, persisted=False)
            self._link_fork(execution_id, source.version, new.execution_id, actor)
            return new.state
        with self._stripe(execution_id):
            if self._durability == "async":
                self._check_not_stored(new.execution_id)
                core.publish(new, persisted=False)
                self._link_fork(execution_id, source.version, new.execution_id, actor)
                return new.state
            # The new execution first: the store refuses an id it holds already, and
            # its first event names the source, so a crash in between loses no link.
            self._commit([new])
            self._link_fork(execution_id, source.version, new.execution_id, actor)
        return new.state

    def _link_fork(
        self, execution_id: str, forked_version: int, new_execution_id: str, actor: str | None
    ) -> None:
        """Record the fork on the source, re-basing on newer versions as needed."""
        core = self._core
        for _attempt in range(_REBASE_ATTEMPTS):
            link = core.prepare_fork_link(execution_id, forked_version, new_execution_id, actor)
            try:
                if self._store is None or self._durability == "async":
                    core.publish(link, persisted=False)
                else:
                    self._commit([link])
                return
            except ConflictError:
                continue
        raise ConflictError(execution_id, link.base_version, core.get(execution_id).version)

    # -- reads -------------------------------------------------------------------

    def get_state(
        self,
        execution_id: str,
        *,
        version: int | None = None,
        at: datetime | None = None,
    ) -> WorkflowState:
        """The current state, or the state right after ``version``, or as it was ``at``.

        Past versions come from the in-memory ring and, with a store, from the
        store (snapshot + deltas) once the ring has evicted them; in memory alone
        an evicted version raises ``HistoryEvictedError``. Unknown ids and versions
        (and a time before the execution existed) raise ``NotFoundError``.
        """
        if version is None and at is None:
            try:
                return self._core.get(execution_id)
            except NotFoundError:
                if self._store is None:
                    raise
                state = self._load(execution_id)
                if state is None:
                    raise
                return state
        if at is not None:
            if version is not None:
                raise ValidationError("give version or at, not both")
            return self._state_at(execution_id, _to_micros(at, "at"))
        assert version is not None
        try:
            return self._core.get_version(execution_id, version)
        except HistoryEvictedError:
            if self._store is None:
                raise
        except NotFoundError:
            # Either no such version, or an execution not loaded into memory yet.
            if self._store is None or self._in_memory(execution_id):
                raise
            if self._load(execution_id) is None:
                raise
            try:
                return self._core.get_version(execution_id, version)
            except HistoryEvictedError:
                pass
        self._settle()
        state = self._load(execution_id, version)
        if state is None:
            raise NotFoundError(f"execution {execution_id!r} has no stored version {version}")
        return state

    def _state_at(self, execution_id: str, at_us: int) -> WorkflowState:
        current = self.get_state(execution_id)
        if at_us >= _to_micros(current.updated_at, "updated_at"):
            return current
        if at_us < _to_micros(current.created_at, "created_at"):
            raise NotFoundError(f"execution {execution_id!r} did not exist yet at that time")
        try:
            events, _ = self._core.history(execution_id, None, at_us + 1)
            version = events[-1].version
        except HistoryEvictedError:
            if self._store is None:
                raise
            self._settle()
            found = self._store.version_at(execution_id, at_us)
            if found is None:
                raise NotFoundError(
                    f"execution {execution_id!r} did not exist yet at that time"
                ) from None
            version = found
        return self.get_state(execution_id, version=version)

    def get_history(
        self, execution_id: str, options: HistoryOptions | None = None
    ) -> ExecutionHistory:
        """The events of an execution that match ``options``, oldest first, and a summary.

        In memory alone it raises ``HistoryEvictedError`` rather than return a
        partial history when events the query could match were evicted; with a
        store it reads them from the store (their ``seq`` is 0 there: the ring
        order is not stored).
        """
        if options is None:
            options = HistoryOptions()
        elif not isinstance(options, HistoryOptions):
            raise ValidationError(f"options must be a HistoryOptions, not {type(options).__name__}")
        since_us = None if options.since is None else _to_micros(options.since, "since")
        until_us = None if options.until is None else _to_micros(options.until, "until")
        types = None if options.types is None else _enum_values(options.types, "types")
        try:
            events, (duration_us, node_count, error_count) = self._core.history(
                execution_id,
                since_us,
                until_us,
                types,
                options.node_id,
                options.after_version,
                options.limit,
            )
            summary = HistorySummary(timedelta(microseconds=duration_us), node_count, error_count)
        except (HistoryEvictedError, NotFoundError):
            if self._store is None:
                raise
            self._settle()
            state = self.get_state(execution_id)
            deltas = self._store.read_deltas(
                execution_id,
                after_version=options.after_version,
                since_us=since_us,
                until_us=until_us,
            )
            events = _core.decode_history(
                execution_id,
                deltas,
                since_us,
                until_us,
                types,
                options.node_id,
                options.after_version,
                options.limit,
            )
            summary = HistorySummary(
                state.updated_at - state.created_at, len(state.nodes), state.error_count
            )
        return ExecutionHistory(execution_id, events, summary)

    def list_executions(
        self,
        *,
        status: ExecutionStatus | str | Iterable[ExecutionStatus | str] | None = None,
        workflow_id: str | None = None,
        limit: int = 100,
    ) -> list[WorkflowState]:
        """Executions in creation order, filtered by status (one or several) and workflow."""
        statuses: list[str] | None
        if status is None:
            statuses = None
        elif isinstance(status, str):
            statuses = [status]
        else:
            statuses = _enum_values(status, "status")
        if self._store is None:
            return self._core.list(statuses, workflow_id, limit)
        # Check the arguments exactly as the in-memory path does.
        self._core.list(statuses, workflow_id, 0)
        self._settle()
        ids = self._store.list_execution_ids(
            statuses=None if statuses is None else [str(ExecutionStatus(s)) for s in statuses],
            workflow_id=workflow_id,
            limit=limit,
        )
        return [self._peek(execution_id) for execution_id in ids]

    def _peek(self, execution_id: str) -> WorkflowState:
        """The current state, from memory or rebuilt from the store without loading it
        into memory (listing must not grow the map)."""
        try:
            return self._core.get(execution_id)
        except NotFoundError:
            assert self._store is not None
            loaded = self._store.load(execution_id)
            if loaded is None:
                raise
            return _core.rebuild(execution_id, loaded.snapshot, loaded.deltas)

    def open_cursor(self, *, durable: bool = False, from_oldest: bool = False) -> EventCursor:
        """A reader of every execution's events, in the order they were recorded.

        A durable cursor holds back eviction until it ``commit()``s; a live cursor
        never blocks writers and counts what it ``missed`` if it falls behind.
        ``from_oldest`` starts at the oldest event still held instead of the next one.
        """
        return self._core.open_cursor(durable=durable, from_oldest=from_oldest)

    def stats(self) -> ManagerStats:
        """Counters of the core (executions in memory, ring size, cursors) and, with a
        store, of the write path (group commits, write-behind lag and retries)."""
        core = self._core.stats()
        stats = ManagerStats(
            executions=core["executions"],
            ring_events=core["ring_events"],
            ring_capacity=core["ring_capacity"],
            first_seq=core["first_seq"],
            next_seq=core["next_seq"],
            cursors=core["cursors"],
            durable_cursors=core["durable_cursors"],
        )
        if self._store is not None:
            assert self._committer is not None
            stats["store"] = self._store.url
            stats["durability"] = self._durability
            stats["group_commits"], stats["group_committed_versions"] = self._committer.stats()
            if self._flusher is not None:
                self._flusher.report(stats)
        return stats

    def schema_version(self) -> int | None:
        """The version of the store's schema (migrations are applied on open); None in
        memory."""
        return None if self._store is None else self._store.schema_version()

    def storage_bytes(self) -> int:
        """Bytes the store's tables take (0 in memory)."""
        return 0 if self._store is None else self._store.storage_bytes()

    def __len__(self) -> int:
        """The number of executions held in memory: all of them without a store; with
        one, those created, recovered or read since it was opened (``list_executions``
        counts what the store holds)."""
        return len(self._core)


def _enum_values(values: Iterable[Any], name: str) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Iterable):
        raise ValidationError(f"{name} must be a collection of values")
    result = []
    for value in values:
        if not isinstance(value, str):
            raise ValidationError(f"{name} holds {value!r}, which is not a status or type")
        result.append(str(value))
    return result
