"""Soak: start and stop many notebook sessions; the agent's processes, memory, threads and file
descriptors must come back to their baseline.

Each session runs one cell (a fresh sandbox for it) and then ends (``DELETE /v1/sessions/ID``,
what a kernel does at shutdown), so the agent reclaims its sandbox. The baseline is taken after
a few warm-up sessions (thread pools and imports that exist once are not leaks).

    python benchmarks/soak_sessions.py --sessions 500
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import TOKENS, Site  # noqa: E402

from jupyter_gpu_attach import GPUSession  # noqa: E402


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[-1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def measure(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    field = lambda name: int(next(line.split()[1] for line in status.splitlines() if line.startswith(name)))  # noqa: E731
    return {"processes": len(_descendants(pid)), "rss_mib": round(field("VmRSS:") / 1024, 1),
            "threads": field("Threads:"), "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def soak(sessions: int, warmup: int = 5, settle_s: float = 3.0) -> dict:
    site = Site(Path(tempfile.mkdtemp(prefix="gpu-attach-soak-")))
    site.start_broker()
    agent = site.start_agent("soak", simulate=1, memory="4GiB")
    try:
        def one(i: int) -> None:
            s = GPUSession(site.url, TOKENS["alice"], session_id=f"soak-{i}")
            ns: dict = {}
            s.run("x = 1", ns, stdout=io.StringIO(), stderr=io.StringIO())
            assert ns["x"] == 1
            s.broker.end_session(s.session_id)
            s.close()

        for i in range(warmup):
            one(-1 - i)
        time.sleep(settle_s)
        baseline = measure(agent.pid)
        t0 = time.monotonic()
        for i in range(sessions):
            one(i)
        elapsed = time.monotonic() - t0
        time.sleep(settle_s)  # the last session's sandbox is reclaimed
        after = measure(agent.pid)
        return {"sessions": sessions, "seconds": round(elapsed, 1), "baseline": baseline, "after": after}
    finally:
        site.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=500)
    args = ap.parse_args()
    print(json.dumps(soak(args.sessions)))


if __name__ == "__main__":
    main()
