"""What `--resume` needs: RNG states as plain tensors, and finding/validating the checkpoint to resume.

Everything here survives `torch.load(weights_only=True)`: no numpy arrays, no pickled classes.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from utils.checkpoint import load_checkpoint
from utils.errors import UserError


def capture_rng() -> dict:
    """This process's RNG states: Python, NumPy, torch CPU and CUDA."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    return {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(v) for v in internal.tolist()), gauss))
    np_state = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
                         "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def resume_path(cfg, requested: str | None) -> Path:
    """--resume alone: this model's last_model.pth; --resume PATH: that file."""
    path = Path(requested) if requested else cfg.output_dir / "last_model.pth"
    if not path.is_file():
        raise UserError(f"nothing to resume: {path} not found (train without --resume first)")
    return path


def load_resume_checkpoint(cfg, requested: str | None, fingerprint: str) -> dict:
    """The checkpoint to continue from, checked against this run's model and data."""
    path = resume_path(cfg, requested)
    ckpt = load_checkpoint(path)
    if "optimizer_state" not in ckpt or "progress" not in ckpt:
        raise UserError(f"{path} holds no training state (only last_model.pth can be resumed)")
    if ckpt["model_name"] != cfg.model:
        raise UserError(f"{path} is a {ckpt['model_name']} checkpoint; run with --model {ckpt['model_name']}")
    if ckpt.get("data_fingerprint") not in (None, fingerprint):
        raise UserError(f"{path} was trained on a different split of the data (fingerprint differs); "
                        "resuming would mix data sets - start a new run instead")
    ckpt["path"] = str(path)
    return ckpt
