"""MLflow Model Registry: the store, the versions of a checkpoint's PyTorch and ONNX flavors, and loading them
back by alias or version (by default @production).

Stages are deprecated in MLflow 3: versions carry aliases (`staging`, `production`) and a `semver` tag
(an alias cannot hold dots). A version of `brain-cancer-{model}` (PyTorch, torch.export format) is tagged
with the number of its twin in `brain-cancer-{model}-onnx`, so inference can pick the ONNX flavor, and (when
registered with --int8) of its int8 twin in `brain-cancer-{model}-onnx-int8`, served only when asked for.
The gate policy (who may hold @production) is deploy/policy.py; moving aliases is deploy/aliases.py.
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from core.errors import UserError
from core.model_names import MODEL_NAMES
from deploy.policy import PRODUCTION, STAGING

# semver.org's regular expression (2.0.0): MAJOR.MINOR.PATCH[-prerelease][+build]
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
                    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
                    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$")
ALIAS = re.compile(r"^[A-Za-z0-9_-]{1,255}$")  # MLflow's alias characters
ONNX_LINK_TAG = "onnx_version"
INT8_FLAVOR = "onnx-int8"
INT8_LINK_TAG = "onnx_int8_version"  # on the PyTorch and ONNX versions of a release registered with --int8
PICKLE_SWITCH = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"  # MLflow's environment switch for pickle on load


REGISTERED_PREFIX = "brain-cancer-"  # brain-cancer-{model}: the one place a registered name is derived


def flavor_name(name: str, flavor: str) -> str:
    """The registered name of one flavor of a release, from its PyTorch name (brain-cancer-resnet18-onnx)."""
    return name if flavor == "pytorch" else f"{name}-{flavor}"


def registered_names(model: str) -> dict[str, str]:
    name = f"{REGISTERED_PREFIX}{model}"
    return {"pytorch": name, "onnx": flavor_name(name, "onnx")}


def registered_name(name: str) -> str:
    """A registered model name; a zoo name (resnet18) stands for its PyTorch flavor (brain-cancer-resnet18)."""
    return registered_names(name)["pytorch"] if name in MODEL_NAMES else name


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
    if alias != alias.lower() and alias.lower() in (PRODUCTION, STAGING):
        raise UserError(f"--alias {alias!r}: aliases are case-sensitive; use {alias.lower()}")
    return alias


def parse_tags(items: list[str]) -> dict[str, str]:
    tags = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--tags expects key=value, got {item!r}")
        tags[key.strip()] = value.strip()
    return tags


# ---- store ------------------------------------------------------------------------------------

def connect(section):
    """An MlflowClient on the configured store (tracking and registry alike)."""
    from core.tracking import _probe_http, prepare_mlflow

    prepare_mlflow(section)
    import mlflow
    from mlflow import MlflowClient

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


def find_release(client, name: str, semver: str):
    """The version of `name` tagged with this semantic version, or None."""
    found = client.search_model_versions(f"name='{name}' and tags.semver='{semver}'")
    return found[0] if found else None


def named_outputs(outputs: tuple) -> dict:
    """A model's outputs by the names the contract gives them (logits, then the feature-space distance)."""
    import numpy as np

    from core.contract import OUTPUT_NAME
    from core.feature_ood import OOD_OUTPUT

    return {name: np.asarray(o.detach() if hasattr(o, "detach") else o)
            for name, o in zip((OUTPUT_NAME, OOD_OUTPUT), outputs)}


