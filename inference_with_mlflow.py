"""Predict brain MRI slices with a model from the MLflow Model Registry (by default its @production version).

    python inference_with_mlflow.py --model brain-cancer-resnet18 --image scan.jpg
    python inference_with_mlflow.py --model brain-cancer-resnet18 --stage Staging --image scan.jpg
    python inference_with_mlflow.py --model brain-cancer-resnet18 --version 3 --image folder/ slice.dcm --json
    python inference_with_mlflow.py --model brain-cancer-resnet18 --alias production --image scan.png --gradcam cams/
    python inference_with_mlflow.py --model brain-cancer-resnet18 --alias production --flavor onnx-int8 --image scan.jpg

Uses the ONNX flavor with ONNX Runtime when one is registered (no PyTorch at prediction), else the PyTorch flavor.
A version registered with --force or without a passed validation is announced on every run.
Images: jpg/png/bmp/tif (any size, 8/16-bit, RGBA, palette) and DICOM (.dcm). Exit code 1 if any input failed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

from core.cli import add_common_args, add_registered_model_args, config_from_args, run
from core.errors import UserError
from data.images import ImageReadError, configure_limits, image_files
from deploy.policy import serving_warning
from deploy.refer import ReferRule, judged_records
from deploy.registry import INT8_FLAVOR, connect, load_predictor, registered_name, resolve_version
from serving.model import read_evidence


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Predict MRI images with a registered model (MLflow Model Registry)")
    add_common_args(p, model=False)
    which = add_registered_model_args(p, version_help="model version number (default: the @production version)")
    which.add_argument("--stage", default=None, help="deprecated MLflow stage name (Production, Staging); used as the "
                                                     "lower-case alias")
    p.add_argument("--image", nargs="+", required=True, metavar="PATH", help="image files or folders of images")
    p.add_argument("--img-size", type=int, default=None, help="default: the image size of the model's contract")
    p.add_argument("--flavor", choices=["auto", "onnx", "pytorch", INT8_FLAVOR], default="auto",
                   help="auto: ONNX when registered, else PyTorch; onnx-int8: the int8 model registered with --int8")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the report")
    p.add_argument("--gradcam", default=None, metavar="OUT_DIR", help="write Grad-CAM overlays here (PyTorch flavor)")
    return p


def print_predictions(predictor, rule: ReferRule, path: Path) -> list[dict]:
    """The original README's report for each image in a file (one per frame of a multi-frame DICOM), with the refer
    rule's verdict; raises ImageReadError for an unreadable file."""
    print(f"📸 Loading and preprocessing image: {path}")
    inputs = predictor.decode(path)
    print(f"✅ Image preprocessed successfully (shape: {tuple(inputs[0].x.shape)}"
          + (f", {len(inputs)} frames)" if len(inputs) > 1 else ")"))
    print("🔮 Making prediction...")
    records = judged_records(predictor, rule, inputs)
    for record in records:
        print_record(record, several=len(records) > 1)
    return records


def print_record(record: dict, several: bool) -> None:
    which = f" ({record['path']})" if several else ""
    print(f"\n PREDICTION RESULTS{which}\n{'-' * 30}\n Predicted Class: {record['predicted_class']}")
    print(f"📈 Confidence: {record['confidence']:.2%}\n🔢 Class Index: {record['class_index']}\n")
    print("📋 All Class Probabilities:")
    for name, p in record["probabilities"].items():
        print(f"  {name}: {p:.2%}")
    if record.get("prediction_set") is not None:
        print(f"🎯 Prediction set (conformal): {' or '.join(record['prediction_set'])}")
    if record.get("out_of_distribution") is not None:
        print(f"🧭 Out of distribution: {'yes' if record['out_of_distribution'] else 'no'} (feature distance "
              f"{record['ood_distance']:.1f}, limit {record['ood_limit']:.1f})")
    print("🩺 Refer to a radiologist: " + ("YES: " + "; ".join(record["refer_reasons"]) if record["refer"] else "no"))
    print()


