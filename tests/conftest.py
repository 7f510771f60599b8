"""Shared fixtures of the wfstate test suites.

In-memory fixtures (``manager``) need nothing. The durable ones pick a store per
test: ``store_url`` runs a test once per backend (``memory://``, SQLite in the test's
own directory, PostgreSQL in a namespace of its own) and ``durability`` once per
write mode.

PostgreSQL comes from ``$WFSTATE_TEST_POSTGRES_URL`` (default
``postgresql://root@127.0.0.1:5432/test``). A developer without a server gets those
tests skipped; under ``CI=true`` a missing server fails them instead, so CI never
passes by skipping.

Isolation: ``open_store(url)`` gives ``PostgresStore`` no ``schema`` (its tables are
always ``public.wfstate_*`` and a libpq URL has no parameter that could carry a
schema), so the namespace is a database. The session creates one private database
(never the shared one named by the URL, which other people's runs may be using) and
every test starts from an empty ``public`` schema in it; the database is dropped when
the session ends.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal, NoReturn
from urllib.parse import urlsplit, urlunsplit

import pytest

from wfstate import StateManager
from wfstate.store import Store, open_store
from wfstate.store.sqlite import NATIVE_WRITER_ENV

if TYPE_CHECKING:
    import psycopg

#: Where the PostgreSQL tests find a server, unless the environment says otherwise.
DEFAULT_TEST_POSTGRES_URL = "postgresql://root@127.0.0.1:5432/test"
POSTGRES_URL_ENV = "WFSTATE_TEST_POSTGRES_URL"

Backend = Literal["memory", "sqlite", "postgresql"]
BACKENDS: tuple[Backend, ...] = ("memory", "sqlite", "postgresql")


def in_ci() -> bool:
    """Whether this run is CI's, where every service must be there."""
    return os.environ.get("CI", "").strip().lower() == "true"


def service_missing(reason: str) -> NoReturn:
    """Skip the test on a developer's machine; fail it under ``CI=true``."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing service is a failure)", pytrace=False)
    pytest.skip(reason)


def with_database(url: str, database: str) -> str:
    """``url`` naming another database on the same server."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


def hide_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


@pytest.fixture
def manager() -> Iterator[StateManager]:
    """A fresh in-memory StateManager with default options, closed after the test."""
    state_manager = StateManager()
    try:
        yield state_manager
    finally:
        state_manager.close()


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The test server's URL, once it answered; skips (fails under CI=true) otherwise."""
    url = os.environ.get(POSTGRES_URL_ENV) or DEFAULT_TEST_POSTGRES_URL
    try:
        import psycopg
    except ImportError:
        service_missing("psycopg is not installed (pip install 'wfstate[postgres]')")
    try:
        with psycopg.connect(url, connect_timeout=3, autocommit=True) as connection:
            connection.execute("SELECT 1")
    except psycopg.Error as error:
        service_missing(f"PostgreSQL at {hide_password(url)} is unreachable: {error}")
    return url


@pytest.fixture(scope="session")
def postgres_database_url(postgres_url: str) -> Iterator[str]:
    """A database private to this session, dropped at its end."""
    import psycopg
    from psycopg import sql

    name = f"wfstate_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_url, connect_timeout=3, autocommit=True) as connection:
        drop_abandoned_databases(connection)
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_database(postgres_url, name)
    finally:
        with psycopg.connect(postgres_url, connect_timeout=10, autocommit=True) as connection:
            connection.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def drop_abandoned_databases(connection: psycopg.Connection[Any]) -> None:
    """Drop the private databases of sessions that died before their teardown (killed,
    or the server was down when they ended): named after a pid that no longer runs
    here, and with nobody connected (DROP without FORCE refuses otherwise)."""
    import psycopg
    from psycopg import sql

    rows = connection.execute(
        "SELECT datname FROM pg_database WHERE datname LIKE 'wfstate\\_test\\_%'"
    ).fetchall()
    for (name,) in rows:
        parts = name.split("_")
        if len(parts) != 4 or not parts[2].isdigit() or pid_alive(int(parts[2])):
            continue
        with contextlib.suppress(psycopg.Error):
            connection.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reset_postgres_database(url: str) -> None:
    """Empty the database: end its other sessions, then recreate ``public``."""
    import psycopg

    with psycopg.connect(url, connect_timeout=10, autocommit=True) as connection:
        # A pool a failed test left open would hold locks that DROP SCHEMA waits for.
        connection.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        connection.execute("DROP SCHEMA IF EXISTS public CASCADE")
        connection.execute("CREATE SCHEMA public")


@pytest.fixture
def postgres_test_url(postgres_database_url: str) -> Iterator[str]:
    """The session's database, empty at the start of the test and emptied after it."""
    reset_postgres_database(postgres_database_url)
    yield postgres_database_url
    reset_postgres_database(postgres_database_url)


def backend_url(request: pytest.FixtureRequest, backend: Backend) -> str:
    """A fresh, empty store of ``backend`` for the requesting test."""
    if backend == "memory":
        return "memory://"
    if backend == "sqlite":
        tmp_path = request.getfixturevalue("tmp_path")
        return f"sqlite:///{tmp_path}/wfstate-test.db"
    url: str = request.getfixturevalue("postgres_test_url")
    return url


@pytest.fixture(params=[*BACKENDS, "sqlite-sqlite3"])
def store_url(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The URL of an empty store, once per backend; ``sqlite-sqlite3`` is SQLite
    writing through the ``sqlite3`` module instead of its native writer."""
    if request.param == "sqlite-sqlite3":
        monkeypatch.setenv(NATIVE_WRITER_ENV, "0")
        return backend_url(request, "sqlite")
    backend: Backend = request.param
    return backend_url(request, backend)


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    """An empty store of each backend (``store_url``), closed after the test."""
    opened = open_store(store_url)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def durable_store_url(request: pytest.FixtureRequest) -> str:
    """The URL of an empty store that outlives its connections (not ``memory://``)."""
    backend: Backend = request.param
    return backend_url(request, backend)


@pytest.fixture(params=["sync", "async"])
def durability(request: pytest.FixtureRequest) -> Literal["sync", "async"]:
    """Each durable test runs with synchronous writes and with the write-behind."""
    mode: Literal["sync", "async"] = request.param
    return mode
