"""Response bodies of the broker's HTTP API, for the OpenAPI document (clients are generated from it).

The per-cell routes return plain JSON built by the core and declare these models in
``responses=`` only, so the document is exact while no response is validated twice at run time.
"""

from __future__ import annotations

from typing import Union, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


class _Doc(BaseModel):
    model_config = ConfigDict(extra="allow")


class Error(_Doc):
    """Every refusal: ``detail`` says what went wrong and what to do; ``reason`` is machine-readable."""

    detail: Any = Field(..., description="what went wrong and how to fix it (a list of field errors for 422)")
    reason: Optional[str] = Field(None, description="busy | too_large | over_quota | not_found | forbidden | conflict | bad_request")


class ValidationError(_Doc):
    detail: list[dict[str, Any]]


class AgentRef(_Doc):
    id: str
    address: str


class DeviceOut(_Doc):
    id: str
    index: int
    uuid: str
    model: str
    memory: int
    simulated: bool
    pool: str
    mig: Optional[str] = Field(None, description="the MIG profile, when the device is a MIG instance")


class Grant(_Doc):
    id: str
    state: Literal["granted"]
    user: str
    session: str
    agent: AgentRef
    gpus: list[DeviceOut]
    memory_per_gpu: int
    fraction: float
    simulated: bool
    granted_at: float
    expires_at: float
    ttl_s: float
    token: str = Field(..., description="signed grant: present it to the agent")
    borrowed: Optional[dict[str, Any]] = Field(None, description=(
        "present when granted above a quota that may borrow idle capacity: the quota and the numbers "
        "(as an over_quota refusal gives them); the lease is not renewed once another request waits"))


class Queued(_Doc):
    id: str = Field(..., description="the lease id it will be granted under")
    state: Literal["queued"]
    user: str
    session: str
    request: dict[str, Any]
    label: str
    position: int = Field(..., ge=1)
    of: int = Field(..., ge=1)
    eta_s: float = Field(..., description="a rough estimate of the wait")
    queued_at: float
    wait_until: float
    reserved: bool = Field(..., description="GPUs are held back for this request (no starvation)")


class QueueEnded(_Doc):
    id: str
    state: Literal["timed_out", "cancelled", "abandoned", "refused"]
    user: str
    session: str
    request: dict[str, Any]
    label: str
    end_reason: str


class LeaseInfo(_Doc):
    id: str
    state: Literal["granted", "released", "expired", "revoked", "failed"]
    user: str
    session: str
    request: dict[str, Any]
    agent_id: str
    gpus: list[str]
    memory_per_gpu: int
    fraction: float
    granted_at: float
    expires_at: float
    ended_at: Optional[float]
    end_reason: Optional[str]
    label: str
    borrowed: Optional[dict[str, Any]] = Field(None, description=(
        "set when it was granted above a quota that may borrow idle capacity (as the grant said): "
        "the quota and the numbers; such a lease is not renewed once another request waits"))


class LeasePage(_Doc):
    leases: list[Union[Queued, LeaseInfo]] = Field(..., description="requests still in the queue first (first page), "
                                                   "then leases, newest first")
    next: Optional[str] = Field(None, description="pass as ?before= for the next page; null at the end")


class Renewed(_Doc):
    id: str
    state: Literal["granted"]
    expires_at: float
    token: str


class Ended(_Doc):
    id: str
    state: str
    ended_at: Optional[float]
    end_reason: Optional[str]


class PoolGPU(_Doc):
    id: str
    agent: str
    agent_state: str
    index: int
    model: str
    simulated: bool
    pool: str
    memory: int
    used_memory: int
    free_memory: int
    used_share: float
    free_share: float
    leases: list[str]


class Pool(_Doc):
    gpus: list[PoolGPU]
    time: float


class Whoami(_Doc):
    name: str
    role: str


class Health(_Doc):
    ok: bool


class Registered(_Doc):
    agent_id: str
    incarnation: str
    public_key: str
    heartbeat_interval_s: float


class HeartbeatReply(_Doc):
    active: dict[str, float]


def errors(*codes: int) -> dict[int, dict]:
    """``responses=`` entries for the refusals a route can give."""
    text = {400: "bad request (e.g. a cursor this broker did not give out)", 401: "missing or unknown bearer token",
            403: "the token may not do this", 404: "no such lease (or agent, user, quota)",
            409: "conflicts with the current state (capacity, quota, lease ended)",
            413: "request body too large", 422: "the request does not match the schema"}
    out = {c: {"model": ValidationError if c == 422 else Error, "description": text[c]} for c in codes}
    return out
