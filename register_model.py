"""Register a trained, evaluated model in the MLflow Model Registry (PyTorch + ONNX flavors, with its model card).

    python evaluate.py --model resnet18                           # the evidence registration reads
    python register_model.py --model resnet18 --version 1.0.0 --description "First production model"
    python register_model.py --model resnet18 --version 1.1.0 --alias production --tags "medical_ai=validated"
    python register_model.py --model resnet18 --version 1.2.0 --int8   # also brain-cancer-resnet18-onnx-int8

The gates of evaluation.gates are re-checked on the evaluation's figures of this very checkpoint (its sha256).
A model that fails them or was never evaluated is refused unless --force (tagged forced=true); gates loosened
below the defaults count as --force. A forced version never becomes @production.
Stages are deprecated in MLflow 3: --alias staging|production replaces them; the version number is the tag `semver`.
"""
from __future__ import annotations

import argparse

from core.checkpoint import load_checkpoint
from core.cli import add_common_args, config_from_args, run, same_data_flags
from data.images import configure_limits
from deploy.aliases import describe
from deploy.policy import is_production, production_refusal
from deploy.registry import parse_tags, validate_alias, validate_semver
from deploy.release import ReleaseRequest, release_checkpoint


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Register a model (PyTorch + ONNX) in the MLflow Model Registry")
    add_common_args(p, checkpoint=True)
    p.add_argument("--version", required=True, help="semantic version of this release, e.g. 1.0.0")
    p.add_argument("--description", default=None, help="text shown on the model version")
    p.add_argument("--tags", nargs="*", default=[], metavar="KEY=VALUE", help='version tags, e.g. "production=ready"')
    p.add_argument("--alias", default=None, help="point this alias at the new version (staging, production, ...)")
    p.add_argument("--force", action="store_true",
                   help="register although the gates fail or no evaluation exists (tagged forced=true; never "
                        "production)")
    p.add_argument("--int8", action="store_true",
                   help="also register the int8 ONNX model (as export_model.py --format onnx-int8: refused, and "
                        "nothing registered, unless it agrees with fp32 on the test split) as "
                        "brain-cancer-{model}-onnx-int8")
    return p


def main(args) -> int:
    loaded = None
    if args.checkpoint and not args.model:  # --checkpoint alone names its model (read once, for the release too)
        loaded = load_checkpoint(args.checkpoint)
        args.model = loaded["model_name"]
    cfg = config_from_args(args)
    configure_limits(cfg)  # this run's images: bounds on every decoder
    request = ReleaseRequest(validate_semver(args.version), validate_alias(args.alias), args.description,
                             parse_tags(args.tags), args.force, args.checkpoint, args.resplit, int8=args.int8,
                             loaded=loaded)
    released = release_checkpoint(cfg, request)
    if released.moves:
        print(describe(released.moves))
    name, version = released.names["pytorch"], released.versions["pytorch"]
    which = "" if any(is_production(m.alias) for m in released.moves) else \
        f" --alias {args.alias}" if args.alias else f" --version {version}"
    again = same_data_flags(args)  # the store this used: the hints run as copied
    print(f"🔮 Predict: python inference_with_mlflow.py --model {name}{which} --image PATH{again}")
    promoted = any(is_production(m.alias) for m in released.moves)
    if not promoted and production_refusal(released.tags, cfg.registry.promote_on) is None:
        print(f"🚀 Promote: python deploy_model.py promote --model {cfg.model} --version {version} --alias production"
              f"{again}")
    return 0


if __name__ == "__main__":
    run(main, get_args_parser())
