"""The durable StateManager (``StateManager.open``) on every backend, in both write modes.

What an engine relies on: an acknowledged update is in the store (sync) or will be
after ``flush()``/``close()`` (async); reopening gives back every execution, past
version, fork link, history and list; a failed store write in sync mode changes
nothing and says ``StoreUnavailableError``; the write-behind retries, reports its lag
and writes critical updates before returning.

Every manager is opened through ``wfstate.manager.open_store``, which these tests wrap
(``Stores``): the wrapper forwards to the real store and can fail or stall writes on
demand, and for ``memory://`` it hands every reopen the same in-process store, so the
recovery path runs on all three backends. The checks read the store directly, never
through the manager under test.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import pytest

import wfstate.manager
from durable_support import STORY, comparable_events, loaded, replayed, stored_versions
from wfstate import (
    AlreadyExistsError,
    BackpressureError,
    ClosedError,
    ConflictError,
    EventType,
    ExecutionStatus,
    HistoryOptions,
    NodeStatus,
    NotFoundError,
    SnapshotPolicy,
    StateManager,
    StateUpdate,
    StoreUnavailableError,
    ValidationError,
    WfstateError,
    WorkflowState,
)
from wfstate._core import Core, RecordBatch
from wfstate.store import Store, open_store
from wfstate.store.base import GroupedByManager, LeaseGrant, LoadedExecution, WriteItem
from wfstate.store.memory import MemoryStore

Durability = Literal["sync", "async"]

#: Long enough that the write-behind never writes on its own during a test step.
LONG_FLUSH_INTERVAL = 60.0
#: Long enough for updates to pile up between batches, short enough that a flusher
#: waiting for records does not hold up ``close`` for long (see
#: ``test_close_returns_promptly_with_a_long_flush_interval``).
SLOW_FLUSH_INTERVAL = 0.25


class ControlledStore(GroupedByManager):
    """A real store behind a switch: writes can be made to fail or to wait. Every
    write passes the switch: the manager groups the sync writes, and every
    write-behind batch goes through ``write_batch`` (``GroupedByManager``).

    It records which thread wrote each version, so a test can tell a write made by
    the caller (sync and critical updates) from one made by the write-behind.
    """

    def __init__(self, inner: Store, *, owns_inner: bool) -> None:
        self.inner = inner
        self.url = inner.url
        self.owns_inner = owns_inner
        self._lock = threading.Lock()
        self.fail_next_writes = 0
        self.broken = False
        self.failed_writes = 0
        self.gate = threading.Event()
        self.gate.set()
        #: Report version conflicts with the version as of the statement only (what
        #: PostgreSQL's store reports when a writer raced its statement and the
        #: follow-up read of the newer version failed).
        self.conflicts_as_of_statement = False
        #: (execution_id, version) -> name of the thread whose write stored it.
        self.writers: dict[tuple[str, int], str] = {}

    def heal(self) -> None:
        with self._lock:
            self.broken = False
            self.fail_next_writes = 0
        self.gate.set()

    def schema_version(self) -> int:
        return self.inner.schema_version()

    def _enter_write(self) -> None:
        """Wait at the gate, then fail if the switch says so."""
        self.gate.wait()
        with self._lock:
            failing = self.broken or self.fail_next_writes > 0
            if self.fail_next_writes > 0:
                self.fail_next_writes -= 1
            if failing:
                self.failed_writes += 1
        if failing:
            raise StoreUnavailableError(f"injected failure of {self.url}", target=self.url)

    def write(self, items: Sequence[WriteItem]) -> list[WfstateError | None]:
        self._enter_write()
        outcomes = self.inner.write(items)
        if self.conflicts_as_of_statement:
            outcomes = [
                ConflictError(outcome.execution_id, outcome.expected, outcome.expected)
                if isinstance(outcome, ConflictError)
                else outcome
                for outcome in outcomes
            ]
        thread = threading.current_thread().name
        with self._lock:
            for item, outcome in zip(items, outcomes, strict=True):
                if outcome is None:
                    self.writers[(item.record.execution_id, item.record.version)] = thread
        return outcomes

    def write_batch(
        self, batch: RecordBatch, snapshot: Sequence[bool]
    ) -> tuple[dict[str, WfstateError], list[int]]:
        self._enter_write()
        refusals, sizes = self.inner.write_batch(batch, snapshot)
        thread = threading.current_thread().name
        with self._lock:
            for record in batch.records():
                if record.execution_id not in refusals:
                    self.writers[(record.execution_id, record.version)] = thread
        return refusals, sizes

    def load(self, execution_id: str, *, version: int | None = None) -> LoadedExecution | None:
        return self.inner.load(execution_id, version=version)

    def active_execution_ids(self) -> list[str]:
        return self.inner.active_execution_ids()

    def current_versions(self, execution_ids: Sequence[str]) -> dict[str, int]:
        return self.inner.current_versions(execution_ids)

    def version_at(self, execution_id: str, at_us: int) -> int | None:
        return self.inner.version_at(execution_id, at_us)

    def read_deltas(
        self,
        execution_id: str,
        *,
        after_version: int | None = None,
        since_us: int | None = None,
        until_us: int | None = None,
    ) -> list[tuple[int, int, str | None, bytes]]:
        return self.inner.read_deltas(
            execution_id, after_version=after_version, since_us=since_us, until_us=until_us
        )

    def list_execution_ids(
        self,
        *,
        statuses: Sequence[str] | None = None,
        workflow_id: str | None = None,
        limit: int | None = None,
    ) -> list[str]:
        return self.inner.list_execution_ids(
            statuses=statuses, workflow_id=workflow_id, limit=limit
        )

    def storage_bytes(self) -> int:
        return self.inner.storage_bytes()

    def acquire_lease(self, execution_id: str, owner: str, ttl_us: int) -> LeaseGrant:
        return self.inner.acquire_lease(execution_id, owner, ttl_us)

    def renew_lease(self, execution_id: str, owner: str, token: int, ttl_us: int) -> LeaseGrant:
        return self.inner.renew_lease(execution_id, owner, token, ttl_us)

    def release_lease(self, execution_id: str, owner: str, token: int) -> bool:
        return self.inner.release_lease(execution_id, owner, token)

    def get_lease(self, execution_id: str) -> LeaseGrant | None:
        return self.inner.get_lease(execution_id)

    def claim_orphans(self, owner: str, ttl_us: int, limit: int) -> list[LeaseGrant]:
        return self.inner.claim_orphans(owner, ttl_us, limit)

    def owned_execution_ids(self, owner: str) -> list[str]:
        return self.inner.owned_execution_ids(owner)

    def lease_log(self, execution_id: str) -> list[tuple[int, str | None, int | None]]:
        return self.inner.lease_log(execution_id)

    def close(self) -> None:
        if self.owns_inner:
            self.inner.close()


class Stores:
    """Opens the test's store for the manager (wrapped) and for the checks (direct)."""

    def __init__(self, url: str, durability: Durability) -> None:
        self.url = url
        self.durability = durability
        self.opened: list[ControlledStore] = []
        self.managers: list[StateManager] = []
        self._memory = MemoryStore(url) if url.startswith("memory:") else None

    def open_store(self, url: str, *, connect_timeout: float = 5.0) -> Store:
        if url != self.url:
            return open_store(url, connect_timeout=connect_timeout)
        if self._memory is not None:
            wrapper = ControlledStore(self._memory, owns_inner=False)
        else:
            wrapper = ControlledStore(
                open_store(url, connect_timeout=connect_timeout), owns_inner=True
            )
        self.opened.append(wrapper)
        return wrapper

    @property
    def current(self) -> ControlledStore:
        """The store of the manager opened last."""
        return self.opened[-1]

    def manager(self, *, durability: Durability | None = None, **options: Any) -> StateManager:
        opened = StateManager.open(self.url, durability=durability or self.durability, **options)
        self.managers.append(opened)
        return opened

    def reopen(self, manager: StateManager, **options: Any) -> StateManager:
        manager.close()
        return self.manager(**options)

    @contextlib.contextmanager
    def direct(self) -> Iterator[Store]:
        """The stored data, read without the manager (and without the wrapper)."""
        if self._memory is not None:
            yield self._memory
            return
        store = open_store(self.url)
        try:
            yield store
        finally:
            store.close()

    def close_all(self) -> None:
        for wrapper in self.opened:
            wrapper.heal()
        for manager in self.managers:
            manager.close(timeout=10)


