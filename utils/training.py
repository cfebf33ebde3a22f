"""The training loop's parts: optimizer, one epoch of training, and the checkpoint payload."""
from __future__ import annotations

import time

import torch
from tqdm import tqdm

from models.loading import unwrap

OPTIMIZERS = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "adamax": torch.optim.Adamax,
    "sgd": lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr, momentum=0.9,
                                                            weight_decay=weight_decay, nesterov=True),
}


def build_optimizer(model: torch.nn.Module, recipe) -> torch.optim.Optimizer:
    """Every trainable parameter goes to the optimizer (the original handed most models only their head)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return OPTIMIZERS[recipe.optimizer](params, lr=recipe.lr, weight_decay=recipe.weight_decay)


def train_one_epoch(model, loader, preprocess, criterion, optimizer, device, epoch: int, epochs: int,
                    progress: bool = True) -> dict:
    model.train()
    preprocess.train()
    loss_sum, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"Epoch {epoch}/{epochs}", disable=not progress, leave=False)
    for images, targets in bar:
        x = preprocess(images.to(device, non_blocking=True))
        targets = targets.to(device, non_blocking=True)
        logits = model(x)
        loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = targets.shape[0]
        loss_sum += loss.item() * n
        correct += (logits.argmax(1) == targets).sum().item()
        seen += n
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.2%}",
                        img_s=f"{seen / (time.perf_counter() - start):.0f}")
    elapsed = time.perf_counter() - start
    return {"loss": loss_sum / max(seen, 1), "acc": correct / max(seen, 1), "time": elapsed,
            "images_per_s": seen / elapsed if elapsed else 0.0}


def checkpoint_payload(model, cfg, split, mean, std, epoch: int, metrics: dict, **extra) -> dict:
    """The checkpoint contract of DESIGN.md: weights plus everything a later stage needs to preprocess."""
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    return {
        "model_state": state,
        "model_name": cfg.model,
        "class_names": list(split.class_names),
        "class_folders": list(split.class_folders),
        "img_size": int(cfg.img_size),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "epoch": int(epoch),
        "metrics": metrics,
        "config": cfg.to_dict(),
        "split_manifest": str(split.manifest_path),
        "data_fingerprint": split.fingerprint,
        **extra,
    }