def log_flavors(model, onnx_path: Path, example, extra_files: list[Path]) -> dict[str, str]:
    """Log both flavors into the active MLflow run, with signature and a real input example; their URIs."""
    import mlflow
    import onnx
    import onnxruntime
    import torch
    from mlflow.models import infer_signature

    from deploy.predictors import default_providers

    with torch.no_grad():
        out = model(torch.from_numpy(example))
    signature = infer_signature(example, named_outputs(out if isinstance(out, tuple) else (out,)))
    extras = [str(p) for p in extra_files]
    if len(example) < 2:  # a batch of 1 would make torch.export fix the batch size
        example = example.repeat(2, axis=0)
    # pt2 (torch.export): raw tensor records, no pickled module; the example has batch 2 so the batch stays
    # dynamic. torch.export.load would unpickle a crafted archive: load it only through load_pytorch_flavor
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
    from core.redaction import redact_text

    if not run_id:
        return None
    uri = redact_text(uri)  # the link goes into the model card and the registered version's description
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


# ---- loading ----------------------------------------------------------------------------------

def resolve_version(client, name: str, alias: str | None = None, version: str | None = None):
    """The model version named by number or alias; @production when neither is given (never simply the newest)."""
    from mlflow.exceptions import MlflowException

    try:
        if version is not None:
            return client.get_model_version(name, str(version))
        return client.get_model_version_by_alias(name, alias or PRODUCTION)
    except MlflowException as exc:
        if version is None:
            raise UserError(missing_alias_line(client, name, alias or PRODUCTION)) from None
        raise UserError(f"registered model {name} has no version {version} ({exc.message.splitlines()[0]})") from None


def missing_alias_line(client, name: str, alias: str = PRODUCTION) -> str:
    """Why no version was chosen, naming the aliases and versions that do exist."""
    from mlflow.exceptions import MlflowException

    try:
        versions = sorted((str(mv.version) for mv in client.search_model_versions(f"name='{name}'")), key=int)
        aliases = client.get_registered_model(name).aliases if versions else {}
    except MlflowException:
        versions, aliases = [], {}
    if not versions:
        return (f"no registered model named {name} (train with registry.auto_register on, or register one: "
                "python register_model.py --model MODEL --version 1.0.0)")
    held = " or ".join(f"--alias {a} (v{v})" for a, v in sorted(aliases.items()))
    return (f"{name} has no @{alias} version; choose {held + ' or ' if held else ''}"
            f"--version {'|'.join(versions)} (or promote one: python deploy_model.py promote ...)")


def onnx_twin(client, mv):
    """The ONNX flavor registered with this PyTorch version, if any."""
    if mv.name.endswith("-onnx"):
        return mv
    twin = mv.tags.get(ONNX_LINK_TAG)
    return client.get_model_version(flavor_name(mv.name, "onnx"), twin) if twin else None


def download(mv, dst: Path) -> Path:
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{mv.name}/{mv.version}", dst_path=str(dst)))


@contextlib.contextmanager
def pickle_guard():
    """MLflow's pickle-free check, on whatever the environment says: a pt2 archive loads only when every record is
    plain metadata or passes torch's weights_only unpickler (torch.export.load alone would unpickle the rest)."""
    import mlflow
    import mlflow.pytorch

    if not hasattr(mlflow.pytorch, "_validate_pt2_archive_is_pickle_free"):
        raise UserError(f"MLflow {mlflow.__version__} cannot check a pt2 archive for pickled code; upgrade MLflow")
    saved = os.environ.get(PICKLE_SWITCH)
    os.environ[PICKLE_SWITCH] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(PICKLE_SWITCH, None)
        else:
            os.environ[PICKLE_SWITCH] = saved


def load_pytorch_flavor(model_uri: str):
    """The registered PyTorch (pt2) flavor as a module, loaded with MLflow's pickle guard on."""
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    with pickle_guard():
        try:
            return mlflow.pytorch.load_model(model_uri)
        except MlflowException as exc:
            raise UserError(f"refused to load {model_uri}: {exc.message.splitlines()[0]}") from None


