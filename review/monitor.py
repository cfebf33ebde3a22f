"""The monitoring panel: the most recent worklist predictions and verdicts against the test split of the
registered version (evaluation_metrics.json: accuracy with its interval, and `monitoring_reference`, the test
split's predicted classes, top probabilities and intensity distances).

Five figures, each with its limit in `review.monitor`: the predicted-class shares, the mean top probability,
the refer rate (the same rule on the test split's figures), the out-of-distribution rate (feature distance past the
model's limit) and the reviewers' agreement rate (against the test accuracy). A figure is judged only once
`min_samples` recent ones exist, and a reference the version lacks is said to be missing, never made up.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Engine, select

from core.config import MonitorLimits
from deploy.refer import OUT_OF_DISTRIBUTION, ReferRule
from review.schema import items, verdicts, withdrawn

NO_CLASS_TRUTH = ("refer_confirmed", "non_diagnostic")  # verdicts that neither agree nor disagree with a class


@dataclass
class Check:
    name: str
    recent: str          # the recent figure, said
    reference: str       # the test split's, said
    n: int
    status: str          # ok | warn | too few | no reference
    detail: str = ""


def recent_items(engine: Engine, window: int) -> list[dict]:
    with engine.connect() as conn:
        rows = conn.execute(select(items.c.predicted_class, items.c.confidence, items.c.refer, items.c.created_at,
                                   items.c.probabilities_json, items.c.reasons_json)
                            .order_by(items.c.created_at.desc()).limit(window)).mappings().all()
    return [dict(r) for r in rows]


def recent_verdicts(engine: Engine, window: int) -> list[bool]:
    """Whether each of the latest `window` verdicts agreed with the model (a prediction's current verdict only; an
    undone verdict does not count, and a confirmed referral or a non-diagnostic image says nothing about a class)."""
    with engine.connect() as conn:
        rows = conn.execute(select(verdicts.c.prediction_id, verdicts.c.agrees, verdicts.c.finding)
                            .where(verdicts.c.id.not_in(select(withdrawn.c.verdict_id)))
                            .order_by(verdicts.c.id.desc()).limit(window * 4)).all()
    seen, out = set(), []
    for pid, agrees, finding in rows:
        if pid not in seen:
            seen.add(pid)
            if finding not in NO_CLASS_TRUTH:
                out.append(bool(agrees))
    return out[:window]


def _points(gap: float, worse: str, better: str, limit: float) -> str:
    """A gap between two rates in percentage points, said in words, with its limit."""
    return f"{abs(gap) * 100:.1f} points {worse if gap > 0 else better} (limit {limit * 100:g})"


def _judge(n: int, limits: MonitorLimits, gap: float, limit: float) -> str:
    if n < limits.min_samples:
        return "too few"
    return "warn" if gap > limit else "ok"


def predicted_share(evaluation: dict | None) -> dict[str, float] | None:
    """The test split's share of each predicted class: recorded, or the confusion matrix's column sums."""
    ev = evaluation or {}
    if (ev.get("monitoring_reference") or {}).get("predicted_share"):
        return ev["monitoring_reference"]["predicted_share"]
    matrix, names = ev.get("confusion_matrix"), ev.get("class_names")
    if not matrix or not names:
        return None
    cols = np.asarray(matrix, dtype=np.float64).sum(axis=0)
    return {c: float(v / max(cols.sum(), 1)) for c, v in zip(names, cols)}


def class_check(recent: list[dict], ref: dict[str, float] | None, limits: MonitorLimits) -> Check:
    n = len(recent)
    classes = list(json.loads(recent[0]["probabilities_json"])) if recent else list(ref or {})
    share = {c: sum(r["predicted_class"] == c for r in recent) / n if n else 0.0 for c in classes}
    said = ", ".join(f"{c} {v:.0%}" for c, v in share.items()) if n else "none yet"
    if not ref:
        return Check("Predicted classes", said, "not recorded", n, "no reference")
    gaps = {c: share.get(c, 0.0) - ref.get(c, 0.0) for c in ref}
    worst = max(gaps, key=lambda c: abs(gaps[c]))
    return Check("Predicted classes", said, ", ".join(f"{c} {v:.0%}" for c, v in ref.items()), n,
                 _judge(n, limits, abs(gaps[worst]), limits.class_share),
                 f"largest difference: {worst}, " + _points(gaps[worst], "more", "fewer", limits.class_share)
                 if n else "")


def confidence_check(recent: list[dict], ref_conf: list[float] | None, limits: MonitorLimits) -> Check:
    n = len(recent)
    mean = float(np.mean([r["confidence"] for r in recent])) if n else float("nan")
    said = f"mean {mean:.1%}" if n else "none yet"
    if not ref_conf:
        return Check("Top probability", said, "not recorded", n, "no reference")
    ref_mean = float(np.mean(ref_conf))
    return Check("Top probability", said, f"mean {ref_mean:.1%}", n,
                 _judge(n, limits, ref_mean - mean if n else 0.0, limits.confidence_drop),
                 _points(ref_mean - mean, "lower", "higher", limits.confidence_drop) if n else "")


def refer_check(recent: list[dict], ref: dict | None, rule: ReferRule, limits: MonitorLimits) -> Check:
    n = len(recent)
    rate = sum(bool(r["refer"]) for r in recent) / n if n else 0.0
    conf = _reference_confidences(ref, rule)
    if not conf:
        return Check("Refer rate", f"{rate:.0%}" if n else "none yet", "not recorded", n, "no reference")
    low = np.asarray(conf) < rule.threshold
    dist = (ref or {}).get("intensity_distance")
    far = np.asarray(dist) > rule.limit if dist and rule.limit is not None else np.zeros_like(low)
    ref_rate = float(np.mean(low | far | _reference_checks(ref, len(low))))
    basis = "" if dist and rule.limit is not None else " (top probability only: no intensity figures)"
    return Check("Refer rate", f"{rate:.0%}" if n else "none yet", f"{ref_rate:.0%}{basis}", n,
                 _judge(n, limits, rate - ref_rate, limits.refer_rate_rise),
                 _points(rate - ref_rate, "higher", "lower", limits.refer_rate_rise) if n else "")


def _reference_checks(ref: dict | None, n: int) -> np.ndarray:
    """Which test slices the record's own checks refer (out of distribution, more than one class in the set)."""
    ref = ref or {}
    out = np.zeros(n, dtype=bool)
    if ref.get("ood_distance") and ref.get("ood_limit") is not None:
        out |= np.asarray(ref["ood_distance"]) > ref["ood_limit"]
    if ref.get("set_size"):
        out |= np.asarray(ref["set_size"]) > 1
    return out


