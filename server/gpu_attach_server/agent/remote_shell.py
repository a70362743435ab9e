"""The session's Python in its sandbox: a headless IPython shell whose output goes to the notebook.

A ``%%gpu`` cell is run by IPython's own machinery, not an imitation of it: input transformation
(``%timeit``, ``!cmd``), the displayhook (``Out[n]``), the display publisher (``display()``, inline
matplotlib figures), ``post_execute`` hooks, tracebacks. The shell's namespace is the session's
remote state: it lives between cells (the sandbox is frozen then, holding no slice), so modules,
aliases and objects that cannot travel stay usable by later cells.

What crosses to the notebook: MIME bundles as they are published, the last expression's value and
bundle, and at the end the names the cell bound, created, deleted or changed in place, all in one
pickle so that aliases survive. Inputs arrive by content hash: a value the sandbox already holds
(under that name, or in its input cache) is not sent again.
"""

from __future__ import annotations

import base64
import builtins
import getpass
import os
import sys
from collections import OrderedDict
from typing import Any, Callable, Protocol

from IPython.core.displayhook import DisplayHook
from IPython.core.displaypub import DisplayPublisher
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config

from jupyter_gpu_attach import wire
from jupyter_gpu_attach.cell_analysis import is_shippable_name

#: The last expression's value travels (for ``_`` and ``Out[n]``) only up to this size; its MIME
#: bundle is always shown.
RESULT_VALUE_MAX_BYTES = 64 * 1024**2


class CellChannel(Protocol):
    """What the shell needs of the running cell's connection."""

    def output(self, header: dict, buffers: list = ()) -> None: ...
    def ask(self, header: dict) -> dict: ...


def _jsonable(data: Any) -> Any:
    """MIME bundles as Jupyter's JSON: bytes (PNG and friends) as base64 text."""
    if isinstance(data, dict):
        return {str(k): _jsonable(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_jsonable(v) for v in data]
    if isinstance(data, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(data)).decode("ascii")
    return data


class SandboxZMQShell(InteractiveShell):
    """The sandbox's shell. Libraries that shape their output for Jupyter frontends (pandas keeps
    wide frames whole there, instead of fitting them to a terminal) look for "zmq" in the shell's
    type, as they would see it in the notebook's kernel; the notebook is where this output goes."""

    #: pandas tells a notebook kernel from a terminal by this attribute (at import): a wide frame
    #: is wrapped, as in the notebook, rather than cut to a terminal's width. There is no kernel
    #: object here: widgets and comms do not travel (their text fallback does).
    kernel = None

    def enable_gui(self, gui=None):
        if gui not in (None, "inline"):
            raise UsageError(f"there is no {gui} event loop on the GPU host; use %matplotlib inline")


class _ForwardingDisplayPublisher(DisplayPublisher):
    """``display()``, ``update_display`` and ``clear_output``, sent to the notebook as they happen."""

    runner: "RemoteShell"

    def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kwargs):
        self.runner.send_output({"op": "display", "data": _jsonable(data), "metadata": _jsonable(metadata or {}),
                                 "transient": transient or {}, "update": bool(update)})

    def clear_output(self, wait=False):
        self.runner.send_output({"op": "clear_output", "wait": bool(wait)})


class _ForwardingDisplayHook(DisplayHook):
    """The cell's last expression: IPython's bookkeeping here (``_``, ``Out``), and its MIME bundle
    plus, when it travels, the value itself for the notebook's own ``_`` and ``Out[n]``."""

    runner: "RemoteShell"

    def __call__(self, result=None):
        self.check_for_underscore()
        if result is None or self.quiet():
            return
        self.update_user_ns(result)
        self.fill_exec_result(result)
        data, metadata = self.compute_format_data(result)
        buffers: list = []
        try:
            buffers = wire.dumps(result, self.shell.user_ns)
            if sum(memoryview(b).nbytes for b in buffers) > RESULT_VALUE_MAX_BYTES:
                buffers = []
        except Exception:
            buffers = []
        self.runner.send_output({"op": "execute_result", "data": _jsonable(data),
                                 "metadata": _jsonable(metadata or {}), "has_value": bool(buffers)}, buffers)


