"""monitor_gpu.py: readings through a fake NVML (no GPU here), advice thresholds, JSON output, the real no-GPU path."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from conftest import ROOT, run_script
from core import hardware
from core.config import load_config
from core.errors import UserError
from core.hardware import GpuReading, read_gpus
from ops import gpu_monitor
from ops.gpu_advice import LOOKS_GOOD, recommendations

MB = 2**20
GOOD_GPU = dict(name=b"NVIDIA Fake RTX", util=87, used_mb=3140, total_mb=4096, temp=72, power_mw=115200,
                limit_mw=130000)


def fake_pynvml(gpus: list[dict], pid: int) -> types.ModuleType:
    """A stand-in for nvidia-ml-py's pynvml with the calls (and quirks) of the real bindings."""
    m = types.ModuleType("pynvml")
    m.NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    def not_supported(*_):
        raise NVMLError("Not Supported")

    m.nvmlInit = lambda: None
    m.nvmlDeviceGetCount = lambda: len(gpus)
    m.nvmlDeviceGetHandleByIndex = lambda i: gpus[i]
    m.nvmlDeviceGetName = lambda h: h["name"]  # bytes, as the real binding returns
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(
        used=h["used_mb"] * MB, total=h["total_mb"] * MB, free=(h["total_mb"] - h["used_mb"]) * MB)
    m.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=h["util"], memory=10)
    m.nvmlDeviceGetTemperatureV = not_supported  # an older driver: the fallback call must be used
    m.nvmlDeviceGetTemperature = lambda h, sensor: h["temp"]
    m.nvmlDeviceGetPowerUsage = lambda h: h["power_mw"]  # milliwatts
    m.nvmlDeviceGetEnforcedPowerLimit = lambda h: h["limit_mw"]
    m.nvmlDeviceGetComputeRunningProcesses = lambda h: [types.SimpleNamespace(pid=pid, usedGpuMemory=3000 * MB)]
    # the same process also listed as graphics, plus one whose memory the driver cannot tell (None)
    m.nvmlDeviceGetGraphicsRunningProcesses = lambda h: [types.SimpleNamespace(pid=pid, usedGpuMemory=3000 * MB),
                                                         types.SimpleNamespace(pid=999999999, usedGpuMemory=None)]
    return m


@pytest.fixture
def fake_nvml(monkeypatch):
    def install(*gpus):
        monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([dict(g) for g in gpus], os.getpid()))
        hardware._nvml_init.cache_clear()

    yield install
    hardware._nvml_init.cache_clear()


@pytest.fixture
def thresholds():
    return load_config().monitoring.gpu


def test_readings_from_fake_nvml(fake_nvml):
    fake_nvml(GOOD_GPU)
    (g,) = read_gpus(processes=True)
    assert (g.name, g.utilization_pct, g.temperature_c) == ("NVIDIA Fake RTX", 87, 72)
    assert (g.memory_used_mb, g.memory_total_mb, round(g.memory_pct, 1)) == (3140, 4096, 76.7)
    assert (g.power_w, g.power_limit_w) == (115.2, 130.0)
    procs = {p["pid"]: p for p in g.processes}
    assert len(g.processes) == 2 and procs[os.getpid()]["memory_mb"] == 3000 and procs[999999999]["memory_mb"] == 0
    assert procs[999999999]["name"] == "?"
    assert read_gpus()[0].processes == []


def test_dashboard_shows_every_reading(fake_nvml, thresholds):
    fake_nvml(GOOD_GPU)
    text = gpu_monitor.render(gpu_monitor.snapshot(thresholds, processes=True))
    for line in ("🧠 Brain Cancer MRI - GPU Monitoring", "💻 SYSTEM:", "🚀 GPU STATUS:", "GPU 0: NVIDIA Fake RTX",
                 "├─ Utilization: 87.0%", "├─ Memory: 3140MB / 4096MB (76.7%)", "├─ Temperature: 72°C",
                 "└─ Power: 115.2W / 130.0W", "📋 GPU PROCESSES:", f"PID {os.getpid()}: ", "(3000MB)",
                 " MEDICAL AI RECOMMENDATIONS:", LOOKS_GOOD):
        assert line in text
    assert "No NVIDIA GPU" not in text


def gpu(util=90.0, mem_pct=50.0, temp=60.0) -> GpuReading:
    return GpuReading(0, "fake", util, memory_used_mb=mem_pct * 10, memory_total_mb=1000,
                      temperature_c=temp, power_w=None, power_limit_w=None)


@pytest.mark.parametrize("reading, training, kinds", [
    (gpu(), [], ["ok"]),
    (gpu(temp=85), [], ["temperature"]),
    (gpu(temp=80), [], ["ok"]),  # at the threshold is fine: "> 80 °C"
    (gpu(mem_pct=97), [], ["memory"]),
    (gpu(util=10, mem_pct=85), [], ["data_loading"]),
    (gpu(util=10, mem_pct=20), [{"pid": 4242, "cmdline": "python train.py"}], ["underutilized"]),
    (gpu(util=10, mem_pct=20), [], ["ok"]),  # idle GPU, nothing training: nothing to fix
    (gpu(util=5, mem_pct=97, temp=90), [], ["temperature", "memory", "data_loading"]),
])
def test_recommendation_rules(thresholds, reading, training, kinds):
    recs = recommendations([reading], thresholds, training=lambda: training)
    assert [r.kind for r in recs] == kinds
    if "underutilized" in kinds:
        assert "4242" in recs[0].message
    if "data_loading" in kinds:
        assert "num_workers" in recs[-1].message and "dataset.cache" in recs[-1].message


