"""The monitor_gpu.py dashboard: one snapshot of system + GPU readings + advice, rendered and saved.

Readings come from core.hardware (psutil and NVML calls in-process, no nvidia-smi), so a
refresh costs a few milliseconds of CPU; each record carries that cost as monitor_cpu_pct.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from core.errors import UserError
from core.hardware import CpuMeter, nvml_unavailable_reason, read_gpus, read_system
from ops.gpu_advice import recommendations

CLEAR_HOME = "\033[H\033[2J"  # ANSI: cursor home + clear screen; redraws in place without spawning `clear`
RULE = "=" * 60


def snapshot(thresholds, processes: bool = True, cpu_interval: float | None = None) -> dict:
    """One reading of everything the dashboard shows, as a JSON-ready record."""
    system = read_system(interval=cpu_interval)
    gpus = read_gpus(processes=processes)
    return {
        "timestamp": datetime.now().astimezone().isoformat(timespec="seconds"),
        "system": asdict(system),
        "gpus": [dict(asdict(g), memory_pct=round(g.memory_pct, 2)) for g in gpus],
        "gpu_error": None if gpus else f"NVML unavailable: {nvml_unavailable_reason() or 'no devices'}",
        "recommendations": [asdict(r) for r in recommendations(gpus, thresholds)],
    }


def _fmt(value, spec: str, unit: str) -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def _gpu_lines(g: dict) -> list[str]:
    power = "n/a" if g["power_w"] is None else (
        f"{g['power_w']:.1f}W" + (f" / {g['power_limit_w']:.1f}W" if g["power_limit_w"] is not None else ""))
    return [
        f"   GPU {g['index']}: {g['name']}",
        f"   ├─ Utilization: {_fmt(g['utilization_pct'], '.1f', '%')}",
        f"   ├─ Memory: {g['memory_used_mb']:.0f}MB / {g['memory_total_mb']:.0f}MB ({g['memory_pct']:.1f}%)",
        f"   ├─ Temperature: {_fmt(g['temperature_c'], '.0f', '°C')}",
        f"   └─ Power: {power}",
    ]


def render(record: dict, processes: bool = True) -> str:
    s = record["system"]
    when = datetime.fromisoformat(record["timestamp"]).strftime("%Y-%m-%d %H:%M:%S")
    lines = ["🧠 Brain Cancer MRI - GPU Monitoring", RULE, f"📅 {when}", "", "💻 SYSTEM:",
             f"   CPU: {s['cpu_pct']:.1f}% | RAM: {s['ram_pct']:.1f}% | Available: {s['ram_available_gb']:.1f}GB", ""]
    if not record["gpus"]:
        lines.append(f"🚀 GPU STATUS:\n   No NVIDIA GPU found ({record['gpu_error']})")
        return "\n".join(lines)
    lines.append("🚀 GPU STATUS:")
    for g in record["gpus"]:
        lines += _gpu_lines(g)
    if processes:
        procs = [(g["index"], p) for g in record["gpus"] for p in g["processes"]]
        lines += ["", "📋 GPU PROCESSES:"] + ([
            f"   PID {p['pid']}: {p['name']} ({p['memory_mb']:.0f}MB)"
            + (f" [GPU {i}]" if len(record["gpus"]) > 1 else "")
            for i, p in procs] or ["   (none)"])
    lines += ["", " MEDICAL AI RECOMMENDATIONS:"] + [f"   {r['message']}" for r in record["recommendations"]]
    return "\n".join(lines)


def _save(path: Path, record: dict, append: bool) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a" if append else "w") as f:
            f.write(json.dumps(record) + "\n" if append else json.dumps(record, indent=2) + "\n")
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None


def monitor(thresholds, interval: float = 2.0, once: bool = False, count: int | None = None,
            save: str | None = None, processes: bool = True, out=None) -> int:
    """Print the dashboard once, or redraw it every `interval` s until Ctrl-C or `count` refreshes. Without an NVIDIA
    GPU there is nothing to watch: one reading and exit 0, unless `count` asks for more."""
    if interval <= 0:
        raise UserError(f"--interval must be > 0 seconds, got {interval:g}")
    if count is not None and count < 1:
        raise UserError(f"--count must be >= 1, got {count}")
    out = out or sys.stdout
    total = 1 if once else count
    redraw = not once and out.isatty()
    meter, n = CpuMeter(), 0
    try:
        while total is None or n < total:
            # First reading: sample CPU briefly (psutil's first non-blocking reading is meaningless).
            record = snapshot(thresholds, processes, cpu_interval=0.1 if n == 0 else None)
            text = render(record, processes)
            record["monitor_cpu_pct"], record["monitor_cpu_ms"] = (round(v, 2) for v in meter.lap())
            out.write((CLEAR_HOME if redraw else "") + text + "\n")
            if not once:
                out.write(f"\n(refresh {n + 1}, every {interval:g}s; Ctrl-C to stop)\n")
            out.flush()
            if save:
                _save(Path(save), record, append=not once)
            n += 1
            if total is None and not record["gpus"]:
                out.write("No NVIDIA GPU to watch: the system reading above is all there is (--count N refreshes it "
                          "N times).\n")
                break
            if total is None or n < total:
                time.sleep(interval)
    except KeyboardInterrupt:
        out.write("\nMonitoring stopped.\n")
    if save:
        out.write(f"💾 Saved {n} record(s) to {save}\n")
    return 0
