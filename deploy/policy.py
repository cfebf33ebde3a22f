"""The registry's gate policy: what a model version must show to be registered, and to hold @production.

Registration judges the evaluation's raw figures (evaluation_metrics.json) with the gates in force at
registration, never a stored verdict; the figures must come from the very checkpoint being registered (its
sha256). Gates loosened below the shipped defaults count as --force. A forced, failing or unvalidated version
never holds @production, and every inference run that serves one says so.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import UserError
from evaluation.gates import check_gates

PRODUCTION = "production"
STAGING = "staging"
PROMOTE_BASIS = {"point": "point estimates", "ci_lower": "lower bounds of the 95% CIs"}
# The direction in which each gate gets stricter: a higher floor, or a lower ceiling.
STRICTER = {"accuracy": max, "sensitivity": max, "latency_ms": min, "max_imbalance": min}


def is_production(alias: str | None) -> bool:
    return bool(alias) and alias.lower() == PRODUCTION


def default_gates() -> dict[str, float]:
    """The shipped gates: the stricter of the code's defaults and config/config.yaml's evaluation.gates."""
    from core.config import DEFAULT_CONFIG, GatesSection, read_yaml

    shipped = (read_yaml(DEFAULT_CONFIG).get("evaluation") or {}).get("gates") or {}
    code = GatesSection().model_dump()
    return {key: pick(float(code[key]), float(shipped.get(key, code[key]))) for key, pick in STRICTER.items()}


def loosened_gates(gates) -> list[str]:
    """The gates of `gates` (an evaluation.gates section) that are looser than the shipped defaults."""
    floors = default_gates()
    loose = []
    for key, pick in STRICTER.items():
        value = float(getattr(gates, key))
        if pick(value, floors[key]) != value:
            loose.append(f"{key} {value:g} (default {floors[key]:g})")
    return loose


def gate_thresholds(gates) -> str:
    level = "series " if getattr(gates, "level", "slice") == "series" else ""
    return (f"{level}accuracy>={gates.accuracy:g} {level}sensitivity>={gates.sensitivity:g} "
            f"latency_ms<{gates.latency_ms:g} max_imbalance<{gates.max_imbalance:g}")


@dataclass
class Evidence:
    """An evaluation judged by the gates in force: on the point estimates and on the CIs' lower bounds."""
    metrics: dict | None  # evaluation_metrics.json; None when the checkpoint was never evaluated
    validation: dict | None = None  # check_gates(..., strict=False) with the gates in force
    ci_validation: dict | None = None  # check_gates(..., strict=True)
    loosened: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        """passed | failed | missing (never evaluated)."""
        return _status(self.validation)

    @property
    def ci_status(self) -> str:
        return _status(self.ci_validation)

    def failed_gates(self) -> list[str]:
        return [_gate_text(g) for g in (self.validation or {}).get("gates", []) if not g["passed"]]


def _status(validation: dict | None) -> str:
    if validation is None:
        return "missing"
    return "passed" if validation["deployment_ready"] else "failed"


def _gate_text(g: dict) -> str:
    return f"{g['name']} {g['value']:.4g} (needs {g['comparison']} {g['threshold']:g})"


def judge(metrics: dict | None, gates) -> Evidence:
    """Re-check the raw figures with `gates`; a record that lacks a figure is refused, not passed."""
    loose = loosened_gates(gates)
    if metrics is None:
        return Evidence(None, loosened=loose)
    try:
        return Evidence(metrics, check_gates(metrics, gates), check_gates(metrics, gates, strict=True), loose)
    except (KeyError, TypeError) as exc:
        raise UserError(f"evaluation_metrics.json lacks the figure {exc}; re-run evaluate.py") from None


def evaluate_command(model: str, checkpoint: Path) -> str:
    extra = "" if Path(checkpoint).name == "best_model.pth" else f" --checkpoint {checkpoint}"
    return f"python evaluate.py --model {model}{extra}"


