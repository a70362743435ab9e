"""``%%gpu`` and ``%gpu``: thin IPython shells around :class:`GPUSession`."""

from __future__ import annotations

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from . import connection
from .slices import SliceRequest, format_size


def _slice_options(f):
    """The request options, written once and shared by ``%%gpu`` and ``%gpu attach``."""
    for arg in reversed([
        argument("--memory", "-m", help="GPU memory for the cell, e.g. 2GiB"),
        argument("--fraction", "-f", type=float, help="share of one GPU, in (0, 1]"),
        argument("--gpus", "-g", type=int, help="whole GPUs (on one host)"),
        argument("--pool", help="only GPUs with this pool label"),
    ]):
        f = arg(f)
    return f


def _request(args) -> SliceRequest:
    try:
        return SliceRequest.from_options(args.gpus, args.fraction, args.memory, args.pool)
    except ValueError as e:
        raise UsageError(str(e)) from None


@magics_class
class GPUMagics(Magics):
    @magic_arguments()
    @_slice_options
    @argument("--timeout", "-t", type=float, help="stop the cell after this many seconds")
    def _cell_args(self, line):
        """%%gpu [--memory SIZE | --fraction F | --gpus N] [--pool LABEL] [--timeout S]"""

    @magic_arguments()
    @argument("command", nargs="?", default="status", choices=["attach", "detach", "status", "pool"])
    @_slice_options
    def _line_args(self, line):
        """%gpu attach [options] | detach | status | pool"""

    @line_cell_magic
    def gpu(self, line: str, cell: str | None = None):
        """Run this cell on a leased GPU slice (``%%gpu``), or manage the session (``%gpu status``).

        ``%%gpu --memory 2GiB`` leases 2 GiB of a GPU for exactly as long as the cell runs. The names
        the cell reads are sent; the names it assigns come back; output streams live.
        """
        __tracebackhide__ = True
        if cell is None:
            return self._line(line)
        try:
            args = parse_argstring(self._cell_args, line)
        except UsageError:
            raise
        except SystemExit:
            raise UsageError(f"bad %%gpu options: {line!r}. {self._cell_args.__doc__}") from None
        if args.timeout is not None and args.timeout <= 0:
            raise UsageError(f"--timeout must be positive seconds, got {args.timeout:g}")
        request = _request(args)
        session = connection.get_session()
        label = (cell.strip().splitlines() or [""])[0][:120]
        session.run(cell, self.shell.user_ns, None if request.is_default else request, args.timeout, label=label)

    def _line(self, line: str):
        try:
            args = parse_argstring(self._line_args, line)
        except SystemExit:
            raise UsageError(f"bad %gpu command: {line!r}. {self._line_args.__doc__}") from None
        if args.command == "attach":
            session = connection.get_session()
            session.default = _request(args)
            print(f"gpu-attach: cells in this notebook ask for {session.default.describe()} unless they say otherwise")
        elif args.command == "detach":
            connection.close_session()
            print("gpu-attach: detached (the embedded broker, if any, is stopped)")
        elif args.command == "pool":
            print(format_pool(connection.get_session().pool()))
        else:
            print(format_status(connection.current_session()))


def format_pool(pool: dict) -> str:
    rows = [("GPU", "MODEL", "MEMORY", "USED", "FREE", "STATE", "LEASES")]
    for g in pool["gpus"]:
        model = g["model"] + (" [SIMULATED]" if g["simulated"] and "Simulated" not in g["model"] else "")
        rows.append((g["id"], model, format_size(g["memory"]), f"{g['used_share']:.0%}", format_size(g["free_memory"]),
                     g["agent_state"], ",".join(g["leases"]) or "-"))
    if len(rows) == 1:
        return "no GPUs registered: start an agent with `gpu-attach agent --broker URL`"
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def format_status(session) -> str:
    if session is None:
        return "gpu-attach: not attached yet; the first %%gpu cell (or %gpu attach) connects"
    lines = [
        f"session   {session.session_id}",
        f"broker    {session.broker.url}" + (" (embedded, started by this kernel)" if session.embedded else ""),
        f"default   {session.default.describe()}",
        f"holding   {'lease ' + session.active_lease['id'] if session.active_lease else 'no GPU (none is held between cells)'}",
    ]
    last = session.last
    if last is not None:
        g = ", ".join(d["id"] + (" (simulated)" if d["simulated"] else "") for d in last.lease["gpus"])
        t = last.timings
        lines.append(f"last cell lease {last.lease['id']} on {g}: {t['total'] * 1000:.1f} ms in all, "
                     f"{last.remote_elapsed_s * 1000:.1f} ms running; returned {', '.join(last.returned) or 'nothing'}")
    return "\n".join(lines)
