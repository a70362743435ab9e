"""The sandbox: one process per notebook session and device set, which runs that session's cells.

The agent starts it (``python -m gpu_attach_server.agent.sandbox``) pinned to its slice
(``CUDA_VISIBLE_DEVICES``) with a clean environment, and hands it each cell's client connection
over a Unix socket (SCM_RIGHTS), so cell inputs and outputs go straight between the kernel and
this process without passing through the agent. It never outlives the agent.
"""

from __future__ import annotations

import codecs
import ctypes
import errno
import gc
import json
import os
import queue
import select
import signal
import socket
import sys
import threading
import time
import traceback

from jupyter_gpu_attach import wire

#: Output is sent at most this often (a loop of prints becomes a few frames, not thousands).
STREAM_INTERVAL_S = 0.05
# Libraries that may start CUDA in this process (which then stays bound to the devices it saw).
GPU_MODULES = ("cupy", "torch", "jax", "tensorflow", "numba.cuda", "pycuda", "cuda", "cudf", "rmm", "nvmath")
#: Past this many bytes a second of stream output, the rest of that second is dropped and counted.
STREAM_RATE_LIMIT = 2 * 1024 * 1024
#: Past this many displays a second, the rest of that second are dropped and counted.
DISPLAY_RATE_LIMIT = 200


class _Output:
    """``sys.stdout`` / ``sys.stderr`` for the sandbox's whole life, and what the process writes to
    its file descriptors 1 and 2: everything goes to the running cell as ``stream`` frames, live,
    coalesced and rate-limited (and is dropped between cells). One object for the whole life, so a
    handler that captured the stream in one cell (``logging.basicConfig``) still reaches the
    notebook in the next."""

    def __init__(self, sandbox: "Sandbox", name: str):
        self._sandbox, self.name = sandbox, name
        self._lock = threading.RLock()
        self._pending: list[str] = []
        self._size = 0
        self._first = 0.0  # when the oldest pending text was written

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        with self._lock:
            if self._sandbox.current is None:
                return len(text)
            if not self._pending:
                self._first = time.monotonic()
            self._pending.append(text)
            self._size += len(text)
            if self._size > 65536:
                self._flush_locked()
        return len(text)

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def flush_if_due(self, now: float) -> None:
        with self._lock:
            if self._pending and now - self._first >= STREAM_INTERVAL_S:
                self._flush_locked()

    def _flush_locked(self) -> None:
        cell = self._sandbox.current
        if self._pending and cell is not None:
            text = "".join(self._pending)
            if cell.budget.allow("bytes", len(text)):
                cell.send({"op": "stream", "name": self.name, "text": text})
        self._pending, self._size = [], 0

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return 1 if self.name == "stdout" else 2

    @property
    def encoding(self) -> str:
        return "utf-8"


class _Budget:
    """Per-second allowances for one cell's output; what goes over is counted, then reported."""

    def __init__(self):
        self.window = 0
        self.used = {"bytes": 0, "displays": 0}
        self.dropped = {"bytes": 0, "displays": 0}
        self.limits = {"bytes": STREAM_RATE_LIMIT, "displays": DISPLAY_RATE_LIMIT}

    def allow(self, kind: str, amount: int) -> bool:
        second = int(time.monotonic())
        if second != self.window:
            self.window, self.used = second, {"bytes": 0, "displays": 0}
        if self.used[kind] + amount > self.limits[kind]:
            self.dropped[kind] += amount
            return False
        self.used[kind] += amount
        return True

    def report(self) -> str:
        parts = []
        if self.dropped["bytes"]:
            parts.append(f"{self.dropped['bytes']} characters of output (over {STREAM_RATE_LIMIT // 1024**2} MiB/s)")
        if self.dropped["displays"]:
            parts.append(f"{self.dropped['displays']} displays (over {DISPLAY_RATE_LIMIT}/s)")
        return f"gpu-attach: dropped {' and '.join(parts)} so the notebook stays responsive\n" if parts else ""


