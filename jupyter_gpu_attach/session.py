"""A notebook's session with the GPU pool, and the life of one remote cell.

:meth:`GPUSession.run` is the one place that parses, leases, ships, streams, returns and
releases; the magics, the widget and the Python API are shells around it. No IPython here.
"""

from __future__ import annotations

import secrets
import select
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, MutableMapping, TextIO

from . import agent_identity, wire
from .broker_client import BrokerClient
from .cell_analysis import analyse, is_shippable_name
from .errors import (
    AgentLost,
    CellRejected,
    CellTimeout,
    GPUAttachError,
    InputError,
    LeaseLost,
    RemoteCellError,
    RemoteTraceback,
)
from .slices import SliceRequest, format_size

#: Inputs this large get a line of progress in the cell's output.
LARGE_TRANSFER_BYTES = 256 * 1024**2

#: How long the agent may take to admit a cell (it may be starting the session's sandbox).
ADMISSION_TIMEOUT_S = 120.0

#: After an interrupt or timeout, how long the remote code gets to stop before we hang up.
INTERRUPT_GRACE_S = 5.0


@dataclass
class CellResult:
    """What a finished cell did: names returned, names it could not return, timings, lease."""

    lease: dict
    returned: list[str]
    deleted: list[str]
    not_returned: dict[str, str]
    remote_elapsed_s: float
    timings: dict[str, float] = field(default_factory=dict)


class _Renewer:
    """Keeps the running cell's lease alive: one thread per session, woken on a timer only.

    A thread started (and stopped) per cell cost more than a whole trivial cell, so the cell
    just points this at its lease; the lease is renewed once it is a third of its TTL old.
    """

    def __init__(self, broker: BrokerClient):
        # Its own connection, so a renewal never queues behind the cell's own broker calls; and a
        # short timeout, so one hung renewal cannot use up the lease it is meant to extend.
        self.broker = BrokerClient(broker.url, broker.token, timeout=5.0)
        self.lost: dict[str, str] = {}
        self._lease: dict | None = None
        self._renewed_at = 0.0
        self._period = 1.0
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def track(self, lease: dict) -> None:
        ttl = float(lease["ttl_s"])
        self._renewed_at = time.monotonic()
        self._lease = lease
        if ttl / 6 < self._period or self._thread is None:
            self._period = max(ttl / 6, 0.02)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="gpu-attach-renew", daemon=True)
                self._thread.start()
            else:
                self._wake.set()  # rare: a shorter TTL than before

    def untrack(self) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            self.lost.pop(lease["id"], None)

    def _run(self) -> None:
        while True:
            self._wake.wait(self._period)
            self._wake.clear()
            lease = self._lease
            if lease is None or time.monotonic() - self._renewed_at < float(lease["ttl_s"]) / 3:
                continue
            try:
                self.broker.renew(lease["id"])
                self._renewed_at = time.monotonic()
            except LeaseLost as e:
                self.lost[lease["id"]] = str(e)
                if self._lease is lease:
                    self._lease = None
            except GPUAttachError:
                continue  # a broker blip: the lease lives until its TTL; try again next tick


