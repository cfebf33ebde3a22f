"""The refer rule: when a prediction goes to a radiologist first instead of pushing a class.

Every door of the server judges its predictions with it (the API, the review page, the DICOM receiver's report,
the worklist, archive scoring). Four checks are built in:
- the top probability is under the threshold (the calibrated one when the version's evaluation fitted a
  temperature, as the page shows it);
- the slice is unlike the training data in intensity (its histogram lies farther from the training split's than
  the limit: by default the model's own, the 99th percentile of its validation slices' distances);
- the slice is out of distribution in the model's feature space (the record's `out_of_distribution`, from the
  distance the model computes beside its answer and the limit fitted on the validation split);
- more than one class is plausible (the record's conformal `prediction_set` holds more than one class).
A model trained without a reference or a fitted check says so, and is never guessed at.

More checks plug in without touching the doors: a `ReferCheck` looks at what the model saw (`Seen`) and returns
a `Finding` (a `Reason` to refer, or none, and what it measured); `ReferRule(..., extra=(check, ...))`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from data.intensity import REFERENCE_KEY, distance_to, reference_limit
from deploy.predictors import ANSWER_CHECKS, softmax

OUT_OF_DISTRIBUTION = "out_of_distribution"  # the feature-space check's reason code (the monitoring panel counts it)
NO_FEATURE_CHECK = ("this model has no fitted out-of-distribution limit: the feature-space check is off "
                    "(retrain, or python evaluate.py --fit-checks)")
NO_PREDICTION_SET = ("this model has no conformal prediction sets: the plausible-classes check is off "
                     "(retrain, or python evaluate.py --fit-checks)")
NO_REFERENCE = ("this model was trained without an intensity reference of its training data: the check for "
                "slices unlike the training data is off (retrain to turn it on)")


@dataclass(frozen=True)
class Reason:
    """Why a prediction is referred: a stable code (for counting and filtering) and a sentence for a person."""
    code: str
    text: str


@dataclass(frozen=True)
class Seen:
    """What a check may look at: the probabilities as shown (calibrated when the rule has a temperature), the
    slice as the model saw it (uint8 S x S; None when the caller has no pixels) and the prediction record's own
    answer checks (deploy.predictors.answer_checks: absent for a model trained before them)."""
    probabilities: dict[str, float]
    gray: np.ndarray | None
    answer: dict = field(default_factory=dict)

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

    @property
    def reason_texts(self) -> list[str]:
        """The reasons in words: a record's `refer_reasons`."""
        return [r.text for r in self.reasons]

    def explained(self) -> dict:
        """The reasons and notes as stored with a worklist item (and shown on the page)."""
        return {"reasons": self.reason_texts, "codes": [r.code for r in self.reasons], "note": self.note}


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


def feature_check(seen: Seen) -> Finding:
    distance, limit = seen.answer.get("ood_distance"), seen.answer.get("ood_limit")
    measured = {"ood_distance": distance, "ood_limit": limit}
    if distance is None or limit is None:
        return Finding(note=NO_FEATURE_CHECK)
    if seen.answer.get("out_of_distribution"):
        text = f"out of distribution: unlike the images the model learned from (feature distance {distance:.1f}, " \
               f"limit {limit:.1f})"
        return Finding(Reason(OUT_OF_DISTRIBUTION, text), measured=measured)
    return Finding(measured=measured)


def set_check(seen: Seen) -> Finding:
    plausible = seen.answer.get("prediction_set")
    if plausible is None:
        return Finding(note=NO_PREDICTION_SET)
    if len(plausible) > 1:
        return Finding(Reason("prediction_set", f"more than one class is plausible: {' or '.join(plausible)} (the "
                                                "conformal prediction set)"))
    return Finding()


@dataclass(frozen=True)
class ReferRule:
    threshold: float
    temperature: float | None = None
    reference: dict | None = None
    limit: float | None = None
    extra: tuple[ReferCheck, ...] = ()  # further checks, after the built-in four

    @classmethod
    def for_model(cls, contract: dict, evaluation: dict | None, threshold: float,
                  drift_limit: float | None = None, extra: tuple[ReferCheck, ...] = ()) -> ReferRule:
        """The rule for one model version: its contract (as a dict, e.g. Contract.to_dict()) and its evaluation
        figures (for the temperature)."""
        reference = contract.get(REFERENCE_KEY)
        return cls(threshold, temperature_of(evaluation), reference, reference_limit(reference, drift_limit), extra)

    @classmethod
    def for_version(cls, contract: dict, evaluation: dict | None, review) -> ReferRule:
        """The rule every door uses for one version: `review` is the config's review section (refer_below,
        drift_limit)."""
        return cls.for_model(contract, evaluation, review.refer_below, review.drift_limit)

    def checks(self) -> tuple[ReferCheck, ...]:
        return (threshold_check(self.threshold), intensity_check(self.reference, self.limit), feature_check,
                set_check, *self.extra)

    def assess(self, record: dict, gray: np.ndarray | None) -> Assessment:
        """Judge one prediction record (its `probabilities` and answer checks) and the slice as the model saw it
        (uint8 S x S, or None)."""
        seen = Seen(calibrated(record["probabilities"], self.temperature), gray,
                    {k: record[k] for k in ANSWER_CHECKS if k in record})
        out = Assessment(seen.probabilities, self.temperature, False)
        for finding in (check(seen) for check in self.checks()):
            out.reasons += [finding.reason] if finding.reason else []
            out.notes += [finding.note] if finding.note else []
            out.measured.update(finding.measured)
        out.refer = bool(out.reasons)
        return out


def judged_records(predictor, rule: ReferRule, inputs: list) -> list[dict]:
    """A file's images as decoded (deploy.predictors.Predictor.decode) predicted and judged by the refer rule: each
    record with `refer` and `refer_reasons`."""
    out = predictor.infer(np.concatenate([i.x for i in inputs]))
    records = []
    for k, i in enumerate(inputs):
        record = predictor.record(i.name, out, k)
        verdict = rule.assess(record, i.gray)
        records.append({**record, "refer": verdict.refer, "refer_reasons": verdict.reason_texts})
    return records
