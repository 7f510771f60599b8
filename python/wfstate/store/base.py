"""The contract every durable store of wfstate fulfils.

A store keeps, per execution, one row of current facts (version, status, workflow,
times, the latest snapshot's version, the fork link), an append-only log of deltas
(one row per version: the version's events, encoded by the Rust core) and
snapshots (whole states, every so often). It never decodes a delta or a snapshot:
the core does that (``wfstate._core.rebuild``, ``decode_history``).

The store is the judge of versions: ``write`` applies an execution's records only if
the stored version is the first record's ``base_version`` (a creation only if the
execution does not exist) and, for records written under a lease, only if the
lease's fencing token is still the execution's; it reports per execution what it
did. It is also the judge of leases (``acquire_lease`` and the rest), on its own
clock. A store must never
apply part of a batch: either the transaction commits (with some executions
refused by the version check) or nothing does and it raises
``StoreUnavailableError``.

Implementations: ``memory.MemoryStore``, ``sqlite.SQLiteStore``,
``postgres.PostgresStore``. The contract tests in ``tests/test_store_contract.py``
run against each.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

from wfstate._core import Core, EventCursor, RecordBatch, SnapshotTracker, VersionRecord
from wfstate._lease import LeaseGrant
from wfstate._model import StateUpdate
from wfstate.errors import ConflictError, StoreUnavailableError, WfstateError

__all__ = [
    "ACTIVE_STATUSES",
    "EVENT_TYPE_BITS",
    "NEWER_DELTAS_LIMIT",
    "GroupedByManager",
    "LeaseGrant",
    "LoadedExecution",
    "NewerVersionsConflict",
    "PendingWrite",
    "Store",
    "StoredDelta",
    "WriteItem",
    "items_of_batch",
]

#: Statuses of executions that startup recovery reloads.
ACTIVE_STATUSES: tuple[str, ...] = ("running", "suspended")

#: Each event type's bit in a delta's ``event_mask`` column (stable: stored on disk).
EVENT_TYPE_BITS: dict[str, int] = {
    name: 1 << position
    for position, name in enumerate(
        (
            "execution_created",
            "status_change",
            "node_pending",
            "node_start",
            "node_complete",
            "node_failed",
            "node_skipped",
            "node_metrics",
            "error",
            "current_node_changed",
            "variables_changed",
            "context_changed",
            "execution_forked",
        )
    )
}


def event_mask(event_types: Sequence[str]) -> int:
    """The bit mask of a delta's event types."""
    mask = 0
    for name in event_types:
        mask |= EVENT_TYPE_BITS[name]
    return mask


@dataclass(frozen=True, slots=True)
class WriteItem:
    """One version to write, with its snapshot when the snapshot policy asks for one,
    and the lease it is written under: ``(owner, fencing token)``, or None."""

    record: VersionRecord
    snapshot: bytes | None = None
    lease: tuple[str, int] | None = None


class PendingWrite(NamedTuple):
    """What ``Store.write_pending`` read, decided and wrote."""

    batch: RecordBatch
    #: ``batch.chains()``.
    chains: list[tuple[str, int, int, str, int, int, int]]
    #: The snapshot decision per chain.
    snapshot: list[bool]
    #: ``write_batch``'s result; None when the batch is empty or the write failed.
    written: tuple[dict[str, WfstateError], list[int]] | None
    #: Why the write failed, or None.
    error: StoreUnavailableError | None
    #: (batches, versions, versions dropped by ``skip_before``) of the full reads
    #: the step stored whole and took off the cursor before this one (see
    #: ``Store.write_pending``'s ``keep_going``).
    earlier: tuple[int, int, int] = (0, 0, 0)


