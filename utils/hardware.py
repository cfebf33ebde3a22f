"""Hardware readings for the training banner, per-epoch logs and monitor_gpu.py.

CPU and RAM through psutil; GPUs through NVIDIA's NVML bindings (nvidia-ml-py), one library
call per reading, no nvidia-smi subprocess (GPUtil shells out on every call).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import psutil


@dataclass
class GpuReading:
    index: int
    name: str
    utilization_pct: float | None
    memory_used_mb: float
    memory_total_mb: float
    temperature_c: float | None
    power_w: float | None
    power_limit_w: float | None
    processes: list[dict] = field(default_factory=list)  # {"pid", "name", "memory_mb"}

    @property
    def memory_pct(self) -> float:
        return 100.0 * self.memory_used_mb / self.memory_total_mb if self.memory_total_mb else 0.0


@dataclass
class SystemReading:
    cpu_count: int
    cpu_pct: float
    load_avg: tuple[float, float, float] | None
    ram_pct: float
    ram_available_gb: float
    ram_total_gb: float


def read_system(interval: float | None = None) -> SystemReading:
    vm = psutil.virtual_memory()
    try:
        load = tuple(round(x, 2) for x in psutil.getloadavg())
    except (AttributeError, OSError):
        load = None
    return SystemReading(psutil.cpu_count() or 1, psutil.cpu_percent(interval=interval), load,
                         vm.percent, vm.available / 2**30, vm.total / 2**30)


def _nvml():
    """The pynvml module, initialised; None when there is no NVIDIA driver or GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no library, no driver, no device: all mean "no GPU readings"
        return None


def _optional(fn, *args, scale: float = 1.0):
    try:
        return fn(*args) / scale
    except Exception:  # a reading this GPU does not support (e.g. power on some boards)
        return None


def _processes(nvml, handle) -> list[dict]:
    procs = []
    try:
        running = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except Exception:
        return procs
    for p in running:
        try:
            name = psutil.Process(p.pid).name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            name = "?"
        used = getattr(p, "usedGpuMemory", None)
        procs.append({"pid": p.pid, "name": name, "memory_mb": (used or 0) / 2**20})
    return procs


def read_gpus(processes: bool = False) -> list[GpuReading]:
    """One reading per NVIDIA GPU; [] when none is present."""
    nvml = _nvml()
    if nvml is None:
        return []
    readings = []
    for i in range(nvml.nvmlDeviceGetCount()):
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        name = nvml.nvmlDeviceGetName(h)
        mem = nvml.nvmlDeviceGetMemoryInfo(h)
        util = _optional(lambda: nvml.nvmlDeviceGetUtilizationRates(h).gpu)
        readings.append(GpuReading(
            index=i, name=name.decode() if isinstance(name, bytes) else name,
            utilization_pct=util, memory_used_mb=mem.used / 2**20, memory_total_mb=mem.total / 2**20,
            temperature_c=_optional(nvml.nvmlDeviceGetTemperature, h, nvml.NVML_TEMPERATURE_GPU),
            power_w=_optional(nvml.nvmlDeviceGetPowerUsage, h, scale=1000.0),
            power_limit_w=_optional(nvml.nvmlDeviceGetEnforcedPowerLimit, h, scale=1000.0),
            processes=_processes(nvml, h) if processes else [],
        ))
    return readings


def hardware_metrics() -> dict[str, float]:
    """Flat numbers for trackers: system_cpu_pct, system_ram_pct, gpu0_util_pct, gpu0_mem_pct, ..."""
    sys_ = read_system()
    out = {"system_cpu_pct": sys_.cpu_pct, "system_ram_pct": sys_.ram_pct}
    for g in read_gpus():
        prefix = f"gpu{g.index}_"
        out[prefix + "mem_pct"] = g.memory_pct
        for key, value in (("util_pct", g.utilization_pct), ("temp_c", g.temperature_c), ("power_w", g.power_w)):
            if value is not None:
                out[prefix + key] = float(value)
    return out


def as_dict(reading) -> dict:
    return asdict(reading)
