#!/usr/bin/env python
"""Consolidation: how many notebooks a few GPUs serve when a notebook holds a GPU only while a
cell runs, against static one-GPU-per-notebook assignment.

A trace of ``--notebooks`` notebooks (64), each using a GPU ``--duty`` (10 %) of the time, runs
through the real broker (``gpu-attach broker --port``), a real agent with ``--gpus`` (8)
SIMULATED devices and its real sandboxes: each notebook is a ``GPUSession`` (what ``%%gpu``
uses) in its own thread, looping think -> cell -> think. A cell is ``time.sleep(d)`` in the
sandbox, holding one whole GPU, with ``d`` heavy-tailed (log-normal, median 20 s, clipped to
10 min: "seconds to minutes"); the think time between cells is exponential with mean
``d_mean * (1 - duty) / duty``. Requests that find every GPU held wait in the broker's queue.

Time scale: the trace is played ``--speedup`` (30) times faster than real (a 20 s cell takes
0.67 s), so an hour of notebook time takes ``--minutes`` of wall time; waits are reported in
trace seconds (wall seconds times the speedup) and in wall seconds.

Baseline, same trace: static assignment needs one GPU per notebook (no waits), and its GPUs are
busy only for the cells' share of the time; the figures come from the very same cells.

A second baseline, same trace: an ideal broker simulated in trace time, which grants in arrival
order the instant a GPU is free and costs nothing per cell. Its waits are what this load
(64 x 10 % = 6.4 GPUs of demand on 8 GPUs, 80 %, with cells that cannot be split) costs any
first-come scheduler that does not know how long a cell will run; the broker's own share of the
waits is the difference.

Prints p50/p95 queue wait, the share of granted time that was busy (the sandbox's time in the
cell over the lease's hold time), the per-cell overhead (held minus busy), and notebooks served
per GPU.

Usage: python benchmarks/consolidation.py [--notebooks 64] [--gpus 8] [--minutes 2] [--speedup 30]
"""

from __future__ import annotations

import argparse
import io
import math
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from gpu_attach_server.cli import wait_ready
from jupyter_gpu_attach.errors import GPUAttachError
from jupyter_gpu_attach.session import GPUSession
from jupyter_gpu_attach.slices import SliceRequest

MEDIAN_CELL_S = 20.0
SIGMA = 1.2  # log-normal shape: a long tail of multi-minute cells
MAX_CELL_S = 600.0


def start_site(state: str, gpus: int) -> tuple[list[subprocess.Popen], str, str]:
    token, agent_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    # The agent is enrolled as a site enrols one: its own credential, bound to its --name.
    env = {k: v for k, v in os.environ.items() if k != "GPU_ATTACH_AGENT_TOKEN"}
    env.update(GPU_ATTACH_ADMIN_TOKEN=secrets.token_urlsafe(24), GPU_ATTACH_AGENT_TOKENS=f"sim:{agent_token}",
               GPU_ATTACH_USER_TOKENS=f"bench:{token}")
    broker = subprocess.Popen([sys.executable, "-m", "gpu_attach_server.cli", "broker", "--port", "0",
                               "--state-dir", state], env=env, stdout=subprocess.PIPE, text=True)
    procs = [broker]
    try:
        url = wait_ready(broker, "the broker")["url"]
        agent_env = {k: v for k, v in env.items() if not k.startswith(("GPU_ATTACH_USER_", "GPU_ATTACH_ADMIN_", "GPU_ATTACH_AGENT_"))}
        agent_env["GPU_ATTACH_AGENT_TOKEN"] = agent_token
        extra = () if os.geteuid() == 0 else ("--allow-unenforced",)
        agent = subprocess.Popen([sys.executable, "-m", "gpu_attach_server.cli", "agent", "--broker", url, "--name", "sim",
                                  "--simulate", str(gpus), "--sandbox-idle", "7200",
                                  "--state-dir", os.path.join(state, "agent"), *extra],
                                 env=agent_env, stdout=subprocess.PIPE, text=True)
        procs.insert(0, agent)
        wait_ready(agent, "the agent")
    except BaseException:
        for p in procs:
            p.kill()
        raise
    return [agent, broker], url, token


