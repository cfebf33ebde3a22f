"""The series rule: slice probabilities -> the series' class, probabilities and key slices, and when to refer.

Aggregation (one rule, `series.top_k`): a class's series score is the mean of its k highest slice probabilities;
the scores, divided by their sum, are the series' probabilities, and the series' class is the highest. The key
slices are the k slices that give the series' class its score. A lesion fills only a run of a series' slices and
the slices without it say little, so a mean over all slices dilutes the lesion's evidence with theirs, while the
single highest slice (k = 1) follows one slice's error; k = 1 and k >= the number of slices are both this rule,
and docs/series.md gives the figures that chose the default.

Refer (a radiologist reads the series first) when any key slice is referred by the slice rule, when the slices
disagree strongly (another class's score reaches `series.disagree_above`: k slices hold firmly for it), when the
series has fewer than `series.min_slices` slices, or when more than `series.unlike_share` of its slices are unlike
the training data.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SeriesRule:
    """The settings of the rule (the config's `series:` section)."""
    top_k: int = 3
    min_slices: int = 8
    disagree_above: float = 0.8
    unlike_share: float = 0.5

    @classmethod
    def from_config(cls, section) -> SeriesRule:
        return cls(int(section.top_k), int(section.min_slices), float(section.disagree_above),
                   float(section.unlike_share))

    @property
    def name(self) -> str:
        return f"mean of the top {self.top_k} slice probabilities per class"


@dataclass(frozen=True)
class SliceCheck:
    """What the slice refer rule said of one slice."""
    refer: bool = False
    reasons: tuple[str, ...] = ()
    unlike: bool | None = None   # unlike the training data (None: not checked)


@dataclass
class SeriesResult:
    predicted_class: str
    class_index: int
    confidence: float
    probabilities: dict[str, float]
    key_slices: list[int]                   # indices into the series' slices, in slice order
    n_slices: int
    rule: str
    refer: bool = False
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"predicted_class": self.predicted_class, "class_index": self.class_index,
                "confidence": self.confidence, "probabilities": dict(self.probabilities),
                "key_slices": list(self.key_slices), "n_slices": self.n_slices, "rule": self.rule,
                "refer": self.refer, "reasons": list(self.reasons)}


def class_scores(probs: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores (K,), top (k, K)): each class's mean of its k highest slice probabilities, and the slice indices
    that give it (highest first)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or not len(probs):
        raise ValueError("a series needs at least one slice's probabilities")
    k = min(int(top_k), len(probs))
    top = np.argsort(-probs, axis=0, kind="stable")[:k]  # (k, K)
    return np.take_along_axis(probs, top, axis=0).mean(axis=0), top


def aggregate(probs, class_names: Sequence[str], rule: SeriesRule) -> SeriesResult:
    """The series' class, probabilities and key slices from its slices' probabilities (n, K), in slice order."""
    scores, top = class_scores(probs, rule.top_k)
    total = float(scores.sum())
    shares = scores / total if total > 0 else np.full(len(scores), 1 / len(scores))
    index = int(np.argmax(shares))
    return SeriesResult(class_names[index], index, float(shares[index]),
                        {c: float(v) for c, v in zip(class_names, shares)}, sorted(int(i) for i in top[:, index]),
                        len(probs), rule.name)


def refer_reasons(result: SeriesResult, probs, checks: Sequence[SliceCheck] | None, rule: SeriesRule) -> list[str]:
    """Why the series must be read first (empty: it need not)."""
    reasons = []
    if result.n_slices < rule.min_slices:
        reasons.append(f"too few slices: {result.n_slices} (a series needs {rule.min_slices}; series.min_slices)")
    scores, _ = class_scores(probs, rule.top_k)
    for name, score in zip(result.probabilities, scores):
        if name != result.predicted_class and score >= rule.disagree_above:
            reasons.append(f"slices disagree: {min(rule.top_k, result.n_slices)} slice(s) hold for {name} "
                           f"with {score:.0%} on average (series.disagree_above {rule.disagree_above:.0%})")
    if checks:
        for i in result.key_slices:
            if checks[i].refer:
                why = "; ".join(checks[i].reasons) or "referred by the slice rule"
                reasons.append(f"key slice {i + 1} of {result.n_slices} referred: {why}")
        checked = [c.unlike for c in checks if c.unlike is not None]
        share = sum(checked) / len(checked) if checked else 0.0
        if checked and share > rule.unlike_share:
            reasons.append(f"unlike the training data: {share:.0%} of the slices (more than "
                           f"{rule.unlike_share:.0%}; series.unlike_share)")
    return reasons


def read_series(probs, class_names: Sequence[str], rule: SeriesRule,
                checks: Sequence[SliceCheck] | None = None) -> SeriesResult:
    """The series result with its refer flag: `probs` (n, K) and `checks` (one per slice) in slice order."""
    if checks is not None and len(checks) != len(probs):
        raise ValueError(f"{len(checks)} slice checks for {len(probs)} slices")
    result = aggregate(probs, class_names, rule)
    result.reasons = refer_reasons(result, probs, checks, rule)
    result.refer = bool(result.reasons)
    return result
