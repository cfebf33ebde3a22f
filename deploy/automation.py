"""Registration and promotion after train.py, made safe (registry.auto_register, registry.auto_promote).

The best checkpoint is evaluated on the test split (the same evaluation and files as evaluate.py); it is
registered @staging only when the gates pass, and @production moves to it only when they pass on the basis of
registry.promote_on. Nothing is ever forced. Each step is printed, tagged on the version (auto_registered,
the alias history) and on the training run (registry.*); a step that cannot run says why and training still
succeeds.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from core.checkpoint import default_checkpoint
from core.errors import UserError
from core.fileio import write_text_atomic
from deploy.aliases import describe, move_alias
from deploy.model_card import with_aliases
from deploy.policy import PRODUCTION, STAGING, loosened_gates, production_refusal
from deploy.registry import connect
from deploy.release import ReleaseRequest, release_checkpoint
from evaluation.gates import format_gates
from evaluation.record import log_evaluation_files
from evaluation.reports import flat_metrics
from evaluation.scoring import evaluate_checkpoint, write_evaluation_files
from evaluation.source import OpenedCheckpoint, open_checkpoint

if TYPE_CHECKING:
    from core.config import Config
    from data.manifest import Split

HOW = "train.py (registry.auto_register)"


def skip_reason(cfg: Config) -> str | None:
    """Why nothing is evaluated for the registry after training, or None."""
    if not cfg.registry.auto_register:
        return "registry.auto_register is off"
    if not cfg.monitoring.mlflow.enabled:
        return "MLflow is off (monitoring.mlflow.enabled: false)"
    loose = loosened_gates(cfg.evaluation.gates)
    if loose:
        return f"the gates are loosened below the defaults ({'; '.join(loose)}); automation never forces"
    if not default_checkpoint(cfg).is_file():
        return f"no {default_checkpoint(cfg)}"
    return None


def release_after_training(cfg: Config, device, tracker, log=print, again: str = "", split: Split | None = None) -> str:
    """Evaluate, register @staging, promote to @production when allowed; returns the outcome (a run tag too).
    `again`: the command-line flags the printed next commands need to find the same data and stores.
    `split`: the split training used, so the data set is hashed once per run (prepared here when not given)."""
    model = cfg.model
    reason = skip_reason(cfg)
    if reason is None:
        reason, validation, opened = evaluate_best(cfg, device, tracker, log, split)
        if reason is None and not validation["deployment_ready"]:
            failed = ", ".join(g["name"] for g in validation["gates"] if not g["passed"])
            reason = f"the model fails the gates ({failed})"
    if reason is not None:
        log(f"ℹ️  Not registered: {reason}.")
        log(f"   Next: python evaluate.py --model {model}{again} --medical-validation, then python register_model.py "
            f"--model {model}{again} --version X.Y.Z once the gates pass")
        tracker.set_tags({"registry.auto_register": f"skipped: {reason}"[:250]})
        return "skipped"
    try:
        outcome = register_and_promote(cfg, tracker, log, opened, again)
    except UserError as exc:  # a store that cannot be reached, a parity failure: training itself succeeded
        log(f"⚠️  Not registered: {exc}")
        tracker.set_tags({"registry.auto_register": f"failed: {exc}"[:250]})
        return "failed"
    return outcome


def evaluate_best(cfg: Config, device, tracker, log,
                  split: Split | None = None) -> tuple[str | None, dict | None, OpenedCheckpoint | None]:
    """The best checkpoint on the test split, its files written beside it and its figures on the training run;
    (why not, or None; the gates' verdict; the opened checkpoint, which registration then uses as it is)."""
    ckpt_path = default_checkpoint(cfg)
    log(f"\n🧪 Evaluating {ckpt_path} on the test split for the registry (registry.auto_register)")
    try:
        opened = open_checkpoint(cfg, ckpt_path, cfg.model, log=lambda *a, **k: None, split=split)
        ev = evaluate_checkpoint(cfg, opened, device)
        files = write_evaluation_files(ckpt_path.parent, ev, opened.class_names)
    except UserError as exc:
        return f"the evaluation failed ({exc})", None, None
    except Exception as exc:  # e.g. a diverged model's NaN scores: training succeeded, only registration stops
        return f"the evaluation failed ({type(exc).__name__}: {exc})", None, None
    tracker.log_metrics(flat_metrics(ev.record))
    tracker.set_tags({"deployment_ready": ev.validation["deployment_ready"]})
    log_evaluation_files(tracker, files, "evaluation")
    acc = ev.record["accuracy"]
    log(f"   accuracy {acc['value']:.2%} (95% CI {acc['ci_low']:.2%}-{acc['ci_high']:.2%}) on "
        f"{ev.record['n_test']} test images; files in {ckpt_path.parent}")
    log(format_gates(ev.validation))
    return None, ev.validation, opened


def register_and_promote(cfg: Config, tracker, log, opened: OpenedCheckpoint, again: str = "") -> str:
    run_id = tracker.mlflow_run_id or "none"
    request = ReleaseRequest(f"0.0.0-auto.{time.strftime('%Y%m%dT%H%M%S')}", STAGING,
                             f"Registered automatically after training run {run_id}",
                             {"auto_registered": "true"}, how=HOW, opened=opened)
    released = release_checkpoint(cfg, request, log)
    name, version = released.names["pytorch"], released.versions["pytorch"]
    log(f"📝 Model {name} v{version} registered in Staging")
    tags = {"registry.auto_register": "registered", "registry.version": version, "registry.alias": STAGING}
    refusal = production_refusal(released.tags, cfg.registry.promote_on)
    if not cfg.registry.auto_promote:
        refusal = "registry.auto_promote is off"
    if refusal is None:
        client = connect(cfg.monitoring.mlflow)
        moves = move_alias(client, client.get_model_version(name, version), PRODUCTION, HOW, cfg.registry.promote_on)
        log(describe(moves))
        card = default_checkpoint(cfg).parent / "model_card.md"  # the card beside the checkpoint follows too
        if card.is_file():
            write_text_atomic(card, with_aliases(card.read_text(), client.get_model_version(name, version).aliases))
        tags["registry.alias"] = PRODUCTION
        log(f"🔮 Next: python inference_with_mlflow.py --model {name} --image PATH{again}   (serves @production)")
    else:
        log(f"ℹ️  Not promoted to Production: {refusal}.")
        log(f"🔮 Next: python inference_with_mlflow.py --model {name} --stage Staging --image PATH{again}; promote "
            f"with python deploy_model.py promote --model {cfg.model}{again} --version {version} --alias production")
        tags["registry.auto_promote"] = f"skipped: {refusal}"[:250]
    tracker.set_tags(tags)
    return "promoted" if refusal is None else "registered"

