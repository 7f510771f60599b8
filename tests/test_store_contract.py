"""The Store contract (``wfstate.store.base``), run once per backend.

Every test gets an empty store from ``open_store(store_url)``: ``memory://``, a SQLite
file of its own and a PostgreSQL database of its own. Records are made by a core of the
test's own (``durable_support.Recorder``), exactly as the manager makes them, so what a
store gives back is checked against what was written: rebuilt states against the
states the core computed, deltas and times byte for byte.

Tests that reopen a store run only on the backends that outlive their connections.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from durable_support import STORY, Recorder, comparable_events, loaded, replayed, stored_versions
from wfstate import (
    AlreadyExistsError,
    ConflictError,
    VersionRecord,
    WfstateError,
    WorkflowState,
    _core,
)
from wfstate._core import RecordBatch
from wfstate.config import parse_store_url
from wfstate.store import Store, open_store
from wfstate.store.base import (
    EVENT_TYPE_BITS,
    NEWER_DELTAS_LIMIT,
    LoadedExecution,
    NewerVersionsConflict,
    WriteItem,
    conflict_with,
    event_mask,
)
from wfstate.store.postgres import COPY_THRESHOLD

TESTS_DIR = Path(__file__).resolve().parent


def items(records: Sequence[VersionRecord], *, snapshot_at: Sequence[int] = ()) -> list[WriteItem]:
    """Write items for ``records``, with a snapshot on the versions in ``snapshot_at``."""
    return [
        WriteItem(record, record.snapshot() if record.version in snapshot_at else None)
        for record in records
    ]


def written(store: Store, records: Sequence[VersionRecord]) -> None:
    assert store.write(items(records)) == [None] * len(records)


def assert_conflict(
    outcome: WfstateError | None, execution_id: str, *, expected: int, actual: int
) -> None:
    assert isinstance(outcome, ConflictError), outcome
    assert (outcome.execution_id, outcome.expected, outcome.actual) == (
        execution_id,
        expected,
        actual,
    )


def everything(store: Store, execution_ids: Sequence[str]) -> dict[str, object]:
    """Every answer the store gives about these executions, for before/after comparisons."""
    result: dict[str, object] = {
        "list": store.list_execution_ids(),
        "active": sorted(store.active_execution_ids()),
        "versions": store.current_versions(execution_ids),
    }
    for execution_id in execution_ids:
        deltas = store.read_deltas(execution_id)
        result[f"deltas {execution_id}"] = deltas
        for version, recorded_at_us, _, _ in deltas:
            found = store.load(execution_id, version=version)
            result[f"load {execution_id} {version}"] = found
            result[f"at {execution_id} {version}"] = store.version_at(execution_id, recorded_at_us)
    return result


# -- schema ---------------------------------------------------------------------------


def test_schema_version_is_a_positive_int(store: Store) -> None:
    version = store.schema_version()
    assert isinstance(version, int)
    assert version >= 1


def test_empty_store_answers_every_query(store: Store) -> None:
    assert store.write([]) == []
    assert store.load("nobody") is None
    assert store.load("nobody", version=1) is None
    assert store.active_execution_ids() == []
    assert store.current_versions([]) == {}
    assert store.current_versions(["nobody"]) == {}
    assert store.version_at("nobody", 2**62) is None
    assert store.read_deltas("nobody") == []
    assert store.list_execution_ids() == []


def test_close_is_idempotent(store_url: str) -> None:
    opened = open_store(store_url)
    opened.close()
    opened.close()


def test_url_is_the_display_url(store: Store, store_url: str) -> None:
    assert store.url == parse_store_url(store_url).display


# -- writes ---------------------------------------------------------------------------


def test_creation_and_chain_are_written_in_one_batch(store: Store) -> None:
    records = Recorder().story("order-1")
    written(store, records)
    assert store.current_versions(["order-1"]) == {"order-1": len(records)}
    assert loaded(store, "order-1") == records[-1].state
    assert replayed(store, "order-1") == records[-1].state


def test_chain_written_over_many_batches(store: Store) -> None:
    records = Recorder().story("order-1")
    for start in range(0, len(records), 3):
        written(store, records[start : start + 3])
        last = records[min(start + 3, len(records)) - 1]
        assert store.current_versions(["order-1"]) == {"order-1": last.version}
        assert loaded(store, "order-1") == last.state


def test_stored_deltas_are_the_records_byte_for_byte(store: Store) -> None:
    records = Recorder().story("order-1")
    written(store, records)
    assert store.read_deltas("order-1") == [
        (record.version, record.updated_at_us, record.actor, record.delta) for record in records
    ]


def test_stale_base_version_is_a_conflict_with_expected_and_actual(store: Store) -> None:
    records = Recorder().story("order-1", length=5)  # versions 1..6
    written(store, records[:4])  # stored version 4
    before = everything(store, ["order-1"])

    # Based on version 2 (behind the store), as one item and as a chain of two.
    (outcome,) = store.write(items(records[2:3]))
    assert_conflict(outcome, "order-1", expected=2, actual=4)
    outcomes = store.write(items(records[2:4]))
    assert len(outcomes) == 2
    for outcome in outcomes:
        assert_conflict(outcome, "order-1", expected=2, actual=4)
    # Based on version 5 (ahead of the store).
    (outcome,) = store.write(items(records[5:6]))
    assert_conflict(outcome, "order-1", expected=5, actual=4)

    assert everything(store, ["order-1"]) == before
    written(store, records[4:])
    assert loaded(store, "order-1") == records[-1].state


def test_update_of_a_missing_execution_is_a_conflict_with_actual_zero(store: Store) -> None:
    records = Recorder().story("ghost", length=2)
    (outcome,) = store.write(items(records[1:2]))
    assert_conflict(outcome, "ghost", expected=1, actual=0)
    assert store.current_versions(["ghost"]) == {}
    assert store.load("ghost") is None


def test_second_creation_is_already_exists_and_keeps_the_first(store: Store) -> None:
    first = Recorder().create("order-1", workflow_id="first", variables={"a": 1})
    written(store, [first])
    second_recorder = Recorder()
    second = second_recorder.create("order-1", workflow_id="second", variables={"a": 2})
    follow_up = second_recorder.update("order-1", {"variables": {"b": 1}})

    outcomes = store.write(items([second, follow_up]))
    assert len(outcomes) == 2
    for outcome in outcomes:
        assert isinstance(outcome, AlreadyExistsError), outcome
    assert store.current_versions(["order-1"]) == {"order-1": 1}
    assert loaded(store, "order-1") == first.state
    assert store.list_execution_ids(workflow_id="second") == []


def test_mixed_batch_refuses_only_the_executions_that_fail_their_check(store: Store) -> None:
    recorder = Recorder()
    good = recorder.story("good", length=3)  # 1..4
    stale = recorder.story("stale", length=3)
    taken = recorder.create("taken")
    fresh = recorder.story("fresh", length=2)  # 1..3
    written(store, [*good[:2], *stale[:3], taken])
    duplicate = Recorder().create("taken", workflow_id="other")

    # Interleaved on purpose: each execution's chain is spread over the batch.
    # Expected outcome: None (written), "exists", or (expected, actual) of a conflict.
    batch: list[tuple[VersionRecord, str | tuple[int, int] | None]] = [
        (good[2], None),
        (stale[1], (1, 3)),
        (fresh[0], None),
        (duplicate, "exists"),
        (good[3], None),
        (stale[2], (1, 3)),
        (fresh[1], None),
        (fresh[2], None),
    ]
    outcomes = store.write([WriteItem(record) for record, _ in batch])
    assert len(outcomes) == len(batch)
    for outcome, (record, expected) in zip(outcomes, batch, strict=True):
        if expected is None:
            assert outcome is None, (record.execution_id, record.version, outcome)
        elif expected == "exists":
            assert isinstance(outcome, AlreadyExistsError), outcome
        else:
            assert isinstance(expected, tuple)
            assert_conflict(outcome, record.execution_id, expected=expected[0], actual=expected[1])

    assert store.current_versions(["good", "stale", "taken", "fresh"]) == {
        "good": 4,
        "stale": 3,
        "taken": 1,
        "fresh": 3,
    }
    assert loaded(store, "good") == good[-1].state
    assert loaded(store, "stale") == stale[2].state
    assert loaded(store, "taken") == taken.state
    assert loaded(store, "fresh") == fresh[-1].state


def test_large_batch_of_many_executions(store: Store) -> None:
    recorder = Recorder()
    records: list[VersionRecord] = []
    for number in range(300):
        execution_id = f"bulk-{number:04d}"
        records.append(recorder.create(execution_id, workflow_id=f"wf-{number % 3}"))
        records.append(recorder.update(execution_id, {"variables": {"n": number}}))
    written(store, records)
    versions = store.current_versions([f"bulk-{number:04d}" for number in range(300)])
    assert versions == {f"bulk-{number:04d}": 2 for number in range(300)}
    assert len(store.list_execution_ids(workflow_id="wf-1")) == 100


# -- load -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("snapshot_at", "batch_size"),
    [
        ((), 11),
        ((), 1),
        ((3, 6, 9), 4),
        ((1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11), 2),
        ((11,), 11),
        ((5,), 3),
    ],
    ids=["none", "none-single-writes", "every-3", "every-version", "only-last", "one"],
)
def test_load_rebuilds_every_version(
    store: Store, snapshot_at: tuple[int, ...], batch_size: int
) -> None:
    records = Recorder().story("order-1")
    assert len(records) == 11
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        assert store.write(items(chunk, snapshot_at=snapshot_at)) == [None] * len(chunk)

    for record in records:
        version = record.version
        found = store.load("order-1", version=version)
        assert found is not None
        expected_snapshot = max((v for v in snapshot_at if v <= version), default=0)
        assert found.execution_id == "order-1"
        assert found.snapshot_version == expected_snapshot
        assert (found.snapshot is None) == (expected_snapshot == 0)
        if expected_snapshot:
            assert found.snapshot == records[expected_snapshot - 1].snapshot()
        assert found.deltas == [
            (r.version, r.updated_at_us, r.delta) for r in records[expected_snapshot:version]
        ]
        assert found.delta_bytes == sum(len(r.delta) for r in records[expected_snapshot:version])
        assert _core.rebuild("order-1", found.snapshot, found.deltas) == record.state
        assert replayed(store, "order-1", version) == record.state

    latest = store.load("order-1")
    assert latest == store.load("order-1", version=len(records))
    for version in (0, -1, len(records) + 1):
        assert store.load("order-1", version=version) is None


def test_load_returns_only_its_own_execution(store: Store) -> None:
    recorder = Recorder()
    first = recorder.story("a", length=4)
    second = recorder.story("ab", length=6)
    store.write([*items(first, snapshot_at=(3,)), *items(second, snapshot_at=(2, 5))])
    found = store.load("a")
    assert found is not None
    assert found.snapshot_version == 3
    assert [version for version, _, _ in found.deltas] == [4, 5]
    assert loaded(store, "a") == first[-1].state
    assert loaded(store, "ab") == second[-1].state
    assert loaded(store, "ab", 4) == second[3].state


# -- reads ----------------------------------------------------------------------------


def test_version_at(store: Store) -> None:
    records = Recorder().story("order-1")
    written(store, records)
    times = [record.updated_at_us for record in records]
    assert times == sorted(times)
    assert store.version_at("order-1", times[0] - 1) is None
    for record in records:
        # The newest version recorded at or before that moment (equal times: the last).
        expected = max(r.version for r in records if r.updated_at_us <= record.updated_at_us)
        assert store.version_at("order-1", record.updated_at_us) == expected
    assert store.version_at("order-1", times[-1] + 10**9) == records[-1].version
    assert store.version_at("other", times[-1]) is None


def test_read_deltas_filters(store: Store) -> None:
    recorder = Recorder()
    records = recorder.story("order-1")
    written(store, [*records, *recorder.story("order-2", length=3)])
    rows = [(r.version, r.updated_at_us, r.actor, r.delta) for r in records]
    assert store.read_deltas("order-1") == rows

    times = [r.updated_at_us for r in records]
    for after_version in (None, 0, 1, 5, 10, 11, 50):
        for since_us in (None, times[0], times[3], times[-1], times[-1] + 1):
            for until_us in (None, times[0], times[4], times[-1], times[-1] + 1):
                expected = [
                    row
                    for row in rows
                    if (after_version is None or row[0] > after_version)
                    and (since_us is None or row[1] >= since_us)
                    and (until_us is None or row[1] < until_us)
                ]
                assert (
                    store.read_deltas(
                        "order-1",
                        after_version=after_version,
                        since_us=since_us,
                        until_us=until_us,
                    )
                    == expected
                ), (after_version, since_us, until_us)


def test_read_deltas_decode_to_the_recorded_history(store: Store) -> None:
    recorder = Recorder()
    records = recorder.story("order-1")
    written(store, records)
    from_store = _core.decode_history("order-1", store.read_deltas("order-1"))
    in_memory, _ = recorder.core.history("order-1")
    assert comparable_events(from_store) == comparable_events(in_memory)


def test_list_execution_ids_order_and_filters(store: Store) -> None:
    recorder = Recorder()
    # Created in this order, with ids that do not sort in creation order.
    created = {
        execution_id: recorder.create(execution_id, workflow_id=workflow_id)
        for execution_id, workflow_id in [
            ("m", "wf-a"),
            ("c", "wf-b"),
            ("x", "wf-a"),
            ("a", "wf-b"),
            ("k", "wf-a"),
        ]
    }
    finals = {
        "c": recorder.update("c", {"status": "completed"}),
        "x": recorder.update("x", {"status": "suspended"}),
        "k": recorder.update("k", {"status": "failed"}),
    }
    cancelled = recorder.update("a", {"status": "cancelled"})
    # Stored in another order again: the order comes from the creation times.
    written(store, [created["k"], created["a"], created["x"], created["m"], created["c"]])
    written(store, [*finals.values(), cancelled])

    order = sorted(created, key=lambda i: (created[i].created_at_us, i))
    assert store.list_execution_ids() == order
    assert store.list_execution_ids(limit=None) == order
    assert store.list_execution_ids(limit=2) == order[:2]
    assert store.list_execution_ids(limit=0) == []
    assert store.list_execution_ids(limit=50) == order

    statuses = {"m": "running", "c": "completed", "x": "suspended", "a": "cancelled", "k": "failed"}
    for wanted in (["running"], ["completed"], ["running", "suspended"], ["failed"], []):
        assert store.list_execution_ids(statuses=wanted) == [
            i for i in order if statuses[i] in wanted
        ], wanted
    assert store.list_execution_ids(workflow_id="wf-a") == [
        i for i in order if created[i].workflow_id == "wf-a"
    ]
    assert store.list_execution_ids(workflow_id="wf-none") == []
    assert store.list_execution_ids(statuses=["running", "suspended"], workflow_id="wf-a") == [
        i for i in order if i in ("m", "x")
    ]
    assert store.list_execution_ids(statuses=["completed", "cancelled"], limit=1) == [
        next(i for i in order if i in ("c", "a"))
    ]


def test_current_versions(store: Store) -> None:
    recorder = Recorder()
    written(store, recorder.story("a", length=2))
    written(store, recorder.story("b", length=5))
    assert store.current_versions(["a", "b"]) == {"a": 3, "b": 6}
    assert store.current_versions(["b", "nobody", "a", "a"]) == {"a": 3, "b": 6}
    assert store.current_versions(["nobody"]) == {}
    assert store.current_versions(("b",)) == {"b": 6}


def test_active_execution_ids_are_the_running_and_suspended(store: Store) -> None:
    recorder = Recorder()
    outcomes = {
        "running": [],
        "suspended": [{"status": "suspended"}],
        "completed": [{"status": "completed"}],
        "failed": [{"status": "failed"}],
        "cancelled": [{"status": "cancelled"}],
        "resumed": [{"status": "failed"}, {"status": "running"}],
    }
    for execution_id, updates in outcomes.items():
        records = [recorder.create(execution_id)]
        records.extend(recorder.update(execution_id, update) for update in updates)
        written(store, records)
    assert sorted(store.active_execution_ids()) == ["resumed", "running", "suspended"]
    written(store, [recorder.update("suspended", {"status": "cancelled"})])
    assert sorted(store.active_execution_ids()) == ["resumed", "running"]


def test_fork_link_is_stored_with_the_new_execution(store: Store) -> None:
    recorder = Recorder()
    source = recorder.story("source", length=3)
    written(store, source)
    forked_state = recorder.core.get_version("source", 2)
    fork = recorder.core.prepare_fork(forked_state, "copy", "forker")
    link = recorder.core.prepare_fork_link("source", 2, "copy", "forker")
    recorder.core.publish(fork)
    recorder.core.publish(link)
    written(store, [fork.record(), link.record()])
    copy = loaded(store, "copy")
    assert copy.forked_from == ("source", 2)
    assert copy == fork.state
    assert loaded(store, "source") == link.state
    assert [e.type for e in _core.decode_history("source", store.read_deltas("source"))][
        -1
    ] == "execution_forked"


# -- reopening and migrations ----------------------------------------------------------


def fill(store: Store) -> tuple[list[str], dict[str, WorkflowState]]:
    """Executions of every kind, with snapshots here and there; their final states."""
    recorder = Recorder()
    states: dict[str, WorkflowState] = {}
    for number, length in enumerate((0, 2, 5, len(STORY))):
        execution_id = f"e{number}"
        records = recorder.story(execution_id, workflow_id=f"wf-{number % 2}", length=length)
        assert store.write(items(records, snapshot_at=(3, 7))) == [None] * len(records)
        states[execution_id] = records[-1].state
    suspended = recorder.update("e1", {"status": "suspended"})
    written(store, [suspended])
    states["e1"] = suspended.state
    return list(states), states


def test_reopen_keeps_everything(durable_store_url: str) -> None:
    store = open_store(durable_store_url)
    try:
        execution_ids, states = fill(store)
        schema = store.schema_version()
        before = everything(store, execution_ids)
    finally:
        store.close()

    reopened = open_store(durable_store_url)
    try:
        assert reopened.schema_version() == schema
        assert everything(reopened, execution_ids) == before
        for execution_id, state in states.items():
            assert loaded(reopened, execution_id) == state
            assert replayed(reopened, execution_id) == state
        # And it keeps taking writes where it left off.
        recorder = Recorder()
        written(reopened, recorder.story("after-reopen", length=2))
        assert reopened.current_versions(["after-reopen", "e3"]) == {
            "after-reopen": 3,
            "e3": len(STORY) + 1,
        }
    finally:
        reopened.close()


def test_opened_twice_at_once_shares_one_schema_and_data(durable_store_url: str) -> None:
    first = open_store(durable_store_url)
    second = open_store(durable_store_url)
    try:
        assert first.schema_version() == second.schema_version()
        records = Recorder().story("shared", length=4)
        written(first, records[:3])
        written(second, records[3:])
        for store in (first, second):
            assert loaded(store, "shared") == records[-1].state
        (outcome,) = second.write(items(records[1:2]))
        assert_conflict(outcome, "shared", expected=1, actual=5)
    finally:
        first.close()
        second.close()
    third = open_store(durable_store_url)
    try:
        assert loaded(third, "shared") == records[-1].state
        assert migration_rows(durable_store_url) == sorted(set(migration_rows(durable_store_url)))
    finally:
        third.close()


def migration_rows(url: str) -> list[int]:
    """The versions recorded in the store's migrations table, one row per migration."""
    parsed = parse_store_url(url)
    if parsed.scheme == "sqlite":
        connection = sqlite3.connect(parsed.path)
        try:
            rows = connection.execute("SELECT version FROM wfstate_schema_migrations").fetchall()
        finally:
            connection.close()
    else:
        import psycopg

        with psycopg.connect(parsed.raw, autocommit=True) as pg_connection:
            rows = pg_connection.execute(
                "SELECT version FROM public.wfstate_schema_migrations"
            ).fetchall()
    return sorted(int(version) for (version,) in rows)


