"""The differential harness's normalisation: what may vary between two runs of a cell, and what may not."""

from __future__ import annotations

import base64
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from differential import _image_class, canonical, normalise_text, structure, under_gpu  # noqa: E402



def _png(width: int, height: int, body: bytes = b"") -> str:
    """The start of a PNG (signature and IHDR chunk) as base64, as an image/png output holds it."""
    ihdr = struct.pack(">II", width, height) + b"\x08\x06\x00\x00\x00"
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + b"\0" * 4 + body).decode()


PNG_640x480 = _png(640, 480)


def test_timings_addresses_and_the_run_folder_are_masked():
    a = normalise_text("251 \u03bcs \u00b1 36.8 \u03bcs per loop (mean \u00b1 std. dev. of 7 runs, 10,000 loops each)\n")
    b = normalise_text("1.41 ms \u00b1 13.6 \u00b5s per loop (mean \u00b1 std. dev. of 7 runs, 1 loop each)\n")
    c = normalise_text("18.9 \u03bcs \u00b1 1e+03 ns per loop (mean \u00b1 std. dev. of 2 runs, 10 loops each)\n")
    assert a == b == c == "<TIMEIT>\n"
    assert normalise_text("The slowest run took 5.12 times longer than the fastest. This could mean that an "
                          "intermediate result is being cached.\n3 ns per loop\n") == "<TIMEIT>\n"
    assert normalise_text("CPU times: user 1.2 ms, sys: 0 ns, total: 1.2 ms\nWall time: 2.3 ms") == \
        "CPU times: user <T>, sys: <T>, total: <T>\nWall time: <T>"
    assert normalise_text("<__main__.Foo object at 0x7f3a2b1c9d10>") == "<__main__.Foo object at 0x<ADDR>>"
    assert normalise_text("/tmp/gpa-diff-abc/nb/x.csv and /tmp/tmpq1w2e3", "/tmp/gpa-diff-abc/nb") == \
        "<NOTEBOOK_DIR>/x.csv and <TMP>"


def test_real_differences_are_not_masked():
    assert normalise_text("Out: 5") != normalise_text("Out: 6")
    assert normalise_text("x = 0.25") != normalise_text("x = 1.25")
    assert canonical([{"output_type": "error", "ename": "NameError"}], "") != canonical([], "")


def test_gpu_attach_notices_are_dropped_but_other_stderr_is_kept():
    notice = [{"output_type": "stream", "name": "stderr",
               "text": "gpu-attach: embedded broker at http://127.0.0.1:1 with 1 SIMULATED device(s)\n"}]
    assert canonical(notice, "") == canonical([], "")
    real = [{"output_type": "stream", "name": "stderr", "text": "gpu-attach: x\nto stderr\n"}]
    assert canonical(real, "")["streams"] == {"stderr": "to stderr\n"}


def test_images_compare_by_presence_and_size_and_html_by_text():
    def fig(png):
        return [{"output_type": "display_data", "data": {"image/png": png, "text/plain": "<Figure size 640x480 with 1 Axes>"}}]

    assert canonical(fig(_png(640, 480, b"a" * 900)), "") == canonical(fig(_png(640, 480, b"b" * 1000)), "")
    assert canonical(fig(PNG_640x480), "") != canonical([], "")
    assert _image_class("image/png", PNG_640x480) == "png~640x480"
    assert _image_class("image/png", _png(800, 480)) == "png~800x480"
    assert canonical(fig(_png(800, 480)), "") != canonical(fig(PNG_640x480), ""), "a figure of another size differs"
    html = [{"output_type": "execute_result", "data": {"text/html": "<b>x</b>", "text/plain": "x"}}]
    text = [{"output_type": "execute_result", "data": {"text/plain": "x"}}]
    assert canonical(html, "") != canonical(text, "")
    assert structure(canonical(html, "")) != structure(canonical(text, ""))


def test_the_gpu_transform_puts_gpu_before_a_cell_magic():
    assert under_gpu("%%timeit\nx = 1") == "%%gpu\n%%timeit\nx = 1"
    assert under_gpu("w") == "%%gpu\nw"


def test_names_announced_as_staying_remote_are_found():
    from differential import stays_remote

    outputs = [[{"output_type": "stream", "name": "stderr",
                 "text": "gpu-attach: 'gen' stays on the GPU host: cannot pickle 'generator' object\n"}],
               [{"output_type": "stream", "name": "stdout", "text": "gpu-attach: 'fake' stays on the GPU host\n"}]]
    assert stays_remote(outputs) == {"gen"}, "only gpu-attach's own stderr notices count"