@pytest.fixture
def stores(
    store_url: str, durability: Durability, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Stores]:
    opened = Stores(store_url, durability)
    monkeypatch.setattr(wfstate.manager, "open_store", opened.open_store)
    try:
        yield opened
    finally:
        opened.close_all()


def wait_until(condition: Callable[[], bool], *, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def check_stored(stores: Stores, expected: dict[str, WorkflowState]) -> None:
    """The store holds exactly these states: versions 1..n, replay == snapshot load."""
    with stores.direct() as store:
        assert store.current_versions(list(expected)) == {
            execution_id: state.version for execution_id, state in expected.items()
        }
        for execution_id, state in expected.items():
            assert stored_versions(store, execution_id) == list(range(1, state.version + 1))
            assert replayed(store, execution_id) == state
            assert loaded(store, execution_id) == state


class Journal:
    """What the manager acknowledged: every execution's state at every version."""

    def __init__(self) -> None:
        self.states: dict[str, dict[int, WorkflowState]] = {}

    def record(self, state: WorkflowState) -> None:
        self.states.setdefault(state.execution_id, {})[state.version] = state

    def latest(self) -> dict[str, WorkflowState]:
        return {
            execution_id: versions[max(versions)] for execution_id, versions in self.states.items()
        }

    def check(self, manager: StateManager) -> None:
        for execution_id, versions in self.states.items():
            assert manager.get_state(execution_id) == versions[max(versions)]
            for version, state in versions.items():
                assert manager.get_state(execution_id, version=version) == state


def run_stories(manager: StateManager, journal: Journal, *, seed: int, count: int = 4) -> None:
    """Interleave ``count`` executions through ``STORY`` (some stopping early)."""
    rng = random.Random(seed)
    remaining: dict[str, list[dict[str, Any]]] = {}
    for number in range(count):
        state = manager.create_execution(
            f"run-{seed}-{number}",
            workflow_id=f"wf-{number % 2}",
            variables={"seed": seed, "number": number},
            context={"tenant": "t1"},
            actor="starter",
        )
        journal.record(state)
        remaining[state.execution_id] = [dict(update) for update in STORY[: 4 + 2 * number]]
    while remaining:
        execution_id = rng.choice(sorted(remaining))
        update = remaining[execution_id].pop(0)
        if not remaining[execution_id]:
            del remaining[execution_id]
        version = manager.update_state(execution_id, update, actor=rng.choice([None, "worker"]))
        state = manager.get_state(execution_id)
        assert state.version == version
        journal.record(state)


# -- acknowledged means stored ---------------------------------------------------------


def test_acknowledged_updates_survive_close_and_reopen(stores: Stores) -> None:
    journal = Journal()
    manager = stores.manager()
    run_stories(manager, journal, seed=1)
    generated = manager.create_execution(workflow_id="generated", variables={"g": True})
    journal.record(generated)
    journal.check(manager)

    reopened = stores.reopen(manager)
    journal.check(reopened)
    check_stored(stores, journal.latest())
    # Writing goes on from the stored versions.
    for execution_id, state in journal.latest().items():
        if state.status is ExecutionStatus.RUNNING:
            version = reopened.update_state(execution_id, {"variables": {"after": 1}})
            assert version == state.version + 1
            journal.record(reopened.get_state(execution_id))
    reopened = stores.reopen(reopened)
    journal.check(reopened)
    check_stored(stores, journal.latest())


def test_concurrent_acknowledged_updates_all_survive(stores: Stores) -> None:
    manager = stores.manager()
    for number in range(6):
        manager.create_execution(f"thread-{number}", workflow_id="wf")
    manager.create_execution("shared", workflow_id="wf", variables={"count": 0})
    acknowledged: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def worker(number: int) -> None:
        try:
            versions = acknowledged.setdefault(f"thread-{number}", [])
            for step in range(15):
                versions.append(
                    manager.update_state(f"thread-{number}", {"variables": {"step": step}})
                )
                manager.transact(
                    "shared",
                    lambda state: {"variables": {"count": state.variables["count"] + 1}},
                    retries=1000,
                )
        except BaseException as error:  # reported below, with the failing thread's id
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(number,)) for number in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    expected = {execution_id: manager.get_state(execution_id) for execution_id in acknowledged}
    expected["shared"] = manager.get_state("shared")
    assert expected["shared"].variables == {"count": 90}
    assert expected["shared"].version == 91

    reopened = stores.reopen(manager)
    for execution_id, versions in acknowledged.items():
        assert versions == list(range(2, 17))
        assert reopened.get_state(execution_id) == expected[execution_id]
        assert reopened.get_state(execution_id).variables == {"step": 14}
    assert reopened.get_state("shared") == expected["shared"]
    check_stored(stores, expected)


# -- recovery ---------------------------------------------------------------------------


def test_recover_returns_running_and_suspended_with_their_last_state(stores: Stores) -> None:
    manager = stores.manager()
    paths: dict[str, list[dict[str, Any]]] = {
        "running": [dict(update) for update in STORY[:3]],
        "suspended": [{"nodes": {"a": "running"}}, {"status": "suspended"}],
        "completed": [{"status": "completed"}],
        "failed": [{"nodes": {"a": "running"}}, {"nodes": {"a": "failed"}}, {"status": "failed"}],
        "cancelled": [{"status": "suspended"}, {"status": "cancelled"}],
        "resumed": [{"status": "failed"}, {"status": "running"}, {"variables": {"r": 1}}],
        "untouched": [],
    }
    last: dict[str, WorkflowState] = {}
    for execution_id, updates in paths.items():
        last[execution_id] = manager.create_execution(execution_id, workflow_id="wf")
        for update in updates:
            manager.update_state(execution_id, update)
            last[execution_id] = manager.get_state(execution_id)
    assert manager.recover() == []  # nothing was stored when it opened

    reopened = stores.reopen(manager)
    recovered = {state.execution_id: state for state in reopened.recover()}
    assert sorted(recovered) == ["resumed", "running", "suspended", "untouched"]
    for execution_id, state in recovered.items():
        assert state == last[execution_id]
    # Finished ones are not recovered but are all still there.
    for execution_id in ("completed", "failed", "cancelled"):
        assert reopened.get_state(execution_id) == last[execution_id]

    # One that finishes after the reopen leaves the list; one that changes shows it.
    reopened.update_state("running", {"status": "completed"})
    reopened.update_state("suspended", {"status": "running"})
    recovered = {state.execution_id: state for state in reopened.recover()}
    assert sorted(recovered) == ["resumed", "suspended", "untouched"]
    assert recovered["suspended"] == reopened.get_state("suspended")
    assert recovered["suspended"].status is ExecutionStatus.RUNNING


