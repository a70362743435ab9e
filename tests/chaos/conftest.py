"""Chaos tests: real processes killed with SIGKILL mid-cell (benchmarks/chaos.py does the work).

CI runs a few trials of each scenario (GPU_ATTACH_CHAOS_TRIALS, default 2); the issue's 20
trials each are ``python benchmarks/chaos.py --trials 20``, whose counts the README reports.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


@pytest.fixture(scope="session")
def trials() -> int:
    return int(os.environ.get("GPU_ATTACH_CHAOS_TRIALS", "2"))