class GPUSession:
    """One notebook's relationship with the pool: its broker, default request and session id."""

    def __init__(self, broker_url: str, token: str, default: SliceRequest | None = None,
                 session_id: str | None = None, embedded: Any = None):
        self.broker = BrokerClient(broker_url, token)
        self.default = default or SliceRequest()
        self.session_id = session_id or "nb-" + secrets.token_hex(6)
        self.embedded = embedded  # the LocalPool-like handle when this session started the broker
        self.last: CellResult | None = None
        self.active_lease: dict | None = None
        self._told_simulated = False
        self._lock = threading.Lock()  # one cell at a time per session
        self._renewer = _Renewer(self.broker)

    def run(
        self,
        source: str,
        namespace: MutableMapping[str, Any],
        request: SliceRequest | None = None,
        timeout: float | None = None,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
        label: str = "",
    ) -> CellResult:
        """Run ``source`` on a leased slice, reading inputs from and writing results to ``namespace``."""
        __tracebackhide__ = True
        stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
        names = analyse(source)  # a SyntaxError is raised here, before anything is leased
        wanted = {n: namespace[n] for n in sorted(names.reads) if n in namespace and is_shippable_name(n)}
        t0 = time.perf_counter()
        index, buffers, failures = wire.dump_names(wanted)
        size = sum(memoryview(b).nbytes for b in buffers)
        for name, why in failures.items():
            if name not in names.binds:
                raise InputError(f"cannot send {name!r} to the GPU: {why}. Compute it inside the %%gpu cell, "
                                 "or convert it to something picklable (arrays, lists, dicts, dataframes) first.")
        t_ship = time.perf_counter()

        request = (request or self.default).or_default()
        with self._lock:
            lease = self.broker.request_lease(request, self.session_id, label)
            t_lease = time.perf_counter()
            self.active_lease = lease
            self._renewer.track(lease)
            try:
                if lease.get("simulated") and not self._told_simulated:
                    self._told_simulated = True
                    gpu = lease["gpus"][0]["id"]
                    stderr.write(f"gpu-attach: {gpu} is a SIMULATED device (no NVIDIA GPU on its host): "
                                 "this cell runs on the CPU, and `import cupy` gives a NumPy stand-in.\n")
                header = {"op": "run", "source": source, "inputs": index,
                          "bound": sorted(names.binds), "deleted": sorted(names.deletes)}
                if size >= LARGE_TRANSFER_BYTES:  # seconds of transfer: say so rather than look stuck
                    stderr.write(f"gpu-attach: sending {format_size(size)} of inputs to {lease['gpus'][0]['id']} ...\n")
                reply = _exchange(lease, header, buffers, size, timeout, stdout, stderr, self._renewer.lost)
            finally:
                self._renewer.untrack()
                self.active_lease = None
                try:
                    self.broker.release(lease["id"])
                except GPUAttachError as e:
                    stderr.write(f"gpu-attach: could not release lease {lease['id']} ({e}); "
                                 f"it expires by itself within {lease['ttl_s']:g} s\n")
            t_done = time.perf_counter()

        if reply.op == "error":
            raise _remote_exception(reply, failures)
        not_returned = dict(reply.header.get("failures") or {})
        values = wire.load_names(reply.header["values"], reply.buffers, not_returned)
        namespace.update(values)
        for n in reply.header.get("deleted", []):
            namespace.pop(n, None)
        for n, why in not_returned.items():
            stderr.write(f"gpu-attach: {n!r} stays on the GPU host: {why}\n")
        self.last = CellResult(
            lease=lease, returned=sorted(values), deleted=list(reply.header.get("deleted", [])),
            not_returned=not_returned, remote_elapsed_s=float(reply.header.get("elapsed", 0.0)),
            timings={"serialise": t_ship - t0, "lease": t_lease - t_ship, "cell": t_done - t_lease,
                     "total": time.perf_counter() - t0})
        return self.last

    def pool(self) -> dict:
        return self.broker.pool()

    def close(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()
            self.embedded = None


def _exchange(lease: dict, header: dict, buffers: list, size: int, timeout: float | None, stdout: TextIO, stderr: TextIO,
              lost: dict[str, str]) -> wire.Frame:
    """Send the cell to the lease's agent and relay output until the result or error arrives."""
    host, port = lease["agent"]["address"].rsplit(":", 1)
    where = f"agent {lease['agent']['id']} at {lease['agent']['address']}"
    try:
        sock = socket.create_connection((host, int(port)), timeout=10)
    except OSError as e:
        raise AgentLost(f"cannot connect to {where}: {e}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # Admission may have to start a sandbox process (seconds on a busy host), not just verify.
    sock.settimeout(ADMISSION_TIMEOUT_S)
    started = time.monotonic()
    deadline = started + timeout if timeout else None
    interrupted_at: float | None = None
    why_interrupted = ""
    try:
        # A small cell goes right behind the hello (one round trip less); a large one waits
        # until the agent has accepted the grant, so a refusal costs no wasted transfer.
        hello = {"op": "hello", "token": lease["token"], "protocol": wire.PROTOCOL_VERSION,
                 **agent_identity.hello_fields(lease)}
        pipelined = size <= wire.PIPELINE_MAX_BYTES and "nonce" not in hello  # nothing to an unproven agent
        wire.send_frame(sock, hello)
        if pipelined:
            wire.send_frame(sock, header, buffers)
        try:
            admitted = wire.recv_frame(sock)
        except socket.timeout:  # (CellTimeout is a TimeoutError too: catch only here)
            raise AgentLost(f"{where} did not admit the cell within {ADMISSION_TIMEOUT_S:g} s; "
                            "the lease has been released") from None
        if admitted.op == "reject":
            raise CellRejected(f"{where} refused the cell: {admitted.header.get('message')}")
        if admitted.op != "admitted":
            raise CellRejected(f"{where} answered {admitted.op!r} to hello")
        agent_identity.check_admitted(lease, hello, admitted.header)
        sock.settimeout(None)
        if not pipelined:
            wire.send_frame(sock, header, buffers)
        while True:
            wait = None
            if interrupted_at is not None:
                wait = interrupted_at + INTERRUPT_GRACE_S - time.monotonic()
            elif deadline is not None:
                wait = deadline - time.monotonic()
            if wait is not None and wait <= 0:
                if interrupted_at is not None:
                    raise _stopped(why_interrupted, timeout, hung=True)
                interrupted_at, why_interrupted = time.monotonic(), "timeout"
                wire.send_frame(sock, {"op": "interrupt"})
                continue
            # Deadlines and the stop button act only between frames: a frame, once begun, is read
            # whole, or the stream could not be resumed.
            try:
                ready = select.select([sock], [], [], wait)[0]
            except KeyboardInterrupt:
                if interrupted_at is not None:
                    raise  # a second interrupt: stop waiting for the remote code
                interrupted_at, why_interrupted = time.monotonic(), "interrupt"
                wire.send_frame(sock, {"op": "interrupt"})
                continue
            if not ready:
                continue
            frame = wire.recv_frame(sock)  # an interrupt mid-frame ends the exchange (and so the cell)
            if frame.op == "stream":
                (stderr if frame.header.get("name") == "stderr" else stdout).write(frame.header.get("text", ""))
                continue
            if frame.op in ("result", "error"):
                if why_interrupted == "timeout" and frame.op == "error":
                    raise _stopped("timeout", timeout, hung=False)
                return frame
            raise AgentLost(f"{where} sent an unexpected {frame.op!r} frame")
    except (wire.PeerClosed, ConnectionResetError, BrokenPipeError):
        if lease["id"] in lost:
            raise LeaseLost(f"the lease ended while the cell ran ({lost[lease['id']]}); the agent stopped the cell") from None
        raise AgentLost(
            f"{where} closed the connection {time.monotonic() - started:.1f} s into the cell: the agent or the "
            "cell's sandbox died. The lease has been released; run the cell again.") from None
    except (ConnectionError, wire.WireError) as e:
        raise AgentLost(f"the connection to {where} broke mid-cell ({e}); the lease has been released") from None
    finally:
        sock.close()


def _stopped(why: str, timeout: float | None, hung: bool) -> BaseException:
    tail = " It did not stop within the grace period, so the connection was closed." if hung else ""
    if why == "timeout":
        return CellTimeout(f"the cell ran past --timeout {timeout:g} s and was interrupted.{tail}")
    return KeyboardInterrupt(f"the cell was interrupted.{tail}")


def _remote_exception(reply: wire.Frame, unsent: dict[str, str]) -> BaseException:
    h = reply.header
    exc: BaseException | None = None
    if reply.buffers:
        try:
            exc = wire.loads(reply.buffers)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = RemoteCellError(h.get("etype", "Exception"), h.get("message", ""))
    exc.__cause__ = RemoteTraceback(h.get("traceback", ""))
    if isinstance(exc, NameError) and getattr(exc, "name", None) in unsent:
        exc.add_note(f"{exc.name!r} was not sent to the GPU: {unsent[exc.name]}")
    return exc