class _FdCapture:
    """Point file descriptors 1 and 2 at pipes and forward what arrives (from C code, from
    subprocesses a cell starts) to the matching :class:`_Output`. Nothing blocks on a full pipe."""

    def __init__(self, outputs: dict[int, _Output]):
        self._lock = threading.Lock()
        self._readers: dict[int, tuple[_Output, codecs.IncrementalDecoder]] = {}
        for fd, out in outputs.items():
            r, w = os.pipe()
            os.dup2(w, fd)
            os.close(w)
            os.set_blocking(r, False)
            self._readers[r] = (out, codecs.getincrementaldecoder("utf-8")(errors="replace"))
        threading.Thread(target=self._pump, name="fd-capture", daemon=True).start()

    def _pump(self) -> None:
        while self._readers:
            ready, _, _ = select.select(list(self._readers), [], [])
            self.drain(ready)

    def drain(self, fds=None) -> None:
        """Forward whatever is waiting now (called at the end of each cell, before its result)."""
        with self._lock:
            for r in fds if fds is not None else list(self._readers):
                if r not in self._readers:
                    continue
                out, decoder = self._readers[r]
                while True:
                    try:
                        chunk = os.read(r, 65536)
                    except BlockingIOError:
                        break
                    if not chunk:  # every writer closed it (a cell closed fd 1 or 2): stop watching
                        del self._readers[r]
                        os.close(r)
                        break
                    out.write(decoder.decode(chunk))


class _Cell:
    """One cell's connection: sends are serialised; a reader thread watches for interrupts and
    carries the notebook's answers to ``input()``."""

    def __init__(self, conn: socket.socket):
        self.conn = conn
        self.lock = threading.RLock()
        self.finished = threading.Event()
        self.broken = False
        self.budget = _Budget()
        self.replies: queue.SimpleQueue[dict] = queue.SimpleQueue()

    def send(self, header, buffers=()) -> None:
        main = threading.current_thread() is threading.main_thread()
        with self.lock:
            if self.broken:
                return
            # An interrupt arriving mid-send is held until the frame is out whole (then it raises):
            # half a frame would break the stream for the kernel.
            if main:
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                wire.send_frame(self.conn, header, buffers)
            except OSError:
                self.broken = True
            finally:
                if main:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    # CellChannel, for the shell
    def output(self, header: dict, buffers: list = ()) -> None:
        if header.get("op") == "display" and not self.budget.allow("displays", 1):
            return
        self.send(header, buffers)

    def ask(self, header: dict) -> dict:
        """Send an input request and wait for the notebook's answer (the stop button still works)."""
        self.send(header)
        while True:
            try:
                return self.replies.get(timeout=0.1)
            except queue.Empty:
                if self.broken:
                    raise EOFError("the notebook hung up while waiting for input")

    def watch_for_interrupt(self) -> None:
        """Runs in a thread: an ``interrupt`` frame, or the kernel hanging up, stops the cell."""
        try:
            while not self.finished.is_set():
                frame = wire.recv_frame(self.conn, wire.Limits(max_header_bytes=1 << 20, max_buffers=0))
                if frame.op == "interrupt" and not self.finished.is_set():
                    _interrupt_main()
                elif frame.op == "input_reply":
                    self.replies.put(frame.header)
        except (wire.WireError, OSError):
            if not self.finished.is_set():
                self.broken = True
                _interrupt_main()


def _interrupt_main() -> None:
    """A real SIGINT to the main thread: unlike ``_thread.interrupt_main`` it also wakes blocking
    calls such as ``time.sleep`` or a socket read, as the stop button does in a local kernel."""
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)


