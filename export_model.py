"""Export a trained model for deployment and check every artifact against PyTorch on real test images.

    python export_model.py --model resnet18 --format onnx       # recommended: ONNX Runtime, no PyTorch needed
    python export_model.py --model resnet18 --format all        # ONNX + TorchScript + torch.export (.pt2)
    python export_model.py --model efficientnet_b0 --format both  # TorchScript + ONNX (as the original)

Files: checkpoints/{model}_outputs/exported_models/{model}_model.onnx|.pt|.pt2 and {model}_contract.json.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from data.manifest import prepare_split
from models.loading import model_from_checkpoint
from utils.checkpoint import default_checkpoint, load_checkpoint
from utils.cli import add_common_args, config_from_args, run
from utils.errors import UserError
from utils.export import (EXPORTERS, FORMATS, LABELS, PROB_TOLERANCE, artifact_path, check_parity,
                          contract_from_checkpoint, format_size, load_runner, parity_inputs, write_contract_json)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export a checkpoint to ONNX / TorchScript / torch.export with parity checks")
    add_common_args(p)
    p.add_argument("--checkpoint", default=None, metavar="PATH", help="default: checkpoints/{model}_outputs/best_model.pth")
    p.add_argument("--format", default="onnx", choices=list(FORMATS),
                   help="onnx | torchscript | pt2 | both (TorchScript + ONNX) | all (default: onnx)")
    p.add_argument("--output-dir", default=None, metavar="DIR",
                   help="default: checkpoints/{model}_outputs/exported_models")
    p.add_argument("--parity-images", type=int, default=8, metavar="N",
                   help="test-split images compared between PyTorch and each artifact (default: 8)")
    return p


def main(args) -> int:
    cfg = config_from_args(args)
    ckpt_path = Path(args.checkpoint or default_checkpoint(cfg))
    ckpt = load_checkpoint(ckpt_path)
    if args.model and ckpt["model_name"] != args.model:
        raise UserError(f"{ckpt_path} holds a {ckpt['model_name']} model, not {args.model}")
    name = ckpt["model_name"]
    model = model_from_checkpoint(ckpt, "cpu")
    contract = contract_from_checkpoint(ckpt)
    out_dir = Path(args.output_dir or cfg.output_dir / "exported_models")
    print(f"📦 Exporting {name} (epoch {ckpt['epoch']}, {contract['img_size']} px, classes: "
          f"{', '.join(contract['class_names'])}) from {ckpt_path}")

    split = prepare_split(cfg, args.resplit)
    x = parity_inputs(split.samples("test")[0], contract, args.parity_images)
    print(f"🔍 Parity inputs: {len(x)} test images of {split.manifest_path}, preprocessed with the checkpoint's contract")

    failed = []
    for fmt in FORMATS[args.format]:
        if fmt == "torchscript":
            print("⚠️  TorchScript is deprecated upstream; ONNX or .pt2 is the recommended artifact")
        path = EXPORTERS[fmt](model, contract, artifact_path(out_dir, name, fmt), contract["img_size"])
        result = check_parity(fmt, model, load_runner(fmt, path), x)
        mark = "✅" if result.passed else "❌"
        print(f"{mark} {LABELS[fmt]} model saved: {path} ({format_size(path.stat().st_size)})")
        print(f"   parity vs PyTorch on {result.n_images} images (+ batch of 1): max |Δlogit| "
              f"{result.max_abs_logit:.2e}, max |Δprob| {result.max_abs_prob:.2e} (tolerance {PROB_TOLERANCE:.0e}), "
              f"same predicted class: {'yes' if result.same_argmax else 'NO'}")
        if not result.passed:
            failed.append(LABELS[fmt])
    contract_path = write_contract_json(contract, out_dir, name)
    print(f"📄 Preprocessing contract: {contract_path}")
    if failed:
        raise UserError(f"parity check failed for {', '.join(failed)}: the exported outputs differ from PyTorch "
                        f"beyond {PROB_TOLERANCE:.0e}; do not deploy these files")
    print(f"🎉 Export complete: {out_dir}")
    return 0


if __name__ == "__main__":
    run(main, get_args_parser())
