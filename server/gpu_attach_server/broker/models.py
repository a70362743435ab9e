"""Request bodies of the broker's HTTP API. Bad input gets a 422 that names the field."""

from __future__ import annotations

import re
from typing import Annotated, Optional

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from jupyter_gpu_attach.slices import SliceRequest, parse_size

_NAME = r"^[A-Za-z0-9_.:@-]{1,128}$"
# Byte counts as integers stop at 1 PiB: exact in a double, so every JSON client agrees on the bound.
MAX_BYTES = 2**50
# A size the schema itself accepts only if parse_size does: 1 byte up to 999999.999 TiB (< 2**60).
_SIZE = r"^\s*[1-9][0-9]{0,5}(\.[0-9]{1,3})?\s*([kKmMgGtT][iI]?)?[bB]?\s*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Exactly one size may be named; said in the schema too, so generated clients know it.
_ONE_SIZE = {"not": {"anyOf": [
    {"required": list(pair), "properties": {k: {"not": {"type": "null"}} for k in pair}}
    for pair in (("gpus", "fraction"), ("gpus", "memory"), ("fraction", "memory"),
                 ("gpus", "mig"), ("fraction", "mig"), ("memory", "mig"))]}}
_MIG = r"^[1-8]g\.[0-9]{1,4}gb(\+me)?$"


class LeaseRequest(_Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_ONE_SIZE)

    gpus: Optional[int] = Field(None, ge=1, le=64, description="whole GPUs on one host")
    fraction: Optional[float] = Field(None, gt=0, le=1, description="share of one GPU")
    # Validated by _size (whose errors say how to write a size); the schema states the same rule.
    memory: Annotated[Optional[int | str], WithJsonSchema({"anyOf": [
        {"type": "integer", "minimum": 1, "maximum": MAX_BYTES}, {"type": "string", "pattern": _SIZE},
        {"type": "null"}]})] = Field(
        None, description="bytes, or a size such as '8GiB' (KB/MB/GB/TB: powers of 1000; KiB/MiB/GiB/TiB: of 1024)")
    pool: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    mig: Optional[str] = Field(None, pattern=_MIG, description="a whole MIG instance of this profile, e.g. 1g.10gb")
    session: str = Field(..., pattern=_NAME, description="the notebook session asking")
    label: str = Field("", max_length=256, description="free text shown in listings, e.g. the cell")
    wait_s: float = Field(0.0, ge=0, le=86400, description=(
        "seconds the request may wait in the queue if no GPU can take it now (0: refuse at once "
        "with 409). A queued request answers 202; poll GET /v1/leases/{id}?wait=S for the grant"))

    @field_validator("memory")
    @classmethod
    def _size(cls, v):
        if v is None:
            return v
        if isinstance(v, str) and not re.match(_SIZE, v):
            raise ValueError(f"not a size: {v[:40]!r} (write it like 2GiB, 512MiB or 8GB, up to 6 digits)")
        if isinstance(v, int) and not isinstance(v, bool) and v > MAX_BYTES:
            raise ValueError(f"{v} bytes is larger than any GPU (write it like 2GiB, 512MiB or 8GB)")
        try:
            return parse_size(v)
        except ValueError as e:
            raise ValueError(str(e)) from None

    @model_validator(mode="after")
    def _one_size(self):
        self.slice()  # raises ValueError naming the conflicting options
        return self

    def slice(self) -> SliceRequest:
        return SliceRequest(gpus=self.gpus, fraction=self.fraction, memory=self.memory, pool=self.pool, mig=self.mig)


class Device(_Strict):
    index: int = Field(..., ge=0, le=1024)
    uuid: str = Field(..., max_length=128)
    model: str = Field(..., max_length=128)
    memory: int = Field(..., gt=0, le=2**50)
    simulated: bool
    pool: str = Field("default", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    mig: Optional[str] = Field(None, pattern=_MIG, description="set when this device is a MIG instance: its profile")


class AgentRegistration(_Strict):
    agent_id: str = Field(..., pattern=_NAME)
    address: str = Field(..., max_length=256, pattern=r"^[A-Za-z0-9_.:\[\]-]+:\d{1,5}$")
    devices: list[Device] = Field(..., max_length=1024)
    version: str = Field("", max_length=32)


class Heartbeat(_Strict):
    incarnation: str = Field(..., max_length=64)
    running: list[str] = Field(default_factory=list, max_length=10000)
    # Real GPUs: the NVML utilisation (0-1) of each running lease's devices at this beat; a lease
    # without one counts as busy for as long as its cell runs (simulated devices, MIG instances).
    utilisation: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(default_factory=dict, max_length=10000)
