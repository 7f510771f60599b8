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
from typing import Any, Literal, NoReturn, Self

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
    critical_mask,
    snapshot_tracker,
)
from wfstate._lease import Heartbeat, Lease, LeaseGrant, LeaseTable
from wfstate._merge import fields_of_events, fields_of_update
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
    InvalidTransitionError,
    LeaseHeldError,
    LeaseLostError,
    NotFoundError,
    ValidationError,
    WfstateError,
)
from wfstate.store import Store, open_store
from wfstate.store.base import NewerVersionsConflict, WriteItem

__all__ = [
    "Durability",
    "Heartbeat",
    "Lease",
    "ManagerStats",
    "SnapshotPolicy",
    "StateManager",
    "UpdateFn",
]

#: What ``transact`` calls: it gets the current state and returns the update to
#: apply to exactly that version, or ``None`` to write nothing.
UpdateFn = Callable[[WorkflowState], "StateUpdate | Mapping[str, Any] | None"]

Durability = Literal["sync", "async"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_STRIPES = 1024
# How often a plain update_state (no expected_version) re-bases itself on a newer
# stored version written by another process before giving up.
_REBASE_ATTEMPTS = 20
# transact's backoff after a conflict: none before the first retry (the conflict has
# just loaded the newer version), then "full jitter" (uniform in [0, cap]) with the
# cap doubling from _BACKOFF_BASE up to _BACKOFF_MAX seconds. The jitter keeps
# processes that collided from colliding again in lockstep.
_BACKOFF_BASE = 0.0005
_BACKOFF_MAX = 0.05
_MAX_OWNER_LENGTH = 255
_COUNTERS = ("conflicts", "conflicts_resolved", "merges", "transact_retries", "leases_lost")


def _to_micros(moment: datetime, name: str) -> int:
    if not isinstance(moment, datetime):
        raise ValidationError(f"{name} must be a datetime, not {type(moment).__name__}")
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValidationError(f"{name} must be timezone-aware (use datetime.now(UTC))")
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _check_owner(owner: object) -> str:
    if not isinstance(owner, str):
        raise ValidationError(f"owner must be a str, not {type(owner).__name__}")
    if not 1 <= len(owner) <= _MAX_OWNER_LENGTH or "\x00" in owner:
        raise ValidationError(
            f"owner must be 1-{_MAX_OWNER_LENGTH} characters without NUL, not {owner!r}"
        )
    try:
        owner.encode()
    except UnicodeEncodeError:
        raise ValidationError(f"owner {owner!r} is not valid Unicode text") from None
    return owner


def _ttl_micros(ttl: object) -> tuple[float, int]:
    seconds = _positive(ttl, "ttl")
    if seconds == float("inf") or seconds > 10 * 365 * 86_400:
        raise ValidationError(f"ttl must be a finite number of seconds, not {ttl!r}")
    return seconds, max(1, round(seconds * 1_000_000))


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
    both raise ``BackpressureError`` without applying the update. A sync write to a
    store waits for (or fails for want of) that room before the store commits it, so
    a full ring never leaves a stored write unpublished.
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
        "_counter_lock",
        "_counters",
        "_critical",
        "_critical_mask",
        "_durability",
        "_flusher",
        "_granted",
        "_lease_lock",
        "_leases",
        "_one_call",
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
        #: The store may have a one-call sync path (``Store.write_update``); False
        #: once it answered None: it has none, and is not asked again.
        self._one_call = True
        self._critical: frozenset[str] = frozenset()
        self._critical_mask = 0
        self._recovered: list[str] = []
        self._stripes: list[threading.Lock] = []
        self._closed_lock = threading.Lock()
        # Leases without a store: the table, and the lock under which a leased write
        # checks its token and applies (so no grant can slip in between).
        self._leases = LeaseTable()
        self._lease_lock = threading.Lock()
        # The latest grant this manager made per execution, (owner, token, ttl), so
        # that get_lease after claim_orphans or recover gives a lease that renews.
        self._granted: dict[str, tuple[str, int, float]] = {}
        self._counters = dict.fromkeys(_COUNTERS, 0)
        self._counter_lock = threading.Lock()

    @classmethod
    def open(
        cls,
        url: str | None = None,
        *,
        durability: Durability = "sync",
        connect_timeout: float = 5.0,
        flush_interval: float = 0.05,
        max_batch: int = 5000,
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
        crash loses what was applied in the last ``flush_interval`` plus one batch
        write (longer while other threads keep the GIL busy: README, "Durability").
        ``flush()`` waits for durability; ``close()`` drains.
        Updates matching ``critical`` ("status", "node_failed", "error", "nodes",
        "all") are written synchronously even in async mode; with "all", creations
        and forks too.

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
        self._critical_mask = critical_mask(critical)
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        self._tracker = snapshot_tracker(snapshot_policy)
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

    def _catch_up(self, execution_id: str, conflict: ConflictError) -> None:
        """Move memory forward to the version another writer stored first: by the
        deltas the conflict carries when it carries them all, else by a reload."""
        if isinstance(conflict, NewerVersionsConflict):
            assert self._tracker is not None
            try:
                current = self._core.get(execution_id)
                if current.version == conflict.expected:
                    newer = conflict.newer
                    state = _core.advance(current, [(v, at_us, d) for v, at_us, _, d in newer])
                    self._core.refresh(state)
                    self._tracker.caught_up(execution_id, conflict.snapshot_version, newer)
                    return
            except (NotFoundError, ValidationError):
                pass
        self._refresh(execution_id)

    def _commit(self, prepared: Sequence[PreparedUpdate], lease: Lease | None = None) -> None:
        """Store prepared versions synchronously, then publish them, in order."""
        assert self._committer is not None
        assert self._tracker is not None
        snapshot_for = self._tracker.snapshot_for
        held = None if lease is None else (lease.owner, lease.token)
        items = []
        for one in prepared:
            record = one.record()
            items.append(WriteItem(record, snapshot_for(record), held))
        undo = self._tracker.undo
        try:
            try:
                outcomes = self._committer.commit(items)
            except BaseException:
                # Not known to be stored (an interrupt may come after the write):
                # if it was, the next write catches up from the store.
                for one in prepared:
                    undo(one.execution_id, one.version)
                raise
            for outcome, one in zip(outcomes, prepared, strict=True):
                if outcome is not None:
                    undo(one.execution_id, one.version)
                    self._refused(one.execution_id, outcome)
                self._core.publish(one, persisted=True)
        finally:
            # The ring room kept for versions not published (a failed or refused
            # write) goes back now, not when an exception's frames let go of them.
            for one in prepared:
                one.release()

    def _refused(self, execution_id: str, refusal: WfstateError) -> NoReturn:
        """Raise the store's refusal of a sync write, memory first caught up with
        the version that won (a conflict) or the lease counted lost."""
        if isinstance(refusal, ConflictError):
            self._catch_up(execution_id, refusal)
        elif isinstance(refusal, LeaseLostError):
            self._count("leases_lost")
        raise refusal

    def _count(self, counter: str, amount: int = 1) -> None:
        with self._counter_lock:
            self._counters[counter] += amount

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
        if self._store is None or self._behind():
            if self._store is not None and execution_id is not None:
                self._check_not_stored(execution_id)
            return core.create(execution_id, workflow_id, variables, context, actor)
        if execution_id is None:
            execution_id = _core.new_execution_id()
        if not isinstance(execution_id, str):  # the core's ValidationError, nothing kept
            core.prepare_create(execution_id, workflow_id, variables, context, actor).release()
            raise ValidationError(f"execution_id must be a str, not {execution_id!r}")
        # The stripe first, then the ring room (the preparation reserves it), as in
        # update_state: a writer holding room never waits for a stripe whose holder
        # waits for room.
        with self._stripe(execution_id):
            prepared = core.prepare_create(execution_id, workflow_id, variables, context, actor)
            self._commit([prepared])
        return prepared.state

    def _behind(self) -> bool:
        """Whether creations and forks are left to the write-behind: async mode,
        unless ``critical`` holds "all" (every write is then synchronous)."""
        return self._durability == "async" and "all" not in self._critical

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
        lease: Lease | None = None,
    ) -> int:
        """Apply one update atomically and return the new version.

        All or nothing: on any error the state, version and history are unchanged.
        With ``expected_version`` the update applies only to that version, else
        ``ConflictError`` (with ``.expected`` and ``.actual``). Without it, an update
        that another process got ahead of is merged field by field: re-based onto the
        newer versions when it changes nothing they changed, else ``ConflictError``
        with ``.fields`` (see docs/semantics.md, "Concurrent writers").

        With ``lease`` (from ``acquire``) the write is fenced: it applies only while
        that lease is still the execution's, else ``LeaseLostError``. A leased write
        is synchronous even in async mode.

        Also raises ``NotFoundError``, ``ValidationError``, ``InvalidTransitionError``;
        with a store, ``StoreUnavailableError`` (sync writes: nothing was applied).
        """
        if lease is None:
            if self._store is None:
                return self._core.apply(execution_id, update, expected_version, actor)
        else:
            self._check_lease(lease, execution_id)
            if self._store is None:
                return self._apply_leased_in_memory(
                    execution_id, update, expected_version, actor, lease
                )
        if (
            self._durability == "async"
            and lease is None
            and not self._critical_mask & _core.CRITICAL_ALL
        ):
            applied = self._apply_async(execution_id, update, expected_version, actor)
            if applied is not None:
                return applied
        return self._apply_sync(execution_id, update, expected_version, actor, lease)

    def _apply_leased_in_memory(
        self,
        execution_id: str,
        update: StateUpdate | Mapping[str, Any],
        expected_version: int | None,
        actor: str | None,
        lease: Lease,
    ) -> int:
        """Without a store: the lease check and the update under one lock, so no
        grant can slip in between."""
        with self._lease_lock:
            try:
                self._leases.check(execution_id, lease.owner, lease.token)
            except LeaseLostError:
                self._count("leases_lost")
                raise
            return self._core.apply(execution_id, update, expected_version, actor)

    def _check_lease(self, lease: Lease, execution_id: str | None = None) -> None:
        """A ``Lease`` (on ``execution_id`` when given), else ``ValidationError``."""
        if not isinstance(lease, Lease):
            raise ValidationError(f"lease must be a Lease, not {type(lease).__name__}")
        if execution_id is not None and lease.execution_id != execution_id:
            raise ValidationError(
                f"the lease is on execution {lease.execution_id!r}, not {execution_id!r}"
            )

    def _apply_async(
        self,
        execution_id: str,
        update: StateUpdate | Mapping[str, Any],
        expected_version: int | None,
        actor: str | None,
    ) -> int | None:
        """Apply in memory for the write-behind; None, with nothing applied, when the
        ``critical`` policy says the update is written synchronously."""
        apply = self._core.apply_unless
        mask = self._critical_mask
        with self._stripe(execution_id):
            try:
                return apply(execution_id, update, expected_version, actor, mask)
            except NotFoundError:
                if self._load(execution_id) is None:
                    raise
            return apply(execution_id, update, expected_version, actor, mask)

    def _apply_sync(
        self,
        execution_id: str,
        update: StateUpdate | Mapping[str, Any],
        expected_version: int | None,
        actor: str | None,
        lease: Lease | None = None,
    ) -> int:
        core = self._core
        conflicts = 0
        base = 0
        with self._stripe(execution_id):
            if self._flusher is not None:
                # Critical update in async mode: everything before it goes first.
                self._flusher.flush(timeout=30.0, report=False)
            for attempt in range(_REBASE_ATTEMPTS):
                one_call = None
                if attempt == 0 and lease is None and self._one_call:
                    one_call = self._write_update(execution_id, update, expected_version, actor)
                if one_call is None:
                    prepared, merged = self._prepare(execution_id, update, expected_version, actor)
                    conflicts += merged
                    base = prepared.base_version
                try:
                    if one_call is None:
                        self._commit([prepared], lease)
                        version = prepared.version
                    else:
                        version, refusal = one_call
                        if refusal is not None:
                            self._refused(execution_id, refusal)
                except ConflictError as conflict:
                    # Another process wrote first; memory now holds its version (or
                    # a later one). The conflict may name the version as of the
                    # store's statement only (a writer that raced it, when the
                    # store's follow-up read failed): memory's is then the newer.
                    actual = max(conflict.actual, core.get(execution_id).version)
                    if expected_version is not None or actual <= conflict.expected:
                        # An explicit expected version, or a store behind this copy
                        # (nothing newer to merge onto): the caller decides.
                        raise ConflictError(execution_id, conflict.expected, actual) from None
                    conflicts += 1
                    self._count("conflicts")
                    newer = (
                        conflict.newer
                        if isinstance(conflict, NewerVersionsConflict) and conflict.actual == actual
                        else None
                    )
                    self._check_merge(execution_id, update, conflict.expected, actual, newer)
                    self._count("merges")
                    continue
                if conflicts:
                    self._count("conflicts_resolved", conflicts)
                return version
            raise ConflictError(execution_id, base, core.get(execution_id).version)

    def _write_update(
        self,
        execution_id: str,
        update: StateUpdate | Mapping[str, Any],
        expected_version: int | None,
        actor: str | None,
    ) -> tuple[int, WfstateError | None] | None:
        """The store's sync path of one update in one call (``Store.write_update``):
        (version, None) once stored and published, (base version, refusal), or None,
        with nothing done, when the store has no such path or the preparation
        raised ``NotFoundError``, ``ConflictError`` or ``InvalidTransitionError``:
        ``_prepare`` then checks whether this process's copy is stale and brings it
        up to date first."""
        assert self._store is not None
        assert self._tracker is not None
        try:
            written = self._store.write_update(
                self._core, self._tracker, execution_id, update, expected_version, actor
            )
        except (NotFoundError, ConflictError, InvalidTransitionError):
            return None
        if written is None:
            self._one_call = False  # the store has no such path: stop asking
        return written

    def _prepare(
        self,
        execution_id: str,
        update: StateUpdate | Mapping[str, Any],
        expected_version: int | None,
        actor: str | None,
    ) -> tuple[PreparedUpdate, int]:
        """Prepare on this process's copy; when that copy may be stale (an execution
        not in memory yet, or an error that a newer stored version could explain),
        bring it up to the store's version once and prepare again. Returns the
        prepared update and 1 when it had to be merged onto newer versions (else 0)."""
        core = self._core
        merged = 0
        try:
            return core.prepare(execution_id, update, expected_version, actor), 0
        except NotFoundError:
            if self._load(execution_id) is None:
                raise
        except ConflictError as e:
            # The caller expects a version this process has not seen yet.
            if e.expected <= e.actual or not self._stale(execution_id, e.actual):
                raise
        except InvalidTransitionError:
            seen = core.get(execution_id).version
            if not self._stale(execution_id, seen):
                raise
            if expected_version is None:
                # The update was made against an older version than the store holds:
                # it may go on top of the newer ones only field by field.
                self._count("conflicts")
                self._check_merge(execution_id, update, seen, core.get(execution_id).version)
                self._count("merges")
                merged = 1
        return core.prepare(execution_id, update, expected_version, actor), merged

    def _stale(self, execution_id: str, version: int) -> bool:
        """Whether the store holds a newer version than ``version``; if so, load it."""
        assert self._store is not None
        stored = self._store.current_versions([execution_id]).get(execution_id, 0)
        if stored <= version:
            return False
        self._refresh(execution_id)
        return True

    def _check_merge(
        self,
        execution_id: str,
        update: StateUpdate | Mapping[str, Any],
        expected: int,
        actual: int,
        newer: list[tuple[int, int, str | None, bytes]] | None = None,
    ) -> None:
        """Raise ``ConflictError`` with the shared fields unless ``update`` changes
        nothing the stored versions after ``expected`` changed (``newer``: those
        versions when the caller has them all, else they are read)."""
        assert self._store is not None
        if newer is None:
            newer = self._store.read_deltas(execution_id, after_version=expected)
        theirs = fields_of_events(
            _core.decode_history(execution_id, newer, None, None, None, None, None, None)
        )
        ours = fields_of_update(update)
        shared = ours if "*" in theirs else ours & theirs
        if shared:
            raise ConflictError(execution_id, expected, actual, fields=shared) from None

    def transact(
        self,
        execution_id: str,
        fn: UpdateFn,
        *,
        retries: int = 10,
        actor: str | None = None,
        lease: Lease | None = None,
    ) -> int:
        """Read-modify-write with optimistic concurrency; return the resulting version.

        Reads the state, calls ``fn(state)`` for an update and applies it with
        ``expected_version=state.version``. On a conflict (another thread or process
        wrote first: the newer version is then loaded) it reads again and calls ``fn``
        again, at most ``retries`` more times, sleeping a jittered, doubling backoff
        between retries after the first, then re-raises the ``ConflictError``. When
        ``fn`` returns None nothing is written. With ``lease`` every attempt is
        fenced as in ``update_state`` (``LeaseLostError`` is never retried).
        """
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ValidationError(f"retries must be a non-negative int, not {retries!r}")
        if lease is not None:
            self._check_lease(lease, execution_id)
        attempt = 0
        while True:
            state = self.get_state(execution_id)
            update = fn(state)
            if update is None:
                if attempt:
                    self._count("conflicts_resolved", attempt)
                return state.version
            try:
                version = self.update_state(
                    execution_id, update, expected_version=state.version, actor=actor, lease=lease
                )
            except ConflictError:
                attempt += 1
                self._count("conflicts")
                if attempt > retries:
                    raise
                self._count("transact_retries")
                if attempt > 1:
                    time.sleep(random.uniform(0, min(_BACKOFF_MAX, _BACKOFF_BASE * 2**attempt)))
                continue
            if attempt:
                self._count("conflicts_resolved", attempt)
            return version

    # -- leases ------------------------------------------------------------------

    def acquire(
        self,
        execution_id: str,
        *,
        owner: str,
        ttl: float = 30.0,
        wait: float = 0.0,
    ) -> Lease:
        """Make ``owner`` the execution's leaseholder for ``ttl`` seconds.

        The lease's fencing token is one greater than any earlier grant of this
        execution. While another owner's lease is live, raises ``LeaseHeldError``
        (after retrying for up to ``wait`` seconds). The same owner may acquire
        again (a restarted instance): it gets a new token, which fences its earlier
        incarnation. ``NotFoundError`` for an unknown execution.

        Leases bind only writers that use them: writes without ``lease=`` are not
        fenced (use them for what any worker may do, such as signals or counters).
        """
        owner = _check_owner(owner)
        seconds, ttl_us = _ttl_micros(ttl)
        deadline = time.monotonic() + _positive(wait, "wait", allow_zero=True)
        pause = 0.01
        while True:
            try:
                grant = self._acquire(execution_id, owner, ttl_us)
            except LeaseHeldError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise
                time.sleep(min(remaining, random.uniform(pause / 2, pause)))
                pause = min(pause * 2, 1.0)
                continue
            return self._granted_lease(grant, seconds)

    def _granted_lease(self, grant: LeaseGrant, seconds: float) -> Lease:
        assert grant.owner is not None
        with self._counter_lock:
            # One entry per execution: a new grant supersedes the earlier ones.
            self._granted[grant.execution_id] = (grant.owner, grant.token, seconds)
        return Lease._from_grant(grant, seconds)

    def _acquire(self, execution_id: str, owner: str, ttl_us: int) -> LeaseGrant:
        if self._store is not None:
            return self._store.acquire_lease(execution_id, owner, ttl_us)
        with self._lease_lock:
            self._core.get(execution_id)  # NotFoundError
            return self._leases.acquire(execution_id, owner, ttl_us)

    def renew(self, lease: Lease, *, ttl: float | None = None) -> Lease:
        """Extend ``lease`` by ``ttl`` seconds from now (default: its own ttl) and
        return the renewed lease (same token). ``LeaseLostError`` when another owner
        has taken the execution (a lease that expired but was not taken renews)."""
        self._check_lease(lease)
        if ttl is None and lease.ttl <= 0:
            raise ValidationError("this lease's ttl is unknown (read by get_lease): give ttl")
        seconds, ttl_us = _ttl_micros(lease.ttl if ttl is None else ttl)
        try:
            if self._store is not None:
                grant = self._store.renew_lease(
                    lease.execution_id, lease.owner, lease.token, ttl_us
                )
            else:
                with self._lease_lock:
                    grant = self._leases.renew(lease.execution_id, lease.owner, lease.token, ttl_us)
        except LeaseLostError:
            self._count("leases_lost")
            raise
        return Lease._from_grant(grant, seconds)

    def release(self, lease: Lease) -> bool:
        """End ``lease`` now, so another owner may acquire the execution at once (a
        running execution released this way is an orphan for ``claim_orphans``).
        Returns False, changing nothing, when the lease was no longer held."""
        self._check_lease(lease)
        with self._counter_lock:
            if self._granted.get(lease.execution_id, ("", 0, 0.0))[:2] == (
                lease.owner,
                lease.token,
            ):
                del self._granted[lease.execution_id]
        if self._store is not None:
            return self._store.release_lease(lease.execution_id, lease.owner, lease.token)
        with self._lease_lock:
            return self._leases.release(lease.execution_id, lease.owner, lease.token)

    def get_lease(self, execution_id: str) -> Lease | None:
        """The execution's current lease, live or expired, or None (never leased, or
        released). Its ``ttl`` is the one granted when this manager made the grant
        (``acquire``, ``claim_orphans``, ``recover``), else 0 (unknown: ``renew`` then
        needs a ``ttl``)."""
        if self._store is not None:
            grant = self._store.get_lease(execution_id)
        else:
            with self._lease_lock:
                grant = self._leases.get(execution_id)
        if grant is None or grant.owner is None:
            return None
        with self._counter_lock:
            owner, token, seconds = self._granted.get(execution_id, ("", 0, 0.0))
        if (owner, token) != (grant.owner, grant.token):
            seconds = 0.0
        return Lease._from_grant(grant, seconds)

    def heartbeat(
        self,
        lease: Lease,
        *,
        interval: float | None = None,
        on_lost: Callable[[LeaseLostError], object] | None = None,
        ttl: float | None = None,
    ) -> Heartbeat:
        """Renew ``lease`` in a background thread every ``interval`` seconds (default:
        a third of the ttl) until ``stop()`` or the end of a ``with`` block, each time
        for ``ttl`` seconds (default: the lease's own; give it for a lease read by
        ``get_lease`` from another manager, whose ttl is unknown).

        ``Heartbeat.lease`` is the latest renewal; when another owner takes the
        execution, ``Heartbeat.lost`` turns True and ``on_lost`` is called.
        """
        self._check_lease(lease)
        if ttl is None:
            if lease.ttl <= 0:
                raise ValidationError("this lease's ttl is unknown (read by get_lease): give ttl")
            ttl = lease.ttl
        seconds, _ = _ttl_micros(ttl)
        if interval is None:
            interval = seconds / 3

        def renew(current: Lease) -> Lease:
            return self.renew(current, ttl=seconds)

        return Heartbeat(renew, lease, interval=_positive(interval, "interval"), on_lost=on_lost)

    def claim_orphans(
        self, *, owner: str, limit: int = 10, ttl: float = 30.0
    ) -> list[WorkflowState]:
        """Take over running executions whose lease expired (their owner died) or was
        released, and return their last durable states.

        Each is granted to ``owner`` for ``ttl`` seconds with a new fencing token, so
        the dead owner's late writes are refused; ``get_lease(state.execution_id)``
        returns the lease to write under. At most ``limit``, oldest expiry first;
        two processes claiming at once never get the same execution. Executions
        that never had a lease are not orphans.
        """
        owner = _check_owner(owner)
        seconds, ttl_us = _ttl_micros(ttl)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValidationError(f"limit must be a non-negative int, not {limit!r}")
        if limit == 0:
            return []
        if self._store is not None:
            grants = self._store.claim_orphans(owner, ttl_us, limit)
        else:
            with self._lease_lock:
                running = [s.execution_id for s in self._core.list(["running"], None, None)]
                grants = self._leases.claim(running, owner, ttl_us, limit)
        states = []
        for grant in grants:
            self._granted_lease(grant, seconds)
            states.append(self._take_over(grant.execution_id))
        return states

    def _take_over(self, execution_id: str) -> WorkflowState:
        """The last durable state of an execution another process may have written."""
        if self._store is None:
            return self._core.get(execution_id)
        self._settle()
        with self._stripe(execution_id):
            self._refresh(execution_id)
        return self.get_state(execution_id)

    def recover(self, *, owner: str | None = None, ttl: float = 30.0) -> list[WorkflowState]:
        """Executions to resume after a restart.

        Without ``owner``: those that were running or suspended when the store was
        opened, as they are now (finished ones left out). With ``owner`` (this
        instance's stable id): the running or suspended executions whose lease was
        that owner's, each re-acquired with a new fencing token (fencing off the
        previous incarnation's late writes) and reloaded from the store;
        ``get_lease`` returns the new leases. Executions another owner has taken
        since are left out.
        """
        if owner is None:
            states = []
            for execution_id in self._recovered:
                state = self.get_state(execution_id)
                if state.status in (ExecutionStatus.RUNNING, ExecutionStatus.SUSPENDED):
                    states.append(state)
            return states
        owner = _check_owner(owner)
        seconds, ttl_us = _ttl_micros(ttl)
        if self._store is not None:
            owned = self._store.owned_execution_ids(owner)
        else:
            with self._lease_lock:
                owned = self._leases.owned(owner)
        states = []
        for execution_id in owned:
            try:
                self._granted_lease(self._acquire(execution_id, owner, ttl_us), seconds)
            except (LeaseHeldError, NotFoundError):
                continue
            state = self._take_over(execution_id)
            if state.status in (ExecutionStatus.RUNNING, ExecutionStatus.SUSPENDED):
                states.append(state)
        return states

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
        if self._store is None:
            new = core.prepare_fork(source, new_execution_id, actor)
            try:
                core.publish(new, persisted=False)
                self._link_fork(execution_id, source.version, new.execution_id, actor)
                return new.state
            finally:
                new.release()  # its ring room, if it was not published
        # The stripe before the ring room, as in update_state (see create_execution).
        with self._stripe(execution_id):
            new = core.prepare_fork(source, new_execution_id, actor)
            try:
                if self._behind():
                    self._check_not_stored(new.execution_id)
                    core.publish(new, persisted=False)
                    self._link_fork(execution_id, source.version, new.execution_id, actor)
                    return new.state
                # The new execution first: the store refuses an id it holds already,
                # and its first event names the source, so a crash in between loses
                # no link.
                self._commit([new])
                self._link_fork(execution_id, source.version, new.execution_id, actor)
                return new.state
            finally:
                new.release()  # its ring room, if it was not published

    def _link_fork(
        self, execution_id: str, forked_version: int, new_execution_id: str, actor: str | None
    ) -> None:
        """Record the fork on the source, re-basing on newer versions as needed."""
        core = self._core
        for _attempt in range(_REBASE_ATTEMPTS):
            link = core.prepare_fork_link(execution_id, forked_version, new_execution_id, actor)
            try:
                if self._store is None or self._behind():
                    core.publish(link, persisted=False)
                else:
                    self._commit([link])
                return
            except ConflictError:
                continue
            finally:
                link.release()
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
        The first durable cursor first makes room for the sync writes in flight (the
        room each keeps for its events); ``BackpressureError`` if they need more
        than ``ring_capacity``.
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
        with self._counter_lock:
            counters = dict(self._counters)
        stats["conflicts"] = counters["conflicts"]
        stats["conflicts_resolved"] = counters["conflicts_resolved"]
        stats["merges"] = counters["merges"]
        stats["transact_retries"] = counters["transact_retries"]
        stats["leases_lost"] = counters["leases_lost"]
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
