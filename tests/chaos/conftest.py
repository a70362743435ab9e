"""Chaos tests: real processes killed with SIGKILL mid-cell (benchmarks/chaos.py does the work).

CI runs a few trials of each scenario (GPU_ATTACH_CHAOS_TRIALS, default 2); the issue's 20
trials each are ``python benchmarks/chaos.py --trials 20``, whose counts the README reports.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (under its own name: ``chaos`` is this folder's)."""
    module_name = f"gpu_attach_benchmark_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


@pytest.fixture(scope="session")
def trials() -> int:
    return int(os.environ.get("GPU_ATTACH_CHAOS_TRIALS", "2"))
