"""Run a model over a loader: the one prediction loop behind validation, test.py and evaluate.py."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from core.errors import UserError
from data.dataset import build_dataset, make_loader

if TYPE_CHECKING:
    from core.config import Config
    from data.dataset import GrayImageDataset
    from data.manifest import Split


@dataclass
class Scored:
    """One split's images, their true labels and the model's probabilities, row for row."""
    name: str
    dataset: GrayImageDataset
    paths: list[str]  # as in the split manifest
    y_true: np.ndarray
    y_prob: np.ndarray
    loss: float
    ood: np.ndarray | None = None  # feature-space distances (models.features.ScoredModel), when the model gives them


def split_dataset(cfg: Config, split: Split, name: str, img_size: int):
    """One split of the manifest as a dataset, read through the cache like every other stage; refused if empty."""
    dataset = build_dataset(cfg, split, name, img_size)
    if len(dataset) == 0:
        raise UserError(f"the {name} split of {split.manifest_path} is empty")
    return dataset


def predict_split(cfg: Config, split: Split, name: str, model, preprocess, img_size: int, device) -> Scored:
    """The model over one split of the manifest, read through the cache like every other stage."""
    dataset = split_dataset(cfg, split, name, img_size)
    loader = make_loader(dataset, cfg, cfg.recipe.batch_size, device=device)
    y, prob, loss, ood = predict_outputs(model, loader, preprocess, device, desc=f"Evaluating ({name})")
    return Scored(name, dataset, [r.path for r in split.rows_for(name)], y, prob, loss, ood)


def predict(model, loader, preprocess, device, desc: str = "Predicting", progress: bool = True,
            channels_last: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """(true labels, softmax probabilities, mean cross-entropy loss)."""
    return predict_outputs(model, loader, preprocess, device, desc, progress, channels_last)[:3]


@torch.no_grad()
def predict_outputs(model, loader, preprocess, device, desc: str = "Predicting", progress: bool = True,
                    channels_last: bool = False) -> tuple[np.ndarray, np.ndarray, float, np.ndarray | None]:
    """(true labels, softmax probabilities, mean cross-entropy loss, feature-space distances or None): a model
    may return logits alone or (logits, ood_distance) as models.features.ScoredModel does."""
    model.eval()
    preprocess.eval()
    labels, probs, distances, loss_sum = [], [], [], 0.0
    for images, targets in tqdm(loader, desc=desc, disable=not progress, leave=False):
        x = preprocess(images.to(device, non_blocking=True))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True)
        out = model(x)
        logits = (out[0] if isinstance(out, tuple) else out).float()
        if isinstance(out, tuple):
            distances.append(out[1].float().cpu())
        loss_sum += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        labels.append(targets.cpu())
        probs.append(torch.softmax(logits, dim=1).cpu())
    if not labels:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32), 0.0, None
    y = torch.cat(labels).numpy()
    ood = torch.cat(distances).numpy() if distances else None
    return y, torch.cat(probs).numpy(), loss_sum / max(len(y), 1), ood
