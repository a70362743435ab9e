"""``gpu-attach``: run the broker, an agent, both on this machine (``up``), or the demo.

Secrets never go on the command line (other users can read it in ``ps``): tokens come from the
environment (``GPU_ATTACH_ADMIN_TOKEN``, ``GPU_ATTACH_USER_TOKENS="alice:TOKEN,bob:TOKEN"``,
``GPU_ATTACH_AGENT_TOKEN``) or from a JSON file named with ``--tokens-file``.
"""

from __future__ import annotations

import argparse
import gc
import getpass
import ipaddress
import json
import logging
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from jupyter_gpu_attach.slices import parse_size

from . import __version__

log = logging.getLogger("gpu_attach")


def _emit(event: dict) -> None:
    """One JSON line on stdout: how a parent process learns a child's address."""
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


class NotReady(RuntimeError):
    """A child process exited, or stayed silent, before its ``ready`` line."""


def wait_ready(proc: subprocess.Popen, what: str, timeout: float = 60.0) -> dict:
    """Read ``proc``'s stdout until the JSON ``ready`` line that :func:`_emit` writes; other lines
    are skipped. Raises :class:`NotReady` if it exits first or says nothing for ``timeout`` s."""
    found: "queue.Queue[dict | None]" = queue.Queue()

    def read():  # in a thread: readline cannot be given a timeout
        for line in proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == "ready":
                found.put(event)
                return
        found.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        event = found.get(timeout=timeout)
    except queue.Empty:
        raise NotReady(f"{what} was not ready after {timeout:.0f} s") from None
    if event is None:
        raise NotReady(f"{what} exited with code {proc.wait()} before it was ready")
    return event


def _watch_parent(pid: int, on_gone) -> None:
    def watch():
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                on_gone()
                return
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()


def _freeze_startup_objects() -> None:
    """Move everything built at start-up out of the garbage collector's view: otherwise a full
    collection now and then walks all of FastAPI's and pydantic's objects, a 10-30 ms pause
    that lands on some cell's lease (the p99)."""
    gc.collect()
    gc.freeze()


def _listen(host: str, port: int, fd: int | None) -> socket.socket:
    """The listening socket, made so that asyncio sets TCP_NODELAY on every accepted connection.

    asyncio sets TCP_NODELAY only on sockets whose ``proto`` is ``IPPROTO_TCP``, and
    ``socket.create_server`` leaves ``proto`` 0, which accepted sockets inherit. Without it a
    response on a kept-alive connection waits ~40 ms for the client's delayed ACK (Nagle).
    Wrapping the file descriptor again makes Python ask the kernel, which answers IPPROTO_TCP
    (``--fd`` always took this path, which is why only ``--port`` was slow).
    """
    if fd is None:
        fd = socket.create_server((host, port), backlog=512).detach()
    return socket.socket(fileno=fd)


# -- broker -------------------------------------------------------------------------------------


def _load_tokens(args) -> dict:
    tokens = {"admin": None, "agent": None, "users": {}, "agents": {}}
    if getattr(args, "tokens_file", None):
        data = json.loads(Path(args.tokens_file).read_text())
        tokens.update({k: data.get(k) for k in ("admin", "agent")})
        tokens["users"] = dict(data.get("users") or {})
        tokens["agents"] = dict(data.get("agents") or {})
    from .broker.auth import parse_user_tokens

    tokens["admin"] = os.environ.get("GPU_ATTACH_ADMIN_TOKEN") or tokens["admin"]
    tokens["agent"] = os.environ.get("GPU_ATTACH_AGENT_TOKEN") or tokens["agent"]
    tokens["users"].update(parse_user_tokens(os.environ.get("GPU_ATTACH_USER_TOKENS", "")))
    tokens["agents"].update(parse_user_tokens(os.environ.get("GPU_ATTACH_AGENT_TOKENS", "")))
    return tokens


