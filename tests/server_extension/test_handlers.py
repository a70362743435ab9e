"""Every /gpu-attach/api handler, against a real Jupyter Server (pytest-jupyter) and a real broker
and simulated agent (the ``site`` fixture): auth, the pool, leases with their notebooks, release,
attach and the errors that say what to do."""

from __future__ import annotations

import json
import re

import pytest
from tornado.httpclient import HTTPClientError

from tests.conftest import TOKENS

EXT = {"jupyter_gpu_attach.server_extension": True}
ENDPOINTS = [("GET", "info"), ("GET", "state"), ("GET", "pool"), ("GET", "leases"),
             ("DELETE", "leases/L0123456789ab"), ("POST", "attach")]


@pytest.fixture
def jp_server_config(site, alice_env):
    return {"ServerApp": {"jpserver_extensions": EXT},
            "GPUAttach": {"broker_url": site.url, "token": TOKENS["alice"], "refresh_interval": 1.0}}


def _json(response):
    return json.loads(response.body)


async def _fails(jp_fetch, *parts, **kwargs) -> tuple[int, dict]:
    with pytest.raises(HTTPClientError) as e:
        await jp_fetch(*parts, **kwargs)
    body = e.value.response.body if e.value.response is not None else b"{}"
    try:
        return e.value.code, json.loads(body)
    except ValueError:
        return e.value.code, {"raw": body[:200]}


@pytest.mark.parametrize("method,path", ENDPOINTS)
async def test_every_handler_refuses_a_request_without_credentials(jp_fetch, method, path):
    body = "{}" if method == "POST" else None
    code, _ = await _fails(jp_fetch, "gpu-attach", "api", *path.split("/"), method=method, body=body,
                           headers={"Authorization": "token not-the-server-token"}, follow_redirects=False)
    assert code in (401, 403), f"{method} {path} answered {code} to an unauthenticated request"


async def test_info_says_connected_and_never_shows_the_token(jp_fetch, site):
    r = await jp_fetch("gpu-attach", "api", "info")
    info = _json(r)
    assert info["connected"] is True and info["broker_url"] == site.url and info["embedded"] is False
    assert info["refresh_interval"] == 1.0
    assert TOKENS["alice"] not in r.body.decode()


async def test_pool_lists_the_simulated_gpu_with_history(jp_fetch):
    pool = _json(await jp_fetch("gpu-attach", "api", "pool"))
    assert pool["simulated"] is True
    assert [g["id"] for g in pool["gpus"]] == ["gpu-host-1/0", "gpu-host-1/1"]
    assert all(g["simulated"] and len(g["history"]) == 1 for g in pool["gpus"])


async def _kernel_session_id(jp_serverapp, kernel_id: str) -> str:
    """What the notebook's own kernel uses as its gpu-attach session id (real kernel, real code)."""
    kc = jp_serverapp.kernel_manager.get_kernel(kernel_id).client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        out = []
        reply = await kc.execute_interactive(
            "from jupyter_gpu_attach import connection; print(connection.get_session().session_id)",
            output_hook=lambda m: out.append(m["content"].get("text", "")), timeout=60)
        assert reply["content"]["status"] == "ok", reply["content"]
        return "".join(out).strip()
    finally:
        kc.stop_channels()


