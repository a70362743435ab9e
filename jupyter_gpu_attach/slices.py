"""What a cell asks for: a slice of a GPU (a fraction or a memory size) or whole GPUs.

Shared by the magics (parsing ``--memory 2GiB``), the client, the agent CLI and the broker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
#: A MIG profile as NVIDIA names them: compute slices, then memory ("1g.10gb", "3g.40gb", "1g.20gb+me").
MIG_PROFILE = re.compile(r"^[1-8]g\.[0-9]{1,4}gb(\+me)?$")


def parse_size(text: str | int) -> int:
    """``"2GiB"`` -> 2147483648. Accepts B, KB/MB/GB/TB (powers of 1000) and KiB/MiB/GiB/TiB."""
    if isinstance(text, bool):
        raise ValueError(f"not a size: {text!r}")
    if isinstance(text, int):
        if text <= 0:
            raise ValueError(f"size must be positive, got {text}")
        return text
    m = _SIZE.match(str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (write it like 2GiB, 512MiB or 8GB)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value > 2**60:
        raise ValueError(f"size {text!r} is larger than any GPU (write it like 2GiB, 512MiB or 8GB)")
    if value < 1:
        raise ValueError(f"size must be at least 1 byte, got {text!r}")
    return int(value)


def format_size(n: int) -> str:
    """2147483648 -> '2 GiB'; 1536 MiB -> '1.5 GiB'."""
    units = (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))
    for i, (unit, factor) in enumerate(units):
        if n >= factor:
            v = round(n / factor, 1)
            if v >= 1024 and i > 0:  # 1 GiB minus a byte reads as 1 GiB, not 1024.0 MiB
                unit, v = units[i - 1][0], round(v / 1024, 1)
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class SliceRequest:
    """Exactly one of ``gpus``, ``fraction``, ``memory`` (bytes) or ``mig`` (a MIG instance of
    that profile, on a GPU in MIG mode); ``pool`` picks GPUs by label."""

    gpus: int | None = None
    fraction: float | None = None
    memory: int | None = None
    pool: str | None = None
    mig: str | None = None

    def __post_init__(self):
        for k in ("gpus", "fraction", "memory"):
            if isinstance(getattr(self, k), bool):
                raise ValueError(f"--{k} must be a number, got {getattr(self, k)!r}")
        given = [k for k in ("gpus", "fraction", "memory", "mig") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"ask for one of --gpus, --fraction, --memory or --mig, not {' and '.join('--' + g for g in given)}")
        if self.mig is not None and not (isinstance(self.mig, str) and MIG_PROFILE.match(self.mig)):
            raise ValueError(f"--mig must be a MIG profile such as 1g.10gb or 3g.40gb, got {self.mig!r}")
        if self.gpus is not None and not (isinstance(self.gpus, int) and 1 <= self.gpus <= 64):
            raise ValueError(f"--gpus must be a whole number from 1 to 64, got {self.gpus!r}")
        if self.fraction is not None and not (0 < self.fraction <= 1):
            raise ValueError(f"--fraction must be in (0, 1], got {self.fraction!r} (use --gpus N for whole GPUs)")
        if self.memory is not None and not (isinstance(self.memory, int) and self.memory > 0):
            raise ValueError(f"--memory must be a positive size, got {self.memory!r}")
        if self.pool is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.pool):
            raise ValueError(f"--pool must be a label of letters, digits, '.', '_' or '-', got {self.pool!r}")

    @classmethod
    def from_options(cls, gpus=None, fraction=None, memory=None, pool=None, mig=None) -> "SliceRequest":
        """Build from user-facing options, where ``memory`` may be text like ``"2GiB"``."""
        return cls(
            gpus=int(gpus) if gpus is not None else None,
            fraction=float(fraction) if fraction is not None else None,
            memory=parse_size(memory) if memory is not None else None,
            pool=pool,
            mig=mig.strip().lower() if isinstance(mig, str) else mig,
        )

    @property
    def is_default(self) -> bool:
        return self.gpus is None and self.fraction is None and self.memory is None and self.mig is None

    def over(self, default: "SliceRequest") -> "SliceRequest":
        """This request where it says something, ``default`` where it does not (a cell that names
        only ``--pool`` keeps the notebook's size and changes the pool)."""
        if self.is_default:
            return SliceRequest(default.gpus, default.fraction, default.memory, self.pool or default.pool, default.mig)
        return self if self.pool is not None else SliceRequest(self.gpus, self.fraction, self.memory, default.pool,
                                                               self.mig)

    def or_default(self) -> "SliceRequest":
        """A request that names no size means one whole GPU."""
        return SliceRequest(gpus=1, pool=self.pool) if self.is_default else self

    def to_json(self) -> dict[str, Any]:
        # By hand: dataclasses.asdict deep-copies each field, and this runs on every grant.
        out: dict[str, Any] = {}
        for k in _FIELDS:
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        return out

    def describe(self) -> str:
        r = self.or_default()
        if r.mig is not None:
            what = f"a MIG {r.mig} instance"
        elif r.memory is not None:
            what = f"{format_size(r.memory)} of one GPU"
        elif r.fraction is not None:
            what = f"{r.fraction:g} of one GPU"
        else:
            what = f"{r.gpus} whole GPU{'s' if r.gpus != 1 else ''}"
        return what + (f" in pool {r.pool!r}" if r.pool else "")


_FIELDS = tuple(f.name for f in fields(SliceRequest))
