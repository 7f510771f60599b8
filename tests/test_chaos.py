"""Fault injection across processes: the chaos run (``chaos.py``) as a test.

Eight worker processes share 100 executions on PostgreSQL, doing ``transact``
increments and leased node work; workers are SIGKILLed at random and restarted, and
PostgreSQL is restarted once. Then the checker verifies every execution: no
acknowledged update lost, versions contiguous, replay equal to the stored state, no
lost increment, and no two owners writing under one lease token. The same runs on
SQLite with four processes of this host (no server to restart). ``make chaos`` runs
a longer version.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import pg_control
from chaos import run_chaos
from conftest import service_missing

pytestmark = pytest.mark.slow


def test_chaos_on_postgresql(postgres_test_url: str, tmp_path: Path) -> None:
    reason = pg_control.can_restart()
    if reason is not None:
        service_missing(reason)
    report = run_chaos(
        postgres_test_url,
        tmp_path,
        workers=8,
        executions=100,
        duration=24.0,
        kill_every=(1.0, 2.5),
        restart_postgres=lambda: pg_control.restart(postgres_test_url),
    )
    print(report.summary())
    assert report.lost == []
    assert report.inconsistent == []
    assert report.acknowledged == report.found > 0
    assert report.kills >= 5
    assert report.restarts_of_postgres == 1
    assert report.store_errors > 0  # the restart was felt
    assert report.lease_takeovers > 0
    assert report.conflicts > 0
    assert report.conflicts_unresolved == 0, report.given_up


def test_chaos_on_sqlite(tmp_path: Path) -> None:
    report = run_chaos(
        f"sqlite:///{tmp_path}/chaos.db",
        tmp_path / "run",
        workers=4,
        executions=40,
        duration=12.0,
        kill_every=(1.0, 2.5),
    )
    print(report.summary())
    assert report.lost == []
    assert report.inconsistent == []
    assert report.acknowledged == report.found > 0
    assert report.kills >= 3
    assert report.lease_takeovers > 0
    assert report.conflicts > 0
    assert report.conflicts_unresolved == 0, report.given_up
