"""The wait queue: who goes first when the pool is full, and who may backfill. Pure Python, no I/O.

Order (:func:`rank`): a higher priority class first; within a class, the user (or group) with the
least *decayed* recent usage first (GPU-seconds that halve every ``half_life_s``: fair share);
then arrival.

No starvation (:func:`plan`): walking the queue in that order, the first request that does not
fit *reserves* the GPUs it will get once they drain (the fitting GPU with the most free memory,
or the host with the most idle GPUs for ``--gpus N``). Requests behind it are placed only on
GPUs outside the reservation (backfill), so small requests keep flowing elsewhere but can never
keep taking the share a large request is waiting for. Only the first blocked request reserves:
with one reservation at a time the pool never idles behind a chain of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from jupyter_gpu_attach.slices import SliceRequest

from . import scheduler

#: What a queued request can end as, besides granted.
QUEUE_ENDS = ("timed_out", "cancelled", "abandoned", "refused")


@dataclass
class Waiter:
    """One queued request. ``id`` is the lease id it will be granted under."""

    id: str
    user: str
    group: str
    priority: int
    request: SliceRequest
    session: str
    label: str
    arrived: float
    seq: int
    deadline: float
    last_seen: float
    state: str = "queued"  # queued | granted | timed_out | cancelled | abandoned | refused
    result: dict | None = None  # the grant, once granted
    reason: str = ""
    polling: int = 0  # long-polls in progress: a polled waiter is never abandoned
    refusal: object = None  # the quota refusal, when refused for quota
    reason_code: str = "busy"  # what the refusal counts as in the metrics
    listeners: list[Callable[[], None]] = field(default_factory=list)

    def settle(self, state: str, result: dict | None = None, reason: str = "") -> None:
        self.state, self.result, self.reason = state, result, reason
        listeners, self.listeners = self.listeners, []
        for fn in listeners:
            fn()


class FairShare:
    """Decayed GPU-seconds per user or group: ``usage(k, t) = sum(charge * 0.5 ** ((t - t_c) / half_life))``."""

    def __init__(self, half_life_s: float = 3600.0):
        self.half_life_s = half_life_s
        self._by_key: dict[str, tuple[float, float]] = {}

    def charge(self, key: str, gpu_seconds: float, at: float) -> None:
        self._by_key[key] = (self.usage(key, at) + max(gpu_seconds, 0.0), at)

    def usage(self, key: str, at: float) -> float:
        value, since = self._by_key.get(key, (0.0, at))
        return value * math.pow(0.5, max(at - since, 0.0) / self.half_life_s)

    def snapshot(self, at: float) -> dict[str, float]:
        return {k: round(self.usage(k, at), 3) for k in self._by_key}


def rank(waiters: list[Waiter], usage: Callable[[Waiter], float]) -> list[Waiter]:
    """Priority class (high first), then least decayed usage, then arrival."""
    return sorted(waiters, key=lambda w: (-w.priority, usage(w), w.arrived, w.seq))


@dataclass
class Plan:
    grants: list[tuple[Waiter, scheduler.Placement]]
    never: list[tuple[Waiter, str]]  # can never be placed on what is up now (e.g. its pool is gone)
    reserved: frozenset[str]  # GPU ids held back for the first blocked request
    blocked_by: str | None  # the id of the waiter holding the reservation


def plan(ordered: list[Waiter], gpus: list[scheduler.GPU], allocations: list[scheduler.Allocation],
         admissible: Callable[[Waiter, scheduler.Placement], bool] = lambda w, p: True,
         prefer: Callable[[Waiter], frozenset[str]] = lambda w: frozenset(),
         every_gpu: list[scheduler.GPU] | None = None) -> Plan:
    """Walk ``ordered`` once: grant what fits outside the reservation, reserve for the first that does not.

    ``admissible`` says whether a placement is within the waiter's quota now; one that is not
    stays queued without reserving anything (it waits for its own user's leases, not the pool's).
    ``every_gpu`` (default ``gpus``) also counts drained GPUs: a request that only they could hold
    waits for the undrain instead of being refused.
    """
    allocs = list(allocations)
    reserved: set[str] = set()
    blocked_by = None
    grants, never = [], []
    for w in ordered:
        visible = [g for g in gpus if g.id not in reserved]
        try:
            placement = scheduler.place(w.request, visible, allocs, prefer(w)) if visible else None
        except scheduler.NoFit:
            placement = None
        if placement is None:
            try:
                scheduler.place(w.request, every_gpu or gpus, [], prefer(w))  # could it fit an empty pool?
            except scheduler.NoFit as e:
                never.append((w, str(e)))
                continue
            if blocked_by is None:
                reserved |= reservation(w.request, gpus, allocs)
                blocked_by = w.id
            continue
        if not admissible(w, placement):
            continue
        grants.append((w, placement))
        whole = w.request.or_default().gpus is not None
        allocs += [scheduler.Allocation(g.id, g.memory if whole else placement.memory_per_gpu)
                   for g in placement.gpus]
    return Plan(grants, never, frozenset(reserved), blocked_by)


def reservation(request: SliceRequest, gpus: list[scheduler.GPU],
                allocations: list[scheduler.Allocation]) -> set[str]:
    """The GPUs a blocked request will get once they drain: the closest to fitting."""
    request = request.or_default()
    candidates = [g for g in gpus if request.pool is None or g.pool == request.pool]
    free = scheduler.free_memory(candidates, allocations)
    if request.gpus is not None:
        by_agent: dict[str, list[scheduler.GPU]] = {}
        for g in candidates:
            by_agent.setdefault(g.agent_id, []).append(g)
        hosts = [v for v in by_agent.values() if len(v) >= request.gpus]
        if not hosts:
            return set()
        # The host whose N emptiest GPUs are closest to empty; on it, those N GPUs.
        def emptiest(v):
            return sorted(v, key=lambda g: (-free[g.id] / g.memory, g.index))[:request.gpus]
        best = max(hosts, key=lambda v: (sum(free[g.id] / g.memory for g in emptiest(v)), -min(g.index for g in v)))
        return {g.id for g in emptiest(best)}

    def need(g):
        return request.memory if request.memory is not None else max(1, int(g.memory * request.fraction))

    fitting = [g for g in candidates if need(g) <= g.memory]
    if not fitting:
        return set()
    best = max(fitting, key=lambda g: (free[g.id] - need(g), g.id))
    return {best.id}


def eta_s(position: int, mean_hold_s: float, concurrent: int) -> float:
    """A rough wait: leases ahead of this one end at about ``concurrent / mean_hold_s`` per second."""
    return round(mean_hold_s * math.ceil(position / max(concurrent, 1)), 1)
