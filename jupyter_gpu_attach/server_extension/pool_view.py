"""What the JupyterLab panel shows, and the actions it takes: plain Python, no web framework.

:class:`PoolView` reads the broker (server-side, with the server's token: the browser never sees
it), keeps a short utilisation history per GPU, names the notebook each lease serves (a kernel's
session id is ``k-<kernel id>``, see :func:`jupyter_gpu_attach.connection.kernel_session_id`),
and turns a default request into the ``%gpu attach`` line the panel runs in a notebook's kernel.
"""

from __future__ import annotations

import re
import shlex
import threading
import time
from collections import deque
from typing import Any, Iterable

from ..broker_client import BrokerClient
from ..errors import GPUAttachError
from ..slices import SliceRequest, format_size, parse_size

#: Points of utilisation history kept per GPU (at the default 2 s refresh: two minutes).
HISTORY_POINTS = 60
#: Lease states a user still cares about; ended leases drop out of the panel.
LIVE_STATES = ("queued", "granted")
LEASE_ID = re.compile(r"^L[0-9a-f]{12}$")
#: ``k-<kernel id>.<kernel pid>``, and ``.2``, ``.3``, ... after each ``%gpu detach``: see
#: jupyter_gpu_attach.connection.kernel_session_id and GPUSession.close.
KERNEL_SESSION = re.compile(r"^k-([A-Za-z0-9-]{1,64})(?:\.\d+){0,2}$")


class PoolView:
    """The panel's view of one broker, for one Jupyter server (so for one user)."""

    def __init__(self, broker: BrokerClient, *, embedded: bool = False, refresh_interval: float = 2.0):
        self.broker = broker
        self.embedded = embedded
        self.refresh_interval = refresh_interval
        self._history: dict[str, deque] = {}
        self._last_sample = 0.0
        self._lock = threading.Lock()

    # -- reads ----------------------------------------------------------------------------------

    def pool(self, my_leases: list[dict] | None = None) -> dict:
        """Every GPU, its slices (with owners where they are this user's) and its recent use."""
        pool = self.broker.pool()
        if my_leases is None:
            my_leases = self.broker.leases(state="granted")
        mine = {lease["id"]: lease for lease in my_leases if lease["state"] == "granted"}
        self._sample(pool)
        gpus = []
        for g in pool["gpus"]:
            slices = []
            for lease_id in g["leases"]:
                lease = mine.get(lease_id)
                slices.append({
                    "lease": lease_id,
                    "mine": lease is not None,
                    "session": lease["session"] if lease else None,
                    "label": lease["label"] if lease else "",
                    "memory": lease["memory_per_gpu"] if lease else None,
                })
            gpus.append(dict(g, slices=slices, history=self.history(g["id"])))
        return {"gpus": gpus, "time": pool.get("time"), "simulated": bool(gpus) and all(g["simulated"] for g in gpus)}

    def leases(self, notebooks: dict[str, str] | None = None, raw: list[dict] | None = None) -> list[dict]:
        """This user's queued and granted leases, newest first, each with its notebook and cell."""
        notebooks = notebooks or {}
        now = time.time()
        out = []
        for lease in self._live_leases() if raw is None else raw:
            if lease["state"] not in LIVE_STATES:
                continue
            started = lease.get("granted_at") or lease.get("queued_at") or lease.get("created_at") or now
            out.append(dict(
                lease,
                notebook=notebooks.get(f"k-{kernel_id_of(lease['session'])}"),
                kernel_id=kernel_id_of(lease["session"]),
                age_s=round(max(now - started, 0.0), 1),
                size=describe_lease(lease),
                # The broker adds a queue position once it queues (issue 8); shown when present.
                position=lease.get("position"),
                of=lease.get("of"),
            ))
        return out

    def state(self, notebooks: dict[str, str] | None = None) -> dict:
        """Everything the panel and the status bar draw, in one round trip (two to the broker)."""
        raw = self._live_leases()
        return {
            "broker": {"url": self.broker.url, "embedded": self.embedded},
            "refresh_interval": self.refresh_interval,
            "pool": self.pool(raw),
            "leases": self.leases(notebooks, raw),
        }

    def _live_leases(self) -> list[dict]:
        """Every granted lease (however old), and queued requests where the broker lists them."""
        granted = self.broker.leases(state="granted", limit=1000)
        # The broker has no `state=queued` filter (queued requests are not rows yet); a broker that
        # queues and lists them shows them among the newest.
        queued = [x for x in self.broker.leases(limit=50) if x["state"] == "queued"]
        return queued + granted

    def history(self, gpu_id: str) -> list[list[float]]:
        with self._lock:
            return [list(p) for p in self._history.get(gpu_id, ())]

    def _sample(self, pool: dict) -> None:
        # Several readers (panel, status bar, tabs) poll at once; one point per half interval is enough.
        t = time.time()
        with self._lock:
            if t - self._last_sample < self.refresh_interval / 2:
                return
            self._last_sample = t
            for g in pool["gpus"]:
                self._history.setdefault(g["id"], deque(maxlen=HISTORY_POINTS)).append((round(t, 1), g["used_share"]))

    # -- actions --------------------------------------------------------------------------------

    def release(self, lease_id: str) -> dict:
        """End one of this user's leases now (the broker refuses another user's with 403)."""
        if not LEASE_ID.match(lease_id):
            raise ValueError(f"{lease_id!r} is not a lease id (they look like L0123456789ab)")
        return self.broker.release(lease_id)


