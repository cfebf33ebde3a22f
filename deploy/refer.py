"""The refer rule: when a prediction goes to a radiologist first instead of pushing a class.

Every door of the server judges its predictions with it (the review page, the DICOM receiver's report, the
worklist). Two checks are built in: the top probability is under the threshold (the calibrated one when the
version's evaluation fitted a temperature, as the page shows it), or the slice is unlike the training data (its
intensity histogram lies farther from the training split's than the limit: by default the model's own, the 99th
percentile of its validation slices' distances, stored with the model at training time). A model trained
without that reference says so, and is never guessed at.

More checks plug in without touching the doors: a `ReferCheck` looks at what the model saw (`Seen`) and returns
a `Finding` (a `Reason` to refer, or none, and what it measured); `ReferRule(..., extra=(check, ...))`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from data.intensity import REFERENCE_KEY, distance_to, reference_limit
from deploy.predictors import softmax

NO_REFERENCE = ("this model was trained without an intensity reference of its training data: the check for "
                "slices unlike the training data is off (retrain to turn it on)")


@dataclass(frozen=True)
class Reason:
    """Why a prediction is referred: a stable code (for counting and filtering) and a sentence for a person."""
    code: str
    text: str


@dataclass(frozen=True)
class Seen:
    """What a check may look at: the probabilities as shown (calibrated when the rule has a temperature) and the
    slice as the model saw it (uint8 S x S; None when the caller has no pixels)."""
    probabilities: dict[str, float]
    gray: np.ndarray | None

    @property
    def confidence(self) -> float:
        return max(self.probabilities.values())


@dataclass(frozen=True)
class Finding:
    """One check's result: a reason to refer (or None), what it could not do, and what it measured."""
    reason: Reason | None = None
    note: str | None = None
    measured: dict[str, float | None] = field(default_factory=dict)


ReferCheck = Callable[[Seen], Finding]


@dataclass
class Assessment:
    probabilities: dict[str, float]  # as shown: calibrated when `temperature` is set
    temperature: float | None
    refer: bool
    reasons: list[Reason] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what a check could not do (e.g. no intensity reference)
    measured: dict[str, float | None] = field(default_factory=dict)

    @property
    def predicted_class(self) -> str:
        return max(self.probabilities, key=self.probabilities.get)

    @property
    def confidence(self) -> float:
        return max(self.probabilities.values())

    @property
    def distance(self) -> float | None:
        return self.measured.get("drift_distance")

    @property
    def limit(self) -> float | None:
        return self.measured.get("drift_limit")

    @property
    def note(self) -> str | None:
        return "; ".join(self.notes) or None

    def explained(self) -> dict:
        """The reasons and notes as stored with a worklist item (and shown on the page)."""
        return {"reasons": [r.text for r in self.reasons], "codes": [r.code for r in self.reasons],
                "note": self.note}


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


def threshold_check(threshold: float) -> ReferCheck:
    def check(seen: Seen) -> Finding:
        if seen.confidence < threshold:
            return Finding(Reason("low_confidence", f"top probability {seen.confidence:.0%} is under the "
                                                    f"{threshold:.0%} threshold"))
        return Finding()
    return check


def intensity_check(reference: dict | None, limit: float | None) -> ReferCheck:
    def check(seen: Seen) -> Finding:
        if reference is None:
            return Finding(note=NO_REFERENCE)
        if seen.gray is None:
            return Finding()
        distance = distance_to(reference, seen.gray)
        measured = {"drift_distance": distance, "drift_limit": limit}
        if limit is None:
            return Finding(note="no limit for the intensity distance (set review.drift_limit)", measured=measured)
        if distance > limit:
            return Finding(Reason("unlike_training", f"unlike the training data: intensity distance {distance:.3f} "
                                                     f"is above the limit {limit:.3f}"), measured=measured)
        return Finding(measured=measured)
    return check


@dataclass(frozen=True)
class ReferRule:
    threshold: float
    temperature: float | None = None
    reference: dict | None = None
    limit: float | None = None
    extra: tuple[ReferCheck, ...] = ()  # further checks (e.g. out-of-distribution scores), after the built-in two

    @classmethod
    def for_model(cls, contract: dict, evaluation: dict | None, threshold: float,
                  drift_limit: float | None = None, extra: tuple[ReferCheck, ...] = ()) -> ReferRule:
        """The rule for one model version: its contract (as a dict, e.g. Contract.to_dict()) and its evaluation
        figures (for the temperature)."""
        reference = contract.get(REFERENCE_KEY)
        return cls(threshold, temperature_of(evaluation), reference, reference_limit(reference, drift_limit), extra)

    def checks(self) -> tuple[ReferCheck, ...]:
        return (threshold_check(self.threshold), intensity_check(self.reference, self.limit), *self.extra)

    def assess(self, probabilities: dict[str, float], gray: np.ndarray | None) -> Assessment:
        """Judge one prediction's probabilities and the slice as the model saw it (uint8 S x S, or None)."""
        seen = Seen(calibrated(probabilities, self.temperature), gray)
        out = Assessment(seen.probabilities, self.temperature, False)
        for finding in (check(seen) for check in self.checks()):
            out.reasons += [finding.reason] if finding.reason else []
            out.notes += [finding.note] if finding.note else []
            out.measured.update(finding.measured)
        out.refer = bool(out.reasons)
        return out
