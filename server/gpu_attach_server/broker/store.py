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
from typing import Any, Iterator, NamedTuple

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    ForeignKey,
    Integer,
    BigInteger,
    Index,
    MetaData,
    String,
    Table,
    Text,
    and_,
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
    Column("mig", String(32), nullable=True),  # a MIG instance's profile (1g.10gb); None: a whole GPU
    Column("present", Boolean, nullable=False, default=True),  # False once the agent stops reporting it
)

leases = Table(
    "leases",
    metadata,
    Column("id", String(32), primary_key=True),
    # "user" is searched through ix_leases_user_created (it leads it): an index of its own was
    # one more b-tree written on every grant for nothing.
    Column("user", String(128), nullable=False),
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
    # Granted above a quota that may borrow idle capacity: the quota and the numbers (JSON).
    Column("borrowed", Text, nullable=True),
)

lease_gpus = Table(
    "lease_gpus",
    metadata,
    Column("lease_id", String(32), ForeignKey("leases.id"), primary_key=True),
    Column("gpu_id", String(160), ForeignKey("gpus.id"), primary_key=True),
    Column("memory", BigInteger, nullable=False),
    Column("active", Boolean, nullable=False, index=True),
)


# One row: a number that every change to which GPUs are up (an agent registers, or is taken
# down) moves on, in the same transaction. A grant reads it and re-reads the inventory only when it
# moved, on any broker replica (Store.gpus_up).
inventory = Table(
    "inventory",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("version", BigInteger, nullable=False),
)


# Listings page newest first by (created_at, id): these make a page cost O(page), not O(table).
LISTING_INDEXES = (
    Index("ix_leases_created", leases.c.created_at, leases.c.id),
    Index("ix_leases_user_created", leases.c.user, leases.c.created_at, leases.c.id),
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
            # A grant and a release change ~18 pages (the lease, its GPUs, their indexes), each
            # appended whole to the WAL: 1 KiB pages write a quarter of what 4 KiB ones do, and
            # the checkpoint keeps up. Only takes effect on a new database.
            cur.execute("PRAGMA page_size=1024")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            # A checkpoint fsyncs the database file: 10-20 ms that would land on whichever grant
            # or release crossed the threshold. The reaper thread checkpoints instead (checkpoint()).
            cur.execute("PRAGMA wal_autocheckpoint=0")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            # Writers take the write lock up front (no lock upgrade to fail halfway); readers
            # take none, so they never wait behind a writer in WAL mode.
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("writer") else "BEGIN")

    else:
        engine = create_engine(url, pool_pre_ping=True)
    return engine


#: How long a restarting checkpoint waits for a moment with no reader, then for the writer.
CHECKPOINT_GAP_WAIT_S = 0.05
#: WAL frames (pages) above which the checkpoint restarts the WAL (1 KiB pages: ~32 MiB).
WAL_RESTART_FRAMES = 32768


class ReaderCount:
    """How many reads of the database are open: this process's (:meth:`Store.read`), and those the
    listing worker makes for it (:meth:`Store.read_elsewhere`). A checkpoint waits a moment for
    none to be open; readers themselves never wait (one may be the event loop)."""

    def __init__(self):
        self._cv = threading.Condition()
        self._open = 0

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._cv:
            self._open += 1
        try:
            yield
        finally:
            with self._cv:
                self._open -= 1
                if self._open == 0:
                    self._cv.notify_all()

    def none_within(self, wait_s: float) -> bool:
        """Whether, within ``wait_s``, a moment came with no read open."""
        with self._cv:
            return self._cv.wait_for(lambda: self._open == 0, wait_s)


