"""What GPUs this host has: from NVML when there is an NVIDIA driver, else simulated devices."""

from __future__ import annotations

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

    def to_json(self) -> dict:
        return asdict(self)


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
    try:
        devices = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            uuid = pynvml.nvmlDeviceGetUUID(h)
            devices.append(Device(
                index=i,
                uuid=uuid.decode() if isinstance(uuid, bytes) else uuid,
                model=name.decode() if isinstance(name, bytes) else name,
                memory=int(pynvml.nvmlDeviceGetMemoryInfo(h).total),
                simulated=False,
                pool=pool,
            ))
    finally:
        pynvml.nvmlShutdown()
    if not devices:
        raise NoGPU("NVML reports no GPUs")
    return devices


def simulated_devices(count: int, memory: int, pool: str = "default") -> list[Device]:
    host = socket.gethostname()
    return [Device(i, f"SIM-{host}-{i}", SIMULATED_MODEL, memory, True, pool) for i in range(count)]


def discover(simulate: int | None, memory: int, pool: str = "default") -> tuple[list[Device], str]:
    """Real GPUs unless ``simulate`` is set or none are found; returns ``(devices, why)``."""
    if simulate:
        return simulated_devices(simulate, memory, pool), f"{simulate} simulated device(s), as asked (--simulate)"
    try:
        devices = nvml_devices(pool)
        return devices, f"{len(devices)} NVIDIA GPU(s) from NVML"
    except NoGPU as e:
        return simulated_devices(1, memory, pool), f"no NVIDIA GPU ({e}): offering 1 SIMULATED device that runs cells on the CPU"
