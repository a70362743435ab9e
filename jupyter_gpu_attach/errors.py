"""What can go wrong between a ``%%gpu`` cell and the GPU, each error saying what to do about it."""

from __future__ import annotations


class GPUAttachError(Exception):
    """Base class of jupyter-gpu-attach's own errors."""

    def _render_traceback_(self) -> list[str]:
        # IPython shows this instead of a traceback: our own errors say what to do in one message,
        # and the library frames they were raised from would only bury it.
        return [f"\x1b[0;31m{type(self).__name__}\x1b[0m: {self}"]


class BrokerUnreachable(GPUAttachError):
    """The broker did not answer (not running, wrong URL, network)."""


class AuthError(GPUAttachError):
    """The broker refused the token (401) or the action (403)."""


class NoCapacity(GPUAttachError):
    """No GPU can take the request: ``reason`` is ``busy`` (try later) or ``too_large`` (never)."""

    def __init__(self, message: str, reason: str = "busy"):
        super().__init__(message)
        self.reason = reason


class LeaseLost(GPUAttachError):
    """The lease ended while the cell ran (expired, revoked, or its agent went down)."""


class AgentLost(GPUAttachError):
    """The connection to the agent broke mid-cell: the agent or the cell's sandbox died."""


class CellRejected(GPUAttachError):
    """The agent refused the cell (bad or expired grant, payload over its limit)."""


class CellTimeout(GPUAttachError, TimeoutError):
    """The cell ran past ``--timeout`` and was stopped."""


class InputError(GPUAttachError):
    """A value the cell reads cannot be sent to the GPU host."""


class RemoteTraceback(Exception):
    """Carries the remote traceback text; set as the ``__cause__`` of a remote exception."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return "\n" + self.tb.rstrip()


class RemoteCellError(GPUAttachError):
    """A remote exception whose type could not be rebuilt in the notebook (e.g. not importable here)."""

    def __init__(self, etype: str, message: str):
        super().__init__(f"{etype}: {message}")
        self.etype = etype
        self.remote_message = message


class RemoteStateLost(GPUAttachError):
    """Objects that lived only in the session's sandbox are gone (sandbox ended, or moved)."""


class EnvironmentMismatch(GPUAttachError):
    """The sandbox's Python or libraries cannot exchange values with the notebook's."""
