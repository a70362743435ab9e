"""The kernel's one :class:`GPUSession`: made on first use from config, or an embedded pool."""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading

from .config import GPUAttach
from .errors import AuthError
from .session import GPUSession

_session: GPUSession | None = None
_ended: dict | None = None  # after a detach: GPUSession.successor() of the session that ended
_lock = threading.Lock()
_registered = False


def get_session(config: GPUAttach | None = None) -> GPUSession:
    """The session, connecting on first use (and starting the embedded pool if no broker is set)."""
    global _session
    with _lock:
        if _session is not None and _session.embedded is None:
            # A token or URL set since (after an AuthError, say) takes effect without a detach.
            cfg = config or GPUAttach()
            if cfg.token and cfg.token != _session.broker.token:
                _session.set_token(cfg.token)
        if _session is None:
            cfg = config or GPUAttach()
            if cfg.broker_url:
                if not cfg.token:
                    raise AuthError("GPU_ATTACH_BROKER_URL is set but GPU_ATTACH_TOKEN is not; set both, "
                                    "or unset the URL to use the embedded broker")
                _session = GPUSession(cfg.broker_url, cfg.token, **_next_session())
            else:
                from .embedded import EmbeddedPool

                print("gpu-attach: no GPU_ATTACH_BROKER_URL set; starting an embedded broker and agent on "
                      "127.0.0.1 ...", file=sys.stderr)
                pool = EmbeddedPool()
                sim = " SIMULATED" if all(d["simulated"] for d in pool.devices) else ""
                print(f"gpu-attach: embedded broker at {pool.url} with {len(pool.devices)}{sim} device(s)",
                      file=sys.stderr)
                _session = GPUSession(pool.url, pool.token, embedded=pool, **_next_session())
            _session.wait_s = cfg.wait_s
            global _registered
            if not _registered:  # a kernel that shuts down or restarts ends its sandbox at once
                atexit.register(close_session)
                _registered = True
        return _session


def _next_session() -> dict:
    """The new session's id: the kernel's, or after a detach the same one's next generation."""
    return {"session_id": kernel_session_id()} if _ended is None else _ended


def kernel_session_id() -> str | None:
    """``k-<kernel id>.<pid>`` inside a Jupyter kernel (its connection file is ``kernel-<id>.json``), else None.

    The Jupyter Server extension maps leases to notebooks through this: the sessions API knows
    each notebook's kernel id.
    """
    try:
        from ipykernel.connect import get_connection_file

        name = os.path.basename(get_connection_file())
    except Exception:  # not in an ipykernel (plain IPython, a script): a random session id serves
        return None
    m = re.fullmatch(r"kernel-([A-Za-z0-9-]{1,64})\.json", name)
    # The process id too: a restarted kernel keeps its kernel id, and must not find the sandbox
    # (and the namespace) of the kernel it replaces.
    return f"k-{m.group(1)}.{os.getpid()}" if m else None


def current_session() -> GPUSession | None:
    return _session


def close_session() -> None:
    global _session, _ended
    with _lock:
        if _session is not None:
            _session.close()
            # Not the same id again: the agents hear of the end a moment after it, and would stop
            # the next session's first cell if it had the id of the one that ended.
            _ended = _session.successor()
            _session = None
