"""What GPUs this host has: from NVML when there is an NVIDIA driver, else simulated devices."""

from __future__ import annotations

import math
import socket
from dataclasses import asdict, dataclass

SIMULATED_MODEL = "Simulated GPU (runs on CPU)"


@dataclass(frozen=True)
class Device:
    index: int
    uuid: str
    model: str
    memory: int
    simulated: bool
    pool: str = "default"
    mig: str | None = None  # a MIG instance's profile ("1g.10gb"); its uuid is the MIG-... one
    # The minor of its /dev/nvidiaN node (a MIG instance: its GPU's), which the sandbox's device
    # fence lets it open (agent/device_fence.py); None for a simulated device, which has no node.
    # The agent's own business: not sent to the broker.
    minor: int | None = None

    def to_json(self) -> dict:
        out = asdict(self)
        del out["minor"]
        if out["mig"] is None:
            del out["mig"]
        return out


class NoGPU(Exception):
    """This host has no usable NVIDIA GPU (no driver, no NVML, or no devices)."""


def nvml_devices(pool: str = "default") -> list[Device]:
    """Every GPU NVML reports, with its UUID (the stable name to pin CUDA_VISIBLE_DEVICES to)."""
    try:
        import pynvml
    except ImportError as e:
        raise NoGPU("nvidia-ml-py is not installed (pip install 'jupyter-gpu-attach[gpu]')") from e
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        raise NoGPU(f"NVML could not start ({e}); is the NVIDIA driver installed?") from e
    text = lambda v: v.decode() if isinstance(v, bytes) else v  # noqa: E731
    try:
        devices: list[Device] = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = text(pynvml.nvmlDeviceGetName(h))
            try:
                minor = int(pynvml.nvmlDeviceGetMinorNumber(h))  # /dev/nvidia<minor>
            except pynvml.NVMLError:  # not on every platform (WSL): then it cannot be fenced
                minor = None
            instances = _mig_instances(pynvml, h, int(pynvml.nvmlDeviceGetMemoryInfo(h).total))
            if instances is None:
                devices.append(Device(index=len(devices), uuid=text(pynvml.nvmlDeviceGetUUID(h)), model=name,
                                      memory=int(pynvml.nvmlDeviceGetMemoryInfo(h).total), simulated=False, pool=pool,
                                      minor=minor))
                continue
            # A GPU in MIG mode is offered as its instances only (it cannot run as a whole).
            for mh, profile in instances:
                devices.append(Device(index=len(devices), uuid=text(pynvml.nvmlDeviceGetUUID(mh)),
                                      model=f"{name} MIG {profile}", memory=int(pynvml.nvmlDeviceGetMemoryInfo(mh).total),
                                      simulated=False, pool=pool, mig=profile, minor=minor))
    finally:
        pynvml.nvmlShutdown()
    if not devices:
        raise NoGPU("NVML reports no GPUs")
    return devices


class NvmlSampler:
    """GPU utilisation by device UUID, from NVML (``utilization.gpu``: the share of the driver's
    last sample period, 1/6 s to 1 s, in which a kernel ran). Held open for the agent's life."""

    def __init__(self, pynvml, handles: dict[str, object]):
        self._nvml, self._handles = pynvml, handles

    @classmethod
    def open(cls, uuids: list[str]) -> "NvmlSampler | None":
        """A sampler for these GPUs, or None (no GPU, no NVML, or no utilisation to read)."""
        if not uuids:
            return None
        try:
            import pynvml

            pynvml.nvmlInit()
            handles = {u: pynvml.nvmlDeviceGetHandleByUUID(u.encode() if isinstance(u, str) else u) for u in uuids}
        except Exception:  # no driver or library here: busy time is the cells' running time
            return None
        return cls(pynvml, handles)

    def sample(self) -> dict[str, float]:
        """``{uuid: 0..1}`` for every GPU that answers now."""
        out = {}
        for uuid, h in self._handles.items():
            try:
                out[uuid] = min(max(self._nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100.0, 0.0), 1.0)
            except Exception:  # a GPU that cannot say (lost, or not supported): counted by running time
                continue
        return out


