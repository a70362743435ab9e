"""The differential test of ``%%gpu`` fidelity: a notebook run plainly, and with every code cell under ``%%gpu``.

A ``%%gpu`` cell should behave like the same cell run locally. This module measures how far that
holds on whole notebooks:

1. run the notebook plainly, twice (cells whose outputs differ between those two runs are
   *nondeterministic*: they are compared by structure only);
2. run it once more with ``%load_ext jupyter_gpu_attach`` first and every code cell prefixed with
   ``%%gpu`` (before any cell magic it already has, so ``%%timeit`` becomes ``%%gpu`` + ``%%timeit``);
3. compare, per code cell: output types and MIME types, text/plain, text/html and stream text
   (normalised: addresses, timings, temp paths, gpu-attach's own notices), images by presence and
   size, error-ness and exception name; and the kernel's final namespace (names and type names,
   CuPy arrays accepted where NumPy arrays were).

Each run gets a fresh copy of the notebook's folder (so data files beside it are found by relative
path, and files one run writes cannot change the next) and one kernel, on the embedded default
broker (no ``GPU_ATTACH_BROKER_URL``; simulated devices on a machine without a GPU).

From the repository root::

    python -m tests.differential tests/notebooks/*.ipynb [--json report.json] [--transform wrong] [--cache DIR]

prints the identical share (identical cells / code cells), per notebook, and every differing cell
with a short diff and a classification.
"""

from __future__ import annotations

import argparse
import base64
import difflib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import nbformat

NOTEBOOKS = Path(__file__).resolve().parent / "notebooks"

#: Where the kernel's namespace is dumped, after the notebook's own cells (never under %%gpu).
_NAMESPACE_MARK = "__differential_namespace__="
_NAMESPACE_SOURCE = f"""\
def __differential_dump():
    import json, types
    ip = get_ipython()
    hidden = set(ip.user_ns_hidden)
    out = {{}}
    for k, v in list(ip.user_ns.items()):
        if k.startswith('_') or k in hidden or k in ('In', 'Out', 'exit', 'quit', 'get_ipython'):
            continue
        t = type(v)
        name = t.__module__ + '.' + t.__qualname__
        if isinstance(v, types.ModuleType):
            name += ':' + v.__name__
        out[k] = name
    print({_NAMESPACE_MARK!r} + json.dumps(out, sort_keys=True))
__differential_dump()
del __differential_dump
"""


# ---------------------------------------------------------------------------------------------
# Transforms: what a run does to each code cell's source
# ---------------------------------------------------------------------------------------------

def plain(source: str) -> str:
    """The cell as written."""
    return source


def under_gpu(source: str) -> str:
    """The cell under ``%%gpu``. A cell magic the cell starts with (``%%timeit``) goes after it."""
    return "%%gpu\n" + source


def wrong_transform(source: str) -> str:
    """A deliberately wrong transform (it drops each cell's last line), to check the yardstick can fail."""
    lines = source.rstrip().splitlines()
    return "\n".join(lines[:-1]) if len(lines) > 1 else "pass"


TRANSFORMS: dict[str, tuple[Callable[[str], str], bool]] = {
    # name: (transform, whether the extension is loaded first)
    "plain": (plain, False),
    "gpu": (under_gpu, True),
    "wrong": (wrong_transform, False),
}


def code_cells(nb) -> list[int]:
    """Indices of the code cells that count: every code cell with any source."""
    return [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.source.strip()]


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    """One execution of a notebook: each counted cell's outputs, and the final namespace."""

    outputs: list[list[dict]]
    namespace: dict[str, str]
    workdir: str
    seconds: float
    aborted: str | None = None  # why the run stopped early (the kernel died), if it did