class Store:
    """Typed access to the tables; callers group calls in :meth:`write` or :meth:`read`."""

    def __init__(self, engine: Engine, schema: bool = True):
        """``schema``: create what is missing and bring an older database up to date (False: a
        reader of a database another process keeps, as the listing worker is)."""
        self.engine = engine
        self.is_sqlite = engine.dialect.name == "sqlite"
        # One writer at a time inside this process saves SQLite's busy-wait; other processes
        # still serialise on the database's own lock.
        self._write_lock = threading.Lock()
        self._qmark = engine.dialect.paramstyle == "qmark"
        self._sql_cache: dict[str, str] = {}
        self._hot_db = None
        self._up_cache: tuple[int, list[dict[str, Any]]] | None = None
        self._readers = ReaderCount()
        if schema:
            self._prepare_schema()

    @classmethod
    def reader(cls, engine: Engine) -> "Store":
        """A Store that only reads a database another process keeps (the listing worker)."""
        return cls(engine, schema=False)

    def _prepare_schema(self) -> None:
        metadata.create_all(self.engine)
        for index in LISTING_INDEXES:  # a database made before these indexes existed gets them now
            index.create(self.engine, checkfirst=True)
        with self.engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO inventory (id, version) VALUES (1, 0) ON CONFLICT (id) DO NOTHING")
            conn.exec_driver_sql("DROP INDEX IF EXISTS ix_leases_user")  # made redundant by ix_leases_user_created
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """Columns added since a database was made: added to it, with their defaults."""
        from sqlalchemy import inspect

        added = {"quotas": {"borrow": "BOOLEAN NOT NULL DEFAULT FALSE"}, "gpus": {"mig": "VARCHAR(32)"},
                 "leases": {"borrowed": "TEXT"}}
        for table, columns in added.items():
            have = {c["name"] for c in inspect(self.engine).get_columns(table)}
            for name, ddl in columns.items():
                if name not in have:
                    with self.engine.begin() as conn:
                        conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {name} {ddl}")

    @contextmanager
    def write(self) -> Iterator[Connection]:
        with self._write_lock, self.engine.connect() as conn:
            conn.execution_options(writer=True)
            with conn.begin():
                yield conn

    def checkpoint(self) -> None:
        """Copy the WAL back into the database file, off the request path (SQLite only).

        A passive checkpoint copies what it can while grants go on. But the WAL starts again from
        its beginning only when a write begins after a checkpoint that copied everything, and
        under steady grants something new is always appended meanwhile: at 1,000 grants a second
        the file grew by ~20 MB/s for as long as the load lasted. So once it holds more than
        :data:`WAL_RESTART_FRAMES`, the checkpoint waits for a moment with no reader, holds writers
        back while it copies the last frames (2-10 ms measured; truncating the file as well took
        13-24 ms), and has the WAL start again from its beginning: the file stays that size."""
        if not self.is_sqlite:
            return
        with self.engine.connect() as conn:
            _, frames, _ = conn.connection.driver_connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if frames < WAL_RESTART_FRAMES:
            return
        # A reader that starts after this moment makes the restart give up (busy), not wait.
        if not self._readers.none_within(CHECKPOINT_GAP_WAIT_S) or \
                not self._write_lock.acquire(timeout=CHECKPOINT_GAP_WAIT_S):
            return  # readers or a long write in the way: next time
        try:
            with self.engine.connect() as conn:
                db = conn.connection.driver_connection
                # Not waiting for a reader that was not counted (another broker's, say): then it
                # copies, and starts over next time.
                db.execute("PRAGMA busy_timeout=0")
                try:
                    db.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
                finally:
                    db.execute("PRAGMA busy_timeout=30000")
        finally:
            self._write_lock.release()

    def read_elsewhere(self):
        """A context for the time another process reads this database for us (counted as a reader
        by the checkpoint, which does not start the WAL over under it)."""
        return self._readers.reading()

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self._readers.reading(), self.engine.connect() as conn:
            yield conn
            conn.rollback()

    @contextmanager
    def hot(self):
        """A write transaction on a raw driver connection kept for the per-cell path (grant,
        release): SQLAlchemy's begin/commit alone cost ~130 us there. Serialised like :meth:`write`."""
        with self._write_lock:
            db = self._hot_db
            if db is None:
                db = self._hot_db = self.engine.raw_connection()
            cur = db.cursor()
            try:
                if self.is_sqlite:
                    cur.execute("BEGIN IMMEDIATE")
                yield db
                if self.is_sqlite:
                    cur.execute("COMMIT")
                else:
                    db.commit()
            except BaseException:
                try:
                    if self.is_sqlite:
                        cur.execute("ROLLBACK")
                    else:
                        db.rollback()
                except Exception:  # a broken connection: start afresh next time
                    self._hot_db = None
                    db.invalidate()
                raise

    def lock_gpus(self, db) -> None:
        """Take the row locks that serialise grants across broker replicas (no-op on SQLite)."""
        if not self.is_sqlite:
            self._run(db, "SELECT id FROM gpus FOR UPDATE").fetchall()

    # -- the per-cell path: plain SQL on the driver's cursor --------------------------------------
    # A cell costs one grant and one release. SQLAlchemy Core spends ~75 us building and
    # compiling each statement against ~5 us in SQLite itself, so these few statements go to
    # the driver directly (same connection, same transaction); everything else uses Core.

    def _run(self, db, sql: str, params=()):
        """Execute on ``db``: a raw driver connection (from :meth:`hot`) or a SQLAlchemy one."""
        cur = db.cursor() if hasattr(db, "cursor") else db.connection.cursor()
        cur.execute(self._sql(sql), params)
        return cur

    def _sql(self, sql: str) -> str:
        cached = self._sql_cache.get(sql)
        if cached is None:
            cached = self._sql_cache[sql] = sql if self._qmark else sql.replace("?", "%s")
        return cached

    def gpus_up(self, conn: Connection) -> list[dict[str, Any]]:
        """Every GPU present on an agent that is up (rows of ``_GPUS_UP``; callers must not change
        them). Read again only when the inventory's version has moved since the last read: one
        single-row read per grant instead of the join."""
        version = self._run(conn, _INVENTORY_VERSION, (1,)).fetchone()[0]
        cached = self._up_cache
        if cached is not None and cached[0] == version:
            return cached[1]
        cur = self._run(conn, _GPUS_UP, (True, "up"))
        names = [d[0] for d in cur.description]
        rows = [dict(zip(names, r)) for r in cur.fetchall()]
        self._up_cache = (version, rows)
        return rows

    def inventory_changed(self, conn) -> None:
        """Call in the transaction that changes which GPUs are up, or an agent's address or
        incarnation (what :meth:`gpus_up` returns)."""
        self._run(conn, _INVENTORY_BUMP, (1,))

    def active_allocations(self, conn: Connection, at: float) -> list[tuple[str, int, str, str, float]]:
        """``(gpu_id, memory, lease_id, user, fraction)`` held by granted leases; a lease past its
        expiry holds nothing, even before the reaper ends it."""
        return self._run(conn, _ACTIVE_ALLOCATIONS, (True, at)).fetchall()

    def insert_lease(self, conn: Connection, lease: dict[str, Any], slots: list[tuple[str, int]]) -> None:
        self._run(conn, _INSERT_LEASE, tuple(lease[c] for c in _LEASE_COLUMNS))
        cur = conn.cursor() if hasattr(conn, "cursor") else conn.connection.cursor()
        cur.executemany(self._sql(_INSERT_SLOT), [(lease["id"], g, m, True) for g, m in slots])

    def lease_row(self, conn: Connection, lease_id: str) -> "LeaseRow | None":
        r = self._run(conn, _LEASE_BY_ID, (lease_id,)).fetchone()
        return LeaseRow(*r) if r else None

    def end_lease(self, conn: Connection, lease_id: str, state: str, reason: str, now: float) -> bool:
        """End one granted lease (the hot path of release); False if it had already ended."""
        n = self._run(conn, _END_ONE, (state, now, reason, lease_id, "granted")).rowcount
        if n:
            self._run(conn, _FREE_ONE, (False, lease_id))
        return bool(n)

    def lease_page(self, conn, user: str | None, state: str | None, session: str | None,
                   before: tuple[float, str] | None, limit: int) -> list[dict[str, Any]]:
        """One page of leases, newest first, strictly older than ``before`` (keyset paging), each
        with its GPU ids: one statement whatever the page size, so a listing costs O(page)."""
        where, params = self._page_filter(user, state, session, before)
        sql = (f"SELECT {_LEASE_SELECT_L}, lg.gpu_id, lg.memory FROM "
               f"(SELECT * FROM leases l {'WHERE ' + ' AND '.join(where) if where else ''} "
               "ORDER BY created_at DESC, id DESC LIMIT ?) l "
               "LEFT JOIN lease_gpus lg ON lg.lease_id = l.id ORDER BY l.created_at DESC, l.id DESC, lg.gpu_id")
        out: list[dict[str, Any]] = []
        for r in self._run(conn, sql, (*params, limit)).fetchall():
            if not out or out[-1]["id"] != r[0]:
                lease = dict(zip(_LEASE_COLUMNS, r[:len(_LEASE_COLUMNS)]))
                lease["gpus"], lease["memory_per_gpu"] = [], 0
                out.append(lease)
            gpu_id, memory = r[len(_LEASE_COLUMNS):]
            if gpu_id is not None:
                out[-1]["gpus"].append(gpu_id)
                out[-1]["memory_per_gpu"] = memory
        return out

    def lease_page_json(self, conn, user: str | None, state: str | None, session: str | None,
                        before: tuple[float, str] | None, limit: int) -> tuple[str, int, tuple[float, str] | None]:
        """The page :meth:`lease_page` reads as one JSON array written by the database itself (each
        lease with the fields of ``core._page_json``), how many leases it holds, and the last
        one's cursor key.

        The listing route serves the array unparsed. It comes back as one row of one statement,
        so the thread that asked lets go of the GIL once, for the whole page, while the database
        works: a user paging through 1,000 leases costs the event loop that grants almost nothing.
        (Fetched row by row, the page took the GIL back a thousand times, and a low-priority
        thread that the OS did not schedule while it held the GIL stalled every grant behind it.)"""
        where, params = self._page_filter(user, state, session, before)
        if self.is_sqlite:
            def num(col):  # the shortest of 15 or 17 digits that reads back as the same double
                return (f"CASE WHEN {col} IS NULL THEN NULL WHEN CAST(printf('%.15g', {col}) AS REAL) = {col} "
                        f"THEN json(printf('%.15g', {col})) ELSE json(printf('%!.17g', {col})) END")
            obj = ("json_object('id', l.id, 'state', l.state, 'user', l.\"user\", 'session', l.session, "
                   "'request', json(l.request), 'agent_id', l.agent_id, "
                   "'gpus', json((SELECT json_group_array(gpu_id) FROM "
                   "(SELECT gpu_id FROM lease_gpus WHERE lease_id = l.id ORDER BY gpu_id))), "
                   "'memory_per_gpu', coalesce((SELECT memory FROM lease_gpus WHERE lease_id = l.id "
                   "ORDER BY gpu_id DESC LIMIT 1), 0), "
                   f"'fraction', {num('l.fraction')}, 'granted_at', {num('l.granted_at')}, "
                   f"'expires_at', {num('l.expires_at')}, 'ended_at', {num('l.ended_at')}, "
                   "'end_reason', l.end_reason, 'label', l.label, 'borrowed', json(l.borrowed))")
            # A materialised page is read back in the order it was written (newest first).
            array = "json_group_array(json(j))"
        else:  # PostgreSQL writes doubles in their shortest exact form
            obj = ("json_build_object('id', l.id, 'state', l.state, 'user', l.\"user\", 'session', l.session, "
                   "'request', l.request::json, 'agent_id', l.agent_id, "
                   "'gpus', coalesce((SELECT json_agg(gpu_id ORDER BY gpu_id) FROM lease_gpus "
                   "WHERE lease_id = l.id), '[]'::json), "
                   "'memory_per_gpu', coalesce((SELECT memory FROM lease_gpus WHERE lease_id = l.id "
                   "ORDER BY gpu_id DESC LIMIT 1), 0), "
                   "'fraction', l.fraction, 'granted_at', l.granted_at, 'expires_at', l.expires_at, "
                   "'ended_at', l.ended_at, 'end_reason', l.end_reason, 'label', l.label, "
                   "'borrowed', l.borrowed::json)")
            array = "coalesce(json_agg(j ORDER BY c DESC, i DESC), '[]'::json)::text"
        sql = (f"WITH page AS MATERIALIZED (SELECT {obj} AS j, l.created_at AS c, l.id AS i FROM leases l "
               f"{'WHERE ' + ' AND '.join(where) if where else ''} ORDER BY l.created_at DESC, l.id DESC LIMIT ?) "
               f"SELECT (SELECT {array} FROM page), (SELECT count(*) FROM page), "
               "(SELECT c FROM page ORDER BY c, i LIMIT 1), (SELECT i FROM page ORDER BY c, i LIMIT 1)")
        text, n, c, i = self._run(conn, sql, (*params, limit)).fetchone()
        return text, n, ((c, i) if n else None)

    @staticmethod
    def _page_filter(user, state, session, before) -> tuple[list[str], list]:
        where, params = [], []
        if user is not None:
            where.append('l."user" = ?')
            params.append(user)
        if state is not None:
            where.append("l.state = ?")
            params.append(state)
        if session is not None:
            where.append("l.session = ?")
            params.append(session)
        if before is not None:
            where.append("(l.created_at < ? OR (l.created_at = ? AND l.id < ?))")
            params += [before[0], before[0], before[1]]
        return where, params

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


