"""The process ``test_crash.py`` kills: it updates executions until SIGKILL stops it.

Run as ``python crash_child.py URL DURABILITY SEED [THREADS]``. It imports everything,
prints ``loaded`` and waits for a line on stdin (so the parent can start it ahead of
time), opens the store, makes sure ``EXECUTIONS`` exist, prints ``ready`` and then
updates them at random forever, printing one line per acknowledged change, flushed
at once. With THREADS above 1 (sync mode only), each thread updates executions of
its own, so their sync writes share group commits:

- ``ack <execution_id> <version> <value> <critical>``: ``update_state`` returned
  ``version`` for an update that set the variable ``value`` (``critical`` is 1 when
  the update changed the status, which async mode writes before returning);
- ``flushed``: ``flush()`` returned (async mode): every ``ack`` above is durable.

It must never print an ``ack`` before the call returned, nor catch a failure and go
on as if it had been stored.
"""

from __future__ import annotations

import os
import random
import sys
import threading
from typing import Literal

from wfstate import ExecutionStatus, NotFoundError, SnapshotPolicy, StateManager

EXECUTIONS = ("crash-0", "crash-1", "crash-2", "crash-3")
#: Async mode: call flush() after this many updates.
FLUSH_EVERY = 25
#: Snapshots now and then, so that loads and replays from version 1 take different paths.
SNAPSHOT_POLICY = SnapshotPolicy(every_versions=7)


_SAYING = threading.Lock()


def say(line: str) -> None:
    with _SAYING:  # one whole line at a time, whichever thread says it
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def _exit_on_error(args: threading.ExceptHookArgs) -> None:
    threading.__excepthook__(args)  # the traceback, to stderr
    sys.stderr.flush()
    os._exit(1)


def main(url: str, durability: Literal["sync", "async"], seed: int, threads: int = 1) -> None:
    assert threads == 1 or durability == "sync", "acks of threads are ordered only in sync mode"
    assert 1 <= threads <= len(EXECUTIONS), "each thread needs executions of its own"
    # A worker thread that raises must end the process (the parent sees it died by
    # itself), not leave the others writing as if nothing happened.
    threading.excepthook = _exit_on_error
    threshold = os.environ.get("WFSTATE_TEST_COPY_THRESHOLD")
    if threshold is not None:
        import wfstate.store.postgres

        wfstate.store.postgres.COPY_THRESHOLD = int(threshold)
    say("loaded")
    sys.stdin.readline()
    manager = StateManager.open(
        url, durability=durability, flush_interval=0.02, snapshot_policy=SNAPSHOT_POLICY
    )
    for execution_id in EXECUTIONS:
        try:
            manager.get_state(execution_id)
        except NotFoundError:
            state = manager.create_execution(
                execution_id, workflow_id="crash", variables={"value": f"{seed}-created"}
            )
            say(f"ack {execution_id} {state.version} {seed}-created 0")
    if durability == "async":
        manager.flush()
        say("flushed")
    say("ready")
    if threads == 1:
        update_forever(manager, durability, seed, EXECUTIONS)
        return
    workers = [
        threading.Thread(
            target=update_forever,
            args=(manager, durability, seed * 100 + number, EXECUTIONS[number::threads]),
            daemon=True,
        )
        for number in range(threads)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def update_forever(
    manager: StateManager,
    durability: Literal["sync", "async"],
    seed: int,
    executions: tuple[str, ...],
) -> None:
    """Update ``executions`` at random until killed (values are unique per seed)."""
    rng = random.Random(seed)
    counter = 0
    while True:
        counter += 1
        execution_id = rng.choice(executions)
        value = f"{seed}-{counter}"
        update: dict[str, object] = {"variables": {"value": value}}
        critical = rng.random() < 0.1
        if critical:
            status = manager.get_state(execution_id).status
            update["status"] = (
                ExecutionStatus.SUSPENDED
                if status is ExecutionStatus.RUNNING
                else ExecutionStatus.RUNNING
            )
        version = manager.update_state(execution_id, update)
        say(f"ack {execution_id} {version} {value} {int(critical)}")
        if durability == "async" and counter % FLUSH_EVERY == 0:
            manager.flush()
            say("flushed")


if __name__ == "__main__":
    mode = sys.argv[2]
    assert mode in ("sync", "async")
    threads = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    main(sys.argv[1], "sync" if mode == "sync" else "async", int(sys.argv[3]), threads)
