"""The README's examples run, and the demo's summary adds up.

Every ```python block of README.md is executed in a fresh namespace, so the examples
cannot rot. The demo runs small: 60 executions on SQLite, its worker process killed
(SIGKILL) at 40% and the rest recovered; its printed summary is parsed back: each table
must agree with the others and with the number of executions, and no acknowledged
update may be lost across the crash. A quicker run on memory:// has no crash.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from wfstate import demo

README = Path(__file__).resolve().parent.parent / "README.md"
_PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def _python_blocks() -> list[tuple[int, str]]:
    """Each ```python block of the README, with the line it starts on."""
    text = README.read_text(encoding="utf-8")
    return [
        (text.count("\n", 0, match.start()) + 1, match.group(1))
        for match in _PYTHON_BLOCK.finditer(text)
    ]


def test_readme_has_python_examples() -> None:
    assert _python_blocks(), "README.md holds no ```python block"


@pytest.mark.parametrize(
    ("line", "code"),
    _python_blocks(),
    ids=[f"README.md:{line}" for line, _ in _python_blocks()],
)
def test_readme_example_runs(line: int, code: str) -> None:
    # Blank lines before the code keep the line numbers of tracebacks those of README.md.
    compiled = compile("\n" * line + code, str(README), "exec")
    exec(compiled, {"__name__": f"readme_line_{line}"})


# -- the demo ----------------------------------------------------------------------

EXECUTIONS = 60
KILL_AFTER = 24  # --crash-at=0.4 of 60
_SMALL_RUN = (
    f"--executions={EXECUTIONS}",
    "--seed=7",
    "--threads=3",
    "--failure-rate=0.3",
    "--retry-failure-rate=0.6",
    "--suspend-rate=0.2",
    "--cancel-rate=0.1",
    "--approval-delay=5",
    "--progress=lines",
)
_STATUS_LINE = re.compile(r"^  (running|suspended|completed|failed|cancelled|total)\s+([\d,]+)")
_NODE_LINE = re.compile(
    r"^  (fetch|validate|enrich|charge|notify|archive)\s+"
    r"([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s"
)


def _number(text: str) -> int:
    return int(text.replace(",", ""))


def _section(output: str, title: str) -> list[str]:
    """The lines of a section of the summary, up to the next blank line."""
    lines = output.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith(title))
    section = []
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        section.append(line)
    return section


def _values(output: str, pattern: str) -> tuple[int, ...]:
    match = re.search(pattern, output, re.MULTILINE)
    assert match is not None, f"{pattern!r} not in the summary"
    return tuple(_number(group) for group in match.groups())


def _value(output: str, pattern: str) -> int:
    [value] = _values(output, pattern)
    return value


