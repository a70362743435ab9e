"""One cgroup per sandbox: a host-memory limit, a pids limit, freeze between cells, kill at the end.

The kernel's own interface is used directly: cgroup v2 (``memory.max``, ``pids.max``,
``cgroup.freeze``, ``cgroup.kill``) where the agent's cgroup can delegate the memory and pids
controllers, else the v1 hierarchies (``memory``, ``pids``, ``freezer``). Each sandbox is also a
CPU group of its own (v2 ``cpu``, v1 ``cpu``), so however many processes or sessions a cell
starts, they share one sandbox's part of the CPU. Which GPUs a sandbox
can open is fenced in the same cgroup (``device_fence.py``: an eBPF device program on v2, the
``devices`` hierarchy on v1). Every sandbox cgroup of
an agent lives under one parent named after the agent id, so a restarted agent finds and kills
what its previous run left (:meth:`CgroupTree.kill_leftovers`).

The parent is named after the agent id and the agent's pid (``gpu-attach-ID-PID``): a
restarted agent kills the cgroups of an earlier run of its id whose process is gone, and leaves
alone those of another live agent that happens to share the id on this host.

What a backend cannot enforce it says in :attr:`CgroupTree.missing`; the agent prints that at
start and refuses to serve other users unless told to accept it.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

from .device_fence import BpfFence, FenceError, ListFence

ROOT = Path("/sys/fs/cgroup")
FREEZE_TIMEOUT_S = 2.0
V1_CONTROLLERS = ("memory", "pids", "freezer")
#: Not needed for the rest, so a v1 host without them still gets limits, freeze and kill.
V1_DEVICES = "devices"
V1_CPU = "cpu"
CPU_MISSING = ("a CPU share per sandbox (a cell's processes, each in a session of its own, can crowd other "
               "users' cells off the CPU)")
FENCE_MISSING = ("GPU device fence (a cell that clears CUDA_VISIBLE_DEVICES, or opens /dev/nvidiaN itself, "
                 "reaches every GPU on the host)")


class CgroupError(RuntimeError):
    pass


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: Path) -> str:
    with open(path) as f:
        return f.read()


def _own_cgroups() -> dict[str, str]:
    """``{controller or "": path}`` from /proc/self/cgroup (``""`` is the v2 unified path)."""
    out: dict[str, str] = {}
    for line in _read(Path("/proc/self/cgroup")).splitlines():
        _, ctrls, path = line.split(":", 2)
        for c in ctrls.split(",") if ctrls else [""]:
            out[c] = path
    return out


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:100] or "agent"


class Cgroup:
    """One sandbox's cgroup (in one or several hierarchies)."""

    def __init__(self, tree: "CgroupTree", name: str, dirs: dict[str, Path]):
        self.tree, self.name, self.dirs = tree, name, dirs
        self.fence: BpfFence | ListFence | None = None
        if tree.fence == "bpf":
            self.fence = BpfFence(dirs["unified"])
        elif tree.fence == "devices":
            self.fence = ListFence(dirs[V1_DEVICES])

    def pin_gpus(self, minors) -> None:
        """Let the sandbox open the GPU device nodes of these minors, and no other GPU's
        (``device_fence.py``); nothing where the host has no fence (``CgroupTree.missing``)."""
        if self.fence is not None:
            self.fence.pin(minors)

    def add(self, pid: int) -> None:
        for d in self.dirs.values():
            _write(d / "cgroup.procs", str(pid))

    def set_memory(self, limit: int) -> None:
        """Raise or lower the host-memory limit (a lower one than in use now is kept as is)."""
        try:
            if self.tree.version == 2:
                # v2 takes a limit below the usage and then reclaims, and failing that OOM-kills the
                # sandbox (v1 refuses it with EBUSY): a session whose next cell asks for a smaller
                # slice than its namespace now fills would lose it. Keep the old limit instead.
                if limit < int(_read(self.dirs["unified"] / "memory.current")):
                    return
                _write(self.dirs["unified"] / "memory.max", str(limit))
                if (self.dirs["unified"] / "memory.swap.max").exists():
                    _write(self.dirs["unified"] / "memory.swap.max", "0")
            else:
                d = self.dirs["memory"]
                memsw = d / "memory.memsw.limit_in_bytes"  # memory + swap: no swap past the limit
                if not memsw.exists():
                    _write(d / "memory.limit_in_bytes", str(limit))
                    return
                # v1 keeps memory <= memory+swap at every step: raising, the outer bound goes first.
                order = ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]
                if limit > int((d / "memory.limit_in_bytes").read_text()):
                    order.reverse()
                for name in order:
                    _write(d / name, str(limit))
        except OSError:
            pass  # EBUSY: lowering below what the sandbox holds now; the next cell gets the old one

    def set_pids(self, limit: int) -> None:
        d = self.dirs.get("unified") if self.tree.version == 2 else self.dirs["pids"]
        _write(d / "pids.max", str(limit))

    def pids(self) -> list[int]:
        seen: set[int] = set()
        for d in self.dirs.values():
            try:
                seen.update(int(p) for p in _read(d / "cgroup.procs").split())
            except OSError:
                pass
        return sorted(seen)

    def freeze(self, wait: bool = False) -> None:
        """Stop every process in the cgroup, ``setsid`` children included. The kernel stops each
        at its next safe point (microseconds, unless it is in an uninterruptible wait); ``wait``
        waits until all are stopped. Not waiting keeps a process stuck in I/O from stalling the
        next cell's admission."""
        self._set_frozen(True, wait)

    def thaw(self) -> None:
        self._set_frozen(False, False)

    def _set_frozen(self, frozen: bool, wait: bool = True) -> None:
        if self.tree.version == 2:
            d = self.dirs["unified"]
            _write(d / "cgroup.freeze", "1" if frozen else "0")
            want = "frozen 1" if frozen else "frozen 0"
            check = lambda: want in _read(d / "cgroup.events")  # noqa: E731
        else:
            d = self.dirs["freezer"]
            state = "FROZEN" if frozen else "THAWED"
            _write(d / "freezer.state", state)
            check = lambda: _read(d / "freezer.state").strip() == state  # noqa: E731
        if not wait:
            return
        deadline = time.monotonic() + FREEZE_TIMEOUT_S
        while not check():
            if time.monotonic() > deadline:
                raise CgroupError(f"cgroup {self.name} did not become {'frozen' if frozen else 'thawed'} "
                                  f"within {FREEZE_TIMEOUT_S:g} s")
            time.sleep(0.001)

    def kill(self) -> None:
        """SIGKILL every process in the cgroup and wait until it is empty; then remove it."""
        kill_dirs(self.tree.version, self.dirs)
        if self.fence is not None:
            self.fence.close()

    def oom_kills(self) -> int:
        """How many times the kernel killed a process here for running over the memory limit."""
        try:
            if self.tree.version == 2:
                text = _read(self.dirs["unified"] / "memory.events")
                m = re.search(r"^oom_kill (\d+)", text, re.M)
            else:
                text = _read(self.dirs["memory"] / "memory.oom_control")
                m = re.search(r"^oom_kill (\d+)", text, re.M)
                if m is None:  # older kernels: failcnt counts hits of the limit
                    return int(_read(self.dirs["memory"] / "memory.failcnt") or 0)
            return int(m.group(1)) if m else 0
        except OSError:
            return 0

    def memory_peak(self) -> int:
        try:
            if self.tree.version == 2:
                p = self.dirs["unified"] / "memory.peak"
                return int(_read(p)) if p.exists() else 0
            return int(_read(self.dirs["memory"] / "memory.max_usage_in_bytes"))
        except OSError:
            return 0


