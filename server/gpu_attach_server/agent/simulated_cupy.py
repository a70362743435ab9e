"""A NumPy-backed stand-in for ``cupy``, installed only in sandboxes on *simulated* devices.

It lets the same notebook run on a machine with no NVIDIA GPU: ``cp.asarray(x) @ cp.asarray(x)``
computes with NumPy on the CPU. It is not CuPy: anything NumPy lacks raises AttributeError
naming the simulated device. ``cupy.__simulated__`` is True so code can tell.
"""

from __future__ import annotations

import sys
import types

import numpy as _np

__simulated__ = True
__import_name__ = "cupy"  # the name cells import it by, and the notebook would
__version__ = "simulated (NumPy " + _np.__version__ + ")"

ndarray = _np.ndarray


def asarray(a, dtype=None, order=None):
    return _np.asarray(a, dtype=dtype, order=order)


def array(obj, dtype=None, copy=True, order="K", ndmin=0):
    return _np.array(obj, dtype=dtype, copy=copy, order=order, ndmin=ndmin)


def asnumpy(a, stream=None, order="C", out=None):
    result = _np.asarray(a, order=order)
    if out is not None:
        out[...] = result
        return out
    return result


def get_array_module(*args):
    return sys.modules[__name__]


def is_available() -> bool:
    """True: cells do run here, on the CPU; check ``cupy.__simulated__`` for a real GPU."""
    return True


class _SimulatedMemoryPool:
    """Bookkeeping-only pool, so code that manages CuPy's pool runs unchanged."""

    def __init__(self):
        self._limit = 0

    def used_bytes(self) -> int:
        return 0

    def total_bytes(self) -> int:
        return 0

    def free_bytes(self) -> int:
        return 0

    def free_all_blocks(self, stream=None) -> None:
        return None

    def set_limit(self, size=None, fraction=None) -> None:
        self._limit = int(size or 0)

    def get_limit(self) -> int:
        return self._limit


_pool = _SimulatedMemoryPool()
_pinned_pool = _SimulatedMemoryPool()


def get_default_memory_pool():
    return _pool


def get_default_pinned_memory_pool():
    return _pinned_pool


class _Device:
    def __init__(self, device=0):
        self.id = int(device)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def use(self):
        return self

    def synchronize(self):
        return None


def _device_count() -> int:
    return 1


cuda = types.SimpleNamespace(
    Device=_Device,
    is_available=is_available,
    runtime=types.SimpleNamespace(getDeviceCount=_device_count),
    Stream=types.SimpleNamespace(null=None),
)


def __getattr__(name: str):
    try:
        return getattr(_np, name)
    except AttributeError:
        raise AttributeError(
            f"cupy.{name} is not available on a simulated device (the stand-in only has NumPy's API)"
        ) from None
