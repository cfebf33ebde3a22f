"""The console text of a training run: the start banner and the per-epoch summary (original README layout)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from core.device import cpu_description
from core.hardware import read_gpus, read_system

if TYPE_CHECKING:
    from core.config import Config
    from data.manifest import Split

RULE = "=" * 60


def hardware_lines(device) -> list[str]:
    sys_ = read_system()
    load = f", load {sys_.load_avg[0]:.2f}" if sys_.load_avg else ""
    lines = [f"CPU: {sys_.cpu_count} cores @ {sys_.cpu_pct:.1f}%{load}",
             f"RAM: {sys_.ram_pct:.1f}% used ({sys_.ram_available_gb:.1f} of {sys_.ram_total_gb:.1f} GB free)"]
    gpus = read_gpus()
    if not gpus:
        return lines + ["GPU: no GPU" + (" (training on CPU)" if device.type == "cpu" else " readings (no NVML)")]
    for g in gpus:
        util = "n/a" if g.utilization_pct is None else f"{g.utilization_pct:.1f}%"
        lines += [f"GPU {g.index}: {g.name}",
                  f"  GPU Usage: {util} | Memory: {g.memory_pct:.1f}% "
                  f"({g.memory_used_mb:.0f}/{g.memory_total_mb:.0f}MB)"]
    return lines


def banner_lines(cfg: Config, split: Split, device, world_size: int, precision: str, targets: list[str],
                 resumed_from: str | None = None) -> list[str]:
    recipe, perf, sizes = cfg.recipe, cfg.performance, split.sizes()
    batch = f"{recipe.batch_size}" + (f" per process x {world_size} processes" if world_size > 1 else "")
    if perf.gradient_accumulation > 1:
        batch += f" (x{perf.gradient_accumulation} accumulation)"
    lines = [RULE, "Starting Brain Cancer MRI Training", RULE,
             f"Dataset: {sizes['train']} train, {sizes['val']} validation samples",
             f"Model: {cfg.model} with {len(split.class_names)} classes ({cfg.img_size}x{cfg.img_size} px)",
             f"Batch size: {batch}",
             f"Learning rate: {recipe.lr:g} ({recipe.optimizer}, weight decay {recipe.weight_decay:g}, "
             f"scheduler {cfg.train.scheduler}, warm-up {cfg.train.warmup_epochs} epochs)",
             f"Epochs: {cfg.train.epochs} (early stopping on {cfg.train.monitor}, patience {cfg.train.patience})",
             f"Device: {device}" + (f" (DDP, {world_size} processes)" if world_size > 1 else ""),
             *hardware_lines(device),
             f"Mixed Precision: {precision}",
             f"Memory Format: {'channels_last' if perf.channels_last else 'channels-first (NCHW)'}",
             *([f"CPU Features: {cpu_description()}"] if device.type == "cpu" else []),
             f"Model Compilation: {'Enabled' if perf.compile_model else 'Disabled'}",
             *targets]
    if resumed_from:
        lines.append(f"Resuming from: {resumed_from}")
    return lines + [RULE]


def epoch_summary_lines(epoch: int, epochs: int, train: dict, val: dict, lr: float) -> list[str]:
    return [f"Epoch {epoch}/{epochs} Summary:",
            f"  Time: {train['time']:.2f}s | {train['images_per_s']:.0f} img/s | lr {lr:.3g}",
            f"  Train Loss: {train['loss']:.4f} | Train Acc: {train['acc']:.2%}",
            f"  Val Loss: {val['val_loss']:.4f} | Val Acc: {val['val_acc']:.2%} | "
            f"Val Balanced Acc: {val['val_balanced_acc']:.2%}"]
