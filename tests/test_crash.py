"""SIGKILL at random moments loses nothing acknowledged and leaves a consistent store.

A child process (``crash_child.py``) updates a few executions and prints each
acknowledged change; the parent kills it with SIGKILL at a random moment (while it
writes, or while it is still opening and recovering the store), then checks the
store it left:

- every acknowledged version is stored with the value it was acknowledged with (async
  mode: every one acknowledged before the last ``flush()`` or critical update; the
  tail after it may be lost, but what is stored of it must be what was acknowledged);
- each execution holds versions 1..n, no gap;
- replaying every delta from version 1, loading from the newest snapshot, and the
  state a freshly opened manager recovers are the same state.

The next child then goes on from what the store holds, so later rounds also check
that recovery after a crash writes on correctly. Seeds are fixed: a failure names its
round and replays the same way.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from crash_child import EXECUTIONS
from durable_support import loaded, replayed, stored_versions
from wfstate import StateManager, _core
from wfstate.store import Store, open_store

pytestmark = pytest.mark.slow

CHILD = Path(__file__).resolve().parent / "crash_child.py"
#: Read by the child: the PostgreSQL store's COPY_THRESHOLD to use.
COPY_THRESHOLD_ENV = "WFSTATE_TEST_COPY_THRESHOLD"

Durability = Literal["sync", "async"]


@dataclass(frozen=True, slots=True)
class Ack:
    execution_id: str
    version: int
    value: str
    critical: bool


class Child:
    """One run of ``crash_child.py``, started ahead of time and killed on demand."""

    def __init__(self, url: str, durability: Durability, seed: int, threads: int = 1) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(CHILD), url, durability, str(seed), str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.loaded = threading.Event()
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if line == "loaded\n":
                self.loaded.set()
            elif line == "ready\n":
                self.ready.set()

    def go(self) -> None:
        assert self.loaded.wait(60), f"the child did not start: {self.stop()}"
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def stop(self) -> str:
        """SIGKILL (if still running); returns what it wrote to stderr."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self._reader.join(timeout=30)
        assert self.process.stderr is not None
        errors = self.process.stderr.read()
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
        return errors


def parse(lines: list[str], durability: Durability) -> tuple[list[Ack], list[Ack]]:
    """The acks that must be durable, and those (async tail) that may be lost."""
    acks: list[Ack] = []
    durable_count = 0
    for line in lines:
        if not line.endswith("\n"):
            break  # cut by the kill: never acknowledged
        words = line.split()
        if words[0] == "ack":
            acks.append(Ack(words[1], int(words[2]), words[3], words[4] == "1"))
            if durability == "sync" or acks[-1].critical:
                durable_count = len(acks)
        elif words[0] == "flushed":
            durable_count = len(acks)
    return acks[:durable_count], acks[durable_count:]


def stored_values(store: Store, execution_id: str) -> dict[int, str]:
    """The ``value`` variable each stored version set, from the stored events."""
    values: dict[int, str] = {}
    for event in _core.decode_history(execution_id, store.read_deltas(execution_id)):
        if event.type == "execution_created":
            values[event.version] = event.data["variables"]["value"]
        elif event.type == "variables_changed":
            values[event.version] = event.data["set"]["value"]
    return values