class ValueCache:
    """A session's recent inputs by content hash, least recently used first out, within a size.

    A value is handed out again only while no name of the namespace holds it, so two names never
    come to share one object that the notebook holds as two."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._size = 0

    def put(self, digest: str, value: Any, nbytes: int) -> None:
        if nbytes > self.max_bytes or digest in self._items:
            return
        self._items[digest] = (value, nbytes)
        self._size += nbytes
        while self._size > self.max_bytes:
            _, (_, n) = self._items.popitem(last=False)
            self._size -= n

    def drop(self, value: Any) -> None:
        """Forget ``value`` (superseded under its name: the least likely content to come back)."""
        for digest, (v, n) in list(self._items.items()):
            if v is value:
                del self._items[digest]
                self._size -= n

    def rewrite(self, swap) -> None:
        """Each cached value ``v`` becomes ``swap(v)``; those it maps to ``_MISSING`` are forgotten."""
        for digest, (v, n) in list(self._items.items()):
            new = swap(v)
            if new is _MISSING:
                del self._items[digest]
                self._size -= n
            elif new is not v:
                self._items[digest] = (new, n)

    def get(self, digest: str) -> Any:
        item = self._items.get(digest)
        if item is None:
            return _MISSING
        self._items.move_to_end(digest)
        return item[0]


_MISSING = object()


class RemoteShell:
    """One session's IPython shell and the bookkeeping that keeps it in step with the notebook."""

    def __init__(self, cache_bytes: int = 4 * 1024**3):
        self.channel: CellChannel | None = None
        self.flush_streams: Callable[[], None] = lambda: None
        os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
        config = Config()
        config.HistoryManager.enabled = False  # no sqlite file in the sandbox's home
        _ForwardingDisplayPublisher.runner = self
        _ForwardingDisplayHook.runner = self
        extra = {}
        try:  # a notebook kernel's cell file names (warnings and tracebacks name them) where ipykernel is here
            from ipykernel.compiler import XCachingCompiler

            extra["compiler_class"] = XCachingCompiler
        except ImportError:
            pass
        self.shell = SandboxZMQShell.instance(config=config, display_pub_class=_ForwardingDisplayPublisher,
                                               displayhook_class=_ForwardingDisplayHook, **extra)
        self.shell._showtraceback = self._capture_traceback
        self.ns = self.shell.user_ns
        self.hashes: dict[str, str] = {}  # name -> the content hash the notebook holds for it too
        self.cache = ValueCache(cache_bytes)
        self.parked: dict[str, str] = {}  # name -> what it was on the GPU ("cupy", "torch", "module:cuda:0")
        self._stb: list[str] | None = None
        builtins.input = self._input
        getpass.getpass = self._getpass

    # -- output ---------------------------------------------------------------------------------

    def send_output(self, header: dict, buffers: list = ()) -> None:
        self.flush_streams()  # what was printed before a display comes before it, as in a kernel
        if self.channel is not None:
            self.channel.output(header, buffers)

    def _capture_traceback(self, etype, evalue, stb) -> None:
        self._stb = list(stb)

    def _input(self, prompt: str = "") -> str:
        return self._ask(prompt, password=False)

    def _getpass(self, prompt: str = "Password: ", stream=None) -> str:
        return self._ask(prompt, password=True)

    def _ask(self, prompt: str, password: bool) -> str:
        self.flush_streams()
        if self.channel is None:
            raise EOFError("no cell is running")
        reply = self.channel.ask({"op": "input_request", "prompt": str(prompt), "password": password})
        if reply.get("error"):
            etype = {"StdinNotImplementedError": _stdin_not_implemented(), "EOFError": EOFError,
                     "KeyboardInterrupt": KeyboardInterrupt}.get(reply.get("etype"), EOFError)
            raise etype(reply["error"])
        return str(reply.get("value", ""))

    # -- a cell ---------------------------------------------------------------------------------

    def apply_inputs(self, header: dict, values: dict[str, Any], modules: dict[str, str]) -> list[str]:
        """Bring the namespace in step with the notebook for this cell; returns the names it
        must still send (their hash is neither under that name here nor in the cache)."""
        failures: dict[str, str] = {}
        loaded = wire.load_modules(modules, failures)
        if failures:
            raise ModuleNotFoundError("; ".join(failures.values()) + " — install it on the GPU host")
        self.ns.update(loaded)
        for name in modules:
            self.hashes.pop(name, None)
        hashes = header.get("hashes") or {}
        for name, value in values.items():
            self.ns[name] = value
            if name in hashes:
                self.hashes[name] = hashes[name]
                self.cache.put(hashes[name], value, _nbytes(value))
        for name in header.get("absent") or []:
            if isinstance(name, str) and is_shippable_name(name):
                self.ns.pop(name, None)
                self.hashes.pop(name, None)
        missing: list[str] = []
        held = {id(v) for v in self.ns.values()}
        for name, digest in (header.get("cached") or {}).items():
            if self.hashes.get(name) == digest and name in self.ns:
                continue
            value = self.cache.get(digest)
            if value is _MISSING or id(value) in held:
                missing.append(name)
                continue
            self.ns[name] = value
            self.hashes[name] = digest
            held.add(id(value))
        return missing

    def superseded(self, header: dict) -> None:
        """The notebook is sending new values for these names: let go of the old ones before the
        new ones arrive, so their memory can take them (a notebook loop re-sends same-shaped data).
        Should the transfer fail, the notebook asks for a name the sandbox no longer has, and
        sends it again."""
        for name in header.get("hashes") or {}:
            if not isinstance(name, str):
                continue
            old = self.ns.pop(name, None)
            self.hashes.pop(name, None)
            if old is not None:
                self.cache.drop(old)

    # -- nothing on the GPU between cells ------------------------------------------------------------

    def park(self) -> list[str]:
        """After a cell: move device arrays, tensors and models bound in the namespace to host memory,
        so the session holds no GPU memory while it holds no slice. The notebook holds them as host
        values too; a later cell that uses one gets it back on the GPU (:meth:`unpark`)."""
        cp = sys.modules.get("cupy")
        if cp is not None and getattr(cp, "__simulated__", False):
            cp = None
        torch = sys.modules.get("torch")
        if torch is not None and not torch.cuda.is_available():
            torch = None
        if cp is None and torch is None:
            return []
        def on_gpu(value) -> bool:
            return ((cp is not None and isinstance(value, cp.ndarray))
                    or (torch is not None and isinstance(value, torch.Tensor) and value.is_cuda))

        moved: dict[int, tuple[Any, str]] = {}  # id(device value) -> (host value, what it was)
        for name, value in list(self.ns.items()):
            if not is_shippable_name(name):
                continue
            if id(value) not in moved:
                if cp is not None and isinstance(value, cp.ndarray):
                    moved[id(value)] = (value.get(), "cupy")
                elif torch is not None and isinstance(value, torch.Tensor) and value.is_cuda:
                    host = value.detach().to("cpu").requires_grad_(value.requires_grad)
                    moved[id(value)] = (host, f"torch:{value.device}")
                elif torch is not None and isinstance(value, torch.nn.Module):
                    device = next((p.device for p in value.parameters() if p.is_cuda), None)
                    if device is None:
                        continue
                    value.to("cpu")  # in place: an optimiser's references to its parameters hold
                    moved[id(value)] = (value, f"module:{device}")
                else:
                    continue
            host, kind = moved[id(value)]
            self.ns[name] = host
            self.parked[name] = kind
        # What cells returned is cached by content, for a later cell that sends it back: a device
        # value there would hold its GPU memory all the same. The cache keeps the host copy the
        # namespace now holds (one object, as before), and forgets device values no name holds.
        self.cache.rewrite(lambda v: moved[id(v)][0] if id(v) in moved else _MISSING if on_gpu(v) else v)
        return sorted(self.parked)

    def unpark(self, names) -> None:
        """Back on the GPU, for a cell that uses them (aliases stay aliases)."""
        back: dict[int, Any] = {}
        for name in names:
            kind = self.parked.pop(name, None)
            if kind is None or name not in self.ns:
                continue
            value = self.ns[name]
            dev = back.get(id(value))
            if dev is None:
                if kind == "cupy":
                    dev = sys.modules["cupy"].asarray(value)
                elif kind.startswith("torch:"):
                    dev = value.to(kind.split(":", 1)[1]).requires_grad_(value.requires_grad)
                else:
                    dev = value.to(kind.split(":", 1)[1])
                back[id(value)] = dev
            self.ns[name] = dev

    def lost(self, expected: list[str]) -> list[str]:
        """Names the notebook expects to stay here that this sandbox does not hold."""
        return [n for n in expected if isinstance(n, str) and n not in self.ns]

    def run(self, source: str, execution_count: int, bound: list[str], watch: list[str], pure: list[str] = ()):
        """Run the cell; returns ``(error, stb, changed, inplace, deleted)``."""
        shell = self.shell
        before = {n: id(v) for n, v in self.ns.items() if is_shippable_name(n)}
        shell.execution_count = max(1, int(execution_count))
        self._stb = None
        result = shell.run_cell(source, store_history=True)
        error = result.error_before_exec or result.error_in_exec
        after = {n: v for n, v in self.ns.items() if is_shippable_name(n)}
        changed = {n for n in bound if n in after}
        changed |= {n for n in after if n not in before or id(after[n]) != before[n]}
        # A name the notebook found only read is still checked if the cell made a view of it.
        watch = list(watch) + sorted(_sharing_memory(changed, after) & set(pure))
        inplace: set[str] = set()
        self._known = {}  # id -> content hash, for values hashed after this cell (one hash per object)
        for name in watch:  # changed in place: same object, other content
            if name in after and name not in changed and name in self.hashes:
                try:
                    digest = wire.fingerprint(after[name], self.ns)
                    self._known[id(after[name])] = digest
                    if digest != self.hashes[name]:
                        inplace.add(name)
                except Exception:
                    inplace.add(name)
        inplace |= _sharing_memory(inplace, after) - changed
        deleted = sorted(n for n in before if n not in after)
        for n in deleted:
            self.hashes.pop(n, None)
        return error, self._stb, sorted(changed | inplace), sorted(inplace), deleted

    def collect(self, names: list[str]) -> tuple[dict, list, dict[str, str]]:
        """The names to send back: ``(header, buffers, stays_here)``. Each value is hashed on its own
        (so the notebook can tell later what changed) and all are pickled together (so aliases
        survive); what cannot travel stays here, by name."""
        values = {n: self.ns[n] for n in names if n in self.ns}
        plain, modules = wire.split_modules(values)
        stays: dict[str, str] = {}
        for name, mod in list(modules.items()):
            if getattr(values[name], "__simulated__", False):
                stays[name] = "the simulated cupy module exists only on the GPU host"
                del modules[name]
        known = getattr(self, "_known", {})
        hashes, failures = wire.fingerprints({n: v for n, v in plain.items() if id(v) not in known}, self.ns)
        hashes.update({n: known[id(v)] for n, v in plain.items() if id(v) in known})
        self._known = {}
        stays.update(failures)
        sendable = {n: v for n, v in plain.items() if n in hashes}
        try:
            buffers = wire.dumps(sendable, self.ns) if sendable else []
        except Exception as e:  # hashed one by one, but not together (a cycle across names, ...)
            for n in sendable:
                stays[n] = f"it could not be serialised with the cell's other results ({type(e).__name__}: {e})"
            sendable, hashes, buffers = {}, {}, []
        for name, digest in hashes.items():
            self.hashes[name] = digest
            self.cache.put(digest, values[name], _nbytes(values[name]))
        for name in stays:
            self.hashes.pop(name, None)
        for name in modules:
            self.hashes.pop(name, None)
        header = {"values": sorted(sendable), "hashes": hashes, "modules": modules, "remote": stays}
        return header, buffers, stays


def _sharing_memory(names: set[str], ns: dict[str, Any]) -> set[str]:
    """Arrays that share memory with the arrays ``names`` (views of one base): a change made
    through one name is a change to the others."""
    np = sys.modules.get("numpy")
    if np is None or not names:
        return set()

    def root(a):
        while isinstance(getattr(a, "base", None), np.ndarray):
            a = a.base
        return a

    roots = {id(root(ns[n])) for n in names if isinstance(ns.get(n), np.ndarray)}
    if not roots:
        return set()
    return {n for n, v in ns.items() if isinstance(v, np.ndarray) and n not in names and id(root(v)) in roots}


def _nbytes(value: Any) -> int:
    n = getattr(value, "nbytes", None)
    if isinstance(n, int):
        return n
    return sys.getsizeof(value)


def _stdin_not_implemented():
    from IPython.core.error import StdinNotImplementedError

    return StdinNotImplementedError
