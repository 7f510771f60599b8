"""The wfstate benchmarks (pytest-benchmark); ``make bench`` runs them.

A package, so that its conftest and the tests' one are two modules for pytest and mypy
alike. Importing it puts tests/ on ``sys.path``, for the pure-Python reference model
every group measures against (``from reference_model import ReferenceStateManager``):
this runs before the conftest, the benchmarks and ``python -m benches.memory_probe``.
"""

from __future__ import annotations

import sys
from pathlib import Path

TESTS_DIR = str(Path(__file__).resolve().parent.parent / "tests")
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)
