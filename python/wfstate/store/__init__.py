"""Durable stores behind one Protocol: ``memory``, ``sqlite`` (the embedded default)
and ``postgresql``. ``open_store(url)`` picks one by URL scheme.
"""

from __future__ import annotations

from wfstate.config import parse_store_url
from wfstate.store.base import LoadedExecution, Store, StoredDelta, WriteItem

__all__ = ["LoadedExecution", "Store", "StoredDelta", "WriteItem", "open_store"]


def open_store(url: str, *, connect_timeout: float = 5.0) -> Store:
    """Open (and migrate) the store at ``url``.

    Raises ``ValidationError`` for a malformed URL and ``StoreUnavailableError``
    (naming the target, never a raw driver error) when it cannot be reached within
    ``connect_timeout`` seconds.
    """
    parsed = parse_store_url(url)
    if parsed.scheme == "memory":
        from wfstate.store.memory import MemoryStore

        return MemoryStore(parsed.display)
    if parsed.scheme == "sqlite":
        from wfstate.store.sqlite import SQLiteStore

        return SQLiteStore(parsed.path, display=parsed.display, connect_timeout=connect_timeout)
    from wfstate.store.postgres import PostgresStore

    return PostgresStore(parsed.raw, display=parsed.display, connect_timeout=connect_timeout)
