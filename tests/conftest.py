"""Shared fixtures of the wfstate test suites.

Only in-memory fixtures live here; nothing may need a database or a network service.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from wfstate import StateManager


@pytest.fixture
def manager() -> Iterator[StateManager]:
    """A fresh in-memory StateManager with default options, closed after the test."""
    state_manager = StateManager()
    try:
        yield state_manager
    finally:
        state_manager.close()