def run_notebook(path: Path, transform: str = "plain", cell_timeout: float = 120, env: dict | None = None) -> Run:
    """Execute ``path`` on a fresh kernel in a fresh copy of its folder, cells rewritten by ``transform``."""
    import nbclient

    fn, load_ext = TRANSFORMS[transform]
    path = Path(path).resolve()
    nb = nbformat.read(path, as_version=4)
    counted = code_cells(nb)
    cells = []
    if load_ext:
        cells.append(nbformat.v4.new_code_cell("%load_ext jupyter_gpu_attach"))
    first = len(cells)
    for i in counted:
        cells.append(nbformat.v4.new_code_cell(fn(nb.cells[i].source)))
    cells.append(nbformat.v4.new_code_cell(_NAMESPACE_SOURCE))
    run_nb = nbformat.v4.new_notebook(cells=cells, metadata=nb.metadata)

    with tempfile.TemporaryDirectory(prefix="gpa-diff-") as tmp:
        workdir = Path(tmp) / "nb"
        shutil.copytree(path.parent, workdir, ignore=shutil.ignore_patterns("*.ipynb", ".ipynb_checkpoints"))
        state = Path(tmp) / "state"
        kernel_env = {k: v for k, v in (env or os.environ).items() if k not in ("GPU_ATTACH_BROKER_URL", "GPU_ATTACH_TOKEN")}
        # Same hash seed in every run: set ordering in printed output is then not a difference.
        kernel_env.update(GPU_ATTACH_STATE_DIR=str(state), PYTHONHASHSEED="0")
        # A cell past its timeout is interrupted and recorded as an error ("CellTimeout"), and the
        # run goes on: one hung cell must not hide the rest of the notebook.
        client = nbclient.NotebookClient(
            run_nb, timeout=cell_timeout, kernel_name="python3", allow_errors=True, coalesce_streams=True,
            interrupt_on_timeout=True, error_on_timeout={"ename": "CellTimeout", "evalue": f"over {cell_timeout:g} s",
                                                         "traceback": []},
            resources={"metadata": {"path": str(workdir)}}, record_timing=False)
        started = time.monotonic()
        aborted = None
        try:
            # Extra keywords go to the kernel's Popen: its own stderr (transport warnings) is not cell output.
            client.execute(env=kernel_env, stderr=subprocess.DEVNULL)
        except Exception as e:  # the kernel died: the cells it did not run count as failed
            aborted = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        seconds = time.monotonic() - started
        outputs = []
        died = {"output_type": "error", "ename": "KernelDied", "evalue": aborted, "traceback": []}
        for c in run_nb.cells[first:first + len(counted)]:
            if aborted and c.get("execution_count") is None:  # never ran
                if outputs and not any(o["output_type"] == "error" for o in outputs[-1]):
                    outputs[-1].append(died)  # the cell the kernel died in
                outputs.append([died])
            else:
                outputs.append([_plain_output(o) for o in c.outputs])
        namespace = _namespace(run_nb.cells[-1].outputs, required=transform == "plain" and not aborted)
        if aborted and transform == "plain":
            raise RuntimeError(f"the plain run of {path.name} stopped: {aborted}")
        return Run(outputs, namespace, str(workdir), seconds, aborted)


def _plain_output(o) -> dict:
    return json.loads(json.dumps(o))


def _namespace(outputs, required: bool = True) -> dict[str, str]:
    for o in outputs:
        if o.get("output_type") == "stream":
            for line in o.get("text", "").splitlines():
                if line.startswith(_NAMESPACE_MARK):
                    return json.loads(line[len(_NAMESPACE_MARK):])
    if not required:  # the compared run's kernel is broken: every name counts as missing
        return {}
    errors = [f"{o.get('ename')}: {o.get('evalue')}" for o in outputs if o.get("output_type") == "error"]
    raise RuntimeError(f"the namespace dump printed nothing ({errors or outputs})")


# ---------------------------------------------------------------------------------------------
# Normalising and comparing
# ---------------------------------------------------------------------------------------------