def read_evidence(checkpoint: Path, gates, checkpoint_sha256: str, model: str) -> Evidence:
    """The evaluation beside the checkpoint, tied to it by content, judged by `gates`."""
    path = Path(checkpoint).parent / "evaluation_metrics.json"
    if not path.is_file():
        return judge(None, gates)
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    recorded = metrics.get("checkpoint_sha256") if isinstance(metrics, dict) else None
    if recorded != checkpoint_sha256:
        what = (f"scored another checkpoint (sha256 {recorded[:12]}..., this one {checkpoint_sha256[:12]}...)"
                if recorded else "does not record which checkpoint it scored")
        raise UserError(f"{path} {what}; re-run: {evaluate_command(model, checkpoint)}")
    return judge(metrics, gates)


def registration_forced(evidence: Evidence, force: bool, model: str, checkpoint: Path) -> bool:
    """Whether the new version is tagged forced; raises when it may not be registered at all."""
    if evidence.loosened:
        return True  # gates below the defaults prove nothing: that is --force by another name
    if evidence.status == "passed":
        return False
    if not force:
        if evidence.status == "missing":
            raise UserError(f"{model} has no evaluation of this checkpoint in {Path(checkpoint).parent} (run: "
                            f"{evaluate_command(model, checkpoint)}); or register anyway with --force (tagged forced, "
                            "never production)")
        raise UserError(f"{model} fails the gates in force ({', '.join(evidence.failed_gates())}); not registered "
                        "(--force registers it tagged forced, never production)")
    return True


def version_tags(evidence: Evidence, forced: bool, gates) -> dict[str, str]:
    """What the registry keeps about a version's validation; production_refusal and inference read it back."""
    tags = {"medical_validation": evidence.status, "gates_ci_lower": evidence.ci_status,
            "forced": str(forced).lower(), "gates_loosened": "; ".join(evidence.loosened) or "none",
            "gates": gate_thresholds(gates)}
    if evidence.metrics:
        tags["accuracy"] = f"{evidence.metrics['accuracy']['value']:.4f}"
        if evidence.metrics.get("series"):
            tags["series_accuracy"] = f"{evidence.metrics['series']['accuracy']['value']:.4f}"
    return tags


def production_refusal(tags: dict, promote_on: str = "point") -> str | None:
    """Why a version with these tags may not hold @production; None when it may."""
    if tags.get("forced") == "true":
        loose = tags.get("gates_loosened", "none")
        if loose != "none":
            return f"it is forced: gates loosened below the defaults ({loose})"
        return f"it is forced (--force; medical validation {tags.get('medical_validation', 'missing')})"
    status = tags.get("medical_validation")
    if status != "passed":
        return f"its medical validation is {status or 'missing (not registered by register_model.py)'}"
    if promote_on == "ci_lower" and tags.get("gates_ci_lower") != "passed":
        return "it fails the gates on the lower bounds of the 95% CIs (registry.promote_on: ci_lower)"
    return None


def check_production(alias: str | None, tags: dict, what: str, promote_on: str) -> None:
    """Refuse @production (any spelling) for `what` (e.g. "brain-cancer-resnet18 v3") unless its tags allow it."""
    if is_production(alias):
        reason = production_refusal(tags, promote_on)
        if reason:
            raise UserError(f"{what} cannot be @{PRODUCTION}: {reason}")


def serving_warning(mv) -> str | None:
    """The line every inference run prints when it serves a forced or unvalidated version."""
    tags = mv.tags or {}
    status = tags.get("medical_validation") or "missing"
    if tags.get("forced") == "true":
        return (f"warning: {mv.name} v{mv.version} was registered with --force (medical validation {status}, "
                f"gates loosened: {tags.get('gates_loosened', 'none')}): not validated for clinical use")
    if status != "passed":
        return f"warning: {mv.name} v{mv.version} is not validated (medical validation: {status}): not for clinical use"
    return None
