"""One training step, readable in one place: forward under autocast, backward, clipping, and an optimizer
step that is skipped (and counted) when the loss or the gradient is not finite.

With a fused Adam/AdamW (performance.fused_optimizer) the skip happens on the device and the count is
read at the loop's periodic sync, so the host never waits for the GPU between steps.
"""
from __future__ import annotations

import sys
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from core.errors import UserError
from training.distributed import any_rank, any_rank_on_device

if TYPE_CHECKING:
    from training.trainer import Trainer


def forward_backward(t: Trainer, images, targets, loss_scale: float, sync: bool):
    """Forward under autocast, backward of loss / loss_scale; DDP syncs gradients only when `sync`."""
    x = t.train_pre(images.to(t.device, non_blocking=True))
    if t.cfg.performance.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = targets.to(t.device, non_blocking=True)
    no_sync = t.dist.enabled and not sync
    with unwrap_ddp(t.model).no_sync() if no_sync else nullcontext():
        with torch.autocast(t.device.type, dtype=t.amp, enabled=t.amp is not None):
            logits = t.model(x)
        loss = t.criterion(logits.float(), y)
        t.scaler.scale(loss / loss_scale).backward()
    return loss.detach(), (logits.argmax(1) == y).sum(), y.shape[0]


def unwrap_ddp(model):
    """The DistributedDataParallel object under a torch.compile wrapper (for no_sync)."""
    return getattr(model, "_orig_mod", model)


def clip_gradients(t: Trainer) -> torch.Tensor:
    """Unscale (fp16), then clip to performance.max_grad_norm; returns the norm before clipping."""
    t.scaler.unscale_(t.optimizer)
    params = [p for g in t.optimizer.param_groups for p in g["params"] if p.grad is not None]
    max_norm = t.cfg.performance.max_grad_norm
    if max_norm:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params])


def optimizer_step(t: Trainer, loss_ok: torch.Tensor, epoch: int) -> None:
    """One optimizer step, or a skipped one when the loss or the gradient is not finite."""
    norm = clip_gradients(t)
    # fp16: an overflowing gradient is GradScaler's business (it skips the step and lowers the scale).
    ok = loss_ok if t.scaler.is_enabled() else loss_ok & torch.isfinite(norm)
    if t.fused:
        bad = any_rank_on_device(~ok)
        fused_step(t, bad)
        t.scheduler.step()  # the host cannot know about a skip here: the schedule advances regardless
        t.pending_nonfinite += bad
    else:
        bad = any_rank(not bool(ok), t.device)  # one host sync per step
        if not bad:
            t.scaler.step(t.optimizer)
            t.scheduler.step()  # a skipped step does not advance the schedule
    t.scaler.update()
    t.optimizer.zero_grad(set_to_none=True)
    t.progress.step += 1
    if not t.fused and bad:
        record_nonfinite(t, 1, f"at epoch {epoch}, step {t.progress.step}: step skipped")


def fused_step(t: Trainer, bad: torch.Tensor) -> None:
    """The fused kernel reads `bad` on the device and leaves weights and moments untouched when it is set."""
    if t.scaler.is_enabled():  # GradScaler hands its own found_inf to fused optimizers (a NaN loss has NaN grads)
        t.scaler.step(t.optimizer)
        return
    t.optimizer.grad_scale, t.optimizer.found_inf = None, bad.float()
    try:
        t.optimizer.step()
    finally:
        del t.optimizer.grad_scale, t.optimizer.found_inf


def flush_nonfinite(t: Trainer, epoch: int) -> None:
    """Count the steps the device skipped since the last flush (a host sync: called where the loop syncs anyway)."""
    if not t.fused:
        return
    n = int(t.pending_nonfinite.item())
    if n:
        t.pending_nonfinite.zero_()
        record_nonfinite(t, n, f"in {n} step(s) of epoch {epoch} up to step {t.progress.step}: skipped")


def record_nonfinite(t: Trainer, n: int, where: str) -> None:
    """Warn about n skipped steps; stop the run with advice once train.max_nonfinite_steps is reached."""
    t.progress.nonfinite += n
    limit = t.cfg.train.max_nonfinite_steps
    if t.dist.is_main:
        tqdm.write(f"warning: non-finite loss or gradient {where} ({t.progress.nonfinite}/{limit})", file=sys.stderr)
    if t.progress.nonfinite >= limit:
        raise UserError(
            f"training stopped: {t.progress.nonfinite} steps had a non-finite (NaN/inf) loss or gradient. "
            f"Lower the learning rate (--lr, now {t.cfg.recipe.lr:g}), keep gradient clipping on "
            "(performance.max_grad_norm), or turn mixed precision off (performance.mixed_precision=false)")
