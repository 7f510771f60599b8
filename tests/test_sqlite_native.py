"""The SQLite store's native writer (``_core.SqliteWriter``) and its group commit.

The store contract runs on both SQLite write paths (``store_url``'s
``sqlite-sqlite3`` param is the ``sqlite3`` module's); these tests cover what only
the native writer has: choosing the library, callers of many threads sharing
transactions while they wait without the GIL, turns for the store's other write
connection (leases), a failed transaction reaching every caller it carried, and a
signal arriving while a caller waits.
"""

from __future__ import annotations

import _sqlite3
import contextlib
import functools
import os
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from durable_support import three_on_a_ring
from wfstate import (
    ClosedError,
    ConflictError,
    StateManager,
    StoreUnavailableError,
    ValidationError,
    WorkflowState,
    _core,
)
from wfstate._durable import SnapshotPolicy, snapshot_tracker
from wfstate.store.base import PendingWrite, WriteItem
from wfstate.store.sqlite import _NATIVE_STATEMENTS, NATIVE_WRITER_ENV, SQLiteStore

THREADS = 8


def url(path: Path) -> str:
    return f"sqlite:///{path}"


def sqlite_library_is_shared() -> bool:
    """Whether the sqlite3 module's SQLite is a shared library of this process."""
    with open("/proc/self/maps", encoding="utf-8") as maps:
        return any("libsqlite3" in line for line in maps)


@functools.cache
def native_writer_available() -> bool:
    with tempfile.TemporaryDirectory() as directory:
        store = SQLiteStore(f"{directory}/probe.db", display="probe")
        store.close()
        return store.native_writer


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """A database file for a test of the native writer (skipped where the sqlite3
    module's SQLite cannot be shared: then the store writes through sqlite3)."""
    if not native_writer_available():
        pytest.skip("the sqlite3 module's SQLite library is not shared here")
    return tmp_path / "native.db"


@pytest.fixture
def manager(path: Path) -> Iterator[StateManager]:
    with StateManager.open(url(path), durability="sync", connect_timeout=5.0) as opened:
        yield opened


def increment(state: WorkflowState) -> dict[str, Any]:
    return {"variables": {"count": state.variables.get("count", 0) + 1}}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_the_native_writer_is_used_where_sqlite3_links_a_shared_library(
    tmp_path: Path,
) -> None:
    path = tmp_path / "native.db"
    store = SQLiteStore(str(path), display=url(path))
    try:
        assert store.native_writer is sqlite_library_is_shared()
        assert store.groups_writes is store.native_writer
    finally:
        store.close()


def test_the_sqlite3_path_can_be_chosen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "sqlite3.db"
    store = SQLiteStore(str(path), display=url(path), native_writer=False)
    store.close()
    assert not store.native_writer
    monkeypatch.setenv(NATIVE_WRITER_ENV, "0")
    with StateManager.open(url(path)) as manager:
        manager.create_execution("e", workflow_id="w")
        assert manager.update_state("e", {"variables": {"a": 1}}) == 2
        stats = manager.stats()
        assert (stats["group_commits"], stats["group_committed_versions"]) == (2, 2)


def test_a_library_of_another_version_is_refused(path: Path) -> None:
    SQLiteStore(str(path), display=url(path)).close()  # creates and migrates the file
    with pytest.raises(ValueError, match="version"):
        _core.SqliteWriter(str(path), _NATIVE_STATEMENTS, [], 1.0, _sqlite3.__file__, "0.0.1")


def test_a_closed_writer_refuses_writes(path: Path) -> None:
    SQLiteStore(str(path), display=url(path)).close()
    writer = _core.SqliteWriter(
        str(path), _NATIVE_STATEMENTS, [], 1.0, _sqlite3.__file__, sqlite3.sqlite_version
    )
    assert not writer.closed
    writer.close()
    writer.close()  # idempotent
    assert writer.closed
    with pytest.raises(RuntimeError, match="closed"):
        writer.write_items([])
    with pytest.raises(RuntimeError, match="closed"):
        writer.exclusive(lambda: None)


