"""One worker process of the chaos run (``chaos.py``): a stand-in for an engine instance.

It opens the store in sync mode, recovers what its instance id owned (re-acquiring
with new fencing tokens), then until the stop file appears does, on random
executions of the shared set:

- ``transact`` increments of its own counter variable (``w<k>``): read-modify-write
  cycles that conflict with the other workers' and must never lose one;
- node work under a lease: acquire (or reuse a held lease), move a node of its own
  running then completed with ``lease=``, and release it or keep it (a kept lease
  runs out, which makes the execution an orphan for someone else);
- ``claim_orphans``: take over executions whose owner's lease ran out (dead or not)
  and do one node's work under the new lease.

Every acknowledged write is appended to the ack log as one line
(``ack <execution> <version> <actor> <kind>``) before the next call, so a SIGKILL
loses no acknowledgement (the kernel keeps what was written to the file). The actor
names the call uniquely: the checker finds that actor at that version in the store.
Counters (conflicts met and resolved, leases lost, takeovers) go to the same log as
``stats`` lines, cumulative, so the last one a killed worker wrote is a lower bound.
A conflict given up on is logged as ``given-up <execution> <actor> <error>``.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from typing import IO, Any

from wfstate import (
    ConflictError,
    InvalidTransitionError,
    Lease,
    LeaseHeldError,
    LeaseLostError,
    StateManager,
    StoreUnavailableError,
    WorkflowState,
)

LEASE_TTL = 1.0


class Worker:
    def __init__(self, arguments: argparse.Namespace) -> None:
        self.number: int = arguments.worker
        self.owner = f"w{self.number}"
        self.counter = f"w{self.number}"
        self.incarnation: int = arguments.incarnation
        self.execution_ids = [f"exec-{n:03d}" for n in range(arguments.executions)]
        self.stop_file: str = arguments.stop_file
        self.rng = random.Random(arguments.seed)
        self.log: IO[str] = open(arguments.log, "a", buffering=1)  # noqa: SIM115
        self.operations = 0
        self.held: dict[str, Lease] = {}
        self.counts = {
            "conflicts_unresolved": 0,
            "leases_lost": 0,
            "takeovers": 0,
            "store_errors": 0,
        }
        self.sm = self._open(arguments.url)

    def _open(self, url: str) -> StateManager:
        while True:
            try:
                return StateManager.open(url, connect_timeout=3)
            except StoreUnavailableError:
                time.sleep(0.2)

    def actor(self, kind: str) -> str:
        self.operations += 1
        return f"{self.owner}.{self.incarnation}.{self.operations}.{kind}"

    def ack(self, execution_id: str, version: int, actor: str, kind: str) -> None:
        self.log.write(f"ack {execution_id} {version} {actor} {kind}\n")

    def given_up(self, execution_id: str, actor: str, error: Exception) -> None:
        """Count a conflict given up on and log what it was, for the report."""
        self.counts["conflicts_unresolved"] += 1
        what = " ".join(f"{type(error).__name__}: {error}".split())
        self.log.write(f"given-up {execution_id} {actor} {what}\n")

    def stats(self) -> None:
        stats = self.sm.stats()
        self.log.write(
            f"stats {self.owner} {self.incarnation} {stats['conflicts']} "
            f"{stats['conflicts_resolved']} {self.counts['conflicts_unresolved']} "
            f"{self.counts['leases_lost']} {self.counts['takeovers']} "
            f"{self.counts['store_errors']}\n"
        )

    def run(self) -> None:
        for state in self._retrying(lambda: self.sm.recover(owner=self.owner, ttl=LEASE_TTL)):
            lease = self.sm.get_lease(state.execution_id)
            if lease is not None and lease.owner == self.owner:
                self.held[state.execution_id] = lease
        self.log.write(f"started {self.owner} {self.incarnation} recovered {len(self.held)}\n")
        while not os.path.exists(self.stop_file):
            roll = self.rng.random()
            try:
                if roll < 0.6:
                    self.increment(self.rng.choice(self.execution_ids))
                elif roll < 0.9:
                    self.node_work(self.rng.choice(self.execution_ids))
                else:
                    self.rescue()
            except StoreUnavailableError:
                self.counts["store_errors"] += 1
                time.sleep(0.1)
            except LeaseLostError as lost:
                self.counts["leases_lost"] += 1
                self.held.pop(lost.execution_id, None)
            if self.operations % 20 == 0:
                self.stats()
        self.stats()
        self.sm.close()

    def _retrying(self, call: Any) -> Any:
        while True:
            try:
                return call()
            except StoreUnavailableError:
                time.sleep(0.2)

    def increment(self, execution_id: str) -> None:
        counter = self.counter

        def bump(state: WorkflowState) -> dict[str, Any]:
            return {"variables": {counter: state.variables.get(counter, 0) + 1}}

        actor = self.actor("count")
        try:
            version = self.sm.transact(execution_id, bump, retries=100, actor=actor)
        except ConflictError as error:
            self.given_up(execution_id, actor, error)
            return
        self.ack(execution_id, version, actor, "count")

    def node_work(self, execution_id: str) -> None:
        lease = self.held.get(execution_id)
        if lease is None:
            try:
                lease = self.sm.acquire(execution_id, owner=self.owner, ttl=LEASE_TTL)
            except LeaseHeldError:
                return
            self.held[execution_id] = lease
        self.leased_node(execution_id, lease)
        if self.rng.random() < 0.5:
            self.sm.release(lease)
            del self.held[execution_id]

    def leased_node(self, execution_id: str, lease: Lease) -> None:
        node = f"{self.owner}-{self.incarnation}-{self.operations}"
        for status in ("running", "completed"):
            actor = self.actor("node")
            try:
                version = self.sm.update_state(
                    execution_id, {"nodes": {node: status}}, actor=actor, lease=lease
                )
            except (ConflictError, InvalidTransitionError) as error:
                self.given_up(execution_id, actor, error)
                return
            self.ack(execution_id, version, actor, "node")

    def rescue(self) -> None:
        for state in self.sm.claim_orphans(owner=self.owner, limit=2, ttl=LEASE_TTL):
            lease = self.sm.get_lease(state.execution_id)
            if lease is None or lease.owner != self.owner:
                continue
            self.counts["takeovers"] += 1
            self.held[state.execution_id] = lease
            self.leased_node(state.execution_id, lease)
            self.sm.release(lease)
            del self.held[state.execution_id]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--incarnation", type=int, required=True)
    parser.add_argument("--executions", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--stop-file", required=True)
    Worker(parser.parse_args()).run()


if __name__ == "__main__":
    main()
