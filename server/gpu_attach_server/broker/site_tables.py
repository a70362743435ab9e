"""The tables behind a shared pool's policy and accounting: users and groups, quotas, user tokens
(stored hashed), drains, the audit log, and each lease's busy time. Same metadata as ``store``."""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Column, Float, Integer, String, Table, Text, false

from .store import metadata

users = Table(
    "users",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("group", String(128), nullable=True),  # fair share and group quotas count by this
    Column("priority", Integer, nullable=False, default=0),  # higher classes are served first
    Column("created_at", Float, nullable=False),
)

quotas = Table(
    "quotas",
    metadata,
    Column("kind", String(8), primary_key=True),  # user | group
    Column("subject", String(128), primary_key=True),
    Column("max_share", Float, nullable=True),  # GPUs held at once (0.5 = half of one GPU)
    Column("max_memory", BigInteger, nullable=True),  # bytes held at once, over all GPUs
    Column("max_lease_s", Float, nullable=True),  # a lease is revoked this long after its grant
    # May go over the limits while capacity is idle; such a lease is reclaimed (not renewed) as
    # soon as a request within its quota waits.
    Column("borrow", Boolean, nullable=False, default=False, server_default=false()),
    Column("updated_at", Float, nullable=False),
)

user_tokens = Table(
    "user_tokens",
    metadata,
    Column("id", String(16), primary_key=True),  # shown in listings; the token itself never is
    Column("digest", String(64), nullable=False, unique=True),  # sha256 hex of the token
    Column("user", String(128), nullable=False, index=True),
    Column("label", String(128), nullable=False, default=""),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float, nullable=True),
)

drains = Table(
    "drains",
    metadata,
    Column("target", String(160), primary_key=True),  # an agent id, or a GPU id (agent/index)
    Column("kind", String(8), nullable=False),  # agent | gpu
    Column("since", Float, nullable=False),
    Column("reason", String(256), nullable=False, default=""),
)

audit = Table(
    "audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False, index=True),
    Column("actor", String(128), nullable=False),
    Column("action", String(64), nullable=False),
    Column("target", String(160), nullable=False),
    Column("detail", Text, nullable=False, default="{}"),
)

lease_busy = Table(
    "lease_busy",
    metadata,
    Column("lease_id", String(32), primary_key=True),
    Column("busy_s", Float, nullable=False),  # seconds a cell ran under the lease, as its agent reported
)
