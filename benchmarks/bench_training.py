"""Training throughput (images/s, forward + backward + optimizer step) of three input pipelines, against the
model alone in every precision and memory format this device offers.

  loop      the toolkit's training loop itself (training.loop.train_one_epoch: the pipeline below plus
            clipping, the non-finite guard, the schedule, running sums) over the toolkit's loader
  toolkit   uint8 cache -> loader -> Preprocessor (augmentation + normalization on the model's device)
  original  the original per-sample PIL pipeline: ImageFolder, Resize, Grayscale(3), flip, rotation,
            ColorJitter, ToTensor, Normalize in DataLoader workers
  model ... the model alone on a batch already in memory, in fp32 and bf16 autocast, channels-first and
            channels_last: the limits. The target is the loop against the best of them.

The pipelines train in the precision train.py picks (--precision auto follows the CPU's flags, as
performance.cpu_precision does) and the memory format of performance.channels_last. Same model, optimizer
(the toolkit's, fused where train.py fuses it), batch, image size, threads and worker count; the variants
alternate epoch by epoch in one process, so the ratios hold on a busy machine.

    python benchmarks/bench_training.py                      # CPU: resnet18, 224 px, 512 px JPEGs
    python benchmarks/bench_training.py --device cuda --precision bf16 --batch-size 128 --workers 8
"""
from __future__ import annotations

import argparse
import hashlib
from typing import TYPE_CHECKING

try:
    from benchmarks import harness
except ImportError:  # run as a file
    import harness

import torch
from torch import nn

from core.hardware import usable_cpus
from data.cache import CacheSlot, open_cache
from data.dataset import GrayImageDataset, make_loader
from data.preprocess import Preprocessor
from models.zoo import build_model
from training.loop import train_one_epoch
from training.recipe import (
    build_criterion,
    build_optimizer,
    build_scheduler,
    precision_for,
    precision_name,
    use_fused_optimizer,
)
from training.trainer import Trainer as LoopState

if TYPE_CHECKING:
    from core.config import Config

MEAN, STD = [0.2] * 3, [0.25] * 3
PIPELINES = ("loop", "toolkit", "original")
# The model alone: (autocast dtype, channels_last) per row
MODEL_ROWS = {"model fp32": (None, False), "model fp32 channels_last": (None, True),
              "model bf16": (torch.bfloat16, False), "model bf16 channels_last": (torch.bfloat16, True)}
# Optional: the cached dataset through a DataLoader with worker processes (what make_loader picks off CUDA).
EXTRA_VARIANTS = ("toolkit_workers",)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Training throughput: toolkit pipeline vs original PIL pipeline vs model "
                                            "alone")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--jpeg-size", type=int, default=512, help="size of the generated JPEGs")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=4, help="batches per timed epoch")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per variant (interleaved)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (both pipelines)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: usable cores)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="the pipelines' precision, as train.py picks it (auto: bf16 where the CPU has native bf16; "
                        "on CUDA, bf16 where the GPU has it)")
    p.add_argument("--amp", action="store_true", help="same as --precision bf16")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="the pipelines' memory format (default: channels_last, as performance.channels_last)")
    p.add_argument("--data-dir", default=str(harness.DEFAULT_DATA_DIR))
    p.add_argument("--with-workers-variant", action="store_true",
                   help="also time the cache through DataLoader worker processes (on CUDA the toolkit uses a thread)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the benchmark runs")
    return p


def original_loader(root, args, device) -> torch.utils.data.DataLoader:
    """The original project's pipeline, per sample in PIL (torchvision.transforms v1, as it used)."""
    from torchvision import datasets
    from torchvision import transforms as T

    tf = T.Compose([T.Resize((args.img_size, args.img_size)), T.Grayscale(3), T.RandomHorizontalFlip(),
                    T.RandomRotation(10), T.ColorJitter(brightness=0.2, contrast=0.2), T.ToTensor(),
                    T.Normalize(MEAN, STD)])
    extra = {"persistent_workers": True, "prefetch_factor": 4} if args.workers else {}
    return torch.utils.data.DataLoader(datasets.ImageFolder(str(root), tf), batch_size=args.batch_size,
                                       shuffle=True, drop_last=True, num_workers=args.workers,
                                       pin_memory=device.type == "cuda", **extra)