def _mig_instances(pynvml, h, total_memory: int) -> list | None:
    """``[(handle, profile)]`` of a GPU in MIG mode, or None when it is not in MIG mode."""
    try:
        current, _pending = pynvml.nvmlDeviceGetMigMode(h)
    except pynvml.NVMLError:  # no MIG support on this GPU or driver
        return None
    if current != pynvml.NVML_DEVICE_MIG_ENABLE:
        return None
    out = []
    for k in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(h)):
        try:
            mh = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(h, k)
        except pynvml.NVMLError:  # no instance at this slot
            continue
        attrs = pynvml.nvmlDeviceGetAttributes(mh)
        out.append((mh, mig_profile(attrs.gpuInstanceSliceCount, attrs.memorySizeMB, total_memory)))
    return out


def mig_profile(slices: int, memory_mb: int, total_memory: int) -> str:
    """NVIDIA's name for a MIG instance (1g.10gb), as its Kubernetes device plugin derives it: the
    instance's share of the GPU's memory rounded up to eighths, times the GPU's memory in whole
    GiB rounded up. (The memory alone misnames some: 7g.80gb has 79 GiB.)"""
    share = math.ceil(memory_mb * 2**20 / total_memory * 8) / 8
    total_gib = -(-total_memory // 2**30)
    return f"{slices}g.{max(1, round(share * total_gib))}gb"


def parse_mig_layout(text: str) -> list[str]:
    """``"3g.40gb,2g.20gb,1g.10gb*2"`` -> the profiles, in order."""
    from jupyter_gpu_attach.slices import MIG_PROFILE

    out: list[str] = []
    for part in filter(None, (p.strip().lower() for p in text.split(","))):
        profile, _, times = part.partition("*")
        if not MIG_PROFILE.match(profile) or (times and not (times.isdigit() and 1 <= int(times) <= 8)):
            raise ValueError(f"not a MIG layout: {text!r} (write it like 3g.40gb,2g.20gb,1g.10gb*2)")
        out += [profile] * (int(times) if times else 1)
    if not out or len(out) > 8:
        raise ValueError(f"a MIG layout names 1 to 8 instances, got {len(out)} in {text!r}")
    return out


def simulated_devices(count: int, memory: int, pool: str = "default", mig: list[str] | None = None) -> list[Device]:
    """``count`` SIMULATED devices; with ``mig``, each split into instances of those profiles
    (memory as the profile says, in GiB), as a GPU in MIG mode is offered."""
    host = socket.gethostname()
    if not mig:
        return [Device(i, f"SIM-{host}-{i}", SIMULATED_MODEL, memory, True, pool) for i in range(count)]
    devices = []
    for g in range(count):
        for k, profile in enumerate(mig):
            gib = int(profile.split(".")[1].removesuffix("+me").removesuffix("gb"))
            devices.append(Device(len(devices), f"MIG-SIM-{host}-{g}-{k}", f"{SIMULATED_MODEL} MIG {profile}",
                                  gib << 30, True, pool, mig=profile))
    return devices


def discover(simulate: int | None, memory: int, pool: str = "default",
             mig: list[str] | None = None) -> tuple[list[Device], str]:
    """Real GPUs unless ``simulate`` is set or none are found; returns ``(devices, why)``."""
    if simulate:
        devices = simulated_devices(simulate, memory, pool, mig)
        layout = f" in MIG mode ({len(devices)} instances: {', '.join(d.mig for d in devices)})" if mig else ""
        return devices, f"{simulate} simulated device(s){layout}, as asked (--simulate)"
    try:
        devices = nvml_devices(pool)
        return devices, f"{len(devices)} NVIDIA GPU(s) from NVML"
    except NoGPU as e:
        return simulated_devices(1, memory, pool), f"no NVIDIA GPU ({e}): offering 1 SIMULATED device that runs cells on the CPU"
