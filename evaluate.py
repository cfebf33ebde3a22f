"""Medical-grade evaluation of a checkpoint on the split manifest's test rows, with the checkpoint's own preprocessing.

    python evaluate.py --model resnet18 --demo
    python evaluate.py --model resnet18 --detailed --medical-validation --compare [--strict] [--calibrate]
    python evaluate.py --model resnet18 --external /data/other_site [--class-map map.yaml]   # external validation
    python evaluate.py --model resnet18 --onnx checkpoints/resnet18_outputs/exported_models/resnet18_model_int8.onnx
    python evaluate.py --model resnet18 --ood-self-check --ood /data/other_modality   # the OOD detector's AUROC

Exit codes: 0 success (and gates passed with --medical-validation), 3 gates failed, 2 user error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from core.cli import add_common_args, run, same_data_flags
from core.device import select_device
from core.errors import UserError
from data.images import ImageReadError, image_files, load_gray
from deploy.onnx_module import open_exported
from evaluation.answer_checks import attach_answer_checks
from evaluation.answer_report import SELF_CHECK, distances_of, ood_set_report, self_check_sets
from evaluation.explain import CamModel
from evaluation.external import ExternalRequest, ExternalResult, validate_external
from evaluation.gates import GATES_FAILED_EXIT, format_gates
from evaluation.plots import comparison_plot, evaluation_figures
from evaluation.prediction import Scored
from evaluation.record import log_evaluation_files, open_tracker
from evaluation.reports import (
    collect_evaluations,
    flat_metrics,
    format_comparison,
    format_evaluation,
    format_side_by_side,
    recommend,
    write_comparison_csv,
)
from evaluation.scoring import evaluate_checkpoint, write_evaluation_files
from evaluation.source import open_for_scoring

if TYPE_CHECKING:
    from core.config import Config


# What passing the gates on the demo's phantoms shows, and what it does not.
SYNTHETIC_PASS = ("✅ The gates pass on the synthetic demo phantoms: the pipeline works end to end. Not medical data: "
                  "this says nothing about real MRI.")


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
    p.add_argument("--external", default=None, metavar="PATH",
                   help="also score another site's ImageFolder or DICOM tree (external validation); outputs in "
                        "checkpoints/{model}_outputs/external_{folder}/")
    p.add_argument("--class-map", default=None, metavar="FILE",
                   help="with --external: YAML mapping its folders to the model's classes (folder: class; null "
                        "leaves one out); default: folders named like the classes")
    p.add_argument("--onnx", default=None, metavar="PATH",
                   help="score this ONNX file exported from the checkpoint (fp32 or int8) in ONNX Runtime instead of "
                        "the PyTorch model; outputs in {checkpoint folder}/evaluation_{file name}/")
    p.add_argument("--ood", action="append", default=None, metavar="DIR",
                   help="a folder of images the model should refuse (another modality, site or sequence): the "
                        "out-of-distribution detector's AUROC against the test split and the share it refers "
                        "(repeatable)")
    p.add_argument("--ood-self-check", action="store_true",
                   help="the same figures on far sets made from the test split (permuted pixels, stripes, inverted, "
                        "noise, blank)")
    p.add_argument("--fit-checks", action="store_true",
                   help="fit the out-of-distribution limit and the conformal sets into the checkpoint first (a "
                        "checkpoint trained before they existed)")
    return p


def ood_sets(args, ev, cfg: Config, img_size: int) -> dict[str, tuple]:
    """The sets the detector is judged on: {name: (8-bit images (N, S, S), what they are)}."""
    sets = {}
    if args.ood_self_check:
        grays = np.stack([ev.test.dataset.read(i) for i in range(len(ev.test.dataset))])
        made = self_check_sets(grays, cfg.evaluation.bootstrap_seed)
        sets.update({f"self-check {k}": (v, SELF_CHECK[k]) for k, v in made.items()})
    for folder in args.ood or []:
        sets[Path(folder).name] = (read_folder(folder, img_size), f"images of {folder}")
    return sets


def read_folder(folder: str, size: int) -> np.ndarray:
    """Every readable image of a folder at the model's size; an unreadable one is reported by path and skipped."""
    paths = image_files([folder]) if Path(folder).is_dir() else []
    grays = []
    for path in paths:
        try:
            grays.append(load_gray(path, size))
        except ImageReadError as exc:
            print(f"   skipped: {exc}", file=sys.stderr)
    if not grays:
        raise UserError(f"--ood {folder}: no readable images")
    return np.stack(grays)


