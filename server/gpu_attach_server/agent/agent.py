"""The agent: registers this host's GPUs with the broker, beats, and admits cells to sandboxes.

A kernel connects to the agent's data port and sends a ``hello`` frame holding the grant token.
The agent verifies the token with the broker's public key (no broker round trip), picks or
starts the sandbox for that user, session and device set, and hands the connection's file
descriptor to it. Every heartbeat answer lists the leases still granted; a sandbox running a
cell whose lease has ended (released, expired, revoked) is killed, so no cell outlives its lease.
"""

from __future__ import annotations

import json
import logging
import os
import select
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import requests

from jupyter_gpu_attach import wire

from .. import __version__
from ..grant_tokens import GrantTokenError, GrantVerifier
from .inventory import Device

log = logging.getLogger("gpu_attach.agent")

HELLO_LIMITS = wire.Limits(max_header_bytes=16384, max_buffers=0, max_payload_bytes=0)
HELLO_TIMEOUT_S = 5.0  # for the whole hello, however slowly it trickles in
SANDBOX_START_TIMEOUT_S = 60.0
ABANDON_GRACE_S = 2.0  # a sandbox whose kernel left mid-cell gets this long to stop, then is replaced
MAX_ADMISSIONS = 64  # connections waiting for their hello at once; more are closed at once


@dataclass
class AgentSettings:
    broker_url: str
    agent_token: str
    agent_id: str
    host: str = "127.0.0.1"
    port: int = 0
    advertise_host: str | None = None
    max_payload: int = wire.MAX_PAYLOAD_BYTES
    sandbox_idle_s: float = 600.0
    sandbox_user: str | None = None  # run cells as this (unprivileged) user when the agent is root
    spare_sandboxes: int = 1  # sandbox processes kept started, ready to be pinned to a new session
    workdir: str | None = None


@dataclass
class _WatchedCell:
    """The agent's own copy of a running cell's kernel connection."""

    conn: socket.socket
    sandbox: "SandboxHandle"
    lease: str
    ended: bool = False  # decided over by another thread; the watcher only has to close it
    abandoned_at: float | None = None  # the kernel hung up while the sandbox was still in the cell


