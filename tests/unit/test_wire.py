"""Unit tests for jupyter_gpu_attach.wire: frames over a socket pair and value serialisation."""

import json
import pickle
import socket
import struct
import threading

import numpy as np
import pytest

from jupyter_gpu_attach import wire
from jupyter_gpu_attach.wire import Frame, Limits, PeerClosed, WireError, recv_frame, send_frame


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    yield a, b
    a.close()
    b.close()


def _raw_frame(header_bytes: bytes, sizes: list[int], magic: bytes = wire.MAGIC) -> bytes:
    prefix = struct.pack("<4sII", magic, len(header_bytes), len(sizes))
    return prefix + b"".join(struct.pack("<Q", s) for s in sizes) + header_bytes


def _send_in_thread(sock, header, buffers):
    errors = []

    def run():
        try:
            send_frame(sock, header, buffers)
        except Exception as e:  # pragma: no cover - reported by the assert below
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, errors


# -- frames ---------------------------------------------------------------------------------


def test_frame_header_only(pair):
    a, b = pair
    n = send_frame(a, {"op": "hello", "token": "t", "n": 3})
    f = recv_frame(b)
    assert isinstance(f, Frame)
    assert f.header == {"op": "hello", "token": "t", "n": 3}
    assert f.op == "hello"
    assert f.buffers == []
    assert n == 12 + len(json.dumps(f.header, separators=(",", ":")))


def test_frame_op_defaults_to_empty():
    assert Frame({"x": 1}).op == ""


def test_frame_with_several_buffers(pair):
    a, b = pair
    bufs = [b"abc", bytearray(b"\x00\x01\x02\x03"), memoryview(b"xyz" * 10), b""]
    send_frame(a, {"op": "run", "k": [1, 2]}, bufs)
    f = recv_frame(b)
    assert f.header == {"op": "run", "k": [1, 2]}
    assert [bytes(x) for x in f.buffers] == [b"abc", b"\x00\x01\x02\x03", b"xyz" * 10, b""]


def test_frames_back_to_back_stay_separate(pair):
    a, b = pair
    send_frame(a, {"op": "one"}, [b"1" * 10])
    send_frame(a, {"op": "two"}, [])
    send_frame(a, {"op": "three"}, [b"33", b"333"])
    assert recv_frame(b).op == "one"
    f2 = recv_frame(b)
    assert (f2.op, f2.buffers) == ("two", [])
    f3 = recv_frame(b)
    assert [bytes(x) for x in f3.buffers] == [b"33", b"333"]


def test_multi_megabyte_numpy_buffer(pair):
    a, b = pair
    arr = np.random.default_rng(0).standard_normal(1_000_000)  # 8 MB, larger than the socket buffer
    t, errors = _send_in_thread(a, {"op": "value", "shape": list(arr.shape)}, [b"small", arr])
    f = recv_frame(b)
    t.join(10)
    assert not errors
    assert f.header["shape"] == [1_000_000]
    assert bytes(f.buffers[0]) == b"small"
    assert len(f.buffers[1]) == arr.nbytes
    got = np.frombuffer(f.buffers[1], dtype=arr.dtype)
    np.testing.assert_array_equal(got, arr)


def test_send_frame_returns_bytes_written(pair):
    a, b = pair
    n = send_frame(a, {"op": "x"}, [b"12345", b"678"])
    head = json.dumps({"op": "x"}, separators=(",", ":")).encode()
    assert n == 12 + 2 * 8 + len(head) + 8
    recv_frame(b)


def test_header_over_limit_rejected(pair):
    a, b = pair
    send_frame(a, {"op": "x", "pad": "y" * 200})
    with pytest.raises(WireError, match="header of .* over the limit of 100"):
        recv_frame(b, Limits(max_header_bytes=100))


def test_too_many_buffers_rejected(pair):
    a, b = pair
    send_frame(a, {"op": "x"}, [b"a"] * 5)
    with pytest.raises(WireError, match="5 buffers, over the limit of 4"):
        recv_frame(b, Limits(max_buffers=4))


def test_payload_over_limit_rejected_and_names_the_fix(pair):
    a, b = pair
    send_frame(a, {"op": "x"}, [b"a" * 60, b"b" * 60])
    with pytest.raises(WireError) as e:
        recv_frame(b, Limits(max_payload_bytes=100))
    assert "120 bytes" in str(e.value) and "limit of 100" in str(e.value)
    assert "--max-payload" in str(e.value)