def kill_dirs(version: int, dirs: dict[str, Path]) -> None:
    """Kill everything in one cgroup (all its hierarchies), wait until it is empty, remove it."""
    def members() -> set[int]:
        out: set[int] = set()
        for d in dirs.values():
            try:
                out.update(int(p) for p in _read(d / "cgroup.procs").split())
            except OSError:
                pass
        return out

    deadline = time.monotonic() + 5.0
    if version == 2 and (dirs["unified"] / "cgroup.kill").exists():
        try:
            _write(dirs["unified"] / "cgroup.kill", "1")
        except OSError:
            pass
    else:
        # SIGKILL every member, then thaw (a frozen process dies of SIGKILL once thawed), until
        # none is left: a child forked between listing and killing is caught by the next pass,
        # and a process with SIGKILL pending runs no more user code. Nothing is frozen here, so
        # an agent that dies midway leaves nothing frozen that was running.
        fz = dirs.get("freezer")
        while True:
            pids = members()
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if fz is not None:
                try:
                    _write(fz / "freezer.state", "THAWED")
                except OSError:
                    pass
            if not pids or time.monotonic() > deadline:
                break
            time.sleep(0.002)
    while members() and time.monotonic() < deadline:
        time.sleep(0.002)
    for d in dirs.values():
        _rmdir_tree(d)


