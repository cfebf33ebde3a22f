"""The model card registered with every model version: what the model is for, on what data it was
measured, how to feed it, how good it is (with confidence intervals), and where it must not be trusted."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from core.contract import Contract
from deploy.registry import INT8_FLAVOR

if TYPE_CHECKING:
    from deploy.policy import Evidence


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _ci(entry) -> str:
    if not isinstance(entry, dict):
        return "n/a" if entry is None else f"{float(entry):.3f}"
    return f"{entry['value']:.3f} (95% CI {entry['ci_low']:.3f}-{entry['ci_high']:.3f})"


def _metrics_section(metrics: dict | None) -> list[str]:
    if not metrics:
        return ["**This model was never evaluated** (no evaluation_metrics.json): no figure below can be trusted.", ""]
    conf = metrics.get("confidence", 0.95)
    lines = [f"Test split: {metrics.get('n_test')} images; {conf:.0%} bootstrap confidence intervals "
             f"({metrics.get('bootstrap_samples')} resamples); checkpoint epoch {metrics.get('checkpoint_epoch')}.", "",
             "| metric | value |", "|---|---|"]
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc_macro"):
        if key in metrics:
            lines.append(f"| {key.replace('_', ' ')} | {_ci(metrics[key])} |")
    lines += ["", "| class | sensitivity | specificity | precision | F1 | support |", "|---|---|---|---|---|---|"]
    for cls, m in (metrics.get("per_class") or {}).items():
        lines.append(f"| {cls} | {_ci(m.get('sensitivity'))} | {_ci(m.get('specificity'))} | "
                     f"{_ci(m.get('precision'))} | {_ci(m.get('f1'))} | {m.get('support')} |")
    series = metrics.get("series")
    if series:
        per_class = series.get("per_class") or {}
        lines += ["", f"Series level: {series.get('n_series')} test series read by the series rule "
                      f"({series.get('rule')}): accuracy {_ci(series.get('accuracy'))}; sensitivity "
                      + ", ".join(f"{c} {_ci(m.get('sensitivity'))}" for c, m in per_class.items()) + "."]
    cal, timing = metrics.get("calibration") or {}, metrics.get("timing") or {}
    if cal:
        lines += ["", f"Calibration: ECE {_fmt(cal.get('ece'))} ({cal.get('n_bins')} bins); after temperature "
                      f"{_fmt(cal.get('temperature'))}: {_fmt(cal.get('ece_after_temperature'))}."]
    if timing:
        lines.append(f"Latency on {timing.get('device')}: mean {_fmt(timing.get('latency_ms_mean'))} ms, p95 "
                     f"{_fmt(timing.get('latency_ms_p95'))} ms (batch {timing.get('batch_size')}).")
    return lines + [""]


def _gates_section(evidence: Evidence, forced: bool) -> list[str]:
    validation, status = evidence.validation, evidence.status
    if not validation:
        lines = ["No evaluation of this checkpoint: the gates could not be checked."]
    else:
        lines = [f"Judged at registration on the evaluation's figures with the gates in force; basis: "
                 f"{validation.get('basis')}; on the lower bounds of the 95% CIs: {evidence.ci_status}.", "",
                 "| gate | value | threshold | passed |", "|---|---|---|---|"]
        for g in validation.get("gates", []):
            lines.append(f"| {g['name']} | {_fmt(g['value'])} | {g['comparison']} {_fmt(g['threshold'])} | "
                         f"{'yes' if g['passed'] else '**NO**'} |")
        lines += ["", f"Deployment ready: **{'yes' if validation.get('deployment_ready') else 'NO'}**."]
    if evidence.loosened:
        lines.append(f"**Gates loosened below the defaults: {'; '.join(evidence.loosened)}.**")
    if forced:
        lines.append(f"**Registered with --force (medical validation {status}).** Not for clinical use; never "
                     "@production.")
    return lines + [""]


@dataclass
class Release:
    """What registration adds to a checkpoint and its evaluation: the version, where it goes, why."""
    semver: str
    names: dict[str, str]  # flavor -> registered model name
    alias: str | None = None
    forced: bool = False
    demo: bool = False
    description: str | None = None
    training_run: str | None = None
    int8_gate: str | None = None  # the int8 gate's summary when an int8 ONNX model is registered too


ALIASES_NOW = "Aliases now: "


def aliases_line(aliases) -> str:
    """The card's one line that follows the registry: rewritten whenever an alias of the version moves."""
    named = ", ".join(f"`{a}`" for a in sorted(aliases)) or "none"
    return (f"{ALIASES_NOW}{named} (as of {datetime.now(timezone.utc).isoformat(timespec='seconds')}; "
            "`python deploy_model.py list` shows the registry's live ones).")


