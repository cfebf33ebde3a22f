"""What the answer checks do on the test split and on images from elsewhere, with their intervals:

- the conformal sets' empirical coverage (exact Clopper-Pearson interval) and mean size (bootstrap), per class too;
- the refer rate and the accuracy of what was not referred, and how often each reason fired; the reasons are the
  refer rule's (deploy.refer.ReferRule): top probability under review.refer_below, more than one class in the set,
  out of distribution (feature distance past the model's limit), unlike the training data (intensity distance);
- the out-of-distribution detector against each given set (`evaluate.py --ood DIR`, and the far sets the toolkit
  makes from the test split with --ood-self-check): AUROC of the feature distance, test split against the set, with
  a bootstrap interval, and the share of the set it refers.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from core.conformal import set_members
from evaluation.calibration import apply_temperature, logits_from_probs
from evaluation.series_level import exact_interval
from evaluation.uncertainty import with_interval

# How the self-check's far sets are made from test slices: each keeps something of the phantom and loses the rest.
SELF_CHECK = {
    "permuted": "the slice's own pixels in random places (the same grey-level histogram, no anatomy)",
    "stripes": "the slice's grey levels sorted into bands (the same histogram, a texture no brain has)",
    "inverted": "the slice in negative (the same anatomy, another contrast)",
    "noise": "uniform noise",
    "blank": "one grey level",
}


def proportion(hits: np.ndarray, confidence: float) -> dict:
    """A share with its exact (Clopper-Pearson) interval; None for a share of nothing (e.g. every image referred)."""
    hits = np.asarray(hits, dtype=bool)
    if not hits.size:
        return {"value": None, "ci_low": None, "ci_high": None}
    low, high = exact_interval(int(hits.sum()), int(hits.size), confidence)
    return with_interval(hits.mean(), low, high)


def bootstrap_mean(values: np.ndarray, ev) -> dict:
    """A mean with its percentile bootstrap interval (ev: the config's evaluation section)."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(ev.bootstrap_seed)
    means = values[rng.integers(0, len(values), (ev.bootstrap_samples, len(values)))].mean(axis=1)
    tail = (1 - ev.confidence) / 2 * 100
    return with_interval(values.mean(), *np.percentile(means, [tail, 100 - tail]))


def conformal_report(y_true, y_prob, spec: dict, class_names: list[str], ev) -> dict:
    """Empirical coverage and set size of the conformal sets on a scored split."""
    y_true = np.asarray(y_true)
    member = set_members(np.asarray(y_prob), spec, class_names)
    covered = member[np.arange(len(y_true)), y_true]
    sizes = member.sum(axis=1)
    return {"coverage_target": spec["coverage_target"], "class_conditional": spec["class_conditional"],
            "n": int(len(y_true)), "coverage": proportion(covered, ev.confidence),
            "mean_set_size": bootstrap_mean(sizes, ev), "more_than_one_class": proportion(sizes > 1, ev.confidence),
            "per_class_coverage": {c: proportion(covered[y_true == k], ev.confidence)
                                   for k, c in enumerate(class_names) if (y_true == k).any()}}


def refer_reasons(y_prob, refer_below: float, set_sizes: np.ndarray | None, ood: tuple | None,
                  intensity: tuple | None, temperature: float | None = None) -> dict:
    """Which reason refers which image (booleans per image), keyed by the refer rule's reason codes
    (deploy.refer.ReferRule, which judges one image at a time with the same comparisons); a check the model lacks
    is left out. `ood`, `intensity`: (each image's distance, the limit), or None. `temperature`: the version's
    fitted temperature, which the served rule applies before it compares the top probability with refer_below."""
    y_prob = np.asarray(y_prob)
    if temperature:
        y_prob = apply_temperature(logits_from_probs(y_prob), temperature)
    reasons = {"low_confidence": y_prob.max(axis=1) < refer_below}
    for code, check in (("unlike_training", intensity), ("out_of_distribution", ood)):
        if check is not None and check[0] is not None and check[1] is not None:
            reasons[code] = np.asarray(check[0]) > check[1]
    if set_sizes is not None:
        reasons["prediction_set"] = np.asarray(set_sizes) > 1
    return reasons


def refer_report(y_true, y_prob, reasons: dict, refer_below: float, ev) -> dict:
    """The refer rate, the accuracy of what was not referred, and each reason's rate."""
    referred = np.any(np.stack(list(reasons.values())), axis=0)
    correct = np.asarray(y_prob).argmax(axis=1) == np.asarray(y_true)
    return {"refer_below": refer_below, "rate": proportion(referred, ev.confidence),
            "accuracy_not_referred": proportion(correct[~referred], ev.confidence),
            "accuracy_referred": proportion(correct[referred], ev.confidence),
            "reasons": {name: proportion(hit, ev.confidence) for name, hit in reasons.items()}}


def ood_set_report(inside: np.ndarray, outside: np.ndarray, limit: float | None, ev, description: str = "") -> dict:
    """The detector against one set: AUROC of the distance (test split 0, the set 1) with a bootstrap interval
    (both samples resampled), and the share of the set past the limit."""
    from sklearn.metrics import roc_auc_score

    inside, outside = np.asarray(inside, dtype=np.float64), np.asarray(outside, dtype=np.float64)
    labels = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    auroc = float(roc_auc_score(labels, np.r_[inside, outside]))
    rng = np.random.default_rng(ev.bootstrap_seed)
    boots = [roc_auc_score(labels, np.r_[inside[rng.integers(0, len(inside), len(inside))],
                                         outside[rng.integers(0, len(outside), len(outside))]])
             for _ in range(ev.bootstrap_samples)]
    tail = (1 - ev.confidence) / 2 * 100
    out = {"n": int(len(outside)), "description": description,
           "auroc": with_interval(auroc, *np.percentile(boots, [tail, 100 - tail]))}
    if limit is not None:
        out["referred"] = proportion(outside > limit, ev.confidence)
    return out


def self_check_sets(grays: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Far-from-training images made from 8-bit test slices (N, S, S), one set per kind of SELF_CHECK."""
    rng = np.random.default_rng(seed)
    n, s = grays.shape[0], grays.shape[1]
    flat = grays.reshape(n, -1)
    return {"permuted": np.stack([rng.permutation(f) for f in flat]).reshape(grays.shape),
            "stripes": np.sort(flat, axis=1).reshape(n, s, s).transpose(0, 2, 1).copy(),
            "inverted": 255 - grays,
            "noise": rng.integers(0, 256, grays.shape, dtype=np.uint8),
            "blank": np.repeat(np.median(flat, axis=1).astype(np.uint8)[:, None, None], s * s, axis=1)
                       .reshape(grays.shape)}


@torch.no_grad()
def distances_of(model: Callable, pre, grays: np.ndarray, device, batch: int = 64) -> np.ndarray:
    """The feature distance of 8-bit images (N, S, S) through the answering model (ScoredModel or its ONNX file)."""
    out = []
    for start in range(0, len(grays), batch):
        x = pre(torch.from_numpy(np.ascontiguousarray(grays[start:start + batch]))[:, None].to(device))
        out.append(model(x)[1].float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)
