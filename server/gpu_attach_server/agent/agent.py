"""The agent: registers this host's GPUs with the broker, beats, and admits cells to sandboxes.

A kernel connects to the agent's data port and sends a ``hello`` frame holding the grant token.
The agent verifies the token with the broker's public key (no broker round trip), picks or
starts the sandbox for that user, session and device set, and hands the connection's file
descriptor to it. Every heartbeat answer lists the leases still granted; a sandbox running a
cell whose lease has ended (released, expired, revoked) is killed, so no cell outlives its lease.

Trust boundaries (docs/security.md): each user's sandboxes run as that user's own uid, in a
private mount namespace, each in its own cgroup (host-memory and pids limits, frozen between
cells, killed whole). A running cell's lease is watched on the broker (an end is seen within
~100 ms) and fenced: a cell whose lease the agent cannot confirm is stopped a margin before its
TTL, so its slice is never granted again while it runs. The agent proves its identity to each
kernel by signing the kernel's nonce with its enrolled key.
"""

from __future__ import annotations

import glob
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
from pathlib import Path

import requests

from jupyter_gpu_attach import wire
from jupyter_gpu_attach.slices import format_size

from .. import __version__
from . import disk
from ..grant_tokens import GrantTokenError, GrantVerifier
from .broker_channel import BrokerChannel
from .cgroups import FENCE_MISSING, Cgroup, CgroupError, CgroupTree
from .device_fence import FIRST_CONTROL_MINOR, held_minors
from .enrolment import AgentKey
from .identities import UserIds, parse_range
from .inventory import Device, NvmlSampler
from .jail import needed_paths, probe_private_proc

log = logging.getLogger("gpu_attach.agent")

HELLO_LIMITS = wire.Limits(max_header_bytes=16384, max_buffers=0, max_payload_bytes=0)
HELLO_TIMEOUT_S = 2.0  # for the whole hello, however slowly it trickles in (a real one takes a millisecond)
SANDBOX_START_TIMEOUT_S = 60.0
# A sandbox whose kernel left mid-cell (killed, or gave up on an interrupt) gets this long to stop
# by itself, then is killed and its lease released: the slice is free within a second.
ABANDON_GRACE_S = 0.5
# Connections waiting for their hello: past either budget the oldest waiting one (from the same
# address first) is dropped, so idle or trickling connections cannot crowd out real kernels,
# whose hello arrives right after connecting.
MAX_ADMISSIONS = 128
MAX_PENDING_PER_ADDRESS = 32
FIRST_WATCH_AFTER_S = 0.03  # a cell shorter than this ends before any lease watch is needed


class IsolationError(RuntimeError):
    """The host cannot keep this agent's users apart, and the agent was not told to accept that."""


class EnrolmentError(RuntimeError):
    """The broker does not know this agent's credential: it was not enrolled."""


@dataclass
class AgentSettings:
    broker_url: str
    agent_token: str
    agent_id: str
    host: str = "127.0.0.1"
    port: int = 0
    advertise_host: str | None = None
    max_payload: int = wire.MAX_PAYLOAD_BYTES
    input_cache: int = 2 * 1024**3  # a session's recent inputs kept by content hash (at most 1/4 of its memory limit)
    path_map: tuple = ()  # ((notebook path prefix, path on this host), ...): where a notebook's folder is here
    sandbox_idle_s: float = 600.0
    sandbox_user: str | None = None  # run every user's cells as this one (unprivileged) account
    spare_sandboxes: int = 1  # sandbox processes kept started, ready to be pinned to a new session
    workdir: str | None = None
    state_dir: str | None = None  # the agent's key and uid assignments (None: in memory only)
    single_user: bool = False  # an embedded pool: cells run as the agent's own uid (its one user)
    sandbox_uids: str = "60000-60999"  # a root agent runs each broker user's cells as its own uid from here
    uid_map: dict | None = None  # {broker user: uid}: users' real accounts, before the range
    sandbox_memory: str = "2x"  # host-memory limit per sandbox: a multiple of the slice's GPU memory, or a size
    sandbox_memory_min: int = 1 << 30
    sandbox_pids: int = 1024
    sandbox_disk: int = 50 << 30  # the session's HOME is a filesystem this size (0: the host's disk, unbounded)
    allow_unenforced: bool = False  # serve other users even where cgroups or uid separation are missing
    fence_margin_s: float | None = None  # stop an unconfirmed cell this long before its TTL (default min(1 s, TTL/4))


@dataclass
class _WatchedCell:
    """The agent's own copy of a running cell's kernel connection."""

    conn: socket.socket
    sandbox: "SandboxHandle"
    lease: str
    ended: bool = False  # decided over by another thread; the watcher only has to close it
    abandoned_at: float | None = None  # the kernel hung up while the sandbox was still in the cell
    admitted_at: float = field(default_factory=time.monotonic)
    fence: float = float("inf")  # monotonic time by which the lease must be confirmed, or the cell stops
    margin: float = 1.0
    expires_at: float = 0.0  # the lease's expiry as last confirmed by the broker (its clock)
    watching: bool = False