# The per-cell statements ("user" is quoted: it is a reserved word in PostgreSQL).
_LEASE_COLUMNS = ("id", "user", "session", "state", "request", "agent_id", "agent_incarnation", "fraction",
                  "created_at", "granted_at", "expires_at", "ended_at", "end_reason", "label", "borrowed")
_LEASE_SELECT = ", ".join(f'"{c}"' for c in _LEASE_COLUMNS)
_LEASE_SELECT_L = ", ".join(f'l."{c}"' for c in _LEASE_COLUMNS)
_GPUS_UP = (
    "SELECT g.id, g.agent_id, g.idx, g.uuid, g.model, g.memory, g.simulated, g.pool, g.mig, a.address, a.incarnation "
    "FROM gpus g JOIN agents a ON a.id = g.agent_id WHERE g.present = ? AND a.state = ? ORDER BY g.id"
)
_INVENTORY_VERSION = "SELECT version FROM inventory WHERE id = ?"
_INVENTORY_BUMP = "UPDATE inventory SET version = version + 1 WHERE id = ?"
_ACTIVE_ALLOCATIONS = (
    'SELECT lg.gpu_id, lg.memory, lg.lease_id, l."user", l.fraction FROM lease_gpus lg JOIN leases l ON l.id = lg.lease_id '
    "WHERE lg.active = ? AND l.expires_at >= ?"
)
_INSERT_LEASE = f"INSERT INTO leases ({_LEASE_SELECT}) VALUES ({', '.join('?' * len(_LEASE_COLUMNS))})"
_INSERT_SLOT = "INSERT INTO lease_gpus (lease_id, gpu_id, memory, active) VALUES (?, ?, ?, ?)"
_LEASE_BY_ID = f"SELECT {_LEASE_SELECT} FROM leases WHERE id = ?"
_END_ONE = "UPDATE leases SET state = ?, ended_at = ?, end_reason = ? WHERE id = ? AND state = ?"
_FREE_ONE = "UPDATE lease_gpus SET active = ? WHERE lease_id = ?"


class LeaseRow(NamedTuple):
    id: str
    user: str
    session: str
    state: str
    request: str
    agent_id: str
    agent_incarnation: str
    fraction: float
    created_at: float
    granted_at: float
    expires_at: float
    ended_at: float | None
    end_reason: str | None
    label: str
    borrowed: str | None  # JSON: the quota a borrowed lease is above, and the numbers


def now() -> float:
    return time.time()
from . import site_tables  # noqa: E402,F401  (registers the policy tables before create_all)
