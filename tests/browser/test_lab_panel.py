"""The panel, the status bar and the widget in a real JupyterLab, with a real kernel, broker and
simulated agent: a %%gpu cell's lease appears while it runs and vanishes when it ends, a lease is
released from the panel, and the widget renders. Screenshots, light and dark, for the docs."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import nbformat

from tests.conftest import REPO, TOKENS

SHOTS = REPO / "docs" / "screenshots"
CELLS = [
    "%load_ext jupyter_gpu_attach",
    "%%gpu --fraction 0.25\nimport time; time.sleep(6)  # train the model\nprint('trained')",
    "import jupyter_gpu_attach\njupyter_gpu_attach.widget(refresh_interval=1)",
    "%gpu status",
]


def _notebook(root: Path) -> str:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, root / "train.ipynb")
    return "train.ipynb"


def _shot(page, tmp_path, name: str, element=None) -> None:
    path = tmp_path / f"{name}.png"
    (element or page).screenshot(path=str(path))
    # Refresh the docs' screenshots on request only; a test run should not change the checkout.
    if os.environ.get("GPU_ATTACH_UPDATE_SCREENSHOTS") == "1":
        SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, SHOTS / f"{name}.png")


def _kernel_ready(page, timeout_ms: float = 120000) -> None:
    """Wait until the open notebook's session has its kernel, connected and idle. Running a cell
    before that makes the notebook start a kernel of its own, racing the one it is starting: the
    second start may kill the first, or, with the kernel specs not yet fetched, open a "Select
    Kernel" dialog over the notebook."""
    page.wait_for_function(
        """() => {
            const s = window.jupyterapp?.shell.currentWidget?.sessionContext;
            const k = s?.session?.kernel;
            return !!(s?.isReady && k && k.connectionStatus === 'connected' && k.status === 'idle');
        }""", timeout=timeout_ms)


def _click(page, locator) -> None:
    """Click, and if a dialog is in the way, fail with what it says rather than "intercepts pointer
    events": a dialog nobody expects is a failure to understand, not to press Escape on."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        locator.click()
    except PlaywrightTimeout:
        dialogs = [d.inner_text() for d in page.locator(".jp-Dialog").all()]
        if dialogs:
            raise AssertionError(f"a dialog covers the notebook: {dialogs!r}") from None
        raise


def _run_cell(page, index: int, within_s: float = 120) -> None:
    """Run one cell. A request made while the kernel is still connecting is dropped (the prompt
    stays "[ ]"), so ask again until the prompt shows the cell queued or run."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
    prompt = cell.locator(".jp-InputPrompt")
    deadline = time.monotonic() + within_s
    while True:
        _click(page, prompt)
        page.keyboard.press("Shift+Enter")
        try:
            page.wait_for_function("el => /\\[(\\*|\\d+)\\]/.test(el.textContent)", arg=prompt.element_handle(),
                                   timeout=5000)
            return
        except PlaywrightTimeout:
            if time.monotonic() > deadline:
                raise


def _theme(page, name: str) -> None:
    page.evaluate(f"window.jupyterapp.commands.execute('apputils:change-theme', {{theme: '{name}'}})")
    page.wait_for_function(f"document.body.dataset.jpThemeName === '{name}'", timeout=20000)
    time.sleep(0.5)


def _widget_in_notebook7(lab, browser, shots: Path) -> None:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(CELLS[2])])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, lab.root / "nb7.ipynb")
    page = browser.new_page(viewport={"width": 1100, "height": 700})
    try:
        page.goto(f"{lab.url}/notebooks/nb7.ipynb?token={lab.token}")
        page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=60000)
        _kernel_ready(page)
        _run_cell(page, 0)
        out = page.locator(".jp-Notebook .jp-Cell").nth(0).locator(".jp-OutputArea-output")
        out.locator(".gpu-attach-bar").first.wait_for(timeout=90000)
        assert "simulated" in out.inner_text() and "Set default" in out.inner_text()
    except Exception:
        page.screenshot(path=str(shots / "failure-notebook7.png"))
        print(f"Notebook 7 screenshot at failure: {shots / 'failure-notebook7.png'}")
        raise
    finally:
        page.close()


def _held_lease(site, kernel_id: str, label: str) -> dict:
    with site.client("alice") as c:
        r = c.post("/v1/leases", json={"fraction": 0.25, "session": f"k-{kernel_id}", "label": label})
        assert r.status_code == 201, r.text
        return r.json()


def test_panel_status_bar_and_widget(lab, site, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1360, "height": 820})
    try:
        _walk_through(lab, site, page, tmp_path)
    except Exception:
        page.screenshot(path=str(tmp_path / "failure.png"))
        print(f"screenshot at failure: {tmp_path / 'failure.png'}; JupyterLab's log ends with:\n"
              + lab.log.read_text(errors="replace")[-4000:])
        raise
    finally:
        page.close()


