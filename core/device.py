"""Device choice, what the CPU can compute natively, and reproducibility switches."""
from __future__ import annotations

import os
import platform
import random
from collections.abc import Mapping

import numpy as np
import torch


def select_device(name: str | None = None) -> torch.device:
    """CUDA when present (or the device asked for), else CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # Needed by cuBLAS for deterministic matmuls; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


# CPU features that decide the numeric precision: matrix units (AMX), bf16 and int8 dot-product instructions
# (x86 names, then Arm's), as torch.cpu.get_capabilities() spells them.
PRECISION_FLAGS = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512_f", "avx2",
                   "bf16", "sve_bf16", "i8mm", "dot")
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16")
INT8_DOT_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni", "i8mm", "dot")


def cpu_capabilities() -> Mapping:
    """torch's own reading of this CPU (cpuinfo): {"avx2": True, "cpu_name": "...", ...}; {} where unavailable."""
    try:
        return torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):  # an older torch, or cpuinfo could not read this CPU
        return {}


def cpu_name(caps: Mapping | None = None) -> str:
    caps = cpu_capabilities() if caps is None else caps
    return str(caps.get("cpu_name") or platform.processor() or platform.machine())


def cpu_flags(caps: Mapping | None = None, wanted: tuple[str, ...] = PRECISION_FLAGS) -> list[str]:
    """The flags of `wanted` this CPU has, in that order."""
    caps = cpu_capabilities() if caps is None else caps
    return [f for f in wanted if caps.get(f) is True]


def cpu_description(caps: Mapping | None = None) -> str:
    """One line for banners and benchmarks, e.g. "AMD EPYC (avx512_bf16 avx512_vnni avx512_f avx2; no AMX)"."""
    caps = cpu_capabilities() if caps is None else caps
    flags = cpu_flags(caps)
    x86 = str(caps.get("architecture", "")).startswith("x86")
    amx = "; no AMX" if x86 and not any(f.startswith("amx") for f in flags) else ""
    return f"{cpu_name(caps)} ({' '.join(flags) or 'none of ' + ', '.join(PRECISION_FLAGS[:7])}{amx})"