def test_thresholds_come_from_the_config():
    hot = gpu(temp=70)
    assert [r.kind for r in recommendations([hot], load_config().monitoring.gpu, lambda: [])] == ["ok"]
    cfg = load_config(sets=["monitoring.gpu.temperature_c=65"])
    assert [r.kind for r in recommendations([hot], cfg.monitoring.gpu, lambda: [])] == ["temperature"]


def test_training_process_detected_by_command_line(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("import time; time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, str(script), "--model", "resnet18"])
    try:
        deadline = time.time() + 20
        while proc.pid not in {p["pid"] for p in hardware.training_processes()}:
            assert time.time() < deadline, "train.py process not detected"
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()


def test_save_once_writes_one_json_document(fake_nvml, tmp_path):
    fake_nvml(GOOD_GPU, dict(GOOD_GPU, name=b"Second", util=10, used_mb=3600))
    out = tmp_path / "sub" / "gpu.json"
    assert run_script("monitor_gpu", ["--once", "--save", out]) == 0
    record = json.loads(out.read_text())
    assert set(record) >= {"timestamp", "system", "gpus", "recommendations", "monitor_cpu_pct"}
    assert record["system"]["ram_total_gb"] > 0 and 0 <= record["system"]["cpu_pct"] <= 100
    assert [g["name"] for g in record["gpus"]] == ["NVIDIA Fake RTX", "Second"]
    assert record["gpus"][0]["processes"][0]["pid"] == os.getpid()
    assert [(r["kind"], r["gpu"]) for r in record["recommendations"]] == [("data_loading", 1)]
    assert record["monitor_cpu_pct"] >= 0 and record["gpu_error"] is None


def test_continuous_mode_appends_json_lines(fake_nvml, tmp_path, capsys):
    fake_nvml(GOOD_GPU)
    out = tmp_path / "gpu.jsonl"
    assert run_script("monitor_gpu", ["--count", "2", "-i", "0.01", "--save", out, "--no-processes"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 and all(r["gpus"][0]["processes"] == [] for r in records)
    assert all(r["recommendations"][0]["message"] == LOOKS_GOOD for r in records)
    stdout = capsys.readouterr().out
    assert stdout.count("🚀 GPU STATUS:") == 2 and "📋 GPU PROCESSES:" not in stdout


def test_ctrl_c_stops_cleanly(fake_nvml, thresholds, monkeypatch, capsys):
    fake_nvml(GOOD_GPU)

    def interrupt(_):
        raise KeyboardInterrupt

    monkeypatch.setattr(gpu_monitor.time, "sleep", interrupt)
    assert gpu_monitor.monitor(thresholds, interval=1.0) == 0
    assert "Monitoring stopped." in capsys.readouterr().out


def test_bad_interval_is_a_user_error(thresholds):
    with pytest.raises(UserError, match="--interval"):
        gpu_monitor.monitor(thresholds, interval=0)


def test_real_machine_without_gpu(tmp_path):
    """The real NVML path on this machine: no driver, so the system part, a clear line, exit 0."""
    hardware._nvml_init.cache_clear()
    if hardware.read_gpus():
        pytest.skip("this machine has an NVIDIA GPU")
    out = tmp_path / "x.json"
    res = subprocess.run([sys.executable, str(ROOT / "monitor_gpu.py"), "--once", "--save", str(out)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "💻 SYSTEM:" in res.stdout and "No NVIDIA GPU found (NVML unavailable: " in res.stdout
    record = json.loads(Path(out).read_text())
    assert record["gpus"] == [] and record["recommendations"] == [] and "NVML unavailable" in record["gpu_error"]
    assert record["system"]["cpu_count"] >= 1 and record["system"]["ram_available_gb"] > 0


def test_without_a_gpu_the_refreshing_dashboard_shows_once_and_exits_0(tmp_path):
    """`monitor_gpu.py -i 3` on a machine without a GPU: the system part once, why, exit 0 (not until Ctrl-C)."""
    hardware._nvml_init.cache_clear()
    if hardware.read_gpus():
        pytest.skip("this machine has an NVIDIA GPU")
    res = subprocess.run([sys.executable, str(ROOT / "monitor_gpu.py"), "-i", "3", "--no-processes"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("💻 SYSTEM:") == 1 and "No NVIDIA GPU to watch" in res.stdout


def test_hardware_sampler_summarizes_cpu_ram_and_gpus_while_work_runs(fake_nvml):
    """evaluate.py's readings: a background thread reads while the block runs; the summary feeds the report/MLflow."""
    from core.hardware import HardwareSampler, hardware_summary_metrics
    from evaluation.reports import hardware_lines

    fake_nvml(GOOD_GPU)
    with HardwareSampler(interval=0.02) as hw:
        deadline = time.perf_counter() + 0.3
        while time.perf_counter() < deadline:
            sum(i * i for i in range(1000))  # busy, so there is CPU use to read
    summary = hw.summary()
    assert summary["samples"] >= 3 and summary["seconds"] >= 0.3
    assert 0 <= summary["cpu_pct"]["mean"] <= summary["cpu_pct"]["max"] <= 100
    gpu = summary["gpus"][0]
    assert gpu["name"] == "NVIDIA Fake RTX" and gpu["utilization_pct"] == {"mean": 87.0, "max": 87.0}
    assert gpu["memory_used_mb"]["max"] == pytest.approx(3140)
    flat = hardware_summary_metrics(summary)
    assert flat["hw_gpu0_util_pct_mean"] == 87.0 and "hw_cpu_pct_max" in flat and "hw_ram_pct_mean" in flat
    lines = hardware_lines(summary)
    assert lines[0].startswith("Hardware during evaluation") and "GPU 0 (NVIDIA Fake RTX): utilization 87%" in lines[1]
