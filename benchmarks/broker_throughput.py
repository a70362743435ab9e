#!/usr/bin/env python
"""Broker throughput: grant+release cycles per second and grant latency at N concurrent clients,
against ``gpu-attach broker --port`` as a site runs it, while one user keeps listing leases.

Each client is the project's own ``BrokerClient`` (keep-alive ``http.client``), in a loop of
request_lease (a small fraction) then release. Clients are threads spread over a few processes,
so the clients' own Python does not share one GIL. A "lister" thread meanwhile pages through the
same user's leases (``GET /v1/leases?limit=1000``) as fast as it can.

Two ways of loading it, both with the lister running:

- saturated: each client starts its next cycle as soon as the last ends (closed loop). This gives
  the most cycles per second; each grant then waits behind the other 99 clients' requests, so its
  latency is the queue's length, not the broker's speed (Little's law: 100 clients at 1,000
  cycles/s, two requests each, is 50 ms per request however fast the broker is).
- paced: the clients together offer ``--rate`` cycles per second (1,000), each at Poisson times,
  and grant latency is counted from when the cycle was due (so a stalled broker cannot hide its
  stall by delaying the next request: no coordinated omission). This is the latency a site sees
  at that load.

Baseline, same run, same clients and pacing: a bare ``GET /healthz`` per cycle (one request
instead of two, no token, no database): the floor this machine and HTTP stack give.

Usage: python benchmarks/broker_throughput.py [--clients 100] [--seconds 10] [--processes 4] [--rate 1000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx

from gpu_attach_server.cli import wait_ready
from jupyter_gpu_attach.broker_client import BrokerClient
from jupyter_gpu_attach.slices import SliceRequest

TARGET_CYCLES = 1000.0
TARGET_P99_MS = 20.0
ADMIN, AGENT = "bench-admin-token-0123456789", "bench-agent-token-0123456789"
USERS = {f"u{i}": f"bench-user-{i}-token-0123456789" for i in range(8)}


def start_broker(state: str) -> tuple[subprocess.Popen, str]:
    # The agent is enrolled as a site enrols one: its own credential, bound to its name.
    env = dict(os.environ, GPU_ATTACH_ADMIN_TOKEN=ADMIN, GPU_ATTACH_AGENT_TOKENS=f"bench:{AGENT}",
               GPU_ATTACH_USER_TOKENS=",".join(f"{u}:{t}" for u, t in USERS.items()))
    env.pop("GPU_ATTACH_AGENT_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "gpu_attach_server.cli", "broker", "--port", "0",
                             "--state-dir", state, "--agent-timeout", "36000"],
                            env=env, stdout=subprocess.PIPE, text=True)
    try:
        url = wait_ready(proc, "the broker")["url"]
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {AGENT}"}) as c:
            c.post("/v1/agents", json={"agent_id": "bench", "address": "127.0.0.1:1", "devices": [
                {"index": i, "uuid": f"GPU-{i}", "model": "Sim", "memory": 80 << 30, "simulated": True}
                for i in range(8)]}).raise_for_status()
    except BaseException:
        proc.kill()
        raise
    return proc, url


def client_process(url: str, threads: int, first: int, mode: str, start_at: float, stop_at: float,
                   rate: float | None, out) -> None:
    """``threads`` clients in this process, each at ``rate`` cycles/s (None: back to back); put
    (cycles, grant latencies) on ``out``."""
    results = []

    def run(i):
        user = f"u{(first + i) % len(USERS)}"
        c = BrokerClient(url, USERS[user])
        lat, n = [], 0
        req = SliceRequest(fraction=0.01)
        rng = random.Random(first + i)
        while time.time() < start_at:
            time.sleep(0.001)
        due = time.perf_counter() + (rng.expovariate(rate) if rate else 0.0)
        while time.time() < stop_at:
            if rate:  # open loop: wait for the cycle's due time, and count latency from it
                pause = due - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                t = due
                due += rng.expovariate(rate)
            else:
                t = time.perf_counter()
            if mode == "healthz":
                c._call("GET", "/healthz")
                lat.append(time.perf_counter() - t)
            else:
                lease = c.request_lease(req, f"s{first + i}")
                lat.append(time.perf_counter() - t)
                c.release(lease["id"])
            n += 1
        results.append((n, lat))

    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out.put((sum(n for n, _ in results), [x for _, lat in results for x in lat]))


def lister(url: str, stop_at: float, out: list) -> None:
    c = BrokerClient(url, USERS["u0"])
    while time.time() < stop_at:
        t = time.perf_counter()
        c._call("GET", "/v1/leases", params={"limit": 1000})
        out.append(time.perf_counter() - t)


def measure(url: str, mode: str, clients: int, processes: int, seconds: float, listing: bool,
            rate: float | None = None) -> dict:
    """``rate``: cycles/s offered by all clients together (None: saturated)."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    start_at = time.time() + 1.0
    stop_at = start_at + seconds
    per = [clients // processes + (1 if i < clients % processes else 0) for i in range(processes)]
    each = rate / clients if rate else None
    procs = [ctx.Process(target=client_process, args=(url, n, sum(per[:i]), mode, start_at, stop_at, each, q))
             for i, n in enumerate(per)]
    for p in procs:
        p.start()
    lists: list[float] = []
    lt = threading.Thread(target=lister, args=(url, stop_at, lists)) if listing else None
    if lt:
        while time.time() < start_at:
            time.sleep(0.001)
        lt.start()
    got = [q.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join()
    if lt:
        lt.join()
    cycles = sum(n for n, _ in got)
    lat = sorted(x for _, xs in got for x in xs)
    q99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan")
    return {"mode": mode, "offered": rate, "cycles_per_s": round(cycles / seconds, 1), "p50_ms": round(statistics.median(lat) * 1e3, 2),
            "p99_ms": round(q99 * 1e3, 2), "listings": len(lists),
            "listing_p50_ms": round(statistics.median(lists) * 1e3, 1) if lists else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=TARGET_CYCLES, help="cycles/s offered in the paced runs")
    ap.add_argument("--repeats", type=int, default=3, help="paced runs (the median p99 is reported)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    state = tempfile.mkdtemp(prefix="gpu-attach-bench-")
    proc, url = start_broker(state)
    try:
        n, p, sec = args.clients, args.processes, args.seconds
        # Paced first: the latency of a site running at that load, not one recovering from the
        # saturated runs' backlog (their WAL takes the checkpointer a while to copy back).
        # This VM's tail latency swings run to run (the same build gave p99 7 ms and 500 ms
        # minutes apart): the paced pair runs --repeats times and the median p99 is the figure.
        pairs = [(measure(url, "healthz", n, p, sec, listing=True, rate=args.rate),
                  measure(url, "lease", n, p, sec, listing=True, rate=args.rate)) for _ in range(args.repeats)]
        base = measure(url, "healthz", n, p, sec, listing=True)
        ours = measure(url, "lease", n, p, sec, listing=True)
        quiet = measure(url, "lease", n, p, sec, listing=False)
        order = sorted(range(len(pairs)), key=lambda i: pairs[i][1]["p99_ms"])
        base_paced, paced = pairs[order[len(order) // 2]]
        p99s = [pairs[i][1]["p99_ms"] for i in order]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        shutil.rmtree(state, ignore_errors=True)
    print(f"broker throughput on {platform.node()} ({os.cpu_count()} CPUs), {args.clients} clients in "
          f"{args.processes} processes, {args.seconds:g} s each, `gpu-attach broker --port` (SQLite)")
    print(f"{'':46s} {'cycles/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s}  listings of 1000")

    def row(name, r):
        listed = f"  {r['listings']} calls, p50 {r['listing_p50_ms']} ms" if r["listings"] else ""
        print(f"{name:46s} {r['cycles_per_s']:9.1f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f}{listed}")

    print("saturated (closed loop):")
    row("  baseline: GET /healthz per cycle", base)
    row("  grant+release, a user listing leases", ours)
    row("  grant+release, nobody listing", quiet)
    print(f"paced at {args.rate:g} cycles/s offered (open loop, latency from when due), the median of "
          f"{args.repeats} runs by p99 (grant p99 in each run: {', '.join(f'{x:.1f}' for x in p99s)} ms):")
    row("  baseline: GET /healthz per cycle", base_paced)
    row("  grant+release, a user listing leases", paced)
    ok = ours["cycles_per_s"] >= TARGET_CYCLES and paced["p99_ms"] <= TARGET_P99_MS
    print(f"target: >= {TARGET_CYCLES:g} cycles/s with a user listing, and p99 grant latency <= {TARGET_P99_MS:g} ms "
          f"at that load: {'met' if ok else 'MISSED'} ({ours['cycles_per_s']:.0f} cycles/s saturated, "
          f"p99 {paced['p99_ms']:.1f} ms paced; the healthz floor's p99 paced is {base_paced['p99_ms']:.1f} ms)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"baseline": base, "with_listing": ours, "without_listing": quiet, "baseline_paced": base_paced,
                       "paced_with_listing": paced, "paced_p99s_ms": p99s, "clients": args.clients}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
