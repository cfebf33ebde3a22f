"""MLflow Model Registry: register a checkpoint's PyTorch and ONNX flavors with their evidence, and load
them back by alias or version.

Stages are deprecated in MLflow 3: versions carry aliases (`staging`, `production`) and a `semver` tag
(an alias cannot hold dots). A version of `brain-cancer-{model}` (PyTorch, torch.export format) is tagged
with the number of its twin in `brain-cancer-{model}-onnx`, so inference can pick the ONNX flavor.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError

# semver.org's regular expression (2.0.0): MAJOR.MINOR.PATCH[-prerelease][+build]
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
                    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
                    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$")
ALIAS = re.compile(r"^[A-Za-z0-9_-]{1,255}$")  # MLflow's alias characters
ONNX_LINK_TAG = "onnx_version"
PRODUCTION = "production"


def registered_names(model: str) -> dict[str, str]:
    return {"pytorch": f"brain-cancer-{model}", "onnx": f"brain-cancer-{model}-onnx"}


def validate_semver(version: str) -> str:
    if not SEMVER.match(version or ""):
        raise UserError(f"--version {version!r} is not a semantic version (MAJOR.MINOR.PATCH, e.g. 1.0.0)")
    return version


def validate_alias(alias: str | None) -> str | None:
    if alias is None:
        return None
    if not ALIAS.match(alias) or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise UserError(f"--alias {alias!r}: use letters, digits, '-' or '_' (not 'latest' or 'v1'), "
                        "e.g. staging or production")
    return alias


def parse_tags(items: list[str]) -> dict[str, str]:
    tags = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--tags expects key=value, got {item!r}")
        tags[key.strip()] = value.strip()
    return tags


# ---- the evaluation evidence (written by evaluate.py) --------------------------------------------

@dataclass
class Evaluation:
    metrics: dict | None
    validation: dict | None

    @property
    def status(self) -> str:
        """passed | failed | missing (never evaluated, or evaluated without --medical-validation)."""
        if self.metrics is None or self.validation is None:
            return "missing"
        return "passed" if self.validation.get("deployment_ready") is True else "failed"

    def failed_gates(self) -> list[str]:
        return [g["name"] for g in (self.validation or {}).get("gates", []) if not g.get("passed")]


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None


def read_evaluation(out_dir: Path) -> Evaluation:
    return Evaluation(_read_json(Path(out_dir) / "evaluation_metrics.json"),
                      _read_json(Path(out_dir) / "medical_validation.json"))


def gate_tags(evaluation: Evaluation, force: bool, out_dir: Path, model: str) -> dict[str, str]:
    """Refuse a model that failed or skipped medical validation, unless forced (then say so in its tags)."""
    status = evaluation.status
    if status != "passed" and not force:
        if status == "missing":
            raise UserError(f"{model} has no evaluation in {out_dir} (run: python evaluate.py --model {model} "
                            "--medical-validation); or register anyway with --force")
        raise UserError(f"{model} failed the medical-validation gates ({', '.join(evaluation.failed_gates())}); "
                        "not registered (use --force to register it, tagged as failed)")
    tags = {"medical_validation": status, "forced": str(bool(force and status != "passed")).lower()}
    if evaluation.metrics:
        tags["accuracy"] = f"{evaluation.metrics['accuracy']['value']:.4f}"
    return tags


def check_provenance(metrics: dict | None, ckpt: dict) -> None:
    """The evaluation must describe this checkpoint and its data: a stale report is as bad as none."""
    if not metrics:
        return
    for key, ckpt_key in (("data_fingerprint", "data_fingerprint"), ("checkpoint_epoch", "epoch")):
        if metrics.get(key) is not None and ckpt.get(ckpt_key) is not None and metrics[key] != ckpt[ckpt_key]:
            raise UserError(f"evaluation_metrics.json has {key} {metrics[key]}, but the checkpoint has "
                            f"{ckpt[ckpt_key]}: it describes another model; re-run evaluate.py")


# ---- store ------------------------------------------------------------------------------------

def connect(section):
    """An MlflowClient on the configured store (tracking and registry alike)."""
    import mlflow
    from mlflow import MlflowClient

    from core.tracking import _probe_http

    uri = section.tracking_uri
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # local copies: bars are noise
    if uri.startswith(("http://", "https://")):
        try:
            _probe_http(uri)
        except ConnectionError as exc:
            raise UserError(f"{exc} (start it with ./start_mlflow_server.sh, or use sqlite:///mlflow.db)") from None
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_version_free(client, names: dict[str, str], semver: str) -> None:
    for name in names.values():
        found = client.search_model_versions(f"name='{name}' and tags.semver='{semver}'")
        if found:
            raise UserError(f"{name} already has version {semver} (MLflow version {found[0].version}); "
                            "choose a new --version")


def log_flavors(model, onnx_path: Path, example, extra_files: list[Path]) -> dict[str, str]:
    """Log both flavors into the active MLflow run, with signature and a real input example; their URIs."""
    import mlflow
    import onnx
    import onnxruntime
    import torch
    from mlflow.models import infer_signature

    from deploy.predictors import default_providers

    with torch.no_grad():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    extras = [str(p) for p in extra_files]
    if len(example) < 2:  # a batch of 1 would make torch.export fix the batch size
        example = example.repeat(2, axis=0)
    # pt2 (torch.export): loading it unpickles nothing; the example has batch 2 so the batch stays dynamic
    torch_info = mlflow.pytorch.log_model(pytorch_model=model, name="model", signature=signature,
                                          input_example=example, extra_files=extras, serialization_format="pt2",
                                          pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    onnx_info = mlflow.onnx.log_model(onnx_model=onnx.load(str(onnx_path)), name="onnx_model", signature=signature,
                                      input_example=example, extra_files=extras, save_as_external_data=False,
                                      onnx_execution_providers=default_providers(),
                                      pip_requirements=[f"onnxruntime=={onnxruntime.__version__}"])
    return {"pytorch": torch_info.model_uri, "onnx": onnx_info.model_uri}


def run_link(client, run_id: str | None, uri: str) -> str | None:
    """Where to find the training run: its id and experiment, plus a UI address for a server store."""
    if not run_id:
        return None
    try:
        exp_id = client.get_run(run_id).info.experiment_id
    except Exception:  # a run from another store: keep the id, it is still evidence
        return f"MLflow run {run_id} (not in {uri})"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}"
    return f"MLflow run {run_id}, experiment {exp_id} in {uri} (browse: ./start_mlflow_server.sh)"


def register(client, model_uri: str, name: str, tags: dict, description: str):
    """One model version; creates the registered model on first use."""
    import mlflow

    mv = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    client.update_model_version(name, mv.version, description=description)
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, description="Brain MRI slice classifier (brain-cancer toolkit)")
    return mv


def promote(client, names: dict[str, str], versions: dict[str, str], alias: str, status: str, log=print) -> None:
    """Point `alias` at the new versions, and record who/what/when on the versions themselves."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    for flavor, name in names.items():
        previous = None
        try:
            previous = client.get_model_version_by_alias(name, alias).version
        except Exception:  # MlflowException RESOURCE_DOES_NOT_EXIST: the alias is new
            pass
        client.set_registered_model_alias(name, alias, versions[flavor])
        client.set_model_version_tag(name, versions[flavor], f"alias.{alias}", f"set {stamp} (gates {status})")
        moved = f" (was v{previous})" if previous and previous != versions[flavor] else ""
        mark = "⚠️ " if status != "passed" else "🏆" if alias == PRODUCTION else "🏷️ "
        log(f"{mark} Model {name} v{versions[flavor]} is now @{alias}{moved}; medical validation: {status}")


