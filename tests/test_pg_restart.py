"""PostgreSQL going away and coming back in the middle of a run.

A sync writer thread updates executions while the server is stopped and started
again: during the outage its calls raise ``StoreUnavailableError`` and change nothing
in memory; once the server is back the same manager writes on (its pool replaces the
dead connections), and after a reopen every acknowledged update is there. An async
manager rides out the same outage in memory and stores everything once the server is
back.

The test restarts the local cluster with ``pg_ctlcluster``, so it runs only where that
is allowed (the command exists and we are root); elsewhere it is skipped, except
under ``CI=true`` where that is a failure. Whatever happens, it leaves PostgreSQL
running.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from conftest import service_missing
from durable_support import loaded, replayed, stored_versions
from pg_control import answers, can_restart, pg_ctlcluster, wait_for
from wfstate import StateManager, StoreUnavailableError, WfstateError, _core
from wfstate.store import open_store

pytestmark = pytest.mark.slow


@pytest.fixture
def restartable_postgres(postgres_test_url: str) -> Iterator[str]:
    """The test database, on a cluster this test may stop and start; left running."""
    reason = can_restart()
    if reason is not None:
        service_missing(reason)
    try:
        yield postgres_test_url
    finally:
        if not answers(postgres_test_url):
            pg_ctlcluster("start")
            wait_for(postgres_test_url, up=True)


class Writer(threading.Thread):
    """Sync updates on a few executions, as fast as the store takes them."""

    def __init__(self, manager: StateManager, execution_ids: list[str]) -> None:
        super().__init__(name="pg-restart-writer", daemon=True)
        self.manager = manager
        self.execution_ids = execution_ids
        self.stopping = threading.Event()
        self.acks: list[tuple[str, int, int]] = []
        self.outage_errors: list[StoreUnavailableError] = []
        self.problems: list[str] = []

    def run(self) -> None:
        counter = 0
        while not self.stopping.is_set():
            counter += 1
            execution_id = self.execution_ids[counter % len(self.execution_ids)]
            before = self.manager.get_state(execution_id)
            try:
                version = self.manager.update_state(execution_id, {"variables": {"value": counter}})
            except StoreUnavailableError as error:
                self.outage_errors.append(error)
                if self.manager.get_state(execution_id) != before:
                    self.problems.append(f"memory moved on after {error!r}")
                time.sleep(0.05)
                continue
            except WfstateError as error:
                self.problems.append(repr(error))
                return
            self.acks.append((execution_id, version, counter))
            time.sleep(0.002)

    def acks_after(self, count: int, *, timeout: float = 30.0) -> None:
        target = len(self.acks) + count
        deadline = time.monotonic() + timeout
        while len(self.acks) < target:
            assert time.monotonic() < deadline, f"no progress: {self.problems}"
            assert self.is_alive(), f"the writer stopped: {self.problems}"
            time.sleep(0.01)


def test_postgres_restart_mid_run(restartable_postgres: str) -> None:
    url = restartable_postgres
    sync_manager = StateManager.open(url, durability="sync", connect_timeout=2)
    async_manager = StateManager.open(
        url, durability="async", connect_timeout=2, flush_interval=0.02
    )
    writer = Writer(sync_manager, ["a", "b", "c"])
    try:
        for execution_id in writer.execution_ids:
            sync_manager.create_execution(execution_id, workflow_id="wf")
        async_manager.create_execution("async", workflow_id="wf")
        async_manager.flush()
        writer.start()
        writer.acks_after(20)

        pg_ctlcluster("stop")
        try:
            # The server is gone: sync writes fail, promptly, and change nothing.
            before = sync_manager.get_state("a")
            started = time.monotonic()
            with pytest.raises(StoreUnavailableError) as info:
                sync_manager.update_state("a", {"variables": {"during": "outage"}})
            assert time.monotonic() - started < 10
            assert info.value.target == sync_manager.store_url
            assert sync_manager.get_state("a") == before
            deadline = time.monotonic() + 10
            while not writer.outage_errors:
                assert time.monotonic() < deadline, "the writer never saw the outage"
                time.sleep(0.01)
            # The write-behind keeps what it cannot store, and says so.
            for step in range(5):
                async_manager.update_state("async", {"variables": {"step": step}})
            with pytest.raises(StoreUnavailableError):
                async_manager.flush(timeout=0.5)
            pending = async_manager.stats()["pending_events"]
            assert isinstance(pending, int)
            assert pending >= 5
            # Its write fails once the pool gives up waiting (connect_timeout), and
            # it retries.
            deadline = time.monotonic() + 15
            while async_manager.stats()["flush_retries"] == 0:
                assert time.monotonic() < deadline, "the write-behind never retried"
                time.sleep(0.05)
            assert async_manager.stats()["last_store_error"] is not None
        finally:
            pg_ctlcluster("start")
        wait_for(url, up=True)

        # Back: the same managers write on.
        writer.acks_after(20, timeout=30)
        async_manager.flush(timeout=30)
        assert async_manager.stats()["pending_events"] == 0
        assert async_manager.stats()["last_store_error"] is None
    finally:
        writer.stopping.set()
        writer.join(timeout=30)
        async_state = async_manager.get_state("async")
        async_manager.close(timeout=30)
        sync_manager.close()

    assert writer.problems == []
    assert writer.outage_errors
    final: dict[str, int] = {}
    for execution_id, version, _ in writer.acks:
        final[execution_id] = max(final.get(execution_id, 0), version)

    store = open_store(url)
    try:
        assert store.current_versions(["async"]) == {"async": 6}
        assert loaded(store, "async") == async_state
        for execution_id in writer.execution_ids:
            versions = stored_versions(store, execution_id)
            assert versions == list(range(1, len(versions) + 1))
            assert replayed(store, execution_id) == loaded(store, execution_id)
        stored: dict[tuple[str, int], object] = {}
        for execution_id in writer.execution_ids:
            for event in _core.decode_history(execution_id, store.read_deltas(execution_id)):
                if event.type == "variables_changed":
                    stored[(execution_id, event.version)] = event.data["set"]["value"]
        for execution_id, version, counter in writer.acks:
            assert stored.get((execution_id, version)) == counter, (execution_id, version)
    finally:
        store.close()
    with StateManager.open(url) as reopened:
        for execution_id in writer.execution_ids:
            state = reopened.get_state(execution_id)
            assert state.version >= final[execution_id]
