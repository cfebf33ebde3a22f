"""A run's recipe: optimizer, learning-rate schedule, loss, class balancing, precision and model wrappers."""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler

from core.device import NATIVE_BF16_FLAGS, cpu_capabilities, cpu_flags, cpu_name
from core.errors import UserError
from training.distributed import DistInfo, wrap_ddp

if TYPE_CHECKING:
    from core.config import Config, ModelRecipe

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
def build_optimizer(model: torch.nn.Module, recipe: ModelRecipe, fused: bool = False) -> torch.optim.Optimizer:
    """Every trainable parameter goes to the optimizer: freezing is the zoo's decision (medical_cnn)."""
    params = [p for p in model.parameters() if p.requires_grad]
    extra = {"fused": True} if fused else {}
    return OPTIMIZERS[recipe.optimizer](params, lr=recipe.lr, weight_decay=recipe.weight_decay, **extra)


def use_fused_optimizer(cfg: Config, device: torch.device) -> bool:
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


def build_scheduler(optimizer, cfg: Config, steps_per_epoch: int):
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


def build_criterion(cfg: Config, labels, num_classes: int, device) -> torch.nn.Module:
    weight = class_weights(labels, num_classes).to(device) if cfg.train.class_balance == "weights" else None
    return torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.train.label_smoothing)


def balanced_sampler(labels, generator: torch.Generator) -> WeightedRandomSampler:
    """Each class drawn equally often on average (sampling with replacement, one epoch = len(labels) draws)."""
    counts = np.bincount(np.asarray(labels))
    weights = torch.tensor(1.0 / counts[np.asarray(labels)], dtype=torch.double)
    return WeightedRandomSampler(weights, len(labels), replacement=True, generator=generator)


@dataclass(frozen=True)
class Precision:
    """The autocast dtype of a run (None = fp32) and why it was chosen, for the banner."""
    dtype: torch.dtype | None
    reason: str


def cpu_precision(setting: str, caps: Mapping) -> Precision:
    """performance.cpu_precision on a CPU with capabilities `caps` (torch.cpu.get_capabilities()).

    auto: bf16 autocast where the CPU computes bf16 natively (AMX, AVX512-BF16, Arm BF16); elsewhere bf16
    is emulated and slower than fp32, so fp32."""
    native = cpu_flags(caps, NATIVE_BF16_FLAGS)
    name = cpu_name(caps)
    if setting == "fp32":
        return Precision(None, "performance.cpu_precision=fp32")
    if setting == "bf16":
        if native:
            return Precision(torch.bfloat16, f"performance.cpu_precision=bf16; {name} has native bf16 ({native[0]})")
        return Precision(torch.bfloat16, f"performance.cpu_precision=bf16; {name} has no native bf16: emulated, "
                                         "expect it to be slower than fp32")
    if native:
        return Precision(torch.bfloat16, f"auto: {name} has native bf16 ({', '.join(native)})")
    return Precision(None, f"auto: {name} has no native bf16 (it would be emulated and slower)")


def precision_for(cfg: Config, device: torch.device, caps: Mapping | None = None) -> Precision:
    """CUDA: performance.mixed_precision (bf16 where the GPU has it, else fp16 with GradScaler).
    CPU: performance.cpu_precision, following the CPU's flags under auto."""
    if device.type == "cpu":
        return cpu_precision(cfg.performance.cpu_precision, cpu_capabilities() if caps is None else caps)
    if device.type != "cuda" or not cfg.performance.mixed_precision:
        return Precision(None, f"performance.mixed_precision={str(cfg.performance.mixed_precision).lower()}")
    if torch.cuda.is_bf16_supported():
        return Precision(torch.bfloat16, "performance.mixed_precision=true; this GPU has bf16")
    return Precision(torch.float16, "performance.mixed_precision=true; this GPU has no bf16")


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of training on `device`; None = fp32."""
    return precision_for(cfg, device).dtype


def precision_name(dtype: torch.dtype | None) -> str:
    """fp32 | bf16 | fp16: what a checkpoint records as the precision it was trained in."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def precision_label(dtype: torch.dtype | None, reason: str = "") -> str:
    label = {None: "Disabled (fp32)", torch.bfloat16: "Enabled (bf16 autocast)",
             torch.float16: "Enabled (fp16 autocast + GradScaler)"}[dtype]
    return f"{label} - {reason}" if reason else label


def prepare_model(model: torch.nn.Module, cfg: Config, device: torch.device, info: DistInfo) -> torch.nn.Module:
    """channels_last, cudnn autotuning, DDP, then torch.compile (compile wraps DDP, as PyTorch advises)."""
    perf = cfg.performance
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = perf.benchmark_cudnn and not cfg.train.deterministic
    if perf.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = wrap_ddp(model, info, device)
    return torch.compile(model) if perf.compile_model else model