_HEX = re.compile(r"0x[0-9a-fA-F]{4,}")
_NUMBER = r"[0-9][0-9,]*(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?"  # IPython may write "1e+03 ns"
_UNIT = r"(?:ns|\u00b5s|\u03bcs|us|ms|s|min|h)"  # IPython writes micro as U+03BC or U+00B5
# %timeit: "1.23 ms ± 45.6 µs per loop (mean ± std. dev. of 7 runs, 1,000 loops each)"
_TIMEIT = re.compile(rf"{_NUMBER} ?{_UNIT} ± {_NUMBER} ?{_UNIT} per loop \(mean ± std\. dev\. of {_NUMBER} runs?, {_NUMBER} loops? each\)")
_TIMEIT_SHORT = re.compile(rf"(?:best of {_NUMBER}: )?{_NUMBER} ?{_UNIT} per loop")
# Shown or not by chance: the whole line goes.
_SLOWEST = re.compile(r"^The slowest run took [0-9.]+ times longer than the fastest\..*\n?", re.M)
# %time: "CPU times: user 1.2 ms, sys: 0 ns, total: 1.2 ms\nWall time: 2.3 ms"
_TIME = re.compile(rf"(CPU times: |user |sys: |total: |Wall time: ){_NUMBER} ?{_UNIT}")
_TMP = re.compile(r"(/tmp|/var/tmp|/var/folders)/[^\s'\"]+")


def normalise_text(text: str, workdir: str = "") -> str:
    """Text with what legitimately varies between runs masked: addresses, timings, temp paths, gpu-attach's notices."""
    if workdir:
        text = text.replace(workdir, "<NOTEBOOK_DIR>")
    text = _TIMEIT.sub("<TIMEIT>", text)
    text = _TIMEIT_SHORT.sub("<TIMEIT>", text)
    text = _SLOWEST.sub("", text)
    text = _TIME.sub(lambda m: m.group(1) + "<T>", text)
    text = _HEX.sub("0x<ADDR>", text)
    text = _TMP.sub("<TMP>", text)
    return text


def _strip_notices(text: str) -> str:
    """stderr without gpu-attach's own notice lines (the embedded broker's start, the simulated device)."""
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith("gpu-attach:"))


def _png_size(data: str) -> tuple[int, int] | None:
    try:
        raw = base64.b64decode(data[:64] + "=" * (-len(data[:64]) % 4))
        if raw[:8] == b"\x89PNG\r\n\x1a\n":
            return struct.unpack(">II", raw[16:24])
    except Exception:
        pass
    return None


def _image_class(mime: str, data) -> str:
    """An image by presence and size class: PNG dimensions rounded to 10 px, else bytes to a power of two."""
    if isinstance(data, list):
        data = "".join(data)
    if mime == "image/png":
        size = _png_size(data)
        if size:
            return f"png~{round(size[0], -1)}x{round(size[1], -1)}"
    return f"{mime}~2^{max(len(data), 1).bit_length()}"


def canonical(outputs: list[dict], workdir: str) -> dict:
    """A cell's outputs as comparable data: streams by name, rich outputs in order, the error's name."""
    streams: dict[str, str] = {}
    rich: list[tuple] = []
    error = None
    for o in outputs:
        kind = o.get("output_type")
        if kind == "stream":
            streams[o["name"]] = streams.get(o["name"], "") + o.get("text", "")
        elif kind in ("display_data", "execute_result", "update_display_data"):
            data = o.get("data", {})
            items = []
            for mime in sorted(data):
                value = data[mime]
                if mime.startswith("image/"):
                    items.append((mime, _image_class(mime, value)))
                elif mime in ("text/plain", "text/html", "text/markdown", "text/latex"):
                    items.append((mime, normalise_text("".join(value) if isinstance(value, list) else value, workdir)))
                else:
                    items.append((mime, None))
            rich.append((kind, tuple(items)))
        elif kind == "error":
            error = o.get("ename")
    if "stderr" in streams:
        streams["stderr"] = _strip_notices(streams["stderr"])
    streams = {k: normalise_text(v, workdir) for k, v in streams.items() if v}
    return {"streams": streams, "rich": rich, "error": error}


def structure(c: dict) -> dict:
    """Only the shape of a cell's outputs: stream names, output kinds and MIME types, the error's name."""
    return {"streams": sorted(c["streams"]), "rich": [(k, tuple(m for m, _ in items)) for k, items in c["rich"]],
            "error": c["error"]}


def _type_ok(plain_type: str, other_type: str) -> bool:
    if plain_type == other_type:
        return True
    # GPU arrays arrive as NumPy: where the plain run has NumPy, a CuPy array (or the simulated stand-in) is fine.
    return plain_type == "numpy.ndarray" and other_type.split(".")[0] in ("cupy", "gpu_attach_server")


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------

