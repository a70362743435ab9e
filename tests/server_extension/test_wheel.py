"""The wheel carries the prebuilt JupyterLab panel and the config that enables the server extension,
so ``pip install jupyter-gpu-attach`` needs no Node.js and no ``jupyter server extension enable``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import REPO

DATA = "jupyter_gpu_attach-0.1.0.data/data/"


@pytest.mark.skipif(shutil.which("node") is None, reason="building the panel needs Node.js (CI has it)")
def test_wheel_holds_the_labextension_and_the_server_extension_config(tmp_path):
    # No build isolation: the test extras hold hatchling and hatch-jupyter-builder, so nothing is
    # downloaded; the panel is rebuilt only when its sources are newer than the last build.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(REPO)], check=True, timeout=600)
    (wheel,) = tmp_path.glob("jupyter_gpu_attach-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        config = json.loads(z.read(DATA + "etc/jupyter/jupyter_server_config.d/jupyter_gpu_attach.json"))
        lab = DATA + "share/jupyter/labextensions/jupyter-gpu-attach/"
        package = json.loads(z.read(lab + "package.json"))
    assert config["ServerApp"]["jpserver_extensions"] == {"jupyter_gpu_attach.server_extension": True}
    assert package["name"] == "jupyter-gpu-attach"
    entry = package["jupyterlab"]["_build"]["load"]
    assert lab + entry in names, f"the panel's entry point {entry} is missing from the wheel"
    assert lab + "install.json" in names
    assert "jupyter_gpu_attach/server_extension/handlers.py" in names
    assert not any("node_modules" in n for n in names)
