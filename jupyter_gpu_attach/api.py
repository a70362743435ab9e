"""GPU slices from plain Python scripts: ``lease(...)`` and ``@remote(...)``, shells around :class:`GPUSession`.

    import jupyter_gpu_attach as gpa

    with gpa.lease(memory="4GiB") as g:
        y = g.run(train_step, x, lr=0.1)     # runs on a leased slice; y comes back (CuPy -> NumPy)

    @gpa.remote(memory="4GiB")
    def normalise(a):
        import cupy as cp
        a = cp.asarray(a)
        return cp.asnumpy((a - a.mean()) / a.std())

Like a ``%%gpu`` cell, each call leases a slice for exactly as long as it runs and releases it as it
returns (also on error or Ctrl-C). ``lease`` holds the request, not a GPU: between calls inside
the ``with`` block no slice is held. The function travels by value when it is defined in the
script (cloudpickle), by name when it comes from an importable module.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from .slices import SliceRequest

#: What the sandbox runs: the call, its result bound to a name that comes back.
_CALL_SOURCE = "__gpa_result = __gpa_fn(*__gpa_args, **__gpa_kw)"


class Lease:
    """A slice request for calls from Python; each :meth:`run` leases, calls, returns and releases."""

    def __init__(self, *, memory: str | int | None = None, fraction: float | None = None, gpus: int | None = None,
                 pool: str | None = None, timeout: float | None = None, session=None, mig: str | None = None):
        # Bad options fail here, before anything starts, with the same messages as the magic's.
        self.request = SliceRequest.from_options(gpus, fraction, memory, pool, mig)
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive seconds, got {timeout:g}")
        self.timeout = timeout
        self._session = session
        self.last = None  # the last call's CellResult: its lease and timings

    @property
    def session(self):
        """The process's GPU session (connecting on first use, or starting the embedded pool)."""
        if self._session is None:
            from .connection import get_session

            self._session = get_session()
        return self._session

    def __enter__(self) -> "Lease":
        self.session  # connect now, so a missing broker is reported at the `with`, not mid-work
        return self

    def __exit__(self, *exc) -> None:
        return None  # no slice is held between calls: nothing to give back

    def run(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on a leased slice; returns its result (GPU arrays as host arrays)."""
        __tracebackhide__ = True
        if not callable(fn):
            raise TypeError(f"run() needs a function to call, got {type(fn).__name__}")
        namespace: dict[str, Any] = {"__gpa_fn": fn, "__gpa_args": args, "__gpa_kw": kwargs}
        label = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}()"
        # A request with only a pool still counts: it must not fall back to the session's default.
        request = None if self.request.is_default and self.request.pool is None else self.request
        self.last = self.session.run(_CALL_SOURCE, namespace, request, self.timeout, label=label)
        if "__gpa_result" not in namespace:
            why = self.last.not_returned.get("__gpa_result", "it could not be serialised")
            raise TypeError(f"{label} ran on the GPU, but its result cannot come back: {why}. "
                            "Return arrays, numbers, lists, dicts or dataframes (e.g. cupy.asnumpy(x)).")
        return namespace["__gpa_result"]

    def __getstate__(self) -> dict:
        # A remote function that refers to a @remote one carries this along; the session stays home.
        return dict(self.__dict__, _session=None, last=None)

    def __repr__(self) -> str:
        return f"<jupyter_gpu_attach.lease {self.request.describe()}>"


def lease(*, memory: str | int | None = None, fraction: float | None = None, gpus: int | None = None,
          pool: str | None = None, timeout: float | None = None, mig: str | None = None) -> Lease:
    """``with lease(memory="4GiB") as g: g.run(fn, *args)``: calls on a GPU slice, leased per call."""
    return Lease(memory=memory, fraction=fraction, gpus=gpus, pool=pool, timeout=timeout, mig=mig)


def remote(fn: Callable | None = None, *, memory: str | int | None = None, fraction: float | None = None,
           gpus: int | None = None, pool: str | None = None, timeout: float | None = None,
           mig: str | None = None):
    """Decorator: each call of the function runs on a leased GPU slice. ``f.local`` is the plain function."""
    request = Lease(memory=memory, fraction=fraction, gpus=gpus, pool=pool, timeout=timeout, mig=mig)

    def wrap(f: Callable) -> Callable:
        @functools.wraps(f)
        def call(*args, **kwargs):
            __tracebackhide__ = True
            return request.run(f, *args, **kwargs)

        call.local = f
        call.lease = request
        return call

    return wrap(fn) if fn is not None else wrap
