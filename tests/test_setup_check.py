"""test_mlflow_setup.py: what works and what to do, from a real sqlite store, real files and a closed port."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torchvision

from tests.conftest import run_script, write_overlay


@pytest.fixture
def setup(tmp_path, tiny_data, monkeypatch):
    """A store with one registered model and an alias, a local weights file, one model's weights in the hub
    cache, the data set present, no demo generated."""
    from mlflow import MlflowClient

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = torchvision.models.get_weight("EfficientNet_B0_Weights.IMAGENET1K_V1").url
    cached = tmp_path / "torch" / "hub" / "checkpoints" / os.path.basename(url)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"cached")
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18-local.pth")
    overlay = write_overlay(tmp_path, tiny_data, **{
        "models.resnet18.weights": str(tmp_path / "resnet18-local.pth"), "models.resnet18.pretrained": True,
        "models.efficientnet_b0.pretrained": True, "models.swin_s.pretrained": False,
        "demo.root": str(tmp_path / "demo")})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)  # not a registry URI another test set globally
    client.create_registered_model("brain-cancer-resnet18")
    run = client.create_run(client.create_experiment("x"))
    client.create_model_version("brain-cancer-resnet18", f"runs:/{run.info.run_id}/model", run.info.run_id)
    client.set_registered_model_alias("brain-cancer-resnet18", "production", "1")
    return overlay, tmp_path


def line(out: str, name: str) -> str:
    """The line of one check (its mark, name and detail)."""
    return next(ln for ln in out.splitlines() if ln[2:].strip().startswith(name + " "))


def check(overlay, *sets) -> int:
    return run_script("test_mlflow_setup", ["--config", overlay, *[a for s in sets for a in ("--set", s)]])


def test_setup_check_says_what_works(setup, capsys):
    overlay, tmp = setup
    before = (tmp / "mlflow.db").stat().st_mtime_ns
    assert check(overlay) == 0
    out = capsys.readouterr().out
    assert line(out, "PyTorch").startswith("✅") and f"torch {torch.__version__}" in out
    assert "CPU" in line(out, "CUDA") or "GPU(s)" in line(out, "CUDA")
    assert "1 registered model(s): brain-cancer-resnet18 (production -> v1)" in line(out, "MLflow store")
    assert "disabled" in line(out, "W&B")
    assert line(out, "weights resnet18").endswith(f"local file {tmp / 'resnet18-local.pth'}")
    assert line(out, "weights efficientnet_b0").startswith("✅")
    assert "ImageNet weights on this machine" in line(out, "weights efficientnet_b0")
    assert line(out, "weights swin_t").startswith("⚠️") and "copy that file to" in out
    assert "random initialization" in line(out, "weights swin_s")
    assert "24 images in 3 classes (brain_glioma 8, brain_menin 8, brain_tumor 8)" in line(out, "data set")
    assert "not generated yet" in line(out, "demo") and "python train.py --model resnet18 --demo" in out
    assert "0 failing" in out
    # it only reads: the store is untouched and no demo was generated
    assert (tmp / "mlflow.db").stat().st_mtime_ns == before and not (tmp / "demo").exists()


def test_what_fails_is_said_with_what_to_do(setup, capsys):
    overlay, tmp = setup
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nobody listens there
    assert check(overlay, f"monitoring.mlflow.tracking_uri=http://127.0.0.1:{port}",
                 f"models.resnet18.weights={tmp / 'missing.pth'}") == 1
    out = capsys.readouterr().out
    assert line(out, "MLflow store").startswith("❌") and "./start_mlflow_server.sh" in out
    assert "missing.pth not found" in out and "Fix first: MLflow store, weights resnet18" in out
    assert check(overlay, "monitoring.mlflow.tracking_uri=./mlruns") == 1
    assert "file store" in capsys.readouterr().out
