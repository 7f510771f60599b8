"""Shared set-up of the wfstate benchmarks (pytest-benchmark, run by ``make bench``).

Benchmarks are off in ``make test`` (``--benchmark-disable``, ``testpaths = ["tests"]``);
``make bench`` turns them on. Every group holds its baselines, the pure-Python
reference model and a dict behind a ``threading.Lock``, so the figures that matter are
ratios measured in one run: the terminal summary prints them per group, with the
figures each benchmark stored in ``extra_info`` (percentiles, throughput, memory).

Nothing here times anything by itself; speed is measured only by pytest-benchmark.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Final, NoReturn
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from reference_model import ReferenceStateManager  # on sys.path: see benches/__init__.py
from wfstate import StateManager

from .support import (
    RESULTS,
    SUMMARY_SECTIONS,
    AnyStore,
    Benchmark,
    Reporter,
    Result,
    create_running,
)
from .workload import DictLockStore

#: Implementations in the order every group lists them; the last two are the baselines.
IMPLEMENTATIONS = ("wfstate", "reference", "dict_lock")
BASELINES = ("reference", "dict_lock")


POSTGRES_URL_ENV: Final = "WFSTATE_TEST_POSTGRES_URL"
DEFAULT_POSTGRES_URL: Final = "postgresql://root@127.0.0.1:5432/test"


def service_missing(reason: str) -> NoReturn:
    """Skip on a developer's machine; fail under ``CI=true``."""
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"{reason} (CI=true: a missing service is a failure)", pytrace=False)
    pytest.skip(reason)


def with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + database))


@pytest.fixture(scope="session")
def bench_database() -> Iterator[str]:
    """A database of this session's own on the test server, dropped at the end."""
    server = os.environ.get(POSTGRES_URL_ENV) or DEFAULT_POSTGRES_URL
    name = f"wfstate_bench_{os.getpid()}"
    try:
        with psycopg.connect(server, connect_timeout=3, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.Error as error:
        service_missing(f"PostgreSQL is unreachable ({POSTGRES_URL_ENV}): {error}")
    try:
        yield with_database(server, name)
    finally:
        with psycopg.connect(server, connect_timeout=10, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def pg_url(bench_database: str) -> str:
    """The bench database with an empty ``public`` schema."""
    with psycopg.connect(bench_database, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    return bench_database


@pytest.fixture
def reporter(benchmark: Benchmark) -> Reporter:
    """Records the benchmark's own figures in ``extra_info`` and the end-of-run summary."""
    return Reporter(benchmark)


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request: pytest.FixtureRequest) -> str:
    """The implementation under test: wfstate or one of its two baselines."""
    name: str = request.param
    return name


@pytest.fixture
def store(implementation: str) -> Iterator[AnyStore]:
    """A fresh, empty store of the parametrised implementation; closed afterwards."""
    opened: AnyStore
    if implementation == "wfstate":
        opened = StateManager()
    elif implementation == "reference":
        opened = ReferenceStateManager()
    else:
        opened = DictLockStore()
    yield opened
    if not isinstance(opened, DictLockStore):
        opened.close()


@pytest.fixture
def running_execution(store: AnyStore) -> str:
    """The id of an execution of ``store`` holding 20 variables, its node running."""
    execution_id = "bench-execution"
    create_running(store, execution_id)
    return execution_id


def _ratio_line(name: str, results: dict[str, Result]) -> str:
    result = results[name]
    ratios = "  ".join(
        f"{base}/{name} = {results[base].median / result.median:.2f}x"
        for base in BASELINES
        if base in results and base != name
    )
    return (
        f"  {name:<10} median {result.median * 1e6:12.3f} us  "
        f"mean {result.mean * 1e6:12.3f} us  {ratios}"
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Per group: each implementation's median and mean, its ratio to each baseline."""
    if not RESULTS:
        return
    terminalreporter.section("wfstate benchmarks: ratios to the baselines (same run)")
    groups: dict[str, dict[str, Result]] = {}
    for result in RESULTS:
        groups.setdefault(result.group, {})[result.implementation] = result
    for group, results in groups.items():
        terminalreporter.write_line(f"[{group}]  (times per round)")
        for name, result in results.items():
            terminalreporter.write_line(_ratio_line(name, results))
            if result.figures:
                figures = "  ".join(
                    f"{key}={value:,.3f}" if isinstance(value, float) else f"{key}={value}"
                    for key, value in result.figures.items()
                )
                terminalreporter.write_line(f"  {'':<10} {figures}")
    for title, section in SUMMARY_SECTIONS:
        lines = section(RESULTS)
        if lines:
            terminalreporter.section(title)
            for line in lines:
                terminalreporter.write_line(line)