def attach_line(body: Any) -> str:
    """The ``%gpu attach`` line for a default request given as JSON, validated first.

    ``{"memory": "2GiB"} -> "%gpu attach --memory 2GiB"``; exactly one of memory, fraction or gpus,
    and an optional pool label. Raises ValueError naming the bad field.
    """
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object such as {\"memory\": \"2GiB\"}")
    unknown = set(body) - {"memory", "fraction", "gpus", "pool"}
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)}: use memory, fraction, gpus and pool")
    memory, fraction, gpus, pool = (body.get(k) for k in ("memory", "fraction", "gpus", "pool"))
    if memory is not None and not isinstance(memory, (str, int)) or isinstance(memory, bool):
        raise ValueError("memory must be a size such as \"8GiB\" or a number of bytes")
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))):
        raise ValueError("fraction must be a number in (0, 1]")
    if gpus is not None and (isinstance(gpus, bool) or not isinstance(gpus, int)):
        raise ValueError("gpus must be a whole number of GPUs")
    if pool is not None and (not isinstance(pool, str) or not re.match(r"^[A-Za-z0-9_.-]{1,64}$", pool)):
        raise ValueError("pool must be a label of 1-64 letters, digits or . _ -")
    if memory is not None and isinstance(memory, str) and len(memory) > 32:
        raise ValueError("memory is too long: write a size such as \"8GiB\"")
    request = SliceRequest.from_options(gpus, float(fraction) if fraction is not None else None,
                                        str(memory) if memory is not None else None, pool or None)
    if request.is_default:
        raise ValueError("name one of memory, fraction or gpus")
    parts = ["%gpu", "attach"]
    if request.gpus is not None:
        parts += ["--gpus", str(request.gpus)]
    if request.fraction is not None:
        parts += ["--fraction", f"{request.fraction:g}"]
    if request.memory is not None:
        short = format_size(request.memory).replace(" ", "")
        parts += ["--memory", short if parse_size(short) == request.memory else str(request.memory)]
    if request.pool:
        parts += ["--pool", request.pool]
    return " ".join(shlex.quote(p) for p in parts)


def kernel_id_of(session: str) -> str | None:
    m = KERNEL_SESSION.match(session or "")
    return m.group(1) if m else None


def notebooks_by_session(sessions: Iterable[dict]) -> dict[str, str]:
    """``{"k-<kernel id>": "path/to/notebook.ipynb"}`` from the Jupyter sessions API's records."""
    out = {}
    for s in sessions:
        kernel = s.get("kernel") or {}
        if kernel.get("id") and s.get("path"):
            out[f"k-{kernel['id']}"] = s["path"]
    return out


def describe_lease(lease: dict) -> str:
    """``"0.25 × 2 GPUs"``-style short size: the fraction of each GPU, or whole GPUs."""
    n = len(lease.get("gpus") or [])
    frac = lease.get("fraction")
    if frac is None or frac >= 1:
        return f"{n} GPU" + ("s" if n != 1 else "")
    return f"{frac:.2g} × GPU" if n <= 1 else f"{frac:.2g} × {n} GPUs"


__all__ = ["PoolView", "attach_line", "notebooks_by_session", "kernel_id_of", "GPUAttachError"]
