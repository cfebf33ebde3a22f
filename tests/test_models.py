"""Model zoo tests: shapes, what trains (the original project's linear-probe bug), weights loading."""
import hashlib
import io
import pathlib
import re
import socket

import pytest
import torch
import torchvision

from core.errors import UserError
from models.zoo import (
    MODEL_SPECS,
    build_model,
    expected_trainable,
    model_names,
    trainable_parameter_names,
)

NUM_CLASSES = 3
# Small inputs keep CPU tests cheap (torchvision's Swin pads its windows); only ViT insists on 224.
TEST_SIZE = {"vit_b_16": 224}
# ViT-B at 224 costs seconds per image on CPU and has no BatchNorm, so one image per step is enough.
STEP_BATCH = {"vit_b_16": 1}


@pytest.fixture(scope="module")
def models():
    """Build each model once per module (ViT-B is 86M parameters)."""
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = build_model(name, NUM_CLASSES)
        return cache[name]

    return get


def _batch(name, n=2):
    size = TEST_SIZE.get(name, 64)
    return torch.randn(n, 3, size, size), torch.arange(n) % NUM_CLASSES


def test_table_has_the_eight_models():
    assert model_names() == ["resnet18", "resnet50", "efficientnet_b0", "swin_t", "swin_s",
                             "vit_b_16", "medical_cnn", "xception_medical"]
    assert MODEL_SPECS["xception_medical"].default_img_size == 299
    assert MODEL_SPECS["xception_medical"].family == "timm"
    assert MODEL_SPECS["medical_cnn"].frozen_prefixes == ("backbone.",)


@pytest.mark.parametrize("name", model_names())
def test_forward_shape(models, name):
    model = models(name).eval()
    x, _ = _batch(name)
    with torch.no_grad():
        assert model(x).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("name", model_names())
def test_optimizer_updates_every_unfrozen_parameter(models, name):
    """Regression: the original handed only the head to the optimizer for six of eight models."""
    model = models(name).train()
    assert trainable_parameter_names(model) == expected_trainable(name, model)
    frozen = MODEL_SPECS[name].frozen_prefixes
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    x, y = _batch(name, STEP_BATCH.get(name, 2))
    # Two steps: torchvision's ViT zero-initialises its head, so the backbone gets no gradient on step one.
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    unchanged = [n for n, p in model.named_parameters() if not n.startswith(frozen) and torch.equal(p, before[n])]
    moved_frozen = [n for n, p in model.named_parameters() if n.startswith(frozen) and not torch.equal(p, before[n])]
    assert unchanged == [], f"{name}: {len(unchanged)} trainable parameters did not move, e.g. {unchanged[:3]}"
    assert moved_frozen == []


def test_medical_cnn_backbone_frozen_and_in_eval(models):
    model = models("medical_cnn")
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    model.train()
    assert model.training and model.head.training
    assert not any(m.training for m in model.backbone.modules())
    stats = {n: b.clone() for n, b in model.backbone.named_buffers()}
    model(_batch("medical_cnn")[0])
    assert all(torch.equal(b, stats[n]) for n, b in model.backbone.named_buffers())  # BN stats untouched


def test_xception_medical_is_a_real_xception(models):
    model = models("xception_medical")
    assert type(model.backbone).__name__ == "Xception"
    assert "SeparableConv2d" in {type(m).__name__ for m in model.backbone.modules()}
    assert not isinstance(model.backbone, torchvision.models.EfficientNet)
    assert model.head[1].in_features == 2048
    assert all(p.requires_grad for p in model.parameters())


def test_unknown_model_is_a_user_error():
    with pytest.raises(UserError, match="unknown model 'resnet19'; choose one of: resnet18"):
        build_model("resnet19", NUM_CLASSES)


def test_weights_path_loads_backbone_and_keeps_new_head(tmp_path):
    torch.manual_seed(1)
    imagenet = torchvision.models.resnet18(weights=None, num_classes=1000).state_dict()
    path = tmp_path / "resnet18 imagenet.pth"
    torch.save({"state_dict": imagenet}, path)
    model = build_model("resnet18", NUM_CLASSES, weights_path=path)
    state = model.state_dict()
    assert torch.equal(state["conv1.weight"], imagenet["conv1.weight"])
    assert torch.equal(state["layer4.1.bn2.running_var"], imagenet["layer4.1.bn2.running_var"])
    assert model.fc.out_features == NUM_CLASSES


def test_corrupt_or_missing_weights_file_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="bad.pth is unreadable"):
        build_model("resnet18", NUM_CLASSES, weights_path=bad)
    with pytest.raises(UserError, match="not found"):
        build_model("resnet18", NUM_CLASSES, weights_path=tmp_path / "absent.pth")


