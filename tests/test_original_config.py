"""Configs in the original project's format load, translated key by key with one notice each."""
import pytest
import yaml

from core.config import load_config
from core.errors import UserError
from core.model_names import MODEL_NAMES
from tests.conftest import run_script, write_overlay
from tests.original_readme import original_config_yaml


def write_config(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def notes(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]


def test_the_original_readmes_config_loads_with_one_notice_per_translated_key(tmp_path, capsys):
    path = write_config(tmp_path, original_config_yaml())
    cfg = load_config(path)
    lines = notes(capsys)
    # name, num_classes and weights of its four models, dataset.batch_size, and the two flat MLflow keys
    assert len(lines) == 4 * 3 + 1 + 2, lines
    assert all(str(path) in line for line in lines)
    for model in ("resnet18", "swin_t", "efficientnet_b0", "vit_b_16"):
        assert cfg.models[model].pretrained and cfg.models[model].weights is None
        assert sum(f"models.{model}." in line for line in lines) == 3
    assert cfg.models["swin_t"].lr == 0.0001 and cfg.train.epochs == 50
    # dataset.batch_size: 32 reaches every model, since the file gives none its own
    assert {m: cfg.models[m].batch_size for m in MODEL_NAMES} == dict.fromkeys(MODEL_NAMES, 32)
    assert cfg.dataset.num_classes == 3
    assert cfg.monitoring.mlflow.experiment_prefix == "brain-cancer-mri"
    # ./mlruns is a file store MLflow 3 refuses: the local database instead, and the notice says so
    assert cfg.monitoring.mlflow.tracking_uri == "sqlite:///mlflow.db"
    assert any("file store" in line and "migrate-filestore" in line for line in lines)


def test_batch_size_of_a_model_the_file_sets_is_kept(tmp_path, capsys):
    path = write_config(tmp_path, "dataset: {batch_size: 24}\nmodels:\n  swin_s: {batch_size: 4}\n")
    cfg = load_config(path)
    assert cfg.models["swin_s"].batch_size == 4 and cfg.models["resnet50"].batch_size == 24
    assert "swin_s keep their own" in notes(capsys)[0]
    assert load_config(sets=["dataset.batch_size=16"]).models["vit_b_16"].batch_size == 16


def test_other_weights_of_the_same_model_are_kept_by_name(tmp_path):
    path = write_config(tmp_path, 'models:\n  resnet50: {weights: "models.ResNet50_Weights.IMAGENET1K_V2"}\n')
    recipe = load_config(path).models["resnet50"]
    assert recipe.pretrained and recipe.weights == "ResNet50_Weights.IMAGENET1K_V2"
    from models.zoo import get_spec, weights_name_for

    assert weights_name_for(get_spec("resnet50"), recipe.weights) == "ResNet50_Weights.IMAGENET1K_V2"
    with pytest.raises(UserError, match="torchvision has no weights named"):
        weights_name_for(get_spec("resnet50"), "ResNet50_Weights.IMAGENET9K_V7")
    none = write_config(tmp_path, "models:\n  resnet18: {weights: None}\n")
    assert load_config(none).models["resnet18"].pretrained is False


@pytest.mark.parametrize("text, message", [
    ('models:\n  resnet18: {weights: "models.ResNet50_Weights.IMAGENET1K_V1"}\n', "not resnet18's weights"),
    ('models:\n  resnet18: {weights: "__import__(\'os\').system(\'id\')"}\n', "expected torchvision weights"),
    ("models:\n  resnet18: {name: resnet50}\n", "name the entry after it"),
    ("model: swin_t\nmodels:\n  resnet18: {num_classes: 3}\n  swin_t: {num_classes: 4}\n", "another model says 3"),
])
def test_what_cannot_mean_anything_is_refused_in_one_line(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        load_config(write_config(tmp_path, text))


def test_an_entry_named_after_a_model_becomes_that_model(tmp_path, capsys):
    path = write_config(tmp_path, "model: baseline\nmodels:\n  baseline: {name: resnet18, lr: 0.002}\n")
    cfg = load_config(path)
    assert cfg.model == "resnet18" and cfg.recipe.lr == 0.002
    assert "model: baseline selects resnet18" in notes(capsys)[0]


def test_num_classes_is_checked_against_the_class_folders(tmp_path, tiny_data, capsys):
    overlay = write_overlay(tmp_path, tiny_data)
    data = yaml.safe_load(overlay.read_text())
    data["models"]["resnet18"]["num_classes"] = 4
    overlay.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError, match="dataset.num_classes is 4, but .* has 3 class folder"):
        run_script("compute_normalization", ["--config", overlay, "--mode", "display"])
    data["models"]["resnet18"]["num_classes"] = 3
    overlay.write_text(yaml.safe_dump(data))
    assert run_script("compute_normalization", ["--config", overlay, "--mode", "display"]) == 0


def test_the_original_projects_own_config_loads_and_an_unusable_entry_refuses_only_the_run_that_selects_it(
        tmp_path, capsys):
    """The original's config/config.yaml has an xception_medical entry built on EfficientNet-B0 weights: it is
    translated with a notice; an entry that cannot mean anything is set aside, refused only when selected."""
    data = yaml.safe_load(original_config_yaml())
    data["models"]["xception_medical"] = {"name": "xception_medical", "num_classes": 3, "lr": 0.0005,
                                          "weights": "models.EfficientNet_B0_Weights.IMAGENET1K_V1"}
    data["models"]["swin_s"] = {"weights": "models.Swin_T_Weights.IMAGENET1K_V1"}  # another model's weights
    path = write_config(tmp_path, yaml.safe_dump(data))
    cfg = load_config(path)
    assert cfg.model == "resnet18" and cfg.models["xception_medical"].pretrained
    assert cfg.models["xception_medical"].lr == 0.0005 and cfg.models["xception_medical"].weights is None
    lines = notes(capsys)
    assert any("models.xception_medical.weights" in line and "EfficientNet-B0 backbone" in line for line in lines)
    assert any("swin_s" in line and "Swin_T_Weights" in line and "ignored (this run trains resnet18)" in line
               for line in lines)
    with pytest.raises(UserError, match="swin_s.weights names Swin_T_Weights"):
        load_config(path, sets=["model=swin_s"])
