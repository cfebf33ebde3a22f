"""The MLflow registry concepts of the original README, shown on a model in the local store (read-only).

    python train.py --model resnet18 --demo            # registers brain-cancer-resnet18 when the gates pass
    python mlflow_model_examples.py --model resnet18 --demo
    python mlflow_model_examples.py --model resnet18 --version 2

1. logging vs registering, 2. the two flavors (PyTorch torch.export, ONNX), 3. the artifact store structure,
4. aliases instead of the deprecated stages, 5. loading by alias for inference (ONNX through pyfunc, the pt2
flavor with MLflow's pickle guard on), 6. searching versions by tag. Nothing in the store is changed.
"""
from __future__ import annotations

import argparse

import numpy as np

from core.cli import add_common_args, config_from_args, run
from core.errors import UserError
from data.images import configure_limits
from deploy.aliases import deployment_lines
from deploy.registry import (
    ONNX_LINK_TAG,
    REGISTERED_PREFIX,
    connect,
    flavor_name,
    load_pytorch_flavor,
    missing_alias_line,
    registered_name,
    resolve_version,
)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="MLflow concepts (logging, registering, flavors, aliases, loading) shown "
                                            "on a registered model of the local store")
    add_common_args(p)
    p.add_argument("--version", default=None, help="the version to show (default: @production, else the newest)")
    return p


def pick_version(client, name: str, version: str | None):
    from mlflow.exceptions import MlflowException

    if version is not None:
        return resolve_version(client, name, version=version)
    try:
        return client.get_model_version_by_alias(name, "production")
    except MlflowException:
        versions = client.search_model_versions(f"name='{name}'", order_by=["version_number DESC"], max_results=1)
    if not versions:
        raise UserError(missing_alias_line(client, name))
    print(f"(no @production yet: showing the newest version, v{versions[0].version})")
    return versions[0]


def logging_vs_registering(mv) -> None:
    import mlflow

    logged = mlflow.get_logged_model(mv.source.removeprefix("models:/"))
    print("\n1️⃣  Logging vs registering")
    print(f"   Logging = saving the trained model, its metadata and artifacts in MLflow: {mv.source} "
          f"(run {logged.source_run_id}, experiment {logged.experiment_id})")
    print(f"   Registering = making it an official, versioned asset: {mv.name} v{mv.version} "
          f"(semver {mv.tags.get('semver', '?')}, medical validation {mv.tags.get('medical_validation', 'missing')})")


def flavors_and_files(mv, twin) -> None:
    import mlflow

    print("\n2️⃣  Model flavors   3️⃣  Artifact store structure")
    for version in filter(None, (mv, twin)):
        uri = f"models:/{version.name}/{version.version}"
        flavors = ", ".join(mlflow.models.Model.load(uri).flavors)
        print(f"   {uri}  (flavors: {flavors})")
        for item in mlflow.artifacts.list_artifacts(artifact_uri=uri):
            size = f"{item.file_size / 1024:.1f} KB" if item.file_size else ""
            print(f"     {item.path + ('/' if item.is_dir else ''):<28} {size}")


def aliases(client, mv, promote_on: str) -> None:
    print("\n4️⃣  Aliases (MLflow stages are deprecated: @staging and @production replace them)")
    for line in deployment_lines(client, mv.name, promote_on):
        print(f"   {line}")
    print(f"   URI by alias: models:/{mv.name}@production; move one: python deploy_model.py promote "
          f"--model {mv.name.removeprefix(REGISTERED_PREFIX)} --version N --alias staging")


def load_for_inference(mv, twin) -> None:
    import mlflow
    import torch

    print("\n5️⃣  Loading a registered model for inference")
    shape = mlflow.models.Model.load(f"models:/{mv.name}/{mv.version}").get_input_schema().inputs[0].shape
    x = np.random.default_rng(0).standard_normal((2, *shape[1:])).astype(np.float32)
    module = load_pytorch_flavor(f"models:/{mv.name}/{mv.version}")
    with torch.no_grad():
        torch_logits = module(torch.from_numpy(x)).numpy()
    print(f"   PyTorch pt2 flavor, loaded with MLflow's pickle guard on: logits {torch_logits.shape}")
    if twin is not None:
        onnx_logits = mlflow.pyfunc.load_model(f"models:/{twin.name}/{twin.version}").predict(x)
        onnx_logits = np.asarray(onnx_logits["logits"] if isinstance(onnx_logits, dict) else onnx_logits)
        print(f"   ONNX flavor through mlflow.pyfunc (ONNX Runtime): max |Δlogit| vs PyTorch "
              f"{float(np.abs(onnx_logits - torch_logits).max()):.2e}")
    print(f"   The toolkit's way, with its preprocessing: python inference_with_mlflow.py --model {mv.name} "
          "--image scan.jpg")


def search_by_tag(client, name: str) -> None:
    query = f"name='{name}' and tags.medical_validation='passed'"
    found = sorted(client.search_model_versions(query), key=lambda v: int(v.version))
    print("\n6️⃣  Searching versions by tag")
    print(f"   client.search_model_versions(\"{query}\") -> " + (", ".join(f"v{v.version}" for v in found) or "none"))


def main(args) -> int:
    cfg = config_from_args(args)
    configure_limits(cfg)  # this run's images: bounds on every decoder
    client = connect(cfg.monitoring.mlflow)
    name = registered_name(cfg.model)
    mv = pick_version(client, name, args.version)
    twin_number = mv.tags.get(ONNX_LINK_TAG)
    twin = client.get_model_version(flavor_name(name, "onnx"), twin_number) if twin_number else None
    print(f"🧪 MLflow concepts on {mv.name} v{mv.version} (store {cfg.monitoring.mlflow.tracking_uri})")
    logging_vs_registering(mv)
    flavors_and_files(mv, twin)
    aliases(client, mv, cfg.registry.promote_on)
    load_for_inference(mv, twin)
    search_by_tag(client, name)
    return 0


if __name__ == "__main__":
    run(main, get_args_parser())
