"""Register a trained, evaluated model in the MLflow Model Registry (PyTorch + ONNX flavors, with its model card).

    python evaluate.py --model resnet18 --medical-validation      # the evidence registration reads
    python register_model.py --model resnet18 --version 1.0.0 --description "First production model"
    python register_model.py --model resnet18 --version 1.1.0 --alias production --tags "medical_ai=validated"
    python register_model.py --model resnet18 --version 1.2.0 --int8   # also brain-cancer-resnet18-onnx-int8

A model that failed or never ran the medical-validation gates is refused unless --force (then tagged forced=true).
Stages are deprecated in MLflow 3: --alias staging|production replaces them; the version number is the tag `semver`.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from core.cli import add_common_args, config_from_args, run
from core.errors import UserError
from core.tracking import RunTracker, experiment_name
from deploy.export import export_checked, export_source, parity_line, write_contract_json
from deploy.model_card import Release, build_model_card
from deploy.quantize import export_int8
from deploy.registry import (
    INT8_FLAVOR,
    INT8_LINK_TAG,
    ONNX_LINK_TAG,
    check_provenance,
    connect,
    ensure_version_free,
    gate_tags,
    int8_registered_name,
    log_flavors,
    log_int8_flavor,
    parse_tags,
    promote,
    read_evaluation,
    register,
    registered_names,
    run_link,
    validate_alias,
    validate_semver,
)

if TYPE_CHECKING:
    from core.config import Config


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Register a model (PyTorch + ONNX) in the MLflow Model Registry")
    add_common_args(p, checkpoint=True)
    p.add_argument("--version", required=True, help="semantic version of this release, e.g. 1.0.0")
    p.add_argument("--description", default=None, help="text shown on the model version")
    p.add_argument("--tags", nargs="*", default=[], metavar="KEY=VALUE", help='version tags, e.g. "production=ready"')
    p.add_argument("--alias", default=None, help="point this alias at the new version (staging, production, ...)")
    p.add_argument("--force", action="store_true",
                   help="register although medical validation failed or is missing (tagged forced=true)")
    p.add_argument("--int8", action="store_true",
                   help="also register the int8 ONNX model (export_model.py --format onnx-int8: refused unless it "
                        "agrees with fp32 on the test split) as brain-cancer-{model}-onnx-int8")
    return p


def main(args) -> int:
    cfg = config_from_args(args)
    semver, alias, user_tags = validate_semver(args.version), validate_alias(args.alias), parse_tags(args.tags)
    evaluation = read_evaluation(cfg.output_dir)
    gates = gate_tags(evaluation, args.force, cfg.output_dir, cfg.model)
    if gates["forced"] == "true":
        print(f"⚠️  --force: registering although medical validation is {evaluation.status}; tagged forced=true")
    client = connect(cfg.monitoring.mlflow)
    names = {**registered_names(cfg.model), **(int8_registered_name(cfg.model) if args.int8 else {})}
    ensure_version_free(client, names, semver)
    src = export_source(cfg, args.checkpoint, args.model, args.resplit)
    ckpt = src.opened.ckpt
    check_provenance(evaluation.metrics, ckpt)
    release = Release(semver, names, alias, forced=gates["forced"] == "true", demo=cfg.dataset.demo,
                      description=args.description,
                      training_run=run_link(client, ckpt.get("mlflow_run_id"), cfg.monitoring.mlflow.tracking_uri))
    card = build_model_card(ckpt, src.contract, evaluation, release)
    card_path = cfg.output_dir / "model_card.md"
    card_path.write_text(card)
    tags = {**user_tags, **gates, "semver": semver, "data_fingerprint": ckpt.get("data_fingerprint") or "unknown",
            "checkpoint_epoch": ckpt["epoch"], "training_run_id": ckpt.get("mlflow_run_id") or "none",
            "demo_data": str(cfg.dataset.demo).lower()}
    with tempfile.TemporaryDirectory() as tmp:
        int8 = build_int8(cfg, src, Path(tmp)) if args.int8 else None  # refused before anything is registered
        uris = log_models(cfg, src, Path(tmp), card_path, tags, semver, int8)
        description = "\n\n".join(filter(None, [args.description, card]))
        versions = register_int8(client, uris, names, tags, description, int8) if int8 else {}
        linked = {INT8_LINK_TAG: versions[INT8_FLAVOR]} if int8 else {}
        onnx_mv = register(client, uris["onnx"], names["onnx"], {**tags, **linked}, description)
        torch_mv = register(client, uris["pytorch"], names["pytorch"],
                            {**tags, ONNX_LINK_TAG: onnx_mv.version, **linked}, description)
    print(f"📝 Model {names['pytorch']} v{torch_mv.version} registered (semver {semver}, PyTorch torch.export flavor)")
    print(f"📦 ONNX model registered: {names['onnx']} v{onnx_mv.version}")
    print(f"📄 Model card: {card_path}")
    versions.update(pytorch=torch_mv.version, onnx=onnx_mv.version)
    if alias:
        promote(client, names, versions, alias, evaluation.status)
    print(f"🔮 Predict: python inference_with_mlflow.py --model {names['pytorch']} "
          f"{f'--alias {alias}' if alias else f'--version {torch_mv.version}'} --image PATH")
    return 0


def log_models(cfg: Config, src, tmp: Path, card_path: Path, tags: dict, semver: str, int8=None) -> dict[str, str]:
    """Export ONNX (parity-checked), then log both flavors (and the int8 model when given), the card and the
    evidence in one MLflow run."""
    import mlflow

    onnx_path, result = export_checked("onnx", src.model, src.contract, tmp / f"{cfg.model}_model.onnx", src.x)
    print(f"✅ ONNX export {parity_line(result)}")
    if not result.passed:
        raise UserError("the ONNX export does not match PyTorch; not registered")
    contract_path = write_contract_json(src.contract, tmp)
    with RunTracker(cfg, run_name=f"register-{cfg.model}-{semver}",
                    mlflow_experiment=experiment_name("registry", cfg.model),
                    wandb_project=None, tags=tags, job_type="register") as tracker:
        if tracker.mlflow_run_id is None:
            raise UserError(f"cannot open the MLflow store {cfg.monitoring.mlflow.tracking_uri} "
                            "(monitoring.mlflow.enabled must be true to register)")
        with mlflow.start_run(run_id=tracker.mlflow_run_id):
            uris = log_flavors(src.model, onnx_path, src.x[:2], [src.opened.path, contract_path, card_path])
            if int8 is not None:
                uris[INT8_FLAVOR] = log_int8_flavor(int8[0], src.x[:2], [contract_path, card_path])
            mlflow.log_text(card_path.read_text(), "model_card.md")
            for name in ("evaluation_metrics.json", "medical_validation.json"):
                if (cfg.output_dir / name).is_file():
                    mlflow.log_artifact(str(cfg.output_dir / name), "evaluation")
    print(f"📝 Best PyTorch and ONNX models logged to MLflow (run {tracker.mlflow_run_id})")
    return uris


def build_int8(cfg: Config, src, tmp: Path):
    """(int8 file, its gate verdict): the same gate-checked quantization as export_model.py --format onnx-int8."""
    path, verdict = export_int8(cfg, src, tmp / f"{cfg.model}_model_int8.onnx")
    print(f"✅ ONNX int8 model accepted ({verdict.summary()})")
    return path, verdict


def register_int8(client, uris: dict, names: dict, tags: dict, description: str, int8) -> dict[str, str]:
    """The int8 version, tagged with the figures of the gate it passed; {"onnx-int8": version}."""
    gate = int8[1]
    figures = {"precision": "int8", "int8_agreement": f"{gate.agreement:.4f}",
               "int8_accuracy": f"{gate.int8_accuracy:.4f}", "int8_fp32_accuracy": f"{gate.fp32_accuracy:.4f}"}
    mv = register(client, uris[INT8_FLAVOR], names[INT8_FLAVOR], {**tags, **figures}, description)
    print(f"🔢 int8 ONNX model registered: {names[INT8_FLAVOR]} v{mv.version}")
    return {INT8_FLAVOR: mv.version}


if __name__ == "__main__":
    run(main, get_args_parser())
