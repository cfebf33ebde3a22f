"""The training loop, readable top to bottom: recipe parts, one epoch, validation, the epoch loop.

Speed options (autocast, GradScaler, channels_last, torch.compile, accumulation, clipping) act on
CUDA and are harmless on CPU. A step whose loss or gradient is not finite is skipped and counted:
with a fused Adam/AdamW (performance.fused_optimizer) the skip happens on the device and the count is
read at the loop's periodic sync, so the host never waits for the GPU between steps.
"""
from __future__ import annotations

import functools
import math
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DistributedSampler, Subset, WeightedRandomSampler
from tqdm import tqdm

from data.dataset import build_dataset, make_loader
from data.preprocess import Preprocessor
from models.loading import unwrap
from utils.checkpoint import save_checkpoint
from utils.distributed import DistInfo, all_reduce_sum, any_rank, any_rank_on_device, gather_objects, wrap_ddp
from utils.early_stopping import EarlyStopping
from utils.errors import UserError
from utils.metrics import classification_metrics
from utils.prediction import predict
from utils.resume import capture_rng, restore_rng

OPTIMIZERS = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "adamax": torch.optim.Adamax,
    "sgd": lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr, momentum=0.9,
                                                            weight_decay=weight_decay, nesterov=True),
}


# Fused kernels that take a found_inf flag and skip on the device. Not SGD: torch's fused SGD leaves its
# momentum buffer uninitialised when the first step is skipped.
FUSED_OPTIMIZERS = ("adamw", "adam")


# ---- recipe parts ---------------------------------------------------------------------------
def build_optimizer(model: torch.nn.Module, recipe, fused: bool = False) -> torch.optim.Optimizer:
    """Every trainable parameter goes to the optimizer (the original handed most models only their head)."""
    params = [p for p in model.parameters() if p.requires_grad]
    extra = {"fused": True} if fused else {}
    return OPTIMIZERS[recipe.optimizer](params, lr=recipe.lr, weight_decay=recipe.weight_decay, **extra)


