"""Work the broker does beside grants (listings, reports, WAL checkpoints), at low CPU priority.

The broker serves every grant and release from one event loop. Listings and reports run on
threads whose nice value is the lowest (Linux gives each thread its own), so however hard
somebody pages through leases, the OS runs the loop that grants first. Most of a listing's work
is done by the database with the GIL released (``Store.lease_page_json``), where that priority
applies.
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable


def lower_priority() -> None:
    """Run the calling thread at the lowest CPU priority (elsewhere than Linux: unchanged)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="broker-background", initializer=lower_priority)


async def in_background(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on a low-priority thread, awaited."""
    return await asyncio.get_running_loop().run_in_executor(_POOL, lambda: fn(*args))
