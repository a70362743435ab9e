"""The kernel <-> agent wire format, shared by the notebook side and the agent's sandbox.

A *frame* is a small JSON header plus zero or more raw binary buffers::

    b"GPA1" | u32 header_len | u32 n_buffers | u64 len(buffer_i) * n | header JSON | buffers...

Values travel as a cloudpickle stream whose large buffers (NumPy arrays, bytes-like objects) are
pickle protocol 5 out-of-band buffers: they go over the socket as raw frames, are never copied
into the pickle, and are received straight into their final memory (``recv_into``).
"""

from __future__ import annotations

import importlib
import io
import json
import pickle
import socket
import struct
import sys
import time
import types
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
import xxhash

MAGIC = b"GPA1"
#: 2: the session's namespace lives in its sandbox; values travel together, by content hash.
PROTOCOL_VERSION = 2
_PREFIX = struct.Struct("<4sII")
_LEN = struct.Struct("<Q")

#: Defaults for what one frame may carry; each side can lower or raise them.
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_BUFFERS = 65536
MAX_PAYLOAD_BYTES = 64 * 1024**3
#: A run frame up to this size follows the hello at once instead of waiting for ``admitted``.
PIPELINE_MAX_BYTES = 1024 * 1024


class WireError(Exception):
    """The peer sent something that is not a valid frame, or the connection broke mid-frame."""


class PeerClosed(WireError):
    """The peer closed the connection (cleanly, between frames, or in the middle of one)."""


@dataclass
class Frame:
    header: dict[str, Any]
    buffers: list[Any] = field(default_factory=list)

    @property
    def op(self) -> str:
        return self.header.get("op", "")


@dataclass
class Limits:
    max_header_bytes: int = MAX_HEADER_BYTES
    max_buffers: int = MAX_BUFFERS
    max_payload_bytes: int = MAX_PAYLOAD_BYTES


def send_frame(sock: socket.socket, header: dict[str, Any], buffers: list[Any] = ()) -> int:
    """Write one frame; buffers are sent from their own memory, without joining them."""
    head = json.dumps(header, separators=(",", ":")).encode()
    views = [memoryview(b).cast("B") for b in buffers]
    prefix = _PREFIX.pack(MAGIC, len(head), len(views)) + b"".join(_LEN.pack(v.nbytes) for v in views)
    small = prefix + head
    # Small frames go out in one syscall; large buffers are written from their own memory.
    if sum(v.nbytes for v in views) <= 64 * 1024:
        sock.sendall(small + b"".join(views))
    else:
        sock.sendall(small)
        for v in views:
            sock.sendall(v)
    return len(small) + sum(v.nbytes for v in views)


def _recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    n = view.nbytes
    while got < n:
        k = sock.recv_into(view[got:], min(n - got, 1 << 24))
        if k == 0:
            raise PeerClosed(f"connection closed after {got} of {n} bytes")
        got += k


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _recv_exact_into(sock, memoryview(buf))
    return bytes(buf)