def test_a_closed_store_refuses_writes(path: Path) -> None:
    manager = StateManager.open(url(path))
    manager.create_execution("e", workflow_id="w")
    store = manager._store
    assert store is not None
    manager.close()
    with pytest.raises(ClosedError):
        store.write([])


def test_threads_share_transactions_and_lose_no_update(path: Path) -> None:
    """Two managers (standing for two processes) on one file, 8 threads each: every
    transact increment of one shared execution lands, and so does every update of
    each thread's own execution; the native writer carried many callers per
    transaction."""
    rounds = 40
    with (
        StateManager.open(url(path), durability="sync") as first,
        StateManager.open(url(path), durability="sync") as second,
    ):
        first.create_execution("shared", workflow_id="w", variables={"count": 0})
        errors: list[BaseException] = []

        def work(manager: StateManager, name: str) -> None:
            try:
                manager.create_execution(name, workflow_id="w", variables={"count": 0})
                for _ in range(rounds):
                    manager.transact("shared", increment, retries=1000)
                    manager.transact(name, increment)
            except BaseException as error:
                errors.append(error)

        threads = [
            threading.Thread(target=work, args=(manager, f"own-{n}-{index}"))
            for n, manager in enumerate((first, second))
            for index in range(THREADS)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        stats = first.stats()
        assert stats["group_commits"] < stats["group_committed_versions"]
    with StateManager.open(url(path)) as reopened:
        assert reopened.get_state("shared").variables["count"] == 2 * THREADS * rounds
        for n in range(2):
            for index in range(THREADS):
                assert reopened.get_state(f"own-{n}-{index}").variables["count"] == rounds


def test_lease_writes_take_turns_with_group_committed_writes(path: Path) -> None:
    """The store's lease operations use its other write connection: they queue with
    the native writer's callers instead of waiting on the file's lock. With a lock
    timeout of 1 ms, waiting on the lock would fail some of them."""
    with StateManager.open(url(path), durability="sync", connect_timeout=0.001) as manager:
        run_leases_beside_writes(manager)


def run_leases_beside_writes(manager: StateManager) -> None:
    stop = threading.Event()
    errors: list[BaseException] = []
    grants: list[int] = []
    for index in range(THREADS):
        manager.create_execution(f"w-{index}", workflow_id="w", variables={"count": 0})
    manager.create_execution("leased", workflow_id="w")

    def write(name: str) -> None:
        try:
            while not stop.is_set():
                manager.transact(name, increment)
        except BaseException as error:
            errors.append(error)

    def lease() -> None:
        try:
            for _ in range(50):
                held = manager.acquire("leased", owner="worker", ttl=5.0)
                manager.renew(held)
                manager.update_state("leased", {"variables": {"token": held.token}}, lease=held)
                assert manager.release(held)
                grants.append(held.token)
        except BaseException as error:
            errors.append(error)

    writers = [threading.Thread(target=write, args=(f"w-{i}",)) for i in range(THREADS)]
    leaser = threading.Thread(target=lease)
    for thread in [*writers, leaser]:
        thread.start()
    leaser.join(timeout=60)
    stop.set()
    for thread in writers:
        thread.join(timeout=60)
    assert errors == []
    assert grants == sorted(grants)
    assert len(set(grants)) == 50
    assert manager.get_state("leased").variables["token"] == grants[-1]


@contextlib.contextmanager
def write_locked(path: Path) -> Iterator[None]:
    """Hold the file's write lock from another connection for the block."""
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


def test_a_failed_transaction_fails_every_caller_it_carried_and_changes_nothing(
    path: Path,
) -> None:
    """Another connection holds the file's write lock past the timeout: every
    waiting caller gets StoreUnavailableError, memory stays at the stored version;
    once the lock is gone, the same updates succeed."""
    with StateManager.open(url(path), durability="sync", connect_timeout=0.3) as manager:
        for index in range(4):
            manager.create_execution(f"e-{index}", workflow_id="w")
        transactions = manager.stats()["group_commits"]
        failures: list[BaseException] = []

        def update(name: str) -> None:
            try:
                manager.update_state(name, {"variables": {"a": 1}})
            except BaseException as error:
                failures.append(error)

        threads = [threading.Thread(target=update, args=(f"e-{i}",)) for i in range(4)]
        with write_locked(path):
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=30)
        assert len(failures) == 4
        assert all(isinstance(error, StoreUnavailableError) for error in failures)
        # Fewer transactions than callers: callers queued behind the first shared one
        # (usually the first leads alone and the other three share the second).
        assert 1 <= manager.stats()["group_commits"] - transactions < 4
        assert "held the lock" in str(failures[0])
        for index in range(4):
            assert manager.get_state(f"e-{index}").version == 1
            assert manager.update_state(f"e-{index}", {"variables": {"a": 1}}) == 2
    with StateManager.open(url(path)) as reopened:
        assert [reopened.get_state(f"e-{i}").version for i in range(4)] == [2, 2, 2, 2]


