"""The broker's own HTTP protocol (fast_path.http_protocol) answers over a real socket exactly as
FastAPI does, and keeps HTTP's rules: keep-alive, pipelined requests in order, Expect:
100-continue, Connection: close, bodies that are not lease requests.

Each request is sent as raw bytes to a real ``gpu-attach broker --port 0``; a twin with a chunked
body (which the fast path never takes) gives FastAPI's answer to compare with.
"""

from __future__ import annotations

import json
import socket

import pytest

from broker_site import TOKENS, BrokerSite


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    s = BrokerSite(tmp_path_factory.mktemp("fasthttp"), "--agent-timeout", "3600")
    s.register_fake_agent("h1", gpus=2)
    yield s
    s.stop()


class Conn:
    """One kept-alive connection; requests as bytes, answers parsed by hand (status, headers, body)."""

    def __init__(self, url: str):
        host, port = url.split("//")[1].split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        more = self.sock.recv(65536)
        if not more:
            raise ConnectionError("closed by the broker")
        self.buf += more

    def answer(self) -> tuple[int, dict, bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:])}
        n = int(headers.get("content-length", 0))
        while len(self.buf) < n:
            self._fill()
        body, self.buf = self.buf[:n], self.buf[n:]
        return status, headers, body

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionError, socket.timeout):
            return False

    def close(self) -> None:
        self.sock.close()


