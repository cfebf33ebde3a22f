"""Open a checkpoint with the split it is judged on: the one entry point of test, evaluate, export and register."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from core.checkpoint import default_checkpoint, load_checkpoint
from core.contract import Contract
from core.errors import UserError
from data.images import configure_limits
from data.manifest import Split, prepare_split

if TYPE_CHECKING:
    from core.config import Config


@dataclass
class OpenedCheckpoint:
    path: Path
    ckpt: dict
    contract: Contract
    split: Split

    @property
    def model_name(self) -> str:
        return self.ckpt["model_name"]

    @property
    def class_names(self) -> list[str]:
        return list(self.ckpt["class_names"])


def open_for_scoring(args: argparse.Namespace) -> tuple[Config, OpenedCheckpoint]:
    """test.py and evaluate.py: the config and the checkpoint; --checkpoint alone selects its model's recipe."""
    from core.cli import config_from_args

    ckpt = load_checkpoint(args.checkpoint) if args.checkpoint else None
    if ckpt is not None and not args.model:
        args.model = ckpt["model_name"]
    cfg = config_from_args(args)
    configure_limits(cfg)  # this run's images: bounds on every decoder
    return cfg, open_checkpoint(cfg, args.checkpoint, args.model, prepare_split(cfg, args.resplit), loaded=ckpt)


def open_checkpoint(cfg: Config, checkpoint: str | Path | None = None, model_flag: str | None = None,
                    split: Split | None = None, same_split: bool = True, log=print,
                    loaded: dict | None = None) -> OpenedCheckpoint:
    """The checkpoint (default: this model's best_model.pth), checked against --model, and the config's split.

    same_split: refuse a checkpoint trained on another split (scoring it on this test split would leak).
    Export only needs real images for its parity check, so it passes False and gets a note instead.
    loaded: the checkpoint already read from `checkpoint` (it is not read twice).
    split: the config's split when the caller has prepared it already (e.g. with --resplit), so the data set is
    hashed once per run; by default it is prepared here."""
    path = Path(checkpoint) if checkpoint else default_checkpoint(cfg)
    ckpt = loaded if loaded is not None else load_checkpoint(path)
    if model_flag and ckpt["model_name"] != model_flag:
        raise UserError(f"{path} holds a {ckpt['model_name']} model, not {model_flag}")
    split = split if split is not None else prepare_split(cfg, log=log)
    trained_on = ckpt.get("data_fingerprint")
    if trained_on and trained_on != split.fingerprint:
        if same_split:
            raise UserError(
                f"the checkpoint was trained on another split (fingerprint {trained_on}, manifest "
                f"{ckpt.get('split_manifest')}) than {split.manifest_path} (fingerprint {split.fingerprint}); "
                "evaluate with the data set and config it was trained with")
        log(f"   note: the checkpoint was trained on data {trained_on}, these images are from {split.fingerprint}")
    return OpenedCheckpoint(path, ckpt, Contract.from_checkpoint(ckpt), split)