def _rmdir_tree(d: Path) -> None:
    if not d.exists():
        return
    for child in sorted((p for p in d.iterdir() if p.is_dir()), reverse=True):
        _rmdir_tree(child)
    for _ in range(50):
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)  # the last members are still exiting


class CgroupTree:
    """The agent's parent cgroup, under which each sandbox gets its own.

    ``version`` is 2 or 1, or 0 where no cgroup can be made (not root, or no controllers):
    then :attr:`missing` lists what is not enforced."""

    def __init__(self, agent_id: str, root: Path = ROOT):
        self.agent = _safe_name(agent_id)
        self.parent_name = f"gpu-attach-{self.agent}-{os.getpid()}"
        self.version = 0
        self.parents: dict[str, Path] = {}
        self.missing: list[str] = []
        #: How sandboxes are fenced from other GPUs: "bpf" (v2), "devices" (v1), or "" (not).
        self.fence = ""
        self.fence_why = ""
        self._count = 0
        problems = []
        for attempt in (self._try_v2, self._try_v1):
            try:
                if attempt(root):
                    break
            except OSError as e:
                problems.append(str(e))
        if not self.version:
            self.missing = [CPU_MISSING, "host-memory limit", "pids limit", "cgroup freeze (setsid children escape it)",
                            "cgroup kill (children that leave the process group survive the sandbox)",
                            FENCE_MISSING]
            self.why = "; ".join(problems) or "no writable cgroup hierarchy with the memory and pids controllers"
            return
        self._try_fence()

    def _try_fence(self) -> None:
        """Fence a probe cgroup from every GPU, as each sandbox will be: the fence is offered only
        where that works on this kernel (a container may refuse bpf(), or have no v1 devices)."""
        kind = "bpf" if self.version == 2 else "devices" if V1_DEVICES in self.parents else ""
        if not kind:
            self.fence_why = "no v1 devices hierarchy"
            self.missing.append(FENCE_MISSING)
            return
        self.fence = kind
        probe = None
        try:
            probe = self.create("fence-probe")
            probe.pin_gpus(())
        except (OSError, FenceError) as e:
            self.fence, self.fence_why = "", str(e)
            self.missing.append(FENCE_MISSING)
        finally:
            if probe is not None:
                probe.kill()

    def _try_v2(self, root: Path) -> bool:
        if not (root / "cgroup.controllers").exists():  # v2 mounted at /sys/fs/cgroup itself
            return False
        own = root / _own_cgroups().get("", "/").lstrip("/")
        needed = {"memory", "pids"}
        if not needed <= set(_read(own / "cgroup.controllers").split()):
            return False
        parent = own / self.parent_name
        parent.mkdir(exist_ok=True)
        if not needed <= set(_read(parent / "cgroup.subtree_control").split()):
            # v2 puts no process in an inner node: move the agent into a leaf of its own cgroup
            # (under systemd this needs Delegate=yes) so its subtree can delegate the controllers.
            enabled = set(_read(own / "cgroup.subtree_control").split())
            if not needed <= enabled:
                leaf = own / "gpu-attach-agent"
                leaf.mkdir(exist_ok=True)
                for pid in _read(own / "cgroup.procs").split():
                    try:
                        _write(leaf / "cgroup.procs", pid)
                    except OSError:
                        pass
                _write(own / "cgroup.subtree_control", "+memory +pids")
            _write(parent / "cgroup.subtree_control", "+memory +pids")
        # cpu, each sandbox a weight of its own: on its own, so that a host that cannot delegate
        # it (a real-time thread in the way, say) still gets the rest, and says what it lacks.
        try:
            if "cpu" not in set(_read(parent / "cgroup.subtree_control").split()):
                if "cpu" not in set(_read(own / "cgroup.subtree_control").split()):
                    _write(own / "cgroup.subtree_control", "+cpu")
                _write(parent / "cgroup.subtree_control", "+cpu")
        except OSError:
            self.missing.append(CPU_MISSING)
        self.version, self.parents = 2, {"unified": parent}
        return True

    def _try_v1(self, root: Path) -> bool:
        own = _own_cgroups()
        parents = {}
        for c in V1_CONTROLLERS:
            base = root / c
            if not base.is_dir() or c not in own:
                return False
            p = base / own[c].lstrip("/") / self.parent_name
            p.mkdir(exist_ok=True)
            parents[c] = p
        for c in (V1_DEVICES, V1_CPU):  # optional: reported as missing where absent
            if (root / c).is_dir() and c in own:
                try:
                    p = root / c / own[c].lstrip("/") / self.parent_name
                    p.mkdir(exist_ok=True)
                    parents[c] = p
                except OSError:
                    pass
        if V1_CPU not in parents:
            self.missing.append(CPU_MISSING)
        if (parents["memory"] / "memory.use_hierarchy").exists():
            try:
                _write(parents["memory"] / "memory.use_hierarchy", "1")
            except OSError:
                pass
        self.version, self.parents = 1, parents
        return True

    @property
    def enforced(self) -> bool:
        return self.version != 0

    def describe(self) -> str:
        fence = ({"bpf": ", GPU device fence (eBPF device program)",
                  "devices": ", GPU device fence (devices.deny)"}[self.fence] if self.fence else
                 f", NO GPU device fence ({self.fence_why})")
        cpu = "" if CPU_MISSING in self.missing else ", a CPU share per sandbox"
        if self.version == 2:
            return f"cgroup v2 at {self.parents['unified']}: memory and pids limits{cpu}, freeze, kill{fence}"
        if self.version == 1:
            return (f"cgroup v1 ({', '.join(str(p) for p in self.parents.values())}): memory and pids limits{cpu}, "
                    f"freezer, kill by signalling every member until none is left{fence}")
        return f"NO cgroups ({self.why}): not enforced: {', '.join(self.missing)}"

    def create(self, label: str) -> Cgroup:
        self._count += 1
        name = f"sb-{os.getpid()}-{self._count}-{_safe_name(label)[:40]}"
        dirs = {}
        for c, p in self.parents.items():
            d = p / name
            d.mkdir()
            dirs[c] = d
        return Cgroup(self, name, dirs)

    def kill_leftovers(self) -> int:
        """Kill every sandbox cgroup that an earlier run of this agent id left (its agent process
        is gone), and remove their parents; how many sandbox cgroups were killed."""
        killed = 0
        prefix = f"gpu-attach-{self.agent}-"
        for c, mine in self.parents.items():
            for old in mine.parent.iterdir():
                if not (old.is_dir() and old.name.startswith(prefix) and old != mine):
                    continue
                pid = old.name[len(prefix):]
                if pid.isdigit() and _is_agent(int(pid)):
                    continue  # another live agent with the same id on this host: not ours to kill
                dirs = {k: p.parent / old.name for k, p in self.parents.items() if (p.parent / old.name).exists()}
                names = {s.name for d in dirs.values() for s in d.iterdir() if s.is_dir()}
                for name in names:
                    kill_dirs(self.version, {k: d / name for k, d in dirs.items() if (d / name).exists()})
                killed += len(names)
                for d in dirs.values():
                    _rmdir_tree(d)
        return killed

    def remove(self) -> None:
        """Kill what is left and remove the agent's parent cgroups (at a clean stop)."""
        names = {s.name for p in self.parents.values() if p.exists() for s in p.iterdir() if s.is_dir()}
        for name in names:
            kill_dirs(self.version, {c: p / name for c, p in self.parents.items() if (p / name).exists()})
        for p in self.parents.values():
            _rmdir_tree(p)


def _is_agent(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        return b"gpu_attach" in cmdline or b"gpu-attach" in cmdline
    except OSError:
        return False
