"""A throwaway PostgreSQL server for tests: initdb + pg_ctl on a fresh folder, 127.0.0.1, a free port.

``initdb`` refuses to run as root, so as root the server runs as the ``postgres`` user on a folder
it owns. Yields None (and the caller skips, saying why) where PostgreSQL or psycopg is missing.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile


def _binary(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))[-1:]
    return found if isinstance(found, str) else (found[0] if found else None)


def missing() -> str | None:
    """Why a PostgreSQL test cannot run here, or None."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'psycopg[binary]')"
    if not (_binary("initdb") and _binary("pg_ctl")):
        return "PostgreSQL is not installed (apt-get install -y postgresql)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser, so initdb cannot run as the postgres user"
    return None


class PostgresServer:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="gpu-attach-pg-")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as:
            shutil.chown(self.dir, "postgres")
        data = os.path.join(self.dir, "data")
        self._run([_binary("initdb"), "-D", data, "-A", "trust", "-U", "postgres", "--no-sync"])
        self._run([_binary("pg_ctl"), "-D", data, "-w", "-l", os.path.join(self.dir, "log"), "-o",
                   f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off", "start"])
        self.data = data
        self._names = itertools.count()

    def _run(self, argv: list[str]) -> None:
        subprocess.run(self._as + argv, check=True, capture_output=True, timeout=60)

    def url(self, db: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{db}"

    def fresh_database(self) -> str:
        """A new empty database; its SQLAlchemy URL."""
        import psycopg

        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run([_binary("pg_ctl"), "-D", self.data, "-m", "immediate", "stop"])
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
