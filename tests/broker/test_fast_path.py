"""The per-cell fast path (broker/fast_path.py) answers exactly as the FastAPI routes do.

Each request is sent twice to the broker's real app (real SQLite, real signer, in process over
ASGI): once as a client normally sends it, which the fast path answers, and once with a chunked
body, which the fast path hands to FastAPI. The two answers must agree; and what the fast path
must leave to FastAPI (no token, an agent's token, a bad body) must reach it.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from gpu_attach_server.broker import fast_path
from gpu_attach_server.broker.app import create_app
from gpu_attach_server.broker.auth import TokenBook
from gpu_attach_server.broker.core import Broker
from gpu_attach_server.broker.store import Store, make_engine
from gpu_attach_server.grant_tokens import GrantSigner

ALICE, BOB, ADMIN, AGENT = ("alice-token-0123456789abcdef", "bob-token-0123456789abcdef",
                            "admin-token-0123456789abcdef", "agent-h1-token-0123456789abcdef")


@pytest.fixture
def app(tmp_path):
    broker = Broker(Store(make_engine(str(tmp_path / "b.sqlite"))), GrantSigner.from_file(tmp_path / "k.pem"))
    broker.register_agent("h1", "127.0.0.1:1", [
        {"index": i, "uuid": f"GPU-{i}", "model": "Sim", "memory": 16 << 30, "simulated": True} for i in range(2)], "t")
    return create_app(broker, TokenBook({"alice": ALICE, "bob": BOB}, ADMIN, agents={"h1": AGENT}))


@pytest.fixture
def fast_answers(monkeypatch):
    """How many requests the fast path answered itself."""
    seen = []
    real = fast_path.respond

    def counted(call):
        seen.append(1)
        return real(call)

    monkeypatch.setattr(fast_path, "respond", counted)
    return seen


def call(app, method, path, token=None, json=None, chunked=False, content=None, headers=None):
    """One request to ``app``; ``chunked`` sends the body without a length (the FastAPI way)."""
    async def go():
        h = dict(headers or {})
        if token:
            h["Authorization"] = f"Bearer {token}"
        body = content
        if json is not None:
            body = httpx.Request("POST", "http://x", json=json).content
            h["Content-Type"] = "application/json"
        if chunked:
            async def chunks(data=body or b""):
                yield data
            body = chunks()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://broker") as c:
            return await c.request(method, path, content=body, headers=h)
    return asyncio.run(go())


def shape(x):
    """The structure of a JSON value: keys and types, not the values that differ per lease."""
    if isinstance(x, dict):
        return {k: shape(v) for k, v in x.items()}
    if isinstance(x, list):
        return [shape(v) for v in x]
    return type(x).__name__


STABLE = ("state", "user", "session", "agent", "gpus", "memory_per_gpu", "fraction", "simulated", "ttl_s")


def test_grants_renewals_and_releases_answer_the_same_both_ways(app, fast_answers):
    fast = call(app, "POST", "/v1/leases", ALICE, {"session": "s1", "fraction": 0.5, "label": "cell 3"})
    assert fast_answers == [1]
    slow = call(app, "POST", "/v1/leases", ALICE, {"session": "s1", "fraction": 0.5, "label": "cell 3"}, chunked=True)
    assert fast_answers == [1], "a chunked body must go to FastAPI"
    assert fast.status_code == slow.status_code == 201
    assert fast.headers["content-type"] == slow.headers["content-type"] == "application/json"
    a, b = fast.json(), slow.json()
    assert shape(a) == shape(b)
    assert {k: a[k] for k in STABLE} == {k: b[k] for k in STABLE}
    assert a["id"] != b["id"] and a["token"] != b["token"]

    # Renew: fast (no body) and by FastAPI (a chunked empty body).
    r1 = call(app, "POST", f"/v1/leases/{a['id']}/renew", ALICE)
    r2 = call(app, "POST", f"/v1/leases/{b['id']}/renew", ALICE, chunked=True, content=b"")
    assert len(fast_answers) == 2
    assert r1.status_code == r2.status_code == 200 and shape(r1.json()) == shape(r2.json())

    # Someone else's lease: the same 403, word for word.
    f, s = call(app, "DELETE", f"/v1/leases/{a['id']}", BOB), call(app, "DELETE", f"/v1/leases/{a['id']}", BOB, chunked=True, content=b"")
    assert f.status_code == s.status_code == 403 and f.json() == s.json()
    # Released by its owner, each way; then released again, and renewed once ended.
    f, s = call(app, "DELETE", f"/v1/leases/{a['id']}", ALICE), call(app, "DELETE", f"/v1/leases/{b['id']}", ALICE, chunked=True, content=b"")
    assert f.status_code == s.status_code == 200
    assert {k: v for k, v in f.json().items() if k not in ("id", "ended_at")} == {
        k: v for k, v in s.json().items() if k not in ("id", "ended_at")}
    f, s = call(app, "DELETE", f"/v1/leases/{a['id']}", ALICE), call(app, "DELETE", f"/v1/leases/{a['id']}", ALICE, chunked=True, content=b"")
    assert f.json() == s.json() and f.json()["state"] == "released"
    f, s = call(app, "POST", f"/v1/leases/{a['id']}/renew", ALICE), call(app, "POST", f"/v1/leases/{a['id']}/renew", ALICE, chunked=True, content=b"")
    assert f.status_code == s.status_code == 409 and f.json() == s.json()
    # No such lease.
    f, s = call(app, "DELETE", "/v1/leases/L0123456789ab", ALICE), call(app, "DELETE", "/v1/leases/L0123456789ab", ALICE, chunked=True, content=b"")
    assert f.status_code == s.status_code == 404 and f.json() == s.json()
    assert len(fast_answers) == 7


def test_refusals_of_the_pool_answer_the_same_both_ways(app, fast_answers):
    held = [call(app, "POST", "/v1/leases", ALICE, {"session": "s", "gpus": 1}).json()["id"] for _ in range(2)]
    f = call(app, "POST", "/v1/leases", BOB, {"session": "b", "gpus": 1})
    s = call(app, "POST", "/v1/leases", BOB, {"session": "b", "gpus": 1}, chunked=True)
    assert f.status_code == s.status_code == 409 and f.json() == s.json() and f.json()["reason"] == "busy"
    f = call(app, "POST", "/v1/leases", BOB, {"session": "b", "gpus": 3})
    s = call(app, "POST", "/v1/leases", BOB, {"session": "b", "gpus": 3}, chunked=True)
    assert f.status_code == s.status_code == 409 and f.json() == s.json() and f.json()["reason"] == "too_large"
    # Queued, then cancelled by its owner.
    q = call(app, "POST", "/v1/leases", BOB, {"session": "b", "gpus": 1, "wait_s": 30})
    assert q.status_code == 202 and q.json()["state"] == "queued" and q.json()["position"] == 1
    c = call(app, "DELETE", f"/v1/leases/{q.json()['id']}", BOB)
    assert c.status_code == 200 and c.json()["state"] == "cancelled"
    for lid in held:
        call(app, "DELETE", f"/v1/leases/{lid}", ALICE)
    assert len(fast_answers) == 8


@pytest.mark.parametrize("case", [
    dict(token=None, json={"session": "s", "fraction": 0.5}),                      # no token: 401
    dict(token="not-a-token-0123456789abcdef", json={"session": "s", "fraction": 0.5}),  # unknown: 401
    dict(token=AGENT, json={"session": "s", "fraction": 0.5}),                     # an agent's: 403
    dict(token=ALICE, json={"session": "s", "fraction": -0.5}),                    # out of range: 422
    dict(token=ALICE, json={"session": "s", "gpus": 0}),
    dict(token=ALICE, json={"session": "s", "gpus": 10**9}),
    dict(token=ALICE, json={"session": "s", "gpus": 1, "fraction": 0.5}),          # two sizes
    dict(token=ALICE, json={"session": "s", "fraction": 0.5, "colour": "red"}),    # unknown field
    dict(token=ALICE, json={"fraction": 0.5}),                                     # no session
    dict(token=ALICE, json=["session", "s"]),                                      # not an object
    dict(token=ALICE, content=b'{"session": "s", "fraction": 0.5', headers={"Content-Type": "application/json"}),
    dict(token=ALICE, content=b'{"session": "s", "fraction": NaN}', headers={"Content-Type": "application/json"}),
    dict(token=ALICE, content=b"session=s", headers={"Content-Type": "application/x-www-form-urlencoded"}),
])
def test_what_the_fast_path_does_not_answer_reaches_fastapi_unchanged(app, fast_answers, case):
    r = call(app, "POST", "/v1/leases", **case)
    s = call(app, "POST", "/v1/leases", chunked=True, **case)
    assert fast_answers == [], "the fast path answered a request it must leave to FastAPI"
    assert r.status_code == s.status_code and r.status_code in (401, 403, 422)
    assert r.json() == s.json()
    if r.status_code == 401:
        assert r.headers["www-authenticate"] == "Bearer"


def test_an_oversized_body_is_refused_by_the_body_limit(app, fast_answers):
    big = {"session": "s", "fraction": 0.5, "label": "x" * (2 << 20)}
    r = call(app, "POST", "/v1/leases", ALICE, big)
    assert r.status_code == 413 and fast_answers == []


def test_a_user_token_may_not_release_with_the_wrong_method_or_path(app, fast_answers):
    lid = call(app, "POST", "/v1/leases", ALICE, {"session": "s", "fraction": 0.5}).json()["id"]
    assert call(app, "DELETE", f"/v1/leases/{lid}/renew", ALICE).status_code == 405
    assert call(app, "DELETE", f"/v1/leases/{lid}x", ALICE).status_code == 422
    assert call(app, "DELETE", f"/v1/leases/{lid}", AGENT).status_code == 403
    assert call(app, "DELETE", f"/v1/leases/{lid}").status_code == 401
    assert fast_answers == [1]
    assert call(app, "DELETE", f"/v1/leases/{lid}", ALICE).json()["state"] == "released"


def test_a_failing_handler_answers_500_both_ways_and_is_logged(app, fast_answers, monkeypatch, caplog):
    """The fast path sits in front of FastAPI's error middleware, so it answers a bug itself, as
    Starlette does: 500, "Internal Server Error", nothing of the exception in the body."""
    def broken(*a, **k):
        raise RuntimeError("secret detail of a bug")
    monkeypatch.setattr(app.fast_path.calls, "grant", broken)
    with caplog.at_level("ERROR", logger="gpu_attach.broker"):
        r = call(app, "POST", "/v1/leases", ALICE, {"session": "s", "fraction": 0.5})
    assert fast_answers == [1]
    assert r.status_code == 500 and r.text == "Internal Server Error"
    assert r.headers["content-type"].startswith("text/plain")
    assert "secret detail of a bug" in caplog.text and "secret" not in r.text
    # The FastAPI route shares the same handler: the same answer (Starlette's), by the other way.
    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://broker") as c:
            async def chunks():
                yield b'{"session": "s", "fraction": 0.5}'
            return await c.post("/v1/leases", content=chunks(), headers={
                "Authorization": f"Bearer {ALICE}", "Content-Type": "application/json"})
    s = asyncio.run(go())
    assert s.status_code == 500 and s.text == r.text
