"""The whole wfstate exception hierarchy, in one place.

Every error wfstate raises on purpose is a :class:`WfstateError`. Where a builtin
exception fits, the class inherits it too, so ``except KeyError`` and
``except ValueError`` keep working in code that does not know wfstate.

The Rust core (``wfstate._core``) raises these same classes; it imports them from
here, so this module must never import ``wfstate._core``.
"""

from __future__ import annotations

from datetime import datetime

__all__ = [
    "AlreadyExistsError",
    "BackpressureError",
    "ClosedError",
    "ConflictError",
    "HistoryEvictedError",
    "InvalidTransitionError",
    "LeaseHeldError",
    "LeaseLostError",
    "NotFoundError",
    "StoreUnavailableError",
    "ValidationError",
    "WfstateError",
]


class WfstateError(Exception):
    """The root of every error wfstate raises on purpose."""


class NotFoundError(WfstateError, KeyError):
    """No execution (or no such version of it) exists under that id."""

    def __str__(self) -> str:
        # KeyError.__str__ repr()s its argument; a message reads better.
        return str(self.args[0]) if self.args else ""


class AlreadyExistsError(WfstateError):
    """An execution with that id exists already."""


class ConflictError(WfstateError):
    """The execution's version was not the one the write was based on.

    ``expected`` is the version the caller based its write on and ``actual`` the
    version the store held. ``fields`` names what both the write and the newer
    versions changed (``"status"``, ``"variables.<name>"``, ``"nodes.<id>"``, ...)
    when a plain update could not be merged onto the newer versions; it is empty
    when the conflict is only about the version. Nothing was changed.
    """

    def __init__(
        self,
        execution_id: str,
        expected: int,
        actual: int,
        *,
        fields: frozenset[str] = frozenset(),
    ) -> None:
        message = (
            f"version conflict on execution {execution_id!r}: "
            f"expected version {expected}, found {actual}"
        )
        if fields:
            message += f"; both changed {', '.join(sorted(fields))}"
        super().__init__(message)
        self.execution_id = execution_id
        self.expected = expected
        self.actual = actual
        self.fields = frozenset(fields)

    def __reduce__(self) -> tuple[object, ...]:
        return (_conflict, (self.execution_id, self.expected, self.actual, self.fields))


def _conflict(
    execution_id: str, expected: int, actual: int, fields: frozenset[str]
) -> ConflictError:
    return ConflictError(execution_id, expected, actual, fields=fields)


class LeaseHeldError(WfstateError):
    """Another owner holds a live lease on the execution; ``acquire`` could not take it.

    ``owner`` is the holder and ``expires_at`` (aware, UTC) when its lease runs out
    unless renewed. Nothing was changed.
    """

    def __init__(self, execution_id: str, owner: str, expires_at: datetime) -> None:
        super().__init__(
            f"execution {execution_id!r} is leased by {owner!r} until {expires_at.isoformat()}"
        )
        self.execution_id = execution_id
        self.owner = owner
        self.expires_at = expires_at

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.execution_id, self.owner, self.expires_at))


class LeaseLostError(WfstateError):
    """The lease a write (or renew) carried is no longer the execution's lease.

    Another owner took the execution after the lease expired (or it was released):
    ``token`` is the fencing token the caller held, ``current_token`` the one the
    store holds now (None when the execution has no lease). Nothing was changed:
    stop working on the execution.
    """

    def __init__(self, execution_id: str, token: int, current_token: int | None) -> None:
        held = "no lease" if current_token is None else f"token {current_token}"
        super().__init__(
            f"lease on execution {execution_id!r} with token {token} was lost "
            f"(the execution now has {held})"
        )
        self.execution_id = execution_id
        self.token = token
        self.current_token = current_token

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.execution_id, self.token, self.current_token))


class InvalidTransitionError(WfstateError):
    """The update asks for a status change the transition table does not allow.

    See ``docs/semantics.md`` for the table. Nothing was changed.
    """


class ValidationError(WfstateError, ValueError):
    """The input is malformed: not JSON, unknown field or status, bad id, too large.

    Nothing was changed.
    """


class HistoryEvictedError(WfstateError):
    """The requested past version or history is no longer held in memory.

    The in-memory event ring is bounded; its oldest events make room for new
    ones. A durable store (see the persistence docs) keeps every version.
    """


class BackpressureError(WfstateError):
    """The event ring is full of events a durable reader has not taken yet.

    Raised at once when the manager was opened with ``on_ring_full="error"``, or
    after ``ring_full_timeout`` seconds with ``on_ring_full="block"``. The update
    was not applied.
    """


class ClosedError(WfstateError):
    """The StateManager (or event cursor) was closed."""


class StoreUnavailableError(WfstateError):
    """The durable store could not be reached, or failed, for this call.

    ``target`` names the store (its URL without a password). In sync mode the update
    was not applied, in memory or in the store; retry it once the store is back.
    """

    def __init__(self, message: str, *, target: str = "") -> None:
        super().__init__(message)
        self.target = target

    def __reduce__(self) -> tuple[object, ...]:
        return (_store_unavailable, (str(self), self.target))


def _store_unavailable(message: str, target: str) -> StoreUnavailableError:
    return StoreUnavailableError(message, target=target)
