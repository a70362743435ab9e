"""Listings are read in a worker process at the lowest CPU priority (broker/listing_worker.py):
no GIL shared with the event loop that grants, and the OS runs the loop first (SCHED_IDLE: a
nice-19 worker still delayed the loop's wake-ups on Linux's EEVDF scheduler)."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from gpu_attach_server.broker import listing_worker
from gpu_attach_server.broker.auth import Principal
from gpu_attach_server.broker.core import Broker
from gpu_attach_server.broker.store import Store, make_engine
from gpu_attach_server.grant_tokens import GrantSigner
from jupyter_gpu_attach.slices import SliceRequest

ALICE = Principal("alice", "user")


def make(url_or_path) -> Broker:
    b = Broker(Store(make_engine(url_or_path)), GrantSigner.generate())
    b.register_agent("h1", "127.0.0.1:1", [{"index": 0, "uuid": "GPU-0", "model": "Sim", "memory": 80 << 30,
                                            "simulated": True}], "t")
    for i in range(3):
        b.release(ALICE, b.grant(ALICE, SliceRequest(fraction=0.1), f"s{i}")["id"])
    return b


@pytest.fixture(autouse=True)
def fresh_worker():
    listing_worker.shutdown()
    yield
    listing_worker.shutdown()


def test_a_page_is_read_by_a_worker_process_under_sched_idle(tmp_path, monkeypatch):
    b = make(str(tmp_path / "b.sqlite"))
    want = b.lease_page(ALICE, limit=10)

    def not_here(*a, **k):
        raise AssertionError("the page was read in the broker's process")

    monkeypatch.setattr(Store, "lease_page_json", not_here)  # in this process only: the worker is spawned
    got = json.loads(asyncio.run(b.lease_page_bytes(ALICE, limit=10)))
    assert got == want and len(got["leases"]) == 3
    (pid,) = listing_worker._pool._processes
    assert pid != os.getpid() and os.getpriority(os.PRIO_PROCESS, pid) == 19
    if hasattr(os, "SCHED_IDLE"):  # Linux: preempted by any normal task that wakes, such as the loop
        assert os.sched_getscheduler(pid) == os.SCHED_IDLE


def test_a_database_another_process_cannot_open_is_not_sent_to_it():
    assert listing_worker._url(Store(make_engine("sqlite://"))) is None


def test_a_dead_worker_is_replaced_and_the_listing_answered_all_the_same(tmp_path):
    b = make(str(tmp_path / "b.sqlite"))
    asyncio.run(b.lease_page_bytes(ALICE))
    (pid,) = listing_worker._pool._processes
    os.kill(pid, 9)
    for _ in range(3):  # the page in flight when it died falls back to a thread; later ones get a new worker
        assert len(json.loads(asyncio.run(b.lease_page_bytes(ALICE)))["leases"]) == 3