def test_wrong_architecture_weights_file_is_a_user_error(tmp_path):
    foreign = tmp_path / "foreign.pth"
    torch.save(torch.nn.Linear(4, 2).state_dict(), foreign)
    with pytest.raises(UserError, match="foreign.pth does not fit resnet18"):
        build_model("resnet18", NUM_CLASSES, weights_path=foreign)
    shaped = torchvision.models.resnet18(weights=None).state_dict()
    shaped["conv1.weight"] = torch.zeros(64, 1, 7, 7)  # a grayscale stem
    torch.save(shaped, tmp_path / "gray.pth")
    with pytest.raises(UserError, match="1 shape mismatches"):
        build_model("resnet18", NUM_CLASSES, weights_path=tmp_path / "gray.pth")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Empty caches and no network: any connection attempt fails at once."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:  # huggingface_hub reads its env at import: patch the constants it already holds
        import huggingface_hub.constants as hf_constants
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    except ImportError:
        pass

    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.parametrize("name", ["resnet18", "xception_medical"])
def test_pretrained_offline_without_cache_is_a_user_error(offline, name):
    with pytest.raises(UserError, match="--weights") as info:
        build_model(name, NUM_CLASSES, pretrained=True)
    assert f"cannot download ImageNet weights for {name}" in str(info.value)
    assert "\n" not in str(info.value)


def test_torch_free_name_list_matches_the_table():
    from core.model_names import MODEL_NAMES

    assert tuple(model_names()) == MODEL_NAMES


class RunsCode:
    """A pickle that would create a file when unpickled: what a crafted weights file does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def hub_file(folder, payload: bytes, stem: str = "resnet18") -> pathlib.Path:
    """A file named as torch.hub names published weights: stem-<sha256 prefix>.pth."""
    path = folder / f"{stem}-{hashlib.sha256(payload).hexdigest()[:8]}.pth"
    path.write_bytes(payload)
    return path


def saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_hub_weights_are_hash_checked_and_never_run_code(tmp_path, monkeypatch):
    import models.zoo

    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    reference = torchvision.models.resnet18(weights=None).state_dict()
    good = hub_file(cache, saved(reference))
    monkeypatch.setattr(models.zoo, "weights_url", lambda spec, weights=None: f"https://weights.invalid/{good.name}")
    model = build_model("resnet18", NUM_CLASSES, pretrained=True)  # from the cache, checked, no download
    assert torch.equal(model.conv1.weight, reference["conv1.weight"])

    good.write_bytes(saved({k: v + 1 for k, v in reference.items()}))  # replaced in the cache under its name
    with pytest.raises(UserError, match="does not match the sha256 in its name"):
        build_model("resnet18", NUM_CLASSES, pretrained=True)
    with pytest.raises(UserError, match="does not match the sha256 in its name"):
        build_model("resnet18", NUM_CLASSES, weights_path=good)  # a hub file copied to an air-gapped site too

    marker = tmp_path / "code ran"
    evil = hub_file(cache, saved({"conv1.weight": RunsCode(marker)}), stem="evil")  # its own hash: it passes that
    monkeypatch.setattr(models.zoo, "weights_url", lambda spec, weights=None: f"https://weights.invalid/{evil.name}")
    with pytest.raises(UserError, match="is unreadable"):
        build_model("resnet18", NUM_CLASSES, pretrained=True)
    assert not marker.exists()  # weights_only=True unpickled nothing that runs


def test_a_torchvision_weights_name_loads_from_the_hub_cache(offline, tmp_path):
    """weights: ResNet18_Weights.IMAGENET1K_V1 (an original-format config) reads $TORCH_HOME's file of that name,
    offline, and checks it like any hub file."""
    import os

    weights = torchvision.models.get_weight("ResNet18_Weights.IMAGENET1K_V1")
    state = torchvision.models.resnet18(weights=None).state_dict()
    cached = tmp_path / "torch" / "hub" / "checkpoints" / os.path.basename(weights.url)
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)  # not the published bytes: the name's sha256 prefix proves which file was read
    with pytest.raises(UserError, match=re.escape(str(cached)) + ".*does not match the sha256 in its name"):
        build_model("resnet18", NUM_CLASSES, weights_path="ResNet18_Weights.IMAGENET1K_V1")
    with pytest.raises(UserError, match="cannot download ImageNet weights for resnet50"):
        build_model("resnet50", NUM_CLASSES, weights_path="ResNet50_Weights.IMAGENET1K_V2")
    with pytest.raises(UserError, match="do not fit resnet18"):
        build_model("resnet18", NUM_CLASSES, weights_path="ResNet50_Weights.IMAGENET1K_V2")


def test_vit_is_built_for_the_image_size_it_sees(tmp_path):
    """vit_b_16 at the demo's 64 px: 16 patches; ImageNet's 224 px position embeddings are resampled to fit, and
    a checkpoint rebuilds at its own size."""
    from models.loading import model_from_checkpoint

    state = torchvision.models.vit_b_16(weights=None).state_dict()
    torch.save(state, tmp_path / "vit224.pth")
    model = build_model("vit_b_16", NUM_CLASSES, weights_path=tmp_path / "vit224.pth", img_size=64)
    assert model.encoder.pos_embedding.shape == (1, 17, 768)
    assert torch.equal(model.conv_proj.weight, state["conv_proj.weight"])
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, NUM_CLASSES)
    ckpt = {"model_name": "vit_b_16", "class_names": ["a", "b", "c"], "img_size": 64, "model_state": model.state_dict()}
    rebuilt = model_from_checkpoint(ckpt)
    x = torch.randn(1, 3, 64, 64)
    assert torch.allclose(rebuilt(x), model.eval()(x))