class Sandbox:
    def __init__(self, ctl: socket.socket, config: dict, capture_fds: bool = True):
        self.ctl = ctl
        self.config = config
        self.instance = os.urandom(8).hex()  # the notebook notices a new sandbox (its state is gone)
        # A simulated sandbox never binds to a GPU (its "cupy" is the simulated one).
        self._gpu_bound = bool(config.get("simulated"))
        self.cells_run = 0
        self.recycler = wire.BufferRecycler()
        self.limits = wire.Limits(max_payload_bytes=int(config.get("max_payload", wire.MAX_PAYLOAD_BYTES)))
        self.current: _Cell | None = None
        self.out, self.err = _Output(self, "stdout"), _Output(self, "stderr")
        sys.stdout, sys.stderr = self.out, self.err
        self.fds = _FdCapture({1: self.out, 2: self.err}) if capture_fds else None
        self.workdir = os.getcwd()
        self.path_map = [tuple(p) for p in config.get("path_map", []) if len(p) == 2]
        from .remote_shell import RemoteShell

        self.shell = RemoteShell(cache_bytes=int(config.get("input_cache_bytes", 4 * 1024**3)))
        self.shell.flush_streams = self._flush_streams
        # SIGINT (the kernel's stop button, relayed) interrupts user code only: one that lands
        # while the sandbox itself is sending a reply must not cut the reply in half.
        self._in_user_code = False
        signal.signal(signal.SIGINT, self._on_sigint)
        # One long-lived thread watches the running cell's connection for an interrupt (or the
        # kernel hanging up); starting a thread per cell would cost more than a trivial cell.
        self._watch: queue.SimpleQueue[_Cell] = queue.SimpleQueue()
        threading.Thread(target=self._watch_cells, name="interrupt-watch", daemon=True).start()
        threading.Thread(target=self._flush_forever, name="stream-flush", daemon=True).start()

    def _on_sigint(self, signum, frame):
        if self._in_user_code:
            raise KeyboardInterrupt

    def _watch_cells(self) -> None:
        while True:
            self._watch.get().watch_for_interrupt()

    def _flush_forever(self) -> None:
        while True:
            time.sleep(STREAM_INTERVAL_S)
            if self.current is not None:
                now = time.monotonic()
                self.out.flush_if_due(now)
                self.err.flush_if_due(now)

    def _flush_streams(self) -> None:
        if self.fds is not None:
            self.fds.drain()
        self.out.flush()
        self.err.flush()

    def serve(self) -> None:
        self._report({"op": "ready", "pid": os.getpid()})
        while True:
            try:
                msg, fds, _flags, _addr = socket.recv_fds(self.ctl, 65536, 1)
            except OSError:
                return
            if not msg:
                return  # the agent closed our control socket: it is stopping
            request = json.loads(msg)
            if request.get("op") != "cell" or not fds:
                continue
            conn = socket.socket(fileno=fds[0])
            claims = request["claims"]
            if isinstance(request.get("env"), dict):  # the session's cell moved to other devices
                os.environ.update({str(k): str(v) for k, v in request["env"].items()})
            if isinstance(request.get("max_payload"), int):
                self.limits.max_payload_bytes = request["max_payload"]
            try:
                self.run_cell(conn, claims)
            finally:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()

    def _report(self, msg: dict) -> None:
        self.ctl.send(json.dumps(msg).encode())

    # -- one cell -------------------------------------------------------------------------------

    def run_cell(self, conn: socket.socket, claims: dict) -> None:
        cell = _Cell(conn)
        try:
            conn.settimeout(30)
            frame = self._receive(conn)
            conn.settimeout(None)
        except (wire.WireError, OSError, MemoryError) as e:
            cell.send(_error_reply("gpu_attach.ProtocolError", f"the cell's inputs could not be received: {e}"))
            return
        self.current = cell
        try:
            reply, buffers = self._execute(cell, frame, claims)
            self._flush_streams()
            note = cell.budget.report()
            if note:
                cell.send({"op": "stream", "name": "stderr", "text": note})
        finally:
            self.current = None
        self.recycler.keep(frame.buffers)
        del frame
        self.shell.park()
        self._after_cell()
        if not self._gpu_bound and any(m in sys.modules for m in GPU_MODULES):
            self._gpu_bound = True  # the agent moves this sandbox to other devices no more
            self._report({"op": "gpu_bound"})
        cell.finished.set()
        reply.update(sandbox=self.instance, cells=self.cells_run)
        cell.send(reply, buffers)

    def _receive(self, conn: socket.socket) -> wire.Frame:
        return wire.recv_frame(conn, self.limits, self.recycler, on_header=self.shell.superseded)

    def _execute(self, cell: _Cell, frame: wire.Frame, claims: dict) -> tuple[dict, list]:
        h = frame.header
        self.cells_run += 1
        source = h.get("source")
        if h.get("op") != "run" or not isinstance(source, str):
            return _error_reply("gpu_attach.ProtocolError", "expected a run frame with the cell source"), []
        if isinstance(h.get("env"), dict):
            from jupyter_gpu_attach.environment import compare, environment

            fatal, warnings = compare(h["env"], environment())
            if fatal:
                return _error_reply("gpu_attach.EnvironmentMismatch", "; ".join(fatal)), []
            for w in warnings:
                self.err.write(f"gpu-attach: {w}\n")
        try:
            values = wire.loads(frame.buffers, self.shell.ns) if frame.buffers else {}
            if not isinstance(values, dict):
                raise wire.WireError("inputs must be a dict of names")
            missing = self.shell.apply_inputs(h, values, h.get("modules") or {})
            if missing:  # the notebook thought we held these: ask for them once
                cell.send({"op": "need", "names": missing})
                more = self._receive(cell.conn)
                values = wire.loads(more.buffers, self.shell.ns) if more.buffers else {}
                if self.shell.apply_inputs(more.header, values, {}):
                    raise wire.WireError("the notebook did not send the inputs asked for")
        except Exception as e:
            return _error_reply("gpu_attach.InputError", f"a cell input could not be loaded on the GPU host: "
                                f"{type(e).__name__}: {e}"), []
        lost = self.shell.lost(h.get("expect") or [])
        if lost:
            return _error_reply("gpu_attach.RemoteStateLost", ", ".join(lost)), []
        # What the cell uses of what it left on the GPU last time goes back there.
        self.shell.unpark(list(h.get("cached") or {}) + list(h.get("expect") or []) + list(h.get("pure") or []))
        note = self._enter_workdir(h.get("cwd"))
        if note:
            self.err.write(note)

        self._limit_memory(claims)
        t0 = time.perf_counter()
        self._watch.put(cell)  # an interrupt already waiting is acted on at once
        self.shell.channel = cell
        self._in_user_code = True
        try:
            error, stb, changed, inplace, deleted = self.shell.run(source, int(h.get("count") or self.cells_run),
                                                          list(h.get("bound") or []), list(h.get("watch") or []),
                                                          list(h.get("pure") or []))
        except KeyboardInterrupt as e:  # it landed in IPython's own code, around the cell's
            error, stb, changed, inplace, deleted = e, None, [], [], []
        finally:
            self._in_user_code = False
            self.shell.channel = None
            cell.finished.set()
        elapsed = time.perf_counter() - t0
        header, buffers, _ = self.shell.collect(changed)
        header.update(op="result", deleted=deleted, inplace=inplace, elapsed=elapsed, cwd=os.getcwd())
        if error is not None:
            stb = self._explain_full_disk(error, stb)
            header["error"], exc_buffers = _describe(error, stb)
            header["value_buffers"] = len(buffers)
            buffers = buffers + exc_buffers
        return header, buffers

    def _enter_workdir(self, cwd: object) -> str:
        """Run in the notebook's folder: the same path on this host, or where the agent's path map
        puts it; else in the session's own folder, and say so."""
        if not isinstance(cwd, str) or not cwd:
            return ""
        target = cwd
        for src, dst in self.path_map:
            if cwd == src or cwd.startswith(src.rstrip("/") + "/"):
                target = dst + cwd[len(src.rstrip("/")):]
                break
        try:
            os.chdir(target)
            return ""
        except OSError as e:
            os.chdir(self.workdir)
            return (f"gpu-attach: the notebook's folder {cwd} is not reachable on the GPU host ({e.strerror}); "
                    f"this cell runs in {self.workdir}. Relative paths need the agent's --path-map.\n")

    def _explain_full_disk(self, error: BaseException, stb: list[str] | None) -> list[str] | None:
        """ENOSPC on the session's own disk (agent/disk.py): say which limit it was, and what to do."""
        size = self.config.get("disk_size")
        if not (isinstance(error, OSError) and error.errno == errno.ENOSPC and size):
            return stb
        try:
            st = os.statvfs(self.workdir)
            full = st.f_bavail * st.f_frsize < 1 << 20
        except OSError:
            full = False
        if not full:
            return stb  # another filesystem ran out (the notebook's folder, say)
        note = (f"gpu-attach: this session's HOME ({self.workdir}) is a disk of {size >> 20} MiB of its own "
                "(the agent's --sandbox-disk), and it is full: delete files there, write large outputs to the "
                "notebook's folder, or ask the admin for a larger --sandbox-disk.")
        if hasattr(error, "add_note"):  # Python 3.11+
            error.add_note(note)
        return None if stb is None else [*stb, note]

    def _limit_memory(self, claims: dict) -> None:
        """Cap the GPU memory pools at the slice's size (a no-op on simulated devices)."""
        if claims.get("simulated"):
            return
        memory = int(claims.get("memory") or 0)
        if not memory:
            return
        os.environ["CUPY_GPU_MEMORY_LIMIT"] = str(memory)  # read when CuPy first makes its pool
        cp = sys.modules.get("cupy")
        if cp is not None:
            cp.get_default_memory_pool().set_limit(size=memory)
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, memory / total), 0)

    def _after_cell(self) -> None:
        """Give the slice's memory back: CuPy's pooled blocks and torch's cache."""
        cp = sys.modules.get("cupy")
        if cp is not None and getattr(cp, "__simulated__", False):
            cp = None
        torch = sys.modules.get("torch")
        torch_cuda = torch is not None and torch.cuda.is_available()
        if cp is not None:
            pool = cp.get_default_memory_pool()
            if pool.used_bytes():
                gc.collect()  # device arrays caught in reference cycles hold memory until collected
            pool.free_all_blocks()
            cp.get_default_pinned_memory_pool().free_all_blocks()
        if torch_cuda:
            if torch.cuda.memory_allocated():
                gc.collect()
            torch.cuda.empty_cache()