def recv_frame(sock: socket.socket, limits: Limits | None = None, recycler: "BufferRecycler | None" = None,
               on_header=None) -> Frame:
    """Read one frame, refusing headers, buffer counts and payloads over ``limits``.

    With ``recycler``, large buffers come from memory that earlier frames used and nobody
    references any more, instead of freshly faulted pages."""
    limits = limits or Limits()
    first = sock.recv(1, socket.MSG_PEEK)
    if not first:
        raise PeerClosed("connection closed")
    magic, head_len, n_bufs = _PREFIX.unpack(_recv_exact(sock, _PREFIX.size))
    if magic != MAGIC:
        raise WireError("not a gpu-attach frame (bad magic); is this port an agent's data port?")
    if head_len > limits.max_header_bytes:
        raise WireError(f"frame header of {head_len} bytes is over the limit of {limits.max_header_bytes}")
    if n_bufs > limits.max_buffers:
        raise WireError(f"frame has {n_bufs} buffers, over the limit of {limits.max_buffers}")
    sizes = [_LEN.unpack_from(b, 0)[0] for b in _chunks(_recv_exact(sock, _LEN.size * n_bufs), _LEN.size)]
    total = sum(sizes)
    if total > limits.max_payload_bytes:
        raise WireError(
            f"frame payload of {total} bytes is over the limit of {limits.max_payload_bytes} bytes for this cell "
            "(the slice's host-memory limit, or the agent's --max-payload): ask for a larger slice, or send less"
        )
    try:
        header = json.loads(_recv_exact(sock, head_len))
    except ValueError as e:
        raise WireError(f"frame header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise WireError("frame header must be a JSON object")
    if on_header is not None:  # before any buffer is allocated: the receiver may free memory for them
        on_header(header)
    buffers = []
    for size in sizes:
        buf = recycler.take(size) if recycler is not None else _receive_buffer(size)
        _recv_exact_into(sock, memoryview(buf))
        buffers.append(buf)
    return Frame(header, buffers)


def _receive_buffer(size: int):
    """Memory for one incoming buffer, which becomes the array it carries (no copy).

    ``bytearray`` zero-fills, then faults its 4 KiB pages in one by one as data lands: for
    1 GiB that took longer than the transfer itself. NumPy's allocator leaves the memory
    unfilled and asks for transparent huge pages on large blocks, so a GiB faults in as
    512 pages instead of 262144.
    """
    if size < (1 << 20):
        return bytearray(size)
    import numpy

    return numpy.empty(size, dtype=numpy.uint8)


class BufferRecycler:
    """Receive buffers kept for reuse between frames of one peer (one sandbox's cells).

    A notebook loop sends same-shaped batches cell after cell; faulting in fresh pages for each
    costs about as much as the transfer. A kept buffer is reused only when nothing but this
    recycler references it (an array the cell stored somewhere keeps its memory for itself).
    The memory holds the same session's earlier input, so nothing crosses between users.
    """

    MIN_BYTES = 1 << 20

    def __init__(self, max_bytes: int = 4 * 1024**3, idle_s: float = 60.0):
        self.max_bytes, self.idle_s = max_bytes, idle_s
        self._kept: list[tuple[float, Any]] = []  # (last used, buffer), oldest first

    def take(self, size: int):
        now = time.monotonic()
        self._kept = [(t, b) for t, b in self._kept if now - t < self.idle_s]
        for i, (_, buf) in enumerate(self._kept):
            # 3 = this list's tuple, the loop variable, getrefcount's own argument.
            if len(buf) == size and sys.getrefcount(buf) <= 3:
                del self._kept[i]
                return buf
        return _receive_buffer(size)

    def keep(self, buffers: list[Any]) -> None:
        now = time.monotonic()
        for buf in buffers:
            if len(buf) >= self.MIN_BYTES and all(buf is not b for _, b in self._kept):
                self._kept.append((now, buf))
        while sum(len(b) for _, b in self._kept) > self.max_bytes:
            self._kept.pop(0)


def _chunks(data: bytes, size: int):
    return [data[i : i + size] for i in range(0, len(data), size)]


# ----------------------------------------------------------------------------------------------
# Values


class _HostPickler(cloudpickle.Pickler):
    """cloudpickle that brings device arrays home (CuPy arrays become NumPy, CUDA tensors CPU) and
    keeps notebook functions in the notebook: a function or class defined in ``namespace`` (the
    notebook's, or the sandbox's) is rebuilt in the receiving side's namespace, so it reads that
    side's current globals when called instead of copies taken when it was sent."""

    def __init__(self, file, namespace: dict | None = None, **kw):
        super().__init__(file, **kw)
        self._namespace = namespace
        if namespace is not None:
            self._marker: dict = {}
            self.globals_ref[id(namespace)] = self._marker

    def persistent_id(self, obj):
        if self._namespace is not None and obj is self._marker:
            return "ns"
        return None

    def reducer_override(self, obj):
        t = type(obj)
        mod = t.__module__ or ""
        # Reduced as the host array itself, so a device array and its host copy hash the same.
        if mod.startswith("cupy") and t.__name__ == "ndarray" and hasattr(obj, "get"):
            return obj.get().__reduce_ex__(5)
        if mod.startswith("matplotlib.figure") and t.__name__ == "Figure":
            # A figure travels as a picture of itself, never re-opened in the receiving pyplot:
            # the sandbox already showed it, and the notebook would show it a second time.
            reduced = obj.__reduce_ex__(5)
            if len(reduced) > 2 and isinstance(reduced[2], dict) and "_restore_to_pylab" in reduced[2]:
                state = dict(reduced[2])
                del state["_restore_to_pylab"]
                return (*reduced[:2], state, *reduced[3:])
            return reduced
        torch = sys.modules.get("torch") if mod.startswith("torch") else None
        if torch is not None and isinstance(obj, torch.Tensor) and obj.is_cuda:
            return obj.detach().cpu().__reduce_ex__(5)
        return super().reducer_override(obj)

    def _dynamic_function_reduce(self, func):
        reduced = super()._dynamic_function_reduce(func)
        if self._namespace is not None and func.__globals__ is self._namespace:
            make, newargs, (state, slotstate), *rest = reduced
            # Its globals are the receiving namespace: capturing their values here would only
            # send (and hash) copies of them with every function.
            slotstate = dict(slotstate, __globals__={})
            return (make, newargs, (state, slotstate), *rest)
        return reduced


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, namespace: dict | None, buffers):
        super().__init__(file, buffers=buffers)
        self._namespace = namespace

    def persistent_load(self, pid):
        if pid == "ns" and self._namespace is not None:
            return self._namespace
        raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")


