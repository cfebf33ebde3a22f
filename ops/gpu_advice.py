"""Recommendations from GPU readings, with the thresholds of `cfg.monitoring.gpu`.

Each rule names the likely cause and the setting to change, so that the advice is actionable
while a training run is still going.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from core.hardware import GpuReading, training_processes

LOOKS_GOOD = "✅ GPU utilization looks good for medical AI training"


@dataclass
class Recommendation:
    kind: str  # temperature | memory | data_loading | underutilized | ok
    gpu: int | None
    message: str


def _gpu_rules(g: GpuReading, t, training: Callable[[], list[dict]]) -> list[Recommendation]:
    out = []
    tag = f"GPU {g.index}"
    if g.temperature_c is not None and g.temperature_c > t.temperature_c:
        out.append(Recommendation("temperature", g.index, (
            f"🌡️  {tag}: {g.temperature_c:.0f}°C (> {t.temperature_c:.0f}°C): check cooling and airflow; "
            f"a hot GPU throttles its clocks over a long training run")))
    if g.memory_pct > t.memory_pct:
        out.append(Recommendation("memory", g.index, (
            f"⚠️  {tag}: memory {g.memory_pct:.1f}% used (> {t.memory_pct:.0f}%): close to out-of-memory; "
            f"lower the batch size or enable performance.mixed_precision")))
    low_util = g.utilization_pct is not None and g.utilization_pct < t.low_utilization_pct
    if low_util and g.memory_pct > t.high_memory_pct:
        out.append(Recommendation("data_loading", g.index, (
            f"💡 {tag}: memory {g.memory_pct:.0f}% used but utilization {g.utilization_pct:.0f}% "
            f"(< {t.low_utilization_pct:.0f}%): likely data-loading bound; raise dataset.num_workers "
            f"or enable dataset.cache")))
    elif low_util and (jobs := training()):
        pids = ", ".join(str(j["pid"]) for j in jobs[:3])
        out.append(Recommendation("underutilized", g.index, (
            f"💡 {tag}: utilization {g.utilization_pct:.0f}% (< {t.low_utilization_pct:.0f}%) while training "
            f"runs (PID {pids}): the GPU is waiting; raise the batch size or dataset.num_workers, "
            f"enable dataset.cache and performance.mixed_precision")))
    return out


def recommendations(gpus: list[GpuReading], thresholds,
                    training: Callable[[], list[dict]] = training_processes) -> list[Recommendation]:
    """Advice for every GPU; one "looks good" line when nothing needs attention, [] without GPUs."""
    if not gpus:
        return []
    cached: list[list[dict]] = []

    def training_once() -> list[dict]:  # scanning every process is the costly part: at most once per refresh
        if not cached:
            cached.append(training())
        return cached[0]

    out = [r for g in gpus for r in _gpu_rules(g, thresholds, training_once)]
    return out or [Recommendation("ok", None, LOOKS_GOOD)]
