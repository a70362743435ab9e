"""Real public tutorials as notebooks, fetched at test time, for the differential test.

Issue 5 judges ``%%gpu`` on tutorials we did not write. Their text is not ours to commit, so this
module fetches each project's own source distribution from PyPI when the tests run, extracts only
the tutorial files, and converts them to notebooks (nbformat v4), one code cell per code block,
the code unchanged:

- NumPy (``doc/source/user/*.rst``, doctests): each run of consecutive ``>>>``/``...`` lines, up to
  the expected output, is one cell; the expected output is dropped.
- pandas (``doc/source/user_guide/*.rst``): each ``.. ipython:: python`` block is one cell.
  ``:suppress:`` blocks still run (the docs run them too); ``@savefig``/``@suppress`` pseudo-
  decorators are dropped; ``@verbatim`` blocks are not run by the docs and are left out. pandas
  stopped shipping its docs in the sdist with 2.1, so the pages come from the 2.0.3 sdist and run
  on the installed pandas.
- matplotlib (sphinx-gallery ``galleries/**.py``): the module docstring and the comment block
  after each ``# %%`` are text; the code between markers is one cell.

A cell is dropped only when it needs a module that is not installed (say ``df.to_hdf`` without
PyTables); the notebook's metadata and its first markdown cell list what was dropped and why. The
first cell credits the project, file, version and licence.

Cache (default ``~/.cache/gpu-attach/public-notebooks``, or ``$GPU_ATTACH_PUBLIC_NB_CACHE``)::

    sdist/   the extracted tutorial files, per NAME-VERSION (the archive itself is not kept)
    notebooks/STEM/STEM.ipynb   one folder per notebook: the harness copies a notebook's folder

Why not ``pip download --no-binary :all:``: for numpy, pandas and matplotlib it builds each
sdist's metadata first (meson, a compiler; minutes, and it fails here), although only the archive
is wanted. This asks the index's JSON simple API (PEP 691) for the file's URL and sha256, and
checks the hash.

From the repository root::

    python -m tests.public_notebooks            # fetch, convert, print the notebooks' paths
    python -m tests.differential $(python -m tests.public_notebooks)
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import json
import os
import re
import sys
import tarfile
import tempfile
import textwrap
import urllib.request
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import nbformat

INDEX = os.environ.get("GPU_ATTACH_PYPI_SIMPLE", "https://pypi.org/simple")
#: Bump to rebuild cached notebooks when the converter changes.
CONVERTER_VERSION = 3


def cache_dir() -> Path:
    return Path(os.environ.get("GPU_ATTACH_PUBLIC_NB_CACHE") or Path.home() / ".cache" / "gpu-attach" / "public-notebooks")


@dataclass(frozen=True)
class Tutorial:
    """One public tutorial page and how to convert it."""

    stem: str  # the notebook's name
    dist: str  # the PyPI distribution whose sdist holds the page
    member: str  # the page's path inside the sdist, below its NAME-VERSION/ folder
    kind: str  # "doctest", "ipython" or "gallery"
    licence: str
    pinned: str | None = None  # a fixed version; None: the version installed here

    def dist_version(self) -> str:
        if self.pinned:
            return self.pinned
        try:
            return version(self.dist)
        except PackageNotFoundError as e:
            raise RuntimeError(f"{self.dist} is not installed: `pip install {self.dist}` (the tutorial runs on it)") from e


#: What each project's docs build runs before a page, so the page's blocks can assume it. Without it
#: most of pandas' pages (no imports of their own) and NumPy's absolute_beginners (its import is a
#: prompt-less code-block) would be a NameError in every cell, in both runs: identical, but empty.
SETUP = {
    # numpy's doctests run with ``np`` in their namespace (doc/conftest.py, scipy-doctest's default).
    "numpy": "# The docs build's doctest namespace (numpy's doc/conftest.py)\nimport numpy as np",
    # pandas doc/source/conf.py: ipython_execlines, run before every page's ipython blocks.
    "pandas": ("# The docs build's setup (pandas doc/source/conf.py: ipython_execlines)\n"
               "import numpy as np\nimport pandas as pd\npd.options.display.encoding = \"utf8\""),
}

TUTORIALS = [
    Tutorial("numpy_quickstart", "numpy", "doc/source/user/quickstart.rst", "doctest", "BSD-3-Clause"),
    Tutorial("numpy_absolute_beginners", "numpy", "doc/source/user/absolute_beginners.rst", "doctest", "BSD-3-Clause"),
    Tutorial("pandas_10min", "pandas", "doc/source/user_guide/10min.rst", "ipython", "BSD-3-Clause", pinned="2.0.3"),
    Tutorial("pandas_missing_data", "pandas", "doc/source/user_guide/missing_data.rst", "ipython", "BSD-3-Clause",
             pinned="2.0.3"),
    Tutorial("pandas_text", "pandas", "doc/source/user_guide/text.rst", "ipython", "BSD-3-Clause", pinned="2.0.3"),
    Tutorial("pandas_reshaping", "pandas", "doc/source/user_guide/reshaping.rst", "ipython", "BSD-3-Clause",
             pinned="2.0.3"),
    Tutorial("matplotlib_pyplot", "matplotlib", "galleries/tutorials/pyplot.py", "gallery",
             "Matplotlib License (PSF-based, BSD-compatible)"),
    Tutorial("matplotlib_quick_start", "matplotlib", "galleries/users_explain/quick_start.py", "gallery",
             "Matplotlib License (PSF-based, BSD-compatible)"),
    Tutorial("matplotlib_lifecycle", "matplotlib", "galleries/tutorials/lifecycle.py", "gallery",
             "Matplotlib License (PSF-based, BSD-compatible)"),
    Tutorial("matplotlib_text_intro", "matplotlib", "galleries/users_explain/text/text_intro.py", "gallery",
             "Matplotlib License (PSF-based, BSD-compatible)"),
]

BY_STEM = {t.stem: t for t in TUTORIALS}


# ---------------------------------------------------------------------------------------------
# Fetching
# ---------------------------------------------------------------------------------------------

class IndexUnreachable(RuntimeError):
    """PyPI (or $GPU_ATTACH_PYPI_SIMPLE) could not be reached: the only reason the tests skip."""


def _sdist_url(dist: str, ver: str) -> tuple[str, str]:
    """The sdist's URL and sha256, from the index's JSON simple API."""
    req = urllib.request.Request(f"{INDEX.rstrip('/')}/{dist}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            files = json.load(r)["files"]
    except OSError as e:  # URLError, timeouts, refused connections
        raise IndexUnreachable(f"cannot reach {INDEX} for {dist}: {e}") from e
    want = {f"{dist}-{ver}.tar.gz", f"{dist.replace('-', '_')}-{ver}.tar.gz"}
    for f in files:
        if f["filename"] in want:
            return f["url"], f["hashes"]["sha256"]
    raise RuntimeError(f"{INDEX} lists no sdist {dist}-{ver}.tar.gz")


def fetch(tutorials: list[Tutorial], cache: Path) -> dict[Tutorial, Path]:
    """Each tutorial's page, extracted under ``cache/sdist/NAME-VERSION/``; downloads each sdist once."""
    out: dict[Tutorial, Path] = {}
    by_sdist: dict[tuple[str, str], list[Tutorial]] = {}
    for t in tutorials:
        by_sdist.setdefault((t.dist, t.dist_version()), []).append(t)
    for (dist, ver), group in by_sdist.items():
        root = cache / "sdist" / f"{dist}-{ver}"
        missing = [t for t in group if not (root / t.member).is_file()]
        if missing:
            _download_members(dist, ver, [t.member for t in missing], root)
        out.update({t: root / t.member for t in group})
    return out


