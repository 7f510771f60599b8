"""The PostgreSQL store's native write-behind (``_core.PgWriter``,
``PostgresStore.write_pending``).

The durability suite's write-behind goes through ``write_batch`` (its stores are
wrapped to inject failures), which is psycopg's path; these tests cover what only
the native step has: reaching psycopg's libpq, batches stored without the GIL with
and without COPY, full batches gone on through, a batch with a refused chain rolled
back and left to ``write_batch``, and a write that fails in the server (a lock
timeout, a duplicate delta in COPY) or loses its connection, then is retried.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any, NamedTuple
from urllib.parse import quote

import psycopg
import pytest
from psycopg import pq

from durable_support import three_on_a_ring
from wfstate import AlreadyExistsError, ConflictError, StateManager, StoreUnavailableError, _core
from wfstate._durable import SnapshotPolicy, snapshot_tracker
from wfstate.store.base import PendingWrite
from wfstate.store.postgres import (
    COPY_THRESHOLD,
    NATIVE_WRITER_ENV,
    PostgresStore,
    _libpq_module,
)

THREADS = 8


def open_native(url: str) -> PostgresStore:
    store = PostgresStore(url, display="test")
    if not store.native_writer:
        store.close()
        pytest.fail(f"the native writer cannot reach psycopg's libpq ({pq.__impl__})")
    return store


def test_the_native_writer_reaches_the_libpq_psycopg_uses(postgres_test_url: str) -> None:
    """psycopg's libpq wrapper is found and its libpq is the version psycopg
    reports: the store writes natively (on every psycopg implementation that loads
    libpq as a shared library, as all three do)."""
    module = _libpq_module()
    assert module is not None
    store = open_native(postgres_test_url)
    store.close()


def test_the_psycopg_path_can_be_chosen(
    postgres_test_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = PostgresStore(postgres_test_url, display="test", native_writer=False)
    store.close()
    assert not store.native_writer
    monkeypatch.setenv(NATIVE_WRITER_ENV, "0")
    with StateManager.open(postgres_test_url, durability="async") as manager:
        assert manager._store is not None
        assert not manager._store.native_writer  # type: ignore[attr-defined]
        manager.create_execution("e", workflow_id="w")
        manager.update_state("e", {"variables": {"a": 1}})
        manager.flush()
        state = manager.get_state("e")
    with StateManager.open(postgres_test_url) as reopened:
        assert reopened.get_state("e") == state


def test_a_libpq_of_another_version_is_refused() -> None:
    """The libpq reached must be the one psycopg reports (the same copy)."""
    module = _libpq_module()
    assert module is not None
    with pytest.raises(ValueError, match="version"):
        _core.PgWriter(module, pq.version() + 1, {}, "COPY t FROM STDIN", COPY_THRESHOLD)


def stored_rows(url: str) -> dict[str, Any]:
    """Every execution's version, and the delta and snapshot counts."""
    with psycopg.connect(url) as connection:
        versions: dict[str, int] = dict(
            connection.execute("SELECT execution_id, version FROM wfstate_executions").fetchall()
        )
        (deltas,) = connection.execute("SELECT count(*) FROM wfstate_deltas").fetchone() or (0,)
        (snapshots,) = connection.execute("SELECT count(*) FROM wfstate_snapshots").fetchone() or (
            0,
        )
    return {"versions": versions, "deltas": deltas, "snapshots": snapshots}