def _token_problem(tokens: dict, args) -> str | None:
    """The first token too short to use, named by where it came from (a variable or the tokens file)."""
    from .broker.auth import MIN_TOKEN_LENGTH, parse_user_tokens

    source = f"--tokens-file {args.tokens_file}" if getattr(args, "tokens_file", None) else None
    single = {"admin": "GPU_ATTACH_ADMIN_TOKEN", "agent": "GPU_ATTACH_AGENT_TOKEN"}
    lists = {"users": "GPU_ATTACH_USER_TOKENS", "agents": "GPU_ATTACH_AGENT_TOKENS"}
    found = []
    for key, var in single.items():
        if tokens[key]:
            found.append((var if os.environ.get(var) else source, key, tokens[key]))
    for key, var in lists.items():
        from_env = parse_user_tokens(os.environ.get(var, ""))
        for name, token in tokens[key].items():
            found.append((f"{var} (entry {name!r})" if name in from_env else f"{source} ({key}: {name!r})", name, token))
    for where, _, token in found:
        if len(token) < MIN_TOKEN_LENGTH:
            return (f"the token in {where} is {len(token)} characters; tokens must be at least {MIN_TOKEN_LENGTH} "
                    "random characters (make one with: python -c \"import secrets; print(secrets.token_urlsafe(24))\")")
    return None


def run_broker(args) -> int:
    import uvicorn

    from .broker.app import create_app
    from .broker.auth import TokenBook
    from .broker.core import Broker, BrokerSettings
    from .broker.fast_path import http_protocol
    from .broker.store import Store, make_engine
    from .grant_tokens import GrantSigner

    state = Path(args.state_dir).expanduser()
    state.mkdir(parents=True, exist_ok=True, mode=0o700)  # the signing key and database: the site's only
    try:
        tokens = _load_tokens(args)
        problem = _token_problem(tokens, args)
    except ValueError as e:  # a malformed NAME:TOKEN list
        problem = str(e)
    if problem:
        print(f"gpu-attach broker: {problem}", file=sys.stderr)
        return 2
    if tokens["agent"]:
        log.warning("GPU_ATTACH_AGENT_TOKEN (one token for any agent) is ignored: enrol each agent with its own "
                    "credential (POST /v1/agents/ID/credential as the admin, or GPU_ATTACH_AGENT_TOKENS=\"ID:TOKEN\")")
    if not tokens["users"] and not tokens["admin"]:
        print("gpu-attach broker: no user can log in: set GPU_ATTACH_USER_TOKENS or GPU_ATTACH_ADMIN_TOKEN",
              file=sys.stderr)
        return 2
    if not tokens["agents"] and not tokens["admin"]:
        print("gpu-attach broker: no agent can enrol: set GPU_ATTACH_AGENT_TOKENS=\"host1:TOKEN,host2:TOKEN\" (one "
              "token per agent, bound to its --name) or GPU_ATTACH_ADMIN_TOKEN (to issue agent credentials)",
              file=sys.stderr)
        return 2
    book = TokenBook(tokens["users"], tokens["admin"], tokens["agent"], tokens["agents"])
    store = Store(make_engine(args.db or str(state / "broker.sqlite")))
    signer = GrantSigner.from_file(args.key_file or state / "broker-ed25519.pem")
    settings = BrokerSettings(lease_ttl_s=args.lease_ttl, heartbeat_interval_s=args.heartbeat_interval,
                              agent_timeout_s=args.agent_timeout, max_wait_s=args.max_wait,
                              fair_share_half_life_s=args.fair_share_half_life, fair_share_by=args.fair_share_by)
    app = create_app(Broker(store, signer, settings), book, metrics_token=os.environ.get("GPU_ATTACH_METRICS_TOKEN"))
    sock = _listen(args.host, args.port, args.fd)
    host, port = sock.getsockname()[:2]
    url = f"http://{host}:{port}"
    config = uvicorn.Config(app, log_level=args.log_level, access_log=False, lifespan="on",
                            http=http_protocol(app.fast_path))
    server = uvicorn.Server(config)
    if args.exit_with_parent:
        _watch_parent(args.exit_with_parent, lambda: setattr(server, "should_exit", True))
    original_startup = server.startup

    async def startup(sockets=None):
        await original_startup(sockets=sockets)
        _emit({"event": "ready", "role": "broker", "url": url, "pid": os.getpid()})

    server.startup = startup
    _freeze_startup_objects()
    server.run(sockets=[sock])
    return 0