@dataclass
class CellDiff:
    index: int
    source: str
    classification: str
    diff: str
    nondeterministic: bool


@dataclass
class NotebookReport:
    notebook: str
    code_cells: int
    identical: int
    nondeterministic: int
    differing: list[CellDiff] = field(default_factory=list)
    namespace_missing: dict[str, str] = field(default_factory=dict)
    namespace_extra: dict[str, str] = field(default_factory=dict)
    namespace_type: dict[str, tuple[str, str]] = field(default_factory=dict)
    namespace_remote: dict[str, str] = field(default_factory=dict)
    namespace_names: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def share(self) -> float:
        return self.identical / self.code_cells if self.code_cells else 1.0

    @property
    def namespace_matching(self) -> int:
        return self.namespace_names - len(self.namespace_missing) - len(self.namespace_type)


def compare(path: Path, reference: Run, control: Run, candidate: Run) -> NotebookReport:
    """Compare ``candidate`` with ``reference`` cell by cell; ``control`` (a second plain run) finds nondeterminism."""
    nb = nbformat.read(path, as_version=4)
    sources = [nb.cells[i].source for i in code_cells(nb)]
    report = NotebookReport(Path(path).name, len(sources), 0, 0,
                            seconds={"plain": reference.seconds, "control": control.seconds, "candidate": candidate.seconds})
    for i, source in enumerate(sources):
        ref = canonical(reference.outputs[i], reference.workdir)
        ctl = canonical(control.outputs[i], control.workdir)
        got = canonical(candidate.outputs[i], candidate.workdir)
        nondet = ref != ctl
        report.nondeterministic += nondet
        same = structure(ref) == structure(got) if nondet else ref == got
        if same:
            report.identical += 1
            continue
        report.differing.append(CellDiff(i, source, classify(ref, got, candidate.outputs[i]), short_diff(ref, got), nondet))
    ref_ns, got_ns = reference.namespace, candidate.namespace
    report.namespace_names = len(ref_ns)
    # A name that cannot travel (a generator, an open file) stays in the session's sandbox by
    # design; when gpu-attach said so, its absence from the kernel is not a difference.
    announced = stays_remote(candidate.outputs)
    report.namespace_remote = {k: v for k, v in ref_ns.items() if k not in got_ns and k in announced}
    report.namespace_missing = {k: v for k, v in ref_ns.items() if k not in got_ns and k not in announced}
    report.namespace_extra = {k: v for k, v in got_ns.items() if k not in ref_ns}
    report.namespace_type = {k: (v, got_ns[k]) for k, v in ref_ns.items() if k in got_ns and not _type_ok(v, got_ns[k])}
    return report


_STAYS = re.compile(r"^gpu-attach:.*?'([A-Za-z_][A-Za-z0-9_]*)'.*\b(?:stays|remains|kept)\b", re.M)


def stays_remote(outputs: list[list[dict]]) -> set[str]:
    """Names gpu-attach announced (on stderr) as staying on the GPU host."""
    names = set()
    for cell in outputs:
        for o in cell:
            if o.get("output_type") == "stream" and o.get("name") == "stderr":
                names.update(_STAYS.findall(o.get("text", "")))
    return names


