"""The agent's NVML utilisation sampler and what a heartbeat says of each running lease, over a
stand-in ``pynvml`` module (the real one runs in tests/gpu/test_real_gpu.py on a GPU host)."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

from gpu_attach_server.agent.agent import Agent
from gpu_attach_server.agent.inventory import Device, NvmlSampler


def fake_pynvml(util: dict[bytes, int], broken: set[bytes] = frozenset()):
    m = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    m.NVMLError = NVMLError
    m.nvmlInit = lambda: None
    m.nvmlDeviceGetHandleByUUID = lambda uuid: uuid

    def rates(h):
        if h in broken:
            raise NVMLError("GPU is lost")
        return SimpleNamespace(gpu=util[h], memory=0)

    m.nvmlDeviceGetUtilizationRates = rates
    return m


def test_the_sampler_reads_each_gpu_and_skips_one_that_cannot_say(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml({b"GPU-a": 80, b"GPU-b": 5, b"GPU-c": 0}, {b"GPU-c"}))
    s = NvmlSampler.open(["GPU-a", "GPU-b", "GPU-c"])
    assert s.sample() == {"GPU-a": 0.8, "GPU-b": 0.05}
    assert NvmlSampler.open([]) is None


def test_without_nvml_there_is_no_sampler(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    assert NvmlSampler.open(["GPU-a"]) is None


def test_a_heartbeat_gives_each_running_lease_its_devices_mean_utilisation():
    devices = {0: Device(0, "GPU-a", "H100", 1, False), 1: Device(1, "GPU-b", "H100", 1, False),
               2: Device(2, "SIM-2", "Sim", 1, True)}
    sampler = SimpleNamespace(sample=lambda: {"GPU-a": 0.8, "GPU-b": 0.2})
    sandboxes = {
        ("u", "two"): SimpleNamespace(running_lease="L2", devices=(0, 1)),
        ("u", "one"): SimpleNamespace(running_lease="L1", devices=(1,)),
        ("u", "idle"): SimpleNamespace(running_lease=None, devices=(0,)),
        ("u", "sim"): SimpleNamespace(running_lease="L3", devices=(2,)),  # unmeasured: running time
    }
    import threading

    agent = SimpleNamespace(_nvml=sampler, _lock=threading.Lock(), _sandboxes=sandboxes, devices=devices)
    assert Agent._utilisation(agent) == {"L2": 0.5, "L1": 0.2}
    agent._nvml = None
    assert Agent._utilisation(agent) == {}


def test_mig_instances_get_nvidias_profile_names():
    """Memory sizes as NVML reports them for A100 40GB/80GB and H100 80GB instances."""
    from gpu_attach_server.agent.inventory import mig_profile

    a100_40, a100_80, h100 = 40536 << 20, 81920 << 20, 81559 << 20
    assert mig_profile(1, 4864, a100_40) == "1g.5gb"
    assert mig_profile(3, 19968, a100_40) == "3g.20gb"
    assert mig_profile(7, 40192, a100_40) == "7g.40gb"
    assert mig_profile(1, 9728, a100_80) == "1g.10gb"
    assert mig_profile(3, 40192, a100_80) == "3g.40gb"
    assert mig_profile(7, 80896, a100_80) == "7g.80gb"
    assert mig_profile(1, 9856, h100) == "1g.10gb"
    assert mig_profile(2, 19968, h100) == "2g.20gb"