@dataclass
class SandboxHandle:
    key: tuple
    proc: subprocess.Popen
    ctl: socket.socket
    workdir: str
    running_lease: str | None = None
    cells: int = 0
    dead: bool = False
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Agent:
    def __init__(self, settings: AgentSettings, devices: list[Device]):
        self.settings = settings
        self.devices = {d.index: d for d in devices}
        self.verifier: GrantVerifier | None = None
        self.incarnation: str | None = None
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {settings.agent_token}"
        self._sandboxes: dict[tuple, SandboxHandle] = {}
        self._starting: dict[tuple, threading.Lock] = {}
        self._spare: tuple[subprocess.Popen, socket.socket] | None = None
        self._cells: dict[int, _WatchedCell] = {}
        self._epoll = select.epoll()
        self._admitted: dict[str, float] = {}  # lease -> expiry: each grant admits one cell
        self._admitting = threading.BoundedSemaphore(MAX_ADMISSIONS)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # Admission waits on the kernel's hello; a pool keeps a slow client from blocking others
        # without paying for a new thread on every cell.
        self._admitters = ThreadPoolExecutor(max_workers=32, thread_name_prefix="admit")
        # Sandboxes ask the kernel to kill them when the thread that started them ends
        # (PR_SET_PDEATHSIG follows the thread, not the process), so one long-lived thread starts them all.
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spawn")
        self._own_root = settings.workdir is None
        self._root = settings.workdir or tempfile.mkdtemp(prefix="gpu-attach-agent-")
        if settings.sandbox_user:
            os.chmod(self._root, 0o711)  # the sandbox user must reach its own workdir inside
        self.listener = socket.create_server((settings.host, settings.port), backlog=128)
        self.port = self.listener.getsockname()[1]

    @property
    def address(self) -> str:
        return f"{self.settings.advertise_host or self.settings.host}:{self.port}"

    # -- broker ---------------------------------------------------------------------------------

    def register(self) -> None:
        body = {"agent_id": self.settings.agent_id, "address": self.address, "version": __version__,
                "devices": [d.to_json() for d in self.devices.values()]}
        r = self.http.post(f"{self.settings.broker_url}/v1/agents", json=body, timeout=10)
        if r.status_code != 201:
            raise RuntimeError(f"broker refused registration ({r.status_code}): {r.text[:500]}")
        reply = r.json()
        self.verifier = GrantVerifier(reply["public_key"])
        self.incarnation = reply["incarnation"]
        self.heartbeat_interval = float(reply["heartbeat_interval_s"])
        log.info("registered with %s as %s (%d devices)", self.settings.broker_url, self.settings.agent_id,
                 len(self.devices))

    def _beat_forever(self) -> None:
        while not self._stop.wait(self.heartbeat_interval):
            try:
                r = self.http.post(
                    f"{self.settings.broker_url}/v1/agents/{self.settings.agent_id}/heartbeat",
                    json={"incarnation": self.incarnation, "running": self._running_leases()}, timeout=10)
                if r.status_code == 409:
                    log.warning("broker lost this agent's registration; registering again")
                    self._stop_all_cells("the broker restarted or marked this agent down")
                    self.register()
                    continue
                r.raise_for_status()
                self._enforce(set(r.json()["active"]))
                self._reap_idle()
            except Exception as e:  # the broker may be restarting; keep beating
                log.warning("heartbeat failed: %s", e)

    def _running_leases(self) -> list[str]:
        with self._lock:
            return [s.running_lease for s in self._sandboxes.values() if s.running_lease]

    def _enforce(self, active: set[str]) -> None:
        """Stop every cell whose lease the broker no longer grants."""
        with self._lock:
            running = [(s, s.running_lease) for s in self._sandboxes.values() if s.running_lease]
        for s, lease in running:
            if lease in active:
                continue
            with s.lock:  # the same cell still, not a newer one admitted since the snapshot
                if s.running_lease != lease:
                    continue
                if self._settle(s) == "done":  # it had ended; the kernel released it since
                    _signal_group(s.proc, signal.SIGSTOP)
                    continue
                log.warning("stopping the cell of lease %s: the lease has ended", lease)
                self._kill_locked(s)

    def _stop_all_cells(self, why: str) -> None:
        with self._lock:
            doomed = [s for s in self._sandboxes.values() if s.running_lease]
        for s in doomed:
            log.warning("stopping the cell of lease %s: %s", s.running_lease, why)
            self._kill(s)

    # -- data port ------------------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Beat and accept cells until :meth:`stop`; call :meth:`register` first."""
        if self.settings.spare_sandboxes:
            self._spawner.submit(self._refill_spare)
        threading.Thread(target=self._beat_forever, name="heartbeat", daemon=True).start()
        threading.Thread(target=self._watch_cells_forever, name="cell-watch", daemon=True).start()
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError as e:
                if self._stop.is_set():
                    return
                log.warning("accept failed (%s); backing off", e)  # e.g. out of file descriptors
                time.sleep(0.1)
                continue
            if not self._admitting.acquire(blocking=False):
                _reject(conn, "busy", "the agent has too many connections waiting; try again", drain=False)
                conn.close()
                continue
            self._admitters.submit(self._admit, conn)

    def _admit(self, conn: socket.socket) -> None:
        """Verify the hello frame's grant and hand the connection to the session's sandbox."""
        watched = False
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            hello = wire.recv_frame(_Deadline(conn, HELLO_TIMEOUT_S), HELLO_LIMITS)
            if hello.op != "hello":
                raise GrantTokenError("the first frame must be a hello holding the grant token")
            claims = self.verifier.verify(hello.header.get("token", ""), agent_id=self.settings.agent_id)
            missing = [i for i in claims["gpus"] if i not in self.devices]
            if missing:
                raise GrantTokenError(f"this agent has no device {missing}")
            self._admit_once(claims)
            conn.settimeout(None)
            for _ in range(2):  # a sandbox killed (idle, lease ended) just as we picked it: once more
                sandbox = self._sandbox_for(claims)
                with sandbox.lock:
                    if sandbox.dead:
                        continue
                    state = self._settle(sandbox) if sandbox.running_lease else "done"
                    if state == "running":
                        raise GrantTokenError("a cell of this session is already running; wait for it to finish")
                    if state == "abandoned":  # its kernel gave up on the last cell: start afresh
                        self._kill_locked(sandbox)
                        continue
                    sandbox.running_lease = claims["lease"]
                    sandbox.last_used = time.monotonic()
                    sandbox.cells += 1
                    _signal_group(sandbox.proc, signal.SIGCONT)  # frozen since its last cell
                    # A kernel with a large run frame waits for this before sending it; a small
                    # one was pipelined right behind the hello and is already waiting.
                    wire.send_frame(conn, {"op": "admitted", "sandbox_pid": sandbox.proc.pid,
                                           "warm": sandbox.cells > 1})
                    socket.send_fds(sandbox.ctl, [json.dumps({"op": "cell", "claims": claims}).encode()],
                                    [conn.fileno()])
                    self._watch_cell(conn, sandbox, claims["lease"])
                    watched = True
                break
            else:
                raise RuntimeError("the session's sandbox kept dying as it was picked")
        except GrantTokenError as e:
            _reject(conn, "bad_grant", str(e))
        except wire.WireError as e:
            _reject(conn, "bad_frame", str(e))
        except Exception as e:
            log.exception("could not admit a cell")
            _reject(conn, "agent_error", f"the agent could not start the cell: {e}")
        finally:
            if not watched:
                conn.close()
            self._admitting.release()

    def _admit_once(self, claims: dict) -> None:
        """A grant admits one cell: a token seen before (a replay) is refused."""
        now = time.time()
        with self._lock:
            if claims["lease"] in self._admitted:
                raise GrantTokenError("this grant was used already; each cell needs a new lease")
            self._admitted[claims["lease"]] = float(claims["exp"])
            if len(self._admitted) > 4096:
                self._admitted = {k: v for k, v in self._admitted.items() if v + 60 > now}

    # -- cells: the agent's own view of what runs ---------------------------------------------------
    # A cell runs from its admission until the kernel's connection closes. The agent watches its
    # own copy of that connection, so nothing the sandbox (user code) says can stretch a cell;
    # between cells the sandbox is frozen (SIGSTOP), so nothing it started keeps running either.

    def _watch_cell(self, conn: socket.socket, sandbox: "SandboxHandle", lease: str) -> None:
        cell = _WatchedCell(conn, sandbox, lease)
        with self._lock:
            self._cells[conn.fileno()] = cell
        self._epoll.register(conn.fileno(), select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR)

    def _watch_cells_forever(self) -> None:
        """The one thread that closes the agent's copies of cell connections (so no fd number is
        reused while another thread still acts on it)."""
        while not self._stop.is_set():
            try:
                events = self._epoll.poll(0.2)
            except OSError:
                return
            for fd, ev in events:
                with self._lock:
                    cell = self._cells.get(fd)
                if cell is None:
                    continue
                if cell.ended or ev & (select.EPOLLHUP | select.EPOLLERR):
                    # Both sides are done: the sandbox shut the socket after its reply (or died, or
                    # was killed), and the kernel hung up or reset.
                    self._forget(fd, cell)
                    if not cell.ended:
                        self._cell_over(cell.sandbox, cell.lease)
                elif cell.abandoned_at is None:
                    # The kernel hung up while the sandbox is still in the cell (an interrupt it
                    # ignored, or code stuck in C): give it a moment to notice, then replace it.
                    cell.abandoned_at = time.monotonic()
                    self._epoll.modify(fd, select.EPOLLHUP | select.EPOLLERR)
            now = time.monotonic()
            with self._lock:
                late = [c for c in self._cells.values()
                        if c.abandoned_at is not None and not c.ended and now - c.abandoned_at > ABANDON_GRACE_S]
            for cell in late:
                log.warning("killing the sandbox of lease %s: its kernel left and the cell did not stop", cell.lease)
                self._kill(cell.sandbox)

    def _forget(self, fd: int, cell: "_WatchedCell") -> None:
        with self._lock:
            if self._cells.get(fd) is cell:
                del self._cells[fd]
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass
        cell.conn.close()

    def _settle(self, sandbox: "SandboxHandle") -> str:
        """With the sandbox's lock held: is its running cell really still running? Its next cell,
        or a heartbeat, can come before the watcher thread has seen the last one end.

        ``done``: it ended (running_lease is cleared); ``abandoned``: its kernel hung up but the
        sandbox is still in the cell; ``running``: it is running."""
        with self._lock:
            cell = next((c for c in self._cells.values()
                         if c.sandbox is sandbox and c.lease == sandbox.running_lease), None)
        if cell is not None and not cell.ended:
            p = select.poll()
            p.register(cell.conn.fileno(), select.POLLRDHUP | select.POLLHUP | select.POLLERR)
            ev = p.poll(0)
            ev = ev[0][1] if ev else 0
            if not ev & (select.POLLHUP | select.POLLERR):
                return "abandoned" if ev & select.POLLRDHUP else "running"
            cell.ended = True  # the watcher will close it
        sandbox.running_lease = None
        sandbox.last_used = time.monotonic()
        return "done"

    def _cell_over(self, sandbox: "SandboxHandle", lease: str) -> None:
        with sandbox.lock:
            if sandbox.running_lease != lease:
                return
            sandbox.running_lease = None
            sandbox.last_used = time.monotonic()
            if not sandbox.dead:
                _signal_group(sandbox.proc, signal.SIGSTOP)

    # -- sandboxes ------------------------------------------------------------------------------

    def _sandbox_for(self, claims: dict) -> SandboxHandle:
        key = (claims["user"], claims["session"], tuple(claims["gpus"]))
        with self._lock:
            s = self._sandboxes.get(key)
            if s is not None and s.proc.poll() is None:
                return s
            starting = self._starting.setdefault(key, threading.Lock())
        # Claiming a sandbox takes milliseconds (a fresh one, far longer): hold only this
        # session's lock meanwhile, so other sessions' cells are admitted as usual.
        with starting:
            with self._lock:
                s = self._sandboxes.get(key)
                if s is not None and s.proc.poll() is None:
                    return s
            s = self._claim(key, claims)
            with self._lock:
                self._sandboxes[key] = s
                self._starting.pop(key, None)
            return s

    def _claim(self, key: tuple, claims: dict) -> SandboxHandle:
        """Pin a started sandbox process to this session's slice and user."""
        devices = [self.devices[i] for i in claims["gpus"]]
        simulated = all(d.simulated for d in devices)
        proc, ctl = self._take_spare()
        workdir = tempfile.mkdtemp(prefix="session-", dir=self._root)
        claim = {
            "op": "claim", "simulated": simulated, "workdir": workdir, "max_payload": self.settings.max_payload,
            # Real GPUs are pinned by UUID, which does not depend on device enumeration order.
            "env": {"HOME": workdir, "CUDA_VISIBLE_DEVICES": "" if simulated else ",".join(d.uuid for d in devices),
                    "GPU_ATTACH_SIMULATED": "1" if simulated else "0"},
        }
        if self.settings.sandbox_user:
            import pwd

            pw = pwd.getpwnam(self.settings.sandbox_user)
            os.chown(workdir, pw.pw_uid, pw.pw_gid)
            claim.update(uid=pw.pw_uid, gid=pw.pw_gid)
        try:
            ctl.settimeout(SANDBOX_START_TIMEOUT_S)
            ctl.send(json.dumps(claim).encode())
            ready = json.loads(ctl.recv(65536) or b"{}")
            ctl.settimeout(None)
        except (OSError, ValueError):
            ready = {}
        if ready.get("op") != "ready":
            _killpg(proc)
            proc.wait()
            ctl.close()
            shutil.rmtree(workdir, ignore_errors=True)
            raise RuntimeError(f"the sandbox process did not start: {ready.get('error', 'it exited')}")
        handle = SandboxHandle(key, proc, ctl, workdir)
        threading.Thread(target=self._follow, args=(handle,), daemon=True).start()
        log.info("sandbox pid %d for user %s session %s on devices %s%s", proc.pid, key[0], key[1], list(key[2]),
                 " (simulated)" if simulated else "")
        return handle

    def _take_spare(self) -> tuple[subprocess.Popen, socket.socket]:
        """A started, not yet pinned sandbox process: the spare if one is waiting, else a new one.

        A cell's lease starts before its sandbox exists; starting Python and importing NumPy
        then would hold the GPU idle for a few hundred milliseconds, so a spare waits ready.
        """
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None and spare[0].poll() is not None:
            spare[1].close()
            spare = None
        # This cell's own start goes first on the spawner; the refill queues behind it.
        own = None if spare is not None else self._spawner.submit(self._start_sandbox_process)
        if self.settings.spare_sandboxes and not self._stop.is_set():
            self._spawner.submit(self._refill_spare)
        return spare if spare is not None else own.result()

    def _refill_spare(self) -> None:
        try:
            spare = self._start_sandbox_process()
        except Exception as e:  # no spare only means a slower next start
            log.warning("could not start a spare sandbox: %s", e)
            return
        with self._lock:
            if self._spare is None and not self._stop.is_set():
                self._spare, spare = spare, None
        if spare is not None:
            _killpg(spare[0])
            spare[0].wait()
            spare[1].close()

    def _start_sandbox_process(self) -> tuple[subprocess.Popen, socket.socket]:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        boot = {"ctl_fd": child.fileno(), "agent_pid": os.getpid()}
        # A clean environment: nothing of the agent's (its token above all) reaches user code.
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": os.environ.get("LANG", "C.UTF-8"),
               "PYTHONUNBUFFERED": "1", "GPU_ATTACH_SANDBOX": json.dumps(boot)}
        # What CUDA and the BLAS need to load, and nothing else of ours.
        for name in ("PYTHONPATH", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "CUDA_HOME", "CUDA_PATH",
                     "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS"):
            if name in os.environ:
                env[name] = os.environ[name]
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpu_attach_server.agent.sandbox"],
            env=env, cwd=self._root, pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, start_new_session=True)
        child.close()
        parent.settimeout(SANDBOX_START_TIMEOUT_S)
        try:
            started = json.loads(parent.recv(65536) or b"{}")
        except (OSError, ValueError):
            started = {}
        parent.settimeout(None)
        if started.get("op") != "started":
            _killpg(proc)
            parent.close()
            raise RuntimeError(f"the sandbox process exited with code {proc.wait()} while starting")
        return proc, parent

    def _follow(self, s: SandboxHandle) -> None:
        """Wait for the sandbox's control socket to close (it exited), then clean up after it.

        What the sandbox says here is never trusted for enforcement: user code runs in it."""
        while True:
            try:
                msg = s.ctl.recv(65536)
            except OSError:
                msg = b""
            if not msg:
                break
        self._kill(s)
        s.proc.wait()
        s.ctl.close()
        shutil.rmtree(s.workdir, ignore_errors=True)

    def _kill(self, s: SandboxHandle) -> None:
        with s.lock:
            self._kill_locked(s)

    def _kill_locked(self, s: SandboxHandle) -> None:
        """Kill a sandbox (its lock held) and hang up its cell's kernel connection, if any."""
        s.dead = True
        _killpg(s.proc)
        with self._lock:
            cells = [c for c in self._cells.values() if c.sandbox is s and not c.ended]
            if self._sandboxes.get(s.key) is s:
                del self._sandboxes[s.key]
        for c in cells:  # our copy would keep the kernel's connection open; the watcher closes it
            c.ended = True
            try:
                c.conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _reap_idle(self) -> None:
        cutoff = time.monotonic() - self.settings.sandbox_idle_s
        with self._lock:
            idle = [s for s in self._sandboxes.values() if not s.running_lease and s.last_used < cutoff]
        for s in idle:
            with s.lock:
                if not s.running_lease and s.last_used < cutoff:
                    self._kill_locked(s)

    def stop(self) -> None:
        self._stop.set()
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked in serve_forever
        except OSError:
            pass
        try:
            self.listener.close()
        except OSError:
            pass
        with self._lock:
            sandboxes = list(self._sandboxes.values())
            spare, self._spare = self._spare, None
        for s in sandboxes:
            self._kill(s)
        if spare is not None:
            _killpg(spare[0])
        if self._own_root:
            shutil.rmtree(self._root, ignore_errors=True)