def _download_members(dist: str, ver: str, members: list[str], root: Path) -> None:
    url, sha256 = _sdist_url(dist, ver)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpa-sdist-") as tmp:
        archive = Path(tmp) / "sdist.tar.gz"
        h = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=120) as r, open(archive, "wb") as f:
                while chunk := r.read(1 << 20):
                    h.update(chunk)
                    f.write(chunk)
        except OSError as e:
            raise IndexUnreachable(f"cannot download {url}: {e}") from e
        if h.hexdigest() != sha256:
            raise RuntimeError(f"{url}: sha256 {h.hexdigest()} is not the index's {sha256}; delete {root} and retry")
        with tarfile.open(archive) as tar:
            names = {n.split("/", 1)[1]: n for n in tar.getnames() if "/" in n}
            for m in members:
                if m not in names:
                    raise RuntimeError(f"{dist}-{ver}'s sdist has no {m}: the tutorial moved; update TUTORIALS "
                                       f"in {__file__}")
                data = tar.extractfile(names[m]).read()  # read, never extract: no paths from the archive
                target = root / m
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)


# ---------------------------------------------------------------------------------------------
# Converting
# ---------------------------------------------------------------------------------------------

_PROMPT = re.compile(r"^(\s*)(>>>|\.\.\.)( |$)(.*)$")


