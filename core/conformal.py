"""Split conformal prediction sets (LAC: least ambiguous set-valued classifier, Sadinle et al., 2019).

On a calibration split the model has not trained on, each image's score is 1 - (probability of its true class).
The threshold q is the ceil((n+1)(1-alpha))/n empirical quantile of those scores; an image's set holds every class
whose probability is at least 1 - q. For a new image exchangeable with the calibration images, the set holds its
true class with probability at least 1 - alpha (marginal coverage). Class-conditional (Mondrian) thresholds, one
per true class, give that guarantee within every class; they are used when every class has enough calibration
images for its quantile to exist (at least 1/alpha - 1), else the marginal threshold is. LAC gives the smallest
mean set size for a given coverage. The top class is always in the set (a set is never empty).
Numpy only: a server needs no torch for it.
"""
from __future__ import annotations

import math

import numpy as np

CONFORMAL_KEY = "conformal"  # the Contract's extra key


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """The split-conformal threshold of nonconformity scores: their ceil((n+1)(1-alpha))-th smallest value
    (1.0, every class, when there are too few scores for that rank)."""
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    rank = math.ceil((len(scores) + 1) * (1 - alpha))
    return 1.0 if rank > len(scores) or rank < 1 else float(scores[rank - 1])


def min_per_class(alpha: float) -> int:
    """Calibration images a class needs for its own threshold to be below 1 (every class)."""
    return math.ceil(1 / alpha - 1)


def fit_conformal(y_true, y_prob, class_names: list[str], alpha: float) -> dict:
    """What is stored with the model: the thresholds (one per class when every class has enough calibration
    images, else one for all) and how they were made."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    scores = 1.0 - y_prob[np.arange(len(y_true)), y_true]
    counts = np.bincount(y_true, minlength=len(class_names))
    per_class = bool(counts.min() >= min_per_class(alpha))
    if per_class:
        thresholds = [conformal_quantile(scores[y_true == k], alpha) for k in range(len(class_names))]
    else:
        thresholds = [conformal_quantile(scores, alpha)] * len(class_names)
    return {"method": "split conformal, LAC (score 1 - p(true class))", "alpha": float(alpha),
            "coverage_target": round(1 - float(alpha), 6), "class_conditional": per_class,
            "thresholds": {name: round(q, 6) for name, q in zip(class_names, thresholds)},
            "calibration": {"split": "val", "n": int(len(y_true)),
                            "per_class": {name: int(c) for name, c in zip(class_names, counts)}}}


def prediction_set(probs, spec: dict, class_names: list[str]) -> list[str]:
    """The classes of one image's set, most probable first (never empty: the top class is always in it)."""
    probs = np.asarray(probs, dtype=np.float64)
    order = np.argsort(-probs, kind="stable")
    q = spec["thresholds"]
    return [class_names[k] for i, k in enumerate(order) if i == 0 or 1.0 - probs[k] <= q[class_names[k]]]


def set_members(y_prob: np.ndarray, spec: dict, class_names: list[str]) -> np.ndarray:
    """(N, C) booleans: which classes are in each image's set."""
    member = np.zeros(y_prob.shape, dtype=bool)
    for i, p in enumerate(y_prob):
        for name in prediction_set(p, spec, class_names):
            member[i, class_names.index(name)] = True
    return member
