"""Model zoo: the eight models as a table (name -> builder + recipe), not an if/elif chain.

ImageNet weights come from a local file (--weights) or the torch hub cache (downloaded there when
missing). Either way nothing in them is executed: torch.load(weights_only=True) unpickles tensors and
plain types only, and a file named as the hub names it (resnet18-f37072fd.pth) must match the sha256
prefix in its name, also when it was already in the cache.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from core.errors import UserError
from core.model_names import IMAGENET_WEIGHTS

# timm's port of Chollet's original Xception (the name timm 0.9+ gives the old "xception").
XCEPTION_TIMM_NAME = "legacy_xception"
# torch.hub's naming rule: name-<first hex digits of the file's sha256>.pth (torch.hub.HASH_REGEX)
HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "torchvision" | "timm"
    default_img_size: int
    frozen_prefixes: tuple[str, ...]  # parameter-name prefixes frozen by definition of the model
    build: Callable[..., nn.Module]  # num_classes (and img_size when sized) -> randomly initialised model
    load_pretrained: Callable[[nn.Module, dict], None] | None  # ImageNet state dict -> backbone (head kept)
    torchvision_weights: str | None  # weights enum name, for the torch hub cache / download
    timm_name: str | None = None  # timm model name, for the HF hub cache / download
    sized: bool = False  # build takes the image size too (a ViT's position embeddings depend on it)


class BackboneWithHead(nn.Module):
    """A feature extractor (.backbone) giving flat features, then a small classifier (.head)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, freeze_backbone: bool = False):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> BackboneWithHead:
        super().train(mode)
        # Frozen means frozen: BatchNorm running stats must not drift while the head trains.
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _medical_head(in_features: int, num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Dropout(0.3), nn.Linear(in_features, 128), nn.ReLU(inplace=True),
        nn.Dropout(0.25), nn.Linear(128, num_classes),
    )


# ---- builders: one per family / head kind ----

def _torchvision(arch: str) -> Callable[[int], nn.Module]:
    return lambda num_classes: torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def _vit(num_classes: int, img_size: int) -> nn.Module:
    # built for the image size it is trained at (the demo's 64 px: 16 patches), not only for 224
    return torchvision.models.vit_b_16(weights=None, num_classes=num_classes, image_size=img_size)


def _medical_cnn(num_classes: int) -> nn.Module:
    effnet = torchvision.models.efficientnet_b0(weights=None)
    backbone = nn.Sequential(effnet.features, effnet.avgpool, nn.Flatten(1))
    return BackboneWithHead(backbone, _medical_head(1280, num_classes), freeze_backbone=True)


def _xception_medical(num_classes: int) -> nn.Module:
    import timm  # lazy: timm is slow to import and only this model needs it

    backbone = timm.create_model(XCEPTION_TIMM_NAME, pretrained=False, num_classes=0)  # pooled features
    return BackboneWithHead(backbone, _medical_head(backbone.num_features, num_classes))


# ---- loaders: ImageNet state dict (original classifier included) -> backbone ----

def _load_into(target: nn.Module, state: dict, skip: tuple[str, ...] = ()) -> None:
    """Strict load of everything but the keys under `skip` (the head); one-line ValueError on mismatch."""
    own = {k: v for k, v in target.state_dict().items() if not k.startswith(skip)}
    given = {k: v for k, v in state.items() if not k.startswith(skip)}
    # pre-0.4.1 torchvision files lack BatchNorm's counter; BatchNorm fills it in itself
    missing = [k for k in own if k not in given and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in own]
    wrong = [k for k in own.keys() & given.keys() if own[k].shape != given[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{len(missing)} missing keys {missing[:2]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:2]}, {len(wrong)} shape mismatches {sorted(wrong)[:2]}")
    target.load_state_dict(given, strict=False)


def _skip_head(head_prefix: str) -> Callable[[nn.Module, dict], None]:
    return lambda model, state: _load_into(model, state, skip=(head_prefix,))


def _load_medical_cnn(model: nn.Module, state: dict) -> None:
    # backbone is Sequential(features, avgpool, flatten): torchvision's "features.*" is our "0.*"
    renamed = {("0." + k.removeprefix("features.") if k.startswith("features.") else k): v
               for k, v in state.items()}
    _load_into(model.backbone, renamed, skip=("classifier.",))


def _load_vit(model: nn.Module, state: dict) -> None:
    """ImageNet's 224 px position embeddings, resampled to the model's grid when it is built for another size."""
    from torchvision.models.vision_transformer import interpolate_embeddings

    key = "encoder.pos_embedding"
    if key in state and state[key].shape != model.encoder.pos_embedding.shape:
        state = interpolate_embeddings(model.image_size, model.patch_size, state)
    _load_into(model, state, skip=("heads.",))


def _load_xception(model: nn.Module, state: dict) -> None:
    _load_into(model.backbone, state, skip=("fc.",))


def _tv(name: str, head_prefix: str) -> ModelSpec:
    return ModelSpec(name, "torchvision", 224, (), _torchvision(name), _skip_head(head_prefix), IMAGENET_WEIGHTS[name])


# The ImageNet weights of each model are written once, torch-free, in core.model_names.
MODEL_SPECS: dict[str, ModelSpec] = {s.name: s for s in [
    _tv("resnet18", "fc."),
    _tv("resnet50", "fc."),
    _tv("efficientnet_b0", "classifier."),
    _tv("swin_t", "head."),
    _tv("swin_s", "head."),
    ModelSpec("vit_b_16", "torchvision", 224, (), _vit, _load_vit, IMAGENET_WEIGHTS["vit_b_16"], sized=True),
    ModelSpec("medical_cnn", "torchvision", 224, ("backbone.",), _medical_cnn, _load_medical_cnn,
              IMAGENET_WEIGHTS["medical_cnn"]),
    ModelSpec("xception_medical", "timm", 299, (), _xception_medical, _load_xception, None,
              timm_name=XCEPTION_TIMM_NAME),
]}


def model_names() -> list[str]:
    return list(MODEL_SPECS)


def get_spec(name: str) -> ModelSpec:
    if name not in MODEL_SPECS:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_SPECS)}")
    return MODEL_SPECS[name]


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def check_hash(path: Path) -> None:
    """A file named name-<hex>.pth must have a sha256 that starts with <hex> (torch.hub checks it only while
    downloading; a file already in the cache, or copied to an air-gapped site, is checked here)."""
    match = HASH_IN_NAME.search(path.name)
    if match is None:
        return
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    if not h.hexdigest().startswith(match.group(1)):
        raise UserError(f"weights file {path} does not match the sha256 in its name ({match.group(1)}...): "
                        "damaged or replaced; delete it and fetch it again")


