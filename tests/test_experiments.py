"""run_experiments.py: two tiny models plus an invalid name, each in its own process; summary files; --resume."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, write_overlay
from core.checkpoint import load_checkpoint
from core.config import load_config
from core.errors import UserError
from ops.experiments import MLFLOW_EXPERIMENT, last_error_line, run_child, settings_hash
from tests.slowest import slow_setup

MODELS = ["resnet18", "not_a_model", "efficientnet_b0"]


def run_experiments(overlay, *extra) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(ROOT / "run_experiments.py"), "--config", str(overlay), "--models", ",".join(MODELS),
            "--epochs", "1", "--quiet", *extra]
    return subprocess.run(argv, cwd=Path(overlay).parent, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
@slow_setup("run_experiments.py trains three models, each in its own process")
def experiments(tmp_path_factory, tiny_data):
    """One real run: (overlay, tmp dir, completed process, summary JSON)."""
    tmp = tmp_path_factory.mktemp("experiments run")
    # One batch per epoch and a short bootstrap: the run is about process start-up, not about learning.
    overlay = write_overlay(tmp, tiny_data, **{"models.resnet18.batch_size": 32,
                                              "models.efficientnet_b0.batch_size": 32,
                                              "evaluation.bootstrap_samples": 50})
    res = run_experiments(overlay)
    summary = tmp / "checkpoints" / "experiments" / "experiments_summary.json"
    assert summary.is_file(), res.stdout[-3000:] + res.stderr[-3000:]
    return overlay, tmp, res, json.loads(summary.read_text())


def by_model(summary: dict) -> dict:
    return {r["model"]: r for r in summary["experiments"]}


def test_valid_models_finish_and_the_invalid_one_fails(experiments):
    _, _, res, summary = experiments
    assert res.returncode == 1  # one experiment failed
    rows = by_model(summary)
    assert list(rows) == MODELS
    assert rows["resnet18"]["status"] == rows["efficientnet_b0"]["status"] == "SUCCESS", res.stdout[-3000:]
    assert rows["not_a_model"]["status"] == "FAILED" and "unknown model 'not_a_model'" in rows["not_a_model"]["error"]
    out = res.stdout
    for line in ("🧠 Brain Cancer MRI Classification - Model Comparison", "🔬 Experiment 1/3",
                 "🚀 Starting experiment: resnet18", " EXPERIMENT SUMMARY"):
        assert line in out
    table = out[out.index(" EXPERIMENT SUMMARY"):]
    assert "resnet18        | ✅ SUCCESS |" in table and "| Epochs: 1 | Batch: 32 |" in table
    assert "not_a_model     | ❌ FAILED  |" in table and "└─ error: " in table


def test_summary_numbers_come_from_the_children_outputs(experiments):
    _, tmp, _, summary = experiments
    for model in ("resnet18", "efficientnet_b0"):
        row = by_model(summary)[model]
        out_dir = tmp / "checkpoints" / f"{model}_outputs"
        assert row["best_val_acc"] == pytest.approx(load_checkpoint(out_dir / "best_model.pth")["metrics"]["val_acc"])
        metrics = json.loads((out_dir / "evaluation_metrics.json").read_text())
        assert row["test_acc"] == pytest.approx(metrics["accuracy"]["value"])
        assert row["macro_f1"] == pytest.approx(metrics["macro_f1"]["value"])
        validation = json.loads((out_dir / "medical_validation.json").read_text())
        assert row["deployment_ready"] is validation["deployment_ready"]
        assert row["train_seconds"] > 0 and row["eval_seconds"] > 0
        log = tmp / "checkpoints" / "experiments" / "logs" / f"{model}_train.log"
        assert "train.py --model " + model in log.read_text()


def test_csv_and_plot_hold_every_model(experiments):
    _, tmp, _, _ = experiments
    out = tmp / "checkpoints" / "experiments"
    with (out / "experiments_summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["status"]) for r in rows] == [
        ("resnet18", "SUCCESS"), ("not_a_model", "FAILED"), ("efficientnet_b0", "SUCCESS")]
    png = (out / "experiments_comparison.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_training_runs_nest_under_the_parent_mlflow_run(experiments):
    from mlflow import MlflowClient

    _, tmp, _, summary = experiments
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    parent = summary["mlflow_parent_run_id"]
    assert parent and client.get_run(parent).info.status == "FINISHED"
    assert client.get_experiment(client.get_run(parent).info.experiment_id).name == MLFLOW_EXPERIMENT
    children = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    names = {client.get_experiment(r.info.experiment_id).name for r in children}
    assert {"brain-cancer-mri-v2-resnet18", "brain-cancer-mri-v2-efficientnet_b0"} <= names


def test_resume_skips_finished_models(experiments):
    overlay, tmp, _, _ = experiments
    ckpt = tmp / "checkpoints" / "resnet18_outputs" / "best_model.pth"
    logs = tmp / "checkpoints" / "experiments" / "logs"
    before = {p.name: p.stat().st_mtime_ns for p in [ckpt, *logs.iterdir()]}
    res = run_experiments(overlay, "--resume")
    assert "⏭️  Skipping resnet18" in res.stdout and "⏭️  Skipping efficientnet_b0" in res.stdout
    after = {p.name: p.stat().st_mtime_ns for p in [ckpt, *logs.iterdir()]}
    assert after == before  # no retraining, no re-evaluation
    rows = by_model(json.loads((tmp / "checkpoints" / "experiments" / "experiments_summary.json").read_text()))
    assert rows["resnet18"]["resumed"] and rows["resnet18"]["status"] == "SUCCESS"
    assert rows["not_a_model"]["status"] == "FAILED" and not rows["not_a_model"]["resumed"]  # failures are retried


def test_settings_hash_tracks_only_what_changes_a_model():
    base = settings_hash(load_config(overrides={"model": "resnet18"}))
    other_recipe = load_config(sets=["models.efficientnet_b0.lr=0.5", "monitoring.mlflow.parent_run_id=abc"],
                               overrides={"model": "resnet18"})
    assert settings_hash(other_recipe) == base
    assert settings_hash(load_config(overrides={"model": "resnet18", "train.epochs": 2})) != base
    assert settings_hash(load_config(sets=["models.resnet18.lr=0.5"], overrides={"model": "resnet18"})) != base


def test_a_crashing_child_reports_its_error_line(tmp_path):
    code = "print('epoch 1'); raise RuntimeError('CUDA out of memory. Tried to allocate 2.00 GiB')"
    rc, seconds, error = run_child([sys.executable, "-c", code], tmp_path / "crash.log", echo=False)
    assert rc == 1 and error == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert "epoch 1" in (tmp_path / "crash.log").read_text()


def test_error_line_of_a_killed_child():
    assert last_error_line("Epoch 1/5\n 40%|####  | 4/10\r 50%|#####", -9).startswith("killed by SIGKILL (out of "
                                                                                      "memory?)")
    assert last_error_line("", 2) == "exit code 2"


def test_the_default_run_is_a_short_comparison():
    """No flags: 5 epochs for the CNNs and 3 for the transformers, as the original's comparison; --epochs N for
    every model; --full (or experiments.epochs: null) gives each its full train.epochs."""
    from ops.experiments import Plan, child_argv, epochs_line

    plan = Plan()
    assert [plan.epochs_for(m) for m in ("resnet18", "efficientnet_b0", "swin_t", "vit_b_16")] == [5, 5, 3, 3]
    assert plan.load("swin_t").train.epochs == 3
    argv = child_argv("train.py", "vit_b_16", plan, None, first=True)
    assert argv[argv.index("--epochs") + 1] == "3"
    assert "resnet18 5, efficientnet_b0 5, swin_t 3, vit_b_16 3" in epochs_line(plan, load_config().experiments.models)
    assert Plan(epochs=2).epochs_for("swin_t") == 2
    assert Plan(full=True).epochs_for("resnet18") is None and Plan(full=True).load("resnet18").train.epochs == 50
    assert Plan(sets=["experiments.epochs=null"]).epochs_for("resnet18") is None
    assert "--epochs" not in child_argv("train.py", "resnet18", Plan(full=True), None, first=True)
    with pytest.raises(UserError, match="keys are model names or 'default'"):
        load_config(sets=["experiments.epochs={resnet_18: 2}"])