# Each child imports everything, says it is ready, then waits for the go line so
# that the opens really race.
_OPEN_AT_ONCE = textwrap.dedent(
    """
    import json, sys
    from wfstate.store import open_store
    print("ready", flush=True)
    sys.stdin.readline()
    store = open_store(sys.argv[1], connect_timeout=30)
    try:
        print(json.dumps({"schema": store.schema_version()}), flush=True)
    finally:
        store.close()
    """
)


def test_migrations_run_once_when_several_processes_open_a_new_store(
    durable_store_url: str,
) -> None:
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _OPEN_AT_ONCE, durable_store_url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        schemas = []
        for child in children:
            out, err = child.communicate(timeout=60)
            assert child.returncode == 0, err
            schemas.append(json.loads(out.splitlines()[-1])["schema"])
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()

    store = open_store(durable_store_url)
    try:
        assert schemas == [store.schema_version()] * len(children)
        assert schemas[0] >= 1
        # Every migration recorded exactly once, up to the schema version.
        assert migration_rows(durable_store_url) == list(range(1, schemas[0] + 1))
        records = Recorder().story("after-race", length=2)
        written(store, records)
        assert loaded(store, "after-race") == records[-1].state
    finally:
        store.close()


def test_reopening_a_migrated_store_migrates_nothing(durable_store_url: str) -> None:
    for _ in range(3):
        store = open_store(durable_store_url)
        try:
            version = store.schema_version()
        finally:
            store.close()
    assert migration_rows(durable_store_url) == list(range(1, version + 1))


