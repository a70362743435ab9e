"""Placement: which GPU (or GPUs) a slice request gets. Pure functions over a snapshot; no I/O.

Every GPU's capacity is its memory in bytes. A fraction F of a GPU holds ``F * memory``; a
``--memory`` request holds exactly that; a whole GPU holds all of it. A GPU is never
over-committed: the allocations on it never add up to more than its memory. Among the GPUs
that fit, the tightest fit wins (best fit keeps large holes for large requests); ties go to
the GPU this session used last, whose warm sandbox is then reused.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import NamedTuple

from jupyter_gpu_attach.slices import SliceRequest, format_size


@dataclass(frozen=True)
class GPU:
    id: str
    agent_id: str
    index: int
    model: str
    memory: int
    simulated: bool
    pool: str = "default"
    mig: str | None = None  # the profile, when this is a MIG instance of a GPU in MIG mode


class Allocation(NamedTuple):  # one per lease slot at each grant: a tuple is made ~5x faster
    gpu_id: str
    memory: int


@dataclass(frozen=True)
class Placement:
    gpus: tuple[GPU, ...]
    memory_per_gpu: int
    fraction_per_gpu: float


class NoFit(Exception):
    """The request cannot be placed. ``never`` is True when no GPU could ever hold it."""

    def __init__(self, message: str, never: bool):
        super().__init__(message)
        self.never = never


def free_memory(gpus: list[GPU], allocations: list[Allocation]) -> dict[str, int]:
    used: dict[str, int] = defaultdict(int)
    for a in allocations:
        used[a.gpu_id] += a.memory
    return {g.id: g.memory - used[g.id] for g in gpus}


def place(
    request: SliceRequest,
    gpus: list[GPU],
    allocations: list[Allocation],
    prefer_gpu_ids: frozenset[str] = frozenset(),
) -> Placement:
    """Choose GPUs for ``request`` among ``gpus`` (all up), given current ``allocations``."""
    request = request.or_default()
    where = f" in pool {request.pool!r}" if request.pool else ""
    candidates = [g for g in gpus if request.pool is None or g.pool == request.pool]
    if not candidates:
        pools = sorted({g.pool for g in gpus})
        hint = f" (pools with GPUs up: {', '.join(pools)})" if pools else " (no agent is up: start one with `gpu-attach agent`)"
        raise NoFit(f"no GPU is up{where}{hint}", never=True)
    free = free_memory(candidates, allocations)
    if request.mig is not None:
        return _place_mig(request.mig, candidates, free, prefer_gpu_ids, where)
    # A GPU in MIG mode is used only as its instances (NVIDIA allows nothing else).
    whole_gpus = [g for g in candidates if g.mig is None]
    if not whole_gpus:
        profiles = ", ".join(sorted({g.mig for g in candidates}))
        raise NoFit(f"every GPU{where} is in MIG mode: ask for one of its instances with --mig ({profiles})",
                    never=True)
    candidates = whole_gpus

    if request.gpus is not None:
        return _place_whole(request.gpus, candidates, free, prefer_gpu_ids, where)

    def need(g: GPU) -> int:
        if request.memory is not None:
            return request.memory
        return max(1, int(g.memory * request.fraction))

    fitting = [g for g in candidates if need(g) <= g.memory]
    if not fitting:
        biggest = max(candidates, key=lambda g: g.memory)
        raise NoFit(
            f"no GPU{where} has {format_size(need(biggest))} at all "
            f"(largest: {format_size(biggest.memory)} on {biggest.id}); ask for less or use --gpus",
            never=True,
        )
    open_now = [g for g in fitting if need(g) <= free[g.id]]
    if not open_now:
        best = max(fitting, key=lambda g: free[g.id])
        raise NoFit(
            f"no GPU{where} has {format_size(need(best))} free now "
            f"(largest free slice: {format_size(max(free[best.id], 0))} on {best.id})",
            never=False,
        )
    chosen = min(open_now, key=lambda g: (free[g.id] - need(g), g.id not in prefer_gpu_ids, g.id))
    n = need(chosen)
    return Placement((chosen,), n, n / chosen.memory)


def _place_whole(n: int, gpus: list[GPU], free: dict[str, int], prefer: frozenset[str], where: str) -> Placement:
    by_agent: dict[str, list[GPU]] = defaultdict(list)
    for g in gpus:
        by_agent[g.agent_id].append(g)
    most = max(len(v) for v in by_agent.values())
    if n > most:
        raise NoFit(f"no host{where} has {n} GPUs (most on one host: {most})", never=True)
    options = []
    for agent_id, agent_gpus in by_agent.items():
        idle = sorted((g for g in agent_gpus if free[g.id] == g.memory), key=lambda g: (g.id not in prefer, g.index))
        if len(idle) >= n:
            options.append((len(idle), -sum(g.id in prefer for g in idle[:n]), agent_id, idle[:n]))
    if not options:
        idle_total = max(sum(free[g.id] == g.memory for g in v) for v in by_agent.values())
        raise NoFit(f"no host{where} has {n} idle GPU{'s' if n > 1 else ''} now (most idle on one host: {idle_total})", never=False)
    chosen = min(options)[3]
    return Placement(tuple(sorted(chosen, key=lambda g: g.index)), chosen[0].memory, 1.0)


def _place_mig(profile: str, gpus: list[GPU], free: dict[str, int], prefer: frozenset[str], where: str) -> Placement:
    """A whole MIG instance of ``profile``: an idle one, the session's last first."""
    same = [g for g in gpus if g.mig == profile]
    if not same:
        have = sorted({g.mig for g in gpus if g.mig})
        hint = f"MIG profiles up: {', '.join(have)}" if have else "no GPU is in MIG mode"
        raise NoFit(f"no MIG {profile} instance{where} ({hint})", never=True)
    idle = [g for g in same if free[g.id] == g.memory]
    if not idle:
        raise NoFit(f"every MIG {profile} instance{where} is in use now ({len(same)} in all)", never=False)
    chosen = min(idle, key=lambda g: (g.id not in prefer, g.agent_id, g.index))
    # Its share of the physical GPU (of 7 compute slices) is what quotas and fair share count.
    return Placement((chosen,), chosen.memory, min(1.0, int(profile.split("g.")[0]) / 7))


def gpu_from_row(r: dict) -> GPU:
    """A GPU from a ``gpus`` row joined as in ``Store.gpus_up``."""
    return GPU(r["id"], r["agent_id"], r["idx"], r["model"], r["memory"], r["simulated"], r["pool"], r.get("mig"))
