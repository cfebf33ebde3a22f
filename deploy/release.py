"""Register a checkpoint in the MLflow Model Registry: the gate policy, an ONNX export checked against PyTorch,
both flavors and the model card logged in one run, the two versions, and the alias. On request also the int8 ONNX
model (deploy/quantize.py), judged by its gate before anything is registered, as a third registered model.
register_model.py and the automatic registration after train.py both run it.
"""
from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from core.checkpoint import default_checkpoint
from core.errors import UserError
from core.fileio import write_text_atomic
from core.tracking import RunTracker, experiment_name
from data.manifest import prepare_split, sha256_file
from deploy.aliases import Move, move_alias
from deploy.export import check_parity, export_checked, export_source, parity_line, write_contract_json
from deploy.model_card import Release, build_model_card
from deploy.policy import (
    Evidence,
    check_production,
    read_evidence,
    registration_forced,
    version_tags,
)
from deploy.quantize import Int8Verdict, export_int8
from deploy.registry import (
    INT8_FLAVOR,
    INT8_LINK_TAG,
    ONNX_LINK_TAG,
    connect,
    find_release,
    flavor_name,
    int8_registered_name,
    load_pytorch_flavor,
    log_flavors,
    log_int8_flavor,
    register,
    registered_names,
    run_link,
)
from evaluation.source import OpenedCheckpoint, open_checkpoint

if TYPE_CHECKING:
    from core.config import Config


@dataclass
class ReleaseRequest:
    semver: str
    alias: str | None = None
    description: str | None = None
    tags: dict = field(default_factory=dict)
    force: bool = False
    checkpoint: str | Path | None = None  # default: the model's best_model.pth
    resplit: bool = False
    how: str = "register_model.py"  # who asked: recorded on the version and in the alias history
    int8: bool = False  # also the int8 ONNX model, brain-cancer-{model}-onnx-int8 (refused unless its gate passes)
    opened: OpenedCheckpoint | None = None  # the checkpoint already opened (read, its split checked): not again
    loaded: dict | None = None  # the checkpoint already read (register_model.py --checkpoint alone): not again


@dataclass
class Released:
    names: dict[str, str]  # flavor -> registered model name
    versions: dict[str, str]  # flavor -> version number
    tags: dict[str, str]  # of the PyTorch version
    moves: list[Move] = field(default_factory=list)


def release_checkpoint(cfg: Config, req: ReleaseRequest, log=print) -> Released:
    """Judge the evidence, then register (or find) the version and move the alias; refusals raise UserError
    before anything is written."""
    ckpt_path = Path(req.checkpoint) if req.checkpoint else default_checkpoint(cfg)
    if not ckpt_path.is_file():
        raise UserError(f"checkpoint not found: {ckpt_path} (train first: python train.py --model {cfg.model})")
    req = dataclasses.replace(req, checkpoint=ckpt_path)
    sha = sha256_file(ckpt_path)
    evidence = read_evidence(ckpt_path, cfg.evaluation.gates, sha, cfg.model)
    forced = registration_forced(evidence, req.force, cfg.model, ckpt_path)
    tags = {**req.tags, **version_tags(evidence, forced, cfg.evaluation.gates), "semver": req.semver,
            "checkpoint_sha256": sha, "registered_by": req.how}
    names = {**registered_names(cfg.model), **(int8_registered_name(cfg.model) if req.int8 else {})}
    check_production(req.alias, tags, f"this version of {names['pytorch']}", cfg.registry.promote_on)
    client = connect(cfg.monitoring.mlflow)
    existing = find_release(client, names["pytorch"], req.semver)
    if existing is not None:
        return _already_registered(client, existing, req, sha, cfg.registry.promote_on, log)
    if forced:
        why = f"gates loosened: {'; '.join(evidence.loosened)}" if evidence.loosened else \
            f"medical validation {evidence.status}"
        log(f"⚠️  Registering a forced version ({why}): tagged forced=true, never @production")
    versions = _register_new(cfg, client, req, evidence, tags, log)
    tags[ONNX_LINK_TAG] = versions["onnx"]
    if INT8_FLAVOR in versions:
        tags[INT8_LINK_TAG] = versions[INT8_FLAVOR]
    released = Released(names, versions, tags)
    if req.alias:
        mv = client.get_model_version(names["pytorch"], versions["pytorch"])
        released.moves = move_alias(client, mv, req.alias, req.how, cfg.registry.promote_on)
    return released