def test_limits_at_exact_bound_accepted(pair):
    a, b = pair
    send_frame(a, {"op": "x"}, [b"a" * 50, b"b" * 50])
    head_len = len(json.dumps({"op": "x"}, separators=(",", ":")))
    f = recv_frame(b, Limits(max_header_bytes=head_len, max_buffers=2, max_payload_bytes=100))
    assert [len(x) for x in f.buffers] == [50, 50]


def test_limit_checked_before_reading_payload(pair):
    # A hostile prefix that announces a huge payload is refused without allocating it.
    a, b = pair
    a.sendall(_raw_frame(b"{}", [1 << 40]))
    with pytest.raises(WireError, match="over the limit"):
        recv_frame(b, Limits(max_payload_bytes=1 << 20))


def test_bad_magic_rejected(pair):
    a, b = pair
    a.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(WireError, match="bad magic") as e:
        recv_frame(b)
    assert not isinstance(e.value, PeerClosed)


def test_header_not_json_rejected(pair):
    a, b = pair
    a.sendall(_raw_frame(b"{not json", []))
    with pytest.raises(WireError, match="not JSON"):
        recv_frame(b)


def test_header_not_object_rejected(pair):
    a, b = pair
    a.sendall(_raw_frame(b"[1,2]", []))
    with pytest.raises(WireError, match="JSON object"):
        recv_frame(b)


def test_peer_closed_between_frames(pair):
    a, b = pair
    a.close()
    with pytest.raises(PeerClosed):
        recv_frame(b)


def test_peer_closed_mid_prefix(pair):
    a, b = pair
    a.sendall(wire.MAGIC + b"\x05")
    a.close()
    with pytest.raises(PeerClosed):
        recv_frame(b)


def test_peer_closed_mid_buffer(pair):
    a, b = pair
    a.sendall(_raw_frame(b'{"op":"x"}', [100]) + b"z" * 40)
    a.close()
    with pytest.raises(PeerClosed, match="40 of 100"):
        recv_frame(b)


def test_peer_closed_is_a_wire_error():
    assert issubclass(PeerClosed, WireError)


# -- values ---------------------------------------------------------------------------------


def test_numpy_array_travels_out_of_band():
    arr = np.arange(1_000_000, dtype=np.float64)
    parts = wire.dumps(arr)
    assert len(parts) > 1
    # The pickle stream is tiny: the 8 MB of data is not in it.
    assert len(parts[0]) < 1024
    assert sum(memoryview(p).nbytes for p in parts[1:]) == arr.nbytes
    back = wire.loads(parts)
    assert back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


def test_out_of_band_array_survives_the_socket(pair):
    a, b = pair
    value = {"x": np.linspace(0, 1, 300_000).reshape(600, 500), "label": "ok", "n": 3}
    parts = wire.dumps(value)
    t, errors = _send_in_thread(a, {"op": "value"}, parts)
    f = recv_frame(b)
    t.join(10)
    assert not errors
    back = wire.loads(f.buffers)
    assert back["label"] == "ok" and back["n"] == 3
    np.testing.assert_array_equal(back["x"], value["x"])


def test_fortran_order_and_non_contiguous_arrays_round_trip():
    f = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    back = wire.loads(wire.dumps(f))
    np.testing.assert_array_equal(back, f)
    strided = np.arange(40)[::3]
    np.testing.assert_array_equal(wire.loads(wire.dumps(strided)), strided)


def test_plain_values_round_trip():
    value = {"a": [1, 2.5, "s", None], "b": (b"bytes", {3, 4}), "c": True}
    assert wire.loads(wire.dumps(value)) == value


def test_notebook_function_travels_by_value():
    k = 7

    def f(x):
        return x * k

    g = wire.loads(wire.dumps(f))
    assert g(6) == 42


def test_loads_of_nothing_is_a_wire_error():
    with pytest.raises(WireError):
        wire.loads([])


def test_fingerprints_name_what_cannot_travel():
    lock = threading.Lock()
    hashes, failures = wire.fingerprints({"good": np.arange(5), "bad": lock, "also_good": "text"})
    assert set(failures) == {"bad"} and set(hashes) == {"good", "also_good"}
    assert "lock" in failures["bad"].lower() and "cannot be serialised" in failures["bad"]


def test_fingerprint_follows_content_not_identity():
    a = np.arange(1000.0)
    assert wire.fingerprint(a) == wire.fingerprint(a.copy())
    before = wire.fingerprint(a)
    a[500] = -1  # one element changed in place
    assert wire.fingerprint(a) != before
    assert wire.fingerprint([1, 2]) != wire.fingerprint([1, 2, 3])


