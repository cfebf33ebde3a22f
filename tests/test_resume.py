"""Interrupt (SIGTERM mid-epoch) + --resume ends bit for bit where the uninterrupted run ends (CPU, --deterministic)."""
from __future__ import annotations

import os
import random
import signal

import numpy as np
import pytest
import torch

from conftest import build_with_training_hook, run_script, write_overlay
from core.checkpoint import load_checkpoint
from core.errors import UserError
from training.progress import capture_rng, restore_rng

SETTINGS = {"train.epochs": 2, "models.resnet18.batch_size": 4, "monitoring.mlflow.enabled": False}


def sigterm_at(call: int):
    """A build_model replacement that sends this process SIGTERM during training forward number `call`."""
    def on_forward(n, output):
        if n == call:
            os.kill(os.getpid(), signal.SIGTERM)
    return build_with_training_hook(on_forward)


@pytest.mark.parametrize("fused", [False, True], ids=["foreach-adamw", "fused-adamw"])
def test_interrupted_and_resumed_run_matches_the_uninterrupted_one(tmp_path, tiny_data, monkeypatch, capsys, fused):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    straight.mkdir(), broken.mkdir()
    argv = ["--model", "resnet18", "--deterministic", "--seed", "7", "--set", f"performance.fused_optimizer={fused}"]
    assert run_script("train", ["--config", write_overlay(straight, tiny_data, **SETTINGS), *argv]) == 0

    overlay = write_overlay(broken, tiny_data, **SETTINGS)
    with monkeypatch.context() as m:
        m.setattr("train.build_model", sigterm_at(6))  # 2 x 8 images per class / batch 4: epoch 2, batch 1 or 2
        assert run_script("train", ["--config", overlay, *argv]) == 130
    out = capsys.readouterr().out
    assert "Resume with: python train.py --model resnet18 --resume" in out
    last = broken / "checkpoints" / "resnet18_outputs" / "last_model.pth"
    progress = load_checkpoint(last)["progress"]
    assert progress["epoch"] == 1 and progress["batches_done"] in (1, 2)  # stopped mid-epoch 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored after the run

    assert run_script("train", ["--config", overlay, *argv, "--resume"]) == 0
    assert "Resuming from:" in capsys.readouterr().out
    a = load_checkpoint(straight / "checkpoints" / "resnet18_outputs" / "last_model.pth")
    b = load_checkpoint(last)
    assert a["epoch"] == b["epoch"] == 2
    assert a["model_state"].keys() == b["model_state"].keys()
    assert all(torch.equal(a["model_state"][k], b["model_state"][k]) for k in a["model_state"])
    assert a["metrics"]["train_loss"] == b["metrics"]["train_loss"]  # the resumed epoch's stats are whole too


def test_rng_states_survive_a_weights_only_checkpoint(tmp_path):
    state = capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(1))
    torch.save({"rng": state}, tmp_path / "rng.pth")
    restore_rng(torch.load(tmp_path / "rng.pth", weights_only=True)["rng"])
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


def test_resume_refuses_what_cannot_be_resumed(tmp_path, tiny_data, trained):
    overlay = write_overlay(tmp_path, tiny_data)
    with pytest.raises(UserError, match="nothing to resume: .*last_model.pth not found"):
        run_script("train", ["--config", overlay, "--model", "resnet18", "--resume"])
    _, _, best = trained
    with pytest.raises(UserError, match="holds no training state"):
        run_script("train", ["--config", overlay, "--model", "resnet18", "--resume", best])
    with pytest.raises(UserError, match="is a resnet18 checkpoint; run with --model resnet18"):
        run_script("train", ["--config", overlay, "--model", "efficientnet_b0", "--resume",
                             best.parent / "last_model.pth"])
