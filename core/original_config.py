"""Configs written for the original project, translated key by key into this toolkit's format.

The original's config.yaml (its README shows it) named each model twice (`models.resnet18.name`),
repeated the class count per model (`num_classes`), kept a global `dataset.batch_size`, named
ImageNet weights as Python expressions it eval'd (`weights: "models.ResNet18_Weights.IMAGENET1K_V1"`)
and put the MLflow settings flat under `monitoring`. Each such key is translated here, with one
notice saying what it became. A models entry that cannot mean anything is set aside with its reason: the run
that selects it is refused, the others never are (the original's own file names EfficientNet weights under
`xception_medical`, which it built on an EfficientNet-B0 backbone).
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

from core.errors import UserError
from core.model_names import IMAGENET_WEIGHTS, MODEL_NAMES

# "models.ResNet18_Weights.IMAGENET1K_V1", "torchvision.models.ResNet18_Weights.DEFAULT", "ResNet18_Weights.V1"
WEIGHTS_NAME = re.compile(r"^(?:torchvision\.)?(?:models\.)?(?P<enum>[A-Za-z0-9_]+_Weights)\.(?P<tag>[A-Za-z0-9_]+)$")
NO_WEIGHTS = {"", "none", "null", "false", "random"}
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def translate_original(data: dict, source: str) -> tuple[dict, list[str], dict[str, str]]:
    """(data in this toolkit's format, one notice per translated key, {model: why its entry was set aside}).
    `source` names the file in messages."""
    data = copy.deepcopy(data)
    notices: list[str] = []
    unusable: dict[str, str] = {}
    if isinstance(data.get("models"), dict):
        _translate_models(data, source, notices, unusable)
    if isinstance(data.get("dataset"), dict) and "batch_size" in data["dataset"]:
        _translate_batch_size(data, source, notices)
    if isinstance(data.get("monitoring"), dict):
        _translate_monitoring(data["monitoring"], source, notices)
    return data, notices, unusable


def _translate_models(data: dict, source: str, notices: list[str], unusable: dict[str, str]) -> None:
    models = data["models"]
    for key in list(models):
        if not isinstance(models[key], dict):
            continue
        try:
            _translate_recipe(data, key, source, notices)
        except UserError as exc:  # refused only if the run selects this model (core.config.load_config)
            models.pop(key, None)
            unusable[key] = str(exc)


def _translate_recipe(data: dict, key: str, source: str, notices: list[str]) -> None:
    recipe = data["models"][key]
    if "name" in recipe:
        key = _translate_name(data, key, source, notices)
        recipe = data["models"][key]
    if "num_classes" in recipe:
        _translate_num_classes(data, key, recipe.pop("num_classes"), source, notices)
    if "weights" in recipe and isinstance(recipe["weights"], str) and not _is_local_file(recipe["weights"]):
        _translate_weights(key, recipe, source, notices)


def _translate_name(data: dict, key: str, source: str, notices: list[str]) -> str:
    """`models.<key>.name`: the table key already names the model; a key the zoo does not know takes the name."""
    models = data["models"]
    name = models[key].pop("name")
    if name == key:
        notices.append(f"{source}: models.{key}.name dropped (the table key names the model)")
        return key
    if key in MODEL_NAMES or name not in MODEL_NAMES:
        raise UserError(f"{source}: models.{key}.name is {name!r}: a models entry describes one model of the zoo "
                        f"({', '.join(MODEL_NAMES)}); name the entry after it")
    models[name] = {**models.get(name, {}), **models.pop(key)}
    renamed = data.get("model") == key
    if renamed:
        data["model"] = name
    notices.append(f"{source}: models.{key} (name: {name}) read as models.{name}"
                   + (f"; model: {key} selects {name}" if renamed else ""))
    return name


def _translate_num_classes(data: dict, key: str, value, source: str, notices: list[str]) -> None:
    """The class count comes from the data set's class folders; a stated count is kept as a check on them."""
    dataset = data.setdefault("dataset", {})
    if not isinstance(dataset, dict):
        return
    earlier = dataset.get("num_classes")
    if earlier is not None and earlier != value:
        raise UserError(f"{source}: models.{key}.num_classes is {value} but another model says {earlier}: "
                        "every model is trained on the same class folders")
    dataset["num_classes"] = value
    notices.append(f"{source}: models.{key}.num_classes: {value} -> dataset.num_classes (the class folders "
                   f"decide; a data set with another count is refused)")


def _is_local_file(value: str) -> bool:
    return value.endswith((".pth", ".pt", ".bin", ".safetensors")) or "/" in value or Path(value).is_file()


def _translate_weights(key: str, recipe: dict, source: str, notices: list[str]) -> None:
    """A torchvision weights name (the original eval'd it) -> pretrained, from the hub cache or a download."""
    text = recipe.pop("weights").strip()
    if text.lower() in NO_WEIGHTS:
        recipe["pretrained"] = False
        notices.append(f"{source}: models.{key}.weights: {text!r} -> pretrained: false")
        return
    default = IMAGENET_WEIGHTS.get(key)
    if key == "xception_medical" and WEIGHTS_NAME.match(text):
        recipe["pretrained"] = True
        notices.append(f"{source}: models.xception_medical.weights: {text!r} -> pretrained: true (the original built "
                       f"xception_medical on an EfficientNet-B0 backbone; this toolkit's is a real Xception, "
                       f"pretrained from its own ImageNet weights, or set pretrained: false)")
        return
    match = WEIGHTS_NAME.match(text)
    enum, tag = (match["enum"], match["tag"]) if match else (None, text)
    if default is None or (enum is None and not re.fullmatch(r"[A-Z0-9_]+", tag)):
        raise UserError(f"{source}: models.{key}.weights is {text!r}: expected torchvision weights such as "
                        f"{default or 'ResNet18_Weights.IMAGENET1K_V1'} or a local .pth file")
    default_enum, default_tag = default.split(".")
    if enum is not None and enum != default_enum:
        raise UserError(f"{source}: models.{key}.weights names {enum}, which are not {key}'s weights "
                        f"({default_enum})")
    recipe["pretrained"] = True
    if tag == default_tag:
        notices.append(f"{source}: models.{key}.weights: {text!r} -> pretrained: true ({default}, from "
                       f"the torch hub cache or a download; --weights PATH for a local file)")
        return
    recipe["weights"] = f"{default_enum}.{tag}"  # resolved by torchvision when the model is built
    notices.append(f"{source}: models.{key}.weights: {text!r} -> pretrained: true, weights: {default_enum}.{tag}")


def _translate_batch_size(data: dict, source: str, notices: list[str]) -> None:
    """dataset.batch_size applied to every model the file gives no batch size of its own."""
    value = data["dataset"].pop("batch_size")
    models = data.setdefault("models", {})
    if not isinstance(models, dict):
        return
    given = [m for m in MODEL_NAMES if isinstance(models.get(m), dict) and "batch_size" in models[m]]
    filled = [m for m in MODEL_NAMES if m not in given]
    for m in filled:
        models.setdefault(m, {})["batch_size"] = value
    kept = f"; {', '.join(given)} keep their own" if given else ""
    notices.append(f"{source}: dataset.batch_size: {value} -> models.<model>.batch_size of "
                   f"{', '.join(filled) or 'no model'}{kept}")


def _translate_monitoring(mon: dict, source: str, notices: list[str]) -> None:
    if "mlflow_experiment_name" in mon:
        prefix = mon.pop("mlflow_experiment_name")
        _mlflow(mon)["experiment_prefix"] = prefix
        notices.append(f"{source}: monitoring.mlflow_experiment_name: {prefix!r} -> monitoring.mlflow."
                       f"experiment_prefix (experiments {prefix}-v2-<model>, {prefix}-evaluation-<model>, ...)")
    if "mlflow_tracking_uri" in mon:
        uri = str(mon.pop("mlflow_tracking_uri"))
        if re.match(r"^[a-z][a-z0-9+.-]*://", uri) and not uri.startswith("file:"):
            _mlflow(mon)["tracking_uri"] = uri
            notices.append(f"{source}: monitoring.mlflow_tracking_uri -> monitoring.mlflow.tracking_uri: {uri}")
        else:
            _mlflow(mon)["tracking_uri"] = DEFAULT_TRACKING_URI
            notices.append(f"{source}: monitoring.mlflow_tracking_uri: {uri!r} is a file store, which MLflow 3 "
                           f"refuses and whose registry never worked -> {DEFAULT_TRACKING_URI} (old runs: "
                           f"mlflow migrate-filestore)")


def _mlflow(mon: dict) -> dict:
    section = mon.setdefault("mlflow", {})
    if not isinstance(section, dict):
        raise UserError("monitoring.mlflow must be a section (enabled, tracking_uri, ...)")
    return section
