"""Run a model over a loader: the one prediction loop behind validation, test.py and evaluate.py."""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm


@torch.no_grad()
def predict(model, loader, preprocess, device, desc: str = "Predicting", progress: bool = True,
            channels_last: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """(true labels, softmax probabilities, mean cross-entropy loss)."""
    model.eval()
    preprocess.eval()
    labels, probs, loss_sum = [], [], 0.0
    for images, targets in tqdm(loader, desc=desc, disable=not progress, leave=False):
        x = preprocess(images.to(device, non_blocking=True))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True)
        logits = model(x).float()
        loss_sum += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        labels.append(targets.cpu())
        probs.append(torch.softmax(logits, dim=1).cpu())
    if not labels:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32), 0.0
    y = torch.cat(labels).numpy()
    return y, torch.cat(probs).numpy(), loss_sum / max(len(y), 1)
