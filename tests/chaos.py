"""The chaos run: worker processes sharing executions, killed and restarted at random.

``run_chaos`` creates the executions, starts ``workers`` processes of
``chaos_worker.py`` on one store, SIGKILLs a random worker every ``kill_every``
seconds (restarting it as a new incarnation of the same instance id, which then
recovers what it owned), optionally restarts PostgreSQL once half-way, stops the
workers and runs the checker. ``check_store`` verifies, for every execution:

- no acknowledged update lost: each ack ``(execution, version, actor)`` a worker
  logged is stored at that version with that actor;
- versions contiguous from 1 to the row's version, and replaying every delta from
  version 1 gives exactly the state the store loads (snapshot + deltas);
- no lost increment: each worker's counter goes 1, 2, 3, ... in version order (each
  increment was based on the previous one) and ends at the state's value;
- fencing: each lease token was written under by one owner only, and tokens never go
  back in version order (no write under an older lease after a newer grant).

``python tests/chaos.py`` (``make chaos``) runs a longer version and prints the counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import IO

from wfstate import StateManager, _core
from wfstate.store import Store, open_store

TESTS_DIR = Path(__file__).resolve().parent
WORKER = TESTS_DIR / "chaos_worker.py"


@dataclasses.dataclass
class ChaosReport:
    executions: int = 0
    versions: int = 0
    acknowledged: int = 0
    found: int = 0
    lost: list[str] = dataclasses.field(default_factory=list)
    inconsistent: list[str] = dataclasses.field(default_factory=list)
    conflicts: int = 0
    conflicts_resolved: int = 0
    conflicts_unresolved: int = 0
    given_up: list[str] = dataclasses.field(default_factory=list)
    leases_lost: int = 0
    lease_takeovers: int = 0
    claimed_orphans: int = 0
    store_errors: int = 0
    kills: int = 0
    restarts_of_postgres: int = 0
    incarnations: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        return "\n".join(
            [
                f"executions checked      {self.executions}",
                f"versions stored         {self.versions}",
                f"updates acknowledged    {self.acknowledged}",
                f"  found                 {self.found}",
                f"  lost                  {len(self.lost)}",
                f"inconsistent            {len(self.inconsistent)}",
                f"conflicts met           {self.conflicts}",
                f"  resolved (retry/merge) {self.conflicts_resolved}",
                f"  given up              {self.conflicts_unresolved}",
                *(f"    {line}" for line in self.given_up[:20]),
                f"  cut short by a store error or a kill "
                f"{self.conflicts - self.conflicts_resolved - self.conflicts_unresolved}",
                f"lease takeovers         {self.lease_takeovers}",
                f"  orphans claimed       {self.claimed_orphans}",
                f"  writes/renewals fenced {self.leases_lost}",
                f"store errors seen       {self.store_errors}",
                f"workers killed (-9)     {self.kills}",
                f"worker incarnations     {self.incarnations}",
                f"PostgreSQL restarts     {self.restarts_of_postgres}",
                f"run time                {self.seconds:.1f} s",
            ]
        )


def execution_ids(count: int) -> list[str]:
    return [f"exec-{n:03d}" for n in range(count)]


def create_executions(url: str, count: int) -> None:
    with StateManager.open(url) as sm:
        for execution_id in execution_ids(count):
            sm.create_execution(execution_id, workflow_id="chaos", variables={"created": True})


class Workers:
    """The worker processes: started, killed and restarted by instance number."""

    def __init__(self, url: str, count: int, executions: int, directory: Path, seed: int) -> None:
        self.url = url
        self.executions = executions
        self.directory = directory
        self.stop_file = directory / "stop"
        self.rng = random.Random(seed)
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self.incarnations: dict[int, int] = defaultdict(int)
        for number in range(count):
            self.start(number)

    def log(self, number: int) -> Path:
        return self.directory / f"worker-{number}.log"

    def start(self, number: int) -> None:
        self.incarnations[number] += 1
        with open(self.directory / f"worker-{number}.err", "ab") as errors:
            self.processes[number] = self._spawn(number, errors)

    def _spawn(self, number: int, errors: IO[bytes]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                f"--url={self.url}",
                f"--worker={number}",
                f"--incarnation={self.incarnations[number]}",
                f"--executions={self.executions}",
                f"--seed={self.rng.randrange(2**32)}",
                f"--log={self.log(number)}",
                f"--stop-file={self.stop_file}",
            ],
            stderr=errors,
        )

    def kill_one(self) -> None:
        number = self.rng.choice(sorted(self.processes))
        process = self.processes[number]
        process.send_signal(signal.SIGKILL)
        process.wait()
        self.start(number)

    def crashed(self) -> list[int]:
        """Workers that exited on their own before the stop (a bug: they must not)."""
        return [n for n, p in self.processes.items() if p.poll() is not None]

    def stop(self, timeout: float = 60.0) -> list[int]:
        self.stop_file.touch()
        deadline = time.monotonic() + timeout
        stuck = []
        for number, process in self.processes.items():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                stuck.append(number)
                process.kill()
                process.wait()
        return stuck

    def failed(self) -> dict[int, int]:
        return {n: p.returncode for n, p in self.processes.items() if p.returncode != 0}


def read_logs(directory: Path, report: ChaosReport) -> list[tuple[str, int, str]]:
    """The acks of every worker; their last stats lines summed into ``report``, and
    the conflicts they gave up on listed in it."""
    acks: list[tuple[str, int, str]] = []
    last_stats: dict[tuple[str, str], list[int]] = {}
    for path in sorted(directory.glob("worker-*.log")):
        for line in path.read_text().splitlines():
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "ack" and len(parts) == 5:
                acks.append((parts[1], int(parts[2]), parts[3]))
            elif parts[0] == "given-up":
                report.given_up.append(line.removeprefix("given-up "))
            elif parts[0] == "stats" and len(parts) == 9:
                last_stats[(parts[1], parts[2])] = [int(p) for p in parts[3:]]
    for conflicts, resolved, unresolved, lost, takeovers, store_errors in last_stats.values():
        report.conflicts += conflicts
        report.conflicts_resolved += resolved
        report.conflicts_unresolved += unresolved
        report.leases_lost += lost
        report.claimed_orphans += takeovers
        report.store_errors += store_errors
    return acks


def check_store(
    store: Store, ids: list[str], acks: list[tuple[str, int, str]], report: ChaosReport
) -> ChaosReport:
    """Verify every execution (see the module docs) into ``report``; acks are
    (execution, version, actor)."""
    report.executions = len(ids)
    report.acknowledged = len(acks)
    acked_by_execution: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for execution_id, version, actor in acks:
        acked_by_execution[execution_id].append((version, actor))
    current = store.current_versions(ids)
    for execution_id in ids:
        deltas = store.read_deltas(execution_id)
        versions = [version for version, _, _, _ in deltas]
        report.versions += len(versions)
        problem = _check_execution(store, execution_id, deltas, current.get(execution_id))
        if problem:
            report.inconsistent.append(f"{execution_id}: {problem}")
        actors = {version: actor for version, _, actor, _ in deltas}
        for version, actor in acked_by_execution.get(execution_id, []):
            if actors.get(version) == actor:
                report.found += 1
            else:
                report.lost.append(
                    f"{execution_id} v{version} by {actor}: stored {actors.get(version)!r}"
                )
        log = store.lease_log(execution_id)
        owners_of_token: dict[int, set[str]] = defaultdict(set)
        previous_token = 0
        previous_owner: str | None = None
        for version, owner, token in log:
            if token is None or owner is None:
                continue
            owners_of_token[token].add(owner)
            if token < previous_token:
                report.inconsistent.append(
                    f"{execution_id} v{version}: written under token {token} after {previous_token}"
                )
            if token > previous_token and previous_owner is not None and owner != previous_owner:
                report.lease_takeovers += 1
            previous_token, previous_owner = max(previous_token, token), owner
        for token, owners in owners_of_token.items():
            if len(owners) > 1:
                report.inconsistent.append(
                    f"{execution_id}: token {token} written under by {sorted(owners)}"
                )
    return report


def _check_execution(
    store: Store,
    execution_id: str,
    deltas: list[tuple[int, int, str | None, bytes]],
    row_version: int | None,
) -> str | None:
    versions = [version for version, _, _, _ in deltas]
    if versions != list(range(1, len(versions) + 1)):
        return f"versions not contiguous: {versions[:5]}..."
    if row_version != len(versions):
        return f"row at version {row_version}, deltas up to {len(versions)}"
    replay = _core.rebuild(
        execution_id, None, [(version, at_us, delta) for version, at_us, _, delta in deltas]
    )
    found = store.load(execution_id)
    if found is None:
        return "load found nothing"
    if _core.rebuild(execution_id, found.snapshot, found.deltas) != replay:
        return "replay differs from snapshot + deltas"
    events = _core.decode_history(execution_id, deltas, None, None, None, None, None, None)
    counters: dict[str, int] = {}
    for event in events:
        if str(event.type) != "variables_changed":
            continue
        for name, value in event.data.get("set", {}).items():
            if not name.startswith("w"):
                continue
            expected = counters.get(name, 0) + 1
            if value != expected:
                return f"v{event.version}: {name} set to {value}, expected {expected} (lost update)"
            counters[name] = value
    for name, value in counters.items():
        if replay.variables.get(name) != value:
            return f"{name} is {replay.variables.get(name)} in the state, history says {value}"
    return None


def run_chaos(
    url: str,
    directory: Path,
    *,
    workers: int = 8,
    executions: int = 100,
    duration: float = 30.0,
    kill_every: tuple[float, float] = (1.0, 3.0),
    restart_postgres: Callable[[], None] | None = None,
    seed: int | None = None,
) -> ChaosReport:
    """Run the chaos (see the module docs) and return the checker's report."""
    seed = random.randrange(2**32) if seed is None else seed
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    create_executions(url, executions)
    started = time.monotonic()
    pool = Workers(url, workers, executions, directory, seed)
    kills = 0
    restarted = 0
    crashed: list[int] = []
    try:
        deadline = started + duration
        restart_at = started + duration / 2 if restart_postgres is not None else None
        next_kill = time.monotonic() + rng.uniform(*kill_every)
        while time.monotonic() < deadline:
            time.sleep(0.05)
            crashed = pool.crashed()
            if crashed:
                break
            now = time.monotonic()
            if restart_at is not None and now >= restart_at:
                assert restart_postgres is not None
                restart_postgres()
                restarted += 1
                restart_at = None
            if now >= next_kill:
                pool.kill_one()
                kills += 1
                next_kill = now + rng.uniform(*kill_every)
    finally:
        stuck = pool.stop()
    elapsed = time.monotonic() - started
    store = open_store(url)
    try:
        report = ChaosReport()
        acks = read_logs(directory, report)
        checked = check_store(store, execution_ids(executions), acks, report)
    finally:
        store.close()
    checked.kills = kills
    checked.restarts_of_postgres = restarted
    checked.incarnations = sum(pool.incarnations.values())
    checked.seconds = elapsed
    if crashed:
        checked.inconsistent.append(f"workers exited on their own: {crashed} (seed {seed})")
    if stuck:
        checked.inconsistent.append(f"workers did not stop: {stuck} (seed {seed})")
    failed = {n: code for n, code in pool.failed().items() if n not in stuck}
    if failed:
        checked.inconsistent.append(f"workers failed: {failed} (seed {seed}); see {directory}")
    return checked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--executions", type=int, default=100)
    parser.add_argument("--duration", type=float, default=300.0)
    parser.add_argument("--directory", type=Path, default=Path("chaos-run"))
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--no-restart", action="store_true", help="do not restart PostgreSQL half-way"
    )
    parser.add_argument(
        "--database",
        default="wfstate_chaos",
        help="the PostgreSQL database to (re)create for the run (one per concurrent run)",
    )
    arguments = parser.parse_args()
    sys.path.insert(0, str(TESTS_DIR))
    import pg_control

    directory: Path = arguments.directory.resolve()
    if directory.exists():
        for path in directory.iterdir():
            path.unlink()
    restart: Callable[[], None] | None = None
    if arguments.backend == "postgresql":
        url = pg_control.fresh_database(arguments.database)
        if not arguments.no_restart:
            restart = lambda: pg_control.restart(url)  # noqa: E731
    else:
        directory.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{directory}/chaos.db"
    report = run_chaos(
        url,
        directory,
        workers=arguments.workers,
        executions=arguments.executions,
        duration=arguments.duration,
        restart_postgres=restart,
        seed=arguments.seed,
    )
    print(report.summary())
    for line in (report.lost + report.inconsistent)[:20]:
        print("  ", line)
    sys.exit(1 if report.lost or report.inconsistent else 0)


if __name__ == "__main__":
    main()
