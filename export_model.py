"""Export a trained model for deployment and check every artifact against PyTorch on real test images.

    python export_model.py --model resnet18                     # TorchScript + ONNX, as the original (= --format both)
    python export_model.py --model resnet18 --format onnx       # recommended: ONNX Runtime, no PyTorch needed
    python export_model.py --model resnet18 --format all        # ONNX + TorchScript + torch.export (.pt2)
    python export_model.py --model resnet18 --format onnx-int8  # int8 ONNX, accepted only if it answers like fp32

Files: checkpoints/{model}_outputs/exported_models/{model}_model.onnx|.pt|.pt2|_int8.onnx and {model}_contract.json.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from core.cli import add_common_args, config_from_args, run
from core.device import INT8_DOT_FLAGS, cpu_flags
from core.errors import UserError
from data.images import configure_limits
from data.manifest import prepare_split
from deploy.export import (
    FORMATS,
    INT8,
    LABELS,
    PROB_TOLERANCE,
    artifact_path,
    export_checked,
    export_source,
    format_size,
    parity_line,
    write_contract_json,
)
from deploy.quantize import CALIBRATION_IMAGES, export_int8
from evaluation.source import open_checkpoint


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export a checkpoint to ONNX / TorchScript / torch.export with parity "
                                            "checks")
    add_common_args(p, checkpoint=True)
    p.add_argument("--format", default="both", choices=list(FORMATS),
                   help="onnx | torchscript | pt2 | onnx-int8 (int8 ONNX, gate-checked against fp32) | both "
                        "(TorchScript + ONNX) | all (ONNX + TorchScript + .pt2 + int8) (default: both)")
    p.add_argument("--output-dir", default=None, metavar="DIR",
                   help="default: checkpoints/{model}_outputs/exported_models")
    p.add_argument("--parity-images", type=int, default=8, metavar="N",
                   help="test-split images compared between PyTorch and each artifact (default: 8)")
    p.add_argument("--calibration-images", type=int, default=CALIBRATION_IMAGES, metavar="N",
                   help=f"training images that calibrate the int8 ranges (default: {CALIBRATION_IMAGES})")
    return p


def print_source(src) -> None:
    """As the original: model, epoch, validation accuracy; then what the artifacts will carry."""
    contract, ckpt = src.contract, src.opened.ckpt
    val_acc = (ckpt.get("metrics") or {}).get("val_acc")
    print(f"📋 Model: {contract.model_name}")
    print(f" Loaded model from epoch {ckpt['epoch']} ({src.opened.path})")
    if val_acc is not None:
        print(f" Validation accuracy: {val_acc:.4f}")
    print(f" Contract: {contract.img_size} px, classes: {', '.join(contract.class_names)}")


def main(args) -> int:
    cfg = config_from_args(args)
    configure_limits(cfg)  # this run's images: bounds on every decoder
    print("🚀 Model Export for Deployment")
    opened = open_checkpoint(cfg, args.checkpoint, args.model, prepare_split(cfg, args.resplit), same_split=False)
    src = export_source(opened, args.parity_images)
    model, contract, name = src.model, src.contract, src.contract.model_name
    out_dir = Path(args.output_dir or cfg.output_dir / "exported_models")
    print_source(src)

    failed, refused, passed = [], [], set()
    for fmt in FORMATS[args.format]:
        if fmt == INT8:
            fp32 = artifact_path(out_dir, name, "onnx") if "onnx" in passed else None  # --format all: made above
            refused += export_int8_step(cfg, src, artifact_path(out_dir, name, fmt), args.calibration_images, fp32)
            continue
        if fmt == "torchscript":
            print("⚠️  TorchScript is deprecated upstream; ONNX or .pt2 is the recommended artifact")
        path, result = export_checked(fmt, model, contract, artifact_path(out_dir, name, fmt), src.x)
        if result.passed:
            passed.add(fmt)
            print(f"✅ {LABELS[fmt]} model saved: {path.name} ({format_size(path.stat().st_size)})")
        else:
            print(f"❌ {LABELS[fmt]} model NOT saved (parity check failed): {path.name}")
            failed.append(LABELS[fmt])
        print(f"   {parity_line(result)}")
    if len(failed) + len(refused) < len(FORMATS[args.format]):
        print(f"📄 Preprocessing contract: {write_contract_json(contract, out_dir)}")
    if failed:
        raise UserError(f"parity check failed for {', '.join(failed)}: the exported outputs differ from PyTorch "
                        f"beyond {PROB_TOLERANCE:.0e}; nothing was written for them"
                        + "".join(f"; {r}" for r in refused))
    if refused:
        raise UserError("; ".join(refused))
    print(f"🎉 Export complete: {out_dir}")
    return 0


def export_int8_step(cfg, src, path: Path, n_calibration: int, fp32_path: Path | None = None) -> list[str]:
    """The int8 file, gate-checked against fp32 on the test split; [] when written, else why it was refused."""
    units = cpu_flags(wanted=INT8_DOT_FLAGS)
    print("🔢 ONNX int8: static quantization in ONNX Runtime (QDQ, per-channel weights); this CPU's int8 units: "
          + (" ".join(units) if units else "none of VNNI, AMX, I8MM (expect a smaller speed-up here)"))
    try:
        path, _ = export_int8(cfg, src, path, n_calibration, fp32_path=fp32_path)
    except UserError as exc:
        print(f"❌ {exc}")
        return [str(exc)]
    print(f"✅ {LABELS[INT8]} model saved: {path.name} ({format_size(path.stat().st_size)})")
    return []


if __name__ == "__main__":
    run(main, get_args_parser())
