#!/usr/bin/env python
"""Broker throughput: grant+release cycles per second and grant latency at N concurrent clients,
against ``gpu-attach broker --port`` as a site runs it, while one user keeps listing leases.

Each cycle is what a ``%%gpu`` cell costs the broker: ``POST /v1/leases`` (a small fraction) then
``DELETE /v1/leases/{id}``, each client on its own kept-alive connection. A "lister" thread
meanwhile pages through one user's leases (``GET /v1/leases?limit=1000``) as fast as it can.

The clients. On a site they run in notebook kernels on other machines; here they share the
broker's two cores, so every microsecond of client CPU is taken from the broker. The figures
therefore come from a lean load generator: asyncio connections (uvloop) in ``--processes``
processes, sending the same requests byte for byte as the project's client and checking every
answer's status (a refusal stops the benchmark). The lister beside them is lean too: the same
``GET`` on a kept-alive socket, the page read whole, parsed (orjson) and checked, as a dashboard
on another machine would; the project's ``BrokerClient`` lister (httpx, the standard json module)
spent enough of the shared cores in parsing and garbage collection to double the grants' paced
p99 (10.5 vs 20.7 ms, median of 4 alternating runs each, with the broker answering as many
listings either way). One more row runs the project's own ``BrokerClient`` (``http.client``) in
threads for the clients and the lister, the path a kernel uses, to show what a heavier client
costs this shared machine.

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
instead of two, no token, no database): the floor this machine and HTTP stack give. Each row also
gives the broker process's CPU time per cycle (user + system, from /proc), the figure that noise
on this shared VM moves least.

Usage: python benchmarks/broker_throughput.py [--clients 100] [--seconds 10] [--processes 2] [--rate 1000] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import orjson

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


def stop_broker(proc: subprocess.Popen, state: str) -> None:
    """Stop a broker from :func:`start_broker` as a site does (SIGTERM) and remove its state."""
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)
    shutil.rmtree(state, ignore_errors=True)


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


def lean_process(url: str, clients: int, first: int, mode: str, start_at: float, stop_at: float,
                 rate: float | None, out) -> None:
    """``clients`` connections on one asyncio loop, each as :func:`client_process`'s threads."""
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    host, port = url.split("//")[1].split(":")
    port = int(port)

    async def one(i: int):
        user = f"u{(first + i) % len(USERS)}"
        auth = f"Authorization: Bearer {USERS[user]}\r\n"
        head = f"Host: {host}:{port}\r\nAccept-Encoding: identity\r\nAccept: application/json\r\n"
        body = orjson.dumps(dict(SliceRequest(fraction=0.01).to_json(), session=f"s{first + i}", label=""))
        grant = (f"POST /v1/leases HTTP/1.1\r\n{head}{auth}Content-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        health = f"GET /healthz HTTP/1.1\r\n{head}\r\n".encode()
        reader, writer = await asyncio.open_connection(host, port)

        async def roundtrip(data: bytes, want: int) -> bytes:
            writer.write(data)
            top = await reader.readuntil(b"\r\n\r\n")
            status = int(top[9:12])
            at = top.lower().find(b"\r\ncontent-length:")
            answer = await reader.readexactly(int(top[at + 17:top.index(b"\r\n", at + 2)]))
            if status != want:
                raise RuntimeError(f"{data.split(b' ')[0].decode()} answered {status}: {answer[:300]!r}")
            return answer

        clock = time.perf_counter  # not loop.time(): uvloop's counts whole milliseconds
        rng = random.Random(first + i)
        lat, n = [], 0
        await asyncio.sleep(max(0.0, start_at - time.time()))
        due = clock() + (rng.expovariate(rate) if rate else 0.0)
        while time.time() < stop_at:
            if rate:  # open loop: wait for the cycle's due time, and count latency from it
                pause = due - clock()
                if pause > 0:
                    await asyncio.sleep(pause)
                t = due
                due += rng.expovariate(rate)
            else:
                t = clock()
            if mode == "healthz":
                await roundtrip(health, 200)
                lat.append(clock() - t)
            else:
                lease = orjson.loads(await roundtrip(grant, 201))["id"]
                lat.append(clock() - t)
                await roundtrip(f"DELETE /v1/leases/{lease} HTTP/1.1\r\n{head}{auth}\r\n".encode(), 200)
            n += 1
        writer.close()
        return n, lat

    async def main():
        return await asyncio.gather(*(one(i) for i in range(clients)))

    try:
        results = asyncio.run(main())
    except Exception as e:  # tell the parent at once, rather than let it wait for a result
        out.put(("failed", f"{type(e).__name__}: {e}"))
        raise
    out.put((sum(n for n, _ in results), [x for _, lat in results for x in lat]))


def lister(url: str, stop_at: float, out: list) -> None:
    """The project's client listing one user's leases, 1,000 a page, as fast as it can."""
    c = BrokerClient(url, USERS["u0"])
    while time.time() < stop_at:
        t = time.perf_counter()
        c._call("GET", "/v1/leases", params={"limit": 1000})
        out.append(time.perf_counter() - t)


def lean_lister(url: str, stop_at: float, out: list) -> None:
    """The same listing as :func:`lister`, from a lean client: one kept-alive socket, each page
    read whole, parsed and checked (status 200, a full page of leases)."""
    host, port = url.split("//")[1].split(":")
    request = (f"GET /v1/leases?limit=1000 HTTP/1.1\r\nHost: {host}:{port}\r\nAccept-Encoding: identity\r\n"
               f"Accept: application/json\r\nAuthorization: Bearer {USERS['u0']}\r\n\r\n").encode()
    with socket.create_connection((host, int(port))) as s, s.makefile("rb") as f:
        while time.time() < stop_at:
            t = time.perf_counter()
            s.sendall(request)
            top, length = f.readline(), None
            while True:
                line = f.readline()
                if not line:
                    raise RuntimeError("the broker closed the listing's connection")
                if line == b"\r\n":
                    break
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            if not top.startswith(b"HTTP/1.1 ") or length is None:
                raise RuntimeError(f"a listing answered without a status line or a length: {top[:100]!r}")
            status, page = int(top[9:12]), f.read(length)
            if status != 200:
                raise RuntimeError(f"the listing answered {status}: {page[:300]!r}")
            leases = orjson.loads(page)["leases"]
            if not isinstance(leases, list) or len(leases) > 1000 or (leases and "id" not in leases[0]):
                raise RuntimeError(f"a listing of up to 1000 leases answered {page[:300]!r}")
            out.append(time.perf_counter() - t)


def broker_cpu_s(pid: int) -> float:
    """User + system CPU seconds used by the broker process and its children (the listing worker),
    from Linux /proc."""
    def one(p: int) -> float:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        children = []
    return one(pid) + sum(one(c) for c in children)


def measure(url: str, mode: str, clients: int, processes: int, seconds: float, listing: bool,
            rate: float | None = None, client: str = "lean", broker_pid: int | None = None) -> dict:
    """``rate``: cycles/s offered by all clients together (None: saturated). ``client``: "lean"
    (asyncio, :func:`lean_process`) or "project" (``BrokerClient`` threads, :func:`client_process`)."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    start_at = time.time() + 1.0
    stop_at = start_at + seconds
    per = [clients // processes + (1 if i < clients % processes else 0) for i in range(processes)]
    each = rate / clients if rate else None
    target = lean_process if client == "lean" else client_process
    procs = [ctx.Process(target=target, args=(url, n, sum(per[:i]), mode, start_at, stop_at, each, q))
             for i, n in enumerate(per)]
    for p in procs:
        p.start()
    lists: list[float] = []
    lister_failed: list[BaseException] = []

    def listing_thread():
        try:
            (lean_lister if client == "lean" else lister)(url, stop_at, lists)
        except BaseException as e:  # said at the end: a benchmark whose lister died measured no listing
            lister_failed.append(e)

    lt = threading.Thread(target=listing_thread) if listing else None
    if lt:
        while time.time() < start_at:
            time.sleep(0.001)
        lt.start()
    while time.time() < start_at:
        time.sleep(0.001)
    cpu0 = broker_cpu_s(broker_pid) if broker_pid else None
    got = [q.get(timeout=seconds + 120) for _ in procs]
    cpu1 = broker_cpu_s(broker_pid) if broker_pid else None
    failed = [why for n, why in got if n == "failed"]
    if failed:
        raise RuntimeError(f"a client failed: {failed[0]}")
    for p in procs:
        p.join()
    if lt:
        lt.join()
        if lister_failed:
            raise RuntimeError(f"the lister failed: {lister_failed[0]!r}")
    cycles = sum(n for n, _ in got)
    lat = sorted(x for _, xs in got for x in xs)
    q99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan")
    return {"mode": mode, "client": client, "offered": rate, "cycles_per_s": round(cycles / seconds, 1),
            "broker_cpu_ms_per_cycle": round((cpu1 - cpu0) * 1e3 / cycles, 3) if cpu0 is not None and cycles else None,
            "p50_ms": round(statistics.median(lat) * 1e3, 2),
            "p99_ms": round(q99 * 1e3, 2), "listings": len(lists),
            "listing_p50_ms": round(statistics.median(lists) * 1e3, 1) if lists else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--processes", type=int, default=2, help="client processes (each one asyncio loop, or threads)")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=TARGET_CYCLES, help="cycles/s offered in the paced runs")
    ap.add_argument("--repeats", type=int, default=3, help="paced runs (the median p99 is reported)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    state = tempfile.mkdtemp(prefix="gpu-attach-bench-")
    proc, url = start_broker(state)
    try:
        n, p, sec = args.clients, args.processes, args.seconds

        def run(mode, listing=True, rate=None, client="lean"):
            return measure(url, mode, n, p, sec, listing=listing, rate=rate, client=client, broker_pid=proc.pid)

        # Warm up first (a site's broker has been running a while: its caches are filled), then
        # paced: the latency of a site running at that load, not one recovering from the
        # saturated runs' backlog (their WAL takes the checkpointer a while to copy back).
        measure(url, "lease", n, p, 3.0, listing=True, rate=args.rate, client="lean", broker_pid=proc.pid)
        # This VM's tail latency swings run to run (the same build gave p99 7 ms and 500 ms
        # minutes apart): the paced pair runs --repeats times and the median p99 is the figure.
        pairs = [(run("healthz", rate=args.rate), run("lease", rate=args.rate)) for _ in range(args.repeats)]
        base = run("healthz")
        ours = run("lease")
        quiet = run("lease", listing=False)
        project = run("lease", client="project")
        order = sorted(range(len(pairs)), key=lambda i: pairs[i][1]["p99_ms"])
        base_paced, paced = pairs[order[len(order) // 2]]
        p99s = [pairs[i][1]["p99_ms"] for i in order]
    finally:
        stop_broker(proc, state)
    print(f"broker throughput on {platform.node()} ({os.cpu_count()} CPUs), {args.clients} clients in "
          f"{args.processes} processes, {args.seconds:g} s each, `gpu-attach broker --port` (SQLite)")
    print(f"{'':56s} {'cycles/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} {'broker CPU':>11s}  listings of 1000")

    def row(name, r):
        listed = f"  {r['listings']} calls, p50 {r['listing_p50_ms']} ms" if r["listings"] else ""
        print(f"{name:56s} {r['cycles_per_s']:9.1f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} "
              f"{r['broker_cpu_ms_per_cycle']:8.3f} ms{listed}")

    print("saturated (closed loop):")
    row("  baseline: GET /healthz per cycle", base)
    row("  grant+release, a user listing leases", ours)
    row("  grant+release, nobody listing", quiet)
    row("  grant+release, a user listing, the project's client", project)
    print(f"paced at {args.rate:g} cycles/s offered (open loop, latency from when due), the median of "
          f"{args.repeats} runs by p99 (grant p99 in each run: {', '.join(f'{x:.1f}' for x in p99s)} ms):")
    row("  baseline: GET /healthz per cycle", base_paced)
    row("  grant+release, a user listing leases", paced)
    print("broker CPU: CPU time per cycle of the broker and its listing worker process (with a listing, "
          "the listing's too)")
    ok = ours["cycles_per_s"] >= TARGET_CYCLES and paced["p99_ms"] <= TARGET_P99_MS
    print(f"target: >= {TARGET_CYCLES:g} cycles/s with a user listing, and p99 grant latency <= {TARGET_P99_MS:g} ms "
          f"at that load: {'met' if ok else 'MISSED'} ({ours['cycles_per_s']:.0f} cycles/s saturated, "
          f"p99 {paced['p99_ms']:.1f} ms paced; the healthz floor's p99 paced is {base_paced['p99_ms']:.1f} ms)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"baseline": base, "with_listing": ours, "without_listing": quiet, "project_client": project,
                       "baseline_paced": base_paced, "paced_with_listing": paced, "paced_p99s_ms": p99s,
                       "clients": args.clients}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