# -- past versions --------------------------------------------------------------------


def expected_at(versions: dict[int, WorkflowState], moment: datetime) -> WorkflowState:
    """The state of the newest version written at or before ``moment``."""
    return versions[max(v for v, state in versions.items() if state.updated_at <= moment)]


@pytest.mark.parametrize("ring_capacity", [16, 100_000], ids=["small-ring", "large-ring"])
def test_past_versions_rebuilt_from_the_store_equal_what_was_current(
    stores: Stores, ring_capacity: int
) -> None:
    journal = Journal()
    manager = stores.manager(
        ring_capacity=ring_capacity, snapshot_policy=SnapshotPolicy(every_versions=4)
    )
    run_stories(manager, journal, seed=7, count=3)
    for step in range(20):
        version = manager.update_state("run-7-2", {"variables": {"step": step}})
        journal.record(manager.get_state("run-7-2"))
        assert version == journal.latest()["run-7-2"].version

    def check(current: StateManager) -> None:
        journal.check(current)
        for execution_id, versions in journal.states.items():
            first = versions[1]
            for state in versions.values():
                assert current.get_state(execution_id, at=state.updated_at) == expected_at(
                    versions, state.updated_at
                )
            latest = versions[max(versions)]
            now = datetime.now(UTC)
            assert current.get_state(execution_id, at=now) == latest
            with pytest.raises(NotFoundError):
                current.get_state(execution_id, at=first.created_at - timedelta(microseconds=1))
            with pytest.raises(NotFoundError):
                current.get_state(execution_id, version=latest.version + 1)
            with pytest.raises(ValidationError):
                current.get_state(execution_id, version=0)

    check(manager)
    reopened = stores.reopen(
        manager, ring_capacity=ring_capacity, snapshot_policy=SnapshotPolicy(every_versions=4)
    )
    check(reopened)
    with stores.direct() as store:
        snapshot = store.load("run-7-2")
        assert snapshot is not None
        assert snapshot.snapshot_version > 0  # rebuilt from a snapshot, not from version 1


# -- fork ---------------------------------------------------------------------------------


def test_fork_records_the_link_on_both_sides_and_survives_reopen(stores: Stores) -> None:
    manager = stores.manager()
    manager.create_execution("source", workflow_id="wf", variables={"v": 1}, context={"c": 1})
    manager.update_state("source", {"nodes": {"a": "running"}, "current_node": "a"})
    manager.update_state("source", {"variables": {"v": 2}})
    at_two = manager.get_state("source", version=2)

    copy = manager.fork("source", version=2, new_execution_id="copy", actor="forker")
    generated = manager.fork("source")
    assert copy.execution_id == "copy"
    assert copy.version == 1
    assert copy.status is ExecutionStatus.RUNNING
    assert copy.forked_from == ("source", 2)
    assert (copy.variables, copy.context, copy.nodes, copy.current_node) == (
        at_two.variables,
        at_two.context,
        at_two.nodes,
        at_two.current_node,
    )
    assert generated.forked_from == ("source", 4)  # the current version: after the link
    source = manager.get_state("source")
    assert source.version == 5  # two execution_forked versions
    history = manager.get_history("source", HistoryOptions(types=[EventType.EXECUTION_FORKED]))
    links = [(event.version, event.data) for event in history.events]
    assert links == [
        (4, {"execution_id": "copy", "from_version": 2}),
        (5, {"execution_id": generated.execution_id, "from_version": 4}),
    ]
    copy_history = comparable_events(manager.get_history("copy").events)
    generated_state = manager.get_state(generated.execution_id)

    reopened = stores.reopen(manager)
    assert reopened.get_state("copy") == copy
    assert reopened.get_state(generated.execution_id) == generated_state
    assert reopened.get_state("source") == source
    after = reopened.get_history("source", HistoryOptions(types=[EventType.EXECUTION_FORKED]))
    assert [(event.version, event.data) for event in after.events] == links
    assert comparable_events(reopened.get_history("copy").events) == copy_history
    (created,) = reopened.get_history("copy").events
    assert created.data["forked_from"] == {"execution_id": "source", "version": 2}
    # The copy lives on by itself.
    assert reopened.update_state("copy", {"variables": {"v": 3}}) == 2
    assert reopened.get_state("source", version=2) == at_two


# -- history and lists ----------------------------------------------------------------


def history_queries(state: WorkflowState) -> list[HistoryOptions]:
    middle = state.created_at + (state.updated_at - state.created_at) / 2
    return [
        HistoryOptions(),
        HistoryOptions(types=[EventType.NODE_START, EventType.NODE_FAILED]),
        HistoryOptions(node_id="charge"),
        HistoryOptions(after_version=4),
        HistoryOptions(limit=3),
        HistoryOptions(after_version=2, limit=2, types=[EventType.STATUS_CHANGE]),
        HistoryOptions(since=middle),
        HistoryOptions(until=middle),
        HistoryOptions(since=state.created_at, until=state.updated_at),
    ]


def test_history_from_the_store_equals_history_before(stores: Stores) -> None:
    journal = Journal()
    manager = stores.manager()
    run_stories(manager, journal, seed=3, count=3)
    before: dict[tuple[str, int], Any] = {}
    for execution_id, state in journal.latest().items():
        for number, options in enumerate(history_queries(state)):
            found = manager.get_history(execution_id, options)
            before[(execution_id, number)] = (comparable_events(found.events), found.summary)
    assert any(events for events, _ in before.values())

    reopened = stores.reopen(manager)
    for execution_id, state in journal.latest().items():
        for number, options in enumerate(history_queries(state)):
            found = reopened.get_history(execution_id, options)
            assert (comparable_events(found.events), found.summary) == before[
                (execution_id, number)
            ], (execution_id, options)
            assert all(event.seq == 0 for event in found.events)


def test_list_executions_from_the_store(stores: Stores) -> None:
    manager = stores.manager()
    created: list[str] = []
    statuses: dict[str, ExecutionStatus] = {}
    workflows: dict[str, str] = {}
    plan = [
        ("zeta", "wf-a", None),
        ("alpha", "wf-b", "completed"),
        ("mid", "wf-a", "suspended"),
        ("beta", "wf-b", "failed"),
        ("omega", "wf-a", "cancelled"),
        ("gamma", "wf-b", None),
    ]
    for execution_id, workflow_id, status in plan:
        manager.create_execution(execution_id, workflow_id=workflow_id)
        created.append(execution_id)
        workflows[execution_id] = workflow_id
        if status is not None:
            manager.update_state(execution_id, {"status": status})
        statuses[execution_id] = manager.get_state(execution_id).status

    def check(current: StateManager) -> None:
        listed = current.list_executions()
        assert [state.execution_id for state in listed] == created
        assert listed == [current.get_state(execution_id) for execution_id in created]
        for wanted in (
            ExecutionStatus.COMPLETED,
            "running",
            [ExecutionStatus.FAILED, ExecutionStatus.CANCELLED],
        ):
            wanted_set = (
                {ExecutionStatus(wanted)}
                if isinstance(wanted, str)
                else {ExecutionStatus(s) for s in wanted}
            )
            assert [state.execution_id for state in current.list_executions(status=wanted)] == [
                i for i in created if statuses[i] in wanted_set
            ]
        assert [s.execution_id for s in current.list_executions(workflow_id="wf-a")] == [
            i for i in created if workflows[i] == "wf-a"
        ]
        assert [s.execution_id for s in current.list_executions(limit=2)] == created[:2]
        assert current.list_executions(workflow_id="wf-a", status="completed") == []

    check(manager)
    reopened = stores.reopen(manager)
    check(reopened)


