"""``%%gpu`` and ``%gpu``: thin IPython shells around :class:`GPUSession`."""

from __future__ import annotations

import argparse
import shlex

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class

from . import connection
from .cell_analysis import analyse
from .relay import IPythonRelay
from .slices import SliceRequest, format_size

USAGE = """\
%%gpu [--memory SIZE | --fraction F | --gpus N | --mig PROFILE] [--pool LABEL] [--timeout S] [--wait S]
    Run this cell on a GPU slice leased for exactly as long as the cell runs. The names the cell
    reads are sent (only what changed since the sandbox last saw it); the names it binds, creates,
    deletes or changes in place come back; output, displays and plots stream into the cell live.

%gpu attach [--memory SIZE | --fraction F | --gpus N | --mig PROFILE] [--pool LABEL]
    Set this notebook's default request, start its sandbox and check that its Python and
    libraries can exchange values with this kernel's.
%gpu status     session, broker, default request, what stays in the sandbox, the last cell
%gpu pool       every GPU with its used and free share
%gpu detach     end the session (its sandbox, and the embedded broker if this kernel started one)
%gpu widget     the pool and this notebook's request as a live widget

Options:
  -m, --memory SIZE   GPU memory for the cell, e.g. 2GiB or 512MiB
  -f, --fraction F    a share of one GPU, in (0, 1]
  -g, --gpus N        whole GPUs, all on one host
  --mig PROFILE       a whole MIG instance of this profile, e.g. 1g.10gb (on GPUs in MIG mode)
  --pool LABEL        only GPUs with this pool label
  -t, --timeout S     stop the cell after S seconds (%%gpu only)
  -w, --wait S        wait up to S seconds in the broker's queue when no GPU is free
                      (default 600, or $GPU_ATTACH_WAIT_S; 0 fails at once)
  -h, --help          show this help
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{self.prog}: {message}. Options: `%gpu?` or `{self.prog} -h`")

    def exit(self, status=0, message=None):
        raise _HelpShown


class _HelpShown(Exception):
    pass


def _parser(prog: str, cell: bool) -> _Parser:
    p = _Parser(prog=prog, add_help=False, allow_abbrev=False)
    p.add_argument("-h", "--help", action="store_true")
    if not cell:
        p.add_argument("command", nargs="?", default="status", choices=["attach", "detach", "status", "pool", "widget"])
    p.add_argument("-m", "--memory")
    p.add_argument("-f", "--fraction", type=float)
    p.add_argument("-g", "--gpus", type=int)
    p.add_argument("--mig")
    p.add_argument("--pool")
    p.add_argument("-w", "--wait", type=float)
    if cell:
        p.add_argument("-t", "--timeout", type=float)
    return p


_CELL = _parser("%%gpu", cell=True)
_LINE = _parser("%gpu", cell=False)


def _parse(parser: _Parser, line: str):
    try:
        return parser.parse_args(shlex.split(line))
    except ValueError as e:  # shlex: an unclosed quote
        raise UsageError(f"{parser.prog}: cannot parse {line!r} ({e})") from None


def _request(args) -> SliceRequest:
    try:
        return SliceRequest.from_options(args.gpus, args.fraction, args.memory, args.pool, args.mig)
    except ValueError as e:
        raise UsageError(str(e)) from None


@magics_class
class GPUMagics(Magics):
    @line_cell_magic
    def gpu(self, line: str, cell: str | None = None):
        __tracebackhide__ = True
        if cell is None:
            return self._line(line)
        args = _parse(_CELL, line)
        if args.help:
            print(USAGE)
            return None
        if args.timeout is not None and args.timeout <= 0:
            raise UsageError(f"--timeout must be positive seconds, got {args.timeout:g}")
        if args.wait is not None and not 0 <= args.wait <= 86400:
            raise UsageError(f"--wait must be seconds from 0 to 86400, got {args.wait:g}")
        request = _request(args)
        try:
            analyse(cell)  # a syntax error is the cell's, shown before anything starts or is leased
        except SyntaxError as e:
            _as_cell_error(e, self.shell.execution_count)
            raise
        session = connection.get_session()
        label = (cell.strip().splitlines() or [""])[0][:120]
        try:
            session.run(cell, self.shell.user_ns, request.over(session.default), args.timeout, label=label,
                        relay=IPythonRelay(self.shell), execution_count=self.shell.execution_count, wait=args.wait)
        except SyntaxError as e:
            _as_cell_error(e, self.shell.execution_count)
            raise
        return None

    gpu.__doc__ = USAGE

    def _line(self, line: str):
        args = _parse(_LINE, line)
        if args.help:
            print(USAGE)
            return None
        sized = any(v is not None for v in (args.memory, args.fraction, args.gpus, args.pool, args.wait))
        if sized and args.command != "attach":
            raise UsageError(f"%gpu {args.command} takes no slice options; they belong to `%gpu attach` or `%%gpu`")
        if args.command == "attach":
            session = connection.get_session()
            session.default = _request(args)
            if args.wait is not None:
                session.wait_s = args.wait
            result = session.check_environment(relay=IPythonRelay(self.shell))
            where = ", ".join(g["id"] for g in result.lease["gpus"])
            print(f"gpu-attach: cells in this notebook ask for {session.default.describe()} unless they say "
                  f"otherwise; the session's sandbox is ready ({where})")
        elif args.command == "detach":
            connection.close_session()
            print("gpu-attach: detached (the session's sandbox is ended, and the embedded broker, if any, stopped)")
        elif args.command == "pool":
            print(format_pool(connection.get_session().pool()))
        elif args.command == "widget":
            try:
                from .widget import widget as make_widget
            except ImportError as e:
                raise UsageError(f"the widget needs ipywidgets ({e}): pip install ipywidgets") from None
            return make_widget()
        else:
            print(format_status(connection.current_session()))
        return None


def _as_cell_error(e: SyntaxError, count: int) -> None:
    """Show a syntax error in a %%gpu cell as IPython shows one in the same cell run locally: where
    it is in the cell body (numbered as remote tracebacks are), and no frames of ours."""
    e.filename = f"Cell In[{count}]" if count else "<%%gpu cell>"
    e.__traceback__ = None
    e.gpu_attach_clean = True


def show_clean_syntax_error(shell, etype, value, tb, tb_offset=None):
    """IPython custom exception handler for SyntaxError: ours without frames, others as usual
    (a handler shows the traceback itself; IPython only keeps what it returns)."""
    if getattr(value, "gpu_attach_clean", False):
        stb = shell.SyntaxTB.structured_traceback(etype, value, [])
    elif hasattr(value, "_render_traceback_"):
        stb = value._render_traceback_()
    else:
        import traceback

        stb = shell.SyntaxTB.structured_traceback(etype, value, traceback.extract_tb(tb))
    shell._showtraceback(etype, value, stb)
    return stb


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
    remote = session.remote
    if remote.sandbox:
        lines.append(f"sandbox   on agent {remote.agent}, holding {len(remote.synced)} of this notebook's values")
    if remote.remote_only:
        lines.append("remote    these stay in the sandbox (later %%gpu cells can use them; they cannot travel here):")
        lines += [f"            {n}: {why}" for n, why in sorted(remote.remote_only.items())]
    last = session.last
    if last is not None:
        g = ", ".join(d["id"] + (" (simulated)" if d["simulated"] else "") for d in last.lease["gpus"])
        t = last.timings
        lines.append(f"last cell lease {last.lease['id']} on {g}: {t['total'] * 1000:.1f} ms in all, "
                     f"{last.remote_elapsed_s * 1000:.1f} ms running; sent {', '.join(last.sent) or 'nothing'}"
                     f" (already there: {', '.join(last.cached) or 'nothing'}); returned {', '.join(last.returned) or 'nothing'}")
    return "\n".join(lines)