def _already_registered(client, mv, req: ReleaseRequest, sha: str, promote_on: str, log) -> Released:
    if mv.tags.get("checkpoint_sha256") != sha:
        raise UserError(f"{mv.name} already has version {req.semver} (MLflow v{mv.version}) from another "
                        "checkpoint; choose a new --version")
    int8 = mv.tags.get(INT8_LINK_TAG)
    if req.int8 and not int8:
        raise UserError(f"{mv.name} v{mv.version} is version {req.semver} of this checkpoint, registered without "
                        "its int8 model; choose a new --version to register it with --int8")
    log(f"ℹ️  {mv.name} v{mv.version} is already version {req.semver} of this checkpoint: nothing new registered")
    names = {flavor: flavor_name(mv.name, flavor) for flavor in ("pytorch", "onnx")}
    versions = {"pytorch": str(mv.version), "onnx": mv.tags.get(ONNX_LINK_TAG)}
    if int8:
        names[INT8_FLAVOR], versions[INT8_FLAVOR] = flavor_name(mv.name, INT8_FLAVOR), int8
    released = Released(names, versions, dict(mv.tags))
    if req.alias:
        released.moves = move_alias(client, mv, req.alias, req.how, promote_on)
    return released


def _register_new(cfg: Config, client, req: ReleaseRequest, evidence: Evidence, tags: dict, log) -> dict[str, str]:
    names = {**registered_names(cfg.model), **(int8_registered_name(cfg.model) if req.int8 else {})}
    opened = req.opened or open_checkpoint(cfg, req.checkpoint, cfg.model, prepare_split(cfg, req.resplit, log=log),
                                           same_split=False, log=log,
                                           loaded=req.loaded)
    src = export_source(opened, log=log)
    ckpt = src.opened.ckpt
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = _export_onnx(cfg, src, Path(tmp), log)
        int8 = _build_int8(cfg, src, onnx_path, log) if req.int8 else None  # a refusal registers nothing
        release = Release(req.semver, names, req.alias, forced=tags["forced"] == "true", demo=cfg.dataset.demo,
                          description=req.description, int8_gate=int8[1].summary() if int8 else None,
                          training_run=run_link(client, ckpt.get("mlflow_run_id"), cfg.monitoring.mlflow.tracking_uri))
        card_path = Path(req.checkpoint).parent / "model_card.md"
        write_text_atomic(card_path, build_model_card(ckpt, src.contract, evidence, release))
        tags.update(data_fingerprint=ckpt.get("data_fingerprint") or "unknown", checkpoint_epoch=ckpt["epoch"],
                    training_run_id=ckpt.get("mlflow_run_id") or "none", demo_data=str(cfg.dataset.demo).lower())
        uris = log_models(cfg, src, onnx_path, card_path, tags, log, int8_path=int8[0] if int8 else None)
        description = "\n\n".join(filter(None, [req.description, card_path.read_text()]))
        versions = _register_int8(client, uris[INT8_FLAVOR], names[INT8_FLAVOR], tags, description, int8[1],
                                  log) if int8 else {}
        linked = {INT8_LINK_TAG: versions[INT8_FLAVOR]} if int8 else {}
        onnx_mv = register(client, uris["onnx"], names["onnx"], {**tags, **linked}, description)
        torch_mv = register(client, uris["pytorch"], names["pytorch"],
                            {**tags, ONNX_LINK_TAG: onnx_mv.version, **linked}, description)
    log(f"📝 Model {names['pytorch']} v{torch_mv.version} registered (semver {req.semver}, PyTorch torch.export "
        "flavor)")
    log(f"📦 ONNX model exported and registered: {names['onnx']} v{onnx_mv.version}")
    log(f"📄 Model card: {card_path}")
    return {**versions, "pytorch": str(torch_mv.version), "onnx": str(onnx_mv.version)}