class GroupedByManager:
    """The ``Store`` members of a store with neither a group commit nor a fused
    write-behind step of its own: the manager groups its sync writes
    (``GroupCommitter``) and the flusher reads, decides and writes one step at a
    time."""

    #: The manager groups the concurrent sync writes.
    groups_writes = False

    def write_stats(self) -> tuple[int, int]:
        """(0, 0): the manager counts the group commits."""
        return (0, 0)

    def write_pending(
        self,
        cursor: EventCursor,
        tracker: SnapshotTracker,
        max_events: int,
        timeout: float,
        skip_before: Mapping[str, int],
        keep_going: float = 0.0,
    ) -> PendingWrite | None:
        """None: the flusher calls ``read_batch``, ``decide_chain`` and ``write_batch``."""
        return None

    def write_update(
        self,
        core: Core,
        tracker: SnapshotTracker,
        execution_id: str,
        update: StateUpdate | Mapping[str, Any],
        expected_version: int | None,
        actor: str | None,
    ) -> tuple[int, WfstateError | None] | None:
        """None: the manager prepares, writes and publishes one step at a time."""
        return None


#: At most this many newer deltas ride along with a conflict (``NewerVersionsConflict``);
#: a writer further behind reloads the execution instead.
NEWER_DELTAS_LIMIT = 64


class NewerVersionsConflict(ConflictError):
    """A ``ConflictError`` from ``Store.write`` that carries what the writer missed.

    ``newer`` holds the stored deltas after ``expected`` up to ``actual``, as
    ``read_deltas`` gives them, read in the same transaction (or statement) as the
    version check: the manager moves its copy forward and decides a merge from them
    without another round trip. Stores add them when it is cheap (one item, a few
    versions behind); a plain ``ConflictError`` means "reload". ``snapshot_version``
    is the stored row's newest snapshot, so the writer's snapshot policy knows of
    snapshots other writers stored (else every process would snapshot on its own).
    """

    def __init__(
        self,
        execution_id: str,
        expected: int,
        actual: int,
        newer: list[tuple[int, int, str | None, bytes]],
        snapshot_version: int = 0,
    ) -> None:
        super().__init__(execution_id, expected, actual)
        self.newer = newer
        self.snapshot_version = snapshot_version


def conflict_with(
    execution_id: str,
    expected: int,
    actual: int,
    newer: list[tuple[int, int, str | None, bytes]],
    snapshot_version: int = 0,
) -> ConflictError:
    """A ``NewerVersionsConflict`` when ``newer`` is exactly the versions from
    ``expected + 1`` to ``actual``, else a plain ``ConflictError``."""
    if 0 < expected < actual and [delta[0] for delta in newer] == list(
        range(expected + 1, actual + 1)
    ):
        return NewerVersionsConflict(execution_id, expected, actual, newer, snapshot_version)
    return ConflictError(execution_id, expected, actual)


#: A stored delta as the core's ``rebuild`` takes it: (version, recorded_at_us, delta).
StoredDelta = tuple[int, int, bytes]


def items_of_batch(
    batch: RecordBatch, snapshot: Sequence[bool]
) -> tuple[list[WriteItem], list[int]]:
    """A batch as per-version write items (a snapshot on each flagged chain's last
    version), and the snapshot sizes per chain: ``write_batch`` through ``write``."""
    records = batch.records()
    last_of = {record.execution_id: position for position, record in enumerate(records)}
    lasts = [last_of[chain[0]] for chain in batch.chains()]
    wanted = {last for last, flag in zip(lasts, snapshot, strict=True) if flag}
    items = [
        WriteItem(record, record.snapshot() if position in wanted else None)
        for position, record in enumerate(records)
    ]
    sizes = [len(items[last].snapshot or b"") for last in lasts]
    return items, sizes


def refusals_of(
    items: Sequence[WriteItem], outcomes: Sequence[WfstateError | None]
) -> dict[str, WfstateError]:
    """Per execution, the first refusal among ``write``'s outcomes."""
    refusals: dict[str, WfstateError] = {}
    for item, outcome in zip(items, outcomes, strict=True):
        if outcome is not None:
            refusals.setdefault(item.record.execution_id, outcome)
    return refusals


@dataclass(frozen=True, slots=True)
class LoadedExecution:
    """What ``rebuild`` needs for one execution, up to some version.

    ``snapshot`` is the newest snapshot at or below that version (None: replay from
    version 1), ``deltas`` the deltas after the snapshot, in version order, and
    ``delta_bytes`` their total size (the snapshot policy starts from it).
    """

    execution_id: str
    snapshot: bytes | None
    snapshot_version: int
    deltas: list[StoredDelta] = field(default_factory=list)

    @property
    def delta_bytes(self) -> int:
        return sum(len(delta) for _, _, delta in self.deltas)