def with_aliases(card: str, aliases) -> str:
    """The card with its aliases line brought up to date (a card without one is returned unchanged)."""
    return "\n".join(aliases_line(aliases) if line.startswith(ALIASES_NOW) else line
                     for line in card.split("\n"))


def build_model_card(ckpt: dict, contract: Contract, evidence: Evidence, release: Release) -> str:
    """Markdown model card for one registered version."""
    metrics = evidence.metrics
    names, semver, alias, description = release.names, release.semver, release.alias, release.description
    name = contract.model_name
    fingerprint = (metrics or {}).get("data_fingerprint") or ckpt.get("data_fingerprint")
    manifest = (metrics or {}).get("split_manifest") or ckpt.get("split_manifest")
    lines = [f"# Model card: {names['pytorch']} {semver}", "",
             f"Registered {datetime.now(timezone.utc).isoformat(timespec='seconds')}; flavors: `{names['pytorch']}` "
             f"(PyTorch, torch.export) and `{names['onnx']}` (ONNX)"
             + (f", `{names[INT8_FLAVOR]}` (ONNX int8)" if INT8_FLAVOR in names else "") + ".",
             aliases_line([alias] if alias else []),
             *(["", description] if description else []), "",
             "## Intended use",
             f"Classifies a single 2-D brain MRI slice into one of: {', '.join(contract.class_names)}. "
             "Research and clinical **decision support** only: it is **not a diagnosis**, it does not detect "
             "the absence of a tumour (there is no 'no tumour' class), and every output must be reviewed by "
             "a qualified clinician.", "",
             "## Data",
             f"Architecture `{name}`, checkpoint epoch {ckpt.get('epoch')}. Split manifest: `{manifest}`; "
             f"data fingerprint `{fingerprint}`.", ""]
    if release.demo:
        lines += ["**Trained and evaluated on the SYNTHETIC demo data set** (generated phantoms, not patient "
                  "images): the figures below say nothing about real MRI.", ""]
    lines += ["## Preprocessing contract",
              f"Input float32 NCHW (batch, 3, {contract.img_size}, {contract.img_size}): "
              f"{contract.to_dict()['preprocessing']}.",
              f"mean {list(contract.mean)}, std {list(contract.std)}. Output: logits; softmax gives class "
              "probabilities. "
              "The contract is also stored in the ONNX metadata and in contract.json.", "",
              *([f"The int8 ONNX model (static quantization, calibrated on training images) passed its gate: "
                 f"{release.int8_gate}.", ""] if release.int8_gate else []),
              "## Metrics", *_metrics_section(metrics),
              "## Medical validation gates", *_gates_section(evidence, release.forced),
              "## Limitations",
              "- Single-slice classifier; no 3-D context, no patient-level aggregation.",
              "- Measured on one data set and split; performance on other scanners, sequences or sites is unknown.",
              "- Confidence values are softmax outputs, not calibrated probabilities unless stated above.",
              "- Images of other body parts or non-MRI images still receive one of the tumour classes.", "",
              "## Lineage",
              f"Training run: {release.training_run or 'not recorded (trained without MLflow)'}.", ""]
    return "\n".join(lines)