def classify(ref: dict, got: dict, raw: list[dict]) -> str:
    """A short guess at why a cell differs, for the report (the diff is the evidence)."""
    if got["error"] and got["error"] != ref["error"]:
        evalue = next((o.get("evalue", "") for o in raw if o.get("output_type") == "error"), "")
        kind = {
            "NameError": "name from an earlier cell missing",
            "SyntaxError": "IPython syntax (magics, !cmd) not accepted",
            "FileNotFoundError": "relative path / working directory",
            "ModuleNotFoundError": "module missing remotely",
            "UsageError": "magic usage",
        }.get(got["error"], "error only under %%gpu")
        return f"{kind}: {got['error']}: {evalue.splitlines()[0][:100] if evalue else ''}".rstrip(": ")
    if ref["error"] and not got["error"]:
        return f"error lost: the plain run raised {ref['error']}"
    if ref["error"] != got["error"]:
        return f"different error: {ref['error']} -> {got['error']}"
    ref_kinds = [k for k, _ in ref["rich"]]
    got_kinds = [k for k, _ in got["rich"]]
    if "execute_result" in ref_kinds and "execute_result" not in got_kinds:
        return "bare last expression not shown (no Out[])"
    ref_imgs = sum(any(m.startswith("image/") for m, _ in items) for _, items in ref["rich"])
    got_imgs = sum(any(m.startswith("image/") for m, _ in items) for _, items in got["rich"])
    if got_imgs < ref_imgs:
        return f"figure lost ({ref_imgs} -> {got_imgs})"
    if got_imgs > ref_imgs:
        return f"figure duplicated ({ref_imgs} -> {got_imgs})"
    ref_mimes = [tuple(m for m, _ in items) for _, items in ref["rich"]]
    got_mimes = [tuple(m for m, _ in items) for _, items in got["rich"]]
    if ref_mimes != got_mimes:
        if len(ref_mimes) == len(got_mimes):
            return "rich output lost (MIME types differ, e.g. HTML shown as text)"
        return f"display outputs differ ({len(ref_mimes)} -> {len(got_mimes)})"
    if ref["rich"] != got["rich"]:
        return "rich output content differs"
    if ref["streams"].get("stdout", "") != got["streams"].get("stdout", ""):
        return "printed output differs"
    return "stderr differs"


def short_diff(ref: dict, got: dict, limit: int = 12) -> str:
    def lines(c):
        out = []
        for name, text in sorted(c["streams"].items()):
            out += [f"{name}: {line}" for line in text.splitlines()]
        for kind, items in c["rich"]:
            for mime, value in items:
                text = value if isinstance(value, str) else str(value)
                first = (text or "").splitlines()[:3]
                out += [f"{kind} {mime}: {line[:100]}" for line in first] or [f"{kind} {mime}"]
        if c["error"]:
            out.append(f"error: {c['error']}")
        return out

    diff = list(difflib.unified_diff(lines(ref), lines(got), "plain", "%%gpu", n=0, lineterm=""))[2:]
    diff = [d for d in diff if not d.startswith("@@")]
    if len(diff) > limit:
        diff = diff[:limit] + [f"... ({len(diff) - limit} more lines)"]
    return "\n".join(diff)


def run_differential(path: Path, transform: str = "gpu", cell_timeout: float = 120,
                     cache: Path | None = None) -> NotebookReport:
    """The whole measurement for one notebook: plain, plain again, then ``transform``.

    With ``cache``, the two plain runs are kept there, keyed by the notebook's bytes, its folder's
    files and the versions that shape output, so iterating on ``%%gpu`` reruns only the third."""
    plain = _cached_plain(Path(path), cell_timeout, cache) if cache else None
    if plain is None:
        plain = (run_notebook(path, "plain", cell_timeout), run_notebook(path, "plain", cell_timeout))
        if cache:
            _store_plain(Path(path), cache, plain)
    candidate = run_notebook(path, transform, cell_timeout)
    return compare(path, plain[0], plain[1], candidate)


def _plain_key(path: Path) -> str:
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    h = hashlib.sha256(sys.version.encode())
    for dist in ("ipython", "ipykernel", "numpy", "pandas", "matplotlib", "scipy"):
        try:
            h.update(f"{dist}={version(dist)};".encode())
        except PackageNotFoundError:
            pass
    for f in sorted(p for p in path.parent.rglob("*") if p.is_file() and (p == path or p.suffix != ".ipynb")):
        h.update(str(f.relative_to(path.parent)).encode() + f.read_bytes())
    return f"{path.stem}-{h.hexdigest()[:16]}.json"


def _cached_plain(path: Path, cell_timeout: float, cache: Path) -> tuple[Run, Run] | None:
    f = cache / _plain_key(path)
    if not f.exists():
        return None
    data = json.loads(f.read_text())
    return Run(**data["reference"]), Run(**data["control"])


def _store_plain(path: Path, cache: Path, plain: tuple[Run, Run]) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    (cache / _plain_key(path)).write_text(json.dumps({"reference": asdict(plain[0]), "control": asdict(plain[1])}))