def _export_onnx(cfg: Config, src, tmp: Path, log) -> Path:
    """The fp32 ONNX file, parity-checked: registered as the ONNX flavor, and what the int8 model is made from."""
    onnx_path, result = export_checked("onnx", src.model, src.contract, tmp / f"{cfg.model}_model.onnx", src.x)
    log(f"✅ ONNX export {parity_line(result)}")
    if not result.passed:
        raise UserError("the ONNX export does not match PyTorch; not registered")
    return onnx_path


def _build_int8(cfg: Config, src, onnx_path: Path, log) -> tuple[Path, Int8Verdict]:
    """The int8 file and its verdict: the same gate-checked quantization as export_model.py --format onnx-int8."""
    path, verdict = export_int8(cfg, src, onnx_path.with_name(f"{cfg.model}_model_int8.onnx"), log=log,
                                fp32_path=onnx_path)
    log(f"✅ ONNX int8 model accepted ({verdict.summary()})")
    return path, verdict


def _register_int8(client, uri: str, name: str, tags: dict, description: str, verdict: Int8Verdict,
                   log) -> dict[str, str]:
    """The int8 version, tagged with the figures of the gate it passed; {"onnx-int8": version}."""
    figures = {"precision": "int8", "int8_agreement": f"{verdict.agreement:.4f}",
               "int8_accuracy": f"{verdict.int8_accuracy:.4f}", "int8_fp32_accuracy": f"{verdict.fp32_accuracy:.4f}"}
    mv = register(client, uri, name, {**tags, **figures}, description)
    log(f"🔢 int8 ONNX model registered: {name} v{mv.version}")
    return {INT8_FLAVOR: str(mv.version)}


def log_models(cfg: Config, src, onnx_path: Path, card_path: Path, tags: dict, log=print,
               int8_path: Path | None = None) -> dict[str, str]:
    """Log both flavors (the parity-checked ONNX file at onnx_path; the int8 ONNX model when given), the card
    and the evidence in one MLflow run, and prove the logged pt2 flavor loads with MLflow's pickle guard on and
    predicts what the checkpoint predicts."""
    import mlflow

    contract_path = write_contract_json(src.contract, onnx_path.parent)
    with RunTracker(cfg, run_name=f"register-{cfg.model}-{tags['semver']}",
                    mlflow_experiment=experiment_name("registry", cfg.model, cfg.monitoring.mlflow.experiment_prefix),
                    wandb_project=None, tags=tags, job_type="register") as tracker:
        if tracker.mlflow_run_id is None:
            raise UserError(f"cannot open the MLflow store {cfg.monitoring.mlflow.tracking_uri} "
                            "(monitoring.mlflow.enabled must be true to register)")
        with mlflow.start_run(run_id=tracker.mlflow_run_id):
            # the PyTorch flavor answers logits alone, as mlflow.pyfunc expects; the checkpoint among its files has
            # the out-of-distribution check (TorchPredictor), the ONNX flavor has it in its graph
            uris = log_flavors(src.plain or src.model, onnx_path, src.x[:2],
                               [src.opened.path, contract_path, card_path])
            if int8_path is not None:
                uris[INT8_FLAVOR] = log_int8_flavor(int8_path, src.x[:2], [contract_path, card_path])
            mlflow.log_artifact(str(card_path))
            for name in ("evaluation_metrics.json", "medical_validation.json"):
                if (src.opened.path.parent / name).is_file():
                    mlflow.log_artifact(str(src.opened.path.parent / name), "evaluation")
    log(f"📝 Best PyTorch and ONNX models logged to MLflow (run {tracker.mlflow_run_id})")
    module = load_pytorch_flavor(uris["pytorch"])
    pt2 = check_parity("pt2", src.plain or src.model, lambda x: module(torch.from_numpy(x)), src.x)
    log(f"✅ Logged pt2 flavor, loaded with MLflow's pickle guard on: {parity_line(pt2)}")
    if not pt2.passed:
        raise UserError("the logged PyTorch flavor does not match the checkpoint; not registered")
    return uris