# -- agent --------------------------------------------------------------------------------------


def run_agent(args) -> int:
    from .agent.agent import Agent, AgentSettings, new_agent_id
    from .agent.inventory import discover

    from .agent.agent import IsolationError

    token = os.environ.pop("GPU_ATTACH_AGENT_TOKEN", None)  # popped: no child process inherits it
    if args.agent_token_file:
        token = Path(args.agent_token_file).read_text().strip()
    if not token:
        print("gpu-attach agent: set GPU_ATTACH_AGENT_TOKEN or --agent-token-file to this agent's own credential "
              "(the broker's admin issues it: POST /v1/agents/ID/credential)", file=sys.stderr)
        return 2
    if os.geteuid() == 0 and args.single_user and not ipaddress.ip_address(socket.gethostbyname(args.host)).is_loopback:
        print("gpu-attach agent: --single-user as root serves cells as root: allowed only on a loopback --host",
              file=sys.stderr)
        return 2
    uid_map = None
    if args.uid_map:
        uid_map = {str(k): int(v) for k, v in json.loads(Path(args.uid_map).read_text()).items()}
    try:
        sandbox_disk = 0 if args.sandbox_disk.strip() == "0" else parse_size(args.sandbox_disk)
        if 0 < sandbox_disk < 16 << 20:
            raise ValueError("at least 16MiB (an ext4 filesystem's own needs), or 0 for no limit")
    except ValueError as e:
        print(f"gpu-attach agent: --sandbox-disk {args.sandbox_disk}: {e}", file=sys.stderr)
        return 2
    from .agent.inventory import parse_mig_layout

    try:
        mig = parse_mig_layout(args.simulate_mig) if args.simulate_mig else None
    except ValueError as e:
        print(f"gpu-attach agent: --simulate-mig: {e}", file=sys.stderr)
        return 2
    if mig and not args.simulate:
        print("gpu-attach agent: --simulate-mig needs --simulate N (real GPUs report their own MIG mode)",
              file=sys.stderr)
        return 2
    devices, why = discover(args.simulate, parse_size(args.memory), args.pool, mig)
    if not args.simulate and all(d.simulated for d in devices):
        # Said at the default level: a GPU host that silently serves a CPU stand-in is a broken GPU host.
        print(f"gpu-attach agent: {why}", file=sys.stderr, flush=True)
    else:
        log.info("agent inventory: %s", why)
    agent_id = args.name or new_agent_id()
    settings = AgentSettings(
        broker_url=args.broker.rstrip("/"), agent_token=token, agent_id=agent_id,
        host=args.host, port=args.port, advertise_host=args.advertise_host,
        max_payload=parse_size(args.max_payload), sandbox_idle_s=args.sandbox_idle,
        input_cache=parse_size(args.input_cache), path_map=tuple(args.path_map),
        sandbox_user=args.sandbox_user, spare_sandboxes=args.spare_sandboxes,
        state_dir=args.state_dir or str(Path("~/.local/state/gpu-attach-agent").expanduser() / agent_id),
        single_user=args.single_user, sandbox_uids=args.sandbox_uids, uid_map=uid_map,
        sandbox_memory=args.sandbox_memory, sandbox_pids=args.sandbox_pids,
        sandbox_disk=sandbox_disk,
        allow_unenforced=args.allow_unenforced, fence_margin_s=args.fence_margin)
    try:
        agent = Agent(settings, devices)
    except IsolationError as e:
        print(f"gpu-attach agent: {e}", file=sys.stderr)
        return 2
    log.warning("agent %s isolation: %s", agent_id, agent.isolation_report())
    if not _register(agent, settings, REGISTER_PATIENCE_S):
        agent.stop()
        return 2

    def stop(*_):
        agent.stop()

    signal.signal(signal.SIGTERM, stop)
    if args.exit_with_parent:
        _watch_parent(args.exit_with_parent, stop)
    _freeze_startup_objects()
    _emit({"event": "ready", "role": "agent", "agent_id": settings.agent_id, "address": agent.address,
           "devices": [d.to_json() for d in devices], "pid": os.getpid(), "isolation": agent.isolation_report(),
           "unenforced": agent.unenforced()})
    try:
        agent.serve_forever()
    except KeyboardInterrupt:
        pass
    # serve_forever returns as soon as a stop began (a signal, or the parent watcher's thread):
    # finish it here, or the interpreter's exit would cut that thread off before it cleaned up.
    agent.stop()
    return 0


