#!/usr/bin/env python
"""The broker's cost per grant+release now, beside an earlier commit's, measured alternately.

This VM's speed drifts by a quarter from one minute to the next, so two benchmark runs made at
different times cannot say whether a change made the broker cheaper. This one starts
``gpu-attach broker --port`` from a worktree of ``--before`` and from this checkout, in turn,
``--runs`` times, with the same load generator (``broker_throughput.py``'s), and prints each
run's figures side by side:

- the broker's CPU time per cycle at 400 cycles/s paced, nobody listing (its process and its
  children, from /proc; the steadiest figure on a noisy machine);
- cycles/s saturated, with a user listing 1,000 leases in a tight loop, and the CPU per cycle there.

Usage: python benchmarks/broker_before_after.py --before REV [--runs 3] [--seconds 8]
(needs git; the worktree is removed at the end)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import broker_throughput as bt  # noqa: E402

HERE = Path(__file__).resolve().parent.parent


def one(tree: Path, seconds: float) -> tuple[float, float, float]:
    os.environ["PYTHONPATH"] = f"{tree / 'server'}{os.pathsep}{tree}"  # the broker process imports this tree
    state = tempfile.mkdtemp(prefix="gpu-attach-ab-")
    proc, url = bt.start_broker(state)
    try:
        bt.measure(url, "lease", 100, 2, 2.0, False, rate=400, client="lean", broker_pid=proc.pid)  # warm-up
        paced = bt.measure(url, "lease", 100, 2, seconds, False, rate=400, client="lean", broker_pid=proc.pid)
        sat = bt.measure(url, "lease", 100, 2, seconds, True, client="lean", broker_pid=proc.pid)
    finally:
        bt.stop_broker(proc, state)
    return paced["broker_cpu_ms_per_cycle"], sat["cycles_per_s"], sat["broker_cpu_ms_per_cycle"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="the commit to compare with (any git revision)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8.0)
    args = ap.parse_args()
    old = Path(tempfile.mkdtemp(prefix="gpu-attach-before-")) / "tree"
    subprocess.run(["git", "-C", str(HERE), "worktree", "add", "--detach", "-q", str(old), args.before], check=True)
    rows: dict[str, list[tuple[float, float, float]]] = {"before": [], "after": []}
    try:
        for _ in range(args.runs):
            rows["before"].append(one(old, args.seconds))
            rows["after"].append(one(HERE, args.seconds))
    finally:
        subprocess.run(["git", "-C", str(HERE), "worktree", "remove", "--force", str(old)], check=False)
        shutil.rmtree(old.parent, ignore_errors=True)
    print(f"broker before ({args.before}) and after (this checkout), alternated, {args.runs} runs each")
    print(f"{'':8s} {'CPU/cycle, paced 400/s':>24s} {'cycles/s, saturated, listing':>30s} {'CPU/cycle there':>18s}")
    for name, rs in rows.items():
        cols = [", ".join(f"{r[i]:.{d}f}" for r in rs) for i, d in ((0, 3), (1, 0), (2, 3))]
        print(f"{name:8s} {cols[0]:>24s} {cols[1]:>30s} {cols[2]:>18s}")
    med = {k: statistics.median(r[0] for r in v) for k, v in rows.items()}
    print(f"median CPU per cycle, paced: before {med['before']:.3f} ms, after {med['after']:.3f} ms "
          f"({(med['after'] / med['before'] - 1) * 100:+.0f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
