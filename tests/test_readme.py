"""The README's examples run, and the demo's summary adds up.

Every ```python block of README.md is executed in a fresh namespace, so the examples
cannot rot. The demo runs small (50 executions) and its printed summary is parsed
back: each table must agree with the others and with the number of executions.
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

EXECUTIONS = 50
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


def _value(output: str, pattern: str) -> int:
    match = re.search(pattern, output, re.MULTILINE)
    assert match is not None, f"{pattern!r} not in the summary"
    return _number(match.group(1))


@pytest.fixture(scope="module")
def demo_output() -> str:
    """The summary of a small run, failure-prone enough to have a failed execution."""
    stdout = io.StringIO()
    stderr = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = demo.main(
            [
                f"--executions={EXECUTIONS}",
                "--seed=7",
                "--threads=3",
                "--failure-rate=0.3",
                "--retry-failure-rate=0.6",
                "--suspend-rate=0.2",
                "--cancel-rate=0.1",
                "--progress=lines",
            ]
        )
    output = stdout.getvalue()
    assert status == 0, output
    # Not a terminal: the progress is plain lines, the last one of the whole run.
    assert (
        stderr.getvalue()
        .splitlines()[-1]
        .startswith(f"wfstate demo: {EXECUTIONS}/{EXECUTIONS} 100%")
    )
    return output


def test_demo_status_counts_sum_to_executions(demo_output: str) -> None:
    counts = {
        match.group(1): _number(match.group(2))
        for line in _section(demo_output, "Executions by status")
        if (match := _STATUS_LINE.match(line))
    }
    assert counts["total"] == EXECUTIONS
    assert sum(count for status, count in counts.items() if status != "total") == EXECUTIONS
    # Every execution ends: none is left running or suspended.
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
    # Each failed attempt records exactly one error event.
    error_total = _value(demo_output, r"^Errors by type.*(?:\n  .*)*?\n  total\s+([\d,]+)")
    assert error_total == failed_attempts_total > 0
    # Fetch runs first in every execution but the ones cancelled before it.
    fetch_started = _number(rows[0][1])
    assert fetch_started >= EXECUTIONS - _value(demo_output, r"^  cancelled\s+([\d,]+)")


def test_demo_writes_add_up(demo_output: str) -> None:
    workers = _value(demo_output, r"^  updates by workers\s+([\d,]+)")
    heartbeats = _value(demo_output, r"^  updates by heartbeats\s+([\d,]+)")
    store = _value(demo_output, r"^  updates in the store\s+([\d,]+)")
    assert _value(demo_output, r"^  creations\s+([\d,]+)") == EXECUTIONS
    assert store == workers + heartbeats
    assert _value(demo_output, r"throughput measured on this run: ([\d,]+) updates") == store
    checks = _section(demo_output, "Checks")
    assert checks
    assert all(line.startswith("  ok  ") for line in checks), checks


def test_demo_shows_a_failed_timeline(demo_output: str) -> None:
    timeline = _section(demo_output, "Timeline of failed execution")
    events = [line for line in timeline if re.match(r"^\s+\+[\d.]+ ms\s+\d+\s", line)]
    assert events[0].split()[3] == "execution_created"
    assert any(" status_change " in line and "running -> failed" in line for line in events)
    assert any(" error " in line for line in events)
    # The error was given as an exception: its traceback was recorded.
    assert any("recorded traceback ends:" in line for line in timeline)
    versions = [int(line.split()[2]) for line in events]
    assert versions == sorted(versions)
