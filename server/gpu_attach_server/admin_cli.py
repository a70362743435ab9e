"""``gpu-attach admin ...``: every route of the broker's admin API from a shell.

Tables by default, ``--json`` for scripts. The admin token comes from ``GPU_ATTACH_ADMIN_TOKEN``
(never from the command line, where ``ps`` shows it), the broker from ``--broker`` or
``GPU_ATTACH_BROKER_URL``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any

from jupyter_gpu_attach.slices import format_size, parse_size

_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def _when(text: str) -> float:
    """``1700000000`` (Unix seconds) or ``90m`` / ``2h`` / ``7d`` ago."""
    m = _AGE.match(text)
    if m:
        return time.time() - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give Unix seconds or an age like 90m, 2h, 7d") from None


def _cell(v: Any, col: str) -> str:
    if v is None:
        return "-"
    if col == "borrowed" and isinstance(v, dict):  # above which quota, by how much: "share 0.4+0.2>0.5"
        amount = (lambda n: format_size(int(n))) if v.get("resource") == "memory" else (lambda n: f"{n:g}")
        try:
            return f"{v['resource']} {amount(v['in_use'])}+{amount(v['asked'])}>{amount(v['limit'])}"
        except (KeyError, TypeError, ValueError):
            return "yes"
    if isinstance(v, float) and (col.endswith("_at") or col in ("at", "time", "wait_until")):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v))
    if col in ("memory", "used_memory", "max_memory") and isinstance(v, int):
        return format_size(v)
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))[:60]
    return str(v)


def table(rows: list[dict], cols: list[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[_cell(r.get(c), c) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _request(args) -> tuple[str, str, dict | None, dict | None, Any]:
    """(method, path, body, params, how to print) for the parsed command."""
    c = args.admin_command
    if c == "agents":
        return "GET", "/v1/admin/agents", None, None, ["id", "address", "state", "gpus", "drained", "version", "last_heartbeat_age_s"]
    if c == "gpus":
        return "GET", "/v1/admin/gpus", None, None, ["id", "pool", "model", "memory", "used_share", "leases", "agent_state", "drained"]
    if c == "leases":
        params = {"limit": args.limit, "user": args.user, "state": args.state, "before": args.before}
        return "GET", "/v1/admin/leases", None, params, ("leases", ["id", "user", "session", "label", "state", "gpus", "fraction", "age_s", "borrowed", "end_reason"])
    if c == "queue":
        return "GET", "/v1/admin/queue", None, None, ("entries", ["position", "id", "user", "group", "priority", "request", "waited_s", "usage_gpu_s", "label"])
    if c == "revoke":
        return "POST", f"/v1/admin/leases/{args.lease}/revoke", {"reason": args.reason}, None, ["id", "state", "end_reason"]
    if c in ("drain", "undrain"):
        if args.kind == "agent":
            path = f"/v1/admin/agents/{args.target}/{c}"
        else:
            agent, sep, index = args.target.rpartition("/")
            if not sep or not index.isdigit():
                raise SystemExit(f"gpu-attach admin {c} gpu: give the GPU as AGENT/INDEX (see `gpu-attach admin gpus`)")
            path = f"/v1/admin/agents/{agent}/gpus/{index}/{c}"
        return "POST", path, ({"reason": args.reason} if c == "drain" else None), None, ["target", "kind", "drained"]
    if c == "users":
        return "GET", "/v1/admin/users", None, None, ["name", "group", "priority", "usage_gpu_s"]
    if c == "user":
        if args.action == "set":
            return "PUT", f"/v1/admin/users/{args.name}", {"group": args.group, "priority": args.priority}, None, ["name", "group", "priority"]
        return "DELETE", f"/v1/admin/users/{args.name}", None, None, ["name", "deleted"]
    if c == "groups":
        return "GET", "/v1/admin/groups", None, None, ["name", "members", "quota"]
    if c == "quota":
        cols = ["kind", "subject", "max_share", "max_memory", "max_lease_s", "borrow"]
        if args.action == "list":
            return "GET", "/v1/admin/quotas", None, None, cols
        if args.action == "set":
            body = {"max_share": args.share, "max_memory": parse_size(args.memory) if args.memory else None,
                    "max_lease_s": args.max_lease, "borrow": args.borrow}
            return "PUT", f"/v1/admin/quotas/{args.kind}/{args.subject}", body, None, cols
        return "DELETE", f"/v1/admin/quotas/{args.kind}/{args.subject}", None, None, ["kind", "subject", "deleted"]
    if c == "token":
        if args.action == "create":
            return "POST", "/v1/admin/tokens", {"user": args.user, "label": args.label}, None, ["id", "user", "label", "token"]
        if args.action == "list":
            return "GET", "/v1/admin/tokens", None, {"user": args.user}, ["id", "user", "label", "created_at", "revoked_at"]
        return "DELETE", f"/v1/admin/tokens/{args.id}", None, None, ["id", "user", "revoked"]
    if c == "usage":
        params = {"since": args.since, "until": args.until, "by": args.by}
        return "GET", "/v1/admin/usage", None, params, ("rows", [args.by, "leases", "granted_gpu_s", "busy_gpu_s", "idle_gpu_s", "idle_share", "static_gpu_s"])
    if c == "audit":
        return "GET", "/v1/admin/audit", None, {"limit": args.limit}, ["at", "actor", "action", "target", "detail"]
    raise AssertionError(c)


def run_admin(args) -> int:
    from jupyter_gpu_attach.broker_client import BrokerClient
    from jupyter_gpu_attach.errors import GPUAttachError

    token = os.environ.get("GPU_ATTACH_ADMIN_TOKEN")
    if not token:
        print("gpu-attach admin: set GPU_ATTACH_ADMIN_TOKEN to the broker's admin token", file=sys.stderr)
        return 2
    if not args.broker:
        print("gpu-attach admin: pass --broker URL or set GPU_ATTACH_BROKER_URL", file=sys.stderr)
        return 2
    method, path, body, params, shape = _request(args)
    client = BrokerClient(args.broker, token)
    try:
        out = client._call(method, path, body, {k: v for k, v in (params or {}).items() if v is not None})
    except (GPUAttachError, ValueError) as e:
        print(f"gpu-attach admin: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    key, cols = shape if isinstance(shape, tuple) else (None, shape)
    rows = out[key] if key else out
    print(table(rows if isinstance(rows, list) else [rows], cols))
    if key == "leases" and out.get("next"):
        print(f"(more: --before {out['next']})")
    if args.admin_command == "token" and args.action == "create":
        print("The token is shown only now; the broker keeps only its SHA-256.")
    return 0


def add_parser(sub) -> None:
    """Add ``admin`` and its subcommands to the ``gpu-attach`` parser."""
    p = sub.add_parser("admin", help="see and steer a shared pool through the broker's admin API",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--broker", default=os.environ.get("GPU_ATTACH_BROKER_URL"),
                   help="the broker's URL (default: $GPU_ATTACH_BROKER_URL)")
    p.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
    s = p.add_subparsers(dest="admin_command", required=True)
    s.add_parser("agents", help="agents, their state and GPUs")
    s.add_parser("gpus", help="GPUs, their allocation and drain state")
    q = s.add_parser("leases", help="leases (owner, session, cell label, age), newest first")
    q.add_argument("--user")
    q.add_argument("--state", choices=["granted", "released", "expired", "revoked", "failed"])
    q.add_argument("--limit", type=int, default=50)
    q.add_argument("--before", help="the cursor printed under the previous page")
    s.add_parser("queue", help="queued requests in the order they will be served")
    r = s.add_parser("revoke", help="end a lease now; its cell is stopped and told why")
    r.add_argument("lease")
    r.add_argument("--reason", default="", help="told to the lease's owner")
    for verb, text in (("drain", "no new grants on an agent or GPU; running cells finish"), ("undrain", "take grants again")):
        d = s.add_parser(verb, help=text)
        d.add_argument("kind", choices=["agent", "gpu"])
        d.add_argument("target", help="agent id, or GPU as AGENT/INDEX")
        if verb == "drain":
            d.add_argument("--reason", default="")
    s.add_parser("users", help="users with their group, priority and recent usage")
    u = s.add_parser("user", help="set or delete a user's group and priority class")
    us = u.add_subparsers(dest="action", required=True)
    us_set = us.add_parser("set")
    us_set.add_argument("name")
    us_set.add_argument("--group")
    us_set.add_argument("--priority", type=int, default=0, help="higher is served first from the queue (-10..10)")
    us.add_parser("delete").add_argument("name")
    s.add_parser("groups", help="groups, their members and quota")
    qu = s.add_parser("quota", help="list, set or delete quotas")
    qs = qu.add_subparsers(dest="action", required=True)
    qs.add_parser("list")
    q_set = qs.add_parser("set")
    q_set.add_argument("kind", choices=["user", "group"])
    q_set.add_argument("subject")
    q_set.add_argument("--share", type=float, help="GPUs' worth held at once (0.5 = half a GPU)")
    q_set.add_argument("--memory", help="memory held at once, e.g. 40GiB")
    q_set.add_argument("--max-lease", type=float, help="seconds a lease may last before it is revoked")
    q_set.add_argument("--borrow", action="store_true",
                       help="may go over --share/--memory while GPUs are idle; such a lease is not renewed once "
                            "another request waits")
    q_del = qs.add_parser("delete")
    q_del.add_argument("kind", choices=["user", "group"])
    q_del.add_argument("subject")
    t = s.add_parser("token", help="create, list or revoke user tokens (stored hashed)")
    ts = t.add_subparsers(dest="action", required=True)
    t_new = ts.add_parser("create")
    t_new.add_argument("user")
    t_new.add_argument("--label", default="")
    ts.add_parser("list").add_argument("--user")
    ts.add_parser("revoke").add_argument("id")
    g = s.add_parser("usage", help="GPU-seconds granted and busy per user, group or GPU")
    g.add_argument("--since", type=_when, default="1d", help="Unix seconds or an age (90m, 2h, 7d; default 1d)")
    g.add_argument("--until", type=_when, help="Unix seconds or an age (default: now)")
    g.add_argument("--by", choices=["user", "group", "gpu"], default="user")
    a = s.add_parser("audit", help="the audit log of admin actions, newest first")
    a.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=run_admin)