def _walk_through(lab, site, page, tmp_path):
    path = _notebook(lab.root)
    page.set_default_timeout(30000)
    page.goto(f"{lab.url}/lab/tree/{path}?token={lab.token}")
    page.locator(".jp-Notebook .jp-Cell").first.wait_for()
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60000)

    # 2. The simulated GPUs in the panel.
    page.locator(".jp-SideBar [data-id='jp-gpu-attach-panel']").click()
    panel = page.locator("#jp-gpu-attach-panel")
    panel.locator(".jp-GpuAttach-gpu").first.wait_for()
    assert panel.locator(".jp-GpuAttach-gpu").count() == 2
    assert "simulated" in panel.locator(".jp-GpuAttach-gpu").first.inner_text()
    status = page.locator(".jp-GpuAttach-statusText")
    assert status.inner_text() == "GPU: idle"

    # 3-4. A %%gpu cell that lasts a few seconds: its lease shows in the panel and the status bar.
    _run_cell(page, 0)
    _run_cell(page, 1)
    # On a loaded machine the kernel may be slow to start; once the first cell is done the %%gpu one runs.
    page.locator(".jp-Notebook .jp-Cell").nth(0).locator(".jp-InputPrompt", has_text="[1]").wait_for(timeout=120000)
    row = panel.locator(".jp-GpuAttach-lease")
    row.first.wait_for(timeout=30000)
    assert "train.ipynb" in row.first.inner_text() and "time.sleep(6)" in row.first.inner_text()
    page.wait_for_function(
        "document.querySelector('.jp-GpuAttach-statusText').textContent.match(/^GPU: 0.25 × simulated GPU · \\d+ s$/)",
        timeout=10000)
    assert panel.locator(".jp-GpuAttach-slice.jp-mod-mine").count() == 1
    _shot(page, tmp_path, "lab-cell-running-light")

    # 5. Gone when the cell ends.
    panel.locator(".jp-GpuAttach-noLeases").wait_for(timeout=30000)
    page.wait_for_function("document.querySelector('.jp-GpuAttach-statusText').textContent === 'GPU: idle'")
    assert "trained" in page.locator(".jp-Notebook .jp-Cell").nth(1).locator(".jp-OutputArea").inner_text()

    # 6. Release a lease from the panel (one held through the broker API for this notebook's kernel).
    with lab.api() as c:
        kernel_id = next(s["kernel"]["id"] for s in c.get("/api/sessions").json() if s["path"] == path)
    held = _held_lease(site, kernel_id, "held by a script")
    row = panel.locator(f".jp-GpuAttach-lease[data-lease='{held['id']}']")
    row.wait_for()
    page.wait_for_function("document.querySelector('.jp-GpuAttach-statusText').textContent.startsWith('GPU: 0.25')")
    # A lease granted above a quota that borrows idle capacity is marked so, with the numbers.
    with site.client("admin") as a:
        assert a.put("/v1/admin/quotas/user/alice", json={"max_share": 0.25, "borrow": True}).status_code == 200
    lent = _held_lease(site, kernel_id, "borrowed by a script")
    assert lent["borrowed"]["limit"] == 0.25
    badge = panel.locator(f".jp-GpuAttach-lease[data-lease='{lent['id']}'] .jp-GpuAttach-borrowed")
    badge.wait_for()
    assert "share quota (0.25 in use + 0.25 asked > 0.25)" in badge.get_attribute("title")
    assert row.locator(".jp-GpuAttach-borrowed").count() == 0, "a lease within the quota is not marked"
    with site.client("admin") as a:
        a.delete("/v1/admin/quotas/user/alice")
    with site.client("alice") as c:
        c.delete(f"/v1/leases/{lent['id']}")
    panel.locator(f".jp-GpuAttach-lease[data-lease='{lent['id']}']").wait_for(state="detached")
    row.get_by_role("button", name="Release").click()
    row.wait_for(state="detached")
    with site.client("alice") as c:
        assert c.get(f"/v1/leases/{held['id']}").json()["state"] == "released"

    # 7. The widget renders the pool in the notebook.
    _run_cell(page, 2)
    widget = page.locator(".jp-Notebook .jp-Cell").nth(2).locator(".jp-OutputArea-output")
    widget.locator(".gpu-attach-bar").first.wait_for(timeout=30000)
    assert "simulated" in widget.inner_text() and "Set default" in widget.inner_text()

    # The panel sets the notebook's default request: `%gpu attach --memory 2GiB` runs in its kernel.
    panel.get_by_label("amount").fill("2GiB")
    panel.get_by_role("button", name="Set default request").click()
    panel.locator(".jp-GpuAttach-message", has_text="ran %gpu attach --memory 2GiB").wait_for()
    _run_cell(page, 3)
    status_out = page.locator(".jp-Notebook .jp-Cell").nth(3).locator(".jp-OutputArea-output")
    status_out.wait_for()
    assert re.search(r"default\s+2 GiB", status_out.inner_text()), status_out.inner_text()

    # Screenshots with a lease held, light and dark.
    held = _held_lease(site, kernel_id, "x = model.fit(data)")
    panel.locator(f".jp-GpuAttach-lease[data-lease='{held['id']}']").wait_for()
    widget.locator(".gpu-attach-bar div").first.wait_for(timeout=10000)
    time.sleep(2.5)  # a few seconds of age and history
    _shot(page, tmp_path, "lab-panel-light")
    _shot(page, tmp_path, "widget-light", widget)
    _theme(page, "JupyterLab Dark")
    _shot(page, tmp_path, "lab-panel-dark")
    _shot(page, tmp_path, "widget-dark", widget)
    _theme(page, "JupyterLab Light")

    # The widget in Notebook 7 too (same server, its /tree and /notebooks pages).
    _widget_in_notebook7(lab, page.context.browser, tmp_path)

    # Clicking the status-bar item opens the panel.
    page.locator(".jp-SideBar [data-id='jp-gpu-attach-panel']").click()  # collapses the sidebar
    panel.wait_for(state="hidden")
    status.click()
    panel.wait_for(state="visible")
    with site.client("alice") as c:
        c.delete(f"/v1/leases/{held['id']}")