# ---- loading ----------------------------------------------------------------------------------

def resolve_version(client, name: str, alias: str | None = None, version: str | None = None):
    """The model version named by alias or number; the highest version when neither is given."""
    from mlflow.exceptions import MlflowException

    try:
        if version is not None:
            return client.get_model_version(name, str(version))
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        versions = client.search_model_versions(f"name='{name}'", order_by=["version_number DESC"], max_results=1)
    except MlflowException as exc:
        what = f"version {version}" if version is not None else f"alias @{alias}"
        raise UserError(f"registered model {name} has no {what} ({exc.message.splitlines()[0]})") from None
    if not versions:
        raise UserError(f"no registered model named {name} (register one: python register_model.py --model ...)")
    return versions[0]


def onnx_twin(client, mv):
    """The ONNX flavor registered with this PyTorch version, if any."""
    if mv.name.endswith("-onnx"):
        return mv
    twin = mv.tags.get(ONNX_LINK_TAG)
    return client.get_model_version(f"{mv.name}-onnx", twin) if twin else None


def download(mv, dst: Path) -> Path:
    import mlflow


    return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{mv.name}/{mv.version}", dst_path=str(dst)))


def load_predictor(client, mv, workdir: Path, flavor: str = "auto"):
    """(predictor, version used, flavor name): ONNX Runtime when an ONNX flavor exists (auto), else PyTorch;
    the int8 ONNX model only when asked for (flavor "onnx-int8") or named."""
    if flavor == INT8_FLAVOR or mv.name.endswith(f"-{INT8_FLAVOR}"):
        return load_int8_predictor(client, mv, workdir)
    twin = onnx_twin(client, mv) if flavor in ("auto", "onnx") else None
    if flavor == "onnx" and twin is None:
        raise UserError(f"{mv.name} v{mv.version} has no ONNX flavor registered")
    if twin is not None:
        from deploy.predictors import OnnxPredictor

        folder = download(twin, Path(workdir) / "onnx")
        return OnnxPredictor(next(folder.rglob("*.onnx"))), twin, "onnx"
    if mv.name.endswith("-onnx"):
        raise UserError(f"{mv.name} is the ONNX flavor; for PyTorch use {mv.name.removesuffix('-onnx')}")
    folder = download(mv, Path(workdir) / "pytorch")
    checkpoints = sorted(folder.rglob("*.pth"))
    if not checkpoints:
        raise UserError(f"{mv.name} v{mv.version} holds no toolkit checkpoint (was it registered by "
                        "register_model.py?)")
    from deploy.predictors import TorchPredictor

    return TorchPredictor(checkpoints[0]), mv, "pytorch"