def toolkit_loader(root, args, device, cfg: Config):
    """The toolkit's pipeline: the cache (built once, timed separately), make_loader, Preprocessor."""
    paths, labels = harness.list_images(root)
    names = [str(p.relative_to(root)) for p in paths]
    key = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    with harness.Stopwatch() as build:
        cache = open_cache(CacheSlot(root.parent / "cache", key, "bench", args.img_size), paths, names,
                           progress=False)
    dataset = GrayImageDataset(paths, labels, args.img_size, cache)
    loader = make_loader(dataset, cfg, args.batch_size, drop_last=True, device=device, generator=torch.Generator())
    workers = torch.utils.data.DataLoader(dataset, args.batch_size, shuffle=True, drop_last=True,
                                          num_workers=args.workers, pin_memory=device.type == "cuda",
                                          persistent_workers=args.workers > 0,
                                          prefetch_factor=4 if args.workers else None)
    return loader, workers, build.seconds


def row_name(dtype: torch.dtype | None, channels_last: bool) -> str:
    return f"model {precision_name(dtype)}" + (" channels_last" if channels_last else "")


class Setup:
    """One model and its optimizer in one precision and memory format (every setup starts from the same weights)."""

    def __init__(self, args, device, cfg: Config, dtype: torch.dtype | None, channels_last: bool):
        torch.manual_seed(0)
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = build_model(args.model, 3).to(device).train().to(memory_format=self.memory_format)
        self.optimizer = build_optimizer(self.model, cfg.recipe, use_fused_optimizer(cfg, device))


class Trainer:
    """One optimizer step per batch; the pipelines share the setup train.py would pick, each model row has its own."""

    def __init__(self, args, device, cfg: Config):
        self.device, self.args = device, args
        self.precision = precision_for(cfg, device)
        rows = dict(MODEL_ROWS)
        self.pipeline_row = row_name(self.precision.dtype, args.channels_last)
        rows.setdefault(self.pipeline_row, (self.precision.dtype, args.channels_last))  # fp16 on an older GPU
        self.setups = {name: Setup(args, device, cfg, *spec) for name, spec in rows.items()}
        self.main = self.setups[self.pipeline_row]
        self.criterion = nn.CrossEntropyLoss()
        self.pre = Preprocessor(MEAN, STD, augment=True).to(device).train()
        self.sync = torch.cuda.synchronize if device.type == "cuda" else None
        self.loop = None  # the training loop's state, over the pipelines' model and optimizer (see loop_state)

    def loop_state(self, cfg: Config, loader) -> LoopState:
        """What train.py's build_trainer makes, around the pipelines' model, optimizer and loader."""
        dtype, main = self.precision.dtype, self.main
        return LoopState(cfg=cfg, model=main.model, optimizer=main.optimizer,
                         scheduler=build_scheduler(main.optimizer, cfg, len(loader)),
                         scaler=torch.amp.GradScaler(self.device.type, enabled=dtype == torch.float16),
                         criterion=build_criterion(cfg, [0, 1, 2], 3, self.device), train_loader=loader,
                         val_loader=None, train_pre=self.pre, val_pre=self.pre, device=self.device,
                         generator=torch.Generator(), amp=dtype)

    def step(self, setup: Setup, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.contiguous(memory_format=setup.memory_format)
        with torch.autocast(self.device.type, dtype=setup.dtype, enabled=setup.dtype is not None):
            loss = self.criterion(setup.model(x).float(), y)
        setup.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        setup.optimizer.step()

    def epoch(self, variant: str, source) -> tuple[float, float]:
        """(images per second, images per CPU-second of this process) over one epoch (the timer includes waiting
        for the loader's first batch)."""
        dev, n = self.device, 0
        with harness.Stopwatch(self.sync) as sw:
            if variant == "loop":
                train_one_epoch(self.loop, 1)
                n = len(source) * self.args.batch_size  # drop_last: every batch is whole
            elif variant in self.setups:
                x, y = source
                for _ in range(self.args.batches):
                    self.step(self.setups[variant], x, y)
                    n += y.shape[0]
            else:
                for images, labels in source:
                    images = images.to(dev, non_blocking=True)
                    x = images if variant == "original" else self.pre(images)
                    self.step(self.main, x, labels.to(dev, non_blocking=True))
                    n += labels.shape[0]
        return n / sw.seconds, n / max(sw.cpu_seconds, 1e-9)


def pipeline_config(args) -> Config:
    """The config train.py would run with: the precision and memory format asked for."""
    precision = "bf16" if args.amp else args.precision
    return harness.load_config(overrides={"dataset.num_workers": args.workers, "model": args.model,
                                  "performance.mixed_precision": precision != "fp32",  # CUDA
                                  "performance.cpu_precision": precision,
                                  "performance.channels_last": args.channels_last})


def timed(trainer: Trainer, loaders: dict, variants: tuple, repeats: int) -> tuple[dict, dict]:
    """(images/s, images per CPU-second) per variant per repeat, after one warm-up epoch each; the order rotates
    every repeat."""
    for v in variants:  # warm-up: workers start, files reach the page cache, kernels get picked
        trainer.epoch(v, loaders[v])
    rates, cpu_rates = {v: [] for v in variants}, {v: [] for v in variants}
    for r in range(repeats):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:  # no variant always goes first
            wall, cpu = trainer.epoch(v, loaders[v])
            rates[v].append(wall)
            cpu_rates[v].append(cpu)
    return rates, cpu_rates


def ratios_to_models(rates: dict, models: list[str], pipelines: tuple, same: str) -> tuple[str, dict]:
    """(best model-alone row, per-repeat ratios of every variant to it and of each pipeline to its own setup)."""
    best = max(models, key=lambda name: harness.spread(rates[name])["median"])
    ratios = {}
    for v in rates:
        ratios[f"{v}/best_model"] = harness.spread([a / b for a, b in zip(rates[v], rates[best])])
        if v in pipelines:
            ratios[f"{v}/same_model"] = harness.spread([a / b for a, b in zip(rates[v], rates[same])])
    return best, ratios


def run(args) -> dict:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads or usable_cpus())
    torch.backends.cudnn.benchmark = True  # as train.py does (performance.benchmark_cudnn)
    n_images = args.batch_size * args.batches
    root = harness.make_jpegs(harness.Path(args.data_dir) / f"train_{args.jpeg_size}px_{n_images}" / "images",
                             n_images, args.jpeg_size)
    cfg = pipeline_config(args)
    loaders = {}
    loaders["toolkit"], loaders["toolkit_workers"], build_s = toolkit_loader(root, args, device, cfg)
    loaders["original"] = original_loader(root, args, device)
    trainer = Trainer(args, device, cfg)
    first = next(iter(loaders["toolkit"]))
    batch = (trainer.pre.eval()(first[0].to(device)).detach(), first[1].to(device))
    trainer.pre.train()
    loaders.update({name: batch for name in trainer.setups}, loop=loaders["toolkit"])
    trainer.loop = trainer.loop_state(cfg, loaders["loop"])
    pipelines = PIPELINES + (EXTRA_VARIANTS if args.with_workers_variant else ())
    rates, cpu_rates = timed(trainer, loaders, pipelines + tuple(trainer.setups), args.repeats)
    best, ratios = ratios_to_models(rates, list(trainer.setups), pipelines, trainer.pipeline_row)
    cpu_best, cpu_ratios = ratios_to_models(cpu_rates, list(trainer.setups), pipelines, trainer.pipeline_row)
    return {"images_per_s": {v: harness.spread(r) for v, r in rates.items()}, "ratios": ratios, "best_model": best,
            "images_per_cpu_s": {v: harness.spread(r) for v, r in cpu_rates.items()}, "cpu_ratios": cpu_ratios,
            "cpu_best_model": cpu_best,
            "pipeline": {"row": trainer.pipeline_row, "precision_reason": trainer.precision.reason},
            "cache_build_s": build_s, "cache_build_images_per_s": n_images / build_s if build_s else None}