def judge_ood_sets(args, ev, cfg: Config, device, img_size: int) -> None:
    """The detector against each set, into the evaluation record (before its files are written)."""
    if not (args.ood or args.ood_self_check):
        return
    if ev.test.ood is None:
        raise UserError("this model gives no feature-space distance (trained before the check, or an ONNX file "
                        "exported before it): python evaluate.py --fit-checks, then export again")
    checks = ev.record["answer_checks"]
    limit = (checks["ood"] or {}).get("limit")
    for name, (grays, description) in ood_sets(args, ev, cfg, img_size).items():
        distances = distances_of(ev.answering, ev.pre, grays, device, cfg.recipe.batch_size)
        checks["ood_sets"][name] = ood_set_report(ev.test.ood, distances, limit, cfg.evaluation, description)


def log_evaluation(tracker, record: dict, validation: dict | None, files: list[Path], args) -> None:
    """Figures, params and files into the trackers (per-patient files to W&B only when allowed)."""
    tracker.log_params({"checkpoint": record["checkpoint"], "checkpoint_epoch": record["checkpoint_epoch"],
                        "split_manifest": record["split_manifest"], "n_test": record["n_test"],
                        "bootstrap_samples": record["bootstrap_samples"], "device": record["timing"]["device"],
                        "strict": args.strict, "calibrate": args.calibrate})
    tracker.log_metrics(flat_metrics(record))
    if record.get("artifact"):
        tracker.set_tags({"scored_artifact": Path(record["artifact"]["path"]).name,
                          "artifact_precision": record["artifact"]["precision"]})
    if validation is not None:
        tracker.set_tags({"deployment_ready": validation["deployment_ready"], "gate_basis": validation["basis"]})
    log_evaluation_files(tracker, files, "evaluation")


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
    check_onnx_args(args)
    device = select_device("cpu" if args.onnx else args.device)  # ONNX Runtime scores on the CPU
    cfg, opened = open_for_scoring(args)
    if args.fit_checks:
        attach_answer_checks(cfg, opened.path, opened.split, device, required=True)
        args.checkpoint = str(opened.path)
        cfg, opened = open_for_scoring(args)
    ckpt, out_dir = opened.ckpt, opened.path.parent
    name, classes = opened.model_name, opened.class_names
    model, artifact = open_exported(args.onnx, opened) if args.onnx else (None, None)
    if artifact:  # its own folder: the checkpoint's evaluation (what registration reads) is never overwritten
        out_dir = out_dir / f"evaluation_{Path(args.onnx).stem}"
        out_dir.mkdir(exist_ok=True)
    scored = f", {artifact['precision']} ONNX file {artifact['path']}" if artifact else ""
    print(f"Evaluating {name} (epoch {ckpt['epoch']}{scored}) on the test split of {opened.split.manifest_path}")
    with open_tracker(cfg, name, "evaluation", ckpt) as tracker:
        # every gate figure is computed anyway: the verdict is recorded with or without --medical-validation
        ev = evaluate_checkpoint(cfg, opened, device, args.calibrate, args.strict, model, artifact)
        judge_ood_sets(args, ev, cfg, device, opened.contract.img_size)
        record, validation = ev.record, ev.validation
        files = [*write_evaluation_files(out_dir, ev, classes),
                 *evaluation_figures(out_dir, record, ev.test.y_true, ev.test.y_prob, ev.bins, ev.bins_after)]
        print("\n" + format_evaluation(record))
        if args.detailed:
            index = explain_gradcam(cfg, CamModel(ev.model, name, ev.pre, device), ev.test, classes, out_dir)
            files.append(index.parent)
            print(f"🔍 Grad-CAM overlays: {index}")
        log_evaluation(tracker, record, validation, files, args)
        external = validate_external(cfg, opened, ev.model, device, ExternalRequest(
            args.external, args.class_map, args.medical_validation, args.strict), tracker) if args.external else None
    print(f"\n📁 Outputs in {out_dir}: " + ", ".join(p.name for p in files))
    if artifact:
        print("ℹ️  These figures are the ONNX file's; register_model.py reads the checkpoint's own evaluation "
              f"(python evaluate.py --model {name}{same_data_flags(args)})")
    code = verdict(validation, name, args, synthetic=cfg.dataset.demo)
    if external is not None:
        code = external_verdict(record, external, args.medical_validation) or code
    if args.compare:
        compare_models(cfg)
    return code