def doctest_cells(text: str) -> list[str]:
    """Each run of consecutive ``>>>``/``...`` lines is one cell; the expected output after it is dropped."""
    cells, current, indent = [], [], None
    for line in text.splitlines():
        m = _PROMPT.match(line)
        if m and (m.group(2) == ">>>" or current) and (indent is None or m.group(1) == indent):
            indent = m.group(1)
            current.append(m.group(4))
            continue
        if current:
            cells.append("\n".join(current).rstrip())
        current, indent = [], None
        if m and m.group(2) == ">>>":  # a prompt at another indentation starts a new cell
            indent = m.group(1)
            current.append(m.group(4))
    if current:
        cells.append("\n".join(current).rstrip())
    return [c for c in cells if c.strip()]


_DIRECTIVE = re.compile(r"^(\s*)\.\. ipython::\s*(\S*)\s*$")


def ipython_cells(text: str) -> list[str]:
    """Each ``.. ipython:: python`` block is one cell (options and pseudo-decorators handled)."""
    lines = text.splitlines()
    cells, i = [], 0
    while i < len(lines):
        m = _DIRECTIVE.match(lines[i])
        i += 1
        if not m:
            continue
        base = len(m.group(1))
        block = []
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > base):
            block.append(lines[i])
            i += 1
        body = textwrap.dedent("\n".join(block)).strip("\n").splitlines()
        while body and body[0].startswith(":"):  # :suppress:, :okexcept:, :okwarning: (all still run)
            body.pop(0)
        if m.group(2) != "python" or any(l.strip() == "@verbatim" for l in body):
            continue  # the docs do not run it either
        code = []
        for line in body:
            s = line.strip()
            if s.startswith(("@savefig", "@suppress", "@doctest")) or s in ("@okexcept", "@okwarning"):
                continue
            code.append(re.sub(r"^(In \[\d+\]: |\s*\.\.\.: ?)", "", line))
        source = "\n".join(code).strip("\n")
        if source.strip():
            cells.append(source)
    return cells


_SEPARATOR = re.compile(r"^(# %%.*|#{20,}\s*)$")


def gallery_cells(text: str) -> list[str]:
    """sphinx-gallery: the docstring and each comment block after a ``# %%`` are text; code between is a cell."""
    tree = ast.parse(text)
    start = 0
    if tree.body and isinstance(tree.body[0], ast.Expr) and isinstance(getattr(tree.body[0], "value", None), ast.Constant) \
            and isinstance(tree.body[0].value.value, str):
        start = tree.body[0].end_lineno
    lines = text.splitlines()[start:]
    blocks, current = [], []
    for line in lines:
        if _SEPARATOR.match(line):
            blocks.append(current)
            current = []
        else:
            current.append(line)
    blocks.append(current)
    cells = []
    for i, block in enumerate(blocks):
        if i > 0:  # the text block right after a separator: comment lines up to the first other line
            while block and (block[0].startswith("#") or not block[0].strip()):
                block = block[1:]
        source = "\n".join(block).strip("\n")
        if source.strip():
            cells.append(source)
    return cells


CONVERTERS = {"doctest": doctest_cells, "ipython": ipython_cells, "gallery": gallery_cells}

#: Calls that need an optional module pandas does not depend on.
_NEEDS = {"to_hdf": "tables", "read_hdf": "tables", "HDFStore": "tables", "to_excel": "openpyxl",
          "read_excel": "openpyxl", "to_parquet": "pyarrow", "read_parquet": "pyarrow", "to_feather": "pyarrow",
          "read_feather": "pyarrow", "to_orc": "pyarrow", "ArrowDtype": "pyarrow", "pyarrow": "pyarrow",
          "to_clipboard": "pyperclip", "to_markdown": "tabulate", "scipy": "scipy"}


