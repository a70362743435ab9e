"""The GPU device fence on this machine's own kernel: a process in a fenced cgroup opens only the
NVIDIA nodes of the minors it is pinned to.

The nodes are made with mknod (major 195, as /dev/nvidiaN); no driver backs them here, so an open
the fence lets through fails with ENXIO ("no such device"), and one it stops fails with EPERM
before the kernel looks for a driver. Both backends run where this kernel has them: cgroup v2's
eBPF device program (on the v2 hierarchy, which hybrid hosts mount at /sys/fs/cgroup/unified) and
the v1 devices hierarchy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from gpu_attach_server.agent import device_fence
from gpu_attach_server.agent.cgroups import ROOT, CgroupTree

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mknod and cgroups need root")

PROBE = """
import errno, json, os, sys
out = {}
for path in sys.argv[1:]:
    try:
        os.close(os.open(path, os.O_RDWR))
        out[path] = "opened"
    except OSError as e:
        out[path] = errno.errorcode[e.errno]
print(json.dumps(out))
"""


def _v2_root() -> Path | None:
    for p in (ROOT, ROOT / "unified"):
        if (p / "cgroup.procs").exists() and (p / "cgroup.controllers").exists():
            return p
    return None


def _v1_root() -> Path | None:
    p = ROOT / "devices"
    return p if (p / "devices.deny").exists() else None


@pytest.fixture
def nodes(tmp_path):
    """Fake /dev/nvidia0..3, /dev/nvidia-modeset and /dev/nvidiactl, and a /dev/null twin."""
    made = {}
    for name, minor in [("nvidia0", 0), ("nvidia1", 1), ("nvidia2", 2), ("nvidia3", 3),
                        ("nvidia-modeset", 254), ("nvidiactl", 255)]:
        path = tmp_path / name
        os.mknod(path, 0o20666, os.makedev(195, minor))
        os.chmod(path, 0o666)  # past the umask: as the driver makes /dev/nvidia*
        made[name] = str(path)
    os.mknod(tmp_path / "null", 0o20666, os.makedev(1, 3))
    made["null"] = str(tmp_path / "null")
    return made


def probe(procs_file: Path, nodes: dict) -> dict:
    """Open each node from a process that joined the cgroup before it ran anything."""
    script = f"echo $$ > {procs_file} && exec {sys.executable} -c \"$0\" \"$@\""
    out = subprocess.run(["sh", "-c", script, PROBE, *nodes.values()], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    by_path = json.loads(out.stdout)
    return {name: by_path[path] for name, path in nodes.items()}


def expect(nodes_result: dict, allowed: set[str]) -> None:
    """Fenced nodes fail with EPERM; the rest reach the driver: ENXIO without one, and on a GPU
    host an open (a GPU there, nvidiactl) or ENODEV (no GPU of that minor)."""
    seen = {name: "fenced" if got == "EPERM" else "reached" for name, got in nodes_result.items()}
    want = {name: "fenced" if name.startswith("nvidia") and name not in allowed else "reached"
            for name in nodes_result}
    for control in ("nvidia-modeset", "nvidiactl"):  # never fenced: CUDA needs them
        want[control] = "reached"
    assert seen == want, nodes_result
    assert nodes_result["null"] == "opened"


def test_the_program_denies_only_gpu_nodes_outside_the_pin():
    code = device_fence.device_program([3, 1, 1, 300])
    assert len(code) % 8 == 0
    # four loads, three range tests, one test per allowed minor (1 and 3; 300 is no GPU node), four at the end
    assert len(code) // 8 == 4 + 3 + 2 + 4


@needs_root
@pytest.mark.parametrize("backend", ["bpf", "devices"])
def test_a_fenced_cgroup_opens_only_its_pinned_gpus(backend, nodes):
    base = _v2_root() if backend == "bpf" else _v1_root()
    if base is None:
        pytest.skip(f"this kernel has no {'cgroup v2 hierarchy' if backend == 'bpf' else 'v1 devices hierarchy'}")
    d = base / f"gpu-attach-fence-test-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    fence = device_fence.BpfFence(d) if backend == "bpf" else device_fence.ListFence(d)
    try:
        expect(probe(d / "cgroup.procs", nodes), {"nvidia0", "nvidia1", "nvidia2", "nvidia3"})  # not fenced yet
        fence.pin(())
        expect(probe(d / "cgroup.procs", nodes), set())
        fence.pin([1])
        expect(probe(d / "cgroup.procs", nodes), {"nvidia1"})
        fence.pin([2, 3])  # a re-pin closes what it opened before
        expect(probe(d / "cgroup.procs", nodes), {"nvidia2", "nvidia3"})
    finally:
        fence.close()
        d.rmdir()


@needs_root
def test_the_agents_cgroups_fence_every_sandbox(nodes):
    """What the agent itself makes: each sandbox cgroup has the fence, pinned through Cgroup."""
    tree = CgroupTree(f"fence-test-{uuid.uuid4().hex[:6]}")
    if not tree.enforced:
        pytest.skip(f"no cgroups the agent can use here: {tree.why}")
    try:
        assert tree.fence, tree.fence_why
        assert "GPU device fence" in tree.describe() and not tree.missing
        cg = tree.create("test")
        script = " ".join(f"echo $$ > {d / 'cgroup.procs'};" for d in cg.dirs.values())
        cg.pin_gpus([0])
        out = subprocess.run(["sh", "-c", f"{script} exec {sys.executable} -c \"$0\" \"$@\"", PROBE,
                              *nodes.values()], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        got = {name: json.loads(out.stdout)[path] for name, path in nodes.items()}
        expect(got, {"nvidia0"})
        cg.kill()
    finally:
        tree.remove()



def test_held_minors_finds_open_and_mapped_nodes(tmp_path):
    """The scan a re-pin depends on: descriptors (here /dev/null, 1:3, standing in for a GPU node,
    which no process can open without the driver) and mappings that outlive their descriptor."""
    mapped = tmp_path / "dev" / "fake7"
    mapped.parent.mkdir()
    mapped.write_bytes(b"\0" * 4096)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import mmap, os, sys, time\n"
         "null = os.open('/dev/null', os.O_RDWR)\n"
         "fd = os.open(sys.argv[1], os.O_RDWR)\n"
         "m = mmap.mmap(fd, 4096)\n"
         "os.close(fd)  # the mapping stays\n"
         "print('ready', flush=True)\n"
         "time.sleep(30)\n", str(mapped)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        import re

        node = re.compile(rf"^{re.escape(str(tmp_path))}/dev/fake(\d+)$")
        assert device_fence.held_minors([holder.pid], major=1, node=node) == {3, 7}
        assert device_fence.held_minors([holder.pid]) == set()  # no NVIDIA node held
        assert device_fence.held_minors([2 ** 22 + 7]) == set()  # a process that is gone
    finally:
        holder.kill()
        holder.wait()


def test_a_sandbox_holding_another_gpu_is_replaced_not_repinned(monkeypatch):
    """Agent._holds_other_gpus with the scan's answer given: a sandbox that holds GPU 0's node open
    may not run a cell leased GPU 1 (the fence only checks at open), whatever it says of itself."""
    import subprocess as sp

    from gpu_attach_server.agent import agent as agent_mod
    from gpu_attach_server.agent.inventory import Device

    agent = object.__new__(agent_mod.Agent)
    agent.devices = {i: Device(i, f"GPU-{i}", "H100", 80 << 30, False, minor=i) for i in range(2)}
    agent._gpu_nodes = True

    class FakeCgroup:
        def pids(self):
            return [4242]

    s = agent_mod.SandboxHandle(key=("u", "s"), proc=sp.Popen(["true"]), ctl=None, workdir="/tmp",
                                cgroup=FakeCgroup(), devices=(0,), simulated=False)
    s.proc.wait()
    held = {0}
    monkeypatch.setattr(agent_mod, "held_minors", lambda pids: set(held))
    assert agent._holds_other_gpus(s, (0,)) is False  # its own lease's GPU
    assert agent._holds_other_gpus(s, (1,)) is True  # GPU 0 still open: replace it
    held.clear()
    assert agent._holds_other_gpus(s, (1,)) is False  # nothing held: re-pinned
    held.add(1)
    assert agent._holds_other_gpus(s, (0,)) is True  # a node passed in from elsewhere
    agent._gpu_nodes = False
    assert agent._holds_other_gpus(s, (0,)) is False  # no GPU node on the host: nothing to scan


@needs_root
def test_the_v1_fence_refuses_a_default_deny_cgroup():
    """Under a parent that lists the devices it allows (a container's), a deny entry only removes
    an exact allow entry, so it would fence nothing: the fence says so instead of pinning."""
    base = _v1_root()
    if base is None:
        pytest.skip("this kernel has no v1 devices hierarchy")
    d = base / f"gpu-attach-fence-test-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    try:
        (d / "devices.deny").write_text("a")  # default deny...
        (d / "devices.allow").write_text("c 195:* rwm")  # ...with every GPU node allowed
        with pytest.raises(device_fence.FenceError, match="not a default-allow devices cgroup"):
            device_fence.ListFence(d).pin([0])
    finally:
        d.rmdir()
