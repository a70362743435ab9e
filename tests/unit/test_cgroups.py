"""The sandbox cgroup's host-memory limit on this machine's kernel (v1 or v2, whichever the agent
would use here)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest

from gpu_attach_server.agent.cgroups import CgroupTree

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="cgroups need root")


def _limit(cg) -> int:
    if cg.tree.version == 2:
        return int((cg.dirs["unified"] / "memory.max").read_text())
    return int((cg.dirs["memory"] / "memory.limit_in_bytes").read_text())


@needs_root
def test_a_smaller_slice_does_not_kill_a_session_that_holds_more():
    """A session's next cell may ask for a smaller slice than its namespace fills. cgroup v2 takes a
    memory.max below the usage and OOM-kills to meet it (v1 refuses it): the limit must stay."""
    tree = CgroupTree(f"mem-test-{uuid.uuid4().hex[:6]}")
    if not tree.enforced:
        pytest.skip(f"no cgroups the agent can use here: {tree.why}")
    holder = None
    try:
        cg = tree.create("test")
        cg.set_memory(1 << 30)
        joins = " ".join(f"echo $$ > {d / 'cgroup.procs'};" for d in cg.dirs.values())
        holder = subprocess.Popen(
            ["sh", "-c", f"{joins} exec {sys.executable} -c \"$0\"",
             "import time\nheld = bytearray(300 << 20)\nprint('ready', flush=True)\ntime.sleep(60)"],
            stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "ready"
        cg.set_memory(64 << 20)  # what a 32 MiB slice's sandbox would get at 2x
        time.sleep(0.5)
        assert holder.poll() is None, "the sandbox was killed when its limit was lowered"
        assert _limit(cg) == 1 << 30
        cg.set_memory(2 << 30)  # raising always takes
        assert _limit(cg) == 2 << 30
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        tree.remove()