def test_loaded_execution_counts_its_delta_bytes() -> None:
    found = LoadedExecution("x", None, 0, [(1, 10, b"abc"), (2, 11, b"de")])
    assert found.delta_bytes == 5


# -- a conflict carries what the writer missed -------------------------------------------


def test_stale_single_write_gets_the_newer_deltas_with_its_conflict(store: Store) -> None:
    recorder = Recorder()
    written(store, [recorder.create("e1"), recorder.update("e1", {"variables": {"x": 1}})])
    stale = Recorder()
    stale.create("e1")
    newer = [recorder.update("e1", {"variables": {"x": n}}) for n in range(2, 5)]
    assert store.write(items(newer, snapshot_at=[4])) == [None] * 3
    (outcome,) = store.write(items([stale.update("e1", {"variables": {"y": 1}})]))
    assert isinstance(outcome, NewerVersionsConflict)
    assert (outcome.expected, outcome.actual) == (1, 5)
    # The stored row's newest snapshot, for the writer's snapshot policy.
    assert outcome.snapshot_version == 4
    assert outcome.newer == store.read_deltas("e1", after_version=1)
    caught_up = _core.advance(
        loaded(store, "e1", version=1), [(v, at_us, delta) for v, at_us, _, delta in outcome.newer]
    )
    assert caught_up == loaded(store, "e1")


