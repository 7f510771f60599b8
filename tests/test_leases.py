"""Leases with fencing tokens, and optimistic concurrency between processes.

Three layers, each on every backend where it applies:

- the store's lease contract (``acquire_lease`` ... ``lease_log``, and the fencing
  check of ``write``), on ``memory://``, SQLite and PostgreSQL;
- the manager's lease API (``acquire``, ``renew``, ``release``, ``heartbeat``,
  ``claim_orphans``, ``recover(owner=)``, ``lease=`` on writes), in memory alone and
  on every store;
- two managers on one durable store, standing for two processes: stale copies are
  detected on write, plain updates merge field by field, ``transact`` retries.

The multi-process run with SIGKILLs and a PostgreSQL restart is ``test_chaos.py``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from durable_support import Recorder, replayed
from wfstate import (
    ConflictError,
    InvalidTransitionError,
    Lease,
    LeaseHeldError,
    LeaseLostError,
    NotFoundError,
    StateManager,
    ValidationError,
    WorkflowState,
)
from wfstate.store import Store, open_store
from wfstate.store.base import WriteItem

#: A ttl that has run out by the time the test looks again (µs for stores, s for managers).
SHORT_TTL_US = 20_000
SHORT_TTL = 0.02
EXPIRY_WAIT = 0.05


def stored_execution(store: Store, recorder: Recorder, execution_id: str) -> None:
    assert store.write([WriteItem(recorder.create(execution_id))]) == [None]


def leased_update(
    recorder: Recorder, execution_id: str, lease: tuple[str, int], **variables: Any
) -> WriteItem:
    return WriteItem(recorder.update(execution_id, {"variables": variables}), None, lease)


# -- the store's lease contract --------------------------------------------------------


def test_acquire_grants_one_owner_and_each_grant_a_greater_token(store: Store) -> None:
    recorder = Recorder()
    stored_execution(store, recorder, "e1")
    first = store.acquire_lease("e1", "alice", 60_000_000)
    assert (first.owner, first.token) == ("alice", 1)
    with pytest.raises(LeaseHeldError) as held:
        store.acquire_lease("e1", "bob", 60_000_000)
    assert held.value.owner == "alice"
    assert held.value.expires_at > datetime.now(UTC)
    again = store.acquire_lease("e1", "alice", 60_000_000)
    assert again.token == 2
    assert store.get_lease("e1") == again


def test_acquire_of_an_unknown_execution_is_not_found(store: Store) -> None:
    with pytest.raises(NotFoundError):
        store.acquire_lease("missing", "alice", 1_000_000)
    assert store.get_lease("missing") is None


def test_expired_lease_goes_to_the_next_owner_and_fences_the_old_one(store: Store) -> None:
    recorder = Recorder()
    stored_execution(store, recorder, "e1")
    old = store.acquire_lease("e1", "alice", SHORT_TTL_US)
    time.sleep(EXPIRY_WAIT)
    new = store.acquire_lease("e1", "bob", 60_000_000)
    assert new.token == old.token + 1
    with pytest.raises(LeaseLostError) as lost:
        store.renew_lease("e1", "alice", old.token, 60_000_000)
    assert (lost.value.token, lost.value.current_token) == (old.token, new.token)
    # A write under the old lease is refused and changes nothing.
    before = store.load("e1")
    refused = store.write([leased_update(recorder, "e1", ("alice", old.token), x=1)])
    assert isinstance(refused[0], LeaseLostError)
    assert refused[0].current_token == new.token
    assert store.load("e1") == before
    # The new owner writes; the delta records its lease.
    recorder2 = Recorder()
    recorder2.core.install(replayed(store, "e1"))
    assert store.write([leased_update(recorder2, "e1", ("bob", new.token), x=2)]) == [None]
    assert store.lease_log("e1") == [(1, None, None), (2, "bob", new.token)]


def test_expired_lease_nobody_took_still_renews_and_writes(store: Store) -> None:
    recorder = Recorder()
    stored_execution(store, recorder, "e1")
    lease = store.acquire_lease("e1", "alice", SHORT_TTL_US)
    time.sleep(EXPIRY_WAIT)
    assert store.write([leased_update(recorder, "e1", ("alice", lease.token), x=1)]) == [None]
    renewed = store.renew_lease("e1", "alice", lease.token, 60_000_000)
    assert renewed.token == lease.token
    assert renewed.expires_at_us > lease.expires_at_us


def test_release_ends_the_lease_and_fences_its_writes(store: Store) -> None:
    recorder = Recorder()
    stored_execution(store, recorder, "e1")
    lease = store.acquire_lease("e1", "alice", 60_000_000)
    assert store.release_lease("e1", "alice", lease.token) is True
    assert store.release_lease("e1", "alice", lease.token) is False
    assert store.get_lease("e1") is None
    refused = store.write([leased_update(recorder, "e1", ("alice", lease.token), x=1)])
    assert isinstance(refused[0], LeaseLostError)
    assert refused[0].current_token is None
    assert store.acquire_lease("e1", "bob", 60_000_000).token == lease.token + 1


def test_fencing_refuses_only_the_chain_with_the_lost_lease(store: Store) -> None:
    recorder = Recorder()
    for execution_id in ("a", "b", "c"):
        stored_execution(store, recorder, execution_id)
    lease_a = store.acquire_lease("a", "alice", 60_000_000)
    store.acquire_lease("b", "bob", 60_000_000)
    batch = [
        leased_update(recorder, "a", ("alice", lease_a.token), x=1),
        leased_update(recorder, "b", ("alice", 99), x=1),  # not alice's lease
        WriteItem(recorder.update("c", {"variables": {"x": 1}})),  # no lease: not fenced
    ]
    outcomes = store.write(batch)
    assert outcomes[0] is None
    assert isinstance(outcomes[1], LeaseLostError)
    assert outcomes[2] is None
    assert store.current_versions(["a", "b", "c"]) == {"a": 2, "b": 1, "c": 2}
    # Each delta of the batch records the lease it was written under, or none.
    assert store.lease_log("a") == [(1, None, None), (2, "alice", lease_a.token)]
    assert store.lease_log("c") == [(1, None, None), (2, None, None)]


def test_lost_lease_is_reported_before_a_version_conflict(store: Store) -> None:
    recorder = Recorder()
    stored_execution(store, recorder, "e1")
    record = recorder.update("e1", {"variables": {"x": 1}})
    assert store.write([WriteItem(record)]) == [None]
    store.acquire_lease("e1", "bob", 60_000_000)
    stale = Recorder()
    stale.create("e1")
    outcome = store.write([leased_update(stale, "e1", ("alice", 7), x=2)])
    assert isinstance(outcome[0], LeaseLostError)


def test_claim_orphans_takes_only_running_executions_whose_lease_ran_out(store: Store) -> None:
    recorder = Recorder()
    for execution_id in ("expired", "live", "never", "released", "done"):
        stored_execution(store, recorder, execution_id)
    store.acquire_lease("expired", "dead", SHORT_TTL_US)
    store.acquire_lease("live", "alive", 60_000_000)
    released = store.acquire_lease("released", "gone", 60_000_000)
    store.release_lease("released", "gone", released.token)
    store.acquire_lease("done", "dead", SHORT_TTL_US)
    assert store.write([WriteItem(recorder.update("done", {"status": "completed"}))]) == [None]
    time.sleep(EXPIRY_WAIT)
    claimed = store.claim_orphans("rescuer", 60_000_000, 10)
    assert sorted(grant.execution_id for grant in claimed) == ["expired", "released"]
    assert all(grant.owner == "rescuer" for grant in claimed)
    assert {grant.execution_id: grant.token for grant in claimed} == {"expired": 2, "released": 2}
    assert store.claim_orphans("another", 60_000_000, 10) == []
    assert store.get_lease("expired") == next(g for g in claimed if g.execution_id == "expired")


def test_claim_orphans_respects_the_limit(store: Store) -> None:
    recorder = Recorder()
    for number in range(5):
        stored_execution(store, recorder, f"e{number}")
        store.acquire_lease(f"e{number}", "dead", SHORT_TTL_US)
    time.sleep(EXPIRY_WAIT)
    first = store.claim_orphans("r1", 60_000_000, 2)
    second = store.claim_orphans("r2", 60_000_000, 10)
    assert len(first) == 2
    assert len(second) == 3
    assert not {g.execution_id for g in first} & {g.execution_id for g in second}


def test_owned_execution_ids_are_the_owners_unfinished_ones(store: Store) -> None:
    recorder = Recorder()
    for execution_id in ("a", "b", "c"):
        stored_execution(store, recorder, execution_id)
        store.acquire_lease(execution_id, "me", SHORT_TTL_US)
    assert store.write([WriteItem(recorder.update("c", {"status": "cancelled"}))]) == [None]
    store.acquire_lease("b", "me", 60_000_000)
    assert store.owned_execution_ids("me") == ["a", "b"]
    assert store.owned_execution_ids("someone else") == []


def test_concurrent_acquirers_get_one_grant(durable_store_url: str) -> None:
    """Eight threads, each with a store of its own, race for one execution."""
    setup = open_store(durable_store_url)
    stored_execution(setup, Recorder(), "e1")
    stores = [open_store(durable_store_url) for _ in range(8)]
    winners: list[str] = []
    held: list[str] = []
    barrier = threading.Barrier(len(stores))

    def race(number: int) -> None:
        barrier.wait()
        try:
            stores[number].acquire_lease("e1", f"owner-{number}", 60_000_000)
            winners.append(f"owner-{number}")
        except LeaseHeldError as e:
            held.append(e.owner)

    threads = [threading.Thread(target=race, args=(n,)) for n in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert len(winners) == 1
        assert set(held) == set(winners)
        grant = setup.get_lease("e1")
        assert grant is not None
        assert (grant.owner, grant.token) == (winners[0], 1)
    finally:
        for opened in [*stores, setup]:
            opened.close()


# -- the manager's lease API ------------------------------------------------------------


@pytest.fixture(params=["none", "memory", "sqlite", "postgresql"])
def leasing_manager(request: pytest.FixtureRequest) -> Iterator[StateManager]:
    """A manager without a store, and one on each store (sync)."""
    from conftest import backend_url

    if request.param == "none":
        manager = StateManager()
    else:
        manager = StateManager.open(backend_url(request, request.param))
    try:
        yield manager
    finally:
        manager.close()


def test_leased_writes_apply_while_the_lease_is_held(leasing_manager: StateManager) -> None:
    sm = leasing_manager
    sm.create_execution("e1", workflow_id="wf")
    lease = sm.acquire("e1", owner="w1", ttl=30)
    assert isinstance(lease, Lease)
    assert (lease.execution_id, lease.owner, lease.token, lease.ttl) == ("e1", "w1", 1, 30.0)
    assert not lease.expired
    assert sm.update_state("e1", {"nodes": {"a": "running"}}, lease=lease) == 2
    assert sm.transact("e1", lambda s: {"variables": {"n": s.version}}, lease=lease) == 3
    assert sm.get_lease("e1") is not None


def test_write_under_a_lost_lease_raises_and_changes_nothing(leasing_manager: StateManager) -> None:
    sm = leasing_manager
    sm.create_execution("e1", workflow_id="wf")
    old = sm.acquire("e1", owner="w1", ttl=SHORT_TTL)
    time.sleep(EXPIRY_WAIT)
    new = sm.acquire("e1", owner="w2", ttl=30)
    assert new.token == old.token + 1
    before = sm.get_state("e1")
    history = sm.get_history("e1").events
    with pytest.raises(LeaseLostError) as lost:
        sm.update_state("e1", {"variables": {"x": 1}}, lease=old)
    assert lost.value.current_token == new.token
    with pytest.raises(LeaseLostError):
        sm.transact("e1", lambda s: {"variables": {"x": 1}}, lease=old)
    with pytest.raises(LeaseLostError):
        sm.renew(old)
    assert sm.get_state("e1") == before
    assert sm.get_history("e1").events == history
    assert sm.stats()["leases_lost"] == 3
    assert sm.update_state("e1", {"variables": {"x": 2}}, lease=new) == 2


def test_acquire_waits_for_a_lease_to_run_out(leasing_manager: StateManager) -> None:
    sm = leasing_manager
    sm.create_execution("e1", workflow_id="wf")
    sm.acquire("e1", owner="w1", ttl=0.2)
    with pytest.raises(LeaseHeldError):
        sm.acquire("e1", owner="w2", ttl=30)
    lease = sm.acquire("e1", owner="w2", ttl=30, wait=5)
    assert lease.owner == "w2"


def test_a_lease_read_from_another_manager_needs_a_ttl_to_renew(
    durable_store_url: str,
) -> None:
    with (
        StateManager.open(durable_store_url) as first,
        StateManager.open(durable_store_url) as second,
    ):
        first.create_execution("e1", workflow_id="wf")
        granted = first.acquire("e1", owner="w1", ttl=30)
        seen = second.get_lease("e1")
        assert seen is not None
        assert (seen.owner, seen.token, seen.ttl) == ("w1", granted.token, 0.0)
        with pytest.raises(ValidationError, match="ttl"):
            second.renew(seen)
        with pytest.raises(ValidationError, match="ttl"):
            second.heartbeat(seen)
        assert second.renew(seen, ttl=10).token == granted.token
        with second.heartbeat(seen, ttl=10, interval=0.02) as beat:
            time.sleep(0.1)
        assert beat.renewals >= 1
        assert beat.lease.ttl == 10


def test_release_lets_another_owner_in_at_once(leasing_manager: StateManager) -> None:
    sm = leasing_manager
    sm.create_execution("e1", workflow_id="wf")
    lease = sm.acquire("e1", owner="w1", ttl=30)
    assert sm.release(lease) is True
    assert sm.release(lease) is False
    assert sm.get_lease("e1") is None
    assert sm.acquire("e1", owner="w2", ttl=30).token == 2


def test_heartbeat_keeps_a_lease_past_its_ttl(leasing_manager: StateManager) -> None:
    sm = leasing_manager
    sm.create_execution("e1", workflow_id="wf")
    lease = sm.acquire("e1", owner="w1", ttl=0.3)
    with sm.heartbeat(lease, interval=0.05) as beat:
        time.sleep(0.6)
        with pytest.raises(LeaseHeldError):
            sm.acquire("e1", owner="w2", ttl=30)
        assert beat.renewals >= 3
        assert not beat.lost
        assert beat.lease.expires_at > lease.expires_at
    assert sm.update_state("e1", {"variables": {"x": 1}}, lease=beat.lease) == 2


def test_heartbeat_reports_a_lease_taken_by_another_owner(leasing_manager: StateManager) -> None:
    sm = leasing_manager
    sm.create_execution("e1", workflow_id="wf")
    lease = sm.acquire("e1", owner="w1", ttl=SHORT_TTL)
    reported: list[LeaseLostError] = []
    with sm.heartbeat(lease, interval=0.2, on_lost=reported.append) as beat:
        time.sleep(EXPIRY_WAIT)
        sm.acquire("e1", owner="w2", ttl=30)
        assert beat.wait_lost(timeout=5)
    assert beat.lost
    assert len(reported) == 1
    assert isinstance(beat.error, LeaseLostError)


def test_claim_orphans_returns_states_with_leases_to_write_under(
    leasing_manager: StateManager,
) -> None:
    sm = leasing_manager
    for execution_id in ("a", "b", "c"):
        sm.create_execution(execution_id, workflow_id="wf")
    sm.acquire("a", owner="dead", ttl=SHORT_TTL)
    sm.acquire("b", owner="alive", ttl=30)
    time.sleep(EXPIRY_WAIT)
    states = sm.claim_orphans(owner="rescuer", limit=10, ttl=30)
    assert [state.execution_id for state in states] == ["a"]
    assert all(isinstance(state, WorkflowState) for state in states)
    lease = sm.get_lease("a")
    assert lease is not None
    assert (lease.owner, lease.token, lease.ttl) == ("rescuer", 2, 30.0)
    assert sm.update_state("a", {"variables": {"rescued": True}}, lease=lease) == 2
    assert sm.renew(lease).expires_at >= lease.expires_at
    assert sm.claim_orphans(owner="rescuer", limit=0) == []


def test_recover_by_owner_reacquires_with_new_tokens(leasing_manager: StateManager) -> None:
    sm = leasing_manager
    for execution_id in ("a", "b", "c"):
        sm.create_execution(execution_id, workflow_id="wf")
    old_a = sm.acquire("a", owner="me", ttl=30)
    sm.acquire("b", owner="me", ttl=30)
    sm.acquire("c", owner="other", ttl=30)
    states = sm.recover(owner="me", ttl=30)
    assert sorted(state.execution_id for state in states) == ["a", "b"]
    new_a = sm.get_lease("a")
    assert new_a is not None
    assert new_a.token == old_a.token + 1
    with pytest.raises(LeaseLostError):
        sm.update_state("a", {"variables": {"late": True}}, lease=old_a)
    assert sm.update_state("a", {"variables": {"now": True}}, lease=new_a) == 2


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda sm: sm.acquire("e1", owner="", ttl=1), "owner"),
        (lambda sm: sm.acquire("e1", owner="x\x00", ttl=1), "owner"),
        (lambda sm: sm.acquire("e1", owner=7, ttl=1), "owner"),
        (lambda sm: sm.acquire("e1", owner="w", ttl=0), "ttl"),
        (lambda sm: sm.acquire("e1", owner="w", ttl=float("inf")), "ttl"),
        (lambda sm: sm.acquire("e1", owner="w", ttl=1, wait=-1), "wait"),
        (lambda sm: sm.claim_orphans(owner="w", limit=-1), "limit"),
        (lambda sm: sm.update_state("e1", {"variables": {"x": 1}}, lease="nope"), "Lease"),
    ],
)
def test_bad_lease_arguments_are_validation_errors(call: Any, message: str) -> None:
    with StateManager() as sm:
        sm.create_execution("e1", workflow_id="wf")
        with pytest.raises(ValidationError, match=message):
            call(sm)
        assert sm.get_lease("e1") is None
        assert sm.get_state("e1").version == 1


def test_a_lease_on_another_execution_is_refused(leasing_manager: StateManager) -> None:
    sm = leasing_manager
    sm.create_execution("e1", workflow_id="wf")
    sm.create_execution("e2", workflow_id="wf")
    lease = sm.acquire("e1", owner="w1", ttl=30)
    with pytest.raises(ValidationError, match="e1"):
        sm.update_state("e2", {"variables": {"x": 1}}, lease=lease)
    assert sm.get_state("e2").version == 1


def test_leased_writes_are_synchronous_in_async_mode(durable_store_url: str) -> None:
    with StateManager.open(durable_store_url, durability="async", flush_interval=60) as sm:
        sm.create_execution("e1", workflow_id="wf")
        sm.flush()
        lease = sm.acquire("e1", owner="w1", ttl=30)
        sm.update_state("e1", {"variables": {"x": 1}}, lease=lease)
        direct = open_store(durable_store_url)
        try:
            assert direct.current_versions(["e1"]) == {"e1": 2}
            assert direct.lease_log("e1")[-1] == (2, "w1", lease.token)
        finally:
            direct.close()


# -- two managers on one store: stale copies, merges, retries ---------------------------


@pytest.fixture
def two(durable_store_url: str) -> Iterator[tuple[StateManager, StateManager]]:
    """Two managers on one store, as two processes would have (sync writes)."""
    first = StateManager.open(durable_store_url)
    second = StateManager.open(durable_store_url)
    try:
        first.create_execution("e1", workflow_id="wf", variables={"x": 0, "y": 0})
        second.get_state("e1")  # both hold version 1 in memory
        yield first, second
    finally:
        first.close()
        second.close()


def test_plain_update_merges_onto_versions_that_changed_other_fields(
    two: tuple[StateManager, StateManager],
) -> None:
    first, second = two
    assert second.update_state("e1", {"variables": {"x": 1}, "nodes": {"a": "running"}}) == 2
    # first still holds version 1: its update is based on it, and merges.
    assert first.update_state("e1", {"variables": {"y": 1}, "nodes": {"b": "running"}}) == 3
    state = first.get_state("e1")
    assert state.variables == {"x": 1, "y": 1}
    assert set(state.nodes) == {"a", "b"}
    assert first.stats()["merges"] == 1
    assert first.stats()["conflicts"] == first.stats()["conflicts_resolved"] == 1


@pytest.mark.parametrize(
    ("theirs", "ours", "fields"),
    [
        ({"variables": {"x": 1}}, {"variables": {"x": 2}}, {"variables.x"}),
        ({"variables": {"x": 1}}, {"unset_variables": ["x"]}, {"variables.x"}),
        ({"unset_variables": ["y"]}, {"variables": {"y": 5}}, {"variables.y"}),
        ({"context": {"k": 1}}, {"context": {"k": 2}}, {"context.k"}),
        ({"nodes": {"a": "running"}}, {"nodes": {"a": "skipped"}}, {"nodes.a"}),
        ({"status": "suspended"}, {"status": "completed"}, {"status"}),
        ({"current_node": "a"}, {"current_node": "b"}, {"current_node"}),
    ],
)
def test_plain_update_touching_a_field_changed_since_is_a_conflict(
    two: tuple[StateManager, StateManager],
    theirs: dict[str, Any],
    ours: dict[str, Any],
    fields: set[str],
) -> None:
    first, second = two
    second.update_state("e1", theirs)
    stored = second.get_state("e1")
    with pytest.raises(ConflictError) as conflict:
        first.update_state("e1", ours)
    assert conflict.value.fields == fields
    assert (conflict.value.expected, conflict.value.actual) == (1, 2)
    # Nothing of ours was written, and first now holds the stored version.
    assert first.get_state("e1") == stored
    assert second.get_state("e1") == stored
    assert first.stats()["conflicts"] == 1
    assert first.stats()["conflicts_resolved"] == 0


def test_errors_and_metrics_never_conflict(two: tuple[StateManager, StateManager]) -> None:
    first, second = two
    second.update_state("e1", {"error": {"type": "E", "message": "m"}})
    assert first.update_state("e1", {"error": {"type": "F", "message": "n"}}) == 3
    assert first.get_state("e1").error_count == 2


def test_merge_revalidates_against_the_newer_state(two: tuple[StateManager, StateManager]) -> None:
    first, second = two
    second.update_state("e1", {"status": "cancelled"})
    with pytest.raises(InvalidTransitionError, match="cancelled"):
        first.update_state("e1", {"variables": {"y": 1}})
    assert first.get_state("e1").version == 2


def test_stale_copy_is_brought_up_to_date_for_an_expected_version(
    two: tuple[StateManager, StateManager],
) -> None:
    first, second = two
    second.update_state("e1", {"variables": {"x": 1}})
    # The caller read version 2 elsewhere; first's copy is at version 1.
    assert first.update_state("e1", {"variables": {"x": 2}}, expected_version=2) == 3
    with pytest.raises(ConflictError):
        first.update_state("e1", {"variables": {"x": 3}}, expected_version=2)


def test_stale_copy_refusing_a_transition_is_brought_up_to_date(
    two: tuple[StateManager, StateManager],
) -> None:
    first, second = two
    second.update_state("e1", {"nodes": {"a": "running"}, "variables": {"x": 41}})
    # In first's copy node a is absent, from which "completed" is not allowed. The
    # copy is brought up to date; the update was based on version 1 and both changed
    # node a and x since, so it is a conflict (nothing written), not a transition error.
    with pytest.raises(ConflictError) as conflict:
        first.update_state("e1", {"nodes": {"a": "completed"}, "variables": {"x": 42}})
    assert conflict.value.fields == {"nodes.a", "variables.x"}
    assert first.get_state("e1").variables["x"] == 41
    # Now based on the stored version, the same update applies.
    assert first.update_state("e1", {"nodes": {"a": "completed"}, "variables": {"x": 42}}) == 3
    with pytest.raises(InvalidTransitionError):
        first.update_state("e1", {"nodes": {"a": "running"}})


def test_transact_from_two_managers_loses_no_increment(
    two: tuple[StateManager, StateManager],
) -> None:
    rounds = 150

    def work(sm: StateManager, name: str) -> None:
        for _ in range(rounds):
            sm.transact("e1", lambda s: {"variables": {name: s.variables[name] + 1}}, retries=100)

    threads = [
        threading.Thread(target=work, args=(sm, name))
        for sm, name in ((two[0], "x"), (two[1], "y"), (two[0], "y"), (two[1], "x"))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    two[0].update_state("e1", {"context": {"done": True}})  # brings first up to date
    final = two[0].get_state("e1")
    assert final.variables == {"x": 2 * rounds, "y": 2 * rounds}
    assert final.version == 1 + 4 * rounds + 1
    for sm in two:
        stats = sm.stats()
        assert stats["conflicts"] == stats["conflicts_resolved"]
        assert stats["transact_retries"] + stats["merges"] == stats["conflicts"]
    assert sum(sm.stats()["conflicts"] for sm in two) > 0


def test_a_heartbeat_stops_quietly_when_the_manager_closes(durable_store_url: str) -> None:
    sm = StateManager.open(durable_store_url)
    sm.create_execution("e1", workflow_id="wf")
    lease = sm.acquire("e1", owner="w1", ttl=30)
    beat = sm.heartbeat(lease, interval=0.02)
    sm.close()
    time.sleep(0.2)
    assert not beat._thread.is_alive()
    assert not beat.lost
    assert beat.error is not None
    beat.stop()


def test_writers_of_one_execution_share_its_snapshots(
    two: tuple[StateManager, StateManager],
) -> None:
    """A writer that catches up on another's versions learns of the snapshots stored
    with them, so two alternating writers store about as many snapshots as one would
    (counting each on its own, they stored one every other version: 20 for 8)."""
    first, second = two
    first.create_execution("solo", workflow_id="wf", variables={"x": 0, "y": 0})
    for number in range(40):
        # Each writer its own variable: the stale one merges.
        writer, name = (first, "x") if number % 2 else (second, "y")
        writer.update_state("e1", {"variables": {name: number}})
        first.update_state("solo", {"variables": {name: number}})
    url = first.store_url
    assert url is not None
    store = open_store(url)
    try:
        shared = count_snapshots(store, "e1", 41)
        solo = count_snapshots(store, "solo", 41)
    finally:
        store.close()
    assert solo > 0
    assert shared <= solo * 1.5 + 1, (shared, solo)


def count_snapshots(store: Store, execution_id: str, up_to: int) -> int:
    """How many versions up to ``up_to`` load from a snapshot of their own."""
    return sum(
        1
        for version in range(2, up_to + 1)
        if (found := store.load(execution_id, version=version)) is not None
        and found.snapshot_version == version
    )