@dataclass
class Summary:
    reports: list[NotebookReport]

    @property
    def code_cells(self) -> int:
        return sum(r.code_cells for r in self.reports)

    @property
    def identical(self) -> int:
        return sum(r.identical for r in self.reports)

    @property
    def share(self) -> float:
        return self.identical / self.code_cells if self.code_cells else 1.0

    @property
    def namespace_share(self) -> float:
        names = sum(r.namespace_names for r in self.reports)
        return sum(r.namespace_matching for r in self.reports) / names if names else 1.0

    def format(self, cells: bool = True) -> str:
        out = [f"{'notebook':<44} {'cells':>5} {'same':>5} {'share':>6} {'nondet':>6} {'names':>9}"]
        for r in self.reports:
            out.append(f"{r.notebook:<44} {r.code_cells:>5} {r.identical:>5} {r.share:>6.1%} {r.nondeterministic:>6} "
                       f"{r.namespace_matching:>4}/{r.namespace_names:<4}")
        out.append(f"{'TOTAL':<44} {self.code_cells:>5} {self.identical:>5} {self.share:>6.1%} "
                   f"{sum(r.nondeterministic for r in self.reports):>6}   names {self.namespace_share:.1%}")
        if cells:
            classes: dict[str, int] = {}
            for r in self.reports:
                for d in r.differing:
                    key = d.classification.split(":")[0]
                    classes[key] = classes.get(key, 0) + 1
            if classes:
                out.append("\ndiffering cells by classification:")
                out += [f"  {n:>4}  {k}" for k, n in sorted(classes.items(), key=lambda kv: -kv[1])]
            for r in self.reports:
                for d in r.differing:
                    first = d.source.strip().splitlines()[0][:70]
                    out.append(f"\n--- {r.notebook} cell {d.index}{' (nondeterministic: structure only)' if d.nondeterministic else ''}: "
                               f"{d.classification}\n    source: {first}")
                    out += ["    " + line for line in d.diff.splitlines()]
                if r.namespace_missing or r.namespace_type:
                    out.append(f"\n--- {r.notebook} namespace: missing {sorted(r.namespace_missing)}; "
                               f"other type {r.namespace_type}")
                if r.namespace_remote:
                    out.append(f"\n--- {r.notebook} namespace: staying remote, as announced (not counted as "
                               f"differences): {sorted(r.namespace_remote)}")
        return "\n".join(out)


def run_all(paths: list[Path], transform: str = "gpu", cell_timeout: float = 120, cache: Path | None = None) -> Summary:
    return Summary([run_differential(Path(p), transform, cell_timeout, cache) for p in paths])


def assert_fidelity(paths: list[Path], target: float = 0.95, what: str = "code cells") -> Summary:
    """Run the differential on ``paths`` and fail (with the per-cell report) under ``target``."""
    summary = run_all(paths)
    print(summary.format())
    assert summary.share >= target, (
        f"{summary.identical}/{summary.code_cells} {what} identical under %%gpu "
        f"({summary.share:.1%}, target {target:.0%}):\n{summary.format()}")
    assert summary.namespace_share >= target, f"namespaces differ ({summary.namespace_share:.1%}):\n{summary.format()}"
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.differential", description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks (default: every one in tests/notebooks)")
    parser.add_argument("--transform", choices=sorted(TRANSFORMS), default="gpu",
                        help="what the compared run does to each cell (plain: check the yardstick; wrong: a broken one)")
    parser.add_argument("--cell-timeout", type=float, default=120)
    parser.add_argument("--json", type=Path, help="also write the full report here")
    parser.add_argument("--cache", type=Path, help="keep the plain runs in this folder and reuse them while the "
                        "notebook, its data and the library versions are unchanged")
    parser.add_argument("--quiet", action="store_true", help="only the table, not every differing cell")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted(NOTEBOOKS.rglob("*.ipynb"))
    started = time.monotonic()
    summary = run_all(paths, args.transform, args.cell_timeout, args.cache)
    print(summary.format(cells=not args.quiet))
    print(f"\n{summary.identical}/{summary.code_cells} code cells identical ({summary.share:.1%}) "
          f"with --transform {args.transform}, in {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) | {"share": r.share} for r in summary.reports], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