#: ``interpolate`` methods that pandas delegates to SciPy (pandas' own: linear, time, index, pad...).
_SCIPY_METHODS = re.compile(r"""["'](barycentric|krogh|pchip|spline|polynomial|akima|cubicspline|from_derivatives|"""
                            r"""quadratic|cubic|slinear|zero|nearest|piecewise_polynomial)["']""")


def missing_module(source: str) -> str | None:
    """The first module the cell needs that is not installed here, or None."""
    needed = []
    try:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                needed += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                needed.append(node.module)
    except SyntaxError:
        pass
    needed += [mod for word, mod in _NEEDS.items() if re.search(rf"\b{word}\b", source)]
    if "interpolate(" in source and _SCIPY_METHODS.search(source):
        needed.append("scipy")
    for name in needed:
        top = name.split(".")[0]
        if importlib.util.find_spec(top) is None:
            return top
    return None


@dataclass
class Converted:
    tutorial: Tutorial
    version: str
    path: Path
    cells: int
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (first line, why)


def convert(t: Tutorial, page: Path, out_root: Path) -> Converted:
    """Write ``out_root/STEM/STEM.ipynb`` from the tutorial page."""
    ver = t.dist_version()
    sources = CONVERTERS[t.kind](page.read_text(encoding="utf-8"))
    kept, dropped = [], []
    if t.dist in SETUP:
        kept.append(SETUP[t.dist])
    for s in sources:
        mod = missing_module(s)
        if mod:
            dropped.append((s.strip().splitlines()[0][:80], f"needs {mod}, not installed"))
        else:
            kept.append(s)
    installed = version(t.dist)
    credit = (f"Converted at test time from **{t.dist} {ver}**, file `{t.member}` of its source distribution "
              f"on PyPI ({t.licence}; © the {t.dist} developers). Code cells are the page's code blocks, "
              f"unchanged; run on {t.dist} {installed}."
              + (" The first code cell is the docs build's own setup, which the page assumes." if t.dist in SETUP else ""))
    if dropped:
        credit += "\n\nDropped (they need modules not installed here):\n" + "\n".join(f"- `{s}`: {why}" for s, why in dropped)
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_markdown_cell(credit)] + [nbformat.v4.new_code_cell(s) for s in kept],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                  "gpu_attach_public": {"dist": t.dist, "version": ver, "member": t.member, "licence": t.licence,
                                        "installed": installed, "converter": CONVERTER_VERSION,
                                        "dropped": [list(d) for d in dropped]}})
    folder = out_root / t.stem
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{t.stem}.ipynb"
    nbformat.validate(nb)
    nbformat.write(nb, path)
    return Converted(t, ver, path, len(kept), dropped)


def build(stems: list[str] | None = None, cache: Path | None = None) -> list[Converted]:
    """Fetch (once) and convert the tutorials named by ``stems`` (default: all); return the notebooks."""
    cache = cache or cache_dir()
    chosen = [BY_STEM[s] for s in stems] if stems else list(TUTORIALS)
    pages = fetch(chosen, cache)
    return [convert(t, pages[t], cache / "notebooks") for t in chosen]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.public_notebooks", description=__doc__.split("\n\n")[0])
    parser.add_argument("stems", nargs="*", metavar="NAME",
                        help=f"which tutorials (default: all): {', '.join(BY_STEM)}")
    parser.add_argument("--cache", type=Path, help=f"cache folder (default {cache_dir()})")
    parser.add_argument("-v", "--verbose", action="store_true", help="say what was converted and dropped, on stderr")
    args = parser.parse_args(argv)
    unknown = [s for s in args.stems if s not in BY_STEM]
    if unknown:
        parser.error(f"unknown tutorial {', '.join(unknown)}: choose from {', '.join(BY_STEM)}")
    for c in build(args.stems or None, args.cache):
        print(c.path)
        if args.verbose:
            print(f"{c.tutorial.stem}: {c.tutorial.dist} {c.version} {c.tutorial.member}: {c.cells} code cells"
                  + "".join(f"\n  dropped {s!r}: {why}" for s, why in c.dropped), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