def _run_demo(*argv: str) -> tuple[int, str, str]:
    """``demo.main(argv)``: its exit status, summary (stdout) and progress (stderr)."""
    stdout = io.StringIO()
    stderr = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = demo.main(list(argv))
    return status, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The summary of a small run on SQLite whose worker process is killed at 40%,
    failure-prone enough to have a failed execution."""
    store = tmp_path_factory.mktemp("demo") / "demo.db"
    status, output, progress = _run_demo(
        *_SMALL_RUN, f"--store=sqlite:///{store}", "--crash-at=0.4"
    )
    assert status == 0, output
    # Not a terminal: the progress is plain lines, with the kill in between, and the
    # last one counts every execution of both processes.
    lines = progress.splitlines()
    assert any(line.startswith("wfstate demo: killed worker process") for line in lines)
    assert lines[-1].startswith(f"wfstate demo: {EXECUTIONS}/{EXECUTIONS} 100%")
    return output


def test_demo_status_counts_sum_to_executions(demo_output: str) -> None:
    counts = {
        match.group(1): _number(match.group(2))
        for line in _section(demo_output, "Executions by status")
        if (match := _STATUS_LINE.match(line))
    }
    assert counts["total"] == EXECUTIONS
    assert sum(count for status, count in counts.items() if status != "total") == EXECUTIONS
    # Every execution ends, the recovered ones included: none is left running or suspended.
    assert counts["running"] == counts["suspended"] == 0
    assert counts["failed"] > 0


def test_demo_node_table_adds_up(demo_output: str) -> None:
    rows = [
        match.groups()
        for line in _section(demo_output, "Nodes")
        if (match := _NODE_LINE.match(line))
    ]
    assert [row[0] for row in rows] == [spec.node_id for spec in demo.WORKFLOW]
    failed_attempts_total = 0
    for node_id, *figures in rows:
        started, completed, skipped, attempts, retries, failed = map(_number, figures)
        assert attempts == completed + failed, node_id
        assert retries == attempts - started, node_id
        assert completed <= started <= EXECUTIONS, node_id
        assert started + skipped <= EXECUTIONS, node_id
        failed_attempts_total += failed
    # Each failed attempt records exactly one error event (an attempt lost with the
    # killed worker too).
    error_total = _value(demo_output, r"^Errors by type.*(?:\n  .*)*?\n  total\s+([\d,]+)")
    assert error_total == failed_attempts_total > 0
    # Fetch runs first in every execution but the ones cancelled before it.
    fetch_started = _number(rows[0][1])
    assert fetch_started >= EXECUTIONS - _value(demo_output, r"^  cancelled\s+([\d,]+)")


def test_demo_writes_add_up(demo_output: str) -> None:
    # Each row: total, by the killed worker process, after the recovery.
    rows = {
        name: _values(demo_output, rf"^  {name}\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)")
        for name in (
            "creations",
            "updates by workers",
            "updates by heartbeats",
            "committed, unacknowledged",
            "updates in the store",
        )
    }
    for name, (total, before, after) in rows.items():
        assert total == before + after, name
    # A creation the kill caught (committed, not acknowledged) is in the crash section.
    unacknowledged_creations = _value(demo_output, r"when killed: [\d,]+ \(creations ([\d,]+)")
    assert rows["creations"][0] + unacknowledged_creations == EXECUTIONS
    assert rows["creations"][1] > 0  # the worker did start executions before it died
    store = rows["updates in the store"]
    for column in range(3):
        assert store[column] == sum(
            rows[name][column]
            for name in ("updates by workers", "updates by heartbeats", "committed, unacknowledged")
        )
    assert rows["committed, unacknowledged"][2] == 0  # only the kill leaves such updates
    throughput = _value(demo_output, r"throughput measured on this run: ([\d,]+) updates")
    assert throughput == store[0]


def test_demo_crash_loses_no_acknowledged_update(demo_output: str) -> None:
    section = "\n".join(_section(demo_output, "Crash and recovery"))
    assert _value(section, r"killed with SIGKILL .* once ([\d,]+) executions had finished") == (
        KILL_AFTER
    )
    acknowledged, found, lost = _values(
        section,
        r"acknowledged before the crash: ([\d,]+) updates, "
        r"found in the store: ([\d,]+), lost: ([\d,]+)",
    )
    assert acknowledged == found > 0
    assert lost == 0
    finished, in_flight, never_started = _values(
        section, r"at the kill: ([\d,]+) finished, ([\d,]+) in flight .*, ([\d,]+) never started"
    )
    assert finished >= KILL_AFTER
    assert never_started > 0
    unacknowledged, creations, _, _, finals = _values(
        section,
        r"committed but not yet acknowledged when killed: ([\d,]+) \(creations ([\d,]+), "
        r"worker updates ([\d,]+), heartbeats ([\d,]+); final writes among them ([\d,]+)\)",
    )
    assert unacknowledged <= 3 + 2  # at most one per writer thread (workers + heartbeats)
    assert finished + in_flight + creations + never_started == EXECUTIONS
    recovered, running, suspended = _values(
        section, r"recover\(\) [\d.]+ ms -> ([\d,]+) executions \(([\d,]+) running, ([\d,]+) "
    )
    # With 3 worker threads, executions are in flight whenever the kill lands.
    assert recovered == running + suspended == in_flight + creations - finals > 0
    resumed, started = _values(
        section, r"phase 2: resumed the ([\d,]+) .*then ran the ([\d,]+) never started"
    )
    assert (resumed, started) == (recovered, never_started)
    ended = _values(
        section,
        r"the recovered ended: cancelled ([\d,]+), completed ([\d,]+), "
        r"failed ([\d,]+)",
    )
    assert sum(ended) == recovered


def test_demo_checks_pass(demo_output: str) -> None:
    checks = _section(demo_output, "Checks")
    assert len(checks) == 10
    assert all(line.startswith("  ok  ") for line in checks), checks


def test_demo_shows_a_failed_timeline(demo_output: str) -> None:
    timeline = _section(demo_output, "Timeline of failed execution")
    events = [line for line in timeline if re.match(r"^\s+\+[\d.]+ ms\s+\d+\s", line)]
    assert events[0].split()[3] == "execution_created"
    assert any(" status_change " in line and "running -> failed" in line for line in events)
    assert any(" error " in line for line in events)
    # The error was given as an exception, so its traceback was recorded; unless the
    # last attempt was lost with the killed worker (a record the recovery wrote).
    assert any(
        "recorded traceback ends:" in line
        or "recorded error: wfstate.demo.WorkerLostError: " in line
        for line in timeline
    )
    versions = [int(line.split()[2]) for line in events]
    assert versions == sorted(versions)


def test_demo_on_memory_runs_without_a_crash() -> None:
    status, output, _ = _run_demo(
        *_SMALL_RUN, "--executions=30", "--store=memory://", "--progress=off"
    )
    assert status == 0, output
    assert "none in this run: a memory:// store lives and dies with its process" in output
    assert _value(output, r"^  creations\s+([\d,]+)") == 30
    checks = _section(output, "Checks")
    assert checks
    assert all(line.startswith("  ok  ") for line in checks), checks


def test_demo_refuses_a_store_that_holds_executions(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'demo.db'}"
    status, output, _ = _run_demo("--executions=3", f"--store={store}", "--no-crash")
    assert status == 0, output
    with pytest.raises(SystemExit, match="holds executions already"):
        _run_demo("--executions=3", f"--store={store}", "--no-crash")


def test_demo_config_round_trips_through_the_worker_command_line() -> None:
    config = demo.DemoConfig(
        executions=7,
        seed=3,
        failure_rate=0.125,
        heartbeat_interval=0.004,
        store="sqlite:///x.db",
        crash_at=0.25,
        timeline=False,
    )
    assert demo.parse_args(demo.config_argv(config)) == config
    assert demo.parse_args(demo.config_argv(demo.DemoConfig(crash_at=None))).crash_at is None


def test_read_ledger_ignores_a_torn_last_line(tmp_path: Path) -> None:
    ledger = demo.Ledger(str(tmp_path / "ledger.log"))
    ledger.record("create", "e1", 1)
    ledger.record("worker", "e1", 2, 1)
    ledger.record("heartbeat", "e1", 3)
    ledger.record("finished", "e1", 3, "completed")
    ledger.close()
    with (tmp_path / "ledger.log").open("a", encoding="utf-8") as file:
        file.write("worker e1 4")  # a kill in the middle of a line
    tally = demo.read_ledger(tmp_path / "ledger.log")
    assert tally == ledger.tally
    assert (tally.creations, tally.worker_updates, tally.worker_transact_retries) == (1, 1, 1)
    assert tally.versions == {"e1": {1, 2, 3}}
    assert tally.in_flight() == set()
