"""The SQLite WAL stays bounded under steady writes (Store.checkpoint).

A passive checkpoint never lets the WAL start over while something new is appended during each
one, so under steady grants it grew for as long as the load lasted. Past WAL_RESTART_FRAMES the
checkpoint holds readers and writers back for a moment and truncates it.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from gpu_attach_server.broker import store as store_mod
from gpu_attach_server.broker.auth import Principal
from gpu_attach_server.broker.core import Broker
from gpu_attach_server.broker.store import ReaderCount, Store, make_engine
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


def wal_frames(b) -> int:
    """Frames in the WAL now (since it last started over), read by a connection of our own."""
    db = sqlite3.connect(b.wal.with_name("b.sqlite"), isolation_level=None)
    try:
        return db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
    finally:
        db.close()


def cycles(b, n):
    for i in range(n):
        b.release(ALICE, b.grant(ALICE, SliceRequest(fraction=0.01), f"s{i % 7}")["id"])


WRITER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
db.execute("CREATE TABLE IF NOT EXISTS scratch (k INTEGER PRIMARY KEY, v TEXT)")
i = 0
while True:  # small transactions back to back, never a pause: as grants at a busy site
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT OR REPLACE INTO scratch VALUES (?, ?)", (i % 500, "x" * 200))
    db.execute("COMMIT")
    i += 1
"""


def test_another_process_writing_without_pause_neither_breaks_nor_stalls_the_checkpoint(broker, tmp_path):
    """The restart takes SQLite's write lock from a writer that is not ours (another process on
    the file) through the busy handler: it must neither fail nor hold up, and the WAL stays
    bounded."""
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(broker.wal.with_name("b.sqlite"))],
                              stderr=subprocess.PIPE, text=True)
    try:
        frames = []
        for _ in range(30):
            time.sleep(0.05)
            t0 = time.perf_counter()
            broker.store.checkpoint()
            assert time.perf_counter() - t0 < 1.0
            frames.append(wal_frames(broker))
            assert writer.poll() is None, f"the other writer failed: {writer.stderr.read()}"
    finally:
        writer.kill()
        writer.wait()
    # Bounded: it started over again and again (a WAL that never did would hold every frame of
    # the 1.5 s, tens of thousands), never more than a few intervals of writes past the limit.
    assert min(frames[5:]) < store_mod.WAL_RESTART_FRAMES, frames
    assert max(frames) < 25 * store_mod.WAL_RESTART_FRAMES, frames
    cycles(broker, 3)  # and grants go on after it


def test_over_the_limit_the_checkpoint_restarts_the_wal_unless_a_reader_is_in_flight(broker):
    """Which checkpoints run, seen through SQLite's own statement trace: a passive one each time;
    a restarting one only past the limit, and not while a reader is open (it is not waited for,
    and grants go on meanwhile)."""
    from sqlalchemy import event

    ran: list[str] = []
    event.listen(broker.store.engine, "connect", lambda dbapi, _: dbapi.set_trace_callback(ran.append))
    broker.store.engine.dispose()  # new connections, traced

    def checkpoints():
        out = [x for x in ran if "wal_checkpoint" in x]
        ran.clear()
        return out

    cycles(broker, 1)
    wal_frames(broker)  # copied back and started over: under the limit now
    cycles(broker, 1)
    broker.store.checkpoint()
    assert checkpoints() == ["PRAGMA wal_checkpoint(PASSIVE)"]
    cycles(broker, 60)  # well over the limit
    with broker.store.read() as conn:  # a listing in flight
        conn.exec_driver_sql("SELECT count(*) FROM leases").fetchall()
        t0 = time.perf_counter()
        broker.store.checkpoint()
        assert time.perf_counter() - t0 < 1.0
        assert checkpoints() == ["PRAGMA wal_checkpoint(PASSIVE)"]
        cycles(broker, 1)  # a grant while the reader is still open
    with broker.store.read_elsewhere():  # a page the listing worker process is reading
        broker.store.checkpoint()
        assert checkpoints() == ["PRAGMA wal_checkpoint(PASSIVE)"]
    broker.store.checkpoint()
    assert checkpoints() == ["PRAGMA wal_checkpoint(PASSIVE)", "PRAGMA wal_checkpoint(RESTART)"]
    cycles(broker, 1)
    assert wal_frames(broker) < 100  # started over


def test_readers_never_wait_and_the_checkpoint_waits_only_a_moment_for_none_to_be_open():
    count = ReaderCount()
    with count.reading():
        t0 = time.perf_counter()
        assert count.none_within(0.05) is False
        assert 0.04 < time.perf_counter() - t0 < 1.0
        t0 = time.perf_counter()
        with count.reading():  # another read meanwhile does not wait
            assert time.perf_counter() - t0 < 0.01
    assert count.none_within(0.0) is True
    # A read that ends while the checkpoint waits lets it go at once.
    done = threading.Event()

    def read_briefly():
        with count.reading():
            done.set()
            time.sleep(0.1)

    t = threading.Thread(target=read_briefly)
    t.start()
    done.wait()
    t0 = time.perf_counter()
    assert count.none_within(5.0) is True
    assert time.perf_counter() - t0 < 1.0
    t.join()
