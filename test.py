"""Quick check of a trained model on the split manifest's test rows, with the checkpoint's own preprocessing.

    python test.py --model resnet18 --demo
"""
from __future__ import annotations

import argparse

from data.dataset import build_dataset, make_loader
from data.manifest import prepare_split
from data.preprocess import Preprocessor
from models.loading import model_from_checkpoint
from utils.checkpoint import default_checkpoint, load_checkpoint
from utils.cli import add_common_args, config_from_args, run
from utils.device import select_device
from utils.metrics import classification_metrics, format_metrics
from utils.prediction import predict


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a checkpoint on the test split (accuracy, per-class metrics, confusion matrix)")
    add_common_args(p)
    p.add_argument("--checkpoint", default=None, metavar="PATH", help="default: checkpoints/{model}_outputs/best_model.pth")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when present)")
    return p


def main(args) -> int:
    cfg = config_from_args(args)
    device = select_device(args.device)
    ckpt = load_checkpoint(args.checkpoint or default_checkpoint(cfg))
    split = prepare_split(cfg, args.resplit)
    model = model_from_checkpoint(ckpt, device)
    # Preprocessing comes from the checkpoint, never re-derived from the config.
    dataset = build_dataset(cfg, split, "test", ckpt["img_size"])
    loader = make_loader(dataset, cfg, cfg.recipe.batch_size, device=device)
    pre = Preprocessor(ckpt["mean"], ckpt["std"]).to(device)
    y, prob, _ = predict(model, loader, pre, device, desc="Testing")
    metrics = classification_metrics(y, prob, ckpt["class_names"])
    print(f"Test split of {split.manifest_path} ({len(y)} images), checkpoint epoch {ckpt['epoch']}")
    print(format_metrics(metrics, ckpt["class_names"]))
    return 0


if __name__ == "__main__":
    run(main, get_args_parser())
