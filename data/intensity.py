"""How unlike the training data an 8-bit slice is: the distance of its intensity histogram from the training
split's.

The training split's 256-bin histogram (counted while its cache is built, data/cache.py) is stored with the
model at training time (the Contract's `extra`, so it travels into the checkpoint, the ONNX metadata and the
registry), together with the distances of the validation slices to it. A slice farther away than nearly every
validation slice (default: their 99th percentile) is unlike what the model learned from. The distance is the
Wasserstein-1 (earth mover's) distance between the two intensity distributions, in fractions of the 0-255 range:
how far, on average, the slice's grey levels would have to move to look like the training split's (0: the same,
1: black against white). Unlike a bin-by-bin divergence it is not inflated by the sparse histogram of a single
slice: on the demo data set it refers uniform noise, a gradient, a checkerboard, an inverted, a dimmed and a
brightened slice, while 1.1% of the test slices pass the validation slices' 99th percentile.
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


def histogram_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Wasserstein-1 distance between two 256-bin intensity histograms (counts or probabilities), in fractions
    of the 0-255 range: the area between their cumulative distributions."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    return float(np.abs(np.cumsum(p / p.sum()) - np.cumsum(q / q.sum()))[:-1].sum() / 255)


def make_reference(train_histogram: np.ndarray, validation: Iterable[np.ndarray], img_size: int) -> dict:
    """What is stored with the model: the training split's histogram at the model's size and the percentiles
    of the validation slices' distances to it (None without validation slices)."""
    hist = np.asarray(train_histogram, dtype=np.int64)
    distances = np.array([histogram_distance(intensity_histogram(g), hist) for g in validation])
    spread = None
    if distances.size:
        spread = {"n": int(distances.size),
                  **{k: round(float(np.percentile(distances, q)), 6) for k, q in QUANTILES.items()}}
    return {"histogram": hist.tolist(), "img_size": int(img_size), "pixels": int(hist.sum()),
            "distance": "wasserstein-1 (fraction of the 0-255 range)", "validation_distances": spread}


def distance_to(reference: dict, gray: np.ndarray) -> float:
    """Distance of one slice (at the model's size) from the training split's histogram."""
    return histogram_distance(intensity_histogram(gray), np.asarray(reference["histogram"], dtype=np.float64))


def reference_limit(reference: dict | None, configured: float | None = None) -> float | None:
    """The distance above which a slice is referred: the configured one, else the model's own (the 99th
    percentile of its validation slices); None when there is neither."""
    if configured is not None:
        return float(configured)
    spread = (reference or {}).get("validation_distances")
    return None if not spread else float(spread[DEFAULT_LIMIT])
