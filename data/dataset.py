"""Datasets and loaders: uint8 grayscale images in, batches of (uint8 images, labels) out.

Decoding and resizing happen here (in worker processes); everything else runs in the
Preprocessor on the model's device.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data.cache import CachedImages, split_cache
from data.images import load_gray


class GrayImageDataset(Dataset):
    """(image uint8 (1, S, S), label) per manifest row; reads a preprocessed cache when given one."""

    def __init__(self, paths: list[Path], labels: list[int], img_size: int, cache: CachedImages | None = None):
        self.paths, self.labels, self.img_size, self.cache = list(paths), list(labels), img_size, cache

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> np.ndarray:
        if self.cache is not None:
            return np.asarray(self.cache[i])
        return load_gray(self.paths[i], self.img_size)

    def __getitem__(self, i: int):
        return torch.from_numpy(self.read(i)).unsqueeze(0), self.labels[i]

    def __getitems__(self, indices: list[int]) -> list:
        """A whole batch from the cache in as few reads as possible (the DataLoader calls this)."""
        if self.cache is None:
            return [self[i] for i in indices]
        images = torch.from_numpy(self.cache.read_rows(indices)).unsqueeze(1)
        return [(images[k], self.labels[i]) for k, i in enumerate(indices)]


def make_loader(dataset: Dataset, cfg, batch_size: int, shuffle: bool = False, sampler=None,
                drop_last: bool = False, device: torch.device | None = None,
                generator: torch.Generator | None = None) -> DataLoader:
    """A DataLoader with the settings that fit the device (pinned memory and prefetch on CUDA).

    `generator` drives the shuffle order and worker seeds (saved in checkpoints so a resumed run
    sees the same order)."""
    workers = cfg.dataset.num_workers
    cuda = device is not None and device.type == "cuda"
    extra = {}
    if workers > 0:
        extra = {"persistent_workers": cfg.performance.persistent_workers,
                 "prefetch_factor": cfg.performance.prefetch_factor}
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=workers, pin_memory=cuda and cfg.dataset.pin_memory, drop_last=drop_last,
                      generator=generator, **extra)


def build_dataset(cfg, split, split_name: str, img_size: int) -> GrayImageDataset:
    """The dataset every stage reads a split through: from the preprocessed cache when dataset.cache is on."""
    paths, labels = split.samples(split_name)
    cache = split_cache(cfg, split, split_name, img_size) if cfg.dataset.cache else None
    return GrayImageDataset(paths, labels, img_size, cache)