# -- failures of the store ------------------------------------------------------------


def state_and_history(manager: StateManager, execution_id: str) -> tuple[WorkflowState, Any]:
    return manager.get_state(execution_id), comparable_events(
        manager.get_history(execution_id).events
    )


@pytest.mark.parametrize("durability", ["sync"], indirect=True)
def test_sync_store_failure_changes_nothing_and_raises(stores: Stores) -> None:
    manager = stores.manager()
    manager.create_execution("e", workflow_id="wf", variables={"a": 1})
    manager.update_state("e", {"nodes": {"n": "running"}})
    before = state_and_history(manager, "e")
    store = stores.current
    store.broken = True

    failing_calls: list[Callable[[], object]] = [
        lambda: manager.update_state("e", {"variables": {"a": 2}}),
        lambda: manager.update_state("e", {"status": "suspended"}, expected_version=2),
        lambda: manager.transact("e", lambda state: {"variables": {"a": 3}}),
        lambda: manager.create_execution("new", workflow_id="wf"),
        lambda: manager.fork("e", new_execution_id="copy"),
    ]
    for call in failing_calls:
        with pytest.raises(StoreUnavailableError) as info:
            call()
        assert info.value.target == store.url
        assert state_and_history(manager, "e") == before
    for missing in ("new", "copy"):
        with pytest.raises(NotFoundError):
            manager.get_state(missing)
    with pytest.raises(NotFoundError):
        manager.get_state("e", version=3)
    assert [state.execution_id for state in manager.list_executions()] == ["e"]

    store.heal()
    assert manager.update_state("e", {"variables": {"a": 4}}) == 3
    assert manager.create_execution("new", workflow_id="wf").version == 1
    after = manager.get_state("e")
    assert after.variables == {"a": 4}
    check_stored(stores, {"e": after, "new": manager.get_state("new")})
    reopened = stores.reopen(manager)
    assert reopened.get_state("e") == after
    assert reopened.get_state("e", version=2) == before[0]


