"""SIGKILL the kernel, the agent (with and without a cell's child processes) and the broker
(outages shorter and longer than the lease TTL) mid-cell: zero stuck slices, double grants,
overlaps, orphans and lost leases, and every next cell runs."""

from __future__ import annotations

import os

import pytest

from .conftest import load_benchmark

chaos = load_benchmark("chaos")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the trials count a cell's processes by uid and cgroup "
                                                         "(a root agent)")


@pytest.mark.parametrize("scenario", sorted(chaos.SCENARIOS))
def test_chaos(scenario, trials):
    counts = chaos.run([scenario], trials)[scenario]
    summary = (f"{scenario}: {counts.trials} trials, notes {counts.notes}, figures {counts.figures}")
    assert counts.trials == trials
    assert counts.stuck_slices == 0, summary
    assert counts.double_grants == 0, summary
    assert counts.overlaps == 0, summary
    assert counts.orphans == 0, summary
    assert counts.lost_leases == 0, summary
    assert counts.recoveries == trials, summary
    if scenario == "kernel":
        assert max(counts.figures["slice_freed_s"]) < 1.0, summary
