"""Configuration read in one place: store URLs and ``WFSTATE_*`` environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit, urlunsplit

from wfstate.errors import ValidationError

__all__ = ["DEFAULT_DATABASE_URL", "StoreURL", "database_url", "parse_store_url"]

#: Used when neither an explicit URL nor ``WFSTATE_DATABASE_URL`` is given.
DEFAULT_DATABASE_URL = "sqlite:///wfstate.db"

#: The environment variable that names the store when ``StateManager.open()`` gets none.
DATABASE_URL_ENV = "WFSTATE_DATABASE_URL"


@dataclass(frozen=True, slots=True)
class StoreURL:
    """A parsed store URL. ``display`` is safe to log: it never holds a password."""

    scheme: str  # "memory", "sqlite" or "postgresql"
    raw: str
    display: str
    path: str = ""  # sqlite: the database file


def database_url(url: str | None) -> str:
    """The URL to open: the given one, else ``$WFSTATE_DATABASE_URL``, else the default."""
    if url is not None:
        return url
    return os.environ.get(DATABASE_URL_ENV) or DEFAULT_DATABASE_URL


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def parse_store_url(url: str) -> StoreURL:
    """Parse ``memory://``, ``sqlite:///relative.db``, ``sqlite:////abs.db`` or
    ``postgresql://user:pass@host:port/db?options``.

    Raises ``ValidationError`` for anything else.
    """
    if not isinstance(url, str) or not url:
        raise ValidationError(f"a store URL must be a non-empty str, not {url!r}")
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValidationError(
            f"{url!r} is not a store URL (use memory://, sqlite:///path.db or postgresql://...)"
        )
    scheme = scheme.lower()
    if scheme == "memory":
        return StoreURL("memory", url, url)
    if scheme == "sqlite":
        # SQLAlchemy's form: sqlite:///relative/path.db, sqlite:////absolute/path.db
        path = unquote(rest[1:] if rest.startswith("/") else rest)
        path = path.split("?", 1)[0]
        if not path:
            raise ValidationError(f"{url!r} names no database file (sqlite:///path/to/file.db)")
        return StoreURL("sqlite", url, url, path=path)
    if scheme in ("postgresql", "postgres", "postgresql+psycopg"):
        raw = "postgresql://" + rest
        return StoreURL("postgresql", raw, _redacted(raw))
    raise ValidationError(
        f"unknown store scheme {scheme!r} in {_redacted(url)!r} "
        "(use memory://, sqlite:///path.db or postgresql://...)"
    )