@runtime_checkable
class Store(Protocol):
    """A durable home for executions' rows, deltas and snapshots. Thread-safe."""

    #: The store's URL, with any password replaced by ``***``.
    url: str

    def schema_version(self) -> int:
        """The version of the schema the store is at (migrations applied on open)."""
        ...

    @property
    def groups_writes(self) -> bool:
        """Whether ``write`` group-commits the callers of many threads itself (then the
        manager calls it directly instead of through its ``GroupCommitter``)."""
        ...

    def write_stats(self) -> tuple[int, int]:
        """With ``groups_writes``: (transactions written, versions they carried)."""
        ...

    def write(self, items: Sequence[WriteItem]) -> list[WfstateError | None]:
        """Write a batch in one transaction; return one outcome per item.

        Items of one execution form a chain in version order (each ``base_version``
        is the previous item's ``version``; a creation has base 0). Per execution,
        the whole chain is applied if the stored version equals its first
        ``base_version`` (for a creation: no such execution), else none of it, and
        each of its items gets ``ConflictError(id, expected=base, actual=stored)``
        (``AlreadyExistsError`` for a creation). A chain whose first item carries a
        lease is applied only if the execution's lease is still that owner's grant
        with that token, else its items get ``LeaseLostError`` (checked before the
        version). The deltas record the lease they were written under. Other
        executions of the batch are unaffected. ``None`` means written.

        Raises ``StoreUnavailableError`` when the transaction could not commit: then
        nothing of the batch was written.
        """
        ...

    def write_pending(
        self,
        cursor: EventCursor,
        tracker: SnapshotTracker,
        max_events: int,
        timeout: float,
        skip_before: Mapping[str, int],
        keep_going: float = 0.0,
    ) -> PendingWrite | None:
        """The write-behind's step fused, or None when the store has none (the flusher
        then calls ``cursor.read_batch``, ``tracker.decide_chain`` per chain and
        ``write_batch`` itself, each taking the GIL back; a fused step takes it back
        once). Reads the next batch from the durable ``cursor`` as ``read_batch``
        does, decides its snapshots and writes it like ``write_batch``; the cursor is
        not committed. A failed write is reported in ``PendingWrite.error``, with the
        batch and its decisions kept for a retry by ``write_batch``.

        While the reads come full (they stopped at ``max_events`` events) and their
        batches are stored whole, a step may go on, for up to ``keep_going`` seconds
        after its first read: each such batch's snapshot sizes go to ``tracker``, it
        is taken off the cursor (``commit()``) and counted in
        ``PendingWrite.earlier``; the last batch is returned as above.
        """
        ...

    def write_update(
        self,
        core: Core,
        tracker: SnapshotTracker,
        execution_id: str,
        update: StateUpdate | Mapping[str, Any],
        expected_version: int | None,
        actor: str | None,
    ) -> tuple[int, WfstateError | None] | None:
        """The sync path of one update without a lease in one call, or None, with
        nothing done, when the store has none (the manager then prepares the update
        with ``core.prepare``, decides its snapshot, writes it with ``write`` and
        publishes it, each a call of its own, and does not ask this store again).

        Prepares the update on ``core`` as ``Core.prepare`` does (raising what that
        raises, with nothing written), decides its snapshot with ``tracker`` as
        ``snapshot_for`` does (and takes the decision back with ``undo`` when the
        write fails or is refused), writes it as ``write`` would, and publishes it on
        ``core`` once stored; if memory moved on meanwhile (another thread reloaded
        the execution), memory is brought to the stored version instead, when it is
        behind it. Returns ``(new version, None)``, or ``(base version, refusal)``
        when the store refused it, the refusal as ``write`` reports it; nothing is
        then published. Raises ``StoreUnavailableError`` when the write failed:
        nothing is stored and nothing published. The preparation reserves the
        version's ring room as ``Core.prepare`` does (``BackpressureError`` then,
        with nothing written, when there is none); ``ClosedError`` after the write
        leaves the version stored and not published, as ``write`` followed by
        ``Core.publish`` would.
        """
        ...

    def write_batch(
        self, batch: RecordBatch, snapshot: Sequence[bool]
    ) -> tuple[dict[str, WfstateError], list[int]]:
        """Write a write-behind batch (``EventCursor.read_batch``) in one transaction.

        The same contract as ``write`` for the batch's chains (one per execution,
        ``batch.chains()``), with a snapshot of a chain's last version where
        ``snapshot`` (one flag per chain) says so. Returns the refused executions
        (id -> error; the rest is written) and the size of each chain's snapshot (0:
        none). Raises ``StoreUnavailableError`` when nothing was written.
        """
        ...

    def load(self, execution_id: str, *, version: int | None = None) -> LoadedExecution | None:
        """The snapshot and deltas that rebuild ``version`` (default: the latest).

        None when the execution, or that version of it, is not stored.
        """
        ...

    def active_execution_ids(self) -> list[str]:
        """Ids of stored executions whose status is running or suspended."""
        ...

    def current_versions(self, execution_ids: Sequence[str]) -> dict[str, int]:
        """The stored version of each of these executions that exists."""
        ...

    def version_at(self, execution_id: str, at_us: int) -> int | None:
        """The newest version recorded at or before ``at_us`` (µs since the epoch)."""
        ...

    def read_deltas(
        self,
        execution_id: str,
        *,
        after_version: int | None = None,
        since_us: int | None = None,
        until_us: int | None = None,
    ) -> list[tuple[int, int, str | None, bytes]]:
        """Deltas as ``(version, recorded_at_us, actor, delta)``, in version order.

        ``since_us <= recorded_at < until_us`` and ``version > after_version`` when
        given. The caller filters events further (types, node, limit).
        """
        ...

    def list_execution_ids(
        self,
        *,
        statuses: Sequence[str] | None = None,
        workflow_id: str | None = None,
        limit: int | None = None,
    ) -> list[str]:
        """Ids of stored executions, oldest first (creation time, then id)."""
        ...

    def storage_bytes(self) -> int:
        """Bytes the store's tables and indexes take (for the efficiency figures)."""
        ...

    def acquire_lease(self, execution_id: str, owner: str, ttl_us: int) -> LeaseGrant:
        """Grant ``owner`` the execution for ``ttl_us`` µs (store clock) with the next
        fencing token. Raises ``NotFoundError`` for an unknown execution and
        ``LeaseHeldError`` while another owner's lease is live. The same owner may
        acquire again: it gets a new token."""
        ...

    def renew_lease(self, execution_id: str, owner: str, token: int, ttl_us: int) -> LeaseGrant:
        """Move the lease's expiry to now + ``ttl_us``; ``LeaseLostError`` unless it is
        still the execution's grant to ``owner`` with ``token`` (expired but not
        taken is still the grant)."""
        ...

    def release_lease(self, execution_id: str, owner: str, token: int) -> bool:
        """End the lease now; False (and nothing changed) when it was not the grant."""
        ...

    def get_lease(self, execution_id: str) -> LeaseGrant | None:
        """The execution's current grant (live or expired), or None when it has none."""
        ...

    def claim_orphans(self, owner: str, ttl_us: int, limit: int) -> list[LeaseGrant]:
        """Grant ``owner`` up to ``limit`` running executions whose lease expired or
        was released, oldest expiry first, each with the next token; atomically, so
        two claimers never get the same execution."""
        ...

    def owned_execution_ids(self, owner: str) -> list[str]:
        """Running or suspended executions whose lease (live or expired) is ``owner``'s."""
        ...

    def lease_log(self, execution_id: str) -> list[tuple[int, str | None, int | None]]:
        """``(version, lease owner, token)`` of every stored version, in version order
        (None, None for versions written without a lease): the audit of fencing."""
        ...

    def close(self) -> None:
        """Release connections. Idempotent."""
        ...
