"""The figures of evaluation_metrics.json: point estimates (scikit-learn) with bootstrap intervals,
calibration, timing, imbalance, and where they came from (checkpoint, split manifest)."""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from data.manifest import sha256_file
from evaluation.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    logits_from_probs,
    reliability_bins,
)
from evaluation.metrics import classification_metrics
from evaluation.uncertainty import bootstrap_intervals, with_interval

if TYPE_CHECKING:
    from core.config import Config
    from data.manifest import Split


def class_imbalance(train_labels, class_names: list[str]) -> tuple[float, dict[str, int]]:
    """max/min class count in the training split, and the counts."""
    counts = Counter(int(v) for v in train_labels)
    per_class = {name: counts.get(k, 0) for k, name in enumerate(class_names)}
    # a class with no training image makes the ratio unbounded: count it as one image
    return max(per_class.values()) / max(min(per_class.values()), 1), per_class


def score_predictions(y_true, y_prob, class_names: list[str], ev) -> dict:
    """Accuracy, balanced accuracy, macro F1, per-class metrics (with CIs), ROC AUC, confusion matrix."""
    m = classification_metrics(y_true, y_prob, class_names, with_auc=True)
    y_pred = np.asarray(y_prob).argmax(axis=1)
    ci = bootstrap_intervals(y_true, y_pred, len(class_names), ev.bootstrap_samples, ev.confidence, ev.bootstrap_seed)
    per_class = {}
    for k, (name, row) in enumerate(m["per_class"].items()):
        per_class[name] = {
            "precision": row["precision"], "recall": row["recall"],
            "sensitivity": with_interval(row["recall"], *ci["sensitivity"][:, k]),
            "specificity": with_interval(row["specificity"], *ci["specificity"][:, k]),
            "f1": row["f1"], "support": row["support"], "roc_auc": row["roc_auc"],
        }
    return {
        "n_test": m["n"], "confidence": ev.confidence, "bootstrap_samples": ev.bootstrap_samples,
        **{key: with_interval(m[key], *ci[key]) for key in ("accuracy", "balanced_accuracy", "macro_f1")},
        "roc_auc_macro": m["roc_auc_macro"], "per_class": per_class,
        "confusion_matrix": m["confusion_matrix"], "confusion_matrix_row_pct": m["confusion_matrix_row_pct"],
        "notes": m["notes"],
    }


def calibration_summary(y_true, y_prob, n_bins: int, val: tuple | None = None) -> tuple[dict, dict, dict | None]:
    """(calibration record, reliability bins, bins after temperature scaling or None).

    val = (y_val, p_val): fit a temperature on the validation split and apply it to the test split.
    """
    record = {"ece": expected_calibration_error(y_true, y_prob, n_bins), "n_bins": n_bins,
              "temperature": None, "ece_after_temperature": None}
    bins_after = None
    if val is not None:
        temperature = fit_temperature(logits_from_probs(val[1]), val[0])
        scaled = apply_temperature(logits_from_probs(y_prob), temperature)
        record.update(temperature=temperature, ece_after_temperature=expected_calibration_error(y_true, scaled, n_bins))
        bins_after = reliability_bins(y_true, scaled, n_bins)
    return record, reliability_bins(y_true, y_prob, n_bins), bins_after


def monitoring_reference(y_prob, class_names: list[str], temperature: float | None,
                         distances: list[float] | None, checks: dict | None = None) -> dict:
    """What a server's monitoring compares its recent predictions with, from the test split: the share of each
    predicted class, every top probability (after the temperature too, when one was fitted) and every slice's
    intensity distance from the training split (data.intensity; None for a model without the reference); `checks`:
    every slice's feature distance and conformal set size (evaluation.scoring.check_figures)."""
    y_prob = np.asarray(y_prob, dtype=np.float64)
    counts = np.bincount(y_prob.argmax(axis=1), minlength=len(class_names))
    calibrated = None
    if temperature is not None:
        calibrated = [round(float(v), 6) for v in apply_temperature(logits_from_probs(y_prob), temperature).max(axis=1)]
    return {"n": int(len(y_prob)), "predicted_share": {c: float(n / max(len(y_prob), 1)) for c, n in
                                                       zip(class_names, counts)},
            "confidence": [round(float(v), 6) for v in y_prob.max(axis=1)], "confidence_calibrated": calibrated,
            "intensity_distance": None if distances is None else [round(float(d), 6) for d in distances],
            **(checks or {})}


def provenance(ckpt: dict, ckpt_path, split: Split) -> dict:
    """Which checkpoint (by content: registration refuses figures of another file) and split manifest every
    figure comes from."""
    return {"model": ckpt["model_name"], "checkpoint": str(ckpt_path), "checkpoint_sha256": sha256_file(ckpt_path),
            "checkpoint_epoch": int(ckpt["epoch"]),
            "split_manifest": str(split.manifest_path), "data_fingerprint": split.fingerprint,
            "class_names": list(ckpt["class_names"])}


def evaluation_record(ckpt: dict, ckpt_path, split: Split, scores: dict, calibration: dict, timing: dict) -> dict:
    """The evaluation_metrics.json contract, keys in the documented order."""
    _, train_labels = split.samples("train")
    ratio, counts = class_imbalance(train_labels, list(ckpt["class_names"]))
    return {**provenance(ckpt, ckpt_path, split), **scores, "calibration": calibration, "timing": timing,
            "class_imbalance_ratio": float(ratio), "train_class_counts": counts,
            "training_run_id": ckpt.get("mlflow_run_id"), "created": time.strftime("%Y-%m-%d %H:%M:%S")}


# The evaluation files with per-patient content: image paths, and the Grad-CAM overlays of patients' slices.
PATIENT_FILES = ("predictions.csv", "series_predictions.csv", "external_manifest.csv", "gradcam")


def log_evaluation_files(tracker, files: list, artifact_path: str) -> None:
    """Every file into the trackers; those with per-patient content reach W&B only when
    monitoring.wandb.log_patient_data allows it."""
    for path in files:
        tracker.log_artifact(path, artifact_path, patient_data=Path(path).name in PATIENT_FILES)


def open_tracker(cfg: Config, model_name: str, stage: str, ckpt: dict):
    """The MLflow/W&B run of an evaluation ("evaluation") or quick test ("test"), tagged with the training run."""
    from core.tracking import RunTracker, experiment_name, wandb_project

    experiment = experiment_name(stage, model_name, cfg.monitoring.mlflow.experiment_prefix)
    project = wandb_project(cfg, stage)
    print("📊 Setting up evaluation logging..." if stage == "evaluation" else "📊 Setting up test logging...")
    print(f"📈 MLflow experiment: {experiment}")
    print(f"🔮 Wandb project: {project}")
    tags = {"model": model_name, "stage": stage, "data_fingerprint": ckpt.get("data_fingerprint"),
            "training_run_id": ckpt.get("mlflow_run_id") or "unknown"}
    tracker = RunTracker(cfg, run_name=f"{model_name}-{stage}", mlflow_experiment=experiment,
                         wandb_project=project, tags=tags, job_type=stage)
    for line in tracker.targets():
        print(f"   {line}")
    return tracker
