"""Rebuild a trained model from a checkpoint (its own name, classes and weights)."""
from __future__ import annotations

import torch

from models.zoo import build_model


def model_from_checkpoint(ckpt: dict, device: torch.device | str = "cpu") -> torch.nn.Module:
    model = build_model(ckpt["model_name"], num_classes=len(ckpt["class_names"]), pretrained=False,
                        img_size=ckpt.get("img_size"))
    model.load_state_dict(ckpt["model_state"])
    return model.to(device).eval()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under torch.compile / DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)