@dataclass
class SandboxHandle:
    key: tuple  # (user, session): a session keeps its sandbox whichever GPUs its cells get
    proc: subprocess.Popen
    ctl: socket.socket
    workdir: str
    cgroup: Cgroup | None = None
    uid: int | None = None
    devices: tuple = ()  # the devices it is pinned to now (CUDA_VISIBLE_DEVICES)
    simulated: bool = False
    disk: str | None = None  # the image mounted on workdir in the sandbox's namespace (disk.py)
    # Whether a GPU library was imported (so CUDA may have bound the process to its devices):
    # said by the sandbox itself after a cell, and only used to decide whether a move to other
    # devices may re-pin it or must replace it, never to enforce anything.
    gpu_bound: bool = False
    running_lease: str | None = None
    running_since: float = 0.0
    cells: int = 0
    dead: bool = False
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Agent:
    def __init__(self, settings: AgentSettings, devices: list[Device]):
        self.settings = settings
        self.devices = {d.index: d for d in devices}
        # Whether there is a GPU node on this host a sandbox could hold (see _may_run_on).
        self._gpu_nodes = any(not d.simulated for d in devices) or bool(glob.glob("/dev/nvidia[0-9]*"))
        self._stopping = threading.RLock()  # see stop()
        self._stop_began = False
        # GPU utilisation for usage accounting (busy GPU-seconds), on real whole GPUs only.
        self._nvml = NvmlSampler.open([d.uuid for d in devices if not d.simulated and not d.mig])
        self.verifier: GrantVerifier | None = None
        self.incarnation: str | None = None
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {settings.agent_token}"
        self._sandboxes: dict[tuple, SandboxHandle] = {}
        self._starting: dict[tuple, threading.Lock] = {}
        self._spare: tuple[subprocess.Popen, socket.socket, Cgroup | None] | None = None
        self._cells: dict[int, _WatchedCell] = {}
        self._epoll = select.epoll()
        self._admitted: dict[str, float] = {}  # lease -> expiry: each grant admits one cell
        self._pending: dict[socket.socket, str] = {}  # connections waiting for their hello -> address
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # Admission waits on the kernel's hello; a pool keeps a slow client from blocking others
        # without paying for a new thread on every cell. One thread per admission slot, so a real
        # hello never queues behind idle connections.
        self._admitters = ThreadPoolExecutor(max_workers=MAX_ADMISSIONS, thread_name_prefix="admit")
        # Lease ends and session ends pushed by the broker, lease watches, cell ends told to it.
        self.channel = BrokerChannel(settings.broker_url, settings.agent_id, settings.agent_token, self._stop)
        # Sandboxes ask the kernel to kill them when the thread that started them ends
        # (PR_SET_PDEATHSIG follows the thread, not the process), so one long-lived thread starts them all.
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spawn")
        self.state_dir = Path(settings.state_dir).expanduser() if settings.state_dir else None
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.state_dir, 0o700)
        self.key = AgentKey.load_or_create(self.state_dir)
        # Isolation: what this host can enforce, said at start (see isolation_report()).
        self.cgroups = CgroupTree(settings.agent_id)
        self.leftovers_killed = self.cgroups.kill_leftovers() if self.cgroups.enforced else 0
        self.users: UserIds | None = None
        root = os.geteuid() == 0
        if root and not settings.single_user and not settings.sandbox_user:
            self.users = UserIds(parse_range(settings.sandbox_uids),
                                 self.state_dir / "uids.json" if self.state_dir else None, settings.uid_map)
        self._jail = self.users is not None or (root and bool(settings.sandbox_user))
        # Why the jail cannot give sandboxes a /proc of their own (None: it can).
        self._proc_shared = probe_private_proc() if self._jail else "no jail"
        missing = self.unenforced()
        if missing and not settings.single_user and not settings.allow_unenforced:
            raise IsolationError(
                "this agent cannot keep its users apart: " + "; ".join(missing) + ". Run it as root on a host "
                "with cgroups (v2 with the memory, pids and cpu controllers delegated and bpf() allowed; or the v1 "
                "memory, pids, freezer, cpu and devices hierarchies), or pass --allow-unenforced to serve other "
                "users anyway, or --single-user for one user's own pool.")
        self._own_root = settings.workdir is None
        self._root = settings.workdir or tempfile.mkdtemp(prefix="gpu-attach-agent-")
        if self._jail:
            os.chmod(self._root, 0o711)  # each sandbox's uid must reach its own (0700) workdir inside
        # Why a sandbox's HOME cannot be a disk of its own (None: it can; disk.py).
        self._disk_shared = ("not asked for (--sandbox-disk 0)" if not settings.sandbox_disk else
                             "no jail" if not self._jail else disk.probe(self._root))
        self._disks = os.path.join(self._root, ".disks")
        if self._disk_shared is None:
            os.makedirs(self._disks, mode=0o700, exist_ok=True)
            for stale in glob.glob(os.path.join(self._disks, "*.img")):  # a previous run's (settings.workdir)
                _unlink(stale)
        self.listener = socket.create_server((settings.host, settings.port), backlog=512)
        self.port = self.listener.getsockname()[1]

    def unenforced(self) -> list[str]:
        """What this agent cannot enforce between users (empty: everything in docs/security.md)."""
        missing = list(self.cgroups.missing)
        if FENCE_MISSING in missing and not self._gpu_nodes:
            missing.remove(FENCE_MISSING)  # no GPU node on this host to fence a sandbox from
        unknown = [d.index for d in self.devices.values() if not d.simulated and d.minor is None]
        if unknown and FENCE_MISSING not in missing:
            missing.append(f"GPU device fence for device(s) {unknown} (NVML gave no /dev/nvidiaN minor: their "
                           "sandboxes may open every GPU node)")
        if self.users is None and not self.settings.sandbox_user:
            missing.append("per-user uids (cells run as the agent's own uid "
                           f"{os.geteuid()}, and can read its token and state)")
        elif self.users is None:
            missing.append(f"per-user uids (every user's cells run as the one account {self.settings.sandbox_user!r})")
        return missing

    def isolation_report(self) -> str:
        uids = (f"per-user uids from {self.settings.sandbox_uids}" if self.users is not None else
                f"cells as {self.settings.sandbox_user!r}" if self.settings.sandbox_user else
                f"cells as the agent's own uid {os.geteuid()} (single user)")
        jail = ("no mount namespace" if not self._jail else
                "private mount namespace, /tmp and /proc (other uids' processes hidden)" if self._proc_shared is None
                else f"private mount namespace and /tmp (/proc shows other processes: {self._proc_shared})")
        space = (f"HOME a {format_size(self.settings.sandbox_disk)} disk of its own" if self._disk_shared is None
                 else f"HOME on the host's disk, unbounded ({self._disk_shared})")
        text = f"{self.cgroups.describe()}; {uids}; {jail}; {space}"
        if self.leftovers_killed:
            text += f"; killed {self.leftovers_killed} sandbox cgroup(s) left by a previous run"
        missing = self.unenforced()
        return text + (f". NOT ENFORCED: {'; '.join(missing)}" if missing else "")

    @property
    def address(self) -> str:
        return f"{self.settings.advertise_host or self.settings.host}:{self.port}"

    # -- broker ---------------------------------------------------------------------------------

    def register(self) -> None:
        base, me = self.settings.broker_url, self.settings.agent_id
        r = self.http.put(f"{base}/v1/agents/{me}/key", json={"public_key": self.key.public_pem()}, timeout=10)
        if r.status_code in (401, 403):
            raise EnrolmentError(
                f"the broker refused this agent's credential for id {me!r} ({r.status_code}): enrol the agent "
                f"(as the admin: POST {base}/v1/agents/{me}/credential, or GPU_ATTACH_AGENT_TOKENS=\"{me}:TOKEN\" on "
                "the broker) and give it that token (GPU_ATTACH_AGENT_TOKEN or --agent-token-file)")
        if r.status_code != 200:
            raise RuntimeError(f"broker refused this agent's key ({r.status_code}): {r.text[:500]}")
        body = {"agent_id": me, "address": self.address, "version": __version__,
                "devices": [d.to_json() for d in self.devices.values()]}
        r = self.http.post(f"{base}/v1/agents", json=body, timeout=10)
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
            asked = time.monotonic()
            try:
                r = self.http.post(
                    f"{self.settings.broker_url}/v1/agents/{self.settings.agent_id}/heartbeat",
                    json={"incarnation": self.incarnation, "running": self._running_leases(),
                          "utilisation": self._utilisation()}, timeout=10)
                if r.status_code == 409:
                    log.warning("broker lost this agent's registration; registering again")
                    self._stop_all_cells("the broker restarted or marked this agent down")
                    self.register()
                    continue
                r.raise_for_status()
                self._enforce(set(r.json()["active"]), asked)
                self._reap_idle()
            except Exception as e:  # the broker may be restarting; keep beating
                log.warning("heartbeat failed: %s", e)

    def _running_leases(self) -> list[str]:
        with self._lock:
            return [s.running_lease for s in self._sandboxes.values() if s.running_lease]

    def _utilisation(self) -> dict[str, float]:
        """Each running lease's devices' mean NVML utilisation now (real GPUs that report one)."""
        if self._nvml is None:
            return {}
        with self._lock:
            running = [(s.running_lease, s.devices) for s in self._sandboxes.values() if s.running_lease]
        if not running:
            return {}
        now = self._nvml.sample()
        out = {}
        for lease, devices in running:
            values = [now[self.devices[i].uuid] for i in devices if self.devices[i].uuid in now]
            if values and len(values) == len(devices):
                out[lease] = sum(values) / len(values)
        return out

    def _enforce(self, active: set[str], asked: float) -> None:
        """Stop every cell whose lease the broker no longer grants. A cell admitted after the
        heartbeat was sent may hold a lease newer than the answer: the lease feed covers it."""
        with self._lock:
            running = [(s, s.running_lease) for s in self._sandboxes.values()
                       if s.running_lease and s.running_since < asked]
        for s, lease in running:
            if lease in active:
                continue
            with s.lock:  # the same cell still, not a newer one admitted since the snapshot
                if s.running_lease != lease:
                    continue
                if self._settle(s, finishing_s=0.05) == "done":  # it had ended; the kernel released it since
                    self._freeze(s)
                    continue
                log.warning("stopping the cell of lease %s: the lease has ended", lease)
                self._kill_locked(s)

    def _lease_over(self, s: "SandboxHandle", lease: str, why: str) -> None:
        """Stop the cell of ``lease`` if it still runs in ``s`` (the lease ended, or is unconfirmed)."""
        with s.lock:
            if s.running_lease != lease or s.dead:
                return
            if self._settle(s, finishing_s=0.05) == "done":  # its kernel released it as the cell ended
                self._freeze(s)
                return
            log.warning("stopping the cell of lease %s: %s", lease, why)
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
        self.channel.start(on_leases_ended=self._leases_ended, on_session_ended=self.end_session)
        while not self._stop.is_set():
            try:
                conn, addr = self.listener.accept()
            except OSError as e:
                if self._stop.is_set():
                    return
                log.warning("accept failed (%s); backing off", e)  # e.g. out of file descriptors
                time.sleep(0.1)
                continue
            self._make_room(addr[0])
            with self._lock:
                self._pending[conn] = addr[0]
            self._admitters.submit(self._admit, conn)

    def _make_room(self, address: str) -> None:
        """Keep the connections waiting for a hello within budget: drop the oldest one from this
        address past its own budget, else the oldest of all past the total. A real kernel's hello
        follows its connect at once, so only idle or trickling connections are ever the oldest."""
        with self._lock:
            mine = [c for c, a in self._pending.items() if a == address]
            victim = None
            if len(mine) >= MAX_PENDING_PER_ADDRESS:
                victim = mine[0]
            elif len(self._pending) >= MAX_ADMISSIONS:
                victim = next(iter(self._pending))
            if victim is not None:
                del self._pending[victim]
        if victim is not None:
            try:
                victim.shutdown(socket.SHUT_RDWR)  # its admitter wakes from recv and closes it
            except OSError:
                pass

    def _admit(self, conn: socket.socket) -> None:
        """Verify the hello frame's grant and hand the connection to the session's sandbox."""
        watched = False
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                hello = wire.recv_frame(_Deadline(conn, HELLO_TIMEOUT_S), HELLO_LIMITS)
            finally:
                with self._lock:
                    self._pending.pop(conn, None)
            if hello.op != "hello":
                raise GrantTokenError("the first frame must be a hello holding the grant token")
            claims = self.verifier.verify(hello.header.get("token", ""), agent_id=self.settings.agent_id)
            nonce = hello.header.get("nonce")
            if nonce is not None and (not isinstance(nonce, str) or not 16 <= len(nonce) <= 128):
                raise GrantTokenError("the hello's nonce must be 16-128 characters")
            missing = [i for i in claims["gpus"] if i not in self.devices]
            if missing:
                raise GrantTokenError(f"this agent has no device {missing}")
            self._admit_once(claims)
            if claims["lease"] in self.channel.ended:
                raise GrantTokenError("the lease of this grant has ended; request a new one")
            conn.settimeout(None)
            for _ in range(2):  # a sandbox killed (idle, lease ended) just as we picked it: once more
                sandbox = self._sandbox_for(claims)
                with sandbox.lock:
                    if sandbox.dead:
                        continue
                    # Its last cell's kernel hung up on the result a moment before the sandbox
                    # closed its end: wait for that, not kill a sandbox that is only finishing.
                    state = self._settle(sandbox, finishing_s=0.5) if sandbox.running_lease else "done"
                    if state == "running":
                        raise GrantTokenError("a cell of this session is already running; wait for it to finish")
                    if state == "abandoned":  # its kernel gave up on the last cell: start afresh
                        self._kill_locked(sandbox)
                        continue
                    if self._holds_other_gpus(sandbox, tuple(claims["gpus"])):
                        self._kill_locked(sandbox)  # the next turn claims a fresh one
                        continue
                    confirmed = None
                    if float(claims["exp"]) - time.time() - self._margin(claims) < 0.5:
                        # a slow start used up most of the grant: ask the broker first
                        confirmed = self.channel.confirm(claims["lease"], self._margin(claims))
                    devices = tuple(claims["gpus"])
                    repin = devices != sandbox.devices  # _may_run_on allowed it
                    if repin and sandbox.cgroup is not None:  # while frozen: before its last cell's
                        try:                                   # processes run again
                            sandbox.cgroup.pin_gpus(self._minors(devices))
                        except OSError:
                            self._kill_locked(sandbox)  # its fence is not what the agent believes
                            raise
                    sandbox.running_lease = claims["lease"]
                    sandbox.running_since = sandbox.last_used = time.monotonic()
                    sandbox.cells += 1
                    if sandbox.cgroup is not None:
                        sandbox.cgroup.set_memory(self._host_memory(claims))
                    self._thaw(sandbox)  # frozen since its last cell
                    # A kernel with a large run frame waits for this before sending it; a small
                    # one was pipelined right behind the hello and is already waiting.
                    admitted = {"op": "admitted", "sandbox_pid": sandbox.proc.pid, "warm": sandbox.cells > 1}
                    if nonce is not None:
                        admitted["proof"] = self.key.prove(nonce, claims["lease"])
                    wire.send_frame(conn, admitted)
                    # This cell's slice sets what its inputs may weigh (the sandbox may have been
                    # claimed for a smaller one): refused before any memory is reserved.
                    limit = self.settings.max_payload
                    if sandbox.cgroup is not None:
                        limit = min(limit, self._host_memory(claims))
                    cell = {"op": "cell", "claims": claims, "max_payload": limit}
                    if repin:
                        sandbox.devices = devices
                        cell["env"] = {"CUDA_VISIBLE_DEVICES": self._visible(devices)}
                    socket.send_fds(sandbox.ctl, [json.dumps(cell).encode()],
                                    [conn.fileno()])
                    self._watch_cell(conn, sandbox, claims, confirmed)
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
    # between cells the sandbox's cgroup is frozen, so nothing it started keeps running either.

    def _margin(self, claims: dict) -> float:
        ttl = max(float(claims["exp"]) - float(claims.get("iat", claims["exp"] - 30)), 0.1)
        return self.settings.fence_margin_s if self.settings.fence_margin_s is not None else min(1.0, ttl / 4)

    def _watch_cell(self, conn: socket.socket, sandbox: "SandboxHandle", claims: dict,
                    confirmed: tuple[float, float] | None = None) -> None:
        cell = _WatchedCell(conn, sandbox, claims["lease"])
        # Fencing: the grant's own expiry is the first thing confirmed (read against our clock
        # once; later confirmations are measured on the monotonic clock from the broker's answer).
        cell.margin = self._margin(claims)
        cell.expires_at = float(claims["exp"])
        cell.fence = cell.admitted_at + (cell.expires_at - time.time()) - cell.margin
        if confirmed is not None:
            cell.expires_at, cell.fence = confirmed
        with self._lock:
            self._cells[conn.fileno()] = cell
        self._epoll.register(conn.fileno(), select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR)

    def _guard_cells(self) -> None:
        """Start lease watches for cells that run long enough to need one; stop the cells whose
        lease could not be confirmed before their fence (the TTL less the margin)."""
        now = time.monotonic()
        with self._lock:
            cells = [c for c in self._cells.values() if not c.ended and c.abandoned_at is None]
        for c in cells:
            if c.sandbox.running_lease != c.lease:
                continue
            if now >= c.fence:
                self._lease_over(c.sandbox, c.lease, "the broker did not confirm the lease before its TTL "
                                 f"(less a {c.margin:.2g} s margin); fenced so the slice cannot be used twice")
            elif not c.watching and now - c.admitted_at >= FIRST_WATCH_AFTER_S:
                c.watching = True
                self.channel.watch(c, running=lambda c=c: not c.ended and c.sandbox.running_lease == c.lease,
                                   over=lambda why, c=c: self._lease_over(c.sandbox, c.lease, why))

    def _leases_ended(self, ended: set) -> None:
        """The broker's push: stop the cells of leases that ended."""
        with self._lock:
            running = [(s, s.running_lease) for s in self._sandboxes.values() if s.running_lease in ended]
        for s, lease in running:
            self._lease_over(s, lease, "the broker ended the lease")

    def end_session(self, user: str, session: str) -> int:
        """Kill every sandbox of one notebook session (a running cell's too); how many."""
        with self._lock:
            doomed = [s for k, s in self._sandboxes.items() if k[0] == user and k[1] == session]
        for s in doomed:
            log.info("reclaiming sandbox pid %d: session %s of %s ended", s.proc.pid, session, user)
            self._kill(s)
        return len(doomed)

    def _watch_cells_forever(self) -> None:
        """The one thread that closes the agent's copies of cell connections (so no fd number is
        reused while another thread still acts on it)."""
        while not self._stop.is_set():
            try:
                events = self._epoll.poll(0.01)
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
                    # A grant admits one cell: once its connection is gone the lease is spent.
                    self.channel.cell_ended(cell.lease, "the cell's connection closed",
                                            now=cell.ended or cell.abandoned_at is not None)
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
            self._guard_cells()

    def _forget(self, fd: int, cell: "_WatchedCell") -> None:
        with self._lock:
            if self._cells.get(fd) is cell:
                del self._cells[fd]
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass
        cell.conn.close()

    def _settle(self, sandbox: "SandboxHandle", finishing_s: float = 0.0) -> str:
        """With the sandbox's lock held: is its running cell really still running? Its next cell,
        or a heartbeat, can come before the watcher thread has seen the last one end.

        ``done``: it ended (running_lease is cleared); ``abandoned``: its kernel hung up but the
        sandbox is still in the cell; ``running``: it is running. A kernel hangs up as soon as
        it has the result, a moment before the sandbox closes its end: ``finishing_s`` waits
        that long for the sandbox to close before calling the cell abandoned."""
        with self._lock:
            cell = next((c for c in self._cells.values()
                         if c.sandbox is sandbox and c.lease == sandbox.running_lease), None)
        if cell is not None and not cell.ended:
            p = select.poll()
            p.register(cell.conn.fileno(), select.POLLRDHUP | select.POLLHUP | select.POLLERR)
            ev = p.poll(0)
            ev = ev[0][1] if ev else 0
            if finishing_s and ev & select.POLLRDHUP and not ev & (select.POLLHUP | select.POLLERR):
                p.modify(cell.conn.fileno(), select.POLLHUP | select.POLLERR)
                ev = p.poll(finishing_s * 1000)
                ev = (ev[0][1] if ev else 0) | select.POLLRDHUP
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
                self._freeze(sandbox)

    def _freeze(self, s: "SandboxHandle") -> None:
        """Stop everything the sandbox runs (its lock held): through its cgroup, so processes a
        cell started in a new session or process group stop too; else by signal to its group."""
        if s.cgroup is not None:
            try:
                s.cgroup.freeze()
                return
            except (OSError, CgroupError) as e:
                log.warning("could not freeze sandbox pid %d (%s): killing it", s.proc.pid, e)
                self._kill_locked(s)
                return
        _signal_group(s.proc, signal.SIGSTOP)

    def _thaw(self, s: "SandboxHandle") -> None:
        if s.cgroup is not None:
            s.cgroup.thaw()
        else:
            _signal_group(s.proc, signal.SIGCONT)

    def _host_memory(self, claims: dict) -> int:
        """The sandbox's host-memory limit for a slice: a multiple of its GPU memory, or a size."""
        spec = self.settings.sandbox_memory.strip()
        if spec.endswith("x"):
            gpu = int(claims.get("memory") or 0) * max(len(claims.get("gpus") or [1]), 1)
            limit = int(float(spec[:-1]) * gpu)
        else:
            from jupyter_gpu_attach.slices import parse_size

            limit = parse_size(spec)
        return max(limit, self.settings.sandbox_memory_min)

    # -- sandboxes ------------------------------------------------------------------------------

    def _sandbox_for(self, claims: dict) -> SandboxHandle:
        """The session's sandbox, for a cell on ``claims``' devices.

        A session keeps one sandbox, and so its namespace, whichever GPUs the broker gives each
        cell: on a shared pool the next cell rarely lands on the last one's GPU. A sandbox that
        has not loaded a GPU library is re-pinned to the new devices as the cell starts (CUDA
        reads CUDA_VISIBLE_DEVICES when it first starts); one that has, may hold a CUDA context
        on its old devices, so it is replaced, and the kernel sends the namespace again."""
        key = (claims["user"], claims["session"])
        with self._lock:
            s = self._sandboxes.get(key)
            if s is not None and _alive(s) and self._may_run_on(s, claims):
                return s
            starting = self._starting.setdefault(key, threading.Lock())
        # Claiming a sandbox takes milliseconds (a fresh one, far longer): hold only this
        # session's lock meanwhile, so other sessions' cells are admitted as usual.
        with starting:
            with self._lock:
                s = self._sandboxes.get(key)
                if s is not None and _alive(s) and self._may_run_on(s, claims):
                    return s
            if s is not None:
                if _alive(s) and s.running_lease:
                    raise GrantTokenError("a cell of this session is already running; wait for it to finish")
                # died (evicted, killed, out of memory) since its last cell, or bound to other GPUs
                self._kill(s)
            s = self._claim(key, claims)
            with self._lock:
                self._sandboxes[key] = s
                self._starting.pop(key, None)
            return s

    def _claim(self, key: tuple, claims: dict) -> SandboxHandle:
        """Pin a started sandbox process to this session's slice and user."""
        devices = [self.devices[i] for i in claims["gpus"]]
        simulated = all(d.simulated for d in devices)
        uid = self.users.uid_for(claims["user"]) if self.users is not None else None
        proc, ctl, cgroup = self._take_spare()
        workdir = tempfile.mkdtemp(prefix="session-", dir=self._root)
        # An input larger than the sandbox may hold is refused before any memory is reserved.
        max_payload = self.settings.max_payload
        if cgroup is not None:
            memory = self._host_memory(claims)
            cgroup.set_memory(memory)
            max_payload = min(max_payload, memory)
        input_cache = self.settings.input_cache if cgroup is None else min(self.settings.input_cache, memory // 4)
        claim = {
            "op": "claim", "simulated": simulated, "workdir": workdir, "max_payload": max_payload,
            "input_cache_bytes": input_cache, "path_map": [list(p) for p in self.settings.path_map],
            # Real GPUs are pinned by UUID, which does not depend on device enumeration order.
            "env": {"HOME": workdir, "CUDA_VISIBLE_DEVICES": self._visible(claims["gpus"]),
                    "GPU_ATTACH_SIMULATED": "1" if simulated else "0"},
        }
        image = None
        try:
            if uid is not None:
                os.chown(workdir, uid, uid)
                claim.update(uid=uid, gid=uid)
            elif self.settings.sandbox_user:
                import pwd

                pw = pwd.getpwnam(self.settings.sandbox_user)
                os.chown(workdir, pw.pw_uid, pw.pw_gid)
                claim.update(uid=pw.pw_uid, gid=pw.pw_gid)
            image = self._make_disk(workdir)
            if image is not None:
                claim.update(disk=image, disk_size=self.settings.sandbox_disk)  # mounted by the sandbox, on workdir
            if cgroup is not None:
                cgroup.pin_gpus(self._minors(claims["gpus"]))
            ctl.settimeout(SANDBOX_START_TIMEOUT_S)
            ctl.send(json.dumps(claim).encode())
            ready = json.loads(ctl.recv(65536) or b"{}")
            ctl.settimeout(None)
        except (OSError, ValueError, KeyError, subprocess.SubprocessError) as e:
            ready = {"error": str(e)}
        if ready.get("op") != "ready":
            _killpg(proc)
            if cgroup is not None:
                cgroup.kill()
            proc.wait()
            ctl.close()
            shutil.rmtree(workdir, ignore_errors=True)
            _unlink(image)
            raise RuntimeError(f"the sandbox process did not start: {ready.get('error', 'it exited')}")
        handle = SandboxHandle(key, proc, ctl, workdir, cgroup=cgroup, uid=uid, devices=tuple(claims["gpus"]),
                               simulated=simulated, disk=image)
        threading.Thread(target=self._follow, args=(handle,), daemon=True).start()
        log.info("sandbox pid %d for user %s session %s on devices %s%s", proc.pid, key[0], key[1], list(claims["gpus"]),
                 " (simulated)" if simulated else "")
        return handle

    def _make_disk(self, workdir: str) -> str | None:
        """The sparse image that becomes this sandbox's HOME, or None where sandboxes have none.
        ~12 ms, once per sandbox (a session's first cell on this agent, or a move)."""
        if self._disk_shared is not None:
            return None
        image = os.path.join(self._disks, os.path.basename(workdir) + ".img")
        try:
            disk.make_image(image, self.settings.sandbox_disk)
        except (OSError, subprocess.SubprocessError) as e:  # the host's own disk is full, say
            # Not a sandbox with no limit instead: the isolation line promised one.
            raise OSError(f"could not make the session's disk ({e})") from e
        return image

    def _visible(self, indexes) -> str:
        """CUDA_VISIBLE_DEVICES for these devices: their UUIDs (independent of enumeration order);
        empty for simulated ones, so a simulated sandbox never touches a real GPU."""
        devices = [self.devices[i] for i in indexes]
        return "" if all(d.simulated for d in devices) else ",".join(d.uuid for d in devices)

    def _minors(self, indexes) -> list[int]:
        """The /dev/nvidiaN minors a sandbox pinned to these devices may open (none for simulated
        devices: a simulated sandbox never touches a real GPU). A real device whose minor NVML
        did not give cannot be fenced: its sandbox may open every GPU node (said at start)."""
        devices = [self.devices[i] for i in indexes]
        if any(not d.simulated and d.minor is None for d in devices):
            return list(range(FIRST_CONTROL_MINOR))
        return [d.minor for d in devices if d.minor is not None]

    def _may_run_on(self, s: SandboxHandle, claims: dict) -> bool:
        devices = tuple(claims["gpus"])
        if devices == s.devices:
            return True
        simulated = all(self.devices[i].simulated for i in devices)
        return simulated == s.simulated and (simulated or not s.gpu_bound)

    def _holds_other_gpus(self, s: SandboxHandle, devices: tuple) -> bool:
        """Whether the (frozen) sandbox holds a GPU node open or mapped outside these devices. The
        fence checks at open(), so such a node (opened under an earlier lease, or a descriptor
        passed in from elsewhere) would outlive the lease it came with: the sandbox is replaced.
        Looked for wherever the host has GPU nodes to hold."""
        if not self._gpu_nodes or s.cgroup is None:
            return False
        held = held_minors(s.cgroup.pids() or [s.proc.pid])
        if held <= set(self._minors(devices)):
            return False
        log.warning("sandbox pid %d holds GPU node(s) %s outside its lease's devices %s: replacing it",
                    s.proc.pid, sorted(held), list(devices))
        return True

    def _take_spare(self) -> tuple[subprocess.Popen, socket.socket, Cgroup | None]:
        """A started, not yet pinned sandbox process: the spare if one is waiting, else a new one.

        A cell's lease starts before its sandbox exists; starting Python and importing NumPy
        then would hold the GPU idle for a few hundred milliseconds, so a spare waits ready.
        """
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None and spare[0].poll() is not None:
            spare[1].close()
            if spare[2] is not None:
                spare[2].kill()
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
            if not self._stop.is_set():
                log.warning("could not start a spare sandbox: %s", e)
            return
        with self._lock:
            if self._spare is None and not self._stop.is_set():
                self._spare, spare = spare, None
        if spare is not None:
            _killpg(spare[0])
            if spare[2] is not None:
                spare[2].kill()
            spare[0].wait()
            spare[1].close()

    def _start_sandbox_process(self) -> tuple[subprocess.Popen, socket.socket, Cgroup | None]:
        cgroup = self.cgroups.create("sandbox") if self.cgroups.enforced else None
        try:
            return self._start_in(cgroup)
        except BaseException:
            if cgroup is not None:
                cgroup.kill()
            raise

    def _start_in(self, cgroup: Cgroup | None) -> tuple[subprocess.Popen, socket.socket, Cgroup | None]:
        if cgroup is not None:
            cgroup.set_pids(self.settings.sandbox_pids)
            cgroup.pin_gpus(())  # no GPU at all until a cell's claim pins it to its lease's
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
        argv = [sys.executable, "-m", "gpu_attach_server.agent.sandbox"]
        if self._jail:
            # The launcher joins the cgroup and the private mount namespace, then becomes the sandbox.
            env["GPU_ATTACH_JAIL"] = json.dumps({
                "cgroup_procs": [str(d / "cgroup.procs") for d in cgroup.dirs.values()] if cgroup else [],
                "needed": needed_paths(), "keep": [self._root], "private_tmp": True,
                "private_proc": self._proc_shared is None,
                "hide": [str(self.state_dir)] if self.state_dir else [], "exec": argv})
            argv = [sys.executable, "-m", "gpu_attach_server.agent.jail"]
        proc = subprocess.Popen(
            argv, env=env, cwd=self._root, pass_fds=[child.fileno()], stdin=subprocess.DEVNULL,
            start_new_session=True)
        if cgroup is not None and not self._jail:
            cgroup.add(proc.pid)  # before it has started any code of a cell (it is still booting)
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
        return proc, parent, cgroup

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
            try:
                said = json.loads(msg)
            except ValueError:
                continue
            if isinstance(said, dict) and said.get("op") == "gpu_bound":
                s.gpu_bound = True
        if s.cgroup is not None and s.cgroup.oom_kills():
            self._tell_out_of_memory(s)
        self._kill(s)
        code = s.proc.wait()
        if not s.dead or code not in (-signal.SIGKILL, 0):
            log.info("sandbox pid %d exited with code %s", s.proc.pid, code)
        s.ctl.close()
        shutil.rmtree(s.workdir, ignore_errors=True)
        _unlink(s.disk)  # its loop device went with the sandbox's mount namespace

    def _tell_out_of_memory(self, s: SandboxHandle) -> None:
        """The kernel killed the sandbox for running over its host-memory limit: say so to the
        running cell's kernel, on the agent's own copy of its connection."""
        try:
            with open(s.cgroup.dirs["memory" if "memory" in s.cgroup.dirs else "unified"] /
                      ("memory.limit_in_bytes" if "memory" in s.cgroup.dirs else "memory.max")) as f:
                limit = int(f.read().strip())
            size = f"{limit / 2**30:.3g} GiB"
        except (OSError, ValueError):
            size = "its limit"
        with self._lock:
            cells = [c for c in self._cells.values() if c.sandbox is s and not c.ended]
        for c in cells:
            try:
                c.conn.settimeout(1.0)
                wire.send_frame(c.conn, {
                    "op": "error", "etype": "builtins.MemoryError", "traceback": "",
                    "message": f"the cell ran over its host-memory limit of {size} on the GPU host and was killed "
                               "(the session's state is lost). Use less host memory, or ask for a larger slice: "
                               "the limit grows with the slice's GPU memory."})
            except OSError:
                pass

    def _kill(self, s: SandboxHandle) -> None:
        with s.lock:
            self._kill_locked(s)

    def _kill_locked(self, s: SandboxHandle) -> None:
        """Kill a sandbox (its lock held) and hang up its cell's kernel connection, if any."""
        if not s.dead:
            log.info("killing sandbox pid %d", s.proc.pid, stack_info=log.isEnabledFor(logging.DEBUG))
        s.dead = True
        _killpg(s.proc)
        if s.cgroup is not None:
            s.cgroup.kill()  # everything the cell started, in whatever session or group
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
        """Stop serving, kill every sandbox, remove what the agent made. Safe to call from several
        threads (a signal, the parent watcher, the main thread): later callers wait for the first
        to finish, so the process never exits with its sandboxes or work directory left behind."""
        with self._stopping:
            if self._stop_began:
                return
            self._stop_began = True
            self._stop_once()

    def _stop_once(self) -> None:
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
            if spare[2] is not None:
                spare[2].kill()
        if self.cgroups.enforced:
            self.cgroups.remove()
        self.channel.close()
        if self._own_root:
            shutil.rmtree(self._root, ignore_errors=True)


def _alive(s: "SandboxHandle") -> bool:
    """Whether a sandbox can take a cell. ``Popen.poll()`` alone is not enough: it answers None
    while another thread waits on the process, so a sandbox killed from outside would look alive
    until that thread has seen it die. Its control socket hangs up the moment it dies."""
    if s.dead or s.proc.poll() is not None:
        return False
    p = select.poll()
    p.register(s.ctl.fileno(), select.POLLHUP | select.POLLERR)
    return not p.poll(0)


def _unlink(path: str | None) -> None:
    if path is not None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


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
