"""PostgreSQL-specific paths of the store: a reply lost after the commit.

When the connection fails after the one-version write was sent, the server may have
committed it and lost only the reply. The store asks the server on a connection of
its own: a version stored exactly as it was sent is reported as written (so the
manager's memory follows the store and the caller is not told of a failure that did
not happen); otherwise the failure stands and nothing is applied.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from durable_support import Recorder, loaded
from wfstate import StateManager, StoreUnavailableError
from wfstate.store import open_store
from wfstate.store.base import WriteItem
from wfstate.store.postgres import PostgresStore


@pytest.fixture
def lose_replies(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make the next one-version writes fail as if the connection died: ``"after"``
    runs the statement first (the reply is lost), ``"before"`` does not send it."""
    plan: list[str] = []
    original = PostgresStore._execute_one

    def failing(self: PostgresStore, conn: Any, shape: Any, parameters: Any) -> Any:
        if plan:
            when = plan.pop(0)
            if when == "after":
                original(self, conn, shape, parameters)
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return original(self, conn, shape, parameters)

    monkeypatch.setattr(PostgresStore, "_execute_one", failing)
    return plan


def test_a_write_whose_reply_was_lost_after_the_commit_is_reported_written(
    postgres_test_url: str, lose_replies: list[str]
) -> None:
    store = open_store(postgres_test_url)
    try:
        recorder = Recorder()
        assert store.write([WriteItem(recorder.create("e1"))]) == [None]
        record = recorder.update("e1", {"variables": {"x": 1}})
        lose_replies.append("after")
        assert store.write([WriteItem(record)]) == [None]
        assert loaded(store, "e1") == record.state
    finally:
        store.close()


def test_a_write_that_failed_before_it_was_sent_stays_a_failure(
    postgres_test_url: str, lose_replies: list[str]
) -> None:
    store = open_store(postgres_test_url)
    try:
        recorder = Recorder()
        store.write([WriteItem(recorder.create("e1"))])
        lose_replies.append("before")
        with pytest.raises(StoreUnavailableError):
            store.write([WriteItem(recorder.update("e1", {"variables": {"x": 1}}))])
        assert store.current_versions(["e1"]) == {"e1": 1}
    finally:
        store.close()


def test_the_manager_follows_a_write_whose_reply_was_lost(
    postgres_test_url: str, lose_replies: list[str]
) -> None:
    with StateManager.open(postgres_test_url) as sm:
        sm.create_execution("e1", workflow_id="wf")
        lose_replies.append("after")
        assert sm.update_state("e1", {"variables": {"x": 1}}) == 2
        lose_replies.append("before")
        with pytest.raises(StoreUnavailableError):
            sm.update_state("e1", {"variables": {"x": 2}})
        assert sm.get_state("e1").variables == {"x": 1}
        assert sm.update_state("e1", {"variables": {"x": 3}}) == 3
    with StateManager.open(postgres_test_url) as reopened:
        assert reopened.get_state("e1").variables == {"x": 3}
        assert reopened.get_state("e1").version == 3