def cell_seconds(rng: random.Random) -> float:
    return min(rng.lognormvariate(math.log(MEDIAN_CELL_S), SIGMA), MAX_CELL_S)


def notebook(url: str, token: str, i: int, args, stop_at: float, out: list, errors: list) -> None:
    rng = random.Random(i)
    s = GPUSession(url, token, SliceRequest(gpus=1), session_id=f"nb{i:02d}")
    s.wait_s = 3600  # %%gpu --wait 3600: wait in the broker's queue rather than fail
    ask = s.broker.request_lease
    waits: list[float] = []

    def request_lease(*a, **kw):  # the session's own call, timed
        t = time.perf_counter()
        lease = ask(*a, **kw)
        waits.append(time.perf_counter() - t)
        return lease

    s.broker.request_lease = request_lease
    mean_cell = MEDIAN_CELL_S * math.exp(SIGMA**2 / 2) / args.speedup
    think_mean = mean_cell * (1 - args.duty) / args.duty
    ns: dict = {}
    time.sleep(rng.expovariate(1 / think_mean))
    while time.time() < stop_at:
        d = cell_seconds(rng) / args.speedup
        try:
            r = s.run(f"import time\ntime.sleep({d:.4f})", ns, stdout=io.StringIO(), stderr=io.StringIO())
        except GPUAttachError as e:
            errors.append(f"nb{i}: {e}")
            continue
        out.append({"nb": i, "wait": waits[-1], "held": r.timings["cell"], "busy": r.remote_elapsed_s, "asked": d,
                    "gpu": r.lease["gpus"][0]["id"]})
        time.sleep(rng.expovariate(1 / think_mean))