def test_a_stale_chain_in_a_grouped_write_gets_the_newer_deltas(store: Store) -> None:
    """A write of several executions (a group commit) where one chain is stale: that
    chain's conflict carries the deltas it missed, as a single write's does; the
    other chains are written."""
    recorder = Recorder()
    written(store, [recorder.create("e1"), recorder.create("e2")])
    stale = Recorder()
    stale.create("e1")
    written(store, [recorder.update("e1", {"variables": {"x": n}}) for n in range(2)])
    outcomes = store.write(
        items(
            [
                stale.update("e1", {"variables": {"y": 1}}),
                recorder.update("e2", {"variables": {"z": 1}}),
            ]
        )
    )
    conflict, fine = outcomes
    assert fine is None
    assert isinstance(conflict, NewerVersionsConflict)
    assert (conflict.expected, conflict.actual) == (1, 3)
    assert conflict.newer == store.read_deltas("e1", after_version=1)
    assert store.current_versions(["e1", "e2"]) == {"e1": 3, "e2": 2}


def test_a_writer_far_behind_gets_a_plain_conflict(store: Store) -> None:
    recorder = Recorder()
    written(store, [recorder.create("e1")])
    stale = Recorder()
    stale.create("e1")
    written(
        store,
        [recorder.update("e1", {"variables": {"x": n}}) for n in range(NEWER_DELTAS_LIMIT + 1)],
    )
    (outcome,) = store.write(items([stale.update("e1", {"variables": {"y": 1}})]))
    assert type(outcome) is ConflictError
    assert (outcome.expected, outcome.actual) == (1, NEWER_DELTAS_LIMIT + 2)