def ood_check(recent: list[dict], ref: dict | None, limits: MonitorLimits) -> Check:
    """The share of recent slices referred as out of distribution, against the test split's."""
    n = len(recent)
    rate = sum(OUT_OF_DISTRIBUTION in json.loads(x["reasons_json"] or "{}").get("codes", []) for x in recent) / n \
        if n else 0.0
    said = f"{rate:.0%}" if n else "none yet"
    if not (ref or {}).get("ood_distance") or ref.get("ood_limit") is None:
        return Check("Out of distribution", said, "not recorded", n, "no reference")
    ref_rate = float(np.mean(np.asarray(ref["ood_distance"]) > ref["ood_limit"]))
    return Check("Out of distribution", said, f"{ref_rate:.0%}", n,
                 _judge(n, limits, rate - ref_rate, limits.refer_rate_rise),
                 _points(rate - ref_rate, "higher", "lower", limits.refer_rate_rise) if n else "")


def agreement_check(agreed: list[bool], evaluation: dict | None, limits: MonitorLimits) -> Check:
    n = len(agreed)
    rate = sum(agreed) / n if n else 0.0
    acc = (evaluation or {}).get("accuracy")
    said = f"{rate:.0%} of {n} verdicts" if n else "no verdicts yet"
    if not acc:
        return Check("Agreement with reviewers", said, "not recorded", n, "no reference")
    return Check("Agreement with reviewers", said,
                 f"test accuracy {acc['value']:.1%} [{acc['ci_low']:.1%}, {acc['ci_high']:.1%}]", n,
                 _judge(n, limits, acc["value"] - rate if n else 0.0, limits.agreement_drop),
                 _points(acc["value"] - rate, "lower", "higher", limits.agreement_drop) if n else "")


def _reference_confidences(ref: dict | None, rule: ReferRule) -> list[float] | None:
    """The test split's top probabilities as the page shows them (calibrated when the rule has a temperature)."""
    if not ref:
        return None
    return ref.get("confidence_calibrated") if rule.temperature else ref.get("confidence")


def panel(engine: Engine, evaluation: dict | None, rule: ReferRule, limits: MonitorLimits) -> list[Check]:
    recent = recent_items(engine, limits.window)
    ref = (evaluation or {}).get("monitoring_reference")
    return [class_check(recent, predicted_share(evaluation), limits),
            confidence_check(recent, _reference_confidences(ref, rule), limits),
            refer_check(recent, ref, rule, limits),
            ood_check(recent, ref, limits),
            agreement_check(recent_verdicts(engine, limits.window), evaluation, limits)]
