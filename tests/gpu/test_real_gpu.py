"""Real-GPU paths: NVML inventory, CuPy in a sandbox pinned to its slice, the memory cap, freeing.

Run on a host with an NVIDIA GPU and `pip install -e '.[gpu,test]'`: `python -m pytest -m gpu`.
"""

from __future__ import annotations

import pytest

from conftest import Site

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_site(tmp_path_factory):
    """A broker and an enrolled agent serving this host's real GPUs (as root: per-user uids,
    cgroups and the GPU device fence, as a shared site runs it)."""
    s = Site(tmp_path_factory.mktemp("gpu-site"))
    try:
        s.start_broker()
        s.start_agent("gpu", simulate=None)
        s.devices = s.ready["gpu"]["devices"]
        s.ready = s.ready["gpu"]
        yield s
    finally:  # an agent that does not start must not leave the broker running
        s.stop()


@pytest.fixture(scope="module")
def session(gpu_site):
    from conftest import TOKENS
    from jupyter_gpu_attach import GPUSession

    return GPUSession(gpu_site.url, TOKENS["alice"])


def test_nvml_inventory_is_real():
    from gpu_attach_server.agent.inventory import nvml_devices

    devices = nvml_devices()
    assert devices and all(not d.simulated for d in devices)
    assert all(d.uuid.startswith(("GPU-", "MIG-")) and d.memory > 1 << 30 for d in devices)


def test_agent_serves_real_devices(gpu_site):
    assert gpu_site.devices and not any(d["simulated"] for d in gpu_site.devices)
    pool = gpu_site.pool()
    assert all(not g["simulated"] for g in pool["gpus"])


def test_cupy_cell_runs_on_the_gpu_and_returns_numpy(session):
    import numpy as np

    from jupyter_gpu_attach import SliceRequest

    ns = {"x": np.random.rand(512, 512)}
    session.run("import cupy as cp\nassert not getattr(cp, '__simulated__', False)\n"
                "d = cp.asarray(x)\ny = d @ d\nn = cp.cuda.runtime.getDeviceCount()\n"
                "import os\nvisible = os.environ['CUDA_VISIBLE_DEVICES']",
                ns, SliceRequest.from_options(memory="1GiB"))
    assert isinstance(ns["y"], np.ndarray) and isinstance(ns["d"], np.ndarray)
    np.testing.assert_allclose(ns["y"], ns["x"] @ ns["x"], rtol=1e-6)
    assert ns["n"] == 1, "the sandbox must see only its own GPU"
    assert ns["visible"].startswith("GPU-")


def test_memory_cap_is_the_slice(session):
    from jupyter_gpu_attach import SliceRequest

    ns: dict = {}
    with pytest.raises(Exception) as info:
        session.run("import cupy as cp\nbig = cp.zeros(2 * 1024**3 // 8)", ns, SliceRequest.from_options(memory="1GiB"))
    assert "OutOfMemory" in type(info.value).__name__ or "out of memory" in str(info.value).lower()
    # The same allocation fits in a slice big enough for it.
    session.run("import cupy as cp\nbig = cp.zeros(2 * 1024**3 // 8)\nok = int(big.size)", ns,
                SliceRequest.from_options(memory="4GiB"))
    assert ns["ok"] == 2 * 1024**3 // 8


def test_gpu_memory_is_freed_after_each_cell(session):
    from jupyter_gpu_attach import SliceRequest

    ns: dict = {}
    session.run("import cupy as cp\nkeep = cp.ones(256 * 1024**2 // 8)\nused = cp.get_default_memory_pool().used_bytes()",
                ns, SliceRequest.from_options(memory="2GiB"))
    assert ns["used"] >= 256 * 1024**2
    session.run("import cupy as cp\npool = cp.get_default_memory_pool()\nafter = (pool.used_bytes(), pool.total_bytes())",
                ns, SliceRequest.from_options(memory="2GiB"))
    assert ns["after"] == (0, 0), "the previous cell's blocks must be back with the driver"


