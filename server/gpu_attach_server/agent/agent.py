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
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # Admission waits on the kernel's hello; a pool keeps a slow client from blocking others
        # without paying for a new thread on every cell.
        self._admitters = ThreadPoolExecutor(max_workers=32, thread_name_prefix="admit")
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
            doomed = [s for s in self._sandboxes.values() if s.running_lease and s.running_lease not in active]
        for s in doomed:
            log.warning("stopping the cell of lease %s: the lease has ended", s.running_lease)
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
            threading.Thread(target=self._refill_spare, daemon=True).start()
        threading.Thread(target=self._beat_forever, name="heartbeat", daemon=True).start()
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                if self._stop.is_set():
                    return
                raise
            self._admitters.submit(self._admit, conn)

    def _admit(self, conn: socket.socket) -> None:
        """Verify the hello frame's grant and hand the connection to the session's sandbox."""
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(10)
            hello = wire.recv_frame(conn, HELLO_LIMITS)
            if hello.op != "hello":
                raise GrantTokenError("the first frame must be a hello holding the grant token")
            claims = self.verifier.verify(hello.header.get("token", ""), agent_id=self.settings.agent_id)
            missing = [i for i in claims["gpus"] if i not in self.devices]
            if missing:
                raise GrantTokenError(f"this agent has no device {missing}")
            conn.settimeout(None)
            sandbox = self._sandbox_for(claims)
            with sandbox.lock:
                sandbox.running_lease = claims["lease"]
                sandbox.last_used = time.monotonic()
                # A kernel with a large run frame waits for this before sending it; a small
                # one was pipelined right behind the hello and is already waiting for the sandbox.
                wire.send_frame(conn, {"op": "admitted", "sandbox_pid": sandbox.proc.pid, "warm": sandbox.cells > 0})
                sandbox.cells += 1
                socket.send_fds(sandbox.ctl, [json.dumps({"op": "cell", "claims": claims}).encode()], [conn.fileno()])
        except GrantTokenError as e:
            _reject(conn, "bad_grant", str(e))
        except wire.WireError as e:
            _reject(conn, "bad_frame", str(e))
        except Exception as e:
            log.exception("could not admit a cell")
            _reject(conn, "agent_error", f"the agent could not start the cell: {e}")
        finally:
            conn.close()

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
            ctl.send(json.dumps(claim).encode())
            ready = json.loads(ctl.recv(65536) or b"{}")
        except OSError:
            ready = {}
        if ready.get("op") != "ready":
            _killpg(proc)
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
            threading.Thread(target=self._refill_spare, daemon=True).start()
        if spare is not None and spare[0].poll() is None:
            return spare
        if spare is not None:
            spare[1].close()
        return self._start_sandbox_process()

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
        started = json.loads(parent.recv(65536) or b"{}")
        if started.get("op") != "started":
            _killpg(proc)
            parent.close()
            raise RuntimeError(f"the sandbox process exited with code {proc.wait()} while starting")
        return proc, parent

    def _follow(self, s: SandboxHandle) -> None:
        """Track what the sandbox is running from its control messages; clean up when it ends."""
        while True:
            try:
                msg = s.ctl.recv(65536)
            except OSError:
                msg = b""
            if not msg:
                break
            event = json.loads(msg)
            if event.get("op") == "done":
                with s.lock:
                    if s.running_lease == event.get("lease"):
                        s.running_lease = None
                    s.last_used = time.monotonic()
        s.proc.wait()
        with self._lock:
            if self._sandboxes.get(s.key) is s:
                del self._sandboxes[s.key]
        shutil.rmtree(s.workdir, ignore_errors=True)

    def _kill(self, s: SandboxHandle) -> None:
        _killpg(s.proc)
        with self._lock:
            if self._sandboxes.get(s.key) is s:
                del self._sandboxes[s.key]

    def _reap_idle(self) -> None:
        cutoff = time.monotonic() - self.settings.sandbox_idle_s
        with self._lock:
            idle = [s for s in self._sandboxes.values() if not s.running_lease and s.last_used < cutoff]
        for s in idle:
            self._kill(s)

    def stop(self) -> None:
        self._stop.set()
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


def _killpg(proc: subprocess.Popen) -> None:
    """Kill a sandbox and anything it started (it leads its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reject(conn: socket.socket, code: str, message: str) -> None:
    """Send the refusal, then read and drop what the kernel may have pipelined behind its hello:
    closing with unread data would reset the connection and could destroy the refusal in flight."""
    try:
        wire.send_frame(conn, {"op": "reject", "code": code, "message": message})
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(1.0)
        drained = 0
        while drained < wire.PIPELINE_MAX_BYTES + HELLO_LIMITS.max_header_bytes:
            chunk = conn.recv(65536)
            if not chunk:
                break
            drained += len(chunk)
    except OSError:
        pass


def new_agent_id() -> str:
    return f"{socket.gethostname()}-{secrets.token_hex(3)}"
