"""What `--resume` needs: finding the checkpoint to continue from and checking it fits this run."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from core.checkpoint import load_checkpoint
from core.errors import UserError

if TYPE_CHECKING:
    from core.config import Config


def resume_path(cfg: Config, requested: str | None) -> Path:
    """--resume alone: this model's last_model.pth; --resume PATH: that file."""
    path = Path(requested) if requested else cfg.output_dir / "last_model.pth"
    if not path.is_file():
        raise UserError(f"nothing to resume: {path} not found (train without --resume first)")
    return path


def load_resume_checkpoint(cfg: Config, requested: str | None, fingerprint: str) -> dict:
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


def precision_note(ckpt: dict, precision: str) -> str | None:
    """A line when a run resumes in another precision than it was trained in. Allowed: under autocast the weights
    and the optimizer's moments are fp32 in every precision, so the state carries over; only the bit-for-bit
    match with an uninterrupted run is lost. None when nothing changes (or the checkpoint does not say)."""
    before = ckpt.get("precision")
    if before is None or before == precision:
        return None
    return (f"note: {ckpt['path']} was trained in {before}; continuing in {precision} (weights and optimizer "
            "state are fp32 in both; the run will not repeat an uninterrupted one bit for bit)")
