"""Many threads against one StateManager: no lost update, exactly one winner per race.

Threads start together behind a barrier so that their calls really overlap; each
assertion holds whatever the interleaving was.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

import pytest

from wfstate import (
    AlreadyExistsError,
    ConflictError,
    EventType,
    StateManager,
    StoreUnavailableError,
    WorkflowState,
)
from wfstate._durable import GroupCommitter
from wfstate.store.base import Store, WriteItem

T = TypeVar("T")


def run_together(workers: int, task: Callable[[int], T]) -> list[T]:
    """Run ``task(index)`` on ``workers`` threads released at the same moment.

    Exceptions raised by a task are re-raised here, in the test's thread.
    """
    barrier = threading.Barrier(workers)

    def start(index: int) -> T:
        barrier.wait(timeout=30)
        return task(index)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(start, index) for index in range(workers)]
        return [future.result(timeout=300) for future in futures]


def increment(state: WorkflowState) -> dict[str, Any]:
    return {"variables": {"counter": state.variables["counter"] + 1}}


@pytest.mark.slow
def test_transact_increments_are_never_lost(manager: StateManager) -> None:
    threads, increments = 8, 10_000
    manager.create_execution("counter", workflow_id="wf", variables={"counter": 0})

    def work(index: int) -> list[int]:
        # A generous retry budget: this test is about atomicity, not the default budget.
        return [
            manager.transact("counter", increment, retries=1_000_000, actor=f"t{index}")
            for _ in range(increments)
        ]

    versions_per_thread = run_together(threads, work)

    state = manager.get_state("counter")
    assert state.variables == {"counter": threads * increments}
    assert state.version == threads * increments + 1
    # Every transact returned a distinct version, and each thread saw its own grow.
    all_versions = [version for versions in versions_per_thread for version in versions]
    assert sorted(all_versions) == list(range(2, threads * increments + 2))
    for versions in versions_per_thread:
        assert versions == sorted(versions)
    # The history is linear: the version-n event set the counter to n - 1.
    events = manager.get_history("counter").events
    assert len(events) == threads * increments + 1
    for event in events[1:]:
        assert event.type is EventType.VARIABLES_CHANGED
        assert event.data == {"set": {"counter": event.version - 1}, "unset": []}
    actors = {event.actor for event in events[1:]}
    assert actors == {f"t{index}" for index in range(threads)}


def test_concurrent_updates_of_different_variables_all_land(manager: StateManager) -> None:
    threads, updates = 8, 500
    manager.create_execution("shared", workflow_id="wf", variables={"untouched": True})

    def work(index: int) -> None:
        for value in range(updates):
            manager.update_state("shared", {"variables": {f"v{index}": value}})

    run_together(threads, work)

    state = manager.get_state("shared")
    expected = {f"v{index}": updates - 1 for index in range(threads)}
    expected["untouched"] = True
    assert state.variables == expected
    assert state.version == threads * updates + 1
    # Each thread's writes were recorded in the order it made them.
    events = manager.get_history("shared").events[1:]
    assert [event.version for event in events] == list(range(2, threads * updates + 2))
    for index in range(threads):
        name = f"v{index}"
        values = [event.data["set"][name] for event in events if name in event.data["set"]]
        assert values == list(range(updates))


def test_concurrent_node_updates_all_land(manager: StateManager) -> None:
    threads, nodes_per_thread = 8, 50
    manager.create_execution("dag", workflow_id="wf")

    def work(index: int) -> None:
        for node in range(nodes_per_thread):
            node_id = f"t{index}-n{node}"
            manager.update_state("dag", {"nodes": {node_id: "running"}})
            manager.update_state("dag", {"nodes": {node_id: "completed"}})

    run_together(threads, work)

    state = manager.get_state("dag")
    assert len(state.nodes) == threads * nodes_per_thread
    assert all(node.status == "completed" for node in state.nodes.values())
    assert all(node.attempts == 1 for node in state.nodes.values())
    assert state.version == 2 * threads * nodes_per_thread + 1


@pytest.mark.parametrize("round_number", range(20))
def test_stale_expected_version_has_exactly_one_winner(
    manager: StateManager, round_number: int
) -> None:
    threads = 8
    manager.create_execution("race", workflow_id="wf", variables={"winner": None})
    manager.update_state("race", {"variables": {"round": round_number}})
    base = manager.get_state("race").version

    def attempt(index: int) -> int | ConflictError:
        try:
            return manager.update_state(
                "race", {"variables": {"winner": index}}, expected_version=base
            )
        except ConflictError as exc:
            return exc

    outcomes = run_together(threads, attempt)

    winners = [index for index, outcome in enumerate(outcomes) if isinstance(outcome, int)]
    assert len(winners) == 1
    assert outcomes[winners[0]] == base + 1
    conflicts = [outcome for outcome in outcomes if isinstance(outcome, ConflictError)]
    assert len(conflicts) == threads - 1
    for conflict in conflicts:
        assert conflict.expected == base
        assert conflict.actual == base + 1
    state = manager.get_state("race")
    assert state.version == base + 1
    assert state.variables["winner"] == winners[0]
    assert len(manager.get_history("race").events) == base + 1


@pytest.mark.parametrize("round_number", range(20))
def test_concurrent_create_of_one_id_has_exactly_one_winner(
    manager: StateManager, round_number: int
) -> None:
    threads = 8
    execution_id = f"contested-{round_number}"

    def attempt(index: int) -> WorkflowState | AlreadyExistsError:
        try:
            return manager.create_execution(
                execution_id, workflow_id=f"wf-{index}", variables={"creator": index}
            )
        except AlreadyExistsError as exc:
            return exc

    outcomes = run_together(threads, attempt)

    created = [outcome for outcome in outcomes if isinstance(outcome, WorkflowState)]
    assert len(created) == 1
    losers = [outcome for outcome in outcomes if isinstance(outcome, AlreadyExistsError)]
    assert len(losers) == threads - 1
    (winner,) = created
    stored = manager.get_state(execution_id)
    assert stored == winner
    assert stored.workflow_id == f"wf-{stored.variables['creator']}"
    assert stored.version == 1
    assert len(manager) == 1
    (event,) = manager.get_history(execution_id).events
    assert event.data["variables"] == {"creator": stored.variables["creator"]}


def test_concurrent_generated_ids_are_unique(manager: StateManager) -> None:
    threads, per_thread = 8, 500

    def work(index: int) -> list[str]:
        return [
            manager.create_execution(None, workflow_id=f"wf-{index}").execution_id
            for _ in range(per_thread)
        ]

    ids = [execution_id for chunk in run_together(threads, work) for execution_id in chunk]
    assert len(set(ids)) == threads * per_thread
    assert len(manager) == threads * per_thread
    listed = manager.list_executions(limit=threads * per_thread)
    assert {state.execution_id for state in listed} == set(ids)


def test_reads_during_writes_see_whole_updates(manager: StateManager) -> None:
    """A reader never sees half an update: both variables always move together."""
    manager.create_execution("pair", workflow_id="wf", variables={"left": 0, "right": 0})
    writes = 2_000
    stop = threading.Event()

    def task(index: int) -> int:
        if index == 0:
            try:
                for value in range(1, writes + 1):
                    manager.update_state("pair", {"variables": {"left": value, "right": value}})
            finally:
                stop.set()
            return writes
        reads = 0
        while not stop.is_set():
            state = manager.get_state("pair")
            variables = state.variables
            assert variables["left"] == variables["right"] == state.version - 1
            reads += 1
        return reads

    results = run_together(4, task)
    assert results[0] == writes
    assert manager.get_state("pair").version == writes + 1


class _Interrupted(Exception):
    """What the test's signal handler raises in the main thread."""