# -- write-behind batches (encoded in Rust) ---------------------------------------------


def batch_of(stories: dict[str, int]) -> tuple[RecordBatch, list[VersionRecord]]:
    """A RecordBatch of creations and ``STORY`` updates, and the same versions as
    records (the per-version path), from a core of the test's own."""
    core = _core.Core()
    cursor = core.open_cursor(durable=True)
    for execution_id, length in stories.items():
        core.create(execution_id, "wf-batch", {"n": 1}, None, "creator")
        for position, update in enumerate(STORY[:length]):
            core.apply(execution_id, update, None, None if position % 2 else f"actor-{position}")
    records = core.open_cursor(durable=False, from_oldest=True).read_records(10_000, timeout=0)
    batch = cursor.read_batch(10_000, timeout=0)
    return batch, records


def test_write_batch_stores_what_write_stores(store: Store, store_url: str) -> None:
    batch, records = batch_of({"b1": len(STORY), "b2": 3, "b3": 0})
    chains = batch.chains()
    assert [chain[0] for chain in chains] == ["b1", "b2", "b3"]
    assert [chain[6] for chain in chains] == [len(STORY) + 1, 4, 1]
    snapshot = [True, False, True]
    refusals, sizes = store.write_batch(batch, snapshot)
    assert refusals == {}
    assert sizes[1] == 0
    assert sizes[0] == len(records[len(STORY)].snapshot())
    for execution_id in ("b1", "b2", "b3"):
        mine = [r for r in records if r.execution_id == execution_id]
        stored = store.read_deltas(execution_id)
        assert [(v, at_us, actor, delta) for v, at_us, actor, delta in stored] == [
            (r.version, r.updated_at_us, r.actor, r.delta) for r in mine
        ]
        assert loaded(store, execution_id) == replayed(store, execution_id) == mine[-1].state
    # The flagged chains' last versions have snapshots; load starts from them.
    found = store.load("b1")
    assert found is not None
    assert (found.snapshot_version, found.deltas) == (len(STORY) + 1, [])
    assert store.load("b2") is not None
    assert store.load("b2").snapshot_version == 0  # type: ignore[union-attr]
    assert store.list_execution_ids(workflow_id="wf-batch") == ["b1", "b2", "b3"]
    if not store_url.startswith("memory:"):
        assert stored_columns(store_url) == expected_columns(records)