@pytest.mark.parametrize("updates", [200, 1000], ids=["unnest", "copy"])
def test_the_write_behind_stores_every_version_through_the_native_step(
    postgres_test_url: str, monkeypatch: pytest.MonkeyPatch, updates: int
) -> None:
    """8 threads update their executions; every version is stored by native steps
    (``write_batch`` is never called), and the store holds what memory holds. With 1,000 updates
    a thread, batches reach ``COPY_THRESHOLD`` and their deltas go by COPY."""

    def unused(*args: object) -> None:
        raise AssertionError("write_batch is only for refusals and retries")

    sizes: list[int] = []
    write_pending = PostgresStore.write_pending

    def spy(self: PostgresStore, *args: Any, **kwargs: Any) -> PendingWrite | None:
        pending = write_pending(self, *args, **kwargs)
        assert pending is not None
        sizes.append(len(pending.batch))
        return pending

    # On the class: the flusher starts stepping as the manager opens.
    monkeypatch.setattr(PostgresStore, "write_batch", unused)
    monkeypatch.setattr(PostgresStore, "write_pending", spy)
    with StateManager.open(
        postgres_test_url, durability="async", flush_interval=0.05, max_batch=5000
    ) as manager:
        assert isinstance(manager._store, PostgresStore)
        assert manager._store.native_writer
        for index in range(THREADS):
            manager.create_execution(f"e-{index}", workflow_id="w", variables={"count": 0})

        def work(name: str) -> None:
            for count in range(1, updates + 1):
                manager.update_state(name, {"variables": {"count": count}})

        threads = [threading.Thread(target=work, args=(f"e-{i}",)) for i in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        manager.flush()
        stats = manager.stats()
        assert stats["pending_events"] == 0
        assert stats["flushed_versions"] == THREADS * (updates + 1)
        expected = {f"e-{i}": manager.get_state(f"e-{i}") for i in range(THREADS)}
    if updates == 1000:
        assert max(sizes) >= COPY_THRESHOLD, "no batch took the COPY path"
    else:
        assert max(sizes) < COPY_THRESHOLD
    assert stored_rows(postgres_test_url)["deltas"] == THREADS * (updates + 1)
    with StateManager.open(postgres_test_url) as reopened:
        for execution_id, state in expected.items():
            assert reopened.get_state(execution_id) == state
            assert state.variables["count"] == updates


class FirstStep(NamedTuple):
    cursor: _core.EventCursor
    store: PostgresStore
    tracker: _core.SnapshotTracker
    #: The cursor's committed position before the first step.
    start: int
    #: The first step: 50 versions, no ``keep_going``, committed afterwards.
    step: PendingWrite


@contextlib.contextmanager
def first_step_of_three(url: str) -> Iterator[FirstStep]:
    """A durable cursor on a memory-only manager's ring of 303 versions
    (``three_on_a_ring``), and a
    store at ``url`` that one native step of 50 versions has written."""
    with StateManager() as source:
        cursor = three_on_a_ring(source)
        store = open_native(url)
        try:
            tracker = snapshot_tracker(SnapshotPolicy())
            start = cursor.committed
            step = store.write_pending(cursor, tracker, 50, 0.0, {})
            assert step is not None
            assert step.written is not None
            assert step.written[0] == {}
            assert step.error is None
            assert cursor.committed == start  # the step's own batch: the caller commits
            # The connection is left as psycopg keeps it: non-blocking and idle.
            assert store._pump is not None
            assert store._pump.pgconn.nonblocking == 1
            assert store._pump.info.transaction_status == pq.TransactionStatus.IDLE
            cursor.commit()
            yield FirstStep(cursor, store, tracker, start, step)
        finally:
            store.close()


def test_a_native_step_goes_on_through_full_batches(postgres_test_url: str) -> None:
    """With ``keep_going``, one step writes the full batches one after the other,
    taking each off the cursor, and returns the last (partial) one as a step's."""
    with first_step_of_three(postgres_test_url) as first:
        assert (len(first.step.batch), first.step.earlier) == (50, (0, 0, 0))
        cursor = first.cursor
        pending = first.store.write_pending(cursor, first.tracker, 50, 0.0, {}, keep_going=60.0)
        assert pending is not None
        assert pending.earlier == (5, 250, 0)
        assert len(pending.batch) == 3
        assert pending.written is not None
        assert pending.written[0] == {}
        assert cursor.committed == first.start + 300
        assert cursor.position == first.start + 303
        assert first.store.current_versions(["e-0", "e-1", "e-2"]) == {
            "e-0": 101,
            "e-1": 101,
            "e-2": 101,
        }


def test_a_batch_with_a_refused_chain_is_rolled_back_and_left_to_write_batch(
    postgres_test_url: str,
) -> None:
    """Another writer stored e-2's version 2 first. The native step stores the whole
    batches before the one holding e-2's, then rolls that one back whole and returns
    it unwritten; ``write_batch`` then stores its other chains and reports e-2's
    refusal."""
    with first_step_of_three(postgres_test_url) as first:
        with StateManager.open(postgres_test_url) as other:
            assert other.update_state("e-2", {"variables": {"by": "other"}}) == 2
        store = first.store
        pending = store.write_pending(first.cursor, first.tracker, 50, 0.0, {}, keep_going=60.0)
        assert pending is not None
        assert pending.earlier == (3, 150, 0)
        assert (pending.written, pending.error) == (None, None)
        assert first.cursor.committed == first.start + 200
        # Nothing of the refused batch is stored: e-0 and e-1 stay where the whole
        # batches left them (200 of the ring's events: e-0 at 100, e-1 at 99).
        assert store.current_versions(["e-0", "e-1", "e-2"]) == {
            "e-0": 100,
            "e-1": 99,
            "e-2": 2,
        }
        assert sorted(chain[0] for chain in pending.chains) == ["e-0", "e-1", "e-2"]
        refusals, _ = store.write_batch(pending.batch, pending.snapshot)
        assert list(refusals) == ["e-2"]
        assert isinstance(refusals["e-2"], ConflictError)
        assert store.current_versions(["e-0", "e-1", "e-2"]) == {
            "e-0": 101,
            "e-1": 101,
            "e-2": 2,
        }
        assert store._pump is not None
        assert store._pump.info.transaction_status == pq.TransactionStatus.IDLE


class Stepping(NamedTuple):
    """A memory-only manager (``source``) with a durable cursor on its ring, and a
    native store (``store``) that a first step gave the executions it created."""

    source: StateManager
    cursor: _core.EventCursor
    store: PostgresStore
    tracker: _core.SnapshotTracker

    def step(self, max_events: int) -> PendingWrite:
        """One native step of at most ``max_events`` events, without waiting."""
        pending = self.store.write_pending(self.cursor, self.tracker, max_events, 0.0, {})
        assert pending is not None
        return pending


@contextlib.contextmanager
def created(url: str, *execution_ids: str) -> Iterator[Stepping]:
    """``execution_ids`` created in memory and stored by a native step (the cursor
    committed), on a store at ``url`` closed afterwards."""
    with StateManager() as source:
        cursor = source._core.open_cursor(durable=True)
        for execution_id in execution_ids:
            source.create_execution(execution_id, workflow_id="w")
        store = open_native(url)
        try:
            stepping = Stepping(source, cursor, store, snapshot_tracker(SnapshotPolicy()))
            assert stepping.step(10).written == ({}, [0] * len(execution_ids))
            cursor.commit()
            yield stepping
        finally:
            store.close()


def test_a_batch_refused_in_part_is_stored_in_part_through_write_batch(
    postgres_test_url: str,
) -> None:
    """One batch holds e-0's and e-1's versions, and e-1's were refused: the native
    step rolls it back, ``write_batch`` stores e-0's and refuses e-1's."""
    with created(postgres_test_url, "e-0", "e-1") as stepping:
        with StateManager.open(postgres_test_url) as other:
            other.update_state("e-1", {"variables": {"by": "other"}})
        for n in range(5):
            for index in range(2):
                stepping.source.update_state(f"e-{index}", {"variables": {"n": n}})
        pending = stepping.step(100)
        assert (pending.written, pending.error) == (None, None)
        store = stepping.store
        assert store.current_versions(["e-0", "e-1"]) == {"e-0": 1, "e-1": 2}
        refusals, _ = store.write_batch(pending.batch, pending.snapshot)
        assert list(refusals) == ["e-1"]
        assert store.current_versions(["e-0", "e-1"]) == {"e-0": 6, "e-1": 2}


def test_a_refused_write_behind_version_is_reported_by_flush(postgres_test_url: str) -> None:
    """Through the manager: flush() raises ConflictError, memory goes back to the
    stored state, and later versions are stored natively again."""
    with (
        StateManager.open(postgres_test_url, durability="sync") as other,
        StateManager.open(postgres_test_url, durability="async", flush_interval=60) as manager,
    ):
        other.create_execution("e", workflow_id="w")
        manager.get_state("e")  # loaded at version 1
        other.update_state("e", {"variables": {"by": "other"}})
        assert manager.update_state("e", {"variables": {"by": "async"}}) == 2
        with pytest.raises(ConflictError):
            manager.flush(timeout=10)
        assert manager.stats()["refused_versions"] == 1
        assert manager.get_state("e").variables == {"by": "other"}
        assert manager.update_state("e", {"variables": {"then": "async"}}) == 3
        manager.flush(timeout=10)
    with StateManager.open(postgres_test_url) as reopened:
        assert reopened.get_state("e").variables == {"by": "other", "then": "async"}


def with_options(url: str, options: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}options={quote(options)}"


@contextlib.contextmanager
def row_locked(url: str, execution_id: str) -> Iterator[None]:
    """Another session holds the execution's row lock until the block ends."""
    with psycopg.connect(url) as connection:
        connection.execute(
            "SELECT 1 FROM wfstate_executions WHERE execution_id = %s FOR UPDATE",
            (execution_id,),
        )
        yield
        connection.rollback()


def test_a_native_write_that_fails_in_the_server_stores_nothing_and_is_retried(
    postgres_test_url: str,
) -> None:
    """The execution's row is locked by another session and the store's sessions
    give up after 200 ms (``lock_timeout``): the native step fails with the server's
    error and SQLSTATE, rolls back, stores nothing and drops its connection. Once
    the lock is gone the same batch is stored by ``write_batch``, and the next
    native step runs on a fresh connection."""
    url = with_options(postgres_test_url, "-c lock_timeout=200")
    with created(url, "e") as stepping:
        store = stepping.store
        first_connection = store._pump
        for n in range(20):
            stepping.source.update_state("e", {"variables": {"n": n}})
        with row_locked(postgres_test_url, "e"):
            pending = stepping.step(100)
            assert pending.written is None
            assert isinstance(pending.error, StoreUnavailableError)
            assert "SQLSTATE 55P03" in str(pending.error)
            assert "lock" in str(pending.error)
            assert store._pump is None  # a failed connection is not used again
            assert first_connection is not None
            assert first_connection.closed
            assert store.current_versions(["e"]) == {"e": 1}
        refusals, _ = store.write_batch(pending.batch, pending.snapshot)
        assert refusals == {}
        stepping.cursor.commit()
        assert store.current_versions(["e"]) == {"e": 21}
        stepping.source.update_state("e", {"variables": {"n": "last"}})
        assert stepping.step(100).written is not None
        assert store._pump is not None
        assert store._pump is not first_connection
        assert store.current_versions(["e"]) == {"e": 22}


def test_a_failed_copy_rolls_back_the_whole_batch(postgres_test_url: str) -> None:
    """A delta row that should not be there makes the batch's COPY fail (a unique
    violation): the execution rows the statement advanced are rolled back with it."""
    with created(postgres_test_url, "e") as stepping:
        for n in range(COPY_THRESHOLD):
            stepping.source.update_state("e", {"variables": {"n": n}})
        with psycopg.connect(postgres_test_url, autocommit=True) as connection:
            connection.execute(
                "INSERT INTO wfstate_deltas (execution_id, version, recorded_at, event_mask,"
                " node_ids, data)"
                " VALUES ('e', 1000, now(), 0, '{}', '\\x00')"
            )
        before = stored_rows(postgres_test_url)
        pending = stepping.step(2 * COPY_THRESHOLD)
        assert len(pending.batch) == COPY_THRESHOLD
        assert isinstance(pending.error, StoreUnavailableError)
        assert "SQLSTATE 23505" in str(pending.error)
        assert stored_rows(postgres_test_url) == before
        with psycopg.connect(postgres_test_url, autocommit=True) as connection:
            connection.execute("DELETE FROM wfstate_deltas WHERE version = 1000")
        refusals, _ = stepping.store.write_batch(pending.batch, pending.snapshot)
        assert refusals == {}
        assert stepping.store.current_versions(["e"]) == {"e": COPY_THRESHOLD + 1}


def test_a_connection_the_server_closed_is_replaced_before_the_next_step(
    postgres_test_url: str,
) -> None:
    """The server ends the native writer's session between steps (a restart, or
    ``pg_terminate_backend``): the next step notices, connects again and stores."""
    with created(postgres_test_url, "e") as stepping:
        store = stepping.store
        assert store._pump is not None
        pid = store._pump.info.backend_pid
        with psycopg.connect(postgres_test_url, autocommit=True) as connection:
            connection.execute("SELECT pg_terminate_backend(%s)", (pid,))
            # Gone from pg_stat_activity once it exited, after sending its FATAL.
            deadline = time.monotonic() + 10
            while connection.execute(
                "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone():
                assert time.monotonic() < deadline, "the backend did not exit"
                time.sleep(0.01)
        stepping.source.update_state("e", {"variables": {"after": "restart"}})
        pending = stepping.step(10)
        assert pending.error is None
        assert pending.written is not None
        assert store._pump is not None
        assert store._pump.info.backend_pid != pid
        assert store.current_versions(["e"]) == {"e": 2}


def test_the_write_behind_retries_a_failed_native_write_then_stores_it(
    postgres_test_url: str,
) -> None:
    """Through the manager: while the row is locked the write fails and the flusher
    reports it in stats() and retries; once the lock is gone every version is
    stored."""
    url = with_options(postgres_test_url, "-c lock_timeout=100")
    with StateManager.open(url, durability="async", flush_interval=0.01) as manager:
        manager.create_execution("e", workflow_id="w", variables={"count": 0})
        manager.flush()
        with row_locked(postgres_test_url, "e"):
            for count in range(1, 51):
                manager.update_state("e", {"variables": {"count": count}})
            with pytest.raises(StoreUnavailableError):
                manager.flush(timeout=1.0)
            stats = manager.stats()
            assert stats["flush_retries"] > 0
            assert "lock" in (stats["last_store_error"] or "")
            assert stats["pending_events"] > 0
        manager.flush(timeout=30)
        assert manager.stats()["last_store_error"] is None
        state = manager.get_state("e")
    with StateManager.open(postgres_test_url) as reopened:
        assert reopened.get_state("e") == state
        assert state.variables["count"] == 50


def test_a_refused_creation_in_a_copy_sized_batch_is_left_to_write_batch(
    postgres_test_url: str,
) -> None:
    """A batch of COPY size holds e-0's 2,000 updates and the creation of "taken",
    which another writer created first: the native step rolls it all back (nothing
    of e-0's versions is stored), and ``write_batch`` stores e-0's by COPY and
    reports the creation as ``AlreadyExistsError``."""
    with created(postgres_test_url, "e-0") as stepping:
        with StateManager.open(postgres_test_url) as other:
            other.create_execution("taken", workflow_id="other")
        for n in range(COPY_THRESHOLD):
            stepping.source.update_state("e-0", {"variables": {"n": n}})
        stepping.source.create_execution("taken", workflow_id="w")
        before = stored_rows(postgres_test_url)
        pending = stepping.step(2 * COPY_THRESHOLD)
        assert len(pending.batch) == COPY_THRESHOLD + 1
        assert (pending.written, pending.error) == (None, None)
        assert stored_rows(postgres_test_url) == before
        refusals, _ = stepping.store.write_batch(pending.batch, pending.snapshot)
        assert list(refusals) == ["taken"]
        assert isinstance(refusals["taken"], AlreadyExistsError)
        assert stepping.store.current_versions(["e-0", "taken"]) == {
            "e-0": COPY_THRESHOLD + 1,
            "taken": 1,
        }


def test_a_native_step_lets_other_threads_run(postgres_test_url: str) -> None:
    """The step waits for events (and writes) without the GIL: a thread counting in
    Python goes on counting meanwhile."""
    with StateManager() as source:
        cursor = source._core.open_cursor(durable=True)
        store = open_native(postgres_test_url)
        stop = threading.Event()
        counted = [0]

        def count() -> None:
            while not stop.is_set():
                counted[0] += 1

        counter = threading.Thread(target=count)
        counter.start()
        try:
            time.sleep(0.05)
            before = counted[0]
            pending = store.write_pending(cursor, snapshot_tracker(SnapshotPolicy()), 10, 0.5, {})
            during = counted[0] - before
        finally:
            stop.set()
            counter.join()
            store.close()
        assert pending is not None
        assert len(pending.batch) == 0
        # Holding the GIL for the 0.5 s wait would leave the counter at a handful.
        assert during > 10_000, f"the counter advanced {during} times in 0.5 s"


def test_a_native_writer_that_cannot_connect_backs_off(
    postgres_test_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The native step cannot connect (the server is away, or a connection limit
    only its connection exceeds): it stays off for 1 s, then 2 s, ... while the
    flusher goes through psycopg's path (which here can still write), instead of
    connecting at every step; once it can connect again, native steps resume."""
    with StateManager.open(postgres_test_url, durability="async", flush_interval=0.01) as manager:
        store = manager._store
        assert isinstance(store, PostgresStore)
        manager.create_execution("e", workflow_id="w")
        manager.flush()
        attempts = [0]
        real_connect = psycopg.connect

        def refuse_the_native_writer(*args: Any, **kwargs: Any) -> psycopg.Connection[Any]:
            if any("_pump_connection" in frame.name for frame in traceback.extract_stack()):
                attempts[0] += 1
                raise psycopg.OperationalError("too many connections for role (test)")
            return real_connect(*args, **kwargs)

        with store._pump_lock:
            assert store._pump is not None
            store._pump.close()  # as if the server had closed it
            monkeypatch.setattr(psycopg, "connect", refuse_the_native_writer)
        for n in range(50):  # about 50 steps, each with a batch to write
            manager.update_state("e", {"variables": {"n": n}})
            time.sleep(0.01)
        manager.flush(timeout=10)  # through write_batch: psycopg's path still works
        assert attempts[0] == 1, f"{attempts[0]} connection attempts in 0.5 s"
        assert store._pump_backoff == 2.0
        monkeypatch.setattr(psycopg, "connect", real_connect)
        deadline = time.monotonic() + 10
        while store._pump is None or store._pump.closed:  # back after 1 s
            assert time.monotonic() < deadline, "the native writer did not come back"
            manager.update_state("e", {"variables": {"later": time.monotonic()}})
            time.sleep(0.05)
        assert store._pump_backoff == 1.0
        manager.flush(timeout=10)
        state = manager.get_state("e")
    with StateManager.open(postgres_test_url) as reopened:
        assert reopened.get_state("e") == state


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_closing_the_store_in_a_forked_child_leaves_the_parents_connections_alone(
    postgres_test_url: str,
) -> None:
    """A child forked while the flusher waits in a native step (holding the step's
    lock): the child's store refuses a step and closes at once, without touching
    the parent's sessions (closing one would end it), which go on working.

    Only the store: whether a manager's other locks were held at the fork is up to
    the thread scheduler (a child of a threaded process should not use them)."""
    with StateManager.open(postgres_test_url, durability="async", flush_interval=0.2) as manager:
        store = manager._store
        assert isinstance(store, PostgresStore)
        manager.create_execution("e", workflow_id="w")
        manager.flush()
        time.sleep(0.05)  # the flusher is inside a step, waiting for events
        assert store._pump_lock.locked()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                with StateManager() as source:
                    cursor = source._core.open_cursor(durable=True)
                    tracker = snapshot_tracker(SnapshotPolicy())
                    try:
                        store.write_pending(cursor, tracker, 10, 0.0, {})
                    except StoreUnavailableError:
                        store.close()
                        code = 0
            finally:
                os._exit(code)
        deadline = time.monotonic() + 10
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the forked child hung")
            time.sleep(0.01)
        assert os.waitstatus_to_exitcode(status) == 0
        for n in range(20):
            manager.update_state("e", {"variables": {"n": n}})
        manager.flush(timeout=10)
        assert store._pump is not None
        assert not store._pump.closed
        state = manager.get_state("e")
    with StateManager.open(postgres_test_url) as reopened:
        assert reopened.get_state("e") == state
        assert state.version == 21
