"""Medical-validation quality gates (the original README's): accuracy, per-class sensitivity, latency, imbalance.

Each gate reads evaluation_metrics.json. --strict judges accuracy and sensitivity on the lower bound
of their confidence interval (and latency on its 95th percentile) instead of the point estimate.
`evaluation.gates.level: series` judges accuracy and sensitivity on the series-level figures (a test split of
DICOM series) instead of the slice-level ones.
"""
from __future__ import annotations

import operator

from core.errors import UserError

GATES_FAILED_EXIT = 3  # evaluate.py exit code when the gates fail (2 is a user error)
_COMPARE = {">=": operator.ge, "<": operator.lt}


def _gate(name: str, value: float, threshold: float, comparison: str) -> dict:
    return {"name": name, "value": float(value), "threshold": float(threshold), "comparison": comparison,
            "passed": bool(_COMPARE[comparison](value, threshold))}


def basis(strict: bool, confidence: float = 0.95) -> str:
    return f"lower bound of the {confidence:.0%} confidence interval" if strict else "point estimate"


def check_gates(metrics: dict, gates_cfg, strict: bool = False) -> dict:
    """The medical_validation.json record: each gate's value, threshold, verdict, and the overall verdict."""
    key = "ci_low" if strict else "value"
    level = getattr(gates_cfg, "level", "slice")
    figures, prefix = (metrics, "") if level == "slice" else (metrics.get("series"), "series_")
    if figures is None:
        raise UserError("evaluation.gates.level is series, but this evaluation has no series-level figures (its test "
                        "split holds no DICOM series); set evaluation.gates.level=slice")
    gates = [_gate(f"{prefix}accuracy", figures["accuracy"][key], gates_cfg.accuracy, ">=")]
    for name, row in figures["per_class"].items():
        gates.append(_gate(f"{prefix}sensitivity_{name}", row["sensitivity"][key], gates_cfg.sensitivity, ">="))
    timing = metrics["timing"]
    latency = timing["latency_ms_p95"] if strict else timing["latency_ms_mean"]
    gates.append(_gate("latency_ms", latency, gates_cfg.latency_ms, "<"))
    gates.append(_gate("class_imbalance", metrics["class_imbalance_ratio"], gates_cfg.max_imbalance, "<"))
    return {"model": metrics["model"], "strict": bool(strict), "level": level,
            "basis": basis(strict, metrics.get("confidence", 0.95)),
            "gates": gates, "deployment_ready": all(g["passed"] for g in gates)}


def format_gates(validation: dict) -> str:
    """Console / report lines: one per gate, then the verdict."""
    level = "series level, " if validation.get("level") == "series" else ""
    lines = [f"Medical validation ({level}judged on the {validation['basis']}"
             f"{'; latency on its 95th percentile' if validation['strict'] else ''}):"]
    for g in validation["gates"]:
        shown = (f"{g['value']:.1f} ms" if g["name"] == "latency_ms" else
                 f"{g['value']:.2f}:1" if g["name"] == "class_imbalance" else f"{g['value']:.2%}")
        limit = (f"{g['threshold']:g} ms" if g["name"] == "latency_ms" else
                 f"{g['threshold']:g}:1" if g["name"] == "class_imbalance" else f"{g['threshold']:.0%}")
        mark = "✅" if g["passed"] else "❌"
        lines.append(f"  {mark} {g['name']:<28} {shown:>10}  (needs {g['comparison']} {limit})")
    lines.append(f"Deployment ready: {'YES' if validation['deployment_ready'] else 'NO'}")
    return "\n".join(lines)
