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
    want = {name: ("ENXIO" if name.startswith("nvidia") and name in allowed else
                   "EPERM" if name.startswith("nvidia") else "opened") for name in nodes_result}
    for control in ("nvidia-modeset", "nvidiactl"):  # never fenced: CUDA needs them
        want[control] = "ENXIO"
    assert nodes_result == want


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