class _HeldStore:
    """A store whose first write blocks until ``release`` is set (only ``write``)."""

    groups_writes = False  # the committer groups its callers

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.written: list[object] = []

    def write(self, items: Sequence[object]) -> list[None]:
        self.entered.set()
        self.release.wait(timeout=30)
        self.written.extend(items)
        return [None] * len(items)

    def write_update(self, *args: object) -> None:
        """No one-call sync path: the manager prepares and calls ``write``."""
        return None


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="needs POSIX signals")
def test_a_group_commit_waiter_interrupted_by_a_signal_still_does_its_part() -> None:
    """A caller blocked in group commit whose wait a signal handler interrupts (as
    KeyboardInterrupt does in the main thread) keeps its place: it takes the lead
    handed to it and writes the callers queued behind it, then raises. Before, it
    left at once, the lead handed to it was lost and every later caller waited
    forever."""
    store = _HeldStore()
    committer = GroupCommitter(cast(Store, store), max_batch=100)
    outcomes: dict[str, object] = {}

    def commit(name: str) -> None:
        outcomes[name] = committer.commit([cast(WriteItem, name)])

    def handler(signum: int, frame: object) -> None:
        raise _Interrupted

    def conduct() -> None:
        # The main thread queues first (behind the writer), then "behind" queues
        # after it; the signal interrupts the main thread's wait; then the first
        # write ends and hands the lead to the main thread.
        deadline = time.monotonic() + 30
        while len(committer._queue) < 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        behind.start()
        while len(committer._queue) < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(0.05)  # the main thread is blocked in its wait by now
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        store.release.set()

    # Daemons: a regression leaves "behind" blocked for good, and must not keep the
    # test process alive.
    writer = threading.Thread(target=commit, args=("first",), daemon=True)
    behind = threading.Thread(target=commit, args=("behind",), daemon=True)
    conductor = threading.Thread(target=conduct, daemon=True)
    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        writer.start()
        assert store.entered.wait(timeout=30)
        conductor.start()
        with pytest.raises(_Interrupted):
            commit("main")
    finally:
        signal.signal(signal.SIGUSR1, previous)
        store.release.set()
    for thread in (writer, conductor, behind):
        thread.join(timeout=30)
        assert not thread.is_alive()
    # The main thread's write was done before it raised, and so was the one queued
    # behind it; the committer still works.
    assert store.written == ["first", "main", "behind"]
    assert outcomes == {"first": [None], "behind": [None]}
    commit("after")
    assert outcomes["after"] == [None]