def _read_weights_file(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"weights file {path} not found")
    check_hash(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and weights_only errors all mean "not a usable file"
        raise UserError(f"weights file {path} is unreadable: {_one_line(err)}") from None
    for key in ("state_dict", "model_state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"weights file {path} holds no state dict (tensors by parameter name)")
    return {k.removeprefix("module."): v for k, v in obj.items()}  # DataParallel/DDP prefix


TORCHVISION_WEIGHTS_NAME = re.compile(r"^[A-Za-z0-9_]+_Weights\.[A-Za-z0-9_]+$")  # ResNet50_Weights.IMAGENET1K_V2


def is_weights_name(value) -> bool:
    """A torchvision weights name (config `weights: ResNet50_Weights.IMAGENET1K_V2`), not a local file."""
    return isinstance(value, str) and bool(TORCHVISION_WEIGHTS_NAME.match(value)) and not Path(value).exists()


def weights_name_for(spec: ModelSpec, weights: str | Path | None) -> str | None:
    """The torchvision weights a build loads: a name given in the config, else the zoo's (None: timm's)."""
    if not is_weights_name(weights):
        return spec.torchvision_weights
    default = spec.torchvision_weights
    if default is None or str(weights).split(".")[0] != default.split(".")[0]:
        raise UserError(f"weights {weights} do not fit {spec.name} (its torchvision weights are "
                        f"{default.split('.')[0] if default else 'none: timm weights or a local file'})")
    try:
        torchvision.models.get_weight(str(weights))
    except (ValueError, KeyError, AttributeError):
        raise UserError(f"torchvision has no weights named {weights}") from None
    return str(weights)


def weights_url(spec: ModelSpec, weights: str | Path | None = None) -> str | None:
    """Where the model's ImageNet weights are published (the file name carries their sha256 prefix); None when
    the model takes none."""
    name = weights_name_for(spec, weights)
    if name:
        return torchvision.models.get_weight(name).url
    if spec.timm_name:
        import timm  # lazy: slow to import, only xception_medical needs it

        return timm.models.get_pretrained_cfg(spec.timm_name).url
    return None


def hub_cache_file(spec: ModelSpec, weights: str | Path | None = None) -> tuple[Path, str] | None:
    """Where a pretrained build looks before downloading ($TORCH_HOME/hub/checkpoints/<file>) and the URL it
    would download from; None when the model takes no ImageNet weights."""
    url = weights_url(spec, weights)
    return None if url is None else (Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name, url)


def _download_imagenet(spec: ModelSpec, weights: str | None = None) -> dict:
    """The ImageNet state dict from $TORCH_HOME/hub/checkpoints, downloaded there (hash-checked) when missing."""
    found = hub_cache_file(spec, weights)
    if found is None:
        raise UserError(f"model {spec.name} takes no pretrained weights")
    path, url = found
    if not path.is_file():
        match = HASH_IN_NAME.search(path.name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), match.group(1) if match else None, progress=True)
        except Exception as err:  # URLError, OSError, a hash mismatch...: all mean "no usable weights reachable"
            raise UserError(
                f"cannot download ImageNet weights for {spec.name} (offline?): pass --weights PATH "
                f"to a local .pth file, or --no-pretrained [{_one_line(err)}]") from None
    return _read_weights_file(path)


def build_model(name: str, num_classes: int, pretrained: bool = False,
                weights_path: str | Path | None = None, img_size: int | None = None) -> nn.Module:
    """img_size: what the model will see (only a ViT is built for it; default: the model's own size)."""
    spec = get_spec(name)
    if num_classes < 1:
        raise UserError(f"num_classes must be at least 1, got {num_classes}")
    state = None
    if weights_path is not None and not is_weights_name(weights_path):
        state = _read_weights_file(Path(weights_path))
    elif pretrained or weights_path is not None:
        state = _download_imagenet(spec, weights_path)
    model = spec.build(num_classes, img_size or spec.default_img_size) if spec.sized else spec.build(num_classes)
    if state is not None:
        if spec.load_pretrained is None:
            raise UserError(f"model {name} takes no pretrained weights")
        try:
            spec.load_pretrained(model, state)
        except (ValueError, RuntimeError) as err:
            source = f"weights file {weights_path}" if weights_path is not None else "ImageNet weights"
            raise UserError(f"{source} does not fit {name}: {_one_line(err)}") from None
    return model


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def expected_trainable(name: str, model: nn.Module) -> list[str]:
    frozen = get_spec(name).frozen_prefixes
    return [n for n, _ in model.named_parameters() if not n.startswith(frozen)]
