"""The broker's durable state (agents, GPUs, leases) in SQLite or PostgreSQL via SQLAlchemy Core.

Every change that could over-commit a GPU (a grant) runs in one write transaction that reads
the current allocations and inserts the new ones: ``BEGIN IMMEDIATE`` on SQLite, row locks on
the agents' GPUs (``FOR UPDATE``) on PostgreSQL, so concurrent grants, from one broker or
several, serialise.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    ForeignKey,
    Integer,
    BigInteger,
    MetaData,
    String,
    Table,
    Text,
    and_,
    bindparam,
    create_engine,
    event,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine

metadata = MetaData()

agents = Table(
    "agents",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("address", String(256), nullable=False),  # host:port of the data port
    Column("incarnation", String(64), nullable=False),  # changes on every agent restart
    Column("state", String(16), nullable=False),  # up | down
    Column("registered_at", Float, nullable=False),
    Column("last_heartbeat", Float, nullable=False),
    Column("version", String(32), nullable=False, default=""),
)

gpus = Table(
    "gpus",
    metadata,
    Column("id", String(160), primary_key=True),  # agent_id/index
    Column("agent_id", String(128), ForeignKey("agents.id"), nullable=False, index=True),
    Column("idx", Integer, nullable=False),
    Column("uuid", String(128), nullable=False),
    Column("model", String(128), nullable=False),
    Column("memory", BigInteger, nullable=False),
    Column("simulated", Boolean, nullable=False),
    Column("pool", String(64), nullable=False),
    Column("present", Boolean, nullable=False, default=True),  # False once the agent stops reporting it
)

leases = Table(
    "leases",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("user", String(128), nullable=False, index=True),
    Column("session", String(128), nullable=False, index=True),
    Column("state", String(16), nullable=False, index=True),  # granted | released | expired | revoked | failed
    Column("request", Text, nullable=False),  # the SliceRequest as JSON
    Column("agent_id", String(128), nullable=False),
    Column("agent_incarnation", String(64), nullable=False),
    Column("fraction", Float, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("granted_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("ended_at", Float, nullable=True),
    Column("end_reason", String(256), nullable=True),
    Column("label", String(256), nullable=False, default=""),
)

lease_gpus = Table(
    "lease_gpus",
    metadata,
    Column("lease_id", String(32), ForeignKey("leases.id"), primary_key=True),
    Column("gpu_id", String(160), ForeignKey("gpus.id"), primary_key=True),
    Column("memory", BigInteger, nullable=False),
    Column("active", Boolean, nullable=False, index=True),
)


def make_engine(url_or_path: str) -> Engine:
    """An engine for a SQLAlchemy URL, or a SQLite file path (WAL, busy timeout, immediate writes)."""
    url = url_or_path if "://" in url_or_path else f"sqlite:///{Path(url_or_path).expanduser()}"
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    else:
        engine = create_engine(url, pool_pre_ping=True)
    return engine


class Store:
    """Typed access to the tables; callers group calls in :meth:`write` or :meth:`read`."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.is_sqlite = engine.dialect.name == "sqlite"
        # One writer at a time inside this process saves SQLite's busy-wait; other processes
        # still serialise on the database's own lock.
        self._write_lock = threading.Lock()
        metadata.create_all(engine)

    @contextmanager
    def write(self) -> Iterator[Connection]:
        with self._write_lock, self.engine.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield conn
            conn.rollback()

    def lock_gpus(self, conn: Connection, agent_ids: list[str] | None = None) -> None:
        """Take the row locks that serialise grants across broker replicas (no-op on SQLite)."""
        if self.is_sqlite:
            return
        q = select(gpus.c.id).with_for_update()
        if agent_ids is not None:
            q = q.where(gpus.c.agent_id.in_(agent_ids))
        conn.execute(q).all()

    # -- queries used by more than one operation ------------------------------------------------

    @staticmethod
    def gpus_up(conn: Connection) -> list[dict[str, Any]]:
        q = (
            select(gpus, agents.c.address, agents.c.incarnation)
            .join(agents, agents.c.id == gpus.c.agent_id)
            .where(and_(agents.c.state == "up", gpus.c.present.is_(True)))
            .order_by(gpus.c.id)
        )
        return [dict(r._mapping) for r in conn.execute(q)]

    @staticmethod
    def active_allocations(conn: Connection, at: float) -> list[dict[str, Any]]:
        """Slots held by granted leases; a lease past its expiry holds nothing, even before the reaper ends it."""
        return [dict(r._mapping) for r in conn.execute(_ACTIVE_ALLOCATIONS, {"t": at})]

    @staticmethod
    def end_leases(conn: Connection, where, state: str, reason: str, now: float) -> list[str]:
        """Move every granted lease matching ``where`` to ``state`` and free its GPUs."""
        ids = [r[0] for r in conn.execute(select(leases.c.id).where(and_(leases.c.state == "granted", where)))]
        if ids:
            conn.execute(
                update(leases).where(leases.c.id.in_(ids)).values(state=state, ended_at=now, end_reason=reason)
            )
            conn.execute(update(lease_gpus).where(lease_gpus.c.lease_id.in_(ids)).values(active=False))
        return ids

    @staticmethod
    def end_lease(conn: Connection, lease_id: str, state: str, reason: str, now: float) -> bool:
        """End one granted lease (the hot path of release); False if it had already ended."""
        n = conn.execute(_END_ONE, {"lid": lease_id, "new_state": state, "t": now, "reason": reason}).rowcount
        if n:
            conn.execute(_FREE_ONE, {"lid": lease_id})
        return bool(n)


# Statements on the per-cell path, built once.
_ACTIVE_ALLOCATIONS = (
    select(lease_gpus.c.gpu_id, lease_gpus.c.memory, lease_gpus.c.lease_id)
    .join(leases, leases.c.id == lease_gpus.c.lease_id)
    .where(and_(lease_gpus.c.active.is_(True), leases.c.expires_at >= bindparam("t")))
)
_END_ONE = (
    update(leases)
    .where(and_(leases.c.id == bindparam("lid"), leases.c.state == "granted"))
    .values(state=bindparam("new_state"), ended_at=bindparam("t"), end_reason=bindparam("reason"))
)
_FREE_ONE = update(lease_gpus).where(lease_gpus.c.lease_id == bindparam("lid")).values(active=False)


def now() -> float:
    return time.time()