class _InterruptedStore(_HeldStore):
    """Its first write blocks until ``release``; its second is interrupted the way a
    KeyboardInterrupt interrupts the leader's thread."""

    url = "memory://interrupted"

    def write(self, items: Sequence[object]) -> list[None]:
        if self.entered.is_set():
            raise KeyboardInterrupt
        return super().write(items)


def test_an_interrupted_leader_raises_alone_and_its_waiters_learn_the_outcome_is_unknown() -> None:
    """The leader's write is interrupted (KeyboardInterrupt in its thread): the leader
    raises it; the callers its transaction carried get StoreUnavailableError, the
    outcome unknown, not an interruption of a thread that is not theirs."""
    store = _InterruptedStore()
    committer = GroupCommitter(cast(Store, store), max_batch=100)
    raised: dict[str, BaseException | None] = {}

    def commit(name: str) -> None:
        try:
            committer.commit([cast(WriteItem, name)])
            raised[name] = None
        except BaseException as error:
            raised[name] = error

    first = threading.Thread(target=commit, args=("first",))
    first.start()
    assert store.entered.wait(timeout=30)
    queued = [threading.Thread(target=commit, args=(name,)) for name in ("lead", "a", "b")]
    deadline = time.monotonic() + 30
    for count, thread in enumerate(queued, start=1):
        thread.start()
        while len(committer._queue) < count and time.monotonic() < deadline:
            time.sleep(0.001)
    store.release.set()
    for thread in [first, *queued]:
        thread.join(timeout=30)
        assert not thread.is_alive()
    assert raised["first"] is None
    assert isinstance(raised["lead"], KeyboardInterrupt)
    for name in ("a", "b"):
        error = raised[name]
        assert isinstance(error, StoreUnavailableError)
        assert "interrupted in another thread" in str(error)
        assert error.target == store.url
    # The committer still works.
    store.entered.clear()
    commit("after")
    assert raised["after"] is None
