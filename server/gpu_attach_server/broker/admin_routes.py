"""``/v1/admin/...``: the admin API, a thin table of routes over :class:`SiteAdmin`. Admin token only.

Reads that may be large (leases, usage, audit) run on a worker thread, off the event loop that
serves grants.
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, Literal, Optional

from fastapi import APIRouter, Body, Depends, HTTPException, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from .admin import SiteAdmin
from .auth import Principal, TokenBook
from .background import in_background
from .core import LEASE_STATES, Broker
from .models import MAX_BYTES
from .schemas import errors

_USER = r"^[A-Za-z0-9_.@-]{1,128}$"
_GROUP = r"^[A-Za-z0-9_.@-]{1,128}$"
_CURSOR = r"^[0-9]{1,12}(\.[0-9]{1,20})?(e[+-]?[0-9]{1,3})?_L[0-9a-f]{12}$"
LeaseId = Annotated[str, Path(pattern=r"^L[0-9a-f]{12}$")]
UserName = Annotated[str, Path(pattern=_USER)]
AgentName = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.:@-]{1,128}$")]
GPUIndex = Annotated[int, Path(ge=0, le=1024)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


class RevokeIn(_In):
    reason: str = Field("", max_length=200, description="told to the cell's owner")


class DrainIn(_In):
    reason: str = Field("", max_length=200)


class UserIn(_In):
    group: Optional[str] = Field(None, pattern=_GROUP, description="fair share and group quotas count by this")
    priority: int = Field(0, ge=-10, le=10, description="higher classes are served first from the queue")


class QuotaIn(_In):
    max_share: Optional[float] = Field(None, ge=0, le=4096, description="GPUs' worth held at once (0.5 = half a GPU)")
    max_memory: Optional[int] = Field(None, ge=0, le=MAX_BYTES, description="bytes held at once, over all GPUs")
    max_lease_s: Optional[float] = Field(None, gt=0, le=30 * 86400, description="a lease is revoked this long after its grant")
    borrow: bool = Field(False, description=(
        "may go over max_share and max_memory while capacity is idle (nobody waits); such a lease "
        "is not renewed once a request waits, so its cell stops within one TTL"))


class TokenIn(_In):
    user: str = Field(..., pattern=_USER)
    label: str = Field("", max_length=128)


class AgentRow(_Out):
    id: str
    address: str
    state: str
    version: str
    registered_at: float
    last_heartbeat_age_s: float
    gpus: int
    drained: bool


class GPURow(_Out):
    id: str
    agent: str
    agent_state: str
    pool: str
    memory: int
    used_memory: int
    used_share: float
    leases: list[str]
    drained: bool


class AdminLease(_Out):
    id: str
    state: str
    user: str
    session: str
    label: str
    gpus: list[str]
    granted_at: float
    age_s: float
    borrowed: Optional[dict[str, Any]] = Field(None, description=(
        "set when granted above a quota that may borrow idle capacity: the quota and the numbers"))


class AdminLeasePage(_Out):
    leases: list[AdminLease]
    next: Optional[str]


class QueueEntry(_Out):
    position: int
    id: str
    user: str
    group: Optional[str]
    priority: int
    session: str
    label: str
    request: dict[str, Any]
    waited_s: float
    wait_until: float
    usage_gpu_s: float


class QueueOut(_Out):
    time: float
    reserved_gpus: list[str]
    entries: list[QueueEntry]


class Ended(_Out):
    id: str
    state: str
    ended_at: Optional[float]
    end_reason: Optional[str]


class DrainOut(_Out):
    target: str
    kind: Literal["agent", "gpu"]
    drained: bool


class UserOut(_Out):
    name: str
    group: Optional[str]
    priority: int


class GroupOut(_Out):
    name: str
    members: list[str]
    quota: Optional[dict[str, Any]]


class QuotaOut(_Out):
    kind: Literal["user", "group"]
    subject: str
    max_share: Optional[float]
    max_memory: Optional[int]
    max_lease_s: Optional[float]
    borrow: bool


class Deleted(_Out):
    deleted: bool


class TokenCreated(_Out):
    id: str
    user: str
    label: str
    token: str = Field(..., description="shown only this once; the broker keeps its SHA-256")


class TokenRow(_Out):
    id: str
    user: str
    label: str
    created_at: float
    revoked_at: Optional[float]


class TokenRevoked(_Out):
    id: str
    user: str
    revoked: bool


class UsageOut(_Out):
    since: float
    until: float
    by: Literal["user", "group", "gpu"]
    rows: list[dict[str, Any]]


class AuditRow(_Out):
    id: int
    at: float
    actor: str
    action: str
    target: str
    detail: dict[str, Any]


def admin_router(broker: Broker, tokens: TokenBook, who: Callable[[Request], Principal]) -> APIRouter:
    site = SiteAdmin(broker, tokens)

    async def admin(request: Request) -> Principal:
        p = who(request)
        if p.role != "admin":
            raise HTTPException(403, "the admin API needs the admin token (GPU_ATTACH_ADMIN_TOKEN)")
        return p

    E = errors
    r = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(admin)], responses=E(401, 403))

    @r.get("/agents", response_model=list[AgentRow])
    async def list_agents():
        return site.agents()

    @r.get("/gpus", response_model=list[GPURow])
    async def list_gpus():
        return site.gpus()

    @r.get("/leases", response_model=AdminLeasePage, responses=E(400, 422))
    async def list_leases(who: Principal = Depends(admin),
                          user: Optional[str] = Query(None, pattern=_USER),
                          state: Optional[str] = Query(None, pattern="^(" + "|".join(LEASE_STATES) + ")$"),
                          before: Optional[str] = Query(None, pattern=_CURSOR),
                          limit: int = Query(100, ge=1, le=1000)):
        return await in_background(site.leases, who, user, state, before, limit)

    @r.get("/queue", response_model=QueueOut)
    async def queue():
        return broker.queue_view()

    @r.post("/leases/{lease_id}/revoke", response_model=Ended, responses=E(404, 422))
    async def revoke(lease_id: LeaseId, body: RevokeIn = Body(RevokeIn()), who: Principal = Depends(admin)):
        return site.revoke(who.name, lease_id, body.reason)

    @r.post("/agents/{agent_id}/drain", response_model=DrainOut, responses=E(404, 422))
    async def drain_agent(agent_id: AgentName, body: DrainIn = Body(DrainIn()), who: Principal = Depends(admin)):
        """Drain an agent: no new grants on its GPUs; running cells finish."""
        return site.drain(who.name, "agent", agent_id, body.reason, True)

    @r.post("/agents/{agent_id}/undrain", response_model=DrainOut, responses=E(404, 422))
    async def undrain_agent(agent_id: AgentName, who: Principal = Depends(admin)):
        return site.drain(who.name, "agent", agent_id, "", False)

    @r.post("/agents/{agent_id}/gpus/{index}/drain", response_model=DrainOut, responses=E(404, 422))
    async def drain_gpu(agent_id: AgentName, index: GPUIndex, body: DrainIn = Body(DrainIn()),
                        who: Principal = Depends(admin)):
        """Drain one GPU (id ``AGENT/INDEX``): no new grants on it; running cells finish."""
        return site.drain(who.name, "gpu", f"{agent_id}/{index}", body.reason, True)

    @r.post("/agents/{agent_id}/gpus/{index}/undrain", response_model=DrainOut, responses=E(404, 422))
    async def undrain_gpu(agent_id: AgentName, index: GPUIndex, who: Principal = Depends(admin)):
        return site.drain(who.name, "gpu", f"{agent_id}/{index}", "", False)

    @r.get("/users", response_model=list[UserOut])
    async def list_users():
        return site.users()

    @r.put("/users/{name}", response_model=UserOut, responses=E(422))
    async def set_user(name: UserName, body: UserIn, who: Principal = Depends(admin)):
        return site.set_user(who.name, name, body.group, body.priority)

    @r.delete("/users/{name}", response_model=Deleted, responses=E(404, 422))
    async def delete_user(name: UserName, who: Principal = Depends(admin)):
        return site.delete_user(who.name, name)

    @r.get("/groups", response_model=list[GroupOut])
    async def list_groups():
        return site.groups()

    @r.get("/quotas", response_model=list[QuotaOut])
    async def list_quotas():
        return site.quotas()

    @r.put("/quotas/{kind}/{subject}", response_model=QuotaOut, responses=E(422))
    async def set_quota(kind: Literal["user", "group"], subject: UserName, body: QuotaIn,
                        who: Principal = Depends(admin)):
        return site.set_quota(who.name, kind, subject, body.max_share, body.max_memory, body.max_lease_s, body.borrow)

    @r.delete("/quotas/{kind}/{subject}", response_model=Deleted, responses=E(404, 422))
    async def delete_quota(kind: Literal["user", "group"], subject: UserName, who: Principal = Depends(admin)):
        return site.delete_quota(who.name, kind, subject)

    @r.post("/tokens", response_model=TokenCreated, status_code=201, responses=E(422))
    async def create_token(body: TokenIn, who: Principal = Depends(admin)):
        return site.create_token(who.name, body.user, body.label)

    @r.get("/tokens", response_model=list[TokenRow], responses=E(422))
    async def list_tokens(user: Optional[str] = Query(None, pattern=_USER)):
        return site.list_tokens(user)

    @r.delete("/tokens/{token_id}", response_model=TokenRevoked, responses=E(404, 409, 422))
    async def revoke_token(token_id: Annotated[str, Path(pattern=r"^T[0-9a-f]{12}$")], who: Principal = Depends(admin)):
        return site.revoke_token(who.name, token_id)

    @r.get("/usage", response_model=UsageOut, responses=E(422))
    async def usage(since: float = Query(..., ge=0, le=1e11, description="start, Unix seconds"),
                    until: Optional[float] = Query(None, ge=0, le=1e11, description="end, Unix seconds (default: now)"),
                    by: Literal["user", "group", "gpu"] = "user"):
        import time

        end = until if until is not None else time.time()
        # A range that ends before it starts (or starts in the future) is empty: no rows.
        return await in_background(site.usage, since, max(end, since), by)

    @r.get("/audit", response_model=list[AuditRow], responses=E(422))
    async def audit_log(since: Optional[float] = Query(None, ge=0, le=1e11), limit: int = Query(100, ge=1, le=1000)):
        return await in_background(site.audit_log, since, limit)

    return r
