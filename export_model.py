"""Export a trained model for deployment and check every artifact against PyTorch on real test images.

    python export_model.py --model resnet18 --format onnx       # recommended: ONNX Runtime, no PyTorch needed
    python export_model.py --model resnet18 --format all        # ONNX + TorchScript + torch.export (.pt2)
    python export_model.py --model efficientnet_b0 --format both  # TorchScript + ONNX (as the original)
    python export_model.py --model resnet18 --format onnx-int8  # int8 ONNX, accepted only if it answers like fp32

Files: checkpoints/{model}_outputs/exported_models/{model}_model.onnx|.pt|.pt2|_int8.onnx and {model}_contract.json.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from core.cli import add_common_args, config_from_args, run
from core.device import INT8_DOT_FLAGS, cpu_flags
from core.errors import UserError
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


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export a checkpoint to ONNX / TorchScript / torch.export with parity "
                                            "checks")
    add_common_args(p, checkpoint=True)
    p.add_argument("--format", default="onnx", choices=list(FORMATS),
                   help="onnx | torchscript | pt2 | onnx-int8 | both (TorchScript + ONNX) | all (default: onnx)")
    p.add_argument("--output-dir", default=None, metavar="DIR",
                   help="default: checkpoints/{model}_outputs/exported_models")
    p.add_argument("--parity-images", type=int, default=8, metavar="N",
                   help="test-split images compared between PyTorch and each artifact (default: 8)")
    p.add_argument("--calibration-images", type=int, default=CALIBRATION_IMAGES, metavar="N",
                   help=f"training images that calibrate the int8 ranges (default: {CALIBRATION_IMAGES})")
    return p


def main(args) -> int:
    cfg = config_from_args(args)
    src = export_source(cfg, args.checkpoint, args.model, args.resplit, args.parity_images)
    model, contract, name = src.model, src.contract, src.contract.model_name
    out_dir = Path(args.output_dir or cfg.output_dir / "exported_models")
    print(f"📦 Exporting {name} (epoch {contract.checkpoint_epoch}, {contract.img_size} px, classes: "
          f"{', '.join(contract.class_names)}) from {src.opened.path}")

    failed, refused = [], []
    for fmt in FORMATS[args.format]:
        if fmt == INT8:
            refused += export_int8_step(cfg, src, artifact_path(out_dir, name, fmt), args.calibration_images)
            continue
        if fmt == "torchscript":
            print("⚠️  TorchScript is deprecated upstream; ONNX or .pt2 is the recommended artifact")
        path, result = export_checked(fmt, model, contract, artifact_path(out_dir, name, fmt), src.x)
        mark = "✅" if result.passed else "❌"
        print(f"{mark} {LABELS[fmt]} model saved: {path} ({format_size(path.stat().st_size)})")
        print(f"   {parity_line(result)}")
        if not result.passed:
            failed.append(LABELS[fmt])
    contract_path = write_contract_json(contract, out_dir)
    print(f"📄 Preprocessing contract: {contract_path}")
    if failed:
        raise UserError(f"parity check failed for {', '.join(failed)}: the exported outputs differ from PyTorch "
                        f"beyond {PROB_TOLERANCE:.0e}; do not deploy these files" + "".join(f"; {r}" for r in refused))
    if refused:
        raise UserError("; ".join(refused))
    print(f"🎉 Export complete: {out_dir}")
    return 0


def export_int8_step(cfg, src, path: Path, n_calibration: int) -> list[str]:
    """The int8 file, gate-checked against fp32 on the test split; [] when written, else why it was refused."""
    units = cpu_flags(wanted=INT8_DOT_FLAGS)
    print("🔢 ONNX int8: static quantization in ONNX Runtime (QDQ, per-channel weights); this CPU's int8 units: "
          + (" ".join(units) if units else "none of VNNI, AMX, I8MM (expect a smaller speed-up here)"))
    try:
        path, _ = export_int8(cfg, src, path, n_calibration)
    except UserError as exc:
        print(f"❌ {exc}")
        return [str(exc)]
    print(f"✅ {LABELS[INT8]} model saved: {path} ({format_size(path.stat().st_size)})")
    return []


if __name__ == "__main__":
    run(main, get_args_parser())