def request(method: str, path: str, who: str | None = "alice", body: dict | bytes | None = None,
            chunked: bool = False, extra: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: broker\r\n{extra}"
    if who:
        head += f"Authorization: Bearer {TOKENS[who]}\r\n"
    data = b""
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        head += "Content-Type: application/json\r\n"
    if chunked:
        head += "Transfer-Encoding: chunked\r\n\r\n"
        return head.encode() + (b"%x\r\n%s\r\n" % (len(data), data) if data else b"") + b"0\r\n\r\n"
    return head.encode() + f"Content-Length: {len(data)}\r\n\r\n".encode() + data


def both(site, method, path, who="alice", body=None, extra=""):
    """(fast answer, FastAPI answer) for the same request."""
    c = Conn(site.url)
    try:
        c.send(request(method, path, who, body, extra=extra))
        fast = c.answer()
        c.send(request(method, path, who, body, chunked=True, extra=extra))
        slow = c.answer()
        return fast, slow
    finally:
        c.close()


def test_grant_renew_release_answer_as_fastapi_does_on_one_kept_alive_connection(site):
    c = Conn(site.url)
    c.send(request("POST", "/v1/leases", body={"session": "s1", "fraction": 0.5, "label": "cell 1"}))
    status, headers, body = c.answer()
    assert status == 201, body
    assert headers["content-type"] == "application/json" and "date" in headers
    lease = json.loads(body)
    c.send(request("POST", "/v1/leases", body={"session": "s1", "fraction": 0.5, "label": "cell 1"}, chunked=True))
    s2, h2, b2 = c.answer()
    twin = json.loads(b2)
    assert s2 == 201 and set(lease) == set(twin)
    assert {k: lease[k] for k in ("state", "user", "session", "fraction", "memory_per_gpu", "simulated")} == {
        k: twin[k] for k in ("state", "user", "session", "fraction", "memory_per_gpu", "simulated")}
    assert set(headers) == set(h2)
    # Renew, then release, each fast; then the same on FastAPI (a chunked empty body).
    c.send(request("POST", f"/v1/leases/{lease['id']}/renew"))
    s, _, b = c.answer()
    assert s == 200 and json.loads(b)["state"] == "granted"
    c.send(request("DELETE", f"/v1/leases/{lease['id']}"))
    s, _, b = c.answer()
    assert s == 200 and json.loads(b)["state"] == "released"
    c.send(request("DELETE", f"/v1/leases/{twin['id']}", body=b"", chunked=True))
    s, _, b = c.answer()
    assert s == 200 and json.loads(b)["state"] == "released"
    # And an ordinary FastAPI route on the same connection afterwards.
    c.send(b"GET /healthz HTTP/1.1\r\nHost: broker\r\n\r\n")
    assert c.answer()[0] == 200
    c.close()


@pytest.mark.parametrize("case", [
    ("DELETE", "/v1/leases/L0123456789ab", "alice", None),                    # no such lease: 404
    ("POST", "/v1/leases/L0123456789ab/renew", "alice", None),
    ("POST", "/v1/leases", "alice", {"session": "s", "gpus": 3}),               # never fits: 409
    ("POST", "/v1/leases", "alice", {"session": "s", "fraction": -1}),          # invalid: 422 (replayed)
    ("POST", "/v1/leases", "alice", {"session": "s", "fraction": 0.5, "colour": "red"}),
    ("POST", "/v1/leases", "alice", b'{"session": "s", "fraction": 0.5'),       # not JSON: 422
    ("POST", "/v1/leases", "agent", {"session": "s", "fraction": 0.5}),         # an agent's token: 403
    ("POST", "/v1/leases", None, {"session": "s", "fraction": 0.5}),            # none: 401
])
def test_refusals_are_fastapis_word_for_word(site, case):
    method, path, who, body = case
    (fs, fh, fb), (ss, sh, sb) = both(site, method, path, who, body)
    assert fs == ss and fs in (401, 403, 404, 409, 422), fb
    assert json.loads(fb) == json.loads(sb)
    assert fh["content-type"] == sh["content-type"]
    assert fh.get("www-authenticate") == sh.get("www-authenticate")


def test_someone_elses_lease_is_refused_and_left_alone(site):
    with site.client("alice") as a:
        lease = a.post("/v1/leases", json={"session": "s", "fraction": 0.25}).json()
    (fs, _, fb), (ss, _, sb) = both(site, "DELETE", f"/v1/leases/{lease['id']}", "bob")
    assert fs == ss == 403 and json.loads(fb) == json.loads(sb)
    with site.client("alice") as a:
        assert a.get(f"/v1/leases/{lease['id']}").json()["state"] == "granted"
        a.delete(f"/v1/leases/{lease['id']}")


def test_pipelined_requests_are_answered_in_order(site):
    c = Conn(site.url)
    # A slow request (FastAPI) followed at once by two fast ones, in one write.
    c.send(request("GET", "/v1/leases?limit=5", body=None) + request("POST", "/v1/leases", body={
        "session": "p", "fraction": 0.1}) + request("DELETE", "/v1/leases/L0123456789ab"))
    first, second, third = c.answer(), c.answer(), c.answer()
    assert first[0] == 200 and "leases" in json.loads(first[2])
    assert second[0] == 201 and json.loads(second[2])["state"] == "granted"
    assert third[0] == 404
    c.send(request("DELETE", f"/v1/leases/{json.loads(second[2])['id']}"))
    assert c.answer()[0] == 200
    c.close()


def test_expect_100_continue_and_connection_close_are_honoured(site):
    c = Conn(site.url)
    body = json.dumps({"session": "e", "fraction": 0.1}).encode()
    head = (f"POST /v1/leases HTTP/1.1\r\nHost: broker\r\nAuthorization: Bearer {TOKENS['alice']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n").encode()
    c.send(head)
    status, _, _ = c.answer()  # the interim answer: send the body
    assert status == 100
    c.send(body)
    status, _, lease = c.answer()
    assert status == 201
    c.send(request("DELETE", f"/v1/leases/{json.loads(lease)['id']}", extra="Connection: close\r\n"))
    status, headers, _ = c.answer()
    assert status == 200 and headers.get("connection") == "close"
    assert c.closed()
    c.close()


def test_the_fast_protocol_is_the_one_this_uvicorn_gets():
    """http_protocol falls back to uvicorn's own protocol when uvicorn's parser callbacks are not
    the ones it overrides: correct, but slower. This fails when that happens, so an upgrade that
    turns the fast path off is noticed (the pipelining test shows the broker above runs it)."""
    from gpu_attach_server.broker.fast_path import FastPath, http_protocol

    assert http_protocol(FastPath(None, None)).__name__ == "FastHttpProtocol"