def ideal(args, horizon_s: float, gpus: int | None = None) -> dict:
    """The same notebooks (same seeds, so the same cells and think times in the same order)
    against a broker that grants first-come the instant a GPU is free, in trace seconds. As in
    the real run, notebooks ask for no new cell after ``horizon_s``; what was asked still runs."""
    import heapq
    from collections import deque

    mean_cell = MEDIAN_CELL_S * math.exp(SIGMA**2 / 2)
    think_mean = mean_cell * (1 - args.duty) / args.duty
    rngs = [random.Random(i) for i in range(args.notebooks)]
    events = [(rngs[i].expovariate(1 / think_mean), "ask", i) for i in range(args.notebooks)]
    heapq.heapify(events)
    free, waiting, waits, busy = gpus or args.gpus, deque(), [], 0.0

    def start(t, asked, i):
        nonlocal busy
        d = cell_seconds(rngs[i])
        waits.append(t - asked)
        busy += d
        heapq.heappush(events, (t + d, "done", i))

    while events:
        t, kind, i = heapq.heappop(events)
        if kind == "ask" and t > horizon_s:
            continue
        if kind == "ask":
            if free:
                free -= 1
                start(t, t, i)
            else:
                waiting.append((t, i))
        else:
            heapq.heappush(events, (t + rngs[i].expovariate(1 / think_mean), "ask", i))
            if waiting:
                asked, j = waiting.popleft()
                start(t, asked, j)
            else:
                free += 1
    return {"cells": len(waits), "p50": pct(waits, 0.5), "p95": pct(waits, 0.95),
            "waited": sum(1 for w in waits if w > 0) / len(waits) if waits else 0.0}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))] if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--notebooks", type=int, default=64)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--duty", type=float, default=0.10)
    ap.add_argument("--minutes", type=float, default=2.0, help="wall minutes of trace")
    ap.add_argument("--speedup", type=float, default=30.0, help="trace seconds per wall second")
    args = ap.parse_args()
    state = tempfile.mkdtemp(prefix="gpu-attach-consolidation-")
    procs, url, token = start_site(state, args.gpus)
    cells: list[dict] = []
    errors: list[str] = []
    try:
        # Warm every notebook's sandbox first (a first cell starts one), outside the measurement.
        warm = [GPUSession(url, token, SliceRequest(gpus=1), session_id=f"nb{i:02d}") for i in range(args.notebooks)]
        for s in warm:
            s.wait_s = 600
        ts = [threading.Thread(target=s.run, args=("pass", {}), kwargs={"stdout": io.StringIO(), "stderr": io.StringIO()})
              for s in warm]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        t0 = time.time()
        stop_at = t0 + args.minutes * 60
        ts = [threading.Thread(target=notebook, args=(url, token, i, args, stop_at, cells, errors))
              for i in range(args.notebooks)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        wall = time.time() - t0
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(state, ignore_errors=True)

    best = ideal(args, args.minutes * 60 * args.speedup)
    sweep = {g: ideal(args, args.minutes * 60 * args.speedup, g)["p95"] for g in range(args.gpus, 4 * args.gpus + 1)}
    enough = next((g for g, p in sweep.items() if p <= 1.0), None)
    waits = [c["wait"] for c in cells]
    overhead = [c["held"] - c["busy"] for c in cells]
    held = sum(c["held"] for c in cells)
    busy = sum(c["busy"] for c in cells)
    served = {}
    for c in cells:
        served.setdefault(c["gpu"], set()).add(c["nb"])
    static_busy = busy / (args.notebooks * wall)
    print(f"consolidation: {args.notebooks} notebooks at {args.duty:.0%} GPU duty, {len(cells)} cells in {wall:.0f} s wall "
          f"({wall * args.speedup / 3600:.2f} h of trace at {args.speedup:g}x), heavy-tailed cells "
          f"(median {MEDIAN_CELL_S:g} s, log-normal sigma {SIGMA}), {len(errors)} errors")
    print(f"{'':34s} {'GPUs':>5s} {'p50 wait':>14s} {'p95 wait':>14s} {'busy/granted':>13s} {'notebooks/GPU':>14s}")
    print(f"{'static: one GPU per notebook':34s} {args.notebooks:5d} {'0 s':>14s} {'0 s':>14s} {static_busy:13.1%} {1:14.1f}")
    p50, p95 = pct(waits, 0.5), pct(waits, 0.95)
    print(f"{'gpu-attach: leased per cell':34s} {args.gpus:5d} {p50 * args.speedup:7.1f} s trace {p95 * args.speedup:7.1f} s trace "
          f"{busy / held if held else 0:13.1%} {statistics.mean(len(v) for v in served.values()) if served else 0:14.1f}")
    print(f"{'':40s} ({p50:.2f} s wall)  ({p95:.2f} s wall)")
    print(f"{'ideal broker, same trace (simulated)':34s} {args.gpus:5d} {best['p50']:7.1f} s trace {best['p95']:7.1f} s trace "
          f"{1:13.1%} {'':>14s}   ({best['cells']} cells, {best['waited']:.0%} of them waited)")
    print(f"ideal broker's p95 wait with more GPUs: " + ", ".join(
        f"{g}: {sweep[g]:.0f} s" for g in sorted({args.gpus, args.gpus + 2, args.gpus + 4, args.gpus * 2} & set(sweep)))
        + (f"; p95 <= 1 s needs {enough} GPUs ({args.notebooks * args.duty / enough:.0%} load)" if enough else ""))
    print(f"per-cell overhead while granted (held - busy): p50 {pct(overhead, 0.5) * 1e3:.0f} ms, "
          f"p95 {pct(overhead, 0.95) * 1e3:.0f} ms wall; cells {statistics.median(c['asked'] for c in cells):.2f} s "
          f"median wall" if cells else "no cells ran")
    print("(busy = the sandbox's time in the cell; granted = lease held, grant to release; "
          f"target p95 wait <= 1 s, >= 95 % busy)")
    for e in errors[:5]:
        print("error:", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
