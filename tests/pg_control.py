"""Control of the local PostgreSQL cluster for the tests that restart it.

``test_pg_restart.py`` and the chaos run (``chaos.py``) stop and start the cluster
with ``pg_ctlcluster``, which needs root and a cluster under /etc/postgresql.
Whatever a caller does, ``restart`` leaves the server running and answering.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

CLUSTERS = Path("/etc/postgresql")
DEFAULT_TEST_POSTGRES_URL = "postgresql://root@127.0.0.1:5432/test"


def cluster_version() -> str | None:
    if not CLUSTERS.is_dir():
        return None
    versions = sorted(entry.name for entry in CLUSTERS.iterdir() if (entry / "main").is_dir())
    return versions[-1] if versions else None


def can_restart() -> str | None:
    """None when this process may restart the cluster, else why not."""
    if shutil.which("pg_ctlcluster") is None or cluster_version() is None:
        return "pg_ctlcluster and a cluster under /etc/postgresql are needed"
    if os.geteuid() != 0:
        return "restarting PostgreSQL with pg_ctlcluster needs root"
    return None


def pg_ctlcluster(action: str) -> None:
    version = cluster_version()
    assert version is not None
    command = ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action]
    if action == "stop":
        command += ["-m", "fast"]
    subprocess.run(command, check=True, timeout=60, capture_output=True)


def answers(url: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=2) as connection:
            connection.execute("SELECT 1")
    except psycopg.Error:
        return False
    return True


def wait_for(url: str, *, up: bool, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while answers(url) != up:
        assert time.monotonic() < deadline, f"PostgreSQL still {'down' if up else 'up'}"
        time.sleep(0.1)


def restart(url: str, *, down_for: float = 1.0) -> None:
    """Stop the cluster (fast: connections are cut), wait ``down_for`` s, start it."""
    try:
        pg_ctlcluster("stop")
        wait_for(url, up=False)
        time.sleep(down_for)
    finally:
        pg_ctlcluster("start")
        wait_for(url, up=True)


def fresh_database(name: str) -> str:
    """An empty database ``name`` on the test server (dropped first if it exists)."""
    import psycopg
    from psycopg import sql

    from conftest import POSTGRES_URL_ENV, with_database

    server = os.environ.get(POSTGRES_URL_ENV) or DEFAULT_TEST_POSTGRES_URL
    with psycopg.connect(server, connect_timeout=3, autocommit=True) as connection:
        connection.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return with_database(server, name)
