"""The refer rule: when the page says "refer" instead of pushing a class.

The prediction record's own checks (deploy.predictors.answer_checks, the same in every entry point) refer a slice
whose features (a middle stage and the classifier's input) lie past the model's out-of-distribution limit, and one
whose conformal prediction set holds more than one class. Besides, either the top probability is under
`review.refer_below` (the calibrated one when the registered version's evaluation fitted a temperature, as the page
shows it), or the slice is unlike the training data: its intensity histogram lies farther from the training split's than
`review.drift_limit` (default: the model's own limit, the 99th percentile of its validation slices' distances,
stored with the model at training time). A model trained without that reference says so, and is never guessed at.

`ReferRule` is also the DICOM receiver's `refer(record, gray) -> bool` (pacs.pipeline.Refer).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from data.intensity import REFERENCE_KEY, distance_to, reference_limit
from deploy.predictors import softmax

NO_REFERENCE = ("this model was trained without an intensity reference of its training data: the check for "
                "slices unlike the training data is off (retrain to turn it on)")


@dataclass
class Assessment:
    probabilities: dict[str, float]  # as shown: calibrated when `temperature` is set
    temperature: float | None
    refer: bool
    reasons: list[str] = field(default_factory=list)
    distance: float | None = None
    limit: float | None = None
    note: str | None = None          # what the check could not do (no reference)

    @property
    def predicted_class(self) -> str:
        return max(self.probabilities, key=self.probabilities.get)

    @property
    def confidence(self) -> float:
        return max(self.probabilities.values())


def calibrated(probabilities: dict[str, float], temperature: float | None) -> dict[str, float]:
    """softmax(log p / T): the model's probabilities after temperature scaling (the same order of classes)."""
    if not temperature:
        return dict(probabilities)
    names = list(probabilities)
    logp = np.log(np.clip(np.array([probabilities[n] for n in names], dtype=np.float64), 1e-30, None))
    return {n: float(v) for n, v in zip(names, softmax(logp[None] / temperature)[0])}


def temperature_of(evaluation: dict | None) -> float | None:
    """The temperature evaluate.py --calibrate fitted for the version (evaluation_metrics.json), or None."""
    value = ((evaluation or {}).get("calibration") or {}).get("temperature")
    return float(value) if value else None


OOD_REASON = "out of distribution"  # how a reason from the feature-space check begins (the monitoring panel counts it)


def record_reasons(record: dict) -> list[str]:
    """The reasons a prediction record's own checks give (out of distribution, more than one class in the set)."""
    reasons = []
    if record.get("out_of_distribution"):
        reasons.append(f"{OOD_REASON}: unlike the images the model learned from (feature distance "
                       f"{record['ood_distance']:.1f}, limit {record['ood_limit']:.1f})")
    plausible = record.get("prediction_set") or []
    if len(plausible) > 1:
        reasons.append(f"more than one class is plausible: {' or '.join(plausible)} (the conformal prediction set)")
    return reasons


@dataclass(frozen=True)
class ReferRule:
    threshold: float
    temperature: float | None = None
    reference: dict | None = None
    limit: float | None = None

    @classmethod
    def for_model(cls, contract: dict, evaluation: dict | None, threshold: float,
                  drift_limit: float | None = None) -> ReferRule:
        """The rule for one model version: its contract (as a dict, e.g. Contract.to_dict() or an API answer's)
        and its evaluation figures (for the temperature)."""
        reference = contract.get(REFERENCE_KEY)
        return cls(threshold, temperature_of(evaluation), reference, reference_limit(reference, drift_limit))

    def assess(self, record: dict, gray: np.ndarray | None) -> Assessment:
        """Judge one prediction record (its `probabilities`) and the slice as the model saw it (uint8 S x S)."""
        shown = calibrated(record["probabilities"], self.temperature)
        out = Assessment(shown, self.temperature, False)
        if out.confidence < self.threshold:
            out.reasons.append(f"top probability {out.confidence:.0%} is under the {self.threshold:.0%} threshold")
        out.reasons += record_reasons(record)
        if self.reference is None:
            out.note = NO_REFERENCE
        elif gray is not None:
            out.distance, out.limit = distance_to(self.reference, gray), self.limit
            if out.limit is None:
                out.note = "no limit for the intensity distance (set review.drift_limit)"
            elif out.distance > out.limit:
                out.reasons.append(f"unlike the training data: intensity distance {out.distance:.3f} is above the "
                                   f"limit {out.limit:.3f}")
        out.refer = bool(out.reasons)
        return out

    def __call__(self, record: dict, gray: np.ndarray) -> bool:
        return self.assess(record, gray).refer