def main(args) -> int:
    if args.smoke:
        args.img_size, args.jpeg_size, args.batch_size, args.batches, args.repeats = 32, 64, 2, 2, 1
    results = run(args)
    settings = {k: getattr(args, k) for k in ("device", "model", "img_size", "jpeg_size", "batch_size", "batches",
                                              "repeats", "workers", "precision", "channels_last")}
    settings["threads"] = args.threads or usable_cpus()
    ips, ratio, cpu, cpu_ratio = (results[k] for k in ("images_per_s", "ratios", "images_per_cpu_s", "cpu_ratios"))
    rows = [[v, ips[v]["median"], ips[v]["min"], ips[v]["max"], ratio[f"{v}/best_model"]["median"],
             ratio[f"{v}/same_model"]["median"] if f"{v}/same_model" in ratio else "-",
             cpu[v]["median"], cpu_ratio[f"{v}/best_model"]["median"]] for v in ips]
    pipe = results["pipeline"]
    print(f"pipelines: {pipe['row'].removeprefix('model ')} ({pipe['precision_reason']}); best model-alone row: "
          f"{results['best_model']} (by CPU time: {results['cpu_best_model']})")
    harness.report("bench_training", settings, ["variant", "img/s median", "min", "max", "x best model",
                                                "x same-setup model", "img/CPU-s", "x best (CPU time)"],
                   rows, results, args.device)
    return 0


if __name__ == "__main__":
    main(get_args_parser().parse_args())