def _error_reply(etype: str, message: str) -> dict:
    return {"op": "result", "values": [], "hashes": {}, "modules": {}, "remote": {}, "deleted": [],
            "error": {"etype": etype, "message": message, "stb": None}, "value_buffers": 0}


def _describe(exc: BaseException, stb: list[str] | None) -> tuple[dict, list]:
    """The cell's exception: its type, message and IPython's own rendering of the traceback (as a
    local cell would show it), and the exception itself when it pickles."""
    if stb is None:
        te = traceback.TracebackException.from_exception(exc)
        te.stack = traceback.StackSummary.from_list([])
        stb = list(te.format())
    info = {"etype": f"{type(exc).__module__}.{type(exc).__qualname__}", "message": str(exc), "stb": stb}
    exc.__traceback__ = None
    exc.__context__ = None
    try:
        buffers = wire.dumps(exc)
    except Exception:
        buffers = []
    return info, buffers


def _die_with_parent(agent_pid: int) -> bool:
    """Ask Linux to SIGKILL us when the agent's spawning thread ends; unlike a watcher thread,
    this works while the sandbox is frozen between cells. False where prctl is unavailable."""
    try:
        armed = ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL) == 0  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        armed = False
    if os.getppid() != agent_pid:  # the agent died before the request took effect
        os._exit(70)
    return armed