def dumps(value: Any, namespace: dict | None = None) -> list[Any]:
    """Serialise ``value``: ``[pickle_stream, oob_buffer, ...]``, large buffers not copied."""
    oob: list[pickle.PickleBuffer] = []
    out = io.BytesIO()
    _HostPickler(out, namespace, protocol=5, buffer_callback=oob.append).dump(value)
    return [out.getbuffer()] + [b.raw() for b in oob]


def loads(buffers: list[Any], namespace: dict | None = None) -> Any:
    """Inverse of :func:`dumps`; arrays are backed by the received buffers (no copy)."""
    if not buffers:
        raise WireError("value frame carries no pickle stream")
    return _Unpickler(io.BytesIO(buffers[0]), namespace, buffers[1:]).load()


def fingerprint(value: Any, namespace: dict | None = None) -> str:
    """A content hash of ``value`` as it would travel: its pickle stream and out-of-band buffers,
    hashed where they lie (xxh3-128; nothing is copied). Raises whatever pickling raises."""
    h = xxhash.xxh3_128()
    np = sys.modules.get("numpy")
    if np is not None and type(value) is np.ndarray and not value.dtype.hasobject:
        # By content, whatever the memory layout: a view and the copy that came back of it hash the same.
        h.update(f"ndarray|{value.dtype.str}|{value.shape}|".encode())
        # As bytes: datetime64 and friends have no buffer format of their own.
        h.update(memoryview(np.ascontiguousarray(value).reshape(-1).view(np.uint8)))
        return h.hexdigest()
    oob: list[pickle.PickleBuffer] = []
    out = io.BytesIO()
    pickler = _HostPickler(out, namespace, protocol=5, buffer_callback=oob.append)
    # No memo: a value and its copy on the other side then pickle to the same bytes even where
    # unpickling shared an object (an interned string) that was two before.
    pickler.fast = not isinstance(value, (types.FunctionType, type))  # cloudpickle needs it for those
    try:
        pickler.dump(value)
    except (ValueError, pickle.PicklingError):  # a reference cycle needs the memo
        oob.clear()
        out = io.BytesIO()
        _HostPickler(out, namespace, protocol=5, buffer_callback=oob.append).dump(value)
    h.update(out.getbuffer())
    for b in oob:
        raw = b.raw()
        h.update(_LEN.pack(raw.nbytes))
        h.update(raw)
    return h.hexdigest()


def fingerprints(values: dict[str, Any], namespace: dict | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """``(hashes, failures)``: each value's :func:`fingerprint`, or why it cannot travel."""
    hashes: dict[str, str] = {}
    failures: dict[str, str] = {}
    for name, value in values.items():
        try:
            hashes[name] = fingerprint(value, namespace)
        except Exception as e:  # pickling raises anything: TypeError, PicklingError, RecursionError
            failures[name] = f"{type(value).__name__} cannot be serialised ({type(e).__name__}: {str(e)[:200]})"
    return hashes, failures


def split_modules(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Modules travel by name (``{"np": "numpy"}``), everything else by value."""
    mods = {n: module_name(v) for n, v in values.items() if isinstance(v, types.ModuleType)}
    return {n: v for n, v in values.items() if n not in mods}, mods


def module_name(mod: types.ModuleType) -> str:
    """The name to import ``mod`` by on the other side (a simulated ``cupy`` is still ``cupy``)."""
    return getattr(mod, "__import_name__", None) or mod.__name__


def load_modules(mods: dict[str, str], failures: dict[str, str] | None = None) -> dict[str, Any]:
    """Import modules by name; one that is not installed here is recorded in ``failures``."""
    out: dict[str, Any] = {}
    for name, modname in mods.items():
        if not isinstance(name, str) or not isinstance(modname, str):
            raise WireError("module table must map names to module names")
        try:
            out[name] = importlib.import_module(modname)
        except Exception as e:
            if failures is None:
                raise
            failures[name] = f"module {modname!r} cannot be imported here ({type(e).__name__}: {e})"
    return out
