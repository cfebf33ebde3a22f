"""Checkpoints: plain dicts of tensors and Python types, written atomically, read with weights_only=True."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from core.errors import UserError
from core.fileio import atomic_write

if TYPE_CHECKING:
    from core.config import Config

REQUIRED_KEYS = ("model_state", "model_name", "class_names", "img_size", "mean", "std", "epoch", "metrics", "config")


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Atomic and unique (core.fileio): a crash or a second writer never leaves half a file."""
    return atomic_write(path, lambda fh: torch.save(state, fh))


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path} (train first: python train.py --model NAME)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which, not a traceback
        raise UserError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from None
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"{path} is not a toolkit checkpoint (missing {', '.join(missing)})")
    return ckpt


def default_checkpoint(cfg: Config, name: str = "best_model.pth") -> Path:
    return cfg.output_dir / name
