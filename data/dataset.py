"""Datasets and loaders: uint8 grayscale images in, batches of (uint8 images, labels) out.

Decoding and resizing happen once, in the cache (data/cache.py), or here in worker processes when
the cache is off; everything else runs in the Preprocessor on the model's device.
"""
from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from data.cache import CachedImages, split_cache
from data.images import current_limits, load_gray, set_limits

if TYPE_CHECKING:
    from core.config import Config
    from data.manifest import Split


class GrayImageDataset(Dataset):
    """(image uint8 (1, S, S), label) per manifest row; reads a preprocessed cache when given one."""

    def __init__(self, paths: list[Path], labels: list[int], img_size: int, cache: CachedImages | None = None):
        self.paths, self.labels, self.img_size, self.cache = list(paths), list(labels), img_size, cache
        self.limits = current_limits()  # decoding in a spawned worker keeps this process's image limits

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        set_limits(self.limits)

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


class PrefetchLoader:
    """Batches of a cached dataset, read ahead by a background thread (into pinned memory on CUDA).

    Reading a cached batch is a few positioned reads, which release the GIL: worker processes
    would only add cost. On CUDA the main process is busy launching kernels and receiving and
    pinning batches from workers slows it (measured on an H200: 0.76 -> 0.89 of model-alone
    throughput); on CPU, batches that workers pass through shared memory made the main process
    grow with the data set. Iterates like a DataLoader: (uint8 images (B, 1, S, S), labels), len, .sampler.
    """

    def __init__(self, dataset: GrayImageDataset, batch_sampler: BatchSampler, pin_memory: bool, depth: int):
        self.dataset, self.batch_sampler, self.pin_memory, self.depth = dataset, batch_sampler, pin_memory, depth
        self.sampler = batch_sampler.sampler

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def _read(self, indices: list[int]):
        images = torch.from_numpy(self.dataset.cache.read_rows(indices)).unsqueeze(1)
        labels = torch.as_tensor([self.dataset.labels[i] for i in indices])
        return (images.pin_memory(), labels.pin_memory()) if self.pin_memory else (images, labels)

    def __iter__(self):
        batches, stop = queue.Queue(self.depth), threading.Event()

        def produce():
            try:
                for indices in self.batch_sampler:
                    if stop.is_set():
                        return
                    batches.put(self._read(indices))
                batches.put(None)
            except BaseException as exc:  # handed to the consumer, raised there
                batches.put(exc)

        thread = threading.Thread(target=produce, name="prefetch", daemon=True)
        thread.start()
        try:
            while (item := batches.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # the consumer stopped early: let the producer finish its last put and exit
            stop.set()
            while thread.is_alive():
                try:
                    batches.get(timeout=0.05)
                except queue.Empty:
                    pass


def make_loader(dataset: Dataset, cfg: Config, batch_size: int, sampler=None, drop_last: bool = False,
                device: torch.device | None = None, generator: torch.Generator | None = None):
    """A loader with the settings that fit the device and the data.

    A cached dataset: a prefetch thread (PrefetchLoader). Files decoded on the fly (dataset.cache
    off): a DataLoader whose workers persist across epochs and prefetch. On CUDA, pinned memory so
    that copies with non_blocking=True overlap the step. With a `generator` the order is shuffled by it
    (and it seeds the workers): saved in checkpoints, so that a resumed run sees the same order. A
    `sampler` (balanced, distributed) decides the order itself."""
    shuffle = generator is not None
    workers = cfg.dataset.num_workers
    cuda = device is not None and device.type == "cuda"
    pin = cuda and cfg.dataset.pin_memory
    if getattr(dataset, "cache", None) is not None:
        if sampler is None:
            sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
        return PrefetchLoader(dataset, BatchSampler(sampler, batch_size, drop_last), pin,
                              depth=max(2, cfg.performance.prefetch_factor))
    extra = {}
    if workers > 0:
        extra = {"persistent_workers": cfg.performance.persistent_workers,
                 "prefetch_factor": cfg.performance.prefetch_factor}
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=workers, pin_memory=pin, drop_last=drop_last,
                      generator=generator, **extra)


def build_dataset(cfg: Config, split: Split, split_name: str, img_size: int) -> GrayImageDataset:
    """The dataset every stage reads a split through: from the preprocessed cache when dataset.cache is on."""
    paths, labels = split.samples(split_name)
    cache = split_cache(cfg, split, split_name, img_size) if cfg.dataset.cache else None
    return GrayImageDataset(paths, labels, img_size, cache)