def _killpg(proc: subprocess.Popen) -> None:
    """Kill a sandbox and anything it started (it leads its own process group)."""
    _signal_group(proc, signal.SIGKILL)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class _Deadline:
    """A socket view whose reads share one deadline: a hello that trickles in byte by byte
    cannot hold an admission slot longer than the deadline."""

    def __init__(self, sock: socket.socket, seconds: float):
        self._sock, self._end = sock, time.monotonic() + seconds

    def recv(self, n, flags=0):
        return self._within(self._sock.recv, n, flags)

    def recv_into(self, buf, n=0):
        return self._within(self._sock.recv_into, buf, n)

    def _within(self, read, *args):
        left = self._end - time.monotonic()
        if left <= 0:
            raise wire.WireError("the hello did not arrive in time")
        self._sock.settimeout(left)
        try:
            return read(*args)
        except socket.timeout:
            raise wire.WireError("the hello did not arrive in time") from None


def _reject(conn: socket.socket, code: str, message: str, drain: bool = True) -> None:
    """Send the refusal, then read and drop what the kernel may have pipelined behind its hello:
    closing with unread data would reset the connection and could destroy the refusal in flight."""
    try:
        conn.settimeout(1.0)
        wire.send_frame(conn, {"op": "reject", "code": code, "message": message})
        if not drain:
            return
        conn.shutdown(socket.SHUT_WR)
        drained, deadline = 0, time.monotonic() + 1.0
        while drained < wire.PIPELINE_MAX_BYTES + HELLO_LIMITS.max_header_bytes:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            conn.settimeout(left)
            chunk = conn.recv(65536)
            if not chunk:
                break
            drained += len(chunk)
    except OSError:
        pass


def new_agent_id() -> str:
    return f"{socket.gethostname()}-{secrets.token_hex(3)}"
