"""register_model.py / deploy/registry.py against a real sqlite MLflow registry in tmp."""
from __future__ import annotations

import json
import shutil

import pytest
from mlflow import MlflowClient

from conftest import run_script
from core.checkpoint import load_checkpoint
from core.errors import UserError
from deploy.registry import Evaluation, gate_tags, validate_semver


def write_evaluation(out_dir, ckpt: dict, passed: bool) -> None:
    """evaluation_metrics.json + medical_validation.json as evaluate.py writes them."""
    ci = lambda v: {"value": v, "ci_low": v - 0.05, "ci_high": min(1.0, v + 0.05)}  # noqa: E731
    per_class = {c: {"precision": 0.9, "recall": 0.9, "sensitivity": ci(0.9 if passed else 0.5),
                     "specificity": ci(0.95), "f1": 0.9, "support": 8, "roc_auc": 0.97} for c in ckpt["class_names"]}
    metrics = {"model": "resnet18", "checkpoint": "best_model.pth", "checkpoint_epoch": ckpt["epoch"],
               "split_manifest": ckpt["split_manifest"], "data_fingerprint": ckpt["data_fingerprint"],
               "class_names": ckpt["class_names"], "n_test": 24, "confidence": 0.95, "bootstrap_samples": 200,
               "accuracy": ci(0.9 if passed else 0.6), "balanced_accuracy": ci(0.9), "macro_f1": ci(0.9),
               "roc_auc_macro": 0.97, "per_class": per_class, "confusion_matrix": [[8, 0, 0], [0, 8, 0], [0, 0, 8]],
               "calibration": {"ece": 0.05, "n_bins": 15, "temperature": 1.2, "ece_after_temperature": 0.03},
               "timing": {"device": "cpu", "latency_ms_mean": 3.0, "latency_ms_p95": 4.0,
                          "throughput_images_per_s": 300, "batch_size": 1}}
    gates = [{"name": "accuracy", "value": metrics["accuracy"]["value"], "threshold": 0.85, "comparison": ">=",
              "passed": passed},
             {"name": "sensitivity", "value": 0.9, "threshold": 0.8, "comparison": ">=", "passed": True}]
    validation = {"model": "resnet18", "strict": False, "basis": "point estimate", "gates": gates,
                  "deployment_ready": passed}
    (out_dir / "evaluation_metrics.json").write_text(json.dumps(metrics))
    (out_dir / "medical_validation.json").write_text(json.dumps(validation))


@pytest.fixture
def store(trained, tmp_path):
    """(argv prefix, model output folder, client): the trained checkpoint in its own output and registry."""
    overlay, _, ckpt_path = trained
    out = tmp_path / "checkpoints" / "resnet18_outputs"
    out.mkdir(parents=True)
    shutil.copy(ckpt_path, out / "best_model.pth")
    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    argv = ["--config", overlay, "--model", "resnet18", "--set", f"train.output_dir={tmp_path / 'checkpoints'}",
            "--set", f"monitoring.mlflow.tracking_uri={uri}",
            "--set", f"monitoring.mlflow.artifact_location={tmp_path / 'mlartifacts'}"]
    return argv, out, MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_unevaluated_or_failed_model_is_refused(store):
    argv, out, _ = store
    with pytest.raises(UserError, match="has no evaluation"):
        run_script("register_model", argv + ["--version", "1.0.0"])
    write_evaluation(out, load_checkpoint(out / "best_model.pth"), passed=False)
    with pytest.raises(UserError, match="failed the medical-validation gates .*accuracy"):
        run_script("register_model", argv + ["--version", "1.0.0", "--alias", "production"])


@pytest.mark.parametrize("bad", ["1.0", "v1.0.0", "1.0.0.0", "01.0.0", ""])
def test_invalid_semver_is_refused(bad):
    with pytest.raises(UserError, match="not a semantic version"):
        validate_semver(bad)


def test_forced_tags_say_why():
    failed = Evaluation({"accuracy": {"value": 0.6}}, {"deployment_ready": False, "gates": []})
    assert gate_tags(failed, True, "out", "resnet18") == {"medical_validation": "failed", "forced": "true",
                                                          "accuracy": "0.6000"}
    assert gate_tags(Evaluation(None, None), True, "out", "resnet18")["medical_validation"] == "missing"


def test_register_promote_duplicate_and_force(store, tmp_path, capsys):
    argv, out, client = store
    ckpt = load_checkpoint(out / "best_model.pth")
    write_evaluation(out, ckpt, passed=True)
    assert run_script("register_model", argv + ["--version", "1.0.0", "--alias", "production",
                                                "--tags", "team=neuro", "--description", "first"]) == 0
    assert "is now @production" in capsys.readouterr().out

    mv = client.get_model_version_by_alias("brain-cancer-resnet18", "production")
    onnx_mv = client.get_model_version_by_alias("brain-cancer-resnet18-onnx", "production")
    assert mv.tags["semver"] == onnx_mv.tags["semver"] == "1.0.0"
    assert mv.tags["medical_validation"] == "passed" and mv.tags["forced"] == "false" and mv.tags["team"] == "neuro"
    assert mv.tags["onnx_version"] == str(onnx_mv.version) and "alias.production" in mv.tags
    card = (out / "model_card.md").read_text()
    assert "not a diagnosis" in card and "95% CI 0.850-0.950" in card and ckpt["data_fingerprint"] in card
    assert "first" in mv.description and "## Intended use" in mv.description
    run_artifacts = [a.path for a in client.list_artifacts(mv.run_id)]
    assert "model_card.md" in run_artifacts and "evaluation" in run_artifacts

    with pytest.raises(UserError, match="already has version 1.0.0"):
        run_script("register_model", argv + ["--version", "1.0.0"])

    # A failing model goes in only with --force, and says so on the version it became.
    write_evaluation(out, ckpt, passed=False)
    assert run_script("register_model", argv + ["--version", "1.1.0", "--alias", "production", "--force"]) == 0
    forced = client.get_model_version_by_alias("brain-cancer-resnet18", "production")
    assert forced.version != mv.version and forced.tags["forced"] == "true"
    assert forced.tags["medical_validation"] == "failed"
    assert "Registered with --force" in (out / "model_card.md").read_text()
