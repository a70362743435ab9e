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
        self._cells: dict[int, tuple[socket.socket, SandboxHandle, str]] = {}
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
            log.warning("stopping the cell of lease %s: the lease has ended", lease)
            self._kill(s)

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
                    if sandbox.running_lease and not self._settle(sandbox):
                        raise GrantTokenError("a cell of this session is already running; wait for it to finish")
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
        with self._lock:
            self._cells[conn.fileno()] = (conn, sandbox, lease)
        self._epoll.register(conn.fileno(), select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR)

    def _watch_cells_forever(self) -> None:
        while not self._stop.is_set():
            try:
                events = self._epoll.poll(0.5)
            except OSError:
                return
            for fd, _ in events:
                with self._lock:
                    entry = self._cells.pop(fd, None)
                if entry is None:
                    continue
                conn, sandbox, lease = entry
                try:
                    self._epoll.unregister(fd)
                except OSError:
                    pass
                conn.close()
                self._cell_over(sandbox, lease)

    def _settle(self, sandbox: "SandboxHandle") -> bool:
        """Called with the sandbox's lock held: True if its running cell's kernel has in fact hung
        up (its next cell can arrive before the watcher thread has seen the previous one end)."""
        with self._lock:
            found = [(fd, conn) for fd, (conn, s, lease) in self._cells.items()
                     if s is sandbox and lease == sandbox.running_lease]
        if not found:
            sandbox.running_lease = None
            return True
        fd, conn = found[0]
        p = select.poll()
        p.register(fd, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        if not p.poll(0):
            return False
        with self._lock:
            self._cells.pop(fd, None)
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass
        conn.close()
        sandbox.running_lease = None
        return True

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
        if self.settings.spare_sandboxes and not self._stop.is_set():
            self._spawner.submit(self._refill_spare)
        if spare is not None and spare[0].poll() is None:
            return spare
        if spare is not None:
            spare[1].close()
        return self._spawner.submit(self._start_sandbox_process).result()

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
            spare[1].close()

    def _start_sandbox_process(self) -> tuple[subprocess.Popen, socket.socket]:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        boot = {"ctl_fd": child.fileno(), "agent_pid": os.getpid()}
        # A clean environment: nothing of the agent's (its token above all) reaches user code.
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": os.environ.get("LANG", "C.UTF-8"),
               "PYTHONUNBUFFERED": "1", "GPU_ATTACH_SANDBOX": json.dumps(boot)}
        for name in ("PYTHONPATH", "VIRTUAL_ENV", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS"):
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
            s.dead = True
            _killpg(s.proc)
        with self._lock:
            cells = [(fd, conn) for fd, (conn, sandbox, _) in self._cells.items() if sandbox is s]
            for fd, _ in cells:
                del self._cells[fd]
        for fd, conn in cells:  # our copy of the kernel's connection would keep it open: hang up
            try:
                self._epoll.unregister(fd)
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        with self._lock:
            if self._sandboxes.get(s.key) is s:
                del self._sandboxes[s.key]

    def _reap_idle(self) -> None:
        cutoff = time.monotonic() - self.settings.sandbox_idle_s
        with self._lock:
            idle = [s for s in self._sandboxes.values() if not s.running_lease and s.last_used < cutoff]
        for s in idle:
            with s.lock:
                if s.running_lease or s.last_used >= cutoff:
                    continue
            self._kill(s)

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
