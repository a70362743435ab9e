"""Where a remote cell's output lands: the running notebook cell, through IPython's own machinery.

The sandbox sends what its IPython published (streams, MIME bundles, the last expression's
result, input requests); :class:`IPythonRelay` publishes each into the cell that is running here,
as the kernel would have for a local cell. :class:`PlainRelay` serves scripts (the Python API
outside IPython): text goes to stdout/stderr and results are returned, not displayed.
"""

from __future__ import annotations

import getpass
import sys
from typing import Any, TextIO


class PlainRelay:
    """Output for code that runs outside IPython."""

    def __init__(self, stdout: TextIO | None = None, stderr: TextIO | None = None):
        self.stdout, self.stderr = stdout, stderr

    def stream(self, name: str, text: str) -> None:
        out = (self.stderr or sys.stderr) if name == "stderr" else (self.stdout or sys.stdout)
        out.write(text)

    def display(self, data: dict, metadata: dict, transient: dict, update: bool) -> None:
        text = data.get("text/plain")
        if text:
            self.stream("stdout", str(text) + "\n")

    def clear_output(self, wait: bool) -> None:
        pass

    def result(self, data: dict, metadata: dict, value: Any, has_value: bool) -> None:
        self.display(data, metadata, {}, False)

    def ask(self, prompt: str, password: bool) -> str:
        return getpass.getpass(prompt) if password else input(prompt)

    def queued(self, position: int, of: int, eta_s: float, waited_s: float) -> None:
        """The cell waits in the broker's queue (called again whenever the position changes)."""
        line = queue_line(position, of, eta_s, waited_s)
        if line != getattr(self, "_last_queue_line", None):
            self._last_queue_line = line
            self.stream("stderr", line + "\n")

    def granted_after_wait(self, waited_s: float) -> None:
        pass

    def flush(self) -> None:
        for out in (self.stdout or sys.stdout, self.stderr or sys.stderr):
            out.flush()


def queue_line(position: int, of: int, eta_s: float, waited_s: float) -> str:
    eta = f", about {eta_s:.0f} s" if eta_s and eta_s > 0 else ""
    return f"gpu-attach: queued: position {position} of {of}{eta} (waiting {waited_s:.0f} s; the stop button leaves the queue)"


class IPythonRelay(PlainRelay):
    """Output into the running cell of an IPython kernel (or terminal), as a local cell makes it."""

    def __init__(self, shell, stdout: TextIO | None = None, stderr: TextIO | None = None):
        super().__init__(stdout, stderr)
        self.shell = shell

    def display(self, data: dict, metadata: dict, transient: dict, update: bool) -> None:
        self.flush()
        kwargs: dict[str, Any] = {"data": data, "metadata": metadata}
        if transient:
            kwargs["transient"] = transient
        if update:
            kwargs["update"] = True
        self.shell.display_pub.publish(**kwargs)

    def clear_output(self, wait: bool) -> None:
        self.flush()
        self.shell.display_pub.clear_output(wait=wait)

    def result(self, data: dict, metadata: dict, value: Any, has_value: bool) -> None:
        """The cell's ``Out[n]``: the displayhook's own steps, with the bundle made remotely (where
        the cell's display options live) and the value, when it came, as ``_`` and ``Out[n]``."""
        self.flush()
        hook = self.shell.displayhook
        hook.start_displayhook()
        hook.write_output_prompt()
        if has_value:
            hook.update_user_ns(value)
            hook.fill_exec_result(value)
        hook.write_format_data(data, metadata)
        hook.log_output(data)
        hook.finish_displayhook()

    def ask(self, prompt: str, password: bool) -> str:
        # In a kernel, builtins.input and getpass are the kernel's: they ask the notebook's frontend.
        return getpass.getpass(prompt) if password else input(prompt)

    def queued(self, position: int, of: int, eta_s: float, waited_s: float) -> None:
        """One line in the cell, kept current in place (a display with an id, updated)."""
        import secrets

        data = {"text/plain": queue_line(position, of, eta_s, waited_s)}
        first = getattr(self, "_queue_display", None) is None
        if first:
            self._queue_display = "gpu-attach-queue-" + secrets.token_hex(4)
        self.shell.display_pub.publish(data=data, metadata={}, transient={"display_id": self._queue_display},
                                       **({} if first else {"update": True}))

    def granted_after_wait(self, waited_s: float) -> None:
        if getattr(self, "_queue_display", None):
            self.shell.display_pub.publish(
                data={"text/plain": f"gpu-attach: granted after {waited_s:.1f} s in the queue"}, metadata={},
                transient={"display_id": self._queue_display}, update=True)
