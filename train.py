"""Train one model of the zoo on the split manifest's training rows.

    python train.py --model resnet18 --demo
    python train.py --model efficientnet_b0 --epochs 30 --batch-size 64 --lr 0.001
    python train.py --model resnet18 --resume            # continue from checkpoints/resnet18_outputs/last_model.pth
    torchrun --nproc-per-node=2 train.py --model resnet18   # DistributedDataParallel, one process per GPU
"""
from __future__ import annotations

import argparse
import contextlib
from typing import TYPE_CHECKING

from core.cli import add_common_args, config_from_args, run, same_data_flags
from core.config import save_resolved
from core.device import seed_everything, select_device
from core.fileio import FolderLock
from core.tracking import RunTracker, experiment_name, wandb_project
from data.images import configure_limits
from data.manifest import prepare_split
from data.normalization import intensity_reference, resolve_normalization
from deploy.automation import release_after_training
from evaluation.answer_checks import attach_answer_checks
from models.zoo import build_model
from training.banner import banner_lines
from training.distributed import DistInfo, init_distributed, main_first, shutdown
from training.loop import GracefulStop, fit, restore_training_state
from training.recipe import precision_label, precision_name
from training.resume import load_resume_checkpoint, precision_note
from training.trainer import build_trainer, training_contract

if TYPE_CHECKING:
    from core.config import Config

INTERRUPTED = 130  # the shell's code for a run stopped by Ctrl-C


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a brain MRI classifier (checkpoints in "
                                            "checkpoints/{model}_outputs/)")
    add_common_args(p, device=True)
    p.add_argument("--epochs", type=int, default=None, help="number of epochs (config: train.epochs)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size per process (config: the model's recipe)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (config: the model's recipe)")
    p.add_argument("--weights", default=None, metavar="PATH", help="local file with ImageNet weights (offline sites)")
    p.add_argument("--no-pretrained", action="store_true", help="start from random weights")
    p.add_argument("--seed", type=int, default=None, help="random seed (config: train.seed)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms: a CPU run repeats bit for bit (config: train.deterministic)")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue an interrupted run from last_model.pth (or the checkpoint PATH)")
    return p


def main(args) -> int:
    info, device = init_distributed(args.device)
    try:
        return train(args, info, device)
    finally:
        shutdown()


def train(args, info: DistInfo, device) -> int:
    cfg = config_from_args(args, **{
        "train.epochs": args.epochs, "train.seed": args.seed, "train.deterministic": args.deterministic or None,
        "models.{model}.batch_size": args.batch_size, "models.{model}.lr": args.lr,
        "models.{model}.weights": args.weights, "models.{model}.pretrained": False if args.no_pretrained else None,
    })
    configure_limits(cfg)  # this run's images: bounds on every decoder
    seed_everything(cfg.train.seed + info.rank, cfg.train.deterministic)
    device = device or select_device(args.device)
    log = print if info.is_main else (lambda *a, **k: None)
    with contextlib.ExitStack() as held:
        with main_first(info, device):
            if info.is_main:  # one training run per output folder: a second one is told who holds it
                held.enter_context(FolderLock(cfg.output_dir, "train.py"))
            split = prepare_split(cfg, args.resplit, log=log)
            mean, std, source = resolve_normalization(cfg, split, cfg.img_size, log=log)
            reference = intensity_reference(cfg, split, cfg.img_size)  # the review station's drift reference
        return train_on(cfg, args, info, device, split, (mean, std, source, reference))


def train_on(cfg: Config, args, info: DistInfo, device, split, stats: tuple) -> int:
    """Build the model and trainer, then the epoch loop under the trackers."""
    mean, std, source, reference = stats
    ckpt = load_resume_checkpoint(cfg, args.resume, split.fingerprint) if args.resume is not None else None
    recipe = cfg.recipe
    model = build_model(cfg.model, len(split.class_names), recipe.pretrained and ckpt is None, recipe.weights,
                        cfg.img_size)
    if ckpt is not None:
        model.load_state_dict(ckpt["model_state"])
    t = build_trainer(cfg, split, training_contract(cfg, split, mean, std, reference), device, info, model.to(device))
    if ckpt is not None:
        restore_training_state(t, ckpt)
    main_rank = info.is_main
    tags = {"model": cfg.model, "resumed_from": ckpt["path"]} if ckpt else {"model": cfg.model}
    with RunTracker(cfg, run_name=cfg.model, tags=tags,
                    mlflow_experiment=experiment_name("train", cfg.model, cfg.monitoring.mlflow.experiment_prefix)
                    if main_rank else None,
                    wandb_project=wandb_project(cfg) if main_rank else None,
                    tensorboard_dir=f"{cfg.monitoring.tensorboard_log_dir}/{cfg.model}_logs" if main_rank else None,
                    ) as tracker, GracefulStop() as stop:
        t.run_id = tracker.mlflow_run_id
        if main_rank:
            precision = precision_label(t.amp, t.precision_reason)
            print("\n".join(banner_lines(cfg, split, device, info.world_size, precision, tracker.targets(),
                                         ckpt["path"] if ckpt else None)), flush=True)
            if ckpt is not None and (note := precision_note(ckpt, precision_name(t.amp))):
                print(note, flush=True)
            tracker.log_params({**cfg.to_dict(), "normalization": {"mean": list(mean), "std": list(std),
                                                                   "source": source},
                                "world_size": info.world_size, "device": str(device),
                                "precision": precision_name(t.amp)})
            tracker.log_artifact(save_resolved(cfg, cfg.output_dir), "config")
            if source == "precomputed":  # computed/imagenet statistics are in the params above
                tracker.log_artifact(cfg.dataset.stats_path, "normalization")
        outcome = fit(t, tracker, stop)
        return finish(cfg, t, tracker, outcome, main_rank, split, same_data_flags(args))


def finish(cfg: Config, t, tracker, outcome: str, main_rank: bool, split, again: str) -> int:
    """`split`: the run's split (the answer checks are fitted on it); `again`: the flags of this run that the printed
    next commands repeat (--demo, --config, --set)."""
    out = cfg.output_dir
    if outcome == "interrupted":
        tracker.close("KILLED")
        if main_rank:
            print(f"Training interrupted after epoch {t.progress.epoch}: state saved to {out / 'last_model.pth'}\n"
                  f"Resume with: python train.py --model {cfg.model} --resume{again}")
        return INTERRUPTED
    if main_rank:
        print(t.stopper.summary())
        tracker.log_metrics({f"best_{cfg.train.monitor}": t.stopper.best, "best_epoch": t.stopper.best_epoch})
        if (out / "best_model.pth").is_file():
            # fitted on the best weights, before anything reads them: OOD limit and conformal thresholds
            attach_answer_checks(cfg, out / "best_model.pth", split, t.device)
            tracker.log_artifact(out / "best_model.pth", "checkpoints")
        print(f"Checkpoints in {out} ({'early stop' if outcome == 'early_stop' else 'all epochs done'})")
        # registry.auto_register / auto_promote; never fails the run
        release_after_training(cfg, t.device, tracker, again=again, split=split)
    return 0


if __name__ == "__main__":
    run(main, get_args_parser())
