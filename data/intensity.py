"""How unlike the training data an 8-bit slice is: the distance of its intensity histogram from the training
split's.

The training split's 256-bin histogram (counted while its cache is built, data/cache.py) is stored with the
model at training time (the Contract's `extra`, so it travels into the checkpoint, the ONNX metadata and the
registry), together with the distances of the validation slices to it. A slice farther away than nearly every
validation slice (default: their 99th percentile) is unlike what the model learned from. The distance is the
Jensen-Shannon distance (base 2: 0 for the same histogram, 1 for histograms with no intensity in common).
Numpy only: a server needs no torch for it.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

REFERENCE_KEY = "intensity_reference"  # the Contract's extra key
QUANTILES = {"p50": 50, "p90": 90, "p95": 95, "p99": 99, "max": 100}
DEFAULT_LIMIT = "p99"  # the validation slices' percentile a slice must exceed to be called unlike them


def intensity_histogram(gray: np.ndarray) -> np.ndarray:
    """256-bin counts of an 8-bit image (any shape)."""
    return np.bincount(np.asarray(gray, dtype=np.uint8).ravel(), minlength=256)


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) between two histograms (counts or probabilities)."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return float(np.sqrt(max(0.0, (kl(p) + kl(q)) / 2)))


def make_reference(train_histogram: np.ndarray, validation: Iterable[np.ndarray], img_size: int) -> dict:
    """What is stored with the model: the training split's histogram at the model's size and the percentiles
    of the validation slices' distances to it (None without validation slices)."""
    hist = np.asarray(train_histogram, dtype=np.int64)
    distances = np.array([js_distance(intensity_histogram(g), hist) for g in validation])
    spread = None
    if distances.size:
        spread = {"n": int(distances.size),
                  **{k: round(float(np.percentile(distances, q)), 6) for k, q in QUANTILES.items()}}
    return {"histogram": hist.tolist(), "img_size": int(img_size), "pixels": int(hist.sum()),
            "distance": "jensen-shannon (base 2)", "validation_distances": spread}


def distance_to(reference: dict, gray: np.ndarray) -> float:
    """Distance of one slice (at the model's size) from the training split's histogram."""
    return js_distance(intensity_histogram(gray), np.asarray(reference["histogram"], dtype=np.float64))


def reference_limit(reference: dict | None, configured: float | None = None) -> float | None:
    """The distance above which a slice is referred: the configured one, else the model's own (the 99th
    percentile of its validation slices); None when there is neither."""
    if configured is not None:
        return float(configured)
    spread = (reference or {}).get("validation_distances")
    return None if not spread else float(spread[DEFAULT_LIMIT])
