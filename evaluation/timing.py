"""Inference timing on the device used: latency per image at batch size 1, throughput at the eval batch size."""
from __future__ import annotations

import time

import numpy as np
import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CUDA calls are asynchronous: wait before reading the clock


@torch.no_grad()
def _time_batch(model, preprocess, batch: torch.Tensor, device, warmup: int, runs: int) -> list[float]:
    """Seconds per forward pass (preprocessing included) of one uint8 batch, after warm-up passes."""
    batch = batch.to(device)
    times = []
    for i in range(warmup + runs):
        _sync(device)
        start = time.perf_counter()
        model(preprocess(batch))
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def measure_inference(model, preprocess, dataset, batch_size: int, device, warmup: int = 3, runs: int = 20) -> dict:
    """Mean and p95 ms per image at batch 1; images/s at batch_size (the dataset's first images)."""
    model.eval()
    preprocess.eval()
    single = dataset[0][0].unsqueeze(0)
    latency = np.asarray(_time_batch(model, preprocess, single, device, warmup, runs)) * 1000
    n = min(batch_size, len(dataset))
    batch = torch.stack([dataset[i][0] for i in range(n)])
    per_batch = np.asarray(_time_batch(model, preprocess, batch, device, warmup, max(3, runs // 4)))
    return {"device": str(device), "latency_ms_mean": float(latency.mean()),
            "latency_ms_p95": float(np.percentile(latency, 95)),
            "throughput_images_per_s": float(n / per_batch.mean()), "batch_size": int(n)}
