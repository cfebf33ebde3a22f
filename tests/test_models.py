"""Model zoo tests: shapes, what trains (the original project's linear-probe bug), weights loading."""
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


def test_a_torchvision_weights_name_loads_from_the_hub_cache(offline, tmp_path):
    """weights: ResNet18_Weights.IMAGENET1K_V1 (an original-format config) reads $TORCH_HOME's file, offline."""
    import os

    weights = torchvision.models.get_weight("ResNet18_Weights.IMAGENET1K_V1")
    state = torchvision.models.resnet18(weights=None).state_dict()
    cached = tmp_path / "torch" / "hub" / "checkpoints" / os.path.basename(weights.url)
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    model = build_model("resnet18", NUM_CLASSES, weights_path="ResNet18_Weights.IMAGENET1K_V1")
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
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
