"""One evaluation of a checkpoint on its test split: the figures with their intervals, calibration, timing, the
gate verdict, and the files registration reads (evaluation_metrics.json, medical_validation.json, predictions.csv,
evaluation_report.txt). evaluate.py and the evaluation at the end of train.py both run it; `evaluate.py --onnx`
runs it on an exported file instead of the checkpoint's PyTorch model. `score_set` is the part an external set
(evaluation.external) shares with it: predictions, timing, figures, calibration, the record."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from core.conformal import CONFORMAL_KEY, set_members
from core.feature_ood import FEATURE_OOD_KEY, feature_limit
from core.hardware import HardwareSampler
from data.dataset import GrayImageDataset, make_loader
from data.intensity import REFERENCE_KEY, distance_to, reference_limit
from data.preprocess import Preprocessor
from evaluation.answer_report import conformal_report, refer_reasons, refer_report
from evaluation.gates import check_gates
from evaluation.prediction import Scored, predict_outputs, split_dataset
from evaluation.record import calibration_summary, evaluation_record, monitoring_reference, score_predictions
from evaluation.reports import write_json, write_predictions, write_report
from evaluation.series_level import SeriesEvaluation, evaluate_series, write_series_predictions
from evaluation.timing import measure_inference
from models.features import answering_model
from models.loading import model_from_checkpoint

if TYPE_CHECKING:
    from core.config import Config
    from evaluation.source import OpenedCheckpoint


@dataclass
class TestEvaluation:
    record: dict  # evaluation_metrics.json
    validation: dict  # medical_validation.json: the gates of cfg.evaluation.gates on this record
    test: Scored
    model: torch.nn.Module
    pre: Preprocessor
    bins: dict  # reliability bins, before and after temperature scaling (None without --calibrate)
    bins_after: dict | None
    series: SeriesEvaluation | None = None  # the test split's DICOM series, read by the series rule
    answering: torch.nn.Module | None = None  # what answered: (logits, ood_distance) when the model has the check


@dataclass
class SetScores:
    record: dict  # evaluation_metrics.json, with the hardware readings of the run
    pre: Preprocessor  # the checkpoint's own preprocessing, on the device
    y_true: np.ndarray
    y_prob: np.ndarray
    loss: float
    bins: dict
    bins_after: dict | None  # after temperature scaling (a validation set was given)
    ood: np.ndarray | None = None  # feature-space distances, when the model answers with them


def score_set(cfg: Config, opened: OpenedCheckpoint, model, dataset: GrayImageDataset, device, name: str,
              calibrate_on: GrayImageDataset | None = None) -> SetScores:
    """One set scored with the checkpoint's own preprocessing (not the config's): its predictions and timing (with
    the hardware readings), the figures with their intervals, calibration (a temperature fitted on `calibrate_on`
    when given) and the evaluation record."""
    pre = Preprocessor(opened.contract.mean, opened.contract.std).to(device)

    def scored(data: GrayImageDataset, label: str):
        return predict_outputs(model, make_loader(data, cfg, cfg.recipe.batch_size, device=device), pre, device,
                       desc=f"Evaluating ({label})")

    with HardwareSampler() as hardware:  # CPU, RAM and GPU readings while the evaluation runs
        y, prob, loss, ood = scored(dataset, name)
        val = scored(calibrate_on, "val")[:2] if calibrate_on is not None else None
        timing = measure_inference(model, pre, dataset, cfg.recipe.batch_size, device,
                                   cfg.evaluation.timing_warmup, cfg.evaluation.timing_runs)
    scores = score_predictions(y, prob, opened.class_names, cfg.evaluation)
    calibration, bins, bins_after = calibration_summary(y, prob, cfg.evaluation.ece_bins, val)
    record = evaluation_record(opened.ckpt, opened.path, opened.split, scores, calibration, timing)
    record["hardware"] = hardware.summary()
    return SetScores(record, pre, y, prob, loss, bins, bins_after, ood)


def evaluate_checkpoint(cfg: Config, opened: OpenedCheckpoint, device, calibrate: bool = False,
                        strict: bool = False, model: torch.nn.Module | None = None,
                        artifact: dict | None = None) -> TestEvaluation:
    """Score the checkpoint on the test split with its own preprocessing (not the config's) and judge the gates;
    `model` (an exported file behind nn.Module's call, described by `artifact`) replaces the checkpoint's model."""
    contract = opened.contract
    answering = model
    if model is None:  # the plain module for Grad-CAM; it answers with its feature-space distance when fitted
        model = model_from_checkpoint(opened.ckpt, device)
        answering = answering_model(model, opened.ckpt)
    dataset = split_dataset(cfg, opened.split, "test", contract.img_size)
    val = split_dataset(cfg, opened.split, "val", contract.img_size) if calibrate else None
    s = score_set(cfg, opened, answering, dataset, device, "test", val)
    test = Scored("test", dataset, [r.path for r in opened.split.rows_for("test")], s.y_true, s.y_prob, s.loss,
                  s.ood)
    record = s.record
    series = evaluate_series(cfg, opened.split, "test", test.y_prob, opened.class_names)
    if series is not None:
        record["series"] = series.record
    if artifact:
        record["artifact"] = artifact
    reference = contract.extra.get(REFERENCE_KEY)
    distances = None if reference is None else [distance_to(reference, test.dataset.read(i))
                                                 for i in range(len(test.dataset))]
    record["monitoring_reference"] = monitoring_reference(test.y_prob, opened.class_names,
                                                          record["calibration"]["temperature"], distances,
                                                          check_figures(contract, test))
    record["answer_checks"] = answer_checks_record(cfg, contract, test, distances, record["calibration"]["temperature"])
    return TestEvaluation(record, check_gates(record, cfg.evaluation.gates, strict), test, model, s.pre, s.bins,
                          s.bins_after, series, answering)


def set_sizes(contract, y_prob: np.ndarray) -> np.ndarray | None:
    """Each image's conformal prediction set size (None: the model has no fitted sets)."""
    spec = contract.extra.get(CONFORMAL_KEY)
    return None if spec is None else set_members(y_prob, spec, list(contract.class_names)).sum(axis=1)


def check_figures(contract, test: Scored) -> dict:
    """Every test slice's feature distance (and the limit) and conformal set size, for the monitoring panel."""
    sizes = set_sizes(contract, test.y_prob)
    return {"ood_distance": None if test.ood is None else [round(float(d), 4) for d in test.ood],
            "ood_limit": feature_limit(contract.extra.get(FEATURE_OOD_KEY)),
            "set_size": None if sizes is None else [int(s) for s in sizes]}


def answer_checks_record(cfg: Config, contract, test: Scored, intensity: list[float] | None,
                         temperature: float | None = None) -> dict:
    """The conformal sets' coverage and size and the refer rule's rate and reasons on the test split, as the served
    rule judges them (with the fitted `temperature`, when there is one)."""
    names = list(contract.class_names)
    spec = contract.extra.get(CONFORMAL_KEY)
    ood_spec = contract.extra.get(FEATURE_OOD_KEY)
    reasons = refer_reasons(test.y_prob, cfg.review.refer_below, set_sizes(contract, test.y_prob),
                            (test.ood, feature_limit(ood_spec)),
                            (None if intensity is None else np.asarray(intensity),
                             reference_limit(contract.extra.get(REFERENCE_KEY), cfg.review.drift_limit)), temperature)
    out = {"refer": refer_report(test.y_true, test.y_prob, reasons, cfg.review.refer_below, cfg.evaluation),
           "conformal": None if spec is None else conformal_report(test.y_true, test.y_prob, spec, names,
                                                                   cfg.evaluation),
           "ood": None if ood_spec is None else {k: ood_spec[k] for k in ("method", "percentile", "limit")},
           "ood_sets": {}}
    if ood_spec is None:
        out["notes"] = ["this model was trained without the feature-space out-of-distribution check "
                        "(retrain, or python evaluate.py --fit-checks)"]
    return out


def write_evaluation_files(out_dir: Path, ev: TestEvaluation, class_names: list[str]) -> list[Path]:
    """evaluation_metrics.json, predictions.csv, evaluation_report.txt and medical_validation.json in out_dir (and
    series_predictions.csv when the test split holds DICOM series)."""
    series = [] if ev.series is None else [
        write_series_predictions(out_dir / "series_predictions.csv", ev.series, ev.test.paths, class_names)]
    return [write_json(out_dir / "evaluation_metrics.json", ev.record),
            write_predictions(out_dir / "predictions.csv", ev.test.paths, ev.test.y_true, ev.test.y_prob, class_names),
            *series,
            write_report(out_dir / "evaluation_report.txt", ev.record, ev.validation),
            write_json(out_dir / "medical_validation.json", ev.validation)]
