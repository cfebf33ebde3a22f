"""The training loop, readable top to bottom: one epoch, validation, the epoch loop, and the resume state.

One step (forward, backward, clipping, the non-finite guard) is in training/step.py; the recipe parts in
training/recipe.py; what a run trains with in training/trainer.py.
"""
from __future__ import annotations

import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from core.checkpoint import save_checkpoint
from evaluation.metrics import classification_metrics
from evaluation.prediction import predict
from models.loading import unwrap
from training.distributed import all_reduce_sum, any_rank, gather_objects
from training.progress import Progress, capture_rng, restore_rng
from training.step import flush_nonfinite, forward_backward, optimizer_step
from training.trainer import Trainer


# ---- one epoch ------------------------------------------------------------------------------
class GracefulStop:
    """First Ctrl-C or SIGTERM: finish the current optimizer step, save, stop. A second Ctrl-C aborts at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name} received: saving after the current step "
              "(Ctrl-C again aborts without saving)", flush=True)

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def check(self, device: torch.device) -> bool:
        """The same answer on every process (torchrun may signal the ranks at different moments)."""
        return any_rank(self.requested, device)


def train_one_epoch(t: Trainer, epoch: int, stop: GracefulStop | None = None) -> dict:
    """One pass over the training data; stops early (interrupted=True) at a step boundary when asked."""
    t.model.train()
    t.train_pre.train()
    accum, n_batches = t.cfg.performance.gradient_accumulation, len(t.train_loader)
    if isinstance(t.train_loader.sampler, DistributedSampler):
        t.train_loader.sampler.set_epoch(epoch)
    t.epoch_generator_state = t.generator.get_state()  # the epoch's order, to replay after a mid-epoch stop
    p = t.progress  # a resumed run starts part-way into this epoch, with its running sums
    skip, prior = p.batches_done, p.partial or {"loss": 0.0, "correct": 0, "seen": 0, "time": 0.0}
    p.batches_done, p.partial = 0, None
    loss_sum, correct = torch.zeros((), device=t.device, dtype=torch.float64), torch.zeros((), device=t.device)
    seen, loss_ok, start = 0, torch.ones((), dtype=torch.bool, device=t.device), time.perf_counter()
    bar = tqdm(total=n_batches, initial=skip, desc=f"Epoch {epoch}/{t.cfg.train.epochs}", leave=False,
               disable=not t.dist.is_main, dynamic_ncols=True)
    for i, (images, targets) in enumerate(t.train_loader):
        if i < skip:  # replaying the interrupted epoch's order up to where it stopped
            continue
        boundary = (i + 1) % accum == 0 or i + 1 == n_batches
        window = min(accum, n_batches - (i // accum) * accum)
        loss, hits, n = forward_backward(t, images, targets, window, sync=boundary)
        finite = torch.isfinite(loss)
        loss_ok &= finite
        loss_sum += torch.where(finite, loss.double() * n, 0.0)
        correct += hits
        seen += n
        bar.update(1)
        if boundary:
            optimizer_step(t, loss_ok, epoch)
            loss_ok.fill_(True)
            if (i + 1) % (10 * accum) == 0 or i + 1 == n_batches:  # a host sync only every few steps
                flush_nonfinite(t, epoch)
                done = prior["seen"] + seen
                bar.set_postfix(loss=f"{(prior['loss'] + loss_sum.item()) / done:.4f}",
                                acc=f"{(prior['correct'] + correct.item()) / done:.2%}",
                                img_s=f"{seen / (time.perf_counter() - start):.0f}")
            if stop is not None and i + 1 < n_batches and stop.check(t.device):
                bar.close()
                flush_nonfinite(t, epoch)
                return epoch_stats(t, prior, (loss_sum, correct, seen), start, batches_done=i + 1)
    bar.close()  # the last batch flushed the skipped-step count (it is always a sync point)
    return epoch_stats(t, prior, (loss_sum, correct, seen), start)


def epoch_stats(t: Trainer, prior: dict, sums: tuple, start: float, batches_done: int = 0) -> dict:
    """This process's sums (loss, correct, seen) plus the part of the epoch before a resume, summed over all
    processes; an epoch interrupted after `batches_done` batches returns this process's sums to save instead."""
    loss_sum, correct, seen = sums
    local = [prior["loss"] + loss_sum.item(), prior["correct"] + correct.item(), prior["seen"] + seen]
    elapsed = prior["time"] + time.perf_counter() - start
    if batches_done:  # per-process sums: the checkpoint carries them into the resumed epoch
        return {"interrupted": True, "batches_done": batches_done,
                "partial": {"loss": local[0], "correct": int(local[1]), "seen": int(local[2]), "time": elapsed}}
    loss, hits, n = all_reduce_sum(local, t.device)
    n = max(n, 1)
    return {"interrupted": False, "loss": loss / n, "acc": hits / n, "time": elapsed,
            "images_per_s": n / elapsed if elapsed else 0.0}


