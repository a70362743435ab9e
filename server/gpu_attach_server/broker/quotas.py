"""Who may hold how much: users and their groups and priority classes, quotas, drained GPUs.

A plain in-memory view (:class:`Policy`) of the ``users``, ``quotas`` and ``drains`` tables,
loaded once and again after every admin change (and by the reaper, so that broker replicas
converge): the per-cell path reads it without touching the database.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select

from jupyter_gpu_attach.slices import SliceRequest, format_size

from . import scheduler
from .site_tables import drains, quotas, users


@dataclass(frozen=True)
class Quota:
    kind: str  # user | group
    subject: str
    max_share: float | None = None
    max_memory: int | None = None
    max_lease_s: float | None = None
    borrow: bool = False  # may go over max_share/max_memory while capacity is idle

    def to_json(self) -> dict:
        return {"kind": self.kind, "subject": self.subject, "max_share": self.max_share,
                "max_memory": self.max_memory, "max_lease_s": self.max_lease_s, "borrow": self.borrow}


@dataclass(frozen=True)
class Refusal:
    """A request over a quota, with the numbers: what was asked, what is in use, the limit."""

    quota: Quota
    resource: str  # share | memory
    asked: float
    in_use: float
    limit: float

    def message(self) -> str:
        fmt = (lambda v: format_size(int(v))) if self.resource == "memory" else (lambda v: f"{v:g} GPU")
        who = f"{self.quota.kind} {self.quota.subject!r}"
        return (f"over the {self.resource} quota of {who}: asked {fmt(self.asked)}, in use {fmt(self.in_use)}, "
                f"limit {fmt(self.limit)}; release a lease or ask for less (an admin can raise it: "
                f"gpu-attach admin quota set {self.quota.kind} {self.quota.subject} ...)")

    def to_json(self) -> dict:
        return {"quota": self.quota.to_json(), "resource": self.resource, "asked": self.asked,
                "in_use": self.in_use, "limit": self.limit}


@dataclass
class Usage:
    share: float = 0.0
    memory: int = 0


@dataclass
class Policy:
    users: dict[str, tuple[str | None, int]] = field(default_factory=dict)  # name -> (group, priority)
    quotas: dict[tuple[str, str], Quota] = field(default_factory=dict)
    drained: frozenset[str] = frozenset()

    @classmethod
    def load(cls, conn) -> "Policy":
        return cls(
            users={r.name: (r.group, r.priority) for r in conn.execute(select(users))},
            quotas={(r.kind, r.subject): Quota(r.kind, r.subject, r.max_share, r.max_memory, r.max_lease_s,
                                               bool(r.borrow))
                    for r in conn.execute(select(quotas))},
            drained=frozenset(r.target for r in conn.execute(select(drains.c.target))),
        )

    def group_of(self, user: str) -> str | None:
        return self.users.get(user, (None, 0))[0]

    def priority_of(self, user: str) -> int:
        return self.users.get(user, (None, 0))[1]

    def members(self, group: str) -> set[str]:
        return {u for u, (g, _) in self.users.items() if g == group}

    def limits(self, user: str) -> list[Quota]:
        out = [q for q in (self.quotas.get(("user", user)),) if q]
        group = self.group_of(user)
        if group and ("group", group) in self.quotas:
            out.append(self.quotas[("group", group)])
        return out

    def max_lease_s(self, user: str) -> float | None:
        bounds = [q.max_lease_s for q in self.limits(user) if q.max_lease_s]
        return min(bounds) if bounds else None

    def check(self, user: str, share: float, memory: int, in_use: dict[str, Usage],
              borrowing: bool = False) -> Refusal | None:
        """The first quota of ``user`` (its own, then its group's) that asking for ``share`` and
        ``memory`` more would break, given ``in_use`` per user; None if all hold. ``borrowing``:
        quotas that allow borrowing idle capacity do not count."""
        for q in self.limits(user):
            if borrowing and q.borrow:
                continue
            holders = {user} if q.kind == "user" else self.members(q.subject) | {user}
            used = Usage(sum(in_use[u].share for u in holders if u in in_use),
                         sum(in_use[u].memory for u in holders if u in in_use))
            if q.max_share is not None and used.share + share > q.max_share + 1e-9:
                return Refusal(q, "share", round(share, 4), round(used.share, 4), q.max_share)
            if q.max_memory is not None and used.memory + memory > q.max_memory:
                return Refusal(q, "memory", memory, used.memory, q.max_memory)
        return None

    def never_fits(self, user: str, share: float, memory: int) -> Refusal | None:
        """A request larger than a quota even with nothing in use: waiting cannot help."""
        return self.check(user, share, memory, {})


def asks(request: SliceRequest, placement: scheduler.Placement) -> tuple[float, int]:
    """What a placement takes from a quota: GPUs' worth of share, and bytes over all its GPUs."""
    n = len(placement.gpus)
    whole = request.or_default().gpus is not None
    memory = sum(g.memory for g in placement.gpus) if whole else placement.memory_per_gpu * n
    return placement.fraction_per_gpu * n, memory


def in_use(allocs) -> dict[str, Usage]:
    """Per user, the share and memory its granted leases hold (from the allocation rows)."""
    out: dict[str, Usage] = {}
    for _gpu_id, memory, _lease, user, fraction in allocs:
        u = out.setdefault(user, Usage())
        u.share += fraction
        u.memory += memory
    return out
