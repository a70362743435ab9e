"""The notebook widget (``jupyter_gpu_attach.widget()``, or ``%gpu widget``): the pool, this
notebook's leases, live, and controls for the notebook's default request.

Plain ipywidgets 8 controls, so it renders wherever ipywidgets does (JupyterLab, Notebook 7)
with no extension of its own. A daemon thread refreshes it while it is open.
"""

from __future__ import annotations

import html
import threading

from . import connection
from .config import GPUAttach
from .slices import SliceRequest, format_size

KINDS = {"memory": "memory (e.g. 8GiB)", "fraction": "fraction of a GPU", "gpus": "whole GPUs",
         "mig": "MIG instance (e.g. 1g.10gb)"}


def widget(refresh_interval: float | None = None):
    """Show the GPU pool and this notebook's leases, and pick the notebook's default request."""
    return PoolWidget(refresh_interval or GPUAttach().refresh_interval)


def render_pool(pool: dict, leases: list[dict], session_id: str | None) -> str:
    """HTML for the pool: one bar per GPU, a segment per lease (this notebook's highlighted)."""
    ours = {lease["id"]: lease for lease in leases}
    rows = []
    for g in pool.get("gpus", []):
        segments = []
        for lease_id in g["leases"]:
            lease = ours.get(lease_id)
            share = (lease["memory_per_gpu"] / g["memory"]) if lease and g["memory"] else None
            if share is None:  # another user's, or not listed: share the rest of the used part evenly
                others = [x for x in g["leases"] if x not in ours]
                known = sum(ours[x]["memory_per_gpu"] for x in g["leases"] if x in ours)
                share = max(g["used_memory"] - known, 0) / g["memory"] / max(len(others), 1) if g["memory"] else 0
            here = lease is not None and lease.get("session") == session_id
            colour = "var(--jp-brand-color1, #1976d2)" if here else "var(--jp-warn-color1, #f57c00)"
            who = "this notebook" if here else ("you" if lease else "another user")
            segments.append(f'<div title="{html.escape(lease_id)}: {who}" style="width:{share * 100:.1f}%;'
                            f'background:{colour};height:100%"></div>')
        badge = (' <span style="background:var(--jp-warn-color2,#ffe0b2);color:var(--jp-ui-font-color1);'
                 'border-radius:3px;padding:0 4px;font-size:85%">simulated</span>') if g["simulated"] else ""
        rows.append(
            f'<div style="margin:4px 0"><b>{html.escape(g["id"])}</b> {html.escape(g["model"])}{badge} · '
            f'{g["used_share"]:.0%} used of {format_size(g["memory"])} · agent {html.escape(g["agent_state"])}'
            f'<div class="gpu-attach-bar" style="display:flex;height:10px;border:1px solid '
            f'var(--jp-border-color1,#999);background:var(--jp-layout-color2,#eee)">{"".join(segments)}</div></div>')
    if not rows:
        rows.append("<i>no GPUs registered: start an agent with <code>gpu-attach agent --broker URL</code></i>")
    live = [x for x in leases if x["state"] in ("queued", "granted")]
    if live:
        items = []
        for x in live:
            where = "this notebook" if x.get("session") == session_id else html.escape(x.get("session", ""))
            wait = f" · queued, position {x['position']}" if x.get("position") is not None else ""
            items.append(f"<li><code>{html.escape(x['id'])}</code> {html.escape(x['state'])}{wait} on "
                         f"{html.escape(', '.join(x['gpus']))} · {where} · {html.escape(x.get('label') or '')}</li>")
        rows.append("<div><b>Your leases</b><ul style='margin:2px 0'>" + "".join(items) + "</ul></div>")
    else:
        rows.append("<div><b>Your leases</b>: none (a GPU is held only while a %%gpu cell runs)</div>")
    return "".join(rows)


class PoolWidget:
    """The widget and its refresher; ``_ipython_display_`` shows the ipywidgets box."""

    def __init__(self, refresh_interval: float = 2.0):
        import ipywidgets as w

        self.refresh_interval = max(float(refresh_interval), 0.5)
        self.session = connection.get_session()
        self.view = w.HTML(value="<i>loading the GPU pool…</i>")
        self.kind = w.Dropdown(options=[(v, k) for k, v in KINDS.items()], value="memory", description="Request")
        self.amount = w.Text(value="", placeholder="8GiB, 0.25, 1 or 1g.10gb", description="Amount")
        self.pool_label = w.Text(value="", placeholder="any", description="Pool")
        self.apply = w.Button(description="Set default", icon="check", button_style="primary")
        self.default_view = w.HTML(value=self._default_text())
        self.message = w.HTML(value="")
        self.apply.on_click(lambda _: self.set_default())
        self.box = w.VBox([
            w.HTML("<b>GPU pool</b> (jupyter-gpu-attach)"), self.view,
            w.HBox([self.kind, self.amount]), w.HBox([self.pool_label, self.apply]), self.default_view, self.message,
        ], layout=w.Layout(border="1px solid var(--jp-border-color2, #ddd)", padding="6px"))
        self._stop = threading.Event()
        self.refresh()
        self._thread = threading.Thread(target=self._loop, name="gpu-attach-widget", daemon=True)
        self._thread.start()

    def _default_text(self) -> str:
        return f"Default request for this notebook: <b>{html.escape(self.session.default.describe())}</b>"

    def set_default(self) -> None:
        """What ``%gpu attach`` does: the notebook's cells ask for this unless they say otherwise."""
        value, pool = self.amount.value.strip(), self.pool_label.value.strip() or None
        try:
            if self.kind.value == "memory":
                request = SliceRequest.from_options(memory=value, pool=pool)
            elif self.kind.value == "fraction":
                request = SliceRequest.from_options(fraction=float(value), pool=pool)
            elif self.kind.value == "mig":
                request = SliceRequest.from_options(mig=value, pool=pool)
            else:
                request = SliceRequest.from_options(gpus=int(value), pool=pool)
        except ValueError as e:
            self.message.value = f'<span style="color:var(--jp-error-color1,red)">{html.escape(str(e) or "bad amount")}</span>'
            return
        self.session.default = request
        self.message.value = ""
        self.default_view.value = self._default_text()

    def refresh(self) -> None:
        try:
            pool = self.session.pool()
            leases = self.session.broker.leases(limit=100)
        except Exception as e:  # the broker went away: say so in place, keep trying
            self.view.value = (f'<span style="color:var(--jp-error-color1,red)">cannot read the pool: '
                               f'{html.escape(str(e))}</span>')
            return
        self.view.value = render_pool(pool, leases, self.session.session_id)
        # `%gpu attach` (typed, or run by the panel) changes the default behind the widget's back.
        self.default_view.value = self._default_text()

    def _loop(self) -> None:
        while not self._stop.wait(self.refresh_interval):
            self.refresh()

    def close(self) -> None:
        self._stop.set()
        self.box.close()

    def _repr_mimebundle_(self, **kwargs):
        return self.box._repr_mimebundle_(**kwargs)

    def __repr__(self) -> str:  # plain consoles
        return f"<gpu-attach widget, refreshing every {self.refresh_interval:g} s>"


__all__ = ["widget", "PoolWidget", "render_pool"]