class _Interrupted(Exception):
    pass


@contextlib.contextmanager
def signal_while_locked(path: Path) -> Iterator[None]:
    """Hold the file's write lock from another connection; 0.2 s in, send this
    process SIGUSR1, whose handler raises ``_Interrupted``; 0.2 s later let the lock
    go. The handler is restored on exit."""
    blocker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")

    def conduct() -> None:
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.2)
        blocker.execute("ROLLBACK")

    def handler(signum: int, frame: object) -> None:
        raise _Interrupted

    previous = signal.signal(signal.SIGUSR1, handler)
    conductor = threading.Thread(target=conduct)
    try:
        conductor.start()
        yield
    finally:
        signal.signal(signal.SIGUSR1, previous)
        conductor.join(timeout=30)
        blocker.close()


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="needs POSIX signals")
def test_a_signal_during_a_native_wait_is_raised_after_the_write(path: Path) -> None:
    """The native writer's callers wait in Rust: a signal handler runs (and its
    exception is raised) only once the write is done. The caller sees the
    exception and its update is stored; memory has not published it, so the next
    update catches up from the store and succeeds."""
    with StateManager.open(url(path), durability="sync", connect_timeout=10.0) as manager:
        manager.create_execution("e", workflow_id="w", variables={"count": 0})
        # The main thread waits on the lock by the time the signal comes.
        with signal_while_locked(path), pytest.raises(_Interrupted):
            manager.update_state("e", {"variables": {"count": 1}})
        store = manager._store
        assert store is not None
        assert store.current_versions(["e"]) == {"e": 2}
        assert manager.transact("e", increment) == 3
        assert manager.get_state("e").variables["count"] == 2


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="needs POSIX signals")
def test_a_signal_during_a_wait_for_a_lease_turn_hands_the_turn_on(path: Path) -> None:
    """A lease call waits for its turn behind a native write that waits on the file's
    lock; a signal handler raises meanwhile. The call raises once its turn comes,
    and the turn is handed on: later writes and leases still run."""
    with StateManager.open(url(path), durability="sync", connect_timeout=10.0) as manager:
        manager.create_execution("written", workflow_id="w")
        manager.create_execution("leased", workflow_id="w")
        writer = threading.Thread(
            target=manager.update_state, args=("written", {"variables": {"a": 1}})
        )
        try:
            # By the time the signal comes, the writer leads, waiting on the lock,
            # and acquire queues behind it.
            with signal_while_locked(path):
                writer.start()
                time.sleep(0.05)
                with pytest.raises(_Interrupted):
                    manager.acquire("leased", owner="worker", ttl=5.0)
        finally:
            writer.join(timeout=30)
        done: list[object] = []

        def later() -> None:
            done.append(manager.update_state("written", {"variables": {"a": 2}}))
            done.append(manager.acquire("leased", owner="worker", ttl=5.0).token)

        follower = threading.Thread(target=later, daemon=True)
        follower.start()
        follower.join(timeout=30)
        assert not follower.is_alive(), "the turn was never handed on"
        assert len(done) == 2
        assert done[0] == 3
        assert isinstance(done[1], int)
        assert done[1] >= 1


