"""Medical-grade evaluation of a checkpoint on the split manifest's test rows, with the checkpoint's own preprocessing.

    python evaluate.py --model resnet18 --demo
    python evaluate.py --model resnet18 --detailed --medical-validation --compare [--strict] [--calibrate]
    python evaluate.py --model resnet18 --onnx checkpoints/resnet18_outputs/exported_models/resnet18_model_int8.onnx

Exit codes: 0 success (and gates passed with --medical-validation), 3 gates failed, 2 user error.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from core.cli import add_common_args, run
from core.device import select_device
from core.errors import UserError
from data.preprocess import Preprocessor
from deploy.scoring import open_onnx
from evaluation.explain import CamModel
from evaluation.gates import GATES_FAILED_EXIT, check_gates, format_gates
from evaluation.plots import comparison_plot, evaluation_figures
from evaluation.prediction import Scored, predict_split
from evaluation.record import calibration_summary, evaluation_record, open_tracker, score_predictions
from evaluation.reports import (
    collect_evaluations,
    flat_metrics,
    format_comparison,
    format_evaluation,
    recommend,
    write_comparison_csv,
    write_json,
    write_predictions,
    write_report,
)
from evaluation.source import open_for_scoring
from evaluation.timing import measure_inference
from models.loading import model_from_checkpoint

if TYPE_CHECKING:
    from core.config import Config


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a checkpoint on the test split: metrics with 95% bootstrap "
                                "intervals, ROC, calibration, timing, plots (outputs in checkpoints/{model}_outputs/)")
    add_common_args(p, checkpoint=True, device=True)
    p.add_argument("--detailed", action="store_true", help="Grad-CAM overlays of misclassified and sample correct "
                                                           "images")
    p.add_argument("--medical-validation", action="store_true",
                   help="check the quality gates (config: evaluation.gates); exit code 3 when they fail")
    p.add_argument("--strict", action="store_true",
                   help="judge the gates on the lower bound of the 95%% CI (implies --medical-validation)")
    p.add_argument("--calibrate", action="store_true", help="fit a temperature on the validation split; ECE "
                                                            "before/after")
    p.add_argument("--compare", action="store_true", help="rank every evaluated model under the checkpoints folder")
    p.add_argument("--onnx", default=None, metavar="PATH",
                   help="score this ONNX file exported from the checkpoint (fp32 or int8) in ONNX Runtime instead of "
                        "the PyTorch model; outputs in {checkpoint folder}/evaluation_{file name}/")
    return p


def log_evaluation(tracker, record: dict, validation: dict | None, files: list[Path], args) -> None:
    tracker.log_params({"checkpoint": record["checkpoint"], "checkpoint_epoch": record["checkpoint_epoch"],
                        "split_manifest": record["split_manifest"], "n_test": record["n_test"],
                        "bootstrap_samples": record["bootstrap_samples"], "device": record["timing"]["device"],
                        "strict": args.strict, "calibrate": args.calibrate})
    tracker.log_metrics(flat_metrics(record))
    if validation is not None:
        tracker.set_tags({"deployment_ready": validation["deployment_ready"], "gate_basis": validation["basis"]})
    for path in files:
        tracker.log_artifact(path, "evaluation")


def compare_models(cfg: Config) -> None:
    root = Path(cfg.train.output_dir)
    rows = collect_evaluations(root)
    _, reason = recommend(rows)
    print("\n" + format_comparison(rows, reason))
    if rows:
        csv_path = write_comparison_csv(root / "model_comparison.csv", rows)
        png = comparison_plot(rows, root / "model_comparison.png")
        print(f"📁 {csv_path}, {png}")


def main(args) -> int:
    args.medical_validation = args.medical_validation or args.strict
    device = select_device("cpu" if args.onnx else args.device)  # ONNX Runtime scores on the CPU
    cfg, opened = open_for_scoring(args)
    ckpt, ckpt_path, split = opened.ckpt, opened.path, opened.split
    name, classes = opened.model_name, opened.class_names
    model, out_dir, artifact = scoring_model(args, opened, device)
    print(f"Evaluating {name} (epoch {ckpt['epoch']}{artifact_label(artifact)}) on the test split of "
          f"{split.manifest_path}")
    with open_tracker(cfg, name, "evaluation", ckpt) as tracker:
        pre = Preprocessor(opened.contract.mean, opened.contract.std).to(device)  # the checkpoint's, not the config's
        test = predict_split(cfg, split, "test", model, pre, opened.contract.img_size, device)
        y, prob = test.y_true, test.y_prob
        val = None
        if args.calibrate:
            scored_val = predict_split(cfg, split, "val", model, pre, opened.contract.img_size, device)
            val = (scored_val.y_true, scored_val.y_prob)
        scores = score_predictions(y, prob, classes, cfg.evaluation)
        calibration, bins, bins_after = calibration_summary(y, prob, cfg.evaluation.ece_bins, val)
        timing = measure_inference(model, pre, test.dataset, cfg.recipe.batch_size, device,
                                   cfg.evaluation.timing_warmup, cfg.evaluation.timing_runs)
        record = {**evaluation_record(ckpt, ckpt_path, split, scores, calibration, timing),
                  **({"artifact": artifact} if artifact else {})}
        validation = check_gates(record, cfg.evaluation.gates, args.strict) if args.medical_validation else None

        files = [write_json(out_dir / "evaluation_metrics.json", record),
                 write_predictions(out_dir / "predictions.csv", test.paths, y, prob, classes),
                 write_report(out_dir / "evaluation_report.txt", record, validation),
                 *evaluation_figures(out_dir, record, y, prob, bins, bins_after)]
        stale = out_dir / "medical_validation.json"
        if validation is not None:
            files.append(write_json(stale, validation))
        elif stale.exists():
            stale.unlink()  # its gates judged an earlier evaluation: no verdict is better than a stale one
        print("\n" + format_evaluation(record))
        if args.detailed:
            index = explain_gradcam(cfg, CamModel(model, name, pre, device), test, classes, out_dir)
            files.append(index.parent)
            print(f"🔍 Grad-CAM overlays: {index}")
        log_evaluation(tracker, record, validation, files, args)
    print(f"\n📁 Outputs in {out_dir}: " + ", ".join(p.name for p in files))
    code = verdict(record, validation, cfg)
    if args.compare:
        compare_models(cfg)
    return code


def scoring_model(args, opened, device) -> tuple[torch.nn.Module, Path, dict | None]:
    """(model, output folder, artifact record): the checkpoint's PyTorch model, or with --onnx the exported file
    in ONNX Runtime, whose contract must be the checkpoint's; its figures go to their own folder, so the
    checkpoint's evaluation (what register_model.py reads) is never overwritten by an artifact's."""
    if not args.onnx:
        return model_from_checkpoint(opened.ckpt, device), opened.path.parent, None
    if args.detailed:
        raise UserError("--detailed (Grad-CAM) needs the PyTorch model; run it without --onnx")
    path = Path(args.onnx)
    if not path.is_file():
        raise UserError(f"--onnx {path}: no such file")
    try:
        module = open_onnx(path)
    except Exception as exc:  # not ONNX, no contract, an operator ONNX Runtime lacks: one line, whichever it is
        raise UserError(f"--onnx {path}: cannot be scored ({str(exc).strip().splitlines()[0]})") from None
    if module.contract != opened.contract:
        raise UserError(f"--onnx {path} was not exported from {opened.path} (its preprocessing contract differs); "
                        "pass the checkpoint it came from with --checkpoint")
    precision = module.contract.extra.get("precision", "fp32")
    artifact = {"path": str(path), "runtime": "onnxruntime", "precision": precision}
    out_dir = opened.path.parent / f"evaluation_{path.stem}"
    out_dir.mkdir(exist_ok=True)
    return module, out_dir, artifact


def artifact_label(artifact: dict | None) -> str:
    return f", {artifact['precision']} ONNX file {artifact['path']}" if artifact else ""


def explain_gradcam(cfg: Config, cam: CamModel, test: Scored, classes: list[str], out_dir: Path) -> Path:
    from evaluation.explain import explain_test_set  # lazy: pytorch-grad-cam pulls in OpenCV

    return explain_test_set(cam, test, classes, out_dir / "gradcam", cfg.evaluation.gradcam_correct_samples,
                            seed=cfg.evaluation.bootstrap_seed)


def verdict(record: dict, validation: dict | None, cfg: Config) -> int:
    if validation is not None:
        print("\n" + format_gates(validation))
        if not validation["deployment_ready"]:
            return GATES_FAILED_EXIT
        print("🏆 Model shows excellent performance for medical AI!")
    elif record["accuracy"]["value"] >= cfg.evaluation.gates.accuracy:
        print("🏆 Model shows excellent performance for medical AI! (run --medical-validation for every gate)")
    return 0


if __name__ == "__main__":
    run(main, get_args_parser())
