"""The kernel's and the sandbox's Pythons must agree where pickles cross: compare them up front.

Checked at the first cell of a session (and at ``%gpu attach``), before any value is unpickled:
a mismatch that breaks unpickling is refused with what to install, a risky one is a warning.
"""

from __future__ import annotations

import sys

#: Libraries whose pickles cross between the notebook and the sandbox.
LIBRARIES = ("numpy", "cloudpickle", "pandas", "torch")


def environment() -> dict[str, str]:
    """This side's Python and the versions of the libraries whose values cross between sides."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": "%d.%d.%d" % sys.version_info[:3]}
    for name in LIBRARIES:
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "__version__", None):
            out[name] = str(mod.__version__)
            continue
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def compare(kernel: dict[str, str], sandbox: dict[str, str]) -> tuple[list[str], list[str]]:
    """``(fatal, warnings)``: each a sentence naming both versions and what to install."""
    fatal: list[str] = []
    warnings: list[str] = []

    def major_minor(v: str) -> tuple[str, ...]:
        return tuple(v.split(".")[:2])

    def major(v: str) -> str:
        return v.split(".")[0]

    k, s = kernel.get("python"), sandbox.get("python")
    if k and s and major_minor(k) != major_minor(s):
        fatal.append(f"the notebook runs Python {k} and the GPU host's sandbox Python {s}: functions defined in "
                     f"the notebook cannot travel between them. Run the agent with Python "
                     f"{'.'.join(major_minor(k))} (or the kernel with {'.'.join(major_minor(s))})")
    for lib in LIBRARIES:
        k, s = kernel.get(lib), sandbox.get(lib)
        if not k or not s or k == s:
            continue
        if lib in ("numpy", "cloudpickle") and major(k) != major(s):
            fatal.append(f"{lib} {k} in the notebook but {s} on the GPU host: their pickles are not compatible. "
                         f"Install {lib}=={k} on the GPU host (or {lib}=={s} in the kernel)")
        elif major_minor(k) != major_minor(s):
            warnings.append(f"{lib} {k} in the notebook but {s} on the GPU host; values may not load. "
                            f"Install {lib}=={k} on the GPU host to be sure")
    return fatal, warnings
