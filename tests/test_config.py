"""Config loading: precedence, validation errors that name the key, no eval of values."""
import subprocess
import sys

import pytest

from core.config import load_config
from core.errors import UserError
from tests.conftest import ROOT


def test_defaults_match_the_original_project():
    cfg = load_config()
    assert cfg.model == "resnet18"
    assert (cfg.dataset.train_split, cfg.dataset.val_split, cfg.dataset.test_split) == (0.70, 0.15, 0.15)
    assert cfg.dataset.seed == 42
    assert set(cfg.models) == {"resnet18", "resnet50", "efficientnet_b0", "swin_t", "swin_s", "vit_b_16",
                               "medical_cnn", "xception_medical"}
    assert cfg.models["xception_medical"].optimizer == "adamax" and cfg.models["xception_medical"].img_size == 299


def test_precedence_yaml_then_set_then_flags(tmp_path):
    overlay = tmp_path / "o.yaml"
    overlay.write_text("train:\n  epochs: 7\n")
    cfg = load_config(overlay, ["train.epochs=9", "models.resnet18.lr=0.5"], overrides={"models.{model}.lr": 0.25})
    assert cfg.train.epochs == 9
    assert cfg.recipe.lr == 0.25  # explicit flag wins over --set
    assert load_config(overlay).train.epochs == 7


def test_set_values_are_parsed_as_yaml_not_evaluated():
    cfg = load_config(sets=["dataset.group_pattern=__import__('os').system('false')"])
    assert cfg.dataset.group_pattern == "__import__('os').system('false')"
    assert load_config(sets=["performance.compile_model=true"]).performance.compile_model is True


def test_demo_overlay_is_small():
    cfg = load_config(demo=True)
    assert cfg.dataset.demo and cfg.img_size == 64 and not cfg.recipe.pretrained


@pytest.mark.parametrize("sets, expected", [
    (["train.epoch=3"], "unknown config key 'train.epoch'; valid keys here: epochs"),
    (["train.epochs=many"], "invalid config value for 'train.epochs'"),
    (["model=resnet99"], "unknown model 'resnet99'; choose from: resnet18"),
    (["models.resnet99.lr=0.1"], "unknown model 'resnet99'"),
    (["dataset.train_split=0.9"], "must be 1.0"),
    (["train.class_balance=maybe"], "'train.class_balance'"),
])
def test_config_errors_name_the_key(sets, expected):
    with pytest.raises(UserError) as err:
        load_config(sets=sets)
    assert expected in str(err.value)


@pytest.mark.parametrize("flag, key", [
    (["--epochs", "0"], "train.epochs"), (["--batch-size", "0"], "models.resnet18.batch_size"),
    (["--lr", "-1"], "models.resnet18.lr"), (["--set", "dataset.img_size=0"], "dataset.img_size"),
    (["--set", "evaluation.gates.accuracy=1.5"], "evaluation.gates.accuracy"),
])
def test_values_that_cannot_train_are_refused_in_one_line(flag, key, tmp_path):
    """--epochs 0 used to print 'all epochs done' and exit 0 with no checkpoint; the others ended in tracebacks."""
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", "resnet18", *flag], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line, no traceback
    assert proc.stderr.startswith(f"error: invalid config value for '{key}'")


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_user_error_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "compute_normalization.py"), "--set", "train.epoch=3"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: unknown config key 'train.epoch'; valid keys here: "
                                                + proc.stderr.split("valid keys here: ")[1].strip()]


def test_cli_missing_dataset(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--set", f"dataset.path={tmp_path / 'no data'}",
                           "--set", f"dataset.manifest_dir={tmp_path}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "data set folder not found" in proc.stderr and "--demo" in proc.stderr
