"""Execution leases with fencing tokens, and the background heartbeat that keeps one.

A lease makes one owner (a worker process, an engine instance) the only writer of an
execution *among writers that use leases*. Each grant gets a fencing token one
greater than the execution's previous token; a write made under a lease carries its
token and the store applies it only while that token is still the execution's lease
token. So a worker that stalled past its lease's expiry (a GC pause, a network
partition, a SIGSTOP) and lost the execution to another owner cannot overwrite the
new owner's work: its writes raise ``LeaseLostError`` and change nothing.

Time: a lease's expiry is computed by the store's clock (PostgreSQL's
``clock_timestamp()``, the host's clock for SQLite and memory), so owners on hosts
whose clocks disagree still agree on who holds a lease. Expiry alone never fences a
write: only a new grant to another owner does (so an owner whose lease ran out while
nobody wanted the execution loses nothing).

This module must never decide anything on a caller's clock that the store decides;
the in-process ``LeaseTable`` *is* the store for ``memory://`` and for a manager
without a store.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from wfstate.errors import LeaseHeldError, LeaseLostError, StoreUnavailableError

__all__ = ["Heartbeat", "Lease", "LeaseGrant", "LeaseTable", "from_micros", "now_us"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def now_us() -> int:
    """The host's wall clock in microseconds since the epoch."""
    return time.time_ns() // 1000


def from_micros(micros: int) -> datetime:
    """An aware UTC datetime from microseconds since the epoch."""
    return _EPOCH + timedelta(microseconds=micros)


class LeaseGrant(NamedTuple):
    """A lease as a store records it: the holder (None once released), the
    execution's fencing token and when the lease expires (µs since the epoch)."""

    execution_id: str
    owner: str | None
    token: int
    expires_at_us: int


@dataclass(frozen=True, slots=True)
class Lease:
    """One owner's lease on one execution.

    ``token`` is the fencing token: it grows with every grant of the execution, so a
    write carrying an older token is refused once someone else was granted the
    execution. ``expires_at`` (aware, UTC, by the store's clock) is when another
    owner may take it unless ``renew`` moves it; ``ttl`` is the duration in seconds
    it was granted (or last renewed) for.
    """

    execution_id: str
    owner: str
    token: int
    expires_at: datetime
    ttl: float

    @property
    def expired(self) -> bool:
        """Whether ``expires_at`` has passed by this host's clock (an estimate: the
        store's clock decides)."""
        return datetime.now(UTC) >= self.expires_at

    @classmethod
    def _from_grant(cls, grant: LeaseGrant, ttl: float) -> Lease:
        assert grant.owner is not None
        return cls(
            grant.execution_id, grant.owner, grant.token, from_micros(grant.expires_at_us), ttl
        )


class _Row:
    __slots__ = ("expires_at_us", "owner", "token")

    def __init__(self) -> None:
        self.owner: str | None = None
        self.token = 0
        self.expires_at_us = 0


