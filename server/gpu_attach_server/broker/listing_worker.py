"""Lease listings are read in a process of their own, at the lowest CPU priority there is.

A page of 1,000 leases costs the database ~12 ms of CPU, and a user paging in a tight loop asks
for one as soon as the last arrives. On a thread of the broker that CPU competed with the event
loop that grants; and at low priority a thread could not be used at all, because a thread that
asks for the GIL makes the loop let go and wait until the OS has scheduled it, which it does last
(``background.py``). A separate process has no GIL to share.

The worker runs under ``SCHED_IDLE``, not merely at nice 19. On this project's test machines
(Linux 6.18, whose scheduler is EEVDF) a task that wakes does not always take the CPU at once
from a running nice-19 one, and the loop wakes at every request. A ``SCHED_IDLE`` task is
preempted by any normal task that wakes ("Idle tasks are by definition preempted by non-idle
tasks", kernel/sched/fair.c). ``benchmarks/low_priority_work.py`` puts a CPU burner beside the
broker at 1,000 cycles/s paced: median grant p99 over 5 rounds 17 ms alone, 65 ms beside a burner
at nice 19, 20.5 ms beside one under ``SCHED_IDLE``. It still gets the CPU that is left. Where
``SCHED_IDLE`` is missing, the worker stays at nice 19. The worker only reads
(``Store.lease_page_json``); the broker still decides whose leases a page shows, and adds the
queued requests it holds in memory.

One worker for the whole broker process, started on the first listing (spawned, so it inherits
no threads or locks), dying with the broker (``PR_SET_PDEATHSIG``). Where it cannot be used (an
in-memory SQLite database, no process support, or a worker that died twice), the page is read
on a background thread instead, as before.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing
import os
import signal
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from .background import in_background

log = logging.getLogger("gpu_attach.broker")

_lock = threading.Lock()
_pool: ProcessPoolExecutor | None = None
_broken = 0
#: In the worker: a reader Store per database URL.
_stores: dict[str, Any] = {}


def _init_worker() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 19)
    except (AttributeError, OSError):
        pass
    try:  # below every normal task, not just behind them (see the module's docstring)
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        pass
    try:  # Linux: die with the broker, even if it is killed
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (AttributeError, OSError):
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the broker; it stops us


def _page(url: str, owner, state, session, cursor, limit) -> tuple[str, int, Any]:
    from .store import Store, make_engine

    store = _stores.get(url)
    if store is None:
        store = _stores[url] = Store.reader(make_engine(url))
    with store.read() as conn:
        return store.lease_page_json(conn, owner, state, session, cursor, limit)


def _url(store) -> str | None:
    """The store's database URL for another process; None when one cannot open it (in memory)."""
    url = store.engine.url
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        return None
    return url.render_as_string(hide_password=False)


def _get_pool() -> ProcessPoolExecutor | None:
    global _pool
    with _lock:
        if _pool is None and _broken < 2:
            _pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_init_worker)
        return _pool


async def lease_page_json(store, owner, state, session, cursor, limit) -> tuple[str, int, Any]:
    """``store.lease_page_json`` for these arguments, read by the worker process."""
    global _pool, _broken
    url = _url(store)
    pool = _get_pool() if url is not None else None
    if pool is not None:
        try:
            with store.read_elsewhere():
                return await asyncio.wrap_future(pool.submit(_page, url, owner, state, session, cursor, limit))
        except BrokenProcessPool:
            with _lock:
                if _pool is pool:
                    _pool, _broken = None, _broken + 1
            log.warning("the listing worker died; reading this page on a thread")

    def here():
        with store.read() as conn:
            return store.lease_page_json(conn, owner, state, session, cursor, limit)

    return await in_background(here)


def shutdown() -> None:
    """Stop the worker (it finishes the page in hand, a few ms) and release what it held."""
    global _pool
    with _lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)
