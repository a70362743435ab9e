"""Sessions started and stopped leave nothing behind in the agent (benchmarks/soak_sessions.py;
the README's figure is its 500-session run)."""

from __future__ import annotations

from .conftest import load_benchmark

soak_sessions = load_benchmark("soak_sessions")


def test_sessions_started_and_stopped_leave_the_agent_at_its_baseline():
    r = soak_sessions.soak(15)
    base, after = r["baseline"], r["after"]
    assert after["processes"] == base["processes"], r  # every ended session's sandbox was reclaimed
    assert after["fds"] <= base["fds"] + 2, r
    assert after["threads"] <= base["threads"] + 2, r
    assert after["rss_mib"] <= base["rss_mib"] + 20, r