def test_fingerprint_survives_a_round_trip():
    # What the sandbox hashes is what the notebook hashes after loading it (no memo artefacts).
    value = {"df_like": [("a", "a"), ("b", 1.5)], "arr": np.ones(10), "s": "text"}
    assert wire.fingerprint(wire.loads(wire.dumps(value))) == wire.fingerprint(value)


def test_values_travel_together_so_aliases_survive(pair):
    a, b = pair
    arr = np.ones((100, 100), dtype=np.float32)
    values = {"arr": arr, "alias": arr, "l": [arr], "n": 5}
    t, errors = _send_in_thread(a, {"op": "result"}, wire.dumps(values))
    f = recv_frame(b)
    t.join(10)
    assert not errors
    back = wire.loads(f.buffers)
    assert back["arr"] is back["alias"] is back["l"][0]
    np.testing.assert_array_equal(back["arr"], arr)


def test_notebook_functions_read_the_receiving_namespace():
    sender = {"__name__": "__main__"}
    exec("X = 1\ndef f():\n    return X\nclass C:\n    def m(self):\n        return X\n", sender)
    receiver = {"X": 41}
    back = wire.loads(wire.dumps({"f": sender["f"], "C": sender["C"]}, sender), receiver)
    assert back["f"].__globals__ is receiver
    receiver["X"] = 42
    assert back["f"]() == 42 and back["C"]().m() == 42  # not the sender's X, captured when sent


def test_modules_travel_by_name():
    import json as json_module

    plain, mods = wire.split_modules({"j": json_module, "x": 1})
    assert plain == {"x": 1} and mods == {"j": "json"}
    failures = {}
    loaded = wire.load_modules({"j": "json", "nope": "no_such_module_here"}, failures)
    assert loaded == {"j": json_module} and "no_such_module_here" in failures["nope"]


# -- device arrays come home -----------------------------------------------------------------


class ndarray:  # noqa: N801 - named like CuPy's array type on purpose
    """A stand-in for a CuPy array: its type claims to live in ``cupy`` and ``.get()`` copies to host."""

    def __init__(self, host):
        self._host = host
        self.get_calls = 0

    def get(self):
        self.get_calls += 1
        return self._host


ndarray.__module__ = "cupy._core.core"


def test_cupy_array_comes_back_as_numpy():
    host = np.arange(100_000, dtype=np.int32)
    dev = ndarray(host)
    parts = wire.dumps(dev)
    assert dev.get_calls == 1
    assert len(parts) > 1 and len(parts[0]) < 1024  # the host copy travels out of band too
    back = wire.loads(parts)
    assert type(back) is np.ndarray
    np.testing.assert_array_equal(back, host)


def test_cupy_array_nested_in_a_container_comes_back_as_numpy():
    value = {"w": ndarray(np.ones(4)), "b": [ndarray(np.zeros(2))]}
    back = wire.loads(wire.dumps(value))
    assert type(back["w"]) is np.ndarray and type(back["b"][0]) is np.ndarray
    np.testing.assert_array_equal(back["w"], np.ones(4))
    np.testing.assert_array_equal(back["b"][0], np.zeros(2))


def test_only_cupy_ndarray_is_converted():
    class Other:
        def get(self):  # pragma: no cover - must not be called
            raise AssertionError("get() called on a non-CuPy type")

    Other.__module__ = "cupy._core.core"  # right module, wrong name
    back = wire.loads(wire.dumps(Other()))
    assert type(back).__name__ == "Other"


def test_pickle_stream_is_protocol_5():
    parts = wire.dumps(np.arange(3))
    assert bytes(memoryview(parts[0])[:2]) == b"\x80\x05"
    assert pickle.loads(parts[0], buffers=parts[1:]).tolist() == [0, 1, 2]


def test_datetime_arrays_hash_and_travel():
    dates = np.arange("2025-01-01", "2025-01-10", dtype="datetime64[D]")
    assert wire.fingerprint(dates) == wire.fingerprint(dates.copy())
    assert wire.fingerprint(dates) != wire.fingerprint(dates + np.timedelta64(1, "D"))
    assert wire.fingerprint(np.datetime64("2025-01-01")) != wire.fingerprint(np.datetime64("2025-01-02"))
    assert (wire.loads(wire.dumps(dates)) == dates).all()