@dataclass
class Ledger:
    """Every version known to be stored, with its value, across rounds."""

    values: dict[tuple[str, int], str] = field(default_factory=dict)
    lost_tail: int = 0
    checked_acks: int = 0

    def check_round(self, url: str, durable: list[Ack], tentative: list[Ack], context: str) -> None:
        store = open_store(url)
        try:
            self._check_store(store, durable, tentative, context)
        finally:
            store.close()
        # What a manager recovers from the crashed store is the stored state too.
        with StateManager.open(url) as manager:
            recovered = {state.execution_id: state for state in manager.recover()}
            store = open_store(url)
            try:
                for execution_id in EXECUTIONS:
                    if not store.current_versions([execution_id]):
                        continue
                    state = manager.get_state(execution_id)
                    assert recovered[execution_id] == state, context
                    assert state == replayed(store, execution_id), context
            finally:
                store.close()

    def _check_store(
        self, store: Store, durable: list[Ack], tentative: list[Ack], context: str
    ) -> None:
        current = store.current_versions(list(EXECUTIONS))
        for execution_id, version in current.items():
            # No gap, and the three ways of reading the state agree.
            assert stored_versions(store, execution_id) == list(range(1, version + 1)), context
            assert replayed(store, execution_id) == loaded(store, execution_id), context
        stored = {
            (execution_id, version): value
            for execution_id in current
            for version, value in stored_values(store, execution_id).items()
        }
        for ack in durable:
            key = (ack.execution_id, ack.version)
            assert stored.get(key) == ack.value, f"{context}: acknowledged {ack} is not stored"
            self.checked_acks += 1
        for ack in tentative:
            key = (ack.execution_id, ack.version)
            if key in stored:
                assert stored[key] == ack.value, f"{context}: {ack} stored with another value"
            else:
                self.lost_tail += 1
        # Versions above what is stored now were lost (async tail): the next run
        # writes them anew. Everything older must be exactly as before.
        for key, value in list(self.values.items()):
            execution_id, version = key
            if version > current.get(execution_id, 0):
                del self.values[key]
                continue
            assert stored[key] == value, f"{context}: version {key} changed after a crash"
        self.values.update(stored)


def crash_rounds(
    url: str, durability: Durability, rounds: int, seed: int, threads: int = 1
) -> tuple[Ledger, list[float]]:
    rng = random.Random(seed)
    ledger = Ledger()
    moments: list[float] = []
    child = Child(url, durability, seed * 1000, threads)
    try:
        for round_number in range(rounds):
            context = f"{durability} round {round_number} (seed {seed})"
            child.go()
            if rng.random() < 0.15:
                # While it opens the store and recovers, or has just begun writing.
                delay = rng.uniform(0, 0.15)
            else:
                assert child.ready.wait(60), f"{context}: {child.stop()}"
                delay = rng.uniform(0.01, 0.3)
            time.sleep(delay)
            moments.append(delay)
            if child.process.poll() is not None:
                pytest.fail(f"{context}: the child died by itself: {child.stop()}")
            errors = child.stop()
            assert child.process.returncode == -signal.SIGKILL, errors
            lines = child.lines
            # The next child imports while this round is checked.
            child = Child(url, durability, seed * 1000 + round_number + 1, threads)
            durable, tentative = parse(lines, durability)
            ledger.check_round(url, durable, tentative, context)
    finally:
        child.stop()
    return ledger, moments


@pytest.mark.parametrize(
    ("backend", "durability", "rounds", "by_copy", "threads"),
    [
        # At least 50 kills per backend and mode.
        ("sqlite", "sync", 50, False, 1),
        # 4 threads, each on executions of its own: the kills land while their
        # writes share group commits (on SQLite, the native writer's).
        ("sqlite", "sync", 25, False, 4),
        ("postgresql", "sync", 30, False, 1),
        ("postgresql", "sync", 20, False, 4),
        ("sqlite", "async", 50, False, 1),
        ("postgresql", "async", 44, False, 1),
        # Every write-behind batch sends its deltas by COPY (the threshold lowered
        # in the child: its batches are small).
        ("postgresql", "async", 6, True, 1),
    ],
)
def test_sigkill_loses_nothing_acknowledged(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    backend: str,
    durability: Durability,
    rounds: int,
    by_copy: bool,
    threads: int,
) -> None:
    if by_copy:
        monkeypatch.setenv(COPY_THRESHOLD_ENV, "1")
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path}/crash.db"
    else:
        url = request.getfixturevalue("postgres_test_url")
    ledger, _ = crash_rounds(url, durability, rounds, seed=rounds, threads=threads)
    # The rounds did write: acknowledged versions were there to check.
    assert ledger.checked_acks >= rounds
    assert len(ledger.values) > rounds
    if durability == "sync":
        assert ledger.lost_tail == 0
