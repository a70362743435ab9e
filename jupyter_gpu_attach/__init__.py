"""jupyter-gpu-attach: GPUs on demand for notebooks.

``%load_ext jupyter_gpu_attach``, then ``%%gpu --memory 2GiB`` runs a cell on a leased GPU slice,
streams its output, brings back what it assigned and releases the slice as the cell ends.
"""

from .api import Lease, lease, remote
from .connection import close_session, get_session
from .errors import (
    AgentLost,
    AuthError,
    BrokerUnreachable,
    CellRejected,
    CellTimeout,
    GPUAttachError,
    InputError,
    LeaseLost,
    NoCapacity,
    RemoteCellError,
)
from .session import CellResult, GPUSession
from .slices import SliceRequest
from .widget import widget  # ipywidgets is imported only when a widget is made

__version__ = "0.1.0"


def load_ipython_extension(ipython) -> None:
    from .magics import GPUMagics, show_clean_syntax_error

    ipython.register_magics(GPUMagics)
    # A syntax error in a %%gpu cell is shown as in a local cell, not with our frames.
    ipython.set_custom_exc((SyntaxError,), show_clean_syntax_error)


def unload_ipython_extension(ipython) -> None:
    close_session()


def _jupyter_server_extension_points():
    """The Jupyter Server extension (the panel's API) lives in its own subpackage."""
    return [{"module": "jupyter_gpu_attach.server_extension"}]


def _jupyter_labextension_paths():
    """For ``jupyter labextension develop``: the prebuilt panel, built into the package."""
    return [{"src": "labextension", "dest": "jupyter-gpu-attach"}]


__all__ = [
    "AgentLost", "AuthError", "BrokerUnreachable", "CellRejected", "CellResult", "CellTimeout", "GPUAttachError",
    "GPUSession", "InputError", "LeaseLost", "NoCapacity", "RemoteCellError", "SliceRequest", "close_session",
    "get_session", "load_ipython_extension", "unload_ipython_extension", "widget",
    "Lease", "lease", "remote",
]
