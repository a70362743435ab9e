"""A notebook's session with the GPU pool, and the life of one remote cell.

:meth:`GPUSession.run` is the one place that parses, leases, ships, streams, returns and
releases; the magics, the widget and the Python API are shells around it. No IPython here.
"""

from __future__ import annotations

import builtins
import os
import secrets
import select
import socket
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, MutableMapping, TextIO

from . import agent_identity, wire
from .broker_client import DEFAULT_WAIT_S, BrokerClient
from .cell_analysis import analyse
from .environment import environment
from .errors import (
    AgentLost,
    CellRejected,
    CellTimeout,
    EnvironmentMismatch,
    GPUAttachError,
    LeaseLost,
    RemoteCellError,
    RemoteStateLost,
    RemoteTraceback,
)
from .namespace_sync import RemoteNamespace
from .relay import PlainRelay
from .slices import SliceRequest, format_size

#: Inputs this large get a line of progress in the cell's output.
LARGE_TRANSFER_BYTES = 256 * 1024**2

#: How long the agent may take to admit a cell (it may be starting the session's sandbox).
ADMISSION_TIMEOUT_S = 120.0

#: After an interrupt or timeout, how long the remote code gets to stop before we hang up.
INTERRUPT_GRACE_S = 5.0

#: How often a session says it is alive until the broker says otherwise (its ``beat_s``).
SESSION_BEAT_S = 5.0


@dataclass
class CellResult:
    """What a finished cell did: names returned, names that stay remote, timings, lease."""

    lease: dict
    returned: list[str]
    deleted: list[str]
    not_returned: dict[str, str]
    remote_elapsed_s: float
    timings: dict[str, float] = field(default_factory=dict)
    sent: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)