def stored_columns(url: str) -> list[tuple[str, int, int, list[str]]]:
    """(execution, version, event_mask, node ids) of every stored delta, by SQL."""
    if url.startswith("sqlite:"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            rows = conn.execute(
                "SELECT execution_id, version, event_mask, node_ids FROM wfstate_deltas"
                " ORDER BY execution_id, version"
            ).fetchall()
        return [(e, v, m, json.loads(n)) for e, v, m, n in rows]
    import psycopg

    with psycopg.connect(url) as conn:
        return [
            (e, v, m, list(n))
            for e, v, m, n in conn.execute(
                "SELECT execution_id, version, event_mask, node_ids FROM wfstate_deltas"
                " ORDER BY execution_id, version"
            )
        ]


def expected_columns(records: Sequence[VersionRecord]) -> list[tuple[str, int, int, list[str]]]:
    return sorted(
        (r.execution_id, r.version, event_mask(r.event_types), r.node_ids) for r in records
    )


def test_write_batch_refuses_only_the_chains_that_fail_their_check(store: Store) -> None:
    recorder = Recorder()
    written(store, [recorder.create("b2")])  # b2 exists: the batch's creation is refused
    batch, _ = batch_of({"b1": 2, "b2": 2})
    refusals, _ = store.write_batch(batch, [False, False])
    assert isinstance(refusals["b2"], AlreadyExistsError)
    assert set(refusals) == {"b2"}
    assert store.current_versions(["b1", "b2"]) == {"b1": 3, "b2": 1}
    # The same batch again: b1's chain now conflicts (stored version 3, base 0).
    refusals, _ = store.write_batch(batch, [False, False])
    assert isinstance(refusals["b1"], AlreadyExistsError)


def test_write_batch_update_chain_conflicts_on_a_moved_base(store: Store) -> None:
    core = _core.Core()
    core.create("b1", "wf", None, None, None)
    setup = core.open_cursor(durable=True, from_oldest=True).read_batch(10, timeout=0)
    assert store.write_batch(setup, [False])[0] == {}
    cursor = core.open_cursor(durable=True)
    core.apply("b1", {"variables": {"x": 1}}, None, None)
    core.apply("b1", {"variables": {"x": 2}}, None, None)
    batch = cursor.read_batch(10, timeout=0)
    assert batch.chains()[0][1:3] == (1, 3)
    other = Recorder()
    other.core.install(loaded(store, "b1"))
    written(store, [other.update("b1", {"variables": {"y": 1}})])
    refusals, _ = store.write_batch(batch, [False])
    assert_conflict(refusals["b1"], "b1", expected=1, actual=2)
    assert store.current_versions(["b1"]) == {"b1": 2}


def test_event_mask_of_the_core_matches_the_stores_bits() -> None:
    _, records = batch_of({"m1": len(STORY)})
    for record in records:
        assert record.event_mask == event_mask(record.event_types)
    assert all(bit.bit_count() == 1 for bit in EVENT_TYPE_BITS.values())


def test_batch_skips_a_refused_lineage() -> None:
    core = _core.Core()
    cursor = core.open_cursor(durable=True)
    core.create("a", "wf", None, None, None)
    core.create("b", "wf", None, None, None)
    core.apply("a", {"variables": {"x": 1}}, None, None)
    next_seq = core.stats()["next_seq"]
    batch = cursor.read_batch(100, timeout=0, skip_before={"a": next_seq})
    assert batch.dropped == 2
    assert [chain[0] for chain in batch.chains()] == ["b"]


def big_batch(executions: int, versions: int) -> tuple[RecordBatch, list[VersionRecord]]:
    """A batch of ``executions`` chains of ``versions`` versions each (creation first)."""
    core = _core.Core(ring_capacity=executions * versions * 2 + 10)
    cursor = core.open_cursor(durable=True)
    for number in range(executions):
        core.create(f"big-{number}", "wf", None, None, None)
    for version in range(versions - 1):
        for number in range(executions):
            update: dict[str, Any] = {"variables": {"n": version}}
            if version % 4 == 0:
                update["nodes"] = {f"n{version}": "running", f'q"\\{version}': "pending"}
            core.apply(f"big-{number}", update, None, f"a{version % 3}")
    records = core.open_cursor(durable=False, from_oldest=True).read_records(10**6, timeout=0)
    return cursor.read_batch(10**6, timeout=0), records


def test_a_large_batch_writes_every_version(store: Store, store_url: str) -> None:
    """Past ``COPY_THRESHOLD`` versions PostgreSQL sends the deltas by COPY."""
    batch, records = big_batch(3, COPY_THRESHOLD // 2)
    assert len(batch) > COPY_THRESHOLD
    refusals, _ = store.write_batch(batch, [False, True, False])
    assert refusals == {}
    for number in range(3):
        execution_id = f"big-{number}"
        mine = [r for r in records if r.execution_id == execution_id]
        assert [(v, at_us, actor, d) for v, at_us, actor, d in store.read_deltas(execution_id)] == [
            (r.version, r.updated_at_us, r.actor, r.delta) for r in mine
        ]
        assert loaded(store, execution_id) == replayed(store, execution_id) == mine[-1].state
    if not store_url.startswith("memory:"):
        assert stored_columns(store_url) == expected_columns(records)


def test_a_large_batch_leaves_out_the_refused_chain(store: Store) -> None:
    recorder = Recorder()
    written(store, [recorder.create("big-1")])
    batch, _ = big_batch(2, COPY_THRESHOLD)
    refusals, _ = store.write_batch(batch, [False, False])
    assert set(refusals) == {"big-1"}
    assert isinstance(refusals["big-1"], AlreadyExistsError)
    assert stored_versions(store, "big-1") == [1]
    assert stored_versions(store, "big-0") == list(range(1, COPY_THRESHOLD + 1))


def test_conflict_with_carries_deltas_only_for_a_store_ahead() -> None:
    delta = (2, 0, None, b"")
    assert isinstance(conflict_with("e", 1, 2, [delta]), NewerVersionsConflict)
    # The store behind or level with the writer: nothing to catch up on.
    no_deltas: list[tuple[int, int, str | None, bytes]] = []
    for expected, actual in ((2, 2), (3, 2), (2, 1)):
        outcome = conflict_with("e", expected, actual, no_deltas)
        assert type(outcome) is ConflictError
    # Deltas that do not cover expected+1..actual exactly: reload instead.
    assert type(conflict_with("e", 1, 3, [delta])) is ConflictError


def test_sync_writes_store_the_columns_the_core_computed(store: Store, store_url: str) -> None:
    """The sync paths (one version alone, and several executions in one call as group
    commit sends them, chains and creations included) store what the core computed:
    deltas, snapshots, event masks and node ids with quotes and backslashes."""
    recorder = Recorder()
    records = [recorder.create("s1"), recorder.create("s2")]
    assert store.write([WriteItem(record) for record in records]) == [None, None]
    for version in range(2, 6):
        nodes = {f"n{version}": "running", f'q"\\{version}': "pending"}
        alone = recorder.update("s1", {"nodes": nodes}, actor=f"a{version}")
        first = recorder.update("s2", {"variables": {"v": version}})
        second = recorder.update("s2", {"nodes": nodes})
        snapshot = second.snapshot() if version == 4 else None
        assert store.write([WriteItem(alone)]) == [None]
        assert store.write([WriteItem(first), WriteItem(second, snapshot)]) == [None, None]
        records += [alone, first, second]
    for execution_id in ("s1", "s2"):
        mine = [r for r in records if r.execution_id == execution_id]
        assert [
            (v, at_us, actor, delta) for v, at_us, actor, delta in store.read_deltas(execution_id)
        ] == [(r.version, r.updated_at_us, r.actor, r.delta) for r in mine]
        assert loaded(store, execution_id) == replayed(store, execution_id) == mine[-1].state
    found = store.load("s2")
    assert found is not None
    assert found.snapshot_version == 7
    if not store_url.startswith("memory:"):
        assert stored_columns(store_url) == expected_columns(records)


def test_a_sqlite_store_of_schema_2_is_migrated_with_its_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Schema 3 swaps the executions' (status, updated_at_us) index for (status): a
    file written by the schema-2 code opens, migrates, keeps its data and writes on."""
    from wfstate.store import sqlite as sqlite_store

    url = f"sqlite:///{tmp_path / 'old.db'}"
    recorder = Recorder()
    with monkeypatch.context() as patch:
        patch.setattr(sqlite_store, "_MIGRATIONS", sqlite_store._MIGRATIONS[:2])
        patch.setattr(sqlite_store, "SCHEMA_VERSION", 2)
        old = open_store(url)
        assert old.schema_version() == 2
        assert old.write([WriteItem(recorder.create("e1"))]) == [None]
        old.close()
    store = open_store(url)
    try:
        assert store.schema_version() == 3
        with sqlite3.connect(tmp_path / "old.db") as connection:
            indexes = {
                name
                for (name,) in connection.execute(
                    "SELECT name FROM sqlite_master WHERE tbl_name = 'wfstate_executions'"
                    " AND type = 'index' AND sql IS NOT NULL"
                )
            }
        assert "wfstate_executions_status" in indexes
        assert "wfstate_executions_status_updated" not in indexes
        assert store.list_execution_ids(statuses=["running"]) == ["e1"]
        update = recorder.update("e1", {"status": "suspended"})
        assert store.write([WriteItem(update)]) == [None]
        assert store.write([WriteItem(recorder.update("e1", {"variables": {"x": 1}}))]) == [None]
        assert store.list_execution_ids(statuses=["suspended"]) == ["e1"]
        assert store.list_execution_ids(statuses=["running"]) == []
        assert loaded(store, "e1") == replayed(store, "e1")
    finally:
        store.close()


def test_the_stored_status_is_the_last_version_s_on_every_write_path(store: Store) -> None:
    """A write whose last version leaves the status as an earlier version of the same
    write set it still stores that status (SQLite leaves the status out of its UPDATE
    only when no version of the chain changed it): one version alone, a chain in one
    ``write`` (group commit) and a write-behind batch."""
    recorder = Recorder()
    written(store, [recorder.create(execution_id) for execution_id in ("one", "chain", "kept")])
    assert store.write([WriteItem(recorder.update("one", {"status": "suspended"}))]) == [None]
    assert store.write([WriteItem(recorder.update("one", {"variables": {"x": 1}}))]) == [None]
    chain = [
        recorder.update("chain", {"status": "suspended"}),
        recorder.update("chain", {"variables": {"x": 1}}),
    ]
    kept = recorder.update("kept", {"variables": {"x": 1}})
    assert store.write([*(WriteItem(r) for r in chain), WriteItem(kept)]) == [None] * 3
    core = _core.Core()
    cursor = core.open_cursor(durable=True)
    core.create("behind", "wf", None, None, None)
    assert store.write_batch(cursor.read_batch(10, timeout=0), [False]) == ({}, [0])
    core.apply("behind", {"status": "suspended"}, None, None)
    core.apply("behind", {"variables": {"x": 1}}, None, None)
    assert store.write_batch(cursor.read_batch(10, timeout=0), [False]) == ({}, [0])
    assert store.list_execution_ids(statuses=["suspended"]) == ["one", "chain", "behind"]
    assert store.list_execution_ids(statuses=["running"]) == ["kept"]
    for execution_id in ("one", "chain", "kept", "behind"):
        assert loaded(store, execution_id) == replayed(store, execution_id)