def _dumpable() -> None:
    """Changing uid made this process non-dumpable: its /proc entries stay root's, and under the
    jail's ``hidepid`` /proc its own processes could not see it, nor it the children it forks
    (``ps``, psutil, ``/proc/$PPID``). It holds nothing of root's any more (the uid change was
    the last privileged step), so it becomes an ordinary process of its user again."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(4, 1)  # PR_SET_DUMPABLE
    except (OSError, AttributeError):
        pass


def _watch_parent(agent_pid: int) -> None:
    """Exit as soon as the agent is gone, so no cell keeps running without its agent."""
    while True:
        if os.getppid() != agent_pid:
            os._exit(70)
        time.sleep(0.2)


def main() -> None:
    """Start, wait to be claimed for a session (pinned to its slice, as its user), then serve it."""
    boot = json.loads(os.environ.pop("GPU_ATTACH_SANDBOX", "{}"))
    if not _die_with_parent(int(boot["agent_pid"])):  # without the death signal, poll for the agent
        threading.Thread(target=_watch_parent, args=(int(boot["agent_pid"]),), daemon=True).start()
    ctl = socket.socket(fileno=int(boot["ctl_fd"]))
    import numpy  # noqa: F401  most cells use it; importing it touches no GPU

    from . import remote_shell  # noqa: F401  IPython, imported before a lease waits on it

    ctl.send(json.dumps({"op": "started", "pid": os.getpid()}).encode())
    msg = ctl.recv(65536)
    if not msg:
        return  # the agent stopped before claiming us
    claim = json.loads(msg)
    try:
        # Nothing has touched CUDA yet, so CUDA_VISIBLE_DEVICES set now still pins the process.
        os.environ.update(claim["env"])
        if claim.get("disk"):  # HOME is a disk of its own (agent/disk.py); mounted while still root
            from .disk import mount_image

            mount_image(claim["disk"], claim["workdir"], claim.get("uid"), claim.get("gid"))
        if claim.get("uid") is not None:
            os.setgroups([])
            os.setgid(claim["gid"])
            os.setuid(claim["uid"])
            if not _die_with_parent(int(boot["agent_pid"])):  # changing uid cleared the death signal
                threading.Thread(target=_watch_parent, args=(int(boot["agent_pid"]),), daemon=True).start()
            _dumpable()
        if claim.get("simulated"):
            from . import simulated_cupy

            sys.modules["cupy"] = simulated_cupy
        os.chdir(claim["workdir"])
    except Exception as e:
        ctl.send(json.dumps({"op": "failed", "error": f"{type(e).__name__}: {e}"}).encode())
        return
    gc.collect()
    gc.freeze()  # start-up objects (NumPy's among them) out of the collector's full passes
    Sandbox(ctl, claim).serve()


if __name__ == "__main__":
    main()
