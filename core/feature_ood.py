"""How far an image's features (models.features.FeatureModel) lie from the training data, and the limit past which
the model's answer is withheld as out of distribution.

The distance is computed inside the model (models.features.ScoredModel, the ONNX graph's second output
`ood_distance`): the Mahalanobis distance to the nearest class mean under the training split's shared covariance.
What is stored beside it, in the Contract's extra under FEATURE_OOD_KEY, is how it was fitted and the validation
split's distances; the limit is a percentile of those (default the 95th: about 5% of in-distribution images are
refused, a documented false-alarm rate). Numpy-free and torch-free: plain values only.
"""
from __future__ import annotations

FEATURE_OOD_KEY = "feature_ood"  # the Contract's extra key
OOD_OUTPUT = "ood_distance"      # the ONNX graph's second output
QUANTILES = {"p50": 50, "p90": 90, "p95": 95, "p99": 99, "max": 100}


def feature_limit(spec: dict | None, configured: float | None = None) -> float | None:
    """The distance above which an image is out of distribution: the configured one, else the model's own
    (spec["limit"], the validation percentile it was fitted with); None without either."""
    if configured is not None:
        return float(configured)
    return None if not spec or spec.get("limit") is None else float(spec["limit"])
