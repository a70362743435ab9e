"""The broker's session registry (``agents.Sessions``): beats, ends and the end log that agents
follow, in the database, so that two broker replicas on one database agree.

tests/broker/test_postgres.py runs these again on PostgreSQL."""

from __future__ import annotations

import time

import pytest

from gpu_attach_server.broker import agents
from gpu_attach_server.broker.agents import Sessions
from gpu_attach_server.broker.store import Store, make_engine


def make_store(tmp_path) -> Store:
    return Store(make_engine(str(tmp_path / "broker.db")))


class Clock:
    def __init__(self):
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def replicas(tmp_path, monkeypatch):
    """Two replicas on one database, on one fake wall clock, that look for silent sessions on
    every call (not at most once a second)."""
    monkeypatch.setattr(agents, "SESSION_CHECK_S", 0.0)
    monkeypatch.setattr(agents, "SESSION_LATEST_S", 0.0)
    store = make_store(tmp_path)
    clock = Clock()
    one = Sessions(store, timeout_s=30, clock=clock)
    two = Sessions(Store(store.engine), timeout_s=30, clock=clock)
    return one, two, clock


def test_a_session_that_keeps_beating_is_never_ended(replicas):
    one, two, clock = replicas
    seq, _ = two.since(0)
    for _ in range(20):  # 100 s of beats every 5 s, to replica one; the agent asks replica two
        one.beat("alice", "nb-1")
        clock.t += 5
        one.expire()
        two.expire()
    assert two.since(seq) == (seq, [])


def test_a_silent_session_is_ended_once_and_every_replica_tells_its_agents(replicas):
    one, two, clock = replicas
    seq1, _ = one.since(0)
    seq2, _ = two.since(0)
    one.beat("alice", "nb-1")
    one.beat("bob", "nb-2")
    clock.t += 20
    one.beat("bob", "nb-2")  # bob beats on; alice's kernel died 20 s ago
    clock.t += 10.5
    two.expire()
    one.expire()  # the same silence seen by both: ended once
    n1, ended1 = one.since(seq1)
    n2, ended2 = two.since(seq2)
    assert ended1 == ended2 == [["alice", "nb-1"]]
    assert n1 == n2 > seq1
    assert two.since(n2) == (n2, [])
    clock.t += 30
    one.expire()
    assert two.since(n2)[1] == [["bob", "nb-2"]]


def test_an_ended_session_is_logged_and_its_beats_start_a_new_watch(replicas):
    one, two, clock = replicas
    seq, _ = two.since(0)
    one.beat("alice", "nb-1")
    one.end("alice", "nb-1")
    seq, ended = two.since(seq)
    assert ended == [["alice", "nb-1"]]
    clock.t += 60
    two.expire()
    assert two.since(seq) == (seq, []), "an ended session is not ended again for its silence"
    one.beat("alice", "nb-1")  # the same id used again: watched again
    clock.t += 31
    two.expire()
    assert one.since(seq)[1] == [["alice", "nb-1"]]


def test_a_restarted_broker_gives_known_sessions_a_fresh_timeout(tmp_path, monkeypatch):
    monkeypatch.setattr(agents, "SESSION_CHECK_S", 0.0)
    clock = Clock()
    store = make_store(tmp_path)
    Sessions(store, timeout_s=30, clock=clock).beat("alice", "nb-1")
    clock.t += 120  # the broker was down for two minutes: no beat could reach it
    again = Sessions(Store(store.engine), timeout_s=30, clock=clock)
    seq, _ = again.since(0)
    again.expire()
    assert again.since(seq) == (seq, []), "the kernel had no broker to beat; it is not dead"
    clock.t += 31  # and it did not beat the restarted broker either: now it is
    again.expire()
    assert again.since(seq)[1] == [["alice", "nb-1"]]


def test_the_log_is_read_in_pages_and_kept_bounded(replicas, monkeypatch):
    one, two, clock = replicas
    monkeypatch.setattr(agents, "MAX_SESSION_EVENTS", 1500)
    for i in range(2500):
        one.beat("alice", f"nb-{i}")
    clock.t += 31
    one.expire()  # 1000 at a time
    one.expire()
    one.expire()
    seen, seq = [], 0
    while True:
        seq, page = two.since(seq)
        if not page:
            break
        assert len(page) <= 1000
        seen += page
    assert len(seen) == 1500, "the oldest 1000 ends were dropped from the log"
    assert [s for _, s in seen] == [f"nb-{i}" for i in range(1000, 2500)]


def test_expiry_looks_at_most_once_a_second(tmp_path):
    clock = Clock()
    s = Sessions(make_store(tmp_path), timeout_s=30, clock=clock)
    seq, _ = s.since(0)
    s.beat("alice", "nb-1")
    s.expire()
    clock.t += 31
    s.expire()  # within a second of the last look: not looked at again
    assert s.since(seq) == (seq, [])
    time.sleep(1.05)
    s.expire()
    assert s.since(seq)[1] == [["alice", "nb-1"]]


def test_a_bad_timeout_names_the_setting():
    with pytest.raises(ValueError, match="GPU_ATTACH_SESSION_TIMEOUT_S"):
        Sessions(None, timeout_s=0)


def test_an_agent_ahead_of_a_new_database_reads_its_log_from_the_start(replicas):
    one, _, _ = replicas
    one.beat("alice", "nb-1")
    one.end("alice", "nb-1")
    seq, ended = one.since(500)  # the agent followed a broker whose database is gone
    assert ended == [["alice", "nb-1"]] and seq < 500


def test_an_agent_moving_to_a_replica_that_has_not_yet_looked_gets_no_replay(tmp_path, monkeypatch):
    """Replica two's copy of the log's newest entry may be a moment old: an agent that read a newer
    end from replica one is not taken for one from a new database (which reads the log anew)."""
    monkeypatch.setattr(agents, "SESSION_LATEST_S", 3600.0)  # two never looks again by itself
    store = make_store(tmp_path)
    one, two = Sessions(store, timeout_s=30), Sessions(Store(store.engine), timeout_s=30)
    for i in range(5):
        one.end("alice", f"old-{i}")
    seen, _ = two.since(0)  # two has looked once
    one.end("alice", "new")
    seq, ended = one.since(seen)
    assert ended == [["alice", "new"]]
    assert two.since(seq) == (seq, []), "the agent was sent every old end again"
