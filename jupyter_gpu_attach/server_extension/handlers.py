"""The server extension's HTTP API under ``/gpu-attach/api/``: a thin table over :class:`PoolView`.

Every handler needs a logged-in Jupyter user (``@web.authenticated``) and the ``gpu-attach``
permission (``@authorized``). Broker calls block, so they run on a worker thread. Domain errors
map to HTTP codes in one place, :func:`_status_of`.
"""

from __future__ import annotations

import asyncio
import json
import re

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web

from ..errors import AuthError, BrokerUnreachable, GPUAttachError, LeaseLost
from .pool_view import attach_line, notebooks_by_session

MAX_BODY_BYTES = 4096
NAMESPACE = "gpu-attach"


def _status_of(e: Exception) -> int:
    if isinstance(e, ValueError):
        return 400
    if isinstance(e, AuthError):
        return 403 if str(e).startswith("not allowed") else 502
    if isinstance(e, LeaseLost):
        return 409
    if isinstance(e, BrokerUnreachable):
        return 502
    m = re.match(r"broker error (\d{3})", str(e))
    if m and m.group(1) == "404":
        return 404
    return 502


class GPUAttachHandler(APIHandler):
    auth_resource = NAMESPACE

    @property
    def extension(self):
        return self.settings["gpu_attach"]

    async def call(self, fn, *args):
        """Run a blocking PoolView call on a worker thread; answer its result or its error as JSON."""
        view = self.extension.view
        if view is None:
            return self._error(503, self.extension.problem)
        try:
            result = await asyncio.get_running_loop().run_in_executor(None, fn(view), *args)
        except (GPUAttachError, ValueError) as e:
            return self._error(_status_of(e), str(e))
        self.finish(json.dumps(result))

    def _error(self, status: int, detail: str) -> None:
        self.set_status(status)
        self.finish(json.dumps({"detail": detail, "status": status}))

    async def notebooks(self) -> dict[str, str]:
        return notebooks_by_session(await self.session_manager.list_sessions())

    def json_body(self):
        raw = self.request.body or b""
        if len(raw) > MAX_BODY_BYTES:
            raise web.HTTPError(413, f"request body is over {MAX_BODY_BYTES} bytes")
        try:
            return json.loads(raw or b"{}")
        except ValueError:
            raise web.HTTPError(400, "the body must be JSON") from None


class StateHandler(GPUAttachHandler):
    """GET: the broker, pool, history and this user's leases: what the panel draws."""

    @web.authenticated
    @authorized
    async def get(self):
        notebooks = await self.notebooks()
        await self.call(lambda v: v.state, notebooks)


class PoolHandler(GPUAttachHandler):
    """GET: every GPU with its slices and their owners, and its recent utilisation."""

    @web.authenticated
    @authorized
    async def get(self):
        await self.call(lambda v: v.pool)


class LeasesHandler(GPUAttachHandler):
    """GET: this user's queued and granted leases, with notebook, cell label and age."""

    @web.authenticated
    @authorized
    async def get(self):
        notebooks = await self.notebooks()
        await self.call(lambda v: lambda nb: {"leases": v.leases(nb)}, notebooks)


class LeaseHandler(GPUAttachHandler):
    """DELETE: release one of this user's leases now."""

    @web.authenticated
    @authorized
    async def delete(self, lease_id: str):
        await self.call(lambda v: v.release, lease_id)


class AttachHandler(GPUAttachHandler):
    """POST {memory | fraction | gpus, pool}: the validated ``%gpu attach`` line for a notebook.

    The panel runs the line in the notebook's kernel (through the notebook tracker), so the
    kernel's own session changes, exactly as if the user had typed it.
    """

    @web.authenticated
    @authorized
    async def post(self):
        body = self.json_body()
        try:
            line = attach_line(body)
        except ValueError as e:
            return self._error(400, str(e))
        # Loading the magics first is a no-op where they are loaded, and makes the line work where not.
        code = f"get_ipython().extension_manager.load_extension('jupyter_gpu_attach')\n{line}\n"
        self.finish(json.dumps({"line": line, "code": code}))


class InfoHandler(GPUAttachHandler):
    """GET: whether the extension is connected to a broker, and how (never the token)."""

    @web.authenticated
    @authorized
    async def get(self):
        ext = self.extension
        self.finish(json.dumps({
            "version": ext.version, "connected": ext.view is not None, "problem": ext.problem,
            "broker_url": ext.view.broker.url if ext.view else None, "embedded": ext.embedded is not None,
            "refresh_interval": ext.refresh_interval, "labextension_built": ext.labextension_built,
        }))


def setup_handlers(web_app, extension) -> None:
    web_app.settings["gpu_attach"] = extension
    base = url_path_join(web_app.settings["base_url"], NAMESPACE, "api")
    web_app.add_handlers(".*$", [
        (url_path_join(base, "info"), InfoHandler),
        (url_path_join(base, "state"), StateHandler),
        (url_path_join(base, "pool"), PoolHandler),
        (url_path_join(base, "leases"), LeasesHandler),
        (url_path_join(base, "leases", r"(L[0-9a-f]{12})"), LeaseHandler),
        (url_path_join(base, "attach"), AttachHandler),
    ])
