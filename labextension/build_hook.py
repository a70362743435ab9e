"""hatch-jupyter-builder build function: build the panel with Node.js, or say why it was not.

Named in pyproject.toml (``build-function = "labextension.build_hook.build"``). Without Node.js
the Python package (magics, widget, server extension) still installs; the panel is missing
and this says how to build it.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "jupyter_gpu_attach" / "labextension"
HOW = ("install Node.js 20+ and run `pip install .` again, or build it in place with "
       "`cd labextension && npm install && npm run build`")


def build(target_name: str, version: str, **kwargs) -> None:
    if (TARGET / "package.json").exists() and not (ROOT / "labextension" / "src").exists():
        return  # a wheel built from an sdist that already holds the built panel
    if shutil.which("node") is None or shutil.which("npm") is None:
        print(f"\n*** jupyter-gpu-attach: Node.js not found, so the JupyterLab panel was NOT built; "
              f"the magics, widget and server extension are installed. To add the panel, {HOW}.\n",
              file=sys.stderr)
        return
    if not stale():
        return
    from hatch_jupyter_builder import npm_builder

    npm_builder(target_name, version, path=str(ROOT / "labextension"), build_cmd="build", npm=["npm"], force=True)


def stale() -> bool:
    """Whether the built panel is missing or older than any of its sources."""
    built = [p.stat().st_mtime for p in TARGET.rglob("*") if p.is_file()]
    if not (TARGET / "package.json").exists() or not built:
        return True
    src = ROOT / "labextension"
    sources = [*src.joinpath("src").rglob("*"), *src.joinpath("style").rglob("*"),
               src / "package.json", src / "tsconfig.json", src / "scripts" / "build-labextension.js"]
    return max(p.stat().st_mtime for p in sources if p.is_file()) > min(built)
