"""Normalization statistics of the training split: save, display or verify.

    python compute_normalization.py --mode save      # normalization_stats.json + normalization_constants.py
    python compute_normalization.py --mode display
    python compute_normalization.py --mode verify    # non-zero exit when the saved file is stale or wrong
"""
from __future__ import annotations

import argparse

from core.cli import add_common_args, config_from_args, run
from core.errors import UserError
from data.images import configure_limits
from data.manifest import prepare_split
from data.normalization import compute_stats, load_stats, save_stats

TOLERANCE = 1e-4


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Exact pooled mean/std over the training split (no augmentation)")
    add_common_args(p)
    p.add_argument("--mode", choices=("save", "display", "verify"), default="display")
    p.add_argument("--img-size", type=int, default=None, help="image size (default: the model's, from the config)")
    return p


def verify(saved: dict | None, fresh: dict, path) -> list[str]:
    if saved is None:
        return [f"no saved statistics at {path}; run --mode save first"]
    problems = []
    for key in ("fingerprint", "img_size", "split_manifest"):
        if saved.get(key) != fresh[key]:
            problems.append(f"{key}: saved {saved.get(key)!r}, now {fresh[key]!r}")
    for key in ("mean", "std"):
        diff = max(abs(a - b) for a, b in zip(saved.get(key, [0, 0, 0]), fresh[key]))
        if diff > TOLERANCE:
            problems.append(f"{key}: saved {saved.get(key)}, computed {fresh[key]} (max diff {diff:.2e})")
    return problems


def main(args) -> int:
    cfg = config_from_args(args)
    configure_limits(cfg)  # this run's images: bounds on every decoder
    img_size = args.img_size or cfg.img_size
    print(f"📊 Dataset path: {cfg.dataset.path}")
    print(f"🖼️  Image size: {img_size} | 🎲 Seed: {cfg.dataset.seed}")
    split = prepare_split(cfg, args.resplit)
    sizes = split.sizes()
    print(f"📈 Dataset sizes: Training {sizes['train']} | Validation {sizes['val']} | Test {sizes['test']}")
    stats = compute_stats(cfg, split, img_size)
    print(f"📊 Training set mean: {stats['mean']}")
    print(f"📊 Training set std: {stats['std']}")
    if args.mode == "save":
        json_path, py_path = save_stats(stats, cfg.dataset.stats_path)
        print(f"💾 Statistics saved to: {json_path}")
        print(f"🐍 Python constants saved to: {py_path}")
    elif args.mode == "verify":
        problems = verify(load_stats(cfg.dataset.stats_path), stats, cfg.dataset.stats_path)
        if problems:
            raise UserError(f"saved statistics do not match: {'; '.join(problems)}")
        print("✅ Statistics match! Pre-computed values are correct.")
    return 0


if __name__ == "__main__":
    run(main, get_args_parser())
