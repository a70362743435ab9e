"""``gpu-attach demo``: run the quickstart notebook headless on the embedded default and show,
from the broker's own records, that the GPU was held only while ``%%gpu`` cells ran."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from jupyter_gpu_attach.slices import format_size

#: How far a lease may stick out of its cell: clocks are one host's, but the timestamps are
#: taken in different processes, a few system calls apart.
TOLERANCE_S = 0.05


def find_notebook(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    here = Path(__file__).resolve()
    for candidate in (Path.cwd() / "examples" / "quickstart.ipynb",
                      here.parents[2] / "examples" / "quickstart.ipynb",              # a source checkout
                      here.parent / "demo_notebooks" / "quickstart.ipynb"):           # bundled in the wheel
        if candidate.exists():
            return candidate
    raise FileNotFoundError("the bundled quickstart.ipynb is missing from this installation; reinstall "
                            "jupyter-gpu-attach, or pass --notebook PATH")


def run(args) -> int:
    import nbclient
    import nbformat

    try:
        path = find_notebook(args.notebook)
        nb = nbformat.read(path, as_version=4)
    except (OSError, ValueError) as e:  # one line, not a traceback: the fix is the user's to make
        print(f"gpu-attach demo: cannot read the notebook: {e}", file=sys.stderr)
        return 2
    state = tempfile.mkdtemp(prefix="gpu-attach-demo-")
    saved = {k: os.environ.pop(k, None) for k in ("GPU_ATTACH_BROKER_URL", "GPU_ATTACH_TOKEN")}
    os.environ["GPU_ATTACH_STATE_DIR"] = state  # the kernel's embedded broker keeps its records here
    print(f"gpu-attach demo: running {path} headless on the embedded default (state in {state}) ...", flush=True)
    t0 = time.time()
    try:
        client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", record_timing=True,
                                         resources={"metadata": {"path": str(path.parent)}})
        client.execute()
        failed = None
    except nbclient.exceptions.CellExecutionError as e:
        failed = e
    except Exception as e:  # no python3 kernel, or the kernel died: say which, in one line
        print(f"gpu-attach demo: could not run the notebook: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              "(is ipykernel installed in this environment? `pip install ipykernel`)", file=sys.stderr)
        shutil.rmtree(state, ignore_errors=True)
        return 2
    finally:
        os.environ.pop("GPU_ATTACH_STATE_DIR", None)
        os.environ.update({k: v for k, v in saved.items() if v is not None})
    print(f"executed in {time.time() - t0:.1f} s\n")
    print_outputs(nb)
    if args.output:
        nbformat.write(nb, args.output)
        print(f"executed notebook saved to {args.output}")
    if failed is not None:
        print(f"\ngpu-attach demo: a cell failed:\n{failed}", file=sys.stderr)
        return 1
    ok = print_timeline(nb, Path(state) / "broker.sqlite")
    shutil.rmtree(state, ignore_errors=True)  # it holds the embedded broker's signing key
    return 0 if ok else 1


def print_outputs(nb) -> None:
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        print(f"In [{cell.get('execution_count') or ' '}]: " + cell.source.replace("\n", "\n        "))
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                text = out.text
            elif out.output_type == "error":
                text = f"{out.ename}: {out.evalue}"
            else:
                text = out.get("data", {}).get("text/plain", "")
            if text:
                print("  " + text.rstrip().replace("\n", "\n  "))
        print()


def _cell_times(cell) -> tuple[float, float] | None:
    ex = cell.get("metadata", {}).get("execution", {})
    try:
        start = datetime.fromisoformat(ex["iopub.execute_input"].replace("Z", "+00:00")).timestamp()
        end = datetime.fromisoformat(ex["shell.execute_reply"].replace("Z", "+00:00")).timestamp()
    except (KeyError, ValueError):
        return None
    return start, end


def load_leases(db: Path) -> list[dict]:
    from sqlalchemy import select

    from .broker.store import Store, lease_gpus, leases, make_engine

    store = Store(make_engine(str(db)))
    with store.read() as conn:
        rows = [dict(r._mapping) for r in conn.execute(select(leases).order_by(leases.c.granted_at))]
        for r in rows:
            r["slots"] = [dict(s._mapping) for s in conn.execute(
                select(lease_gpus.c.gpu_id, lease_gpus.c.memory).where(lease_gpus.c.lease_id == r["id"]))]
    store.engine.dispose()
    return rows


def print_timeline(nb, db: Path) -> bool:
    """Print cells and leases on one clock; True when every lease lies inside a %%gpu cell."""
    if not db.exists():
        print("no broker records found: did the notebook run a %%gpu cell?")
        return False
    leases = load_leases(db)
    cells = [(c, _cell_times(c)) for c in nb.cells if c.cell_type == "code"]
    cells = [(c, t) for c, t in cells if t]
    if not cells:
        print("the notebook carries no cell timings")
        return False
    origin = cells[0][1][0]
    rel = lambda t: t - origin  # noqa: E731
    print("Lease timeline (seconds from the first cell; from the kernel's cell timings and the broker's records)")
    print(f"  {'cell':<6}{'kind':<7}{'ran':<19}GPU held")
    gpu_cells = []
    # A lease belongs to the last cell that started before it was granted (by the clock, not by
    # label: what IPython calls a cell's number while it runs changed between versions).
    owner = {lz["id"]: max((i for i, (_, (s, _)) in enumerate(cells) if s <= lz["granted_at"]), default=0)
             for lz in leases}
    for i, (c, (start, end)) in enumerate(cells):
        is_gpu = c.source.lstrip().startswith("%%gpu")
        held = [lz for lz in leases if owner[lz["id"]] == i]
        if is_gpu:
            gpu_cells.append((start, end))
        desc = "-"
        if held:
            desc = "; ".join(
                f"{lz['id']} on {','.join(s['gpu_id'] for s in lz['slots'])} "
                f"({format_size(lz['slots'][0]['memory']) if lz['slots'] else '?'}): "
                f"{rel(lz['granted_at']):.3f} - {rel(lz['ended_at'] or lz['expires_at']):.3f} "
                f"[{lz['state']}]" for lz in held)
        print(f"  [{c.execution_count}]{'':<{4 - len(str(c.execution_count))}}{'%%gpu' if is_gpu else 'cpu':<7}"
              f"{rel(start):7.3f} - {rel(end):7.3f}  {desc}")

    total = cells[-1][1][1] - origin
    held_s = sum((lz["ended_at"] or lz["expires_at"]) - lz["granted_at"] for lz in leases)
    inside = all(
        any(s - TOLERANCE_S <= lz["granted_at"] and (lz["ended_at"] or 1e18) <= e + TOLERANCE_S for s, e in gpu_cells)
        for lz in leases)
    released = all(lz["state"] == "released" for lz in leases)
    sims = {s["gpu_id"] for lz in leases for s in lz["slots"]}
    print(f"\n  {len(leases)} lease(s) on {', '.join(sorted(sims)) or 'no GPU'}; GPU held {held_s:.3f} s of "
          f"{total:.3f} s notebook time ({held_s / total:.1%})" if total > 0 else "")
    print(f"  every lease lies inside its %%gpu cell: {'yes' if inside else 'NO'}; "
          f"every lease released when its cell ended: {'yes' if released else 'NO'}")
    return inside and released and bool(leases)
