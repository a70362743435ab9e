"""When the panel cannot show the pool it says what to do: the broker down, or no server extension."""

from __future__ import annotations

import socket

from tests.browser.conftest import start_lab


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _panel_error(page) -> str:
    page.locator(".jp-SideBar [data-id='jp-gpu-attach-panel']").click(timeout=60000)
    error = page.locator("#jp-gpu-attach-panel .jp-GpuAttach-error")
    error.wait_for(timeout=30000)
    assert page.locator("#jp-gpu-attach-panel .jp-GpuAttach-gpu").count() == 0
    return error.inner_text()


def test_panel_says_what_to_do(browser, tmp_path):
    # A real server whose broker is down (nothing listens on its port).
    lab = start_lab(tmp_path, _dead_url(), "t" * 20)
    page = browser.new_page(viewport={"width": 1200, "height": 700})
    try:
        page.goto(f"{lab.url}/lab?token={lab.token}")
        text = _panel_error(page)
        assert "cannot reach the broker" in text and "GPU_ATTACH_BROKER_URL" in text
        # A server without the extension answers its routes with Jupyter's plain 404 page.
        page.route("**/gpu-attach/api/**", lambda route: route.fulfill(
            status=404, content_type="text/html", body="<html><body>404 : Not Found</body></html>"))
        page.reload()
        text = _panel_error(page)
        assert "jupyter server extension enable jupyter_gpu_attach.server_extension" in text
    finally:
        page.close()
        lab.stop()
