"""Train one model of the zoo on the split manifest's training rows.

    python train.py --model resnet18 --demo
    python train.py --model efficientnet_b0 --epochs 30 --batch-size 64 --lr 0.001
"""
from __future__ import annotations

import argparse

import torch

from data.dataset import build_dataset, make_loader
from data.manifest import prepare_split
from data.normalization import resolve_normalization
from data.preprocess import Preprocessor
from models.zoo import build_model
from utils.checkpoint import save_checkpoint
from utils.cli import add_common_args, config_from_args, run
from utils.config import save_resolved
from utils.device import seed_everything, select_device
from utils.metrics import classification_metrics
from utils.prediction import predict
from utils.training import build_optimizer, checkpoint_payload, train_one_epoch


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a brain MRI classifier (checkpoints in checkpoints/{model}_outputs/)")
    add_common_args(p)
    p.add_argument("--epochs", type=int, default=None, help="number of epochs (config: train.epochs)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (config: the model's recipe)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (config: the model's recipe)")
    p.add_argument("--weights", default=None, metavar="PATH", help="local file with ImageNet weights (offline sites)")
    p.add_argument("--no-pretrained", action="store_true", help="start from random weights")
    p.add_argument("--seed", type=int, default=None, help="random seed (config: train.seed)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    return p


def load_data(cfg, split, mean, std, device):
    recipe = cfg.recipe
    train_ds = build_dataset(cfg, split, "train", cfg.img_size)
    val_ds = build_dataset(cfg, split, "val", cfg.img_size)
    train_loader = make_loader(train_ds, cfg, recipe.batch_size, shuffle=True, device=device)
    val_loader = make_loader(val_ds, cfg, recipe.batch_size, device=device)
    train_pre = Preprocessor.from_config(cfg, mean, std, train=True).to(device)
    val_pre = Preprocessor.from_config(cfg, mean, std, train=False).to(device)
    return train_loader, val_loader, train_pre, val_pre


def main(args) -> int:
    cfg = config_from_args(args, **{
        "train.epochs": args.epochs, "train.seed": args.seed,
        "models.{model}.batch_size": args.batch_size, "models.{model}.lr": args.lr,
        "models.{model}.weights": args.weights, "models.{model}.pretrained": False if args.no_pretrained else None,
    })
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    device = select_device(args.device)
    split = prepare_split(cfg, args.resplit)
    mean, std, _ = resolve_normalization(cfg, split, cfg.img_size)
    recipe = cfg.recipe
    model = build_model(cfg.model, len(split.class_names), recipe.pretrained, recipe.weights).to(device)
    train_loader, val_loader, train_pre, val_pre = load_data(cfg, split, mean, std, device)
    optimizer = build_optimizer(model, recipe)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    out_dir = cfg.output_dir
    save_resolved(cfg, out_dir)
    sizes = split.sizes()
    print(f"Dataset: {sizes['train']} train, {sizes['val']} validation samples | model {cfg.model} | "
          f"batch {recipe.batch_size} | lr {recipe.lr} | epochs {cfg.train.epochs} | device {device}")

    best = -1.0
    for epoch in range(1, cfg.train.epochs + 1):
        stats = train_one_epoch(model, train_loader, train_pre, criterion, optimizer, device, epoch, cfg.train.epochs)
        y, prob, val_loss = predict(model, val_loader, val_pre, device, desc="Validating")
        val = classification_metrics(y, prob, split.class_names)
        print(f"Epoch {epoch}/{cfg.train.epochs}: {stats['time']:.1f}s | train loss {stats['loss']:.4f} "
              f"acc {stats['acc']:.2%} | val loss {val_loss:.4f} acc {val['accuracy']:.2%}")
        metrics = {"train_loss": stats["loss"], "train_acc": stats["acc"], "val_loss": val_loss,
                   "val_acc": val["accuracy"], "val_balanced_acc": val["balanced_accuracy"]}
        payload = checkpoint_payload(model, cfg, split, mean, std, epoch, metrics)
        if val["accuracy"] > best:
            best = val["accuracy"]
            save_checkpoint(payload, out_dir / "best_model.pth")
            print(f"New best model saved! Val Acc: {best:.2%}")
        save_checkpoint(dict(payload, optimizer_state=optimizer.state_dict()), out_dir / "last_model.pth")
    print(f"Best validation accuracy: {best:.2%} | checkpoints in {out_dir}")
    return 0


if __name__ == "__main__":
    run(main, get_args_parser())
