"""The broker core's tests (tests/unit/test_broker_core.py), the queue and quota scenarios
(test_queue.py) and the session registry's (tests/unit/test_sessions.py), run again on a real
PostgreSQL server: the store claims to support it."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

import pg_server
from gpu_attach_server.broker.core import Broker, BrokerSettings
from gpu_attach_server.broker.store import Store, make_engine
from gpu_attach_server.grant_tokens import GrantSigner

WHY = pg_server.missing()
# A developer's machine without PostgreSQL skips these; CI installs it (.ci/run), so there a
# missing server is a failure, not a quiet skip.
pytestmark = pytest.mark.skipif(WHY is not None and not os.environ.get("CI"), reason=f"no PostgreSQL here: {WHY}")


def test_postgresql_is_here():
    assert WHY is None, f"no PostgreSQL here: {WHY} (.ci/run installs it with apt)"

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def pg():
    server = pg_server.PostgresServer()
    yield server
    server.stop()


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


_core = _load("_pg_test_broker_core", HERE.parent / "unit" / "test_broker_core.py")
_queue = _load("_pg_test_queue", HERE / "test_queue.py")
_sessions = _load("_pg_test_sessions", HERE.parent / "unit" / "test_sessions.py")
_engines = []


@pytest.fixture(autouse=True)
def _on_postgres(pg, monkeypatch):
    """Point both copied modules' brokers at a fresh PostgreSQL database per broker."""

    def make_broker(tmp_path, **settings) -> Broker:
        engine = make_engine(pg.fresh_database())
        _engines.append(engine)
        return Broker(Store(engine), GrantSigner.generate(), BrokerSettings(**settings))

    monkeypatch.setattr(_core, "make_broker", make_broker)
    monkeypatch.setattr(_queue, "make_engine", lambda _path: _engines.append(make_engine(pg.fresh_database())) or _engines[-1])
    monkeypatch.setattr(_sessions, "make_store", lambda _path: Store(_engines.append(make_engine(pg.fresh_database())) or _engines[-1]))
    yield
    while _engines:
        _engines.pop().dispose()


# The copied tests and their fixtures, collected here under the PostgreSQL fixture above.
for _mod in (_core, _queue, _sessions):
    for _name, _obj in vars(_mod).items():
        if _name.startswith("test_") or _name in ("broker", "make", "replicas"):
            assert _name not in globals(), f"two copied tests are named {_name}"
            globals()[_name] = _obj


def test_the_copies_really_run_on_postgresql(broker):
    assert broker.store.engine.dialect.name == "postgresql"
    assert not broker.store.is_sqlite


def test_the_session_copies_really_run_on_postgresql(replicas):
    assert replicas[0].store.engine.dialect.name == "postgresql"