#: How long an agent keeps trying to register while the broker may be starting, or while its own
#: previous run has not yet timed out at the broker.
REGISTER_PATIENCE_S = 60.0


def _register(agent, settings, patience: float) -> bool:
    """Register with the broker. A refusal that waiting cannot fix (a wrong token) ends the agent at
    once; one that waiting may fix (broker not up yet, the name still held by this agent's previous
    run) is said at once, in one line, and retried quietly for ``patience`` seconds."""
    import requests

    from .agent.agent import EnrolmentError

    url = settings.broker_url
    deadline = time.monotonic() + patience
    told = set()
    while True:
        try:
            agent.register()
            return True
        except EnrolmentError as e:  # waiting cannot fix a credential the broker does not know
            print(f"gpu-attach agent: {e}", file=sys.stderr)
            return False
        except requests.ConnectionError:
            kind, line = "unreachable", (
                f"cannot reach the broker at {url}: check --broker (or GPU_ATTACH_BROKER_URL) and that "
                f"`gpu-attach broker` is running there; retrying for {patience:.0f} s")
        except Exception as e:
            # Agent.register reports the broker's answer as "(STATUS): BODY".
            status, detail = _refusal(str(e))
            if status == 401:
                print(f"gpu-attach agent: the broker at {url} does not know this agent's token: set "
                      "GPU_ATTACH_AGENT_TOKEN (or --agent-token-file) to this agent's own credential (the admin "
                      f"issues it: POST /v1/agents/{settings.agent_id}/credential, or the broker's "
                      "GPU_ATTACH_AGENT_TOKENS entry for it)", file=sys.stderr)
                return False
            if status == 403:
                print(f"gpu-attach agent: the broker at {url} refused this agent: {detail}. Use the agent token "
                      "(GPU_ATTACH_AGENT_TOKEN), and the --name its entry in GPU_ATTACH_AGENT_TOKENS is bound to",
                      file=sys.stderr)
                return False
            if status == 409:
                kind, line = "taken", (
                    f"{detail} (retrying for {patience:.0f} s, in case it is this agent's own previous run)")
            else:
                kind, line = "other", f"cannot register with {url}: {detail or e}; retrying for {patience:.0f} s"
        if kind not in told:
            told.add(kind)
            print(f"gpu-attach agent: {line}", file=sys.stderr, flush=True)
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def _refusal(message: str) -> tuple[int | None, str]:
    """``"broker refused registration (409): {"detail": "..."}"`` -> ``(409, "...")``."""
    import re

    m = re.search(r"\((\d{3})\): (.*)", message, re.S)
    if not m:
        return None, message
    try:
        detail = json.loads(m.group(2)).get("detail", m.group(2))
    except (ValueError, AttributeError):
        detail = m.group(2)
    return int(m.group(1)), str(detail)[:300]


# -- up: broker + agent on this machine ----------------------------------------------------------