class LeaseTable:
    """The leases of executions held in this process (``memory://`` and no store).

    Not locked: its owner calls it under the lock that also guards the executions
    (so a write's token check and the write itself are one atomic step).
    """

    __slots__ = ("_rows",)

    def __init__(self) -> None:
        self._rows: dict[str, _Row] = {}

    def acquire(self, execution_id: str, owner: str, ttl_us: int) -> LeaseGrant:
        now = now_us()
        row = self._rows.setdefault(execution_id, _Row())
        if row.owner is not None and row.owner != owner and row.expires_at_us > now:
            raise LeaseHeldError(execution_id, row.owner, from_micros(row.expires_at_us))
        row.owner = owner
        row.token += 1
        row.expires_at_us = now + ttl_us
        return LeaseGrant(execution_id, owner, row.token, row.expires_at_us)

    def renew(self, execution_id: str, owner: str, token: int, ttl_us: int) -> LeaseGrant:
        self.check(execution_id, owner, token)
        row = self._rows[execution_id]
        row.expires_at_us = now_us() + ttl_us
        return LeaseGrant(execution_id, owner, token, row.expires_at_us)

    def release(self, execution_id: str, owner: str, token: int) -> bool:
        row = self._rows.get(execution_id)
        if row is None or row.owner != owner or row.token != token:
            return False
        row.owner = None
        row.expires_at_us = 0
        return True

    def get(self, execution_id: str) -> LeaseGrant | None:
        row = self._rows.get(execution_id)
        if row is None or row.owner is None:
            return None
        return LeaseGrant(execution_id, row.owner, row.token, row.expires_at_us)

    def check(self, execution_id: str, owner: str, token: int) -> None:
        """Raise ``LeaseLostError`` unless ``token`` is the execution's live grant to
        ``owner`` (expired but not taken counts as live)."""
        row = self._rows.get(execution_id)
        if row is None or row.owner != owner or row.token != token:
            current = None if row is None or row.owner is None else row.token
            raise LeaseLostError(execution_id, token, current)

    def claim(
        self, running: Iterable[str], owner: str, ttl_us: int, limit: int
    ) -> list[LeaseGrant]:
        """Grant ``owner`` up to ``limit`` of the ``running`` executions whose lease
        expired or was released (executions never leased are not orphans)."""
        now = now_us()
        grants: list[LeaseGrant] = []
        orphans = [
            (row.expires_at_us, execution_id)
            for execution_id in running
            if (row := self._rows.get(execution_id)) is not None
            and row.token > 0
            and (row.owner is None or row.expires_at_us <= now)
        ]
        for _, execution_id in sorted(orphans)[:limit]:
            row = self._rows[execution_id]
            row.owner = owner
            row.token += 1
            row.expires_at_us = now + ttl_us
            grants.append(LeaseGrant(execution_id, owner, row.token, row.expires_at_us))
        return grants

    def owned(self, owner: str) -> list[str]:
        return [execution_id for execution_id, row in self._rows.items() if row.owner == owner]


class Heartbeat:
    """Renews a lease in a daemon thread every ``interval`` seconds until stopped.

    ``lease`` is the latest renewal. When the lease is lost (another owner took the
    execution) the heartbeat stops, ``lost`` becomes True, ``error`` holds the
    ``LeaseLostError`` and ``on_lost`` (if given) is called with it from the
    heartbeat's thread. While the store is unavailable it retries every
    ``interval / 4`` and keeps the error in ``error``; the lease is not lost unless
    another owner takes it. Use it as a context manager, or call ``stop()``.
    """

    def __init__(
        self,
        renew: Callable[[Lease], Lease],
        lease: Lease,
        *,
        interval: float,
        on_lost: Callable[[LeaseLostError], object] | None = None,
    ) -> None:
        self._renew = renew
        self._lease = lease
        self._interval = interval
        self._on_lost = on_lost
        self._stopped = threading.Event()
        self._lost = threading.Event()
        self.error: BaseException | None = None
        self.renewals = 0
        self._thread = threading.Thread(
            target=self._run, name=f"wfstate-heartbeat-{lease.execution_id}", daemon=True
        )
        self._thread.start()

    @property
    def lease(self) -> Lease:
        """The lease as last renewed."""
        return self._lease

    @property
    def lost(self) -> bool:
        """Whether another owner took the execution (the heartbeat has stopped)."""
        return self._lost.is_set()

    def wait_lost(self, timeout: float | None = None) -> bool:
        """Block until the lease is lost or ``timeout`` passes; return ``lost``."""
        return self._lost.wait(timeout)

    def _run(self) -> None:
        wait = self._interval
        while not self._stopped.wait(wait):
            try:
                self._lease = self._renew(self._lease)
            except LeaseLostError as e:
                self.error = e
                self._lost.set()
                if self._on_lost is not None:
                    self._on_lost(e)
                return
            except StoreUnavailableError as e:
                self.error = e
                wait = self._interval / 4
                continue
            except Exception as e:  # a closed manager, for instance: stop quietly
                self.error = e
                return
            self.error = None
            self.renewals += 1
            wait = self._interval

    def stop(self) -> None:
        """Stop renewing (the lease is kept until it expires or is released)."""
        self._stopped.set()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def __enter__(self) -> Heartbeat:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
