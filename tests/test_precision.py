"""CPU training precision: `auto` follows the CPU's flags, fp32 and bf16 can be forced on any CPU, the banner
and the checkpoint say what was used, and a run resumes in another precision with one line saying so."""
from __future__ import annotations

import pytest
import torch

from conftest import run_script, write_overlay
from core.checkpoint import load_checkpoint
from core.config import load_config
from core.device import cpu_capabilities, cpu_description, cpu_flags
from core.errors import UserError
from training.recipe import amp_dtype, cpu_precision, precision_for

# What torch.cpu.get_capabilities() reports on the machines this toolkit runs on.
AMX_XEON = {"cpu_name": "Intel(R) Xeon(R) Platinum 8481C", "architecture": "x86_64", "avx2": True, "avx512_f": True,
            "avx512_vnni": True, "avx512_bf16": True, "amx_tile": True, "amx_bf16": True, "amx_int8": True}
ZEN4_EPYC = {"cpu_name": "AMD EPYC 9B14", "architecture": "x86_64", "avx2": True, "avx512_f": True,
             "avx512_vnni": True, "avx512_bf16": True, "amx_bf16": False}
AVX2_EPYC = {"cpu_name": "AMD EPYC 7B12", "architecture": "x86_64", "avx2": True, "avx512_f": False,
             "avx512_bf16": False, "amx_bf16": False}
AVX512_NO_BF16 = {"cpu_name": "Intel(R) Xeon(R) CPU @ 2.20GHz", "architecture": "x86_64", "avx2": True,
                  "avx512_f": True, "avx512_vnni": True, "avx512_bf16": False}
ARM_BF16 = {"cpu_name": "Neoverse-V1", "architecture": "arm64", "neon": True, "bf16": True, "i8mm": True}


@pytest.mark.parametrize("caps, flag", [(AMX_XEON, "amx_bf16"), (ZEN4_EPYC, "avx512_bf16"), (ARM_BF16, "bf16")])
def test_auto_picks_bf16_where_the_cpu_has_native_bf16(caps, flag):
    choice = cpu_precision("auto", caps)
    assert choice.dtype is torch.bfloat16
    assert choice.reason.startswith("auto:") and caps["cpu_name"] in choice.reason and flag in choice.reason


@pytest.mark.parametrize("caps", [AVX2_EPYC, AVX512_NO_BF16, {}], ids=["avx2", "avx512-without-bf16", "unknown"])
def test_auto_stays_fp32_where_bf16_would_be_emulated(caps):
    choice = cpu_precision("auto", caps)
    assert choice.dtype is None and "no native bf16" in choice.reason


def test_forced_precisions_win_over_the_flags():
    assert cpu_precision("fp32", AMX_XEON).dtype is None
    emulated = cpu_precision("bf16", AVX2_EPYC)
    assert emulated.dtype is torch.bfloat16 and "emulated" in emulated.reason  # allowed, with a warning
    assert "native bf16 (amx_bf16)" in cpu_precision("bf16", AMX_XEON).reason


def test_the_config_setting_reaches_the_cpu_choice():
    cpu = torch.device("cpu")
    for setting, caps, expected in (("auto", AMX_XEON, torch.bfloat16), ("auto", AVX2_EPYC, None),
                                    ("fp32", AMX_XEON, None), ("bf16", AVX2_EPYC, torch.bfloat16)):
        cfg = load_config(None, [f"performance.cpu_precision={setting}"])
        assert precision_for(cfg, cpu, caps).dtype is expected, (setting, caps["cpu_name"])
    # on this machine, auto follows this machine's own flags
    native = bool(cpu_flags(cpu_capabilities(), ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16")))
    assert (amp_dtype(load_config(None, []), cpu) is torch.bfloat16) == native


def test_an_unknown_precision_is_refused_in_one_line():
    with pytest.raises(UserError, match="performance.cpu_precision"):
        load_config(None, ["performance.cpu_precision=fp16"])


def test_cpu_description_names_the_cpu_and_its_flags():
    assert cpu_description(AMX_XEON).startswith("Intel(R) Xeon(R) Platinum 8481C (amx_bf16 amx_int8 avx512_bf16")
    assert cpu_description(AVX2_EPYC) == "AMD EPYC 7B12 (avx2; no AMX)"
    assert cpu_description(ARM_BF16) == "Neoverse-V1 (bf16 i8mm)"


def test_forced_bf16_trains_on_cpu_and_resumes_in_fp32(tmp_path, tiny_data, capsys):
    """bf16 autocast on any CPU (emulated where it is not native): the banner and the checkpoint say so, the
    weights stay fp32, and --resume in fp32 continues the run with one line about the change."""
    overlay = write_overlay(tmp_path, tiny_data, **{"train.epochs": 2, "performance.cpu_precision": "bf16",
                                                    "performance.channels_last": True,
                                                    "monitoring.mlflow.enabled": False})
    argv = ["--config", overlay, "--model", "resnet18"]
    assert run_script("train", [*argv, "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "Mixed Precision: Enabled (bf16 autocast) - performance.cpu_precision=bf16" in out
    assert "Memory Format: channels_last" in out and "CPU Features: " in out
    last_path = tmp_path / "checkpoints" / "resnet18_outputs" / "last_model.pth"
    last = load_checkpoint(last_path)
    assert last["precision"] == "bf16" and last["epoch"] == 1
    assert all(v.dtype == torch.float32 for v in last["model_state"].values() if v.is_floating_point())
    assert all(torch.isfinite(v).all() for v in last["model_state"].values() if v.is_floating_point())

    assert run_script("train", [*argv, "--set", "performance.cpu_precision=fp32", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "Mixed Precision: Disabled (fp32)" in out
    assert f"note: {last_path} was trained in bf16; continuing in fp32" in out
    resumed = load_checkpoint(last_path)
    assert resumed["epoch"] == 2 and resumed["precision"] == "fp32"
    assert not any(torch.equal(resumed["model_state"][k], v) for k, v in last["model_state"].items()
                   if k.endswith("conv1.weight"))  # it trained on
