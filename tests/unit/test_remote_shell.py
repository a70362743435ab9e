"""The sandbox's shell bookkeeping, in process: what changed, what travels, what stays, and that
nothing is left on the (stand-in) GPU between cells."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "server"))

from gpu_attach_server.agent.remote_shell import RemoteShell  # noqa: E402

from jupyter_gpu_attach import wire  # noqa: E402


class _Channel:
    def __init__(self):
        self.frames = []

    def output(self, header, buffers=()):
        self.frames.append(header)

    def ask(self, header):
        self.frames.append(header)
        return {"value": "typed"}


@pytest.fixture(scope="module")
def shell():
    s = RemoteShell(cache_bytes=1 << 20)
    s.channel = _Channel()
    return s


def _send(shell, values: dict):
    hashes, _ = wire.fingerprints(values, shell.ns)
    header = {"hashes": hashes, "cached": {}, "absent": [], "modules": {}}
    shell.superseded(header)
    return shell.apply_inputs(header, wire.loads(wire.dumps(values)), {})


def test_in_place_change_is_found_and_a_pure_read_is_not_rehashed(shell, monkeypatch):
    _send(shell, {"m": np.arange(10), "r": np.ones(3)})
    calls = []
    real = wire.fingerprint
    monkeypatch.setattr(wire, "fingerprint", lambda v, ns=None: calls.append(1) or real(v, ns))
    error, _, changed, inplace, _ = shell.run("m[m > 5] = 0\nx = float(r.sum())", 1, ["x"], ["m"], ["r"])
    assert error is None and inplace == ["m"] and set(changed) == {"m", "x"}
    assert len(calls) == 1, "r was only read: it must not be hashed again"


def test_a_view_of_a_pure_read_is_checked(shell):
    _send(shell, {"base": np.zeros(4)})
    error, _, changed, inplace, _ = shell.run("v = base[:2]\nv[0] = 9", 2, ["v"], [], ["base"])
    assert error is None and "base" in inplace and "v" in changed


def test_cache_hands_out_a_value_only_when_no_name_holds_it(shell):
    value = np.arange(100.0)
    _send(shell, {"c1": value})
    digest = shell.hashes["c1"]
    missing = shell.apply_inputs({"cached": {"c2": digest}}, {}, {})
    assert missing == ["c2"], "c1 still holds that object: sharing it would alias two names"
    shell.ns.pop("c1")
    shell.hashes.pop("c1")
    assert shell.apply_inputs({"cached": {"c2": digest}}, {}, {}) == []
    assert shell.ns["c2"] is value or np.array_equal(shell.ns["c2"], value)


def test_unpicklable_values_stay_and_modules_go_by_name(shell):
    shell.run("import json\nimport threading\nlk = threading.Lock()\nn = 5", 3, ["json", "threading", "lk", "n"], [])
    header, buffers, stays = shell.collect(["json", "lk", "n"])
    assert header["modules"] == {"json": "json"} and "lk" in stays and header["values"] == ["n"]
    assert wire.loads(buffers) == {"n": 5}


def test_input_goes_to_the_notebook(shell):
    shell.run("answer = input('name? ')", 4, ["answer"], [])
    assert shell.ns["answer"] == "typed"
    assert shell.channel.frames[-1]["op"] == "input_request"


def test_device_values_are_parked_between_cells(shell, monkeypatch):
    """With a stand-in for CuPy: after a cell, nothing bound is a device array; the next cell that
    uses it gets a device array again, and two names for one array stay one array."""
    class DeviceArray:
        def __init__(self, host):
            self.host = host

        def get(self):
            return self.host.copy()

    fake = types.ModuleType("cupy")
    fake.ndarray = DeviceArray
    fake.asarray = lambda host: DeviceArray(np.asarray(host))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    d = DeviceArray(np.arange(5.0))
    shell.ns.update(d=d, alias=d)
    assert shell.park() == ["alias", "d"]
    assert type(shell.ns["d"]) is np.ndarray and shell.ns["d"] is shell.ns["alias"]
    shell.unpark(["d", "alias"])
    assert isinstance(shell.ns["d"], DeviceArray) and shell.ns["d"] is shell.ns["alias"]
    np.testing.assert_array_equal(shell.ns["d"].host, np.arange(5.0))
    assert shell.parked == {}
    shell.ns.pop("d"), shell.ns.pop("alias")


def test_a_returned_device_value_leaves_the_gpu_with_the_namespace(shell, monkeypatch):
    """collect() keeps what a cell returns in the value cache, by content, for a later cell that
    sends it back. Parking must not leave the device array there: on a real GPU that held the
    array's memory between cells (found by `pytest -m gpu` on an H200)."""
    import gc
    import weakref

    ndarray = type("ndarray", (), {"__module__": "cupy", "__init__": lambda self, host: setattr(self, "host", host),
                                   "get": lambda self: self.host.copy()})
    fake = types.ModuleType("cupy")
    fake.ndarray = ndarray
    fake.asarray = lambda host: ndarray(np.asarray(host))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    d = ndarray(np.arange(5.0))
    on_gpu = weakref.ref(d)
    shell.ns.update(keep=d, alias=d)
    del d
    header, _buffers, stays = shell.collect(["keep", "alias"])
    assert set(header["values"]) == {"keep", "alias"} and not stays  # sent home, and cached
    assert shell.park() == ["alias", "keep"]
    gc.collect()
    assert on_gpu() is None, "a parked device array is still held (by the value cache)"
    assert shell.ns["keep"] is shell.ns["alias"] and type(shell.ns["keep"]) is np.ndarray
    shell.unpark(["keep", "alias"])  # and it comes back as one device array
    assert isinstance(shell.ns["keep"], ndarray) and shell.ns["keep"] is shell.ns["alias"]
    shell.ns.pop("keep"), shell.ns.pop("alias")