async def test_a_lease_shows_with_its_notebook_and_owner_then_release_ends_it(jp_fetch, jp_serverapp, site):
    # A real notebook session in this server: its kernel names its leases "k-<kernel id>.<pid>".
    r = await jp_fetch("api", "sessions", method="POST", body=json.dumps(
        {"path": "work/train.ipynb", "type": "notebook", "name": "train.ipynb", "kernel": {"name": "python3"}}))
    kernel_id = _json(r)["kernel"]["id"]
    session_id = await _kernel_session_id(jp_serverapp, kernel_id)
    assert re.fullmatch(rf"k-{kernel_id}\.\d+", session_id), session_id
    with site.client("alice") as c:
        lease = c.post("/v1/leases", json={"memory": "1GiB", "session": session_id, "label": "x = fit()"}).json()
    with site.client("bob") as c:
        bobs = c.post("/v1/leases", json={"memory": "2GiB", "session": "nb-bob", "label": "secret"}).json()
    try:
        leases = _json(await jp_fetch("gpu-attach", "api", "leases"))["leases"]
        assert [x["id"] for x in leases] == [lease["id"]], "only this user's leases are listed"
        mine = leases[0]
        assert mine["notebook"] == "work/train.ipynb" and mine["label"] == "x = fit()"
        assert mine["kernel_id"] == kernel_id and mine["state"] == "granted" and mine["age_s"] >= 0
        assert "token" not in mine

        state = _json(await jp_fetch("gpu-attach", "api", "state"))
        slices = {s["lease"]: s for g in state["pool"]["gpus"] for s in g["slices"]}
        assert slices[lease["id"]]["mine"] and slices[lease["id"]]["memory"] == 2**30
        assert not slices[bobs["id"]]["mine"] and slices[bobs["id"]]["label"] == "", "another user's label leaks"
        assert state["leases"][0]["id"] == lease["id"]

        r = await jp_fetch("gpu-attach", "api", "leases", lease["id"], method="DELETE")
        assert _json(r)["state"] == "released"
        assert _json(await jp_fetch("gpu-attach", "api", "leases"))["leases"] == []
        code, body = await _fails(jp_fetch, "gpu-attach", "api", "leases", bobs["id"], method="DELETE")
        assert code == 403 and "another user" in body["detail"]
    finally:
        with site.client("admin") as c:
            c.delete(f"/v1/leases/{bobs['id']}")
            c.delete(f"/v1/leases/{lease['id']}")


async def test_releasing_an_unknown_lease_is_404(jp_fetch):
    code, body = await _fails(jp_fetch, "gpu-attach", "api", "leases", "L000000000000", method="DELETE")
    assert code == 404 and "L000000000000" in body["detail"]


async def test_release_route_accepts_only_lease_ids(jp_fetch):
    code, _ = await _fails(jp_fetch, "gpu-attach", "api", "leases", "..%2F..%2Fv1%2Fpool", method="DELETE")
    assert code == 404


@pytest.mark.parametrize("body,line", [
    ({"memory": "2GiB"}, "%gpu attach --memory 2GiB"),
    ({"fraction": 0.25, "pool": "h100"}, "%gpu attach --fraction 0.25 --pool h100"),
    ({"gpus": 2}, "%gpu attach --gpus 2"),
])
async def test_attach_turns_a_request_into_the_magic_line(jp_fetch, body, line):
    r = _json(await jp_fetch("gpu-attach", "api", "attach", method="POST", body=json.dumps(body)))
    assert r["line"] == line and r["code"].endswith(line + "\n")


@pytest.mark.parametrize("body,word", [
    ({"memory": "2GiB", "gpus": 1}, "one"),
    ({"fraction": 3}, "fraction"),
    ({"memory": "2GiB; import os"}, "size"),
    ({"pool": "a b", "gpus": 1}, "pool"),
    ({"gpus": True}, "gpus"),
    ({"shell": "rm -rf /"}, "unknown"),
    ({}, "one of"),
])
async def test_attach_refuses_bad_requests_naming_the_field(jp_fetch, body, word):
    code, r = await _fails(jp_fetch, "gpu-attach", "api", "attach", method="POST", body=json.dumps(body))
    assert code == 400 and word in r["detail"].lower(), r


async def test_attach_refuses_a_large_body(jp_fetch):
    code, _ = await _fails(jp_fetch, "gpu-attach", "api", "attach", method="POST",
                           body=json.dumps({"memory": "1GiB", "pad": "x" * 10000}))
    assert code == 413