@pytest.mark.parametrize("durability", ["sync"], indirect=True)
def test_sync_store_failure_fails_every_waiting_caller(stores: Stores) -> None:
    manager = stores.manager()
    for number in range(8):
        manager.create_execution(f"e{number}", workflow_id="wf")
    store = stores.current
    store.broken = True
    outcomes: dict[str, BaseException | int] = {}

    def attempt(execution_id: str) -> None:
        try:
            outcomes[execution_id] = manager.update_state(execution_id, {"variables": {"x": 1}})
        except BaseException as error:  # checked below
            outcomes[execution_id] = error

    threads = [threading.Thread(target=attempt, args=(f"e{n}",)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(isinstance(outcome, StoreUnavailableError) for outcome in outcomes.values())
    assert all(manager.get_state(f"e{n}").version == 1 for n in range(8))
    store.heal()
    assert all(manager.update_state(f"e{n}", {"variables": {"x": 1}}) == 2 for n in range(8))


@pytest.mark.parametrize("durability", ["async"], indirect=True)
def test_async_critical_update_failure_changes_nothing_and_raises(stores: Stores) -> None:
    manager = stores.manager()
    manager.create_execution("e", workflow_id="wf")
    manager.update_state("e", {"variables": {"a": 1}})
    manager.flush()
    before = state_and_history(manager, "e")
    stores.current.broken = True
    for critical in ({"status": "suspended"}, {"nodes": {"n": "failed"}}):
        if "nodes" in critical:
            stores.current.heal()
            manager.update_state("e", {"nodes": {"n": "running"}})
            manager.flush()
            before = state_and_history(manager, "e")
            stores.current.broken = True
        with pytest.raises(StoreUnavailableError):
            manager.update_state("e", critical)
        assert state_and_history(manager, "e") == before
    stores.current.heal()
    assert manager.update_state("e", {"nodes": {"n": "failed"}}) == before[0].version + 1


@pytest.mark.parametrize("durability", ["sync"], indirect=True)
def test_a_failed_sync_write_takes_back_its_snapshot_decision(stores: Stores) -> None:
    """Every 2 versions from the creation: versions 3 and 5 are due a snapshot. The
    first write of version 5 fails: the retry is decided again and stored with the
    snapshot, not left to the next one due (7)."""
    policy = SnapshotPolicy(every_versions=2, when_deltas_outweigh=False, at_final_status=False)
    manager = stores.manager(snapshot_policy=policy)
    manager.create_execution("e", workflow_id="wf")
    for value in (1, 2, 3):
        manager.update_state("e", {"variables": {"a": value}})
    stores.current.fail_next_writes = 1
    with pytest.raises(StoreUnavailableError):
        manager.update_state("e", {"variables": {"a": 4}})
    assert manager.update_state("e", {"variables": {"a": 4}}) == 5
    with stores.direct() as store:
        found = store.load("e")
        assert found is not None
        assert found.snapshot_version == 5


# -- a full ring ------------------------------------------------------------------------


def fill_the_ring(manager: StateManager, execution_id: str) -> int:
    """Update until ``BackpressureError``; return the last version acknowledged."""
    acknowledged = manager.get_state(execution_id).version
    for index in range(100):
        try:
            acknowledged = manager.update_state(execution_id, {"variables": {"i": index}})
        except BackpressureError:
            return acknowledged
    raise AssertionError("no BackpressureError after 100 updates")


def test_a_prepared_update_keeps_its_ring_room_until_published_or_released() -> None:
    core = Core(ring_capacity=16, block_on_full=False)
    core.publish(core.prepare_create("e", "wf"), persisted=False)
    cursor = core.open_cursor(durable=True)
    held = [core.prepare("e", {"variables": {"i": index}}) for index in range(16)]
    with pytest.raises(BackpressureError):
        core.prepare("e", {"variables": {"i": 16}})
    with pytest.raises(BackpressureError):
        core.apply("e", {"variables": {"i": 16}})
    held[0].release()
    held[0].release()  # once only
    spare = core.prepare("e", {"variables": {"i": 16}})
    with pytest.raises(BackpressureError):
        core.prepare("e", {"variables": {"i": 17}})
    # A publish takes the room its preparation kept, even with the ring full.
    assert core.publish(held[1], persisted=False) == 2
    del spare, held
    assert core.apply("e", {"variables": {"i": 18}}) == 3
    cursor.close()


def test_a_full_ring_refuses_a_sync_write_before_the_store_takes_it(store_url: str) -> None:
    """A durable reader that does not keep up fills the ring. With
    ``on_ring_full="error"`` the next sync write fails before the store commits it
    (its ring room is reserved first), so memory and the store stay at one version;
    once the reader commits, writes go on."""
    with StateManager.open(store_url, ring_capacity=16, on_ring_full="error") as manager:
        store = manager._store
        assert store is not None
        manager.create_execution("e", workflow_id="wf")
        cursor = manager.open_cursor(durable=True)
        acknowledged = fill_the_ring(manager, "e")
        assert acknowledged == 17  # the 16 versions after the cursor opened fill it
        assert manager.get_state("e").version == acknowledged
        assert stored_versions(store, "e") == list(range(1, acknowledged + 1))
        # A creation and a fork are refused alike, before the store sees them.
        with pytest.raises(BackpressureError):
            manager.create_execution("f", workflow_id="wf")
        assert store.load("f") is None
        with pytest.raises(NotFoundError):
            manager.get_state("f")
        with pytest.raises(BackpressureError):
            manager.fork("e", new_execution_id="g")
        assert store.load("g") is None
        assert stored_versions(store, "e") == list(range(1, acknowledged + 1))

        events = cursor.read(100, timeout=0)
        assert [event.version for event in events] == list(range(2, acknowledged + 1))
        cursor.commit()
        assert manager.update_state("e", {"variables": {"late": True}}) == acknowledged + 1
        assert stored_versions(store, "e") == list(range(1, acknowledged + 2))
        assert manager.get_state("e") == loaded(store, "e")
        cursor.close()


def test_more_writes_in_flight_than_the_ring_holds(store_url: str) -> None:
    """Without a durable cursor nothing holds eviction back: sync writes in flight,
    however many, never wait for ring room, even in a ring smaller than their
    number."""
    threads, per_thread = 32, 5
    with StateManager.open(store_url, ring_capacity=16, on_ring_full="error") as manager:
        for index in range(threads):
            manager.create_execution(f"e{index}", workflow_id="wf")
        failures: list[BaseException] = []

        def write(index: int) -> None:
            try:
                for step in range(per_thread):
                    manager.update_state(f"e{index}", {"variables": {"step": step}})
            except BaseException as error:
                failures.append(error)

        workers = [threading.Thread(target=write, args=(index,)) for index in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert failures == []
        assert [manager.get_state(f"e{index}").version for index in range(threads)] == [
            per_thread + 1
        ] * threads


@pytest.mark.parametrize("operation", ["create", "fork"])
def test_a_creation_or_fork_takes_its_stripe_before_its_ring_room(
    store_url: str, operation: str
) -> None:
    """As an update does, a creation or a fork waits for its execution's stripe
    before it reserves ring room. Otherwise, with the ring's last room reserved by
    one waiting for a stripe, the stripe's holder could get no room although the
    reader had caught up: it failed (``on_ring_full="error"``), or waited out
    ``ring_full_timeout``.

    The test holds the stripe (as an update in flight would), lets the creation or
    fork start, then asks for the ring's one free place as that update would."""
    with StateManager.open(store_url, ring_capacity=16, on_ring_full="error") as manager:
        manager.create_execution("b", workflow_id="wf")
        cursor = manager.open_cursor(durable=True)
        fill_the_ring(manager, "b")
        cursor.read(1, timeout=0)
        cursor.commit()  # one free place
        stripe = manager._stripe("b")
        if operation == "create":
            new_id = next(f"a{n}" for n in itertools.count() if manager._stripe(f"a{n}") is stripe)
            work: Callable[[], WorkflowState] = functools.partial(
                manager.create_execution, new_id, workflow_id="wf"
            )
        else:  # a fork takes the stripe of its source
            new_id = "g"
            work = functools.partial(manager.fork, "b", new_execution_id=new_id)
        linked = manager.get_state("b").version + (operation == "fork")
        outcome: list[object] = []

        def start() -> None:
            try:
                outcome.append(work())
            except BaseException as error:
                outcome.append(error)

        with stripe:
            worker = threading.Thread(target=start)
            worker.start()
            time.sleep(0.2)  # the worker waits for the stripe
            assert outcome == []
            update = manager._core.prepare("b", {"variables": {"in_flight": True}})
            update.release()
            cursor.read(100, timeout=0)
            cursor.commit()  # the reader catches up: room for the worker
        worker.join(timeout=10)
        assert len(outcome) == 1
        assert isinstance(outcome[0], WorkflowState), outcome[0]
        assert outcome[0].execution_id == new_id
        if manager._store is not None:
            assert manager._store.load(new_id) is not None
        assert manager.get_state("b").version == linked  # a fork's link on its source
        cursor.close()


def test_a_write_waits_for_ring_room_before_the_store_takes_it(durable_store_url: str) -> None:
    """``on_ring_full="block"``: a sync write waits for ring room before the store
    commits it. One that times out left nothing in the store; one that gets room
    is stored and published."""
    with StateManager.open(
        durable_store_url, ring_capacity=16, on_ring_full="block", ring_full_timeout=2.0
    ) as manager:
        store = manager._store
        assert store is not None
        manager.create_execution("e", workflow_id="wf")
        cursor = manager.open_cursor(durable=True)
        acknowledged = fill_the_ring(manager, "e")
        assert stored_versions(store, "e") == list(range(1, acknowledged + 1))

        while_waiting: list[list[int]] = []

        def commit_later() -> None:
            time.sleep(0.2)
            while_waiting.append(stored_versions(store, "e"))
            cursor.read(100, timeout=0)
            cursor.commit()

        reader = threading.Thread(target=commit_later)
        started = time.monotonic()
        reader.start()
        try:
            assert manager.update_state("e", {"variables": {"late": 0}}) == acknowledged + 1
        finally:
            reader.join()
        assert time.monotonic() - started >= 0.15  # it waited for the reader
        assert while_waiting == [list(range(1, acknowledged + 1))]
        assert stored_versions(store, "e") == list(range(1, acknowledged + 2))
        assert manager.get_state("e") == loaded(store, "e")
        cursor.close()


# -- the write-behind -------------------------------------------------------------------


@pytest.mark.parametrize("durability", ["async"], indirect=True)
def test_flush_is_a_barrier(stores: Stores) -> None:
    manager = stores.manager(flush_interval=SLOW_FLUSH_INTERVAL)
    rng = random.Random(5)
    ids = [f"e{number}" for number in range(5)]
    for execution_id in ids:
        manager.create_execution(execution_id, workflow_id="wf")
    for round_number in range(4):
        for _ in range(40):
            execution_id = rng.choice(ids)
            manager.update_state(execution_id, {"variables": {"round": round_number}})
        manager.flush()
        current = {execution_id: manager.get_state(execution_id) for execution_id in ids}
        check_stored(stores, current)
        assert manager.stats()["pending_events"] == 0


@pytest.mark.parametrize("durability", ["async"], indirect=True)
def test_close_drains_the_write_behind(stores: Stores) -> None:
    manager = stores.manager(flush_interval=SLOW_FLUSH_INTERVAL)
    journal = Journal()
    run_stories(manager, journal, seed=11, count=4)
    manager.create_execution("bulk", workflow_id="wf")
    for step in range(200):
        manager.update_state("bulk", {"variables": {"step": step}})
    journal.record(manager.get_state("bulk"))
    manager.close()
    check_stored(stores, journal.latest())
    reopened = stores.manager()
    for execution_id, state in journal.latest().items():
        assert reopened.get_state(execution_id) == state


@pytest.mark.parametrize("durability", ["async"], indirect=True)
def test_close_returns_promptly_with_a_long_flush_interval(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``close()`` drains and returns; a flusher idle between batches must not hold it
    for ``flush_interval`` (nor die of its cursor being closed under it)."""
    crashes: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", crashes.append)
    manager = stores.manager(flush_interval=LONG_FLUSH_INTERVAL)
    manager.create_execution("e", workflow_id="wf")
    manager.update_state("e", {"variables": {"a": 1}})
    manager.flush()
    expected = manager.get_state("e")
    time.sleep(0.1)  # the flusher is back to waiting for records
    flushers = [thread for thread in threading.enumerate() if thread.name == "wfstate-flusher"]
    started = time.monotonic()
    manager.close(timeout=3)
    elapsed = time.monotonic() - started
    for thread in flushers:
        thread.join(timeout=5)
    check_stored(stores, {"e": expected})
    assert elapsed < 1.0, f"close() took {elapsed:.1f}s with nothing pending"
    assert [
        (args.thread.name if args.thread else None, repr(args.exc_value)) for args in crashes
    ] == []


@pytest.mark.parametrize("durability", ["async"], indirect=True)
def test_close_reports_updates_it_could_not_store(stores: Stores) -> None:
    manager = stores.manager(flush_interval=0.01)
    stored = manager.create_execution("e", workflow_id="wf")
    manager.flush()
    stores.current.broken = True
    manager.update_state("e", {"variables": {"a": 1}})
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError):
        manager.close(timeout=0.3)
    assert time.monotonic() - started < 2
    assert manager.closed
    with pytest.raises(ClosedError):
        manager.get_state("e")
    manager.close()  # idempotent, even after a failed drain
    stores.current.heal()
    check_stored(stores, {"e": stored})


@pytest.mark.parametrize("durability", ["async"], indirect=True)
def test_critical_updates_are_durable_on_return_in_async_mode(stores: Stores) -> None:
    manager = stores.manager(flush_interval=SLOW_FLUSH_INTERVAL)
    store = stores.current
    manager.create_execution("other", workflow_id="wf")
    manager.create_execution("e", workflow_id="wf")
    caller = threading.current_thread().name
    critical_updates: list[dict[str, Any]] = [
        {"status": "suspended"},
        {"status": "running"},
        {"nodes": {"n": "running"}},  # not critical: goes through the write-behind
        {"nodes": {"n": "failed"}, "error": {"type": "E", "message": "boom"}},
        {"nodes": {"n": "running"}},
        {"nodes": {"n": "completed"}},
        {"status": "completed"},
    ]
    for update in critical_updates:
        manager.update_state("other", {"variables": {"before": update}})
        version = manager.update_state("e", update)
        is_critical = "status" in update or "failed" in update.get("nodes", {}).values()
        if not is_critical:
            continue
        # Read at once, before any flush: the critical version is there, written by
        # the caller itself, and so is everything applied before it.
        with stores.direct() as direct:
            assert direct.current_versions(["e", "other"]) == {
                "e": version,
                "other": manager.get_state("other").version,
            }
            assert loaded(direct, "e") == manager.get_state("e")
        assert store.writers[("e", version)] == caller


@pytest.mark.parametrize("durability", ["async"], indirect=True)
def test_critical_option_chooses_what_is_written_synchronously(stores: Stores) -> None:
    manager = stores.manager(flush_interval=SLOW_FLUSH_INTERVAL, critical=["nodes"])
    store = stores.current
    manager.create_execution("e", workflow_id="wf")
    caller = threading.current_thread().name
    version = manager.update_state("e", {"nodes": {"n": "running"}})
    assert store.writers[("e", version)] == caller
    with stores.direct() as direct:
        assert direct.current_versions(["e"]) == {"e": version}


@pytest.mark.parametrize("durability", ["async"], indirect=True)
@pytest.mark.parametrize(
    ("critical", "update", "synchronous"),
    [
        ([], {"status": "suspended"}, False),
        (["status"], {"status": "suspended"}, True),
        (["status"], StateUpdate(status="suspended"), True),
        (["status"], {"nodes": {"n": "failed"}}, False),
        (["node_failed"], {"nodes": {"n": "failed"}}, True),
        (["node_failed"], {"nodes": {"n": "completed"}}, False),
        (["node_failed"], StateUpdate(nodes={"n": "failed"}), True),
        (["nodes"], {"nodes": {"n": "completed"}}, True),
        (["error"], {"error": {"type": "E", "message": "boom"}}, True),
        (["error"], {"variables": {"a": 1}}, False),
        (["all"], {"variables": {"a": 1}}, True),
        (["status", "error"], {"nodes": {"n": "completed"}}, False),
        (["nodes"], {"nodes": {}, "variables": {"a": 1}}, False),
        (["status"], {"status": None, "variables": {"a": 1}}, False),
        (["node_failed"], {"nodes": {"n": NodeStatus.FAILED}}, True),
        (["error"], {"error": RuntimeError("boom")}, True),
    ],
)
def test_each_critical_choice_decides_who_writes(
    stores: Stores, critical: list[str], update: Any, synchronous: bool
) -> None:
    """The caller writes a critical update itself; the write-behind writes the rest."""
    manager = stores.manager(flush_interval=SLOW_FLUSH_INTERVAL, critical=critical)
    store = stores.current
    manager.create_execution("e", workflow_id="wf")
    manager.update_state("e", {"nodes": {"n": "running"}})
    manager.flush()
    version = manager.update_state("e", update)
    manager.flush()
    caller = threading.current_thread().name
    assert (store.writers[("e", version)] == caller) is synchronous
    check_stored(stores, {"e": manager.get_state("e")})


@pytest.mark.parametrize("durability", ["async"], indirect=True)
@pytest.mark.parametrize(("critical", "synchronous"), [(["all"], True), (["status"], False)])
def test_a_fork_is_written_by_its_caller_when_every_write_is_critical(
    stores: Stores, critical: list[str], synchronous: bool
) -> None:
    """With ``critical=["all"]`` a fork, like a creation and every update, is
    written by its caller: the new execution and the link on its source. Otherwise
    both are left to the write-behind (a fork is neither a status change nor a
    node's failure)."""
    manager = stores.manager(flush_interval=SLOW_FLUSH_INTERVAL, critical=critical)
    store = stores.current
    manager.create_execution("e", workflow_id="wf")
    manager.flush()
    forked = manager.fork("e", new_execution_id="f")
    if synchronous:  # stored before any flush
        with stores.direct() as direct:
            assert direct.current_versions(["e", "f"]) == {"e": 2, "f": 1}
    manager.flush()
    caller = threading.current_thread().name
    assert (store.writers[("f", 1)] == caller) is synchronous
    assert (store.writers[("e", 2)] == caller) is synchronous
    check_stored(stores, {"e": manager.get_state("e"), "f": forked})


@pytest.mark.parametrize("durability", ["async"], indirect=True)
@pytest.mark.parametrize("critical", [["all"], ["status"], []])
def test_an_invalid_update_is_refused_whatever_the_critical_choice(
    stores: Stores, critical: list[str]
) -> None:
    manager = stores.manager(flush_interval=SLOW_FLUSH_INTERVAL, critical=critical)
    manager.create_execution("e", workflow_id="wf")
    before = manager.get_state("e")
    for update in ({"status": "sleeping"}, {"colour": "red"}, {"status": "running", "x": 1}):
        with pytest.raises(ValidationError):
            manager.update_state("e", update)
    with pytest.raises(ValidationError):
        manager.update_state("e", {"status": "suspended"}, expected_version=-1)
    assert manager.get_state("e") == before
    manager.flush()
    check_stored(stores, {"e": before})


@pytest.mark.parametrize("durability", ["async"], indirect=True)
def test_flusher_retries_while_the_store_fails_then_resumes(stores: Stores) -> None:
    manager = stores.manager(flush_interval=0.01)
    store = stores.current
    manager.create_execution("e", workflow_id="wf")
    manager.flush()
    store.fail_next_writes = 4
    for step in range(10):
        manager.update_state("e", {"variables": {"step": step}})
    manager.flush(timeout=20)
    stats = manager.stats()
    assert stats["flush_retries"] == 4
    assert store.failed_writes == 4
    assert stats["pending_events"] == 0
    assert stats["last_store_error"] is None
    assert stats["store_failing_for"] is None
    check_stored(stores, {"e": manager.get_state("e")})


@pytest.mark.parametrize("durability", ["async"], indirect=True)
def test_flush_reports_a_store_that_stays_away(stores: Stores) -> None:
    manager = stores.manager(flush_interval=0.01)
    store = stores.current
    manager.create_execution("e", workflow_id="wf")
    manager.flush()
    store.broken = True
    for step in range(5):
        manager.update_state("e", {"variables": {"step": step}})
    with pytest.raises(StoreUnavailableError) as info:
        manager.flush(timeout=0.3)
    assert info.value.target == store.url
    stats = manager.stats()
    retries = stats["flush_retries"]
    assert isinstance(retries, int)
    assert retries >= 1
    assert stats["pending_events"] == 5
    assert stats["last_store_error"] is not None
    failing_for = stats["store_failing_for"]
    assert isinstance(failing_for, float)
    assert failing_for > 0
    # Memory went on meanwhile; once the store is back, everything is stored.
    assert manager.get_state("e").version == 6
    store.heal()
    manager.flush(timeout=20)
    assert manager.stats()["pending_events"] == 0
    check_stored(stores, {"e": manager.get_state("e")})


@pytest.mark.parametrize("durability", ["async"], indirect=True)
def test_stats_report_pending_events(stores: Stores) -> None:
    manager = stores.manager(flush_interval=0.01)
    store = stores.current
    manager.create_execution("e", workflow_id="wf")
    manager.flush()
    stats = manager.stats()
    assert stats["durability"] == "async"
    assert stats["store"] == store.url
    assert stats["pending_events"] == 0
    store.gate.clear()  # the flusher's next write waits
    try:
        for step in range(7):  # one event each
            manager.update_state("e", {"variables": {"step": step}})
        assert manager.stats()["pending_events"] == 7
    finally:
        store.gate.set()
    manager.flush()
    assert manager.stats()["pending_events"] == 0
    flushed = manager.stats()["flushed_versions"]
    assert isinstance(flushed, int)
    assert flushed >= 8


@pytest.mark.parametrize("durability", ["sync"], indirect=True)
def test_stats_of_sync_mode_count_group_commits(stores: Stores) -> None:
    manager = stores.manager()
    manager.create_execution("e", workflow_id="wf")
    for step in range(5):
        manager.update_state("e", {"variables": {"step": step}})
    stats = manager.stats()
    assert stats["durability"] == "sync"
    assert stats["store"] == stores.current.url
    assert stats["group_committed_versions"] == 6
    commits = stats["group_commits"]
    assert isinstance(commits, int)
    assert 1 <= commits <= 6
    manager.flush()  # a no-op in sync mode


# -- opening ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "names"),
    [
        ("postgresql://root@127.0.0.1:1/test", ["127.0.0.1", ":1"]),
        ("postgresql://root:secret-pw@127.0.0.1:1/test", ["127.0.0.1", ":***@"]),
        ("sqlite:////nonexistent-dir/x.db", ["/nonexistent-dir/x.db"]),
        ("sqlite:////proc/wfstate/x.db", ["/proc/wfstate/x.db"]),
    ],
    ids=["postgres-refused", "postgres-password-hidden", "sqlite-no-dir", "sqlite-proc"],
)
def test_unreachable_store_fails_at_open_promptly_naming_it(url: str, names: list[str]) -> None:
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError) as info:
        StateManager.open(url, connect_timeout=2)
    assert time.monotonic() - started < 3
    message = str(info.value)
    for name in names:
        assert name in message
    assert "secret-pw" not in message
    assert "secret-pw" not in info.value.target
    assert info.value.target


def test_unroutable_postgres_host_fails_within_connect_timeout() -> None:
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError) as info:
        StateManager.open("postgresql://root@10.255.255.1:5432/test", connect_timeout=2)
    assert time.monotonic() - started < 5
    assert "10.255.255.1" in str(info.value)


def test_missing_postgres_database_fails_at_open_naming_it(postgres_url: str) -> None:
    from conftest import with_database

    url = with_database(postgres_url, "wfstate_no_such_database")
    with pytest.raises(StoreUnavailableError) as info:
        StateManager.open(url, connect_timeout=2)
    assert "wfstate_no_such_database" in str(info.value)


@pytest.mark.parametrize(
    "url",
    ["", "not a url", "mysql://root@localhost/db", "http://example.com", "sqlite://", "sqlite:///"],
)
def test_malformed_url_is_a_validation_error(url: str) -> None:
    with pytest.raises(ValidationError):
        StateManager.open(url)


@pytest.mark.parametrize(
    "options",
    [
        {"durability": "eventually"},
        {"flush_interval": -1},
        {"max_batch": 0},
        {"critical": ["everything"]},
        {"connect_timeout": 0},
    ],
)
def test_bad_options_are_validation_errors(options: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        StateManager.open(f"sqlite:///{tmp_path}/x.db", **options)


@pytest.mark.parametrize(
    "rules",
    [
        {"every_versions": 0},
        {"every_versions": 2.5},
        {"when_deltas_outweigh": 0},
        {"at_final_status": "yes"},
    ],
)
def test_bad_snapshot_policies_are_validation_errors(rules: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match=next(iter(rules))):
        SnapshotPolicy(**rules)


def test_database_url_environment_variable_is_honoured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path}/from-env.db"
    monkeypatch.setenv("WFSTATE_DATABASE_URL", url)
    with StateManager.open() as manager:
        assert manager.store_url == url
        manager.create_execution("e", workflow_id="wf")
    assert (tmp_path / "from-env.db").exists()
    with StateManager.open() as manager:
        assert manager.get_state("e").version == 1
    # An explicit URL wins over the environment.
    with StateManager.open("memory://") as manager:
        assert manager.store_url == "memory://"


def test_default_store_is_wfstate_db_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WFSTATE_DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    with StateManager.open() as manager:
        assert manager.store_url == "sqlite:///wfstate.db"
        assert manager.durability == "sync"
        manager.create_execution("e", workflow_id="wf")
    assert (tmp_path / "wfstate.db").is_file()
    with StateManager.open() as manager:
        assert [state.execution_id for state in manager.recover()] == ["e"]


def test_postgres_connections_the_server_closed_are_replaced(
    postgres_test_url: str, durability: Durability
) -> None:
    """A server that ends the pool's sessions (restart, idle timeout, an admin) costs
    no failed write: the pool notices the dead connection before handing it out."""
    import psycopg

    with StateManager.open(postgres_test_url, durability=durability) as manager:
        manager.create_execution("e", workflow_id="wf")
        manager.update_state("e", {"variables": {"a": 1}})
        manager.flush()
        with psycopg.connect(postgres_test_url, autocommit=True) as connection:
            ended = connection.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()
        assert ended is not None
        assert ended[0] >= 1
        time.sleep(0.2)  # the server's goodbye reaches the idle sockets
        assert manager.update_state("e", {"status": "suspended"}) == 3
        assert manager.update_state("e", {"variables": {"a": 2}}) == 4
        manager.flush(timeout=10)
        expected = manager.get_state("e")
    store = open_store(postgres_test_url)
    try:
        assert loaded(store, "e") == expected
        assert stored_versions(store, "e") == [1, 2, 3, 4]
    finally:
        store.close()


# -- several managers on one store ----------------------------------------------------


@pytest.mark.parametrize("durability", ["sync"], indirect=True)
def test_sync_managers_sharing_a_store_rebase_or_conflict(stores: Stores) -> None:
    first = stores.manager()
    second = stores.manager()
    first.create_execution("e", workflow_id="wf", variables={"by": []})

    def append(step: int) -> Callable[[WorkflowState], dict[str, Any]]:
        return lambda state: {"variables": {"by": [*state.variables["by"], step]}}

    # Each writes in turn, from a memory the other has moved past: plain updates and
    # transact re-base on the stored version; nothing is overwritten.
    expected_version = 1
    for step in range(6):
        writer = first if step % 2 == 0 else second
        assert writer.transact("e", append(step)) == expected_version + 1
        assert writer.update_state("e", {"context": {f"step-{step}": True}}) == (
            expected_version + 2
        )
        expected_version += 2
    final = second.get_state("e")
    assert final.version == expected_version
    assert final.variables["by"] == [0, 1, 2, 3, 4, 5]
    assert final.context == {f"step-{step}": True for step in range(6)}
    # A write based on a version the other manager has passed is refused.
    current = second.get_state("e")
    first.update_state("e", {"variables": {"late": False}})
    with pytest.raises(ConflictError) as info:
        second.update_state("e", {"variables": {"late": True}}, expected_version=current.version)
    assert (info.value.expected, info.value.actual) == (current.version, current.version + 1)
    assert second.get_state("e") == first.get_state("e")
    with stores.direct() as store:
        assert loaded(store, "e") == first.get_state("e")
        assert replayed(store, "e") == first.get_state("e")


@pytest.mark.parametrize("durability", ["sync"], indirect=True)
def test_merge_when_the_conflict_names_only_the_version_of_the_statement(
    stores: Stores,
) -> None:
    """A store may refuse a write with the version as of its statement (a writer
    raced it and the read of the newer version failed): the manager, which caught up
    from the store, merges onto what it found instead of giving up."""
    first = stores.manager()
    first.create_execution("e", workflow_id="wf")
    second = stores.manager()
    assert second.get_state("e").version == 1
    stores.current.conflicts_as_of_statement = True
    assert first.update_state("e", {"variables": {"x": 1}}) == 2
    assert second.update_state("e", {"variables": {"y": 2}}) == 3
    assert second.stats()["conflicts_resolved"] == 1
    # With shared fields it is still a conflict, naming the version it found.
    assert first.update_state("e", {"variables": {"x": 3}}) == 4
    with pytest.raises(ConflictError) as info:
        second.update_state("e", {"variables": {"x": 4}})
    assert (info.value.expected, info.value.actual, info.value.fields) == (
        3,
        4,
        frozenset({"variables.x"}),
    )
    # An explicit expected version is the caller's to resolve, with the found version.
    with pytest.raises(ConflictError) as info:
        second.update_state("e", {"variables": {"z": 5}}, expected_version=3)
    assert (info.value.expected, info.value.actual) == (3, 4)
    with stores.direct() as store:
        assert loaded(store, "e") == first.get_state("e") == second.get_state("e")
        assert loaded(store, "e").variables == {"x": 3, "y": 2}


@pytest.mark.parametrize("durability", ["async"], indirect=True)
def test_async_update_the_store_refuses_is_not_reported_durable(stores: Stores) -> None:
    """flush() promises that every update applied so far is durable. When another
    manager stored that version first, the write-behind's write is refused: flush()
    must say so (or the update must be stored), and memory must not go on from a
    version the store does not have."""
    other = stores.manager(durability="sync")
    other.create_execution("e", workflow_id="wf")
    manager = stores.manager()
    other.update_state("e", {"variables": {"by": "other", "only_other": 1}})  # stored v2
    assert manager.update_state("e", {"variables": {"by": "async"}}) == 2  # v2 in memory
    refused = False
    try:
        manager.flush(timeout=5)
    except WfstateError:
        refused = True
    if not refused:
        with stores.direct() as store:
            assert loaded(store, "e") == manager.get_state("e"), (
                "flush() returned, but the acknowledged version 2 is not what is stored"
            )
    # Writing on must not stack this manager's next delta on the other's version 2.
    with contextlib.suppress(WfstateError):
        manager.update_state("e", {"variables": {"then": "async"}})
        manager.flush(timeout=5)
        with stores.direct() as store:
            assert loaded(store, "e") == manager.get_state("e"), (
                "memory and store disagree about the same version"
            )


@pytest.mark.parametrize("durability", ["async"], indirect=True)
def test_postgres_refusal_in_async_mode_is_not_silently_dropped(
    postgres_test_url: str, durability: Durability
) -> None:
    """PostgreSQL text cannot hold NUL; the sync path refuses such an update with
    ValidationError. In async mode it must not be acknowledged, flushed "durably" and
    lost, taking every later version of the execution with it."""
    with StateManager.open(postgres_test_url, durability=durability) as manager:
        manager.create_execution("e", workflow_id="wf")
        manager.flush()
        refused = False
        try:
            manager.update_state("e", {"nodes": {"n\x00ul": "running"}})
            manager.update_state("e", {"variables": {"after": 1}})
            manager.flush(timeout=5)
        except WfstateError:
            refused = True
        in_memory = manager.get_state("e")
    store = open_store(postgres_test_url)
    try:
        stored = loaded(store, "e")
    finally:
        store.close()
    assert refused or stored == in_memory, (
        f"acknowledged and flushed version {in_memory.version}, stored {stored.version}"
    )


def test_ids_held_only_by_the_store_are_taken(stores: Stores) -> None:
    manager = stores.manager()
    manager.create_execution("done", workflow_id="wf")
    manager.update_state("done", {"status": "completed"})
    manager.create_execution("source", workflow_id="wf")
    reopened = stores.reopen(manager)  # "done" is finished: not loaded into memory
    with pytest.raises(AlreadyExistsError):
        reopened.create_execution("done", workflow_id="other")
    with pytest.raises(AlreadyExistsError):
        reopened.fork("source", new_execution_id="done")
    reopened.flush()
    assert reopened.get_state("done").workflow_id == "wf"
    assert reopened.get_state("source").version == 1
    with stores.direct() as store:
        # A refused fork leaves no link on its source, in the store as in memory.
        assert store.current_versions(["done", "source"]) == {"done": 2, "source": 1}, (
            "the refused fork's execution_forked link was stored on the source"
        )


def test_schema_version_is_queryable_from_the_manager(stores: Stores) -> None:
    """The manager reports the schema its store was migrated to; memory has none."""
    manager = stores.manager()
    try:
        version = manager.schema_version()
        assert isinstance(version, int)
        assert version >= 1
    finally:
        manager.close()
    with StateManager() as in_memory:
        assert in_memory.schema_version() is None