class _Renewer:
    """Keeps the running cell's lease alive, and tells the broker the session is: one thread per
    session, woken on a timer only.

    A thread started (and stopped) per cell cost more than a whole trivial cell, so the cell
    just points this at its lease; the lease is renewed once it is a third of its TTL old.

    From the session's first cell on, the session beats (``POST /v1/sessions/ID/alive``, every
    ``beat_s`` the broker asks for). A kernel that dies without ending its session (killed, or
    crashed) stops beating, and the broker has the agents reclaim its sandbox within the timeout,
    instead of the sandbox's processes waiting out the agent's idle limit.
    """

    def __init__(self, broker: BrokerClient):
        # Its own connection, so a renewal never queues behind the cell's own broker calls; and a
        # short timeout, so one hung renewal cannot use up the lease it is meant to extend.
        self.broker = BrokerClient(broker.url, broker.token, timeout=5.0)
        self.lost: dict[str, str] = {}
        self._lease: dict | None = None
        self._renewed_at = 0.0
        self._period = 1.0
        self._session: str | None = None  # the session that beats, once it has run a cell
        self._beat_s = SESSION_BEAT_S
        self._beat_at = float("-inf")
        self._stopped = False
        self._beating = threading.Lock()  # held while a beat is on its way: stop_beating waits for it
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def track(self, lease: dict) -> None:
        ttl = float(lease["ttl_s"])
        self._renewed_at = time.monotonic()
        self._lease = lease
        if ttl / 6 < self._period:
            self._period = max(ttl / 6, 0.02)
            self._wake.set()  # rare: a shorter TTL than before
        self._start()

    def untrack(self) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            self.lost.pop(lease["id"], None)

    def beat(self, session: str) -> None:
        """Beat for ``session`` from now on (the first beat goes out at once)."""
        if self._session != session:
            self._session, self._beat_at = session, float("-inf")
            self._wake.set()
        self._start()

    def stop_beating(self) -> None:
        """No more beats, none on its way either: one that reached the broker after the session's
        end would have it watched (and ended again) for nothing."""
        with self._beating:
            self._session = None

    def stop(self) -> None:
        """No more renewals or beats: the session was replaced or collected."""
        self._stopped, self._session, self._lease = True, None, None
        self._wake.set()

    def _start(self) -> None:
        if self._thread is None and not self._stopped:
            self._thread = threading.Thread(target=self._run, name="gpu-attach-renew", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stopped:
            self._wake.wait(min(self._period, self._beat_s))
            self._wake.clear()
            self._renew()
            self._beat()

    def _renew(self) -> None:
        lease = self._lease
        if lease is None or time.monotonic() - self._renewed_at < float(lease["ttl_s"]) / 3:
            return
        try:
            self.broker.renew(lease["id"])
            self._renewed_at = time.monotonic()
        except LeaseLost as e:
            self.lost[lease["id"]] = str(e)
            if self._lease is lease:
                self._lease = None
        except GPUAttachError:
            pass  # a broker blip: the lease lives until its TTL; try again next tick

    def _beat(self) -> None:
        if self._session is None or time.monotonic() - self._beat_at < self._beat_s:
            return
        with self._beating:
            session = self._session
            if session is None:
                return
            self._beat_at = time.monotonic()
            try:
                answer = self.broker.session_alive(session)
            except GPUAttachError:
                return  # a broker blip, or a broker from before beats: try again next time
        beat_s = answer.get("beat_s") if isinstance(answer, dict) else None
        if isinstance(beat_s, (int, float)) and beat_s > 0:
            self._beat_s = min(max(float(beat_s), 0.05), 60.0)


class GPUSession:
    """One notebook's relationship with the pool: its broker, default request, session id, and the
    view of its sandbox's namespace (what the sandbox holds, what stays there)."""

    def __init__(self, broker_url: str, token: str, default: SliceRequest | None = None,
                 session_id: str | None = None, embedded: Any = None, generation: int = 1):
        """``generation``: the how-manieth session of this id's notebook (after ``generation - 1``
        ends by :meth:`close`); its id is then ``<session_id>.<generation>``."""
        self.broker = BrokerClient(broker_url, token)
        self.default = default or SliceRequest()
        # close() moves on to <id>.2, <id>.3, ... (session_id)
        self._first_id, self._generation = (session_id or "nb-" + secrets.token_hex(6))[:120], max(1, int(generation))
        self.embedded = embedded  # the LocalPool-like handle when this session started the broker
        self.last: CellResult | None = None
        self.active_lease: dict | None = None
        self.remote = RemoteNamespace()
        self.wait_s = DEFAULT_WAIT_S  # how long a cell waits in the broker's queue (0: fail at once)
        self._env_checked = False
        self._told_simulated = False
        self._lock = threading.Lock()  # one cell at a time per session
        self._renewer = _Renewer(self.broker)
        # A session dropped without close() stops beating, and the broker ends it in time.
        weakref.finalize(self, _Renewer.stop, self._renewer)

    @property
    def session_id(self) -> str:
        """This session's id at the broker: the first one's, and ``.2``, ``.3`` after each close()."""
        return self._first_id if self._generation == 1 else f"{self._first_id}.{self._generation}"

    def successor(self) -> dict:
        """What a GPUSession that takes over from this (closed) one is made with: the same id's
        next generation, never an id whose end the agents may still be hearing of."""
        return {"session_id": self._first_id, "generation": self._generation}

    def run(
        self,
        source: str,
        namespace: MutableMapping[str, Any],
        request: SliceRequest | None = None,
        timeout: float | None = None,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
        label: str = "",
        relay: Any = None,
        execution_count: int | None = None,
        wait: float | None = None,
    ) -> CellResult:
        """Run ``source`` on a leased slice, reading inputs from and writing results to ``namespace``."""
        __tracebackhide__ = True
        relay = relay or PlainRelay(stdout, stderr)
        names = analyse(source)  # a SyntaxError is raised here, before anything is leased
        t0 = time.perf_counter()
        inputs = self.remote.plan(names, namespace)
        buffers = wire.dumps(inputs.values, namespace) if inputs.values else []
        size = sum(memoryview(b).nbytes for b in buffers)
        t_ship = time.perf_counter()

        request = (request or self.default).or_default()
        header = {"op": "run", "source": source, "count": execution_count or 0, "cwd": os.getcwd(), **inputs.header}
        if not self._env_checked:
            header["env"] = environment()
        with self._lock:
            asked = time.monotonic()
            wait_s = self.wait_s if wait is None else wait
            lease = self.broker.request_lease(
                request, self.session_id, label, wait_s=wait_s or None,
                on_queued=lambda pos, of, eta: relay.queued(pos, of, eta, time.monotonic() - asked))
            if time.monotonic() - asked > 1.0:
                relay.granted_after_wait(time.monotonic() - asked)
            t_lease = time.perf_counter()
            self.active_lease = lease
            self._renewer.track(lease)
            self._renewer.beat(self.session_id)  # from its first cell, the session has a sandbox to keep
            try:
                if lease.get("simulated") and not self._told_simulated:
                    self._told_simulated = True
                    gpu = lease["gpus"][0]["id"]
                    relay.stream("stderr", f"gpu-attach: {gpu} is a SIMULATED device (no NVIDIA GPU on its host): "
                                 "this cell runs on the CPU, and `import cupy` gives a NumPy stand-in.\n")
                if lease.get("borrowed"):
                    b = lease["borrowed"]
                    relay.stream("stderr", f"gpu-attach: this cell runs on idle capacity borrowed above your "
                                 f"{b.get('resource', '')} quota; if another user starts waiting it is stopped "
                                 "within one lease TTL.\n")
                if size >= LARGE_TRANSFER_BYTES:  # seconds of transfer: say so rather than look stuck
                    relay.stream("stderr", f"gpu-attach: sending {format_size(size)} of inputs to "
                                 f"{lease['gpus'][0]['id']} ...\n")
                exchange = _Exchange(lease, relay, self._renewer.lost, namespace, inputs.hashes)
                reply = exchange.run(header, buffers, size, timeout)
            finally:
                self._renewer.untrack()
                self.active_lease = None
                try:
                    self.broker.release(lease["id"])
                except GPUAttachError as e:
                    relay.stream("stderr", f"gpu-attach: could not release lease {lease['id']} ({e}); "
                                 f"it expires by itself within {lease['ttl_s']:g} s\n")
            t_done = time.perf_counter()

        h = reply.header
        self._env_checked = True
        if self.remote.sandbox is not None and h.get("sandbox") != self.remote.sandbox:
            # A new sandbox: what the old one held is gone; the cell already re-sent what it needed.
            gone = self.remote.forget()
            if gone:
                relay.stream("stderr", f"gpu-attach: this session's sandbox on agent {self.remote.agent} ended since the "
                             f"last cell; what lived only there is gone: {', '.join(gone)}\n")
        self.remote.sandbox = h.get("sandbox")
        self.remote.agent = lease["agent"]["id"]
        self.remote.sent(inputs)
        for n in exchange.resent:
            self.remote.synced[n] = inputs.hashes[n]
        error = h.get("error")
        n_values = int(h.get("value_buffers", len(reply.buffers))) if error else len(reply.buffers)
        load_failures: dict[str, str] = {}
        values: dict[str, Any] = {}
        if n_values:
            try:
                values = wire.loads(reply.buffers[:n_values], namespace)
            except Exception as e:  # one value's module is not installed here: they all stay there
                why = f"it could not be loaded here ({type(e).__name__}: {e})"
                load_failures = {n: why for n in h.get("values", [])}
        returned = self.remote.apply(h, values, namespace, load_failures)
        not_returned = dict(h.get("remote") or {}, **load_failures)
        for n, why in not_returned.items():
            relay.stream("stderr", f"gpu-attach: {n!r} stays in this session's sandbox on the GPU host ({why}); "
                         "later %%gpu cells can use it\n")
        remote_cwd = h.get("cwd")
        if isinstance(remote_cwd, str) and remote_cwd != header["cwd"] and os.path.isdir(remote_cwd):
            os.chdir(remote_cwd)  # the cell ran %cd: the notebook follows, as a local cell would
        self.last = CellResult(
            lease=lease, returned=returned, deleted=list(h.get("deleted", [])),
            not_returned=not_returned, remote_elapsed_s=float(h.get("elapsed", 0.0)),
            timings={"serialise": t_ship - t0, "lease": t_lease - t_ship, "cell": t_done - t_lease,
                     "total": time.perf_counter() - t0},
            sent=sorted(inputs.values) + sorted(exchange.resent), cached=sorted(set(inputs.header["cached"]) - exchange.resent))
        if error:
            raise self._remote_error(error, reply.buffers[n_values:], inputs.failures)
        return self.last

    def _remote_error(self, error: dict, buffers: list, unsent: dict[str, str]) -> BaseException:
        etype, message = error.get("etype", "Exception"), error.get("message", "")
        where = f"agent {self.remote.agent}"
        if etype == "gpu_attach.RemoteStateLost":
            for n in message.split(", "):
                self.remote.remote_only.pop(n, None)
            return RemoteStateLost(
                f"{message} lived only in this session's sandbox, which has ended since (idle too long, its agent "
                f"restarted, or this cell ran on another host than {where}, or on other GPUs once a GPU library was "
                "loaded there). Re-run the cells that made them.")
        if etype == "gpu_attach.EnvironmentMismatch":
            return EnvironmentMismatch(f"{where}: {message}")
        if etype in ("gpu_attach.InputError", "gpu_attach.ProtocolError"):
            return CellRejected(f"{where}: {message}")
        exc: BaseException | None = None
        if buffers:
            try:
                exc = wire.loads(buffers)
            except Exception:
                exc = None
        if not isinstance(exc, BaseException):
            cls = getattr(builtins, etype.split(".", 1)[1], None) if etype.startswith("builtins.") else None
            if isinstance(cls, type) and issubclass(cls, Exception):
                exc = cls(message)  # MemoryError and friends keep their type
            else:
                exc = RemoteCellError(etype.rsplit(".", 1)[-1], message)
        stb = error.get("stb")
        if stb:
            try:
                exc._render_traceback_ = lambda: list(stb)  # IPython shows the remote cell's own traceback
            except (AttributeError, TypeError):
                pass
        exc.__cause__ = RemoteTraceback("".join(stb or []))
        exc.__suppress_context__ = True
        if isinstance(exc, NameError) and getattr(exc, "name", None) in unsent and hasattr(exc, "add_note"):
            exc.add_note(f"{exc.name!r} was not sent to the GPU: {unsent[exc.name]}")
        return exc

    def set_token(self, token: str) -> None:
        """Use another user token from the next request on (the broker URL stays)."""
        self.broker = BrokerClient(self.broker.url, token)
        old, self._renewer = self._renewer, _Renewer(self.broker)
        beating = old._session is not None
        old.stop()
        weakref.finalize(self, _Renewer.stop, self._renewer)
        if beating:
            self._renewer.beat(self.session_id)

    def check_environment(self, relay: Any = None) -> CellResult:
        """Run an empty cell: starts (warms) the session's sandbox and compares its environment."""
        self._env_checked = False
        return self.run("", {}, relay=relay)

    def pool(self) -> dict:
        return self.broker.pool()

    def close(self) -> None:
        """End the session: its sandbox is ended, and an embedded broker this session started stops.

        A cell run after this starts a new session, under a new id (``<id>.2``, ``<id>.3``, ...):
        the agents hear of the end a moment later, and under the old id that late end would stop
        the new session's first cell."""
        self._renewer.stop_beating()
        end = getattr(self.broker, "end_session", None)
        if end is not None and self.remote.sandbox is not None:
            try:
                end(self.session_id)
            except GPUAttachError:
                pass
        if self.remote.sandbox is not None:
            self.remote.forget()
            self._generation += 1
        if self.embedded is not None:
            self.embedded.stop()
            self.embedded = None


class _Exchange:
    """One cell's conversation with its sandbox: send the cell, relay its output and input requests,
    answer its requests for inputs, pass on the stop button, and return the result frame."""

    def __init__(self, lease: dict, relay: Any, lost: dict[str, str], namespace: MutableMapping[str, Any],
                 hashes: dict[str, str]):
        self.lease, self.relay, self.lost = lease, relay, lost
        self.namespace, self.hashes = namespace, hashes
        self.resent: set[str] = set()
        self.where = f"agent {lease['agent']['id']} at {lease['agent']['address']}"

    def run(self, header: dict, buffers: list, size: int, timeout: float | None) -> wire.Frame:
        host, port = self.lease["agent"]["address"].rsplit(":", 1)
        try:
            sock = socket.create_connection((host, int(port)), timeout=10)
        except OSError as e:
            raise AgentLost(f"cannot connect to {self.where}: {e}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Admission may have to start a sandbox process (seconds on a busy host), not just verify.
        sock.settimeout(ADMISSION_TIMEOUT_S)
        self.started = time.monotonic()
        try:
            reply = self._converse(sock, header, buffers, size, timeout)
            _await_hangup(sock)
            return reply
        except (wire.PeerClosed, ConnectionResetError, BrokenPipeError):
            if self.lease["id"] in self.lost:
                raise LeaseLost(f"the lease ended while the cell ran ({self.lost[self.lease['id']]}); "
                                "the agent stopped the cell") from None
            raise AgentLost(
                f"{self.where} closed the connection {time.monotonic() - self.started:.1f} s into the cell: the agent "
                "or the cell's sandbox died. The lease has been released; run the cell again.") from None
        except (ConnectionError, wire.WireError) as e:
            raise AgentLost(f"the connection to {self.where} broke mid-cell ({e}); the lease has been released") from None
        finally:
            sock.close()

    def _converse(self, sock, header, buffers, size, timeout) -> wire.Frame:
        where = self.where
        deadline = self.started + timeout if timeout else None
        interrupted_at: float | None = None
        why_interrupted = ""
        # A small cell goes right behind the hello (one round trip less); a large one waits
        # until the agent has accepted the grant, so a refusal costs no wasted transfer.
        hello = {"op": "hello", "token": self.lease["token"], "protocol": wire.PROTOCOL_VERSION,
                 **agent_identity.hello_fields(self.lease)}
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
        agent_identity.check_admitted(self.lease, hello, admitted.header)
        sock.settimeout(None)
        if not pipelined:
            try:
                wire.send_frame(sock, header, buffers)
            except (BrokenPipeError, ConnectionResetError):
                # The sandbox stopped reading: it may have refused the inputs (over its memory
                # limit, say) and said why before it hung up. That answer, if there, is the error.
                sock.settimeout(1.0)
                try:
                    refusal = wire.recv_frame(sock)
                except (OSError, wire.WireError):
                    raise AgentLost(f"{where} hung up while the cell's inputs were sent") from None
                if refusal.op == "result":
                    return refusal
                raise
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
            op = frame.op
            if op == "stream":
                self.relay.stream("stderr" if frame.header.get("name") == "stderr" else "stdout",
                                  str(frame.header.get("text", "")))
            elif op == "display":
                h = frame.header
                self.relay.display(h.get("data") or {}, h.get("metadata") or {}, h.get("transient") or {},
                                   bool(h.get("update")))
            elif op == "clear_output":
                self.relay.clear_output(bool(frame.header.get("wait")))
            elif op == "execute_result":
                self._result(frame)
            elif op == "input_request":
                self._input(sock, frame.header)
            elif op == "need":
                self._resend(sock, frame.header.get("names") or [])
            elif op == "result":
                err = (frame.header.get("error") or {}).get("etype", "")
                if why_interrupted == "timeout" and err.endswith("KeyboardInterrupt"):
                    raise _stopped("timeout", timeout, hung=False)
                return frame
            elif op == "error":  # the agent itself ended the cell (its sandbox ran out of memory, say)
                h = frame.header
                return wire.Frame({"op": "result", "value_buffers": 0, "error": {
                    "etype": str(h.get("etype", "Exception")), "message": str(h.get("message", "")), "stb": None}})
            elif op == "reject":  # the agent gave up on the cell after admitting it
                raise CellRejected(f"{where} stopped the cell: {frame.header.get('message')}")
            else:
                raise AgentLost(f"{where} sent an unexpected {op!r} frame")

    def _result(self, frame: wire.Frame) -> None:
        h = frame.header
        value, has_value = None, bool(h.get("has_value") and frame.buffers)
        if has_value:
            try:
                value = wire.loads(frame.buffers, self.namespace)
            except Exception:
                has_value = False
        self.relay.result(h.get("data") or {}, h.get("metadata") or {}, value, has_value)

    def _input(self, sock, h: dict) -> None:
        try:
            reply = {"op": "input_reply", "value": self.relay.ask(str(h.get("prompt", "")), bool(h.get("password")))}
        except KeyboardInterrupt:
            reply = {"op": "input_reply", "error": "interrupted", "etype": "KeyboardInterrupt"}
        except Exception as e:
            reply = {"op": "input_reply", "error": str(e), "etype": type(e).__name__}
        wire.send_frame(sock, reply)

    def _resend(self, sock, names: list) -> None:
        """The sandbox no longer holds inputs we thought it did (a new sandbox): send them now."""
        wanted = {n: self.namespace[n] for n in names if isinstance(n, str) and n in self.namespace}
        self.resent |= set(wanted)
        wire.send_frame(sock, {"op": "values", "hashes": {n: self.hashes[n] for n in wanted if n in self.hashes}},
                        wire.dumps(wanted, self.namespace))


def _await_hangup(sock: socket.socket, limit_s: float = 1.0) -> None:
    """After the result, wait for the sandbox to hang up before we do. The agent tells a finished
    cell from an abandoned one by who hung up first; a kernel that closed first would have the
    sandbox it needs for its next cell (its whole namespace) replaced."""
    sock.settimeout(limit_s)
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass


def _stopped(why: str, timeout: float | None, hung: bool) -> BaseException:
    tail = " It did not stop within the grace period, so the connection was closed." if hung else ""
    if why == "timeout":
        return CellTimeout(f"the cell ran past --timeout {timeout:g} s and was interrupted.{tail}")
    return KeyboardInterrupt(f"the cell was interrupted.{tail}")