def test_torch_cuda_tensors_come_back_on_the_cpu(session):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch here has no CUDA build")
    from jupyter_gpu_attach import SliceRequest

    ns: dict = {}
    session.run("import torch\nt = torch.ones(4, device='cuda') * 3", ns, SliceRequest.from_options(memory="1GiB"))
    assert ns["t"].device.type == "cpu" and float(ns["t"].sum()) == 12.0


def test_device_arrays_leave_the_gpu_between_cells_and_come_back_for_the_next(session):
    """The session's namespace persists, but no GPU memory is held while no cell runs: a CuPy array
    left bound is parked in host memory and is a CuPy array again in the next cell that uses it."""
    from jupyter_gpu_attach import SliceRequest

    req = SliceRequest.from_options(memory="2GiB")
    ns: dict = {}
    session.run("import cupy as cp\nd = cp.arange(1024 * 1024, dtype=cp.float64)\nalias = d", ns, req)
    session.run("import cupy as cp\npool = cp.get_default_memory_pool()\nbetween = (pool.used_bytes(), pool.total_bytes())",
                ns, req)
    assert ns["between"] == (0, 0), "a parked array must not hold device memory"
    session.run("kind = type(d).__module__.split('.')[0]\nsame = d is alias\ntotal = float(d.sum())", ns, req)
    assert ns["kind"] == "cupy" and ns["same"] is True
    assert ns["total"] == float(sum(range(1024 * 1024)))


def test_a_cell_opens_its_own_gpu_node_and_no_other(gpu_site, session):
    """The device fence on a real GPU: the cell's own /dev/nvidiaN and /dev/nvidiactl open (CUDA
    ran in it already), and a node of another GPU minor, made beside it, is refused by the kernel
    even with CUDA_VISIBLE_DEVICES cleared."""
    import os

    from gpu_attach_server.agent.inventory import nvml_devices
    from jupyter_gpu_attach import SliceRequest

    if os.geteuid() != 0 or "GPU device fence" in " ".join(gpu_site.ready["unenforced"]):
        pytest.skip(f"this agent has no GPU device fence here: {gpu_site.ready['isolation']}")
    minors = {d.uuid: d.minor for d in nvml_devices()}
    ns: dict = {}
    session.run("import os\nhome = os.environ['HOME']\nvisible = os.environ['CUDA_VISIBLE_DEVICES']", ns,
                SliceRequest.from_options(memory="1GiB"))
    mine = minors[ns["visible"]]
    other = next(m for m in range(254) if m not in minors.values())
    # Beside HOME, in the agent's work root: HOME itself is a disk of the sandbox's own, mounted nodev.
    nodes = os.path.join(os.path.dirname(ns["home"]), "gpu-nodes")
    os.mkdir(nodes, 0o755)
    os.mknod(f"{nodes}/other", 0o20666, os.makedev(195, other))
    os.chmod(f"{nodes}/other", 0o666)
    probe = {"mine": mine, "nodes": nodes}
    session.run("import errno, os\nos.environ.pop('CUDA_VISIBLE_DEVICES', None)\ngot = []\n"
                "for path in (f'/dev/nvidia{mine}', '/dev/nvidiactl', os.path.join(nodes, 'other')):\n"
                "    try:\n        os.close(os.open(path, os.O_RDWR))\n        got.append('opened')\n"
                "    except OSError as e:\n        got.append(errno.errorcode[e.errno])\n", probe,
                SliceRequest.from_options(memory="1GiB"))
    assert probe["got"] == ["opened", "opened", "EPERM"]


def test_nvml_utilisation_is_sampled_for_usage_accounting():
    from gpu_attach_server.agent.inventory import NvmlSampler, nvml_devices

    uuids = [d.uuid for d in nvml_devices() if not d.mig]
    sampler = NvmlSampler.open(uuids)
    assert sampler is not None
    got = sampler.sample()
    assert set(got) == set(uuids) and all(0.0 <= v <= 1.0 for v in got.values())