@torch.no_grad()
def validate(t: Trainer) -> dict:
    """Validation metrics over the whole validation split (every process's share gathered)."""
    model = unwrap(t.model) if t.dist.enabled else t.model  # no DDP collectives while ranks see different counts
    with torch.autocast(t.device.type, dtype=t.amp, enabled=t.amp is not None):
        y, prob, loss = predict(model, t.val_loader, t.val_pre, t.device, desc="Validating",
                                progress=t.dist.is_main, channels_last=t.cfg.performance.channels_last)
    parts = [p for p in gather_objects((y, prob, loss * len(y))) if len(p[0])]
    y = np.concatenate([p[0] for p in parts])
    prob = np.concatenate([p[1] for p in parts])
    m = classification_metrics(y, prob, t.class_names)
    return {"val_loss": sum(p[2] for p in parts) / max(len(y), 1), "val_acc": m["accuracy"],
            "val_balanced_acc": m["balanced_accuracy"], "val_macro_f1": m["macro_f1"]}


# ---- the epoch loop --------------------------------------------------------------------------
def fit(t: Trainer, tracker, stop: GracefulStop | None = None) -> str:
    """Train until the last epoch, early stopping, or a stop request: "done" | "early_stop" | "interrupted"."""
    for epoch in range(t.progress.epoch + 1, t.cfg.train.epochs + 1):
        stats = train_one_epoch(t, epoch, stop)
        if stats["interrupted"]:
            save_last(t, t.payload(t.progress.epoch, {}), stats["batches_done"], stats["partial"])
            return "interrupted"
        val = validate(t)
        t.progress.epoch = epoch
        if end_of_epoch(t, epoch, stats, val, tracker):
            return "early_stop"
        if stop is not None and epoch < t.cfg.train.epochs and stop.check(t.device):
            return "interrupted"  # last_model.pth of this epoch is already written
    return "done"


def end_of_epoch(t: Trainer, epoch: int, train: dict, val: dict, tracker) -> bool:
    """Summary, tracking, early stopping and checkpoints after one epoch; True when it is time to stop."""
    from core.hardware import hardware_metrics
    from training.banner import epoch_summary_lines

    lr = t.optimizer.param_groups[0]["lr"]
    metrics = {"train_loss": train["loss"], "train_acc": train["acc"], **val}
    message = t.stopper.step(metrics[t.cfg.train.monitor], epoch)
    payload = t.payload(epoch, metrics)
    if t.dist.is_main:
        print("\n".join(epoch_summary_lines(epoch, t.cfg.train.epochs, train, val, lr)), flush=True)
        tracker.log_metrics({**metrics, "lr": lr, "epoch_time_s": train["time"], "images_per_s": train["images_per_s"],
                             "nonfinite_steps": t.progress.nonfinite, **hardware_metrics()}, step=epoch)
        out = t.cfg.output_dir
        if t.stopper.best_epoch == epoch:
            save_checkpoint(payload, out / "best_model.pth")
        print(message, flush=True)
        every = t.cfg.train.save_every
        if every and epoch % every == 0:
            save_checkpoint(payload, out / f"checkpoint_epoch_{epoch:03d}.pth")
            print(f"Saving checkpoint at epoch {epoch}")
    save_last(t, payload)
    return t.stopper.should_stop


def save_last(t: Trainer, payload: dict, batches_done: int = 0, partial: dict | None = None) -> Path:
    """last_model.pth: the checkpoint contract plus the training state (written atomically, rank 0)."""
    state = training_state(t, batches_done, partial)  # every rank takes part (it gathers RNG states)
    path = t.cfg.output_dir / "last_model.pth"
    if t.dist.is_main:
        save_checkpoint({**payload, **state}, path)
    return path


# ---- resume state: training_state and restore_training_state are mirror images ----------------------------
def training_state(t: Trainer, batches_done: int = 0, partial: dict | None = None) -> dict:
    """What last_model.pth adds to the checkpoint so that --resume continues bit for bit."""
    rng = gather_objects(capture_rng())  # one entry per process (a collective: every rank calls this)
    progress = replace(t.progress, batches_done=batches_done, partial=gather_objects(partial),
                       generator_state=t.epoch_generator_state if batches_done else t.generator.get_state(),
                       world_size=t.dist.world_size)
    return {"optimizer_state": t.optimizer.state_dict(), "scheduler_state": t.scheduler.state_dict(),
            "scaler_state": t.scaler.state_dict(), "early_stopping": t.stopper.state_dict(), "rng": rng,
            "progress": progress.state_dict()}


def restore_training_state(t: Trainer, ckpt: dict) -> None:
    """The inverse of training_state (model weights are loaded before the model is wrapped)."""
    fused = [g.get("fused") for g in t.optimizer.param_groups]
    t.optimizer.load_state_dict(ckpt["optimizer_state"])
    for group, flag in zip(t.optimizer.param_groups, fused):  # this run's device decides, not the checkpoint's
        group["fused"] = flag
        for param in group["params"] if flag else ():  # fused kernels keep their step count beside the weights
            state = t.optimizer.state.get(param, {})
            if "step" in state:
                state["step"] = state["step"].to(param.device, torch.float32)
    t.scheduler.load_state_dict(ckpt["scheduler_state"])
    if ckpt.get("scaler_state"):
        t.scaler.load_state_dict(ckpt["scaler_state"])
    t.stopper.load_state_dict(ckpt["early_stopping"])
    p = Progress.from_state_dict(ckpt["progress"])
    t.generator.set_state(p.generator_state)
    same_world = p.world_size == t.dist.world_size
    if not same_world or not p.batches_done:  # another process count: redo the interrupted epoch
        p.batches_done, p.partial = 0, None
    else:
        p.partial = p.partial[t.dist.rank]
    p.world_size, t.progress = t.dist.world_size, p
    restore_rng(ckpt["rng"][t.dist.rank if same_world else 0])
