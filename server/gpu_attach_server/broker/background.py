"""Work the broker does beside grants (listings, reports), off the event loop.

The broker serves every grant and release from one event loop. Listings and reports run on a
small pool of threads instead, and most of a listing's work is done by the database with the GIL
released (``Store.lease_page_json`` returns a whole page as one row), so it runs on the other core
while the loop grants.

The threads keep the normal CPU priority, on purpose. They were once at the lowest (nice 19), so
that the OS would run the loop first; but a thread that asks for the GIL makes the thread holding
it (the loop) let go and wait until it has been scheduled to take it, and on a busy machine a
nice-19 thread is scheduled last: every grant then waited behind it (paced grant p99 of 100s of ms
in ``benchmarks/broker_throughput.py``). Two threads bound how much of the machine listings take.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="broker-background")


async def in_background(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on a background thread, awaited."""
    return await asyncio.get_running_loop().run_in_executor(_POOL, lambda: fn(*args))