# -- the write-behind's fused step (``SQLiteStore.write_pending``) ----------------------


def test_the_write_behind_stores_every_version_through_the_fused_step(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with StateManager.open(url(path), durability="async", flush_interval=0.01) as manager:
        store = manager._store
        assert isinstance(store, SQLiteStore)

        def unused(*args: object) -> None:
            raise AssertionError("write_batch is only for retries after a failed step")

        monkeypatch.setattr(store, "write_batch", unused)
        for index in range(THREADS):
            manager.create_execution(f"e-{index}", workflow_id="w", variables={"count": 0})

        def work(name: str) -> None:
            for count in range(1, 201):
                manager.update_state(name, {"variables": {"count": count}})

        threads = [threading.Thread(target=work, args=(f"e-{i}",)) for i in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        manager.flush()
        stats = manager.stats()
        assert stats["pending_events"] == 0
        assert stats["flushed_versions"] == THREADS * 201
        assert stats["flush_batches"] < stats["flushed_versions"]
        expected = {f"e-{i}": manager.get_state(f"e-{i}") for i in range(THREADS)}
    with StateManager.open(url(path)) as reopened:
        for execution_id, state in expected.items():
            assert reopened.get_state(execution_id) == state
            assert state.variables["count"] == 200


def wait_for_a_retry(manager: StateManager) -> None:
    """Until the write-behind has failed a write and retries (at most 30 s)."""
    deadline = time.monotonic() + 30
    while manager.stats()["flush_retries"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)


class FirstStep(NamedTuple):
    cursor: _core.EventCursor
    store: SQLiteStore
    tracker: _core.SnapshotTracker
    #: The cursor's committed position before the first step.
    start: int
    #: The first step: 50 versions, no ``keep_going``, committed afterwards.
    step: PendingWrite


@contextlib.contextmanager
def first_step_of_three(path: Path) -> Iterator[FirstStep]:
    """A durable cursor on a memory-only manager's ring of 303 versions
    (``three_on_a_ring``), and a
    store at ``path`` that one fused step of 50 versions has written."""
    with StateManager() as source:
        cursor = three_on_a_ring(source)
        store = SQLiteStore(str(path), display="test")
        try:
            tracker = snapshot_tracker(SnapshotPolicy())
            start = cursor.committed
            step = store.write_pending(cursor, tracker, 50, 0.0, {})
            assert step is not None
            assert step.written is not None
            assert step.written[0] == {}
            assert cursor.committed == start  # the step's own batch: the caller commits
            cursor.commit()
            yield FirstStep(cursor, store, tracker, start, step)
        finally:
            store.close()


def test_a_fused_step_goes_on_through_full_batches(path: Path) -> None:
    """With ``keep_going``, one step writes the full batches one after the other,
    taking each off the cursor, and returns the last (partial) one as a step's."""
    with first_step_of_three(path) as first:
        assert (len(first.step.batch), first.step.earlier) == (50, (0, 0, 0))
        cursor = first.cursor
        pending = first.store.write_pending(cursor, first.tracker, 50, 0.0, {}, keep_going=60.0)
        assert pending is not None
        assert pending.earlier == (5, 250, 0)
        assert len(pending.batch) == 3
        assert pending.written is not None
        assert pending.written[0] == {}
        assert pending.error is None
        assert cursor.committed == first.start + 300
        assert cursor.position == first.start + 303
        assert first.store.current_versions(["e-0", "e-1", "e-2"]) == {
            "e-0": 101,
            "e-1": 101,
            "e-2": 101,
        }


def test_a_fused_step_stops_going_on_at_a_refusal(path: Path) -> None:
    """A batch the store refuses part of ends the step: it is returned with its
    refusal, after the whole batches before it (taken off the cursor)."""
    with first_step_of_three(path) as first:
        with StateManager.open(url(path)) as other:  # e-2's version 2, first
            assert other.update_state("e-2", {"variables": {"by": "other"}}) == 2
        pending = first.store.write_pending(
            first.cursor, first.tracker, 50, 0.0, {}, keep_going=60.0
        )
        assert pending is not None
        assert pending.earlier == (3, 150, 0)
        assert pending.written is not None
        refusals, _ = pending.written
        assert list(refusals) == ["e-2"]
        assert isinstance(refusals["e-2"], ConflictError)
        assert first.cursor.committed == first.start + 200
        # The chains of e-0 and e-1 in the refused batch are stored.
        assert first.store.current_versions(["e-0", "e-1", "e-2"]) == {
            "e-0": 101,
            "e-1": 101,
            "e-2": 2,
        }


def test_the_write_behind_counts_the_batches_a_step_went_on_through(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Versions pile up while the file is locked; once it is free, fused steps go on
    through the full batches. stats() counts every batch and version, and flush()
    returns when all are stored."""
    with StateManager.open(
        url(path), durability="async", flush_interval=0.5, max_batch=10, connect_timeout=0.05
    ) as manager:
        store = manager._store
        assert isinstance(store, SQLiteStore)
        went_on: list[tuple[int, int, int]] = []
        write_pending = store.write_pending

        def spy(*args: Any, **kwargs: Any) -> PendingWrite | None:
            pending = write_pending(*args, **kwargs)
            if pending is not None and pending.earlier[0]:
                went_on.append(pending.earlier)
            return pending

        monkeypatch.setattr(store, "write_pending", spy)
        manager.create_execution("e", workflow_id="w", variables={"count": 0})
        manager.flush()
        before = manager.stats()
        with write_locked(path):
            for count in range(1, 201):
                manager.update_state("e", {"variables": {"count": count}})
            wait_for_a_retry(manager)
        manager.flush(timeout=30)
        after = manager.stats()
        assert went_on  # some step stored full batches before the one it returned
        assert after["pending_events"] == 0
        assert after["flushed_versions"] - before["flushed_versions"] == 200
        assert after["flush_batches"] - before["flush_batches"] >= 20
        state = manager.get_state("e")
    with StateManager.open(url(path)) as reopened:
        assert reopened.get_state("e") == state
        assert state.variables["count"] == 200


def test_a_refusal_after_full_batches_is_reported_and_they_are_stored(path: Path) -> None:
    """Versions pile up behind a locked file, the last of them one that another
    writer stored first: once the file is free the full batches are stored, and
    flush() reports the refused version, which memory gives up for the stored one."""
    with (
        StateManager.open(url(path), durability="sync") as other,
        StateManager.open(
            url(path), durability="async", flush_interval=0.5, max_batch=10, connect_timeout=0.05
        ) as manager,
    ):
        other.create_execution("mine", workflow_id="w", variables={"count": 0})
        other.create_execution("shared", workflow_id="w")
        manager.get_state("mine")
        manager.get_state("shared")  # both loaded at version 1
        other.update_state("shared", {"variables": {"by": "other"}})  # stored v2
        before = manager.stats()
        with write_locked(path):
            for count in range(1, 101):
                manager.update_state("mine", {"variables": {"count": count}})
            assert manager.update_state("shared", {"variables": {"by": "async"}}) == 2
            wait_for_a_retry(manager)
        with pytest.raises(ConflictError):
            manager.flush(timeout=30)
        after = manager.stats()
        assert after["refused_versions"] - before["refused_versions"] == 1
        assert after["flushed_versions"] - before["flushed_versions"] == 100
        assert after["pending_events"] == 0
        assert manager.get_state("shared").variables == {"by": "other"}
        mine = manager.get_state("mine")
    with StateManager.open(url(path)) as reopened:
        assert reopened.get_state("mine") == mine
        assert mine.variables["count"] == 100
        assert reopened.get_state("shared").variables == {"by": "other"}


def test_a_refused_write_behind_version_is_reported_by_flush(path: Path) -> None:
    """Another writer stored version 2 first: the fused step reports the refusal,
    flush() raises ConflictError, and memory goes back to the stored state."""
    with (
        StateManager.open(url(path), durability="sync") as other,
        StateManager.open(url(path), durability="async", flush_interval=60) as manager,
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
    with StateManager.open(url(path)) as reopened:
        assert reopened.get_state("e").variables == {"by": "other", "then": "async"}


def test_the_write_behind_retries_a_failed_fused_write_then_stores_it(path: Path) -> None:
    """The file's lock is held past the timeout: the fused write fails, the flusher
    reports the failure in stats() and retries the same batch until the lock is
    gone; then every version is stored."""
    with StateManager.open(
        url(path), durability="async", flush_interval=0.01, connect_timeout=0.05
    ) as manager:
        manager.create_execution("e", workflow_id="w", variables={"count": 0})
        manager.flush()
        with write_locked(path):
            for count in range(1, 51):
                manager.update_state("e", {"variables": {"count": count}})
            wait_for_a_retry(manager)
            stats = manager.stats()
            assert stats["flush_retries"] > 0
            assert "held the lock" in (stats["last_store_error"] or "")
            assert stats["pending_events"] > 0
        manager.flush(timeout=30)
        assert manager.stats()["last_store_error"] is None
        state = manager.get_state("e")
    with StateManager.open(url(path)) as reopened:
        assert reopened.get_state("e") == state
        assert state.variables["count"] == 50


# -- the sync path of one update in one call (Store.write_update) ---------------------------


class OneCall(NamedTuple):
    store: SQLiteStore
    core: _core.Core
    tracker: _core.SnapshotTracker


@pytest.fixture
def one_call(path: Path) -> Iterator[OneCall]:
    """A native store holding execution ``e`` at version 1, and a core and a tracker
    holding it as the manager would."""
    store = SQLiteStore(str(path), display=url(path), connect_timeout=0.3)
    core = _core.Core()
    tracker = snapshot_tracker(SnapshotPolicy())
    created = core.prepare_create("e", "w", {"a": 0}, None, None)
    assert store.write([WriteItem(created.record(), None, None)]) == [None]
    core.publish(created)
    try:
        yield OneCall(store, core, tracker)
    finally:
        store.close()


def stored_version(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as connection:
        (version,) = connection.execute(
            "SELECT version FROM wfstate_executions WHERE execution_id = 'e'"
        ).fetchone()
    return int(version)


def test_write_update_prepares_writes_and_publishes_in_one_call(
    path: Path, one_call: OneCall
) -> None:
    store, core, tracker = one_call
    assert store.write_update(core, tracker, "e", {"variables": {"a": 1}}, None, "alice") == (
        2,
        None,
    )
    assert core.get("e").version == 2
    assert stored_version(path) == 2
    loaded = store.load("e")
    assert loaded is not None
    stored = _core.rebuild("e", loaded.snapshot, loaded.deltas)
    assert stored.to_dict() == core.get("e").to_dict()
    assert [(version, actor) for version, _, actor, _ in store.read_deltas("e")][-1] == (
        2,
        "alice",
    )
    # The tracker decides the snapshot as on the step-by-step path: one at a final
    # status.
    assert store.write_update(core, tracker, "e", {"status": "completed"}, 2, None) == (3, None)
    loaded = store.load("e")
    assert loaded is not None
    assert loaded.snapshot_version == 3


def test_write_update_refused_publishes_nothing(path: Path, one_call: OneCall) -> None:
    """Another writer stored version 2 first: the refusal comes back with the
    versions it missed, and this core stays at version 1."""
    store, core, tracker = one_call
    other = _core.Core()
    loaded = store.load("e")
    assert loaded is not None
    other.install(_core.rebuild("e", loaded.snapshot, loaded.deltas))
    assert store.write_update(other, tracker, "e", {"variables": {"b": 1}}, None, None) == (
        2,
        None,
    )
    outcome = store.write_update(core, tracker, "e", {"variables": {"a": 1}}, None, None)
    assert outcome is not None
    base, refusal = outcome
    assert base == 1
    assert isinstance(refusal, ConflictError)
    assert (refusal.expected, refusal.actual) == (1, 2)
    assert core.get("e").version == 1
    assert stored_version(path) == 2


def test_write_update_of_a_bad_update_writes_nothing(path: Path, one_call: OneCall) -> None:
    store, core, tracker = one_call
    with pytest.raises(ValidationError):
        store.write_update(core, tracker, "e", {"status": "no-such-status"}, None, None)
    with pytest.raises(ConflictError):
        store.write_update(core, tracker, "e", {"variables": {"a": 1}}, 7, None)
    assert core.get("e").version == 1
    assert stored_version(path) == 1


def test_write_update_that_fails_changes_nothing(path: Path, one_call: OneCall) -> None:
    """The file's lock is held past the timeout: StoreUnavailableError, neither the
    store nor the core advanced; the same update succeeds once the lock is gone."""
    store, core, tracker = one_call
    with write_locked(path), pytest.raises(StoreUnavailableError, match="held the lock"):
        store.write_update(core, tracker, "e", {"variables": {"a": 1}}, None, None)
    assert core.get("e").version == 1
    assert stored_version(path) == 1
    assert store.write_update(core, tracker, "e", {"variables": {"a": 1}}, None, None) == (2, None)
    assert stored_version(path) == 2


#: Version 2 (the first the tracker sees) is the baseline; version 4 is due a snapshot.
EVERY_TWO = SnapshotPolicy(every_versions=2, when_deltas_outweigh=False, at_final_status=False)


def stored_snapshots(path: Path) -> list[int]:
    with contextlib.closing(sqlite3.connect(path)) as connection:
        rows = connection.execute(
            "SELECT version FROM wfstate_snapshots WHERE execution_id = 'e' ORDER BY version"
        ).fetchall()
    return [version for (version,) in rows]


def test_a_failed_one_call_write_takes_back_its_snapshot_decision(
    path: Path, one_call: OneCall
) -> None:
    """Version 4 is due a snapshot. Its first write fails: the retry is decided
    again, so version 4 is stored with its snapshot (not the next one due later)."""
    store, core, _ = one_call
    tracker = snapshot_tracker(EVERY_TWO)
    for value in (1, 2):
        store.write_update(core, tracker, "e", {"variables": {"a": value}}, None, None)
    with write_locked(path), pytest.raises(StoreUnavailableError):
        store.write_update(core, tracker, "e", {"variables": {"a": 3}}, None, None)
    assert store.write_update(core, tracker, "e", {"variables": {"a": 3}}, None, None) == (4, None)
    assert stored_snapshots(path) == [4]


def test_a_refused_one_call_write_takes_back_its_snapshot_decision(
    path: Path, one_call: OneCall
) -> None:
    """Version 4, due a snapshot, is refused (another writer stored a version 4).
    The decision is taken back: once this core has caught up, its next version (5)
    is decided from the snapshot rule as it stood, and carries one."""
    store, core, _ = one_call
    tracker = snapshot_tracker(EVERY_TWO)
    for value in (1, 2):
        store.write_update(core, tracker, "e", {"variables": {"a": value}}, None, None)
    other = _core.Core()
    loaded = store.load("e")
    assert loaded is not None
    other.install(_core.rebuild("e", loaded.snapshot, loaded.deltas))
    other_tracker = snapshot_tracker(
        SnapshotPolicy(every_versions=None, when_deltas_outweigh=False)
    )
    assert store.write_update(other, other_tracker, "e", {"variables": {"b": 1}}, None, None) == (
        4,
        None,
    )
    outcome = store.write_update(core, tracker, "e", {"variables": {"a": 3}}, None, None)
    assert outcome is not None
    assert isinstance(outcome[1], ConflictError)
    assert stored_snapshots(path) == []
    loaded = store.load("e")
    assert loaded is not None
    core.refresh(_core.rebuild("e", loaded.snapshot, loaded.deltas))
    assert store.write_update(core, tracker, "e", {"variables": {"a": 3}}, None, None) == (5, None)
    assert stored_snapshots(path) == [5]


def test_a_stale_copy_is_merged_and_a_missing_one_loaded_on_the_one_call_path(
    path: Path,
) -> None:
    """Two managers on one file. The second has never loaded ``e``: its one call
    finds nothing in memory and the update goes through the path that loads it. The
    first's copy is then stale: its one call is refused, and the update is merged on
    top of the stored version."""
    with (
        StateManager.open(url(path)) as first,
        StateManager.open(url(path)) as second,
    ):
        first.create_execution("e", workflow_id="w")
        assert second.update_state("e", {"variables": {"b": 1}}) == 2
        assert first.update_state("e", {"variables": {"a": 1}}) == 3
        stats = first.stats()
        assert (stats["conflicts"], stats["merges"], stats["conflicts_resolved"]) == (1, 1, 1)
        assert first.get_state("e").variables == {"a": 1, "b": 1}
    with StateManager.open(url(path)) as reopened:
        state = reopened.get_state("e")
        assert (state.version, state.variables) == (3, {"a": 1, "b": 1})


class _WriteCalled(Exception):
    """Raised by a store's ``write`` that a test expects not to be called."""


def forbid_write(manager: StateManager, monkeypatch: pytest.MonkeyPatch) -> SQLiteStore:
    """The manager's store, whose ``write`` (the step-by-step sync path) now raises
    ``_WriteCalled``."""
    store = manager._store
    assert isinstance(store, SQLiteStore)

    def write(items: object) -> None:
        raise _WriteCalled

    monkeypatch.setattr(store, "write", write)
    return store


def test_a_plain_update_takes_the_one_call_path_and_a_leased_one_does_not(
    path: Path, manager: StateManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager.create_execution("e", workflow_id="w")
    forbid_write(manager, monkeypatch)
    assert manager.update_state("e", {"variables": {"a": 1}}) == 2
    lease = manager.acquire("e", owner="worker")
    with pytest.raises(_WriteCalled):
        manager.update_state("e", {"variables": {"a": 2}}, lease=lease)
    assert manager.get_state("e").version == 2


def test_a_critical_update_in_async_mode_takes_the_one_call_path_after_the_others(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Write-behind versions first (the fused step), then the critical status change
    in one call: the stored versions are contiguous and end with it."""
    with StateManager.open(url(path), durability="async", flush_interval=0.05) as manager:
        manager.create_execution("e", workflow_id="w")
        store = forbid_write(manager, monkeypatch)
        for value in range(50):
            manager.update_state("e", {"variables": {"a": value}})
        assert manager.update_state("e", {"status": "suspended"}) == 52
        versions = [version for version, _, _, _ in store.read_deltas("e")]
        assert versions == list(range(1, 53))
    with StateManager.open(url(path)) as reopened:
        state = reopened.get_state("e")
        assert (state.version, state.status, state.variables) == (52, "suspended", {"a": 49})


def test_the_one_call_path_stores_the_snapshots_the_step_by_step_path_does(
    tmp_path: Path, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same updates through the native writer (one call) and through the sqlite3
    module (step by step), with a snapshot every 3 versions and at a final status."""
    policy = SnapshotPolicy(every_versions=3)
    stored: list[list[int]] = []
    for target, native in ((path, True), (tmp_path / "sqlite3.db", False)):
        monkeypatch.setenv(NATIVE_WRITER_ENV, "1" if native else "0")
        with StateManager.open(url(target), snapshot_policy=policy) as manager:
            assert isinstance(manager._store, SQLiteStore)
            assert manager._store.native_writer is native
            manager.create_execution("e", workflow_id="w")
            for value in range(10):
                manager.update_state("e", {"variables": {"a": value}})
            manager.update_state("e", {"status": "completed"})
        with contextlib.closing(sqlite3.connect(target)) as connection:
            stored.append(
                [
                    version
                    for (version,) in connection.execute(
                        "SELECT version FROM wfstate_snapshots ORDER BY version"
                    )
                ]
            )
    assert stored[0] == stored[1]
    assert stored[0][-1] == 12
    assert len(stored[0]) >= 4
