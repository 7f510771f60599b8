"""The whole wfstate exception hierarchy, in one place.

Every error wfstate raises on purpose is a :class:`WfstateError`. Where a builtin
exception fits, the class inherits it too, so ``except KeyError`` and
``except ValueError`` keep working in code that does not know wfstate.

The Rust core (``wfstate._core``) raises these same classes; it imports them from
here, so this module must never import ``wfstate._core``.
"""

from __future__ import annotations

__all__ = [
    "AlreadyExistsError",
    "BackpressureError",
    "ClosedError",
    "ConflictError",
    "HistoryEvictedError",
    "InvalidTransitionError",
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
    version the store held. Nothing was changed.
    """

    def __init__(self, execution_id: str, expected: int, actual: int) -> None:
        super().__init__(
            f"version conflict on execution {execution_id!r}: "
            f"expected version {expected}, found {actual}"
        )
        self.execution_id = execution_id
        self.expected = expected
        self.actual = actual

    def __reduce__(self) -> tuple[type[ConflictError], tuple[str, int, int]]:
        return (type(self), (self.execution_id, self.expected, self.actual))


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