class LocalPool:
    """A broker and one agent as child processes on 127.0.0.1, with fresh random tokens."""

    def __init__(self, simulate: int | None = None, memory: str = "16GiB", state_dir: str | None = None,
                 host: str = "127.0.0.1", port: int = 0, user: str | None = None,
                 heartbeat_interval: float = 2.0, agent_timeout: float = 10.0, lease_ttl: float = 30.0,
                 exit_with_parent: int | None = None, log_level: str = "warning"):
        self.user = user or _safe_user()
        self.user_token = secrets.token_urlsafe(24)
        self.admin_token = secrets.token_urlsafe(24)
        self.agent_token = secrets.token_urlsafe(24)
        self._own_state = state_dir is None  # a folder we made (it holds the signing key) goes with us
        self.state_dir = state_dir or tempfile.mkdtemp(prefix="gpu-attach-")
        self.procs: dict[str, subprocess.Popen] = {}
        sock = socket.create_server((host, port), backlog=512)
        self.url = f"http://{host}:{sock.getsockname()[1]}"
        env = dict(os.environ, GPU_ATTACH_ADMIN_TOKEN=self.admin_token, GPU_ATTACH_AGENT_TOKENS=f"local:{self.agent_token}",
                   GPU_ATTACH_USER_TOKENS=f"{self.user}:{self.user_token}")
        env.pop("GPU_ATTACH_AGENT_TOKEN", None)
        parent = ["--exit-with-parent", str(exit_with_parent or os.getpid())]
        common = [sys.executable, "-m", "gpu_attach_server.cli", "--log-level", log_level]
        # The broker gets the already-listening socket, so the agent can start at the same time:
        # its first registration waits in the socket's backlog until the broker accepts.
        self.procs["broker"] = subprocess.Popen(
            common + ["broker", "--fd", str(sock.fileno()), "--state-dir", self.state_dir,
                      "--heartbeat-interval", str(heartbeat_interval), "--agent-timeout", str(agent_timeout),
                      "--lease-ttl", str(lease_ttl)] + parent,
            env=env, pass_fds=[sock.fileno()], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        sock.close()
        # The embedded pool serves one user (the notebook's own): its cells run as that uid.
        agent_cmd = common + ["agent", "--broker", self.url, "--name", "local", "--memory", memory, "--single-user",
                              "--state-dir", os.path.join(self.state_dir, "agent")] + parent
        if simulate:
            agent_cmd += ["--simulate", str(simulate)]
        self.procs["agent"] = subprocess.Popen(
            agent_cmd, env={**{k: v for k, v in env.items() if k not in ("GPU_ATTACH_USER_TOKENS", "GPU_ATTACH_ADMIN_TOKEN",
                                                                          "GPU_ATTACH_AGENT_TOKENS")},
                            "GPU_ATTACH_AGENT_TOKEN": self.agent_token},
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        try:
            self.broker_event = self._ready("broker")
            self.agent_event = self._ready("agent")
        except Exception:
            self.stop()
            raise

    def _ready(self, role: str) -> dict:
        return wait_ready(self.procs[role], f"the {role}")

    def env(self) -> dict:
        return {"GPU_ATTACH_BROKER_URL": self.url, "GPU_ATTACH_TOKEN": self.user_token}

    def describe(self) -> dict:
        return {"event": "ready", "role": "up", "url": self.url, "user": self.user, "token": self.user_token,
                "admin_token": self.admin_token, "agent_token": self.agent_token, "state_dir": self.state_dir,
                "agent": self.agent_event, "pids": {k: p.pid for k, p in self.procs.items()}}

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self._own_state:
            shutil.rmtree(self.state_dir, ignore_errors=True)


def _safe_user() -> str:
    try:
        name = getpass.getuser()
    except Exception:
        name = "user"
    clean = "".join(c for c in name if c.isalnum() or c in "_.@-")
    return clean or "user"


def run_up(args) -> int:
    pool = LocalPool(simulate=args.simulate, memory=args.memory, state_dir=args.state_dir, host=args.host,
                     port=args.port, heartbeat_interval=args.heartbeat_interval, agent_timeout=args.agent_timeout,
                     lease_ttl=args.lease_ttl, exit_with_parent=args.exit_with_parent, log_level=args.log_level)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    if args.exit_with_parent:
        _watch_parent(args.exit_with_parent, done.set)
    if args.json:
        _emit(pool.describe())
    else:
        devices = pool.agent_event["devices"]
        sim = " SIMULATED" if all(d["simulated"] for d in devices) else ""
        print(f"gpu-attach {__version__}: broker {pool.url} with agent 'local' ({len(devices)}{sim} device(s))")
        print("Use it from a notebook or shell with:")
        for k, v in pool.env().items():
            print(f"  export {k}={v}")
        print(f"Admin token: {pool.admin_token}   (Ctrl-C stops both)")
        sys.stdout.flush()
    try:
        while not done.wait(0.5):
            for role, p in pool.procs.items():
                if p.poll() is not None:
                    print(f"gpu-attach up: the {role} exited with code {p.returncode}; stopping", file=sys.stderr)
                    done.set()
    except KeyboardInterrupt:
        pass
    pool.stop()
    owned_log = os.environ.get("GPU_ATTACH_UP_LOG")  # the kernel that started us may be gone
    if owned_log:
        Path(owned_log).unlink(missing_ok=True)
    return 0


# -- argument parsing ---------------------------------------------------------------------------


def _path_pair(text: str) -> tuple[str, str]:
    src, sep, dst = text.partition("=")
    if not sep or not src.startswith("/") or not dst.startswith("/"):
        raise argparse.ArgumentTypeError(f"expected /notebook/path=/host/path, got {text!r}")
    return src.rstrip("/") or "/", dst.rstrip("/") or "/"


def _timing_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lease-ttl", type=float, default=30.0, help="seconds a lease lives unless renewed (default 30)")
    p.add_argument("--heartbeat-interval", type=float, default=2.0, help="seconds between agent heartbeats")
    p.add_argument("--agent-timeout", type=float, default=10.0,
                   help="seconds without a heartbeat before an agent is down and its leases fail")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu-attach", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("broker", help="run the broker (one per site)")
    b.add_argument("--host", default="127.0.0.1")
    b.add_argument("--port", type=int, default=8765)
    b.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    b.add_argument("--state-dir", default="~/.local/state/gpu-attach", help="where the SQLite file and signing key live")
    b.add_argument("--db", help="SQLAlchemy URL or SQLite path (default: STATE_DIR/broker.sqlite)")
    b.add_argument("--key-file", help="Ed25519 signing key, PEM (created if missing; default: STATE_DIR)")
    b.add_argument("--tokens-file", help='JSON {"admin": TOKEN, "agent": TOKEN, "users": {NAME: TOKEN}}')
    b.add_argument("--exit-with-parent", type=int, help=argparse.SUPPRESS)
    b.add_argument("--max-wait", type=float, default=3600.0,
                   help="longest a request may wait in the queue, in seconds (clients ask for less; default 3600)")
    b.add_argument("--fair-share-half-life", type=float, default=3600.0,
                   help="seconds after which past GPU use counts half when ordering the queue (default 3600)")
    b.add_argument("--fair-share-by", choices=["user", "group"], default="user",
                   help="whose decayed usage orders the queue within a priority class (default: user)")
    _timing_options(b)
    b.set_defaults(func=run_broker)

    from .admin_cli import add_parser as add_admin_parser

    add_admin_parser(sub)

    a = sub.add_parser("agent", help="run an agent on a GPU host")
    a.add_argument("--broker", default=os.environ.get("GPU_ATTACH_BROKER_URL"), required="GPU_ATTACH_BROKER_URL" not in os.environ,
                   help="the broker's URL (default: $GPU_ATTACH_BROKER_URL)")
    a.add_argument("--host", default="127.0.0.1", help="address for the data port that kernels connect to")
    a.add_argument("--port", type=int, default=0, help="data port (default: any free port)")
    a.add_argument("--advertise-host", help="host name kernels should use, if not --host")
    a.add_argument("--name", help="agent id (default: hostname plus a random suffix)")
    a.add_argument("--simulate", type=int, metavar="N", help="offer N SIMULATED devices that run cells on the CPU")
    a.add_argument("--simulate-mig", metavar="LAYOUT",
                   help="put each simulated device in MIG mode with these instances, e.g. 3g.40gb,2g.20gb,1g.10gb*2 "
                        "(cells ask for one with %%%%gpu --mig 1g.10gb)")
    a.add_argument("--memory", default="16GiB", help="memory of each simulated device (default 16GiB)")
    a.add_argument("--pool", default="default", help="pool label of this host's GPUs")
    a.add_argument("--max-payload", default="64GiB", help="largest cell input a kernel may send")
    a.add_argument("--input-cache", default="2GiB",
                   help="per session: recent cell inputs kept by content hash, so a re-sent one travels as its hash "
                        "(at most a quarter of the sandbox's memory limit; default 2GiB)")
    a.add_argument("--path-map", action="append", default=[], type=_path_pair, metavar="NOTEBOOK_PATH=HOST_PATH",
                   help="where notebooks' folders are on this host (a shared home mounted elsewhere, say), so "
                        "relative paths in cells work; repeatable. The same path is tried when none matches")
    a.add_argument("--sandbox-idle", type=float, default=600.0, help="seconds an idle sandbox stays warm")
    a.add_argument("--sandbox-user", help="run every user's cells as this one unprivileged account (weaker than "
                   "the default per-user uids: users can then signal each other's cells)")
    a.add_argument("--sandbox-uids", default="60000-60999",
                   help="a root agent runs each broker user's cells as its own uid from this range (default 60000-60999)")
    a.add_argument("--uid-map", help='JSON file {"alice": 1001}: run these users\' cells as their own accounts')
    a.add_argument("--single-user", action="store_true",
                   help="one user's own pool (the embedded default): cells run as the agent's uid")
    a.add_argument("--sandbox-memory", default="2x",
                   help="host-memory limit per sandbox: a multiple of the slice's GPU memory (2x) or a size (8GiB); "
                        "at least 1 GiB (default 2x: the session keeps its namespace, and parks device arrays, in host memory)")
    a.add_argument("--sandbox-pids", type=int, default=1024, help="processes and threads per sandbox (default 1024)")
    a.add_argument("--sandbox-disk", default="50GiB",
                   help="the session's HOME is a filesystem of this size (a sparse image: host disk is used only "
                        "for what cells write); 0 leaves it on the host's disk, unbounded (default 50GiB, room for a model or two in ~/.cache; root agents)")
    a.add_argument("--allow-unenforced", action="store_true",
                   help="serve other users even where cgroups or per-user uids cannot be enforced (said at start)")
    a.add_argument("--fence-margin", type=float,
                   help="stop a cell whose lease is not confirmed this many seconds before its TTL "
                        "(default: the smaller of 1 s and a quarter of the TTL)")
    a.add_argument("--state-dir", help="the agent's key and uid assignments (default ~/.local/state/gpu-attach-agent/ID)")
    a.add_argument("--spare-sandboxes", type=int, default=1, choices=[0, 1],
                   help="keep a sandbox process started, so a new session's first cell does not wait for one")
    a.add_argument("--agent-token-file", help="file holding the agent token (default: $GPU_ATTACH_AGENT_TOKEN)")
    a.add_argument("--exit-with-parent", type=int, help=argparse.SUPPRESS)
    a.set_defaults(func=run_agent)

    u = sub.add_parser("up", help="run a broker and an agent on this machine, with fresh tokens")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=0, help="broker port (default: any free port)")
    u.add_argument("--simulate", type=int, metavar="N", help="offer N SIMULATED devices")
    u.add_argument("--memory", default="16GiB", help="memory of each simulated device")
    u.add_argument("--state-dir", help="where the broker keeps its state (default: a new temporary folder)")
    u.add_argument("--json", action="store_true", help="print one JSON line with the URL and tokens")
    u.add_argument("--exit-with-parent", type=int, help=argparse.SUPPRESS)
    _timing_options(u)
    u.set_defaults(func=run_up)

    d = sub.add_parser("demo", help="run examples/quickstart.ipynb headless on the embedded default")
    d.add_argument("--notebook", help="notebook to run (default: the bundled quickstart)")
    d.add_argument("--output", help="also save the executed notebook here")
    d.set_defaults(func=lambda args: __import__("gpu_attach_server.demo", fromlist=["run"]).run(args))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