# ---- the int8 ONNX model: a third registered model, brain-cancer-{model}-onnx-int8 ----------------------
INT8_FLAVOR = "onnx-int8"
INT8_LINK_TAG = "onnx_int8_version"  # on the PyTorch and ONNX versions of the same release


def int8_registered_name(model: str) -> dict[str, str]:
    return {INT8_FLAVOR: f"brain-cancer-{model}-{INT8_FLAVOR}"}


def log_int8_flavor(int8_path: Path, example, extra_files: list[Path]) -> str:
    """Log the int8 ONNX file into the active MLflow run (signature from its own outputs); its model URI."""
    import mlflow
    import onnx
    import onnxruntime
    from mlflow.models import infer_signature

    from deploy.predictors import OnnxPredictor

    signature = infer_signature(example, OnnxPredictor(int8_path, providers=["CPUExecutionProvider"]).logits(example))
    info = mlflow.onnx.log_model(onnx_model=onnx.load(str(int8_path)), name="onnx_int8_model", signature=signature,
                                 input_example=example, extra_files=[str(p) for p in extra_files],
                                 save_as_external_data=False, onnx_execution_providers=["CPUExecutionProvider"],
                                 pip_requirements=[f"onnxruntime=={onnxruntime.__version__}"])
    return info.model_uri


def int8_twin(client, mv):
    """The int8 ONNX version registered with this PyTorch or ONNX version (or the int8 version itself)."""
    if mv.name.endswith(f"-{INT8_FLAVOR}"):
        return mv
    linked = mv.tags.get(INT8_LINK_TAG)
    if not linked:
        raise UserError(f"{mv.name} v{mv.version} has no int8 model registered (python register_model.py ... --int8)")
    return client.get_model_version(f"{mv.name.removesuffix('-onnx')}-{INT8_FLAVOR}", linked)


def load_int8_predictor(client, mv, workdir: Path):
    """(OnnxPredictor of the int8 file on the CPU provider, the int8 version, "onnx-int8")."""
    from deploy.predictors import OnnxPredictor

    twin = int8_twin(client, mv)
    folder = download(twin, Path(workdir) / INT8_FLAVOR)
    files = sorted(folder.rglob("*.onnx"))
    if not files:
        raise UserError(f"{twin.name} v{twin.version} holds no ONNX file")
    predictor = OnnxPredictor(files[0], providers=["CPUExecutionProvider"])
    if predictor.contract.extra.get("precision") != "int8":
        raise UserError(f"{twin.name} v{twin.version} is not an int8 model (its contract says precision "
                        f"{predictor.contract.extra.get('precision', 'fp32')})")
    return predictor, twin, INT8_FLAVOR