def onnx_artifact(client, mv, workdir: Path, flavor: str = "auto"):
    """(the version's ONNX file, downloaded; the version it belongs to; "onnx" or "onnx-int8"), or None when the
    flavor asked for is PyTorch or the version has no ONNX flavor (auto). The int8 file only when asked for
    (flavor "onnx-int8") or named."""
    if flavor == INT8_FLAVOR or (flavor == "auto" and mv.name.endswith(f"-{INT8_FLAVOR}")):
        twin = int8_twin(client, mv)
        files = sorted(download(twin, Path(workdir) / INT8_FLAVOR).rglob("*.onnx"))
        if not files:
            raise UserError(f"{twin.name} v{twin.version} holds no ONNX file")
        return files[0], twin, INT8_FLAVOR
    if mv.name.endswith(f"-{INT8_FLAVOR}"):
        raise UserError(f"{mv.name} is the int8 ONNX model; for the {flavor} flavor use "
                        f"{mv.name.removesuffix('-' + INT8_FLAVOR)}")
    twin = onnx_twin(client, mv) if flavor in ("auto", "onnx") else None
    if flavor == "onnx" and twin is None:
        raise UserError(f"{mv.name} v{mv.version} has no ONNX flavor registered")
    if twin is not None:
        return next(download(twin, Path(workdir) / "onnx").rglob("*.onnx")), twin, "onnx"
    if mv.name.endswith("-onnx"):
        raise UserError(f"{mv.name} is the ONNX flavor; for PyTorch use {mv.name.removesuffix('-onnx')}")
    return None


def load_predictor(client, mv, workdir: Path, flavor: str = "auto", session_config: dict[str, str] | None = None):
    """(predictor, version used, flavor name): ONNX Runtime when an ONNX flavor exists (auto), else PyTorch;
    the int8 ONNX model only when asked for (flavor "onnx-int8") or named. `session_config`: ONNX Runtime
    session entries for the ONNX flavors."""
    found = onnx_artifact(client, mv, workdir, flavor)
    if found is not None:
        path, used, name = found
        return onnx_predictor(path, name, f"{used.name} v{used.version}", session_config), used, name
    folder = download(mv, Path(workdir) / "pytorch")
    checkpoints = sorted(folder.rglob("*.pth"))
    if not checkpoints:
        raise UserError(f"{mv.name} v{mv.version} holds no toolkit checkpoint (was it registered by "
                        "register_model.py?)")
    from deploy.predictors import TorchPredictor

    return TorchPredictor(checkpoints[0]), mv, "pytorch"


def onnx_predictor(path: Path, flavor: str, what: str, session_config: dict[str, str] | None = None,
                   threads: int | None = None):
    """An OnnxPredictor on a registered ONNX file (`what`: its name and version, for messages); the int8 file on
    the CPU provider (its QDQ kernels are CPU kernels), and refused unless its contract says int8."""
    from deploy.predictors import OnnxPredictor

    providers = ["CPUExecutionProvider"] if flavor == INT8_FLAVOR else None
    predictor = OnnxPredictor(path, providers=providers, threads=threads, session_config=session_config)
    if flavor == INT8_FLAVOR and predictor.contract.extra.get("precision") != "int8":
        raise UserError(f"{what} is not an int8 model (its contract says precision "
                        f"{predictor.contract.extra.get('precision', 'fp32')})")
    return predictor


# ---- the int8 ONNX model: a third registered model, brain-cancer-{model}-onnx-int8 ----------------------


def int8_registered_name(model: str) -> dict[str, str]:
    return {INT8_FLAVOR: flavor_name(registered_names(model)["pytorch"], INT8_FLAVOR)}


def log_int8_flavor(int8_path: Path, example, extra_files: list[Path]) -> str:
    """Log the int8 ONNX file into the active MLflow run (signature from its own outputs); its model URI."""
    import mlflow
    import onnx
    import onnxruntime
    from mlflow.models import infer_signature

    from deploy.predictors import OnnxPredictor

    outputs = OnnxPredictor(int8_path, providers=["CPUExecutionProvider"]).outputs(example)
    signature = infer_signature(example, named_outputs(tuple(o for o in outputs if o is not None)))
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
