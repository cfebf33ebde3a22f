"""Bootstrap confidence intervals: stratified resampling of the test set, vectorised with numpy.

Each resample keeps every class's test count (resampling within each class, with replacement), so
per-class sensitivity is always defined. All resamples are scored at once from their confusion
matrices; the point estimates themselves come from scikit-learn (evaluation/metrics.py).
"""
from __future__ import annotations

import numpy as np


def stratified_indices(y_true: np.ndarray, n_samples: int, seed: int) -> np.ndarray:
    """(n_samples, n) indices into y_true; each row draws each class's items from that class only."""
    rng = np.random.default_rng(seed)
    y_true = np.asarray(y_true)
    blocks = []
    for k in np.unique(y_true):
        members = np.flatnonzero(y_true == k)
        blocks.append(members[rng.integers(0, len(members), size=(n_samples, len(members)))])
    return np.concatenate(blocks, axis=1) if blocks else np.zeros((n_samples, 0), dtype=np.int64)


def confusion_matrices(y_true: np.ndarray, y_pred: np.ndarray, idx: np.ndarray, n_classes: int) -> np.ndarray:
    """(B, K, K) confusion matrices (rows: true) of the B resamples in idx, with one bincount."""
    b = idx.shape[0]
    cell = np.asarray(y_true)[idx] * n_classes + np.asarray(y_pred)[idx]  # (B, n)
    flat = cell + (np.arange(b) * n_classes * n_classes)[:, None]
    return np.bincount(flat.ravel(), minlength=b * n_classes * n_classes).reshape(b, n_classes, n_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def metrics_from_confusion(cms: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy, macro F1 (B,) and per-class sensitivity, specificity (B, K).

    Same definitions as scikit-learn with zero_division=0 (tests check they agree).
    """
    cms = cms.astype(np.float64)
    tp = np.diagonal(cms, axis1=1, axis2=2)
    actual, predicted = cms.sum(axis=2), cms.sum(axis=1)
    n = cms.sum(axis=(1, 2))[:, None]
    sensitivity = _ratio(tp, actual)
    present = actual > 0  # balanced accuracy averages the classes present (as sklearn does)
    return {
        "accuracy": _ratio(tp.sum(axis=1), n[:, 0]),
        "balanced_accuracy": _ratio((sensitivity * present).sum(axis=1), present.sum(axis=1)),
        "macro_f1": _ratio(2 * tp, actual + predicted).mean(axis=1),
        "sensitivity": sensitivity,
        "specificity": _ratio(n - actual - predicted + tp, n - actual),
    }


def bootstrap_intervals(y_true, y_pred, n_classes: int, n_samples: int = 1000, confidence: float = 0.95,
                        seed: int = 0) -> dict[str, np.ndarray]:
    """Percentile intervals: {metric: array (2,) or (2, K)} with rows (low, high)."""
    if n_samples < 1 or len(y_true) == 0:
        raise ValueError("bootstrap needs at least one resample and one test item")
    idx = stratified_indices(y_true, n_samples, seed)
    stats = metrics_from_confusion(confusion_matrices(y_true, y_pred, idx, n_classes))
    tail = (1 - confidence) / 2 * 100
    return {name: np.percentile(values, [tail, 100 - tail], axis=0) for name, values in stats.items()}


def with_interval(value: float, low: float, high: float) -> dict:
    return {"value": float(value), "ci_low": float(low), "ci_high": float(high)}
