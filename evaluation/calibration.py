"""Calibration: expected calibration error, reliability bins, temperature scaling."""
from __future__ import annotations

import numpy as np
import torch


def reliability_bins(y_true, y_prob, n_bins: int = 15) -> dict:
    """Top-label confidence vs accuracy in equal-width bins: edges, per-bin count, confidence, accuracy."""
    y_true, y_prob = np.asarray(y_true), np.asarray(y_prob, dtype=np.float64)
    confidence = y_prob.max(axis=1)
    correct = (y_prob.argmax(axis=1) == y_true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bins are (lo, hi]; a confidence of exactly 0 falls in the first bin
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    conf_sum = np.bincount(which, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(which, weights=correct, minlength=n_bins)
    safe = np.maximum(count, 1)
    return {"edges": edges.tolist(), "count": count.tolist(),
            "confidence": np.where(count > 0, conf_sum / safe, np.nan).tolist(),
            "accuracy": np.where(count > 0, acc_sum / safe, np.nan).tolist()}


def expected_calibration_error(y_true, y_prob, n_bins: int = 15) -> float:
    """ECE: the count-weighted mean |accuracy - confidence| over the reliability bins."""
    bins = reliability_bins(y_true, y_prob, n_bins)
    count = np.asarray(bins["count"], dtype=np.float64)
    if count.sum() == 0:
        return 0.0
    gap = np.abs(np.nan_to_num(np.asarray(bins["accuracy"])) - np.nan_to_num(np.asarray(bins["confidence"])))
    return float((count * gap).sum() / count.sum())


def logits_from_probs(y_prob) -> np.ndarray:
    """Log-probabilities: logits up to a per-row constant, which softmax ignores."""
    return np.log(np.clip(np.asarray(y_prob, dtype=np.float64), 1e-30, None))


MAX_TEMPERATURE = 100.0  # a near-chance model's best T runs off to infinity (uniform output): stop there


def fit_temperature(logits, y_true, max_iter: int = 200) -> float:
    """The temperature T in [1/MAX, MAX] minimising the NLL of softmax(logits / T) (LBFGS on log T)."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(y_true), dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)  # log T keeps T positive
    bound = float(np.log(MAX_TEMPERATURE))
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.clamp(-bound, bound).exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().clamp(-bound, bound).exp())


def apply_temperature(logits, temperature: float) -> np.ndarray:
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64) / temperature
    return torch.softmax(z, dim=1).numpy()
