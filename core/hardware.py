"""Hardware readings for the training banner, per-epoch logs, evaluation and monitor_gpu.py.

CPU and RAM through psutil; GPUs through NVIDIA's NVML bindings (nvidia-ml-py), one library
call per reading, no nvidia-smi subprocess (GPUtil shells out on every call).
"""
from __future__ import annotations

import functools
import os
import threading
import time
from dataclasses import dataclass, field

import psutil


def usable_cpus() -> int:
    """The cores this process may run on (its affinity mask: a container's or taskset's limit, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


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


@functools.lru_cache(maxsize=1)
def _nvml_init():
    """(pynvml module initialised once, None) or (None, why NVML is unavailable); cached: init is not free."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml, None
    except Exception as exc:  # no library, no driver, no device: all mean "no GPU readings"
        return None, str(exc) or type(exc).__name__


def _nvml():
    return _nvml_init()[0]


def nvml_unavailable_reason() -> str | None:
    """Why there are no GPU readings (None when NVML works)."""
    nvml, reason = _nvml_init()
    if nvml is not None and nvml.nvmlDeviceGetCount() == 0:
        return "NVML reports 0 devices"
    return reason


def _optional(fn, *args, scale: float = 1.0):
    try:
        return fn(*args) / scale
    except Exception:  # a reading this GPU does not support (e.g. power on some boards)
        return None


def _processes(nvml, handle) -> list[dict]:
    """Compute and graphics processes on one GPU (a training run is compute, a desktop is graphics)."""
    running = {}
    for query in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
        try:
            running.update({p.pid: p for p in query(handle)})
        except Exception:  # not supported on this board/driver: report what the other query gives
            continue
    procs = []
    for pid, p in running.items():
        try:
            name = psutil.Process(pid).name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            name = "?"
        used = getattr(p, "usedGpuMemory", None)  # None where the driver cannot tell (e.g. Windows WDDM)
        procs.append({"pid": pid, "name": name, "memory_mb": (used or 0) / 2**20})
    return procs


def _temperature(nvml, handle):
    # nvmlDeviceGetTemperature is deprecated in recent bindings; older drivers lack the V call.
    getter = getattr(nvml, "nvmlDeviceGetTemperatureV", None)
    value = _optional(getter, handle, nvml.NVML_TEMPERATURE_GPU) if getter else None
    return value if value is not None else _optional(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)


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
        util = _optional(lambda h=h: nvml.nvmlDeviceGetUtilizationRates(h).gpu)
        readings.append(GpuReading(
            index=i, name=name.decode() if isinstance(name, bytes) else name,
            utilization_pct=util, memory_used_mb=mem.used / 2**20, memory_total_mb=mem.total / 2**20,
            temperature_c=_temperature(nvml, h),
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


def _spread(values: list[float]) -> dict[str, float] | None:
    return {"mean": sum(values) / len(values), "max": max(values)} if values else None


class HardwareSampler:
    """CPU, RAM and every GPU's utilization and memory, read every `interval` seconds while a block runs.

        with HardwareSampler() as hw:
            ...                      # the work being measured
        hw.summary()                 # {"samples", "seconds", "cpu_pct": {"mean", "max"}, "ram_pct", "gpus": [...]}

    A background thread takes the readings (one psutil and one NVML call each), so the work is not paused.
    """

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self._cpu: list[float] = []
        self._ram: list[float] = []
        self._gpus: dict[int, dict] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = self._seconds = 0.0

    def _read(self) -> None:
        system = read_system()
        self._cpu.append(system.cpu_pct)
        self._ram.append(system.ram_pct)
        for g in read_gpus():
            seen = self._gpus.setdefault(g.index, {"index": g.index, "name": g.name, "util": [], "mem_mb": [],
                                                   "mem_pct": [], "memory_total_mb": g.memory_total_mb})
            if g.utilization_pct is not None:
                seen["util"].append(float(g.utilization_pct))
            seen["mem_mb"].append(g.memory_used_mb)
            seen["mem_pct"].append(g.memory_pct)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._read()

    def start(self) -> HardwareSampler:
        psutil.cpu_percent(interval=None)  # the first call only starts psutil's CPU interval
        self._started = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="hardware-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict:
        """Stop reading; the summary."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self._read()  # a block shorter than one interval still gets a reading
            self._seconds = time.perf_counter() - self._started
        return self.summary()

    def __enter__(self) -> HardwareSampler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def summary(self) -> dict:
        gpus = [{"index": g["index"], "name": g["name"], "utilization_pct": _spread(g["util"]),
                 "memory_used_mb": _spread(g["mem_mb"]), "memory_pct": _spread(g["mem_pct"]),
                 "memory_total_mb": g["memory_total_mb"]} for g in self._gpus.values()]
        return {"samples": len(self._cpu), "interval_s": self.interval, "seconds": round(self._seconds, 3),
                "cpu_count": psutil.cpu_count() or 1, "cpu_pct": _spread(self._cpu), "ram_pct": _spread(self._ram),
                "gpus": gpus}


def hardware_summary_metrics(summary: dict, prefix: str = "hw_") -> dict[str, float]:
    """HardwareSampler.summary() as flat numbers for trackers: hw_cpu_pct_mean, hw_gpu0_util_pct_max, ..."""
    out = {}
    for key in ("cpu_pct", "ram_pct"):
        for stat, value in (summary.get(key) or {}).items():
            out[f"{prefix}{key}_{stat}"] = value
    for g in summary.get("gpus", []):
        for key, name in (("utilization_pct", "util_pct"), ("memory_used_mb", "mem_mb"), ("memory_pct", "mem_pct")):
            for stat, value in (g.get(key) or {}).items():
                out[f"{prefix}gpu{g['index']}_{name}_{stat}"] = value
    return out


TRAINING_SCRIPTS = ("train.py",)
TRAINING_LAUNCHERS = ("torchrun", "torch.distributed.run")


def training_processes() -> list[dict]:
    """Running training jobs ({"pid", "cmdline"}): `python train.py ...` or torchrun, found by command line."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if proc.info["pid"] == os.getpid() or not cmd:
            continue
        names = [os.path.basename(a) for a in cmd[:3]]  # interpreter, script (or -m module), ...
        if any(n in TRAINING_SCRIPTS for n in names) or any(n in TRAINING_LAUNCHERS for n in names):
            found.append({"pid": proc.info["pid"], "cmdline": " ".join(cmd)})
    return found


class CpuMeter:
    """This process's own CPU use between two laps (CPU seconds / wall seconds).

    time.process_time is the same user+system time psutil.Process().cpu_times() reports, read
    from a nanosecond clock instead of 10 ms ticks: a refresh costs only a few milliseconds.
    """

    def __init__(self):
        self._cpu, self._wall = time.process_time(), time.perf_counter()

    def lap(self) -> tuple[float, float]:
        """(CPU %, CPU milliseconds) used since the previous lap."""
        cpu, wall = time.process_time(), time.perf_counter()
        used, elapsed = cpu - self._cpu, wall - self._wall
        self._cpu, self._wall = cpu, wall
        return (100.0 * used / elapsed if elapsed > 0 else 0.0), 1000.0 * used
