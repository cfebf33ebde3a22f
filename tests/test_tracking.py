"""Tracking: real TensorBoard files and a real MLflow sqlite run; a failing tracker costs one warning, not the run."""
from __future__ import annotations

import socket

import pytest
import torch
from mlflow import MlflowClient

from conftest import run_script, write_overlay
from core.config import load_config
from core.tracking import RunTracker


def sqlite_uri(tmp) -> str:
    return f"sqlite:///{tmp / 'mlflow.db'}"


def test_training_leaves_tensorboard_events_and_an_mlflow_run(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, tmp, _ = trained
    events = EventAccumulator(str(tmp / "runs" / "resnet18_logs")).Reload()
    assert {"train_loss", "val_acc", "lr", "images_per_s"} <= set(events.Tags()["scalars"])

    client = MlflowClient(sqlite_uri(tmp))
    exp = client.get_experiment_by_name("brain-cancer-mri-v2-resnet18")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_s", "images_per_s",
            "system_cpu_pct", "system_ram_pct", "best_val_acc"} <= set(run.data.metrics)
    assert run.data.params["models.resnet18.lr"] == "0.003" and "normalization.mean" in run.data.params
    artifacts = {a.path for d in ("checkpoints", "config") for a in client.list_artifacts(run.info.run_id, d)}
    assert {"checkpoints/best_model.pth", "config/resolved_config.yaml"} <= artifacts
    # the checkpoint links back to its training run (evaluation and the model card cite it)
    ckpt = torch.load(tmp / "checkpoints" / "resnet18_outputs" / "best_model.pth", map_location="cpu",
                      weights_only=True)
    assert ckpt["mlflow_run_id"] == run.info.run_id


def test_params_are_flattened_and_clipped_and_runs_nest_and_end_with_their_status(trained):
    _, tmp, _ = trained
    cfg = load_config(None, [f"monitoring.mlflow.tracking_uri={sqlite_uri(tmp)}", "monitoring.wandb.mode=disabled",
                             "monitoring.mlflow.parent_run_id=parent123"])
    with RunTracker(cfg, run_name="t", mlflow_experiment="tracking-test", wandb_project="p") as tracker:
        tracker.log_params({"a": {"b": "x" * 7000}, "n": 1})
        tracker.log_params({"n": 2})  # MLflow params are immutable: a second value is ignored, not an error
        ok_id = tracker.mlflow_run_id
    with pytest.raises(KeyboardInterrupt), RunTracker(cfg, run_name="t", mlflow_experiment="tracking-test",
                                                      wandb_project=None) as tracker:
        killed_id = tracker.mlflow_run_id
        raise KeyboardInterrupt
    client = MlflowClient(sqlite_uri(tmp))
    ok = client.get_run(ok_id)
    assert len(ok.data.params["a.b"]) == 6000 and ok.data.params["n"] == "1"
    assert ok.data.tags["mlflow.parentRunId"] == "parent123" and ok.info.status == "FINISHED"
    assert client.get_run(killed_id).info.status == "KILLED"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_server_down_and_wandb_failing_cost_one_warning_each(tmp_path, tiny_data, monkeypatch, capsys):
    import wandb

    def broken_init(*args, **kwargs):
        raise RuntimeError("W&B is down")
    monkeypatch.setattr(wandb, "init", broken_init)
    overlay = write_overlay(tmp_path, tiny_data, **{
        "monitoring.mlflow.tracking_uri": f"http://127.0.0.1:{closed_port()}", "monitoring.wandb.mode": "offline"})
    assert run_script("train", ["--config", overlay, "--model", "resnet18"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("MLflow tracking is off") == 1 and "cannot reach http://127.0.0.1" in captured.err
    assert captured.err.count("W&B tracking is off") == 1 and "W&B is down" in captured.err
    assert "MLflow: off" in captured.out  # the banner says so too
    assert (tmp_path / "checkpoints" / "resnet18_outputs" / "best_model.pth").is_file()
    assert list((tmp_path / "runs" / "resnet18_logs").glob("events.out.tfevents.*"))


def test_a_backend_failing_mid_run_warns_once_then_stays_off(tmp_path, capsys):
    cfg = load_config(None, ["monitoring.mlflow.enabled=false", "monitoring.wandb.mode=disabled"])
    tracker = RunTracker(cfg, run_name="t", mlflow_experiment="e", wandb_project="p", tensorboard_dir=tmp_path / "tb")
    assert tracker.active == ["TensorBoard"]

    def full(*args, **kwargs):
        raise OSError("Disk quota exceeded")
    tracker._tb.add_scalar = full
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.log_metrics({"loss": 0.5}, step=2)
    tracker.close()
    assert capsys.readouterr().err.count("warning: TensorBoard tracking is off") == 1
    assert tracker.active == [] and tracker.targets() == ["TensorBoard: off (OSError: Disk quota exceeded)"]
