"""Two CPU processes under torchrun (gloo): DistributedDataParallel training that finishes, checkpoints on rank 0."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, write_overlay
from core.checkpoint import load_checkpoint

TRAIN = str(ROOT / "train.py")


def ddp_env(tmp_path) -> dict:
    """One thread per rank, no GPU; torchrun's rendezvous files in the test's folder (a failed run leaves them)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TMPDIR": str(tmp_path)}


@pytest.mark.slow("torchrun starts two training processes that meet over gloo")
def test_torchrun_two_processes_on_cpu(tmp_path, tiny_data):
    overlay = write_overlay(tmp_path, tiny_data, **{"train.epochs": 2, "monitoring.mlflow.enabled": False,
                                                    "models.resnet18.batch_size": 4})
    torchrun = Path(sys.executable).with_name("torchrun")
    env = ddp_env(tmp_path)
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node=2", TRAIN, "--config", str(overlay),
                           "--model", "resnet18"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Device: cpu (DDP, 2 processes)" in proc.stdout and "Batch size: 4 per process x 2 processes" in proc.stdout
    assert proc.stdout.count("Starting Brain Cancer MRI Training") == 1  # rank 0 alone prints
    assert proc.stdout.count("Epoch 2/2 Summary:") == 1
    last = load_checkpoint(tmp_path / "checkpoints" / "resnet18_outputs" / "last_model.pth")
    assert last["epoch"] == 2 and last["progress"]["world_size"] == 2
    assert len(last["rng"]) == 2 and not torch.equal(last["rng"][0]["torch"], last["rng"][1]["torch"])
    assert not any(k.startswith("module.") for k in last["model_state"])  # saved unwrapped, loadable anywhere


@pytest.mark.slow("torchrun starts two training processes, and one waits out the other's failure")
def test_when_rank_0_fails_first_every_rank_leaves_with_one_line(tmp_path, tiny_data):
    overlay = write_overlay(tmp_path, tmp_path / "no such data set", **{"monitoring.mlflow.enabled": False})
    torchrun = Path(sys.executable).with_name("torchrun")
    env = ddp_env(tmp_path)
    # torchrun looks at its workers every 10 s: a rank still waiting then would be killed (exit code -15)
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node=2", "--monitor-interval=10", TRAIN,
                           "--config", str(overlay), "--model", "resnet18"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "error: data set folder not found" in output  # rank 0's own line
    assert "error: rank 0 failed while preparing the data (its error is above); rank 1 stops too" in output
    assert "SIGTERM" not in output and output.count("exitcode  : 2") == 2, output[-3000:]  # both left by themselves
