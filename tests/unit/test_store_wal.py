"""The SQLite WAL stays bounded under steady writes (Store.checkpoint).

A passive checkpoint never lets the WAL start over while something new is appended during each
one, so under steady grants it grew for as long as the load lasted. Past WAL_RESTART_FRAMES the
checkpoint holds readers and writers back for a moment and truncates it.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from gpu_attach_server.broker import store as store_mod
from gpu_attach_server.broker.auth import Principal
from gpu_attach_server.broker.core import Broker
from gpu_attach_server.broker.store import ReaderGap, Store, make_engine
from gpu_attach_server.grant_tokens import GrantSigner
from jupyter_gpu_attach.slices import SliceRequest

ALICE = Principal("alice", "user")


@pytest.fixture
def broker(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "WAL_RESTART_FRAMES", 200)
    b = Broker(Store(make_engine(str(tmp_path / "b.sqlite"))), GrantSigner.generate())
    b.register_agent("h1", "127.0.0.1:1", [{"index": 0, "uuid": "GPU-0", "model": "Sim", "memory": 80 << 30,
                                            "simulated": True}], "t")
    b.wal = tmp_path / "b.sqlite-wal"
    return b


def cycles(b, n):
    for i in range(n):
        b.release(ALICE, b.grant(ALICE, SliceRequest(fraction=0.01), f"s{i % 7}")["id"])


def test_the_wal_is_truncated_once_it_is_over_the_limit_while_writes_go_on(broker):
    stop = threading.Event()

    def writer():  # appends during every checkpoint, as a busy site does
        while not stop.is_set():
            cycles(broker, 1)

    t = threading.Thread(target=writer)
    t.start()
    try:
        sizes = []
        for _ in range(20):
            time.sleep(0.05)
            broker.store.checkpoint()
            sizes.append(os.path.getsize(broker.wal))
    finally:
        stop.set()
        t.join()
    # Bounded: at most the frames of ~one interval past the limit, never the whole run's.
    assert max(sizes) < 2_000_000, sizes
    assert min(sizes) < 200 * 1100, sizes  # truncated at least once
    cycles(broker, 3)  # and grants go on after it


def test_a_reader_in_flight_defers_the_truncation_and_holds_up_no_grant(broker):
    cycles(broker, 60)  # well over 200 frames
    before = os.path.getsize(broker.wal)
    with broker.store.read() as conn:  # a listing in flight
        conn.exec_driver_sql("SELECT count(*) FROM leases").fetchall()
        t0 = time.perf_counter()
        broker.store.checkpoint()
        waited = time.perf_counter() - t0
        assert os.path.getsize(broker.wal) == before  # not truncated under a reader
        assert waited < 1.0
        cycles(broker, 1)  # a grant while the reader is still open
    broker.store.checkpoint()  # the reader has gone: now it is
    assert os.path.getsize(broker.wal) < before


def test_the_reader_gap_lets_a_thread_that_reads_read_again_and_holds_new_readers():
    gap = ReaderGap()
    order = []
    with gap.reader():
        done = threading.Event()

        def checkpointer():
            with gap.gap(1.0) as clear:
                order.append(("gap", clear))
                time.sleep(0.1)
            done.set()

        c = threading.Thread(target=checkpointer)
        c.start()
        time.sleep(0.05)
        with gap.reader():  # nested in this thread: does not wait for the pending gap
            order.append("nested")
    def late_reader():
        with gap.reader():
            order.append("late")

    c2 = threading.Thread(target=late_reader)
    time.sleep(0.02)
    c2.start()
    c.join()
    c2.join()
    assert order == ["nested", ("gap", True), "late"]
