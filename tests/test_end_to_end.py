"""The thin path a newcomer runs: split -> statistics -> train -> test, and the checkpoint contract."""
import torch

from core.checkpoint import REQUIRED_KEYS
from tests.conftest import run_script


def test_checkpoint_contract(trained):
    _, _, best = trained
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    for key in REQUIRED_KEYS:
        assert key in ckpt, key
    assert ckpt["model_name"] == "resnet18"
    assert ckpt["class_names"] == ["glioma", "meningioma", "pituitary"]
    assert ckpt["img_size"] == 32 and len(ckpt["mean"]) == 3 and len(ckpt["std"]) == 3
    assert isinstance(ckpt["config"], dict) and ckpt["config"]["model"] == "resnet18"
    last = torch.load(best.with_name("last_model.pth"), map_location="cpu", weights_only=True)
    assert "optimizer_state" in last
    assert (best.parent / "resolved_config.yaml").is_file()


def test_test_script_reports_metrics(trained, capsys):
    overlay, _, _ = trained
    assert run_script("test", ["--config", overlay, "--model", "resnet18"]) == 0
    out = capsys.readouterr().out
    assert "Accuracy:" in out and "Confusion matrix" in out
    for cls in ("glioma", "meningioma", "pituitary"):
        assert cls in out


def test_preprocessing_comes_from_the_checkpoint(trained, monkeypatch):
    """test.py must evaluate at the checkpoint's image size and statistics even when the config says otherwise."""
    import evaluation.prediction
    import test as test_script

    overlay, _, best = trained
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    seen = {}
    real_build, real_pre = evaluation.prediction.build_dataset, test_script.Preprocessor

    def spy_build(cfg, split, name, img_size):
        seen["img_size"] = img_size
        return real_build(cfg, split, name, img_size)

    def spy_pre(mean, std, *a, **k):
        seen["mean"], seen["std"] = list(mean), list(std)
        return real_pre(mean, std, *a, **k)

    monkeypatch.setattr(evaluation.prediction, "build_dataset", spy_build)
    monkeypatch.setattr(test_script, "Preprocessor", spy_pre)
    assert run_script("test", ["--config", overlay, "--model", "resnet18", "--set", "dataset.img_size=48",
                               "--set", "dataset.normalization=imagenet"]) == 0
    assert seen == {"img_size": ckpt["img_size"], "mean": ckpt["mean"], "std": ckpt["std"]}
