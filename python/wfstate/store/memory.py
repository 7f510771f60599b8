"""The in-process store (``memory://``): the store contract with plain dicts.

For tests and for engines that want the durable code path without a database: it
keeps rows, deltas and snapshots exactly as the SQL stores do and enforces the same
version checks, but it lives and dies with the process.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from wfstate._core import RecordBatch
from wfstate._lease import LeaseGrant, LeaseTable
from wfstate.errors import (
    AlreadyExistsError,
    LeaseLostError,
    NotFoundError,
    WfstateError,
)
from wfstate.store.base import (
    ACTIVE_STATUSES,
    NEWER_DELTAS_LIMIT,
    GroupedByManager,
    LoadedExecution,
    WriteItem,
    conflict_with,
    items_of_batch,
    refusals_of,
)

__all__ = ["MemoryStore"]


@dataclass(slots=True)
class _Row:
    workflow_id: str
    status: str
    version: int
    created_at_us: int
    updated_at_us: int
    #: (version, recorded_at_us, actor, delta), in version order.
    deltas: list[tuple[int, int, str | None, bytes]] = field(default_factory=list)
    #: version -> snapshot bytes.
    snapshots: dict[int, bytes] = field(default_factory=dict)
    forked_from: tuple[str, int] | None = None
    #: version -> (lease owner, token) of the versions written under a lease.
    leases: dict[int, tuple[str, int]] = field(default_factory=dict)


class MemoryStore(GroupedByManager):
    """Rows, deltas and snapshots in dicts, behind one lock."""

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._lock = threading.Lock()
        self._rows: dict[str, _Row] = {}
        self._leases = LeaseTable()
        self._closed = False

    def schema_version(self) -> int:
        return 2

    def write(self, items: Sequence[WriteItem]) -> list[WfstateError | None]:
        chains: dict[str, list[int]] = {}
        for position, item in enumerate(items):
            chains.setdefault(item.record.execution_id, []).append(position)
        outcomes: list[WfstateError | None] = [None] * len(items)
        with self._lock:
            for execution_id, positions in chains.items():
                first = items[positions[0]].record
                row = self._rows.get(execution_id)
                refusal: WfstateError | None = None
                lease = items[positions[0]].lease
                if lease is not None:
                    try:
                        self._leases.check(execution_id, *lease)
                    except LeaseLostError as e:
                        refusal = e
                if refusal is None and first.base_version == 0 and row is not None:
                    refusal = AlreadyExistsError(f"execution {execution_id!r} exists already")
                elif (
                    refusal is None
                    and first.base_version != 0
                    and (row is None or row.version != first.base_version)
                ):
                    actual = 0 if row is None else row.version
                    newer = [] if row is None else self._newer(row, first.base_version)
                    snapshot_version = max(row.snapshots, default=0) if row is not None else 0
                    refusal = conflict_with(
                        execution_id, first.base_version, actual, newer, snapshot_version
                    )
                if refusal is not None:
                    for position in positions:
                        outcomes[position] = refusal
                    continue
                for position in positions:
                    self._apply(items[position])
        return outcomes

    @staticmethod
    def _newer(row: _Row, base_version: int) -> list[tuple[int, int, str | None, bytes]]:
        if row.version - base_version > NEWER_DELTAS_LIMIT or base_version < 1:
            return []
        start = bisect.bisect_right([d[0] for d in row.deltas], base_version)
        return row.deltas[start:]

    def write_batch(
        self, batch: RecordBatch, snapshot: Sequence[bool]
    ) -> tuple[dict[str, WfstateError], list[int]]:
        items, sizes = items_of_batch(batch, snapshot)
        return refusals_of(items, self.write(items)), sizes

    def _apply(self, item: WriteItem) -> None:
        record = item.record
        if record.base_version == 0:
            row = _Row(
                workflow_id=record.workflow_id,
                status=record.status,
                version=record.version,
                created_at_us=record.created_at_us,
                updated_at_us=record.updated_at_us,
                forked_from=record.forked_from,
            )
            self._rows[record.execution_id] = row
        else:
            row = self._rows[record.execution_id]
            row.status = record.status
            row.version = record.version
            row.updated_at_us = record.updated_at_us
        row.deltas.append((record.version, record.updated_at_us, record.actor, record.delta))
        if item.lease is not None:
            row.leases[record.version] = item.lease
        if item.snapshot is not None:
            row.snapshots[record.version] = item.snapshot

    def load(self, execution_id: str, *, version: int | None = None) -> LoadedExecution | None:
        with self._lock:
            row = self._rows.get(execution_id)
            if row is None:
                return None
            target = row.version if version is None else version
            if target < 1 or target > row.version:
                return None
            snapshot_version = max((v for v in row.snapshots if v <= target), default=0)
            snapshot = row.snapshots.get(snapshot_version)
            start = bisect.bisect_right([d[0] for d in row.deltas], snapshot_version)
            deltas = [(v, at_us, delta) for v, at_us, _, delta in row.deltas[start:] if v <= target]
            return LoadedExecution(execution_id, snapshot, snapshot_version, deltas)

    def active_execution_ids(self) -> list[str]:
        with self._lock:
            return self._ordered(
                [i for i, row in self._rows.items() if row.status in ACTIVE_STATUSES]
            )

    def current_versions(self, execution_ids: Sequence[str]) -> dict[str, int]:
        with self._lock:
            return {i: self._rows[i].version for i in execution_ids if i in self._rows}

    def version_at(self, execution_id: str, at_us: int) -> int | None:
        with self._lock:
            row = self._rows.get(execution_id)
            if row is None:
                return None
            versions = [v for v, recorded, _, _ in row.deltas if recorded <= at_us]
            return max(versions, default=None)

    def read_deltas(
        self,
        execution_id: str,
        *,
        after_version: int | None = None,
        since_us: int | None = None,
        until_us: int | None = None,
    ) -> list[tuple[int, int, str | None, bytes]]:
        with self._lock:
            row = self._rows.get(execution_id)
            if row is None:
                return []
            return [
                delta
                for delta in row.deltas
                if (after_version is None or delta[0] > after_version)
                and (since_us is None or delta[1] >= since_us)
                and (until_us is None or delta[1] < until_us)
            ]

    def list_execution_ids(
        self,
        *,
        statuses: Sequence[str] | None = None,
        workflow_id: str | None = None,
        limit: int | None = None,
    ) -> list[str]:
        with self._lock:
            ids = [
                execution_id
                for execution_id, row in self._rows.items()
                if (statuses is None or row.status in statuses)
                and (workflow_id is None or row.workflow_id == workflow_id)
            ]
            ordered = self._ordered(ids)
        return ordered if limit is None else ordered[:limit]

    def _ordered(self, ids: list[str]) -> list[str]:
        return sorted(ids, key=lambda i: (self._rows[i].created_at_us, i))

    def storage_bytes(self) -> int:
        with self._lock:
            return sum(
                sum(len(d[3]) for d in row.deltas) + sum(len(s) for s in row.snapshots.values())
                for row in self._rows.values()
            )

    def acquire_lease(self, execution_id: str, owner: str, ttl_us: int) -> LeaseGrant:
        with self._lock:
            if execution_id not in self._rows:
                raise NotFoundError(f"no execution {execution_id!r}")
            return self._leases.acquire(execution_id, owner, ttl_us)

    def renew_lease(self, execution_id: str, owner: str, token: int, ttl_us: int) -> LeaseGrant:
        with self._lock:
            return self._leases.renew(execution_id, owner, token, ttl_us)

    def release_lease(self, execution_id: str, owner: str, token: int) -> bool:
        with self._lock:
            return self._leases.release(execution_id, owner, token)

    def get_lease(self, execution_id: str) -> LeaseGrant | None:
        with self._lock:
            return self._leases.get(execution_id)

    def claim_orphans(self, owner: str, ttl_us: int, limit: int) -> list[LeaseGrant]:
        with self._lock:
            running = [i for i, row in self._rows.items() if row.status == "running"]
            return self._leases.claim(running, owner, ttl_us, limit)

    def owned_execution_ids(self, owner: str) -> list[str]:
        with self._lock:
            return self._ordered(
                [
                    i
                    for i in self._leases.owned(owner)
                    if i in self._rows and self._rows[i].status in ACTIVE_STATUSES
                ]
            )

    def lease_log(self, execution_id: str) -> list[tuple[int, str | None, int | None]]:
        with self._lock:
            row = self._rows.get(execution_id)
            if row is None:
                return []
            return [
                (version, *row.leases.get(version, (None, None))) for version, _, _, _ in row.deltas
            ]

    def close(self) -> None:
        self._closed = True
