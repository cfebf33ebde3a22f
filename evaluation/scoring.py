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

from core.hardware import HardwareSampler
from data.dataset import GrayImageDataset, make_loader
from data.intensity import REFERENCE_KEY, distance_to
from data.preprocess import Preprocessor
from evaluation.gates import check_gates
from evaluation.prediction import Scored, predict, split_dataset
from evaluation.record import calibration_summary, evaluation_record, monitoring_reference, score_predictions
from evaluation.reports import write_json, write_predictions, write_report
from evaluation.series_level import SeriesEvaluation, evaluate_series, write_series_predictions
from evaluation.timing import measure_inference
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


@dataclass
class SetScores:
    record: dict  # evaluation_metrics.json, with the hardware readings of the run
    pre: Preprocessor  # the checkpoint's own preprocessing, on the device
    y_true: np.ndarray
    y_prob: np.ndarray
    loss: float
    bins: dict
    bins_after: dict | None  # after temperature scaling (a validation set was given)


def score_set(cfg: Config, opened: OpenedCheckpoint, model, dataset: GrayImageDataset, device, name: str,
              calibrate_on: GrayImageDataset | None = None) -> SetScores:
    """One set scored with the checkpoint's own preprocessing (not the config's): its predictions and timing (with
    the hardware readings), the figures with their intervals, calibration (a temperature fitted on `calibrate_on`
    when given) and the evaluation record."""
    pre = Preprocessor(opened.contract.mean, opened.contract.std).to(device)

    def scored(data: GrayImageDataset, label: str):
        return predict(model, make_loader(data, cfg, cfg.recipe.batch_size, device=device), pre, device,
                       desc=f"Evaluating ({label})")

    with HardwareSampler() as hardware:  # CPU, RAM and GPU readings while the evaluation runs
        y, prob, loss = scored(dataset, name)
        val = scored(calibrate_on, "val")[:2] if calibrate_on is not None else None
        timing = measure_inference(model, pre, dataset, cfg.recipe.batch_size, device,
                                   cfg.evaluation.timing_warmup, cfg.evaluation.timing_runs)
    scores = score_predictions(y, prob, opened.class_names, cfg.evaluation)
    calibration, bins, bins_after = calibration_summary(y, prob, cfg.evaluation.ece_bins, val)
    record = evaluation_record(opened.ckpt, opened.path, opened.split, scores, calibration, timing)
    record["hardware"] = hardware.summary()
    return SetScores(record, pre, y, prob, loss, bins, bins_after)


def evaluate_checkpoint(cfg: Config, opened: OpenedCheckpoint, device, calibrate: bool = False,
                        strict: bool = False, model: torch.nn.Module | None = None,
                        artifact: dict | None = None) -> TestEvaluation:
    """Score the checkpoint on the test split with its own preprocessing (not the config's) and judge the gates;
    `model` (an exported file behind nn.Module's call, described by `artifact`) replaces the checkpoint's model."""
    contract = opened.contract
    model = model if model is not None else model_from_checkpoint(opened.ckpt, device)
    dataset = split_dataset(cfg, opened.split, "test", contract.img_size)
    val = split_dataset(cfg, opened.split, "val", contract.img_size) if calibrate else None
    s = score_set(cfg, opened, model, dataset, device, "test", val)
    test = Scored("test", dataset, [r.path for r in opened.split.rows_for("test")], s.y_true, s.y_prob, s.loss)
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
                                                          record["calibration"]["temperature"], distances)
    return TestEvaluation(record, check_gates(record, cfg.evaluation.gates, strict), test, model, s.pre, s.bins,
                          s.bins_after, series)


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