def predict_all(predictor, rule: ReferRule, paths: list[Path], as_json: bool) -> tuple[list[dict], list[dict]]:
    records, errors = [], []
    for path in paths:
        try:
            if not path.exists():
                raise ImageReadError(f"{path}: no such file")
            records += judged_records(predictor, rule, predictor.decode(path)) if as_json \
                else print_predictions(predictor, rule, path)
        except ImageReadError as exc:
            reason = str(exc).replace(f"{path}: ", "")
            errors.append({"path": str(path), "error": reason})
            print(f"❌ Cannot read {path}: {reason}", file=sys.stderr if as_json else sys.stdout)
    return records, errors


def main(args) -> int:
    cfg = config_from_args(args)
    configure_limits(cfg)  # this run's images: bounds on every decoder
    alias = args.alias
    if args.stage:
        alias = args.stage.lower()
        print(f"note: MLflow stages are deprecated; using the alias @{alias}", file=sys.stderr)
    paths = image_files(args.image)
    if not paths:
        raise UserError(f"no image files in {' '.join(args.image)}")
    client = connect(cfg.monitoring.mlflow)
    mv = resolve_version(client, registered_name(args.registered_model), alias, args.version)
    alias = alias or (None if args.version else "production")
    warning = serving_warning(mv)
    with tempfile.TemporaryDirectory() as tmp:
        predictor, used, flavor = load_predictor(client, mv, Path(tmp), args.flavor)
        apply_img_size(predictor, args.img_size, flavor)
        if not args.json:
            print(f"🧠 Brain Cancer MRI Inference with MLflow\n{'=' * 50}")
            print(loaded_lines(mv, used, flavor, alias))
        if warning:
            print(warning, file=sys.stderr)
        evidence = read_evidence(mv, Path(tmp), cfg.monitoring.mlflow.tracking_uri)
        rule = ReferRule.for_version(predictor.contract.to_dict(), evidence.get("evaluation"), cfg.review)
        records, errors = predict_all(predictor, rule, paths, args.json)
        if args.gradcam and records:
            write_gradcam(client, mv, Path(tmp), records, Path(args.gradcam), args.json)
    if args.json:
        print(json.dumps({"model": mv.name, "version": mv.version, "alias": alias, "flavor": flavor,
                          "medical_validation": mv.tags.get("medical_validation", "missing"),
                          "forced": mv.tags.get("forced") == "true",
                          "contract": predictor.contract.to_dict(), "predictions": records, "errors": errors},
                         indent=2))
    elif errors:
        print(f"⚠️  {len(errors)} of {len(paths)} input(s) could not be read; {len(records)} predicted")
    return 1 if errors else 0


def loaded_lines(mv, used, flavor: str, alias: str | None) -> str:
    """The original report's line (the stage name for production/staging), then which version and runtime."""
    label = alias.capitalize() if alias in ("production", "staging") else f"@{alias}" if alias else f"v{mv.version}"
    runtime = {"onnx": "ONNX Runtime", INT8_FLAVOR: "ONNX Runtime, int8"}.get(flavor, "PyTorch")
    status = mv.tags.get("medical_validation", "missing")
    return (f"✅ Successfully loaded model: {mv.name} ({label})\n"
            f"   v{mv.version} (semver {mv.tags.get('semver', '?')}, medical validation {status}); "
            f"{flavor} flavor {used.name} v{used.version} on {runtime}")


def apply_img_size(predictor, img_size: int | None, flavor: str) -> None:
    if img_size is None or img_size == predictor.contract.img_size:
        return
    if flavor.startswith("onnx"):
        raise UserError(f"the ONNX model takes {predictor.contract.img_size} px input; "
                        "use --flavor pytorch to predict at another size")
    print(f"warning: --img-size {img_size} differs from the training size {predictor.contract.img_size}; "
          "predictions may be unreliable", file=sys.stderr)
    predictor.contract = dataclasses.replace(predictor.contract, img_size=img_size)


def write_gradcam(client, mv, tmp: Path, records: list[dict], out_dir: Path, quiet: bool) -> None:
    torch_predictor, _, _ = load_predictor(client, mv, tmp, "pytorch")
    files = torch_predictor.gradcam([r["path"] for r in records], [r["class_index"] for r in records], out_dir)
    if not quiet:
        print(f"🔥 Grad-CAM overlays: {len(files)} file(s) in {out_dir}")


if __name__ == "__main__":
    run(main, get_args_parser())