def check_onnx_args(args) -> None:
    """--onnx scores the exported file alone: Grad-CAM needs the PyTorch model, external validation the checkpoint."""
    if args.onnx and args.detailed:
        raise UserError("--detailed (Grad-CAM) needs the PyTorch model; run it without --onnx")
    if args.onnx and args.external:
        raise UserError("--external scores the checkpoint; run it without --onnx")


def explain_gradcam(cfg: Config, cam: CamModel, test: Scored, classes: list[str], out_dir: Path) -> Path:
    from evaluation.explain import explain_test_set  # lazy: pytorch-grad-cam pulls in OpenCV

    return explain_test_set(cam, test, classes, out_dir / "gradcam", cfg.evaluation.gradcam_correct_samples,
                            seed=cfg.evaluation.bootstrap_seed)


def external_verdict(record: dict, external: ExternalResult, medical_validation: bool) -> int:
    """The external set's report, internal and external side by side, and the external gates (exit code 3 for
    failed gates only with --medical-validation, as for the test split)."""
    print("\n" + format_evaluation(external.record))
    print("\n" + format_side_by_side(record, external.record))
    print(f"📁 External outputs in {external.out_dir}")
    validation = external.validation
    if not medical_validation:
        print(f"\nExternal quality gates: {gate_summary(validation)} (verdict in medical_validation.json)")
        return 0
    print("\nExternal " + format_gates(validation))
    return 0 if validation["deployment_ready"] else GATES_FAILED_EXIT


def gate_summary(validation: dict) -> str:
    failed = [g["name"] for g in validation["gates"] if not g["passed"]]
    return "all passed" if validation["deployment_ready"] else "failed: " + ", ".join(failed)


def verdict(validation: dict, model: str, args, synthetic: bool) -> int:
    """The gate verdict and the next command (with the flags that find the same data and stores, so that it runs as
    copied); exit code 3 for failed gates only with --medical-validation. No praise for a model of synthetic data."""
    ready, medical_validation, again = validation["deployment_ready"], args.medical_validation, same_data_flags(args)
    if medical_validation:
        print("\n" + format_gates(validation))
    else:
        print(f"\nQuality gates (evaluation.gates): {gate_summary(validation)} "
              "(every gate: --medical-validation; verdict in medical_validation.json)")
    if ready:
        print(SYNTHETIC_PASS if synthetic else "✅ Every quality gate passed on this data set's test split.")
        print(f"📝 Next: python register_model.py --model {model}{again} --version 1.0.0 --description \"...\" "
              "(a new semantic version)")
        return 0
    print(f"🔧 Next: improve the model (python train.py --model {model}{again} with more epochs or data); "
          "registration refuses it until the gates pass")
    return GATES_FAILED_EXIT if medical_validation else 0


if __name__ == "__main__":
    run(main, get_args_parser())