def use_fused_optimizer(cfg, device: torch.device) -> bool:
    """performance.fused_optimizer: auto = on CUDA for adam/adamw; true elsewhere needs one of them."""
    setting, name = cfg.performance.fused_optimizer, cfg.recipe.optimizer
    if setting == "auto":
        return device.type == "cuda" and name in FUSED_OPTIMIZERS
    if setting and name not in FUSED_OPTIMIZERS:
        raise UserError(f"performance.fused_optimizer=true needs optimizer {' or '.join(FUSED_OPTIMIZERS)} "
                        f"(model {cfg.model} uses {name}); set it to auto or false")
    return bool(setting)


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR factor: linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, cfg, steps_per_epoch: int):
    """Stepped once per optimizer step; `none` is a constant factor so resume handles one kind of state."""
    total = max(cfg.train.epochs * steps_per_epoch, 1)
    warmup = min(cfg.train.warmup_epochs * steps_per_epoch, total - 1)
    if cfg.train.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total,
            pct_start=warmup / total if warmup else 0.3)
    fn = functools.partial(warmup_cosine, warmup=warmup, total=total) if cfg.train.scheduler == "cosine" \
        else (lambda step: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def class_weights(labels, num_classes: int) -> torch.Tensor:
    """n / (k * count): sklearn's "balanced" weights; a class absent from the data gets weight 0."""
    counts = np.bincount(np.asarray(labels), minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def build_criterion(cfg, labels, num_classes: int, device) -> torch.nn.Module:
    weight = class_weights(labels, num_classes).to(device) if cfg.train.class_balance == "weights" else None
    return torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.train.label_smoothing)


def balanced_sampler(labels, generator: torch.Generator) -> WeightedRandomSampler:
    """Each class drawn equally often on average (sampling with replacement, one epoch = len(labels) draws)."""
    counts = np.bincount(np.asarray(labels))
    weights = torch.tensor(1.0 / counts[np.asarray(labels)], dtype=torch.double)
    return WeightedRandomSampler(weights, len(labels), replacement=True, generator=generator)


def amp_dtype(cfg, device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU has it, else fp16 (with GradScaler); None on CPU or when turned off."""
    if device.type != "cuda" or not cfg.performance.mixed_precision:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def precision_label(dtype: torch.dtype | None) -> str:
    return {None: "Disabled (fp32)", torch.bfloat16: "Enabled (bf16 autocast)",
            torch.float16: "Enabled (fp16 autocast + GradScaler)"}[dtype]


def prepare_model(model: torch.nn.Module, cfg, device: torch.device, info: DistInfo) -> torch.nn.Module:
    """channels_last, cudnn autotuning, DDP, then torch.compile (compile wraps DDP, as PyTorch advises)."""
    perf = cfg.performance
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = perf.benchmark_cudnn and not cfg.train.deterministic
    if perf.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = wrap_ddp(model, info, device)
    return torch.compile(model) if perf.compile_model else model


# ---- the trainer's state ----------------------------------------------------------------------
@dataclass
class Trainer:
    cfg: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    criterion: torch.nn.Module
    train_loader: object
    val_loader: object
    train_pre: torch.nn.Module
    val_pre: torch.nn.Module
    device: torch.device
    generator: torch.Generator
    class_names: list = field(default_factory=list)
    amp: torch.dtype | None = None
    dist: DistInfo = field(default_factory=DistInfo)
    stopper: EarlyStopping = field(default_factory=EarlyStopping)
    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps
    nonfinite: int = 0  # skipped steps
    pending_nonfinite: torch.Tensor | None = None  # steps a fused optimizer skipped on the device, not yet read
    resume_batches: int = 0  # batches of the first epoch already done before a mid-epoch interruption
    partial: dict | None = None  # that epoch's running sums
    epoch_generator_state: torch.Tensor | None = None
    split: object = None  # for the checkpoint payload
    mean: tuple = ()
    std: tuple = ()
    run_id: str | None = None  # the MLflow training run, so evaluation and the registry can link back to it

    def __post_init__(self):
        if self.pending_nonfinite is None:
            self.pending_nonfinite = torch.zeros((), dtype=torch.int64, device=self.device)

    @property
    def fused(self) -> bool:
        """The optimizer skips non-finite steps on the device (build_optimizer(..., fused=True))."""
        return bool(self.optimizer.defaults.get("fused"))

    def payload(self, epoch: int, metrics: dict, **extra) -> dict:
        return checkpoint_payload(self.model, self.cfg, self.split, self.mean, self.std, epoch, metrics,
                                  mlflow_run_id=self.run_id, **extra)


def build_trainer(cfg, split, mean, std, device, info: DistInfo, model, progress: bool = True) -> Trainer:
    """Data, model wrappers, optimizer, scheduler, loss: everything one run trains with."""
    generator = torch.Generator().manual_seed(cfg.train.seed)  # shuffle order, saved in last_model.pth
    train_ds, val_ds = (build_dataset(cfg, split, name, cfg.img_size) for name in ("train", "val"))
    labels = split.samples("train")[1]
    sampler = None
    if cfg.train.class_balance == "sampler":
        if info.enabled:
            raise UserError("train.class_balance=sampler does not work with several processes; use weights")
        sampler = balanced_sampler(labels, generator)
    elif info.enabled:
        sampler = DistributedSampler(train_ds, info.world_size, info.rank, shuffle=True, seed=cfg.train.seed)
    if info.enabled:  # each process validates every world_size-th image; the results are gathered
        val_ds = Subset(val_ds, range(info.rank, len(val_ds), info.world_size))
    bs = cfg.recipe.batch_size
    per_process = math.ceil(len(train_ds) / info.world_size)
    # drop the ragged last batch (a batch of 1 breaks batch norm) unless the data set is smaller than a batch
    train_loader = make_loader(train_ds, cfg, bs, shuffle=True, sampler=sampler, device=device,
                               generator=generator, drop_last=per_process > bs)
    val_loader = make_loader(val_ds, cfg, bs, device=device)
    wrapped = prepare_model(model, cfg, device, info)
    optimizer = build_optimizer(wrapped, cfg.recipe, use_fused_optimizer(cfg, device))
    steps = math.ceil(len(train_loader) / cfg.performance.gradient_accumulation)
    dtype = amp_dtype(cfg, device)
    return Trainer(
        cfg=cfg, model=wrapped, optimizer=optimizer, scheduler=build_scheduler(optimizer, cfg, steps),
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        criterion=build_criterion(cfg, labels, len(split.class_names), device),
        train_loader=train_loader, val_loader=val_loader,
        train_pre=Preprocessor.from_config(cfg, mean, std, train=True).to(device),
        val_pre=Preprocessor.from_config(cfg, mean, std, train=False).to(device),
        device=device, generator=generator, class_names=list(split.class_names), amp=dtype, dist=info,
        stopper=EarlyStopping(cfg.train.monitor, cfg.train.patience, cfg.train.min_delta),
        split=split, mean=tuple(mean), std=tuple(std))


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

    def __enter__(self) -> "GracefulStop":
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
    t.step += 1
    if not t.fused and bad:
        record_nonfinite(t, 1, f"at epoch {epoch}, step {t.step}: step skipped")


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
        record_nonfinite(t, n, f"in {n} step(s) of epoch {epoch} up to step {t.step}: skipped")


def record_nonfinite(t: Trainer, n: int, where: str) -> None:
    """Warn about n skipped steps; stop the run with advice once train.max_nonfinite_steps is reached."""
    t.nonfinite += n
    limit = t.cfg.train.max_nonfinite_steps
    if t.dist.is_main:
        tqdm.write(f"warning: non-finite loss or gradient {where} ({t.nonfinite}/{limit})", file=sys.stderr)
    if t.nonfinite >= limit:
        raise UserError(
            f"training stopped: {t.nonfinite} steps had a non-finite (NaN/inf) loss or gradient. "
            f"Lower the learning rate (--lr, now {t.cfg.recipe.lr:g}), keep gradient clipping on "
            "(performance.max_grad_norm), or turn mixed precision off (performance.mixed_precision=false)")


def train_one_epoch(t: Trainer, epoch: int, stop: GracefulStop | None = None) -> dict:
    """One pass over the training data; stops early (interrupted=True) at a step boundary when asked."""
    t.model.train()
    t.train_pre.train()
    accum, n_batches = t.cfg.performance.gradient_accumulation, len(t.train_loader)
    if isinstance(t.train_loader.sampler, DistributedSampler):
        t.train_loader.sampler.set_epoch(epoch)
    t.epoch_generator_state = t.generator.get_state()  # the epoch's order, to replay after a mid-epoch stop
    skip, prior = t.resume_batches, t.partial or {"loss": 0.0, "correct": 0, "seen": 0, "time": 0.0}
    t.resume_batches, t.partial = 0, None
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
                return epoch_stats(t, prior, loss_sum, correct, seen, start, interrupted=True, batches_done=i + 1)
    bar.close()  # the last batch flushed the skipped-step count (it is always a sync point)
    return epoch_stats(t, prior, loss_sum, correct, seen, start)


def epoch_stats(t: Trainer, prior: dict, loss_sum, correct, seen: int, start: float, interrupted=False,
                batches_done: int = 0) -> dict:
    """This process's sums plus the interrupted part of the epoch, summed over all processes."""
    local = [prior["loss"] + loss_sum.item(), prior["correct"] + correct.item(), prior["seen"] + seen]
    elapsed = prior["time"] + time.perf_counter() - start
    if interrupted:  # per-process sums: the checkpoint carries them into the resumed epoch
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
    for epoch in range(t.epoch + 1, t.cfg.train.epochs + 1):
        stats = train_one_epoch(t, epoch, stop)
        if stats["interrupted"]:
            save_last(t, t.payload(t.epoch, {}), stats["batches_done"], stats["partial"])
            return "interrupted"
        val = validate(t)
        t.epoch = epoch
        if end_of_epoch(t, epoch, stats, val, tracker):
            return "early_stop"
        if stop is not None and epoch < t.cfg.train.epochs and stop.check(t.device):
            return "interrupted"  # last_model.pth of this epoch is already written
    return "done"


def end_of_epoch(t: Trainer, epoch: int, train: dict, val: dict, tracker) -> bool:
    """Summary, tracking, early stopping and checkpoints after one epoch; True when it is time to stop."""
    from utils.banner import epoch_summary_lines
    from utils.hardware import hardware_metrics

    lr = t.optimizer.param_groups[0]["lr"]
    metrics = {"train_loss": train["loss"], "train_acc": train["acc"], **val}
    message = t.stopper.step(metrics[t.cfg.train.monitor], epoch)
    payload = t.payload(epoch, metrics)
    if t.dist.is_main:
        print("\n".join(epoch_summary_lines(epoch, t.cfg.train.epochs, train, val, lr)), flush=True)
        tracker.log_metrics({**metrics, "lr": lr, "epoch_time_s": train["time"], "images_per_s": train["images_per_s"],
                             "nonfinite_steps": t.nonfinite, **hardware_metrics()}, step=epoch)
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


# ---- resume state ---------------------------------------------------------------------------
def training_state(t: Trainer, batches_done: int = 0, partial: dict | None = None) -> dict:
    """What last_model.pth adds to the checkpoint contract so that --resume continues bit for bit."""
    rng = gather_objects(capture_rng())  # one entry per process (a collective: every rank calls this)
    partials = gather_objects(partial)
    gen = t.epoch_generator_state if batches_done else t.generator.get_state()
    return {"optimizer_state": t.optimizer.state_dict(), "scheduler_state": t.scheduler.state_dict(),
            "scaler_state": t.scaler.state_dict(), "early_stopping": t.stopper.state_dict(), "rng": rng,
            "progress": {"epoch": t.epoch, "batches_done": batches_done, "step": t.step, "nonfinite": t.nonfinite,
                         "generator_state": gen, "partial": partials, "world_size": t.dist.world_size}}


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
    p = ckpt["progress"]
    t.epoch, t.step, t.nonfinite = p["epoch"], p["step"], p["nonfinite"]
    t.generator.set_state(p["generator_state"])
    same_world = p["world_size"] == t.dist.world_size
    t.resume_batches = p["batches_done"] if same_world else 0  # another process count: redo that epoch
    t.partial = p["partial"][t.dist.rank] if same_world and p["batches_done"] else None
    restore_rng(ckpt["rng"][t.dist.rank if same_world else 0])


def checkpoint_payload(model, cfg, split, mean, std, epoch: int, metrics: dict, **extra) -> dict:
    """The checkpoint contract of DESIGN.md: weights plus everything a later stage needs to preprocess."""
    state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    return {
        "model_state": state,
        "model_name": cfg.model,
        "class_names": list(split.class_names),
        "class_folders": list(split.class_folders),
        "img_size": int(cfg.img_size),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "epoch": int(epoch),
        "metrics": metrics,
        "config": cfg.to_dict(),
        "split_manifest": str(split.manifest_path),
        "data_fingerprint": split.fingerprint,
        **extra,
    }
