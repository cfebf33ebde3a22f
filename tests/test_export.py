"""export_model.py / deploy/export.py: real exports, real ONNX Runtime sessions, parity with PyTorch."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from conftest import ROOT, run_script
from core.checkpoint import load_checkpoint
from core.contract import Contract
from core.errors import UserError
from deploy.export import CONTRACT_FILE, check_parity, export_onnx, load_runner
from deploy.predictors import OnnxPredictor, read_contract
from models.loading import model_from_checkpoint
from models.zoo import build_model


def _export(trained, tmp_path, fmt):
    overlay, _, ckpt_path = trained
    out = tmp_path / "exported"
    code = run_script("export_model", ["--config", overlay, "--model", "resnet18", "--checkpoint", ckpt_path,
                                       "--format", fmt, "--output-dir", out, "--parity-images", "4"])
    return code, out, load_checkpoint(ckpt_path)


def test_export_without_format_writes_torchscript_and_onnx_with_their_sizes(trained, tmp_path, capsys):
    """The original's `export_model.py --model X`: both formats, its header and one size line each."""
    import re

    overlay, _, ckpt_path = trained
    out = tmp_path / "exported"
    assert run_script("export_model", ["--config", overlay, "--model", "resnet18", "--checkpoint", ckpt_path,
                                       "--output-dir", out, "--parity-images", "2"]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["resnet18_contract.json", "resnet18_model.onnx",
                                                      "resnet18_model.pt"]
    for line in ("🚀 Model Export for Deployment", "📋 Model: resnet18", " Loaded model from epoch 1",
                 " Validation accuracy: 0."):
        assert line in printed
    for label, name in (("TorchScript", "resnet18_model.pt"), ("ONNX", "resnet18_model.onnx")):
        size = (out / name).stat().st_size / 2**20
        assert re.search(rf"✅ {label} model saved: {re.escape(name)} \({size:.2f} MB\)", printed), printed


def test_export_all_writes_the_artifacts_that_match_pytorch(trained, tmp_path, capsys):
    code, out, ckpt = _export(trained, tmp_path, "all")
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.count("max |Δprob|") == 3 and "MB)" in printed
    files = sorted(p.name for p in out.iterdir())
    # one self-contained ONNX file: no external-data file beside it
    assert files == ["resnet18_contract.json", "resnet18_model.onnx", "resnet18_model.pt", "resnet18_model.pt2",
                     "resnet18_model_int8.onnx"]  # all: the int8 file too (tests/test_int8.py checks it)

    # One contract, the checkpoint's, in every artifact: ONNX metadata, contract.json, inside .pt2 and .pt
    expected = Contract.from_checkpoint(ckpt)
    assert read_contract(out / "resnet18_model.onnx") == expected
    assert list(expected.class_names) == ckpt["class_names"] and expected.img_size == ckpt["img_size"]
    assert Contract.from_json((out / "resnet18_contract.json").read_text()) == expected
    assert json.loads((out / "resnet18_contract.json").read_text())["mean"] == ckpt["mean"]
    for archive in ("resnet18_model.pt2", "resnet18_model.pt"):
        with zipfile.ZipFile(out / archive) as z:
            name = next(n for n in z.namelist() if n.endswith(CONTRACT_FILE))
            assert Contract.from_json(z.read(name).decode()) == expected

    # The ONNX model alone (contract from its metadata) predicts what PyTorch predicts, at any batch size.
    model = model_from_checkpoint(ckpt)
    predictor = OnnxPredictor(out / "resnet18_model.onnx")
    x = np.random.default_rng(0).normal(size=(5, 3, ckpt["img_size"], ckpt["img_size"])).astype(np.float32)
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(x)), 1).numpy()
    np.testing.assert_allclose(predictor.predict_array(x), expected, atol=1e-4)
    for fmt, name in (("torchscript", "resnet18_model.pt"), ("pt2", "resnet18_model.pt2")):
        assert check_parity(fmt, model, load_runner(fmt, out / name), x).passed


def test_parity_failure_fails_the_export(trained, tmp_path, monkeypatch):
    import deploy.export

    monkeypatch.setattr(deploy.export, "PROB_TOLERANCE", -1.0)  # any difference, even 0, now counts as too large
    with pytest.raises(UserError, match="parity check failed for ONNX"):
        _export(trained, tmp_path, "onnx")


@pytest.mark.parametrize("fault", ["wrong weights", "crash"])
def test_a_failing_export_leaves_no_artifact(trained, tmp_path, monkeypatch, fault):
    import deploy.export

    def faulty(model, contract, path):
        other = copy.deepcopy(model).eval()
        with torch.no_grad():
            # another model under the same name (the exported model is the ScoredModel): parity must fail
            other.classifier.bias += torch.tensor([5.0, 0.0, 0.0])
        export_onnx(other, contract, path)
        if fault == "crash":
            raise RuntimeError("exporter died half-way")

    monkeypatch.setitem(deploy.export.EXPORTERS, "onnx", faulty)
    with pytest.raises((UserError, RuntimeError), match="parity check failed for ONNX|half-way"):
        _export(trained, tmp_path, "onnx")
    assert list((tmp_path / "exported").iterdir()) == []  # neither the artifact nor a temporary file


def test_parity_check_catches_a_wrong_artifact():
    model = build_model("resnet18", 3).eval()
    x = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()
    shifted = check_parity("onnx", model, lambda a: reference[: len(a)] + np.array([0.5, 0, 0], np.float32), x)
    assert not shifted.passed and shifted.max_abs_prob > 1e-3


def test_transformer_onnx_export_matches_pytorch(tmp_path):
    model = build_model("swin_t", 3).eval()
    contract = Contract("swin_t", ("a", "b", "c"), 64, (0.5,) * 3, (0.25,) * 3)
    path = export_onnx(model, contract, tmp_path / "swin_t.onnx")
    assert read_contract(path) == contract
    x = np.random.default_rng(2).normal(size=(3, 3, 64, 64)).astype(np.float32)
    result = check_parity("onnx", model, load_runner("onnx", path), x)
    assert result.passed, result


def test_onnx_inference_needs_no_torch():
    code = ("import sys, deploy.predictors, data.images, data.preprocess_numpy; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_model_name_mismatch_is_a_user_error(trained, tmp_path):
    overlay, _, ckpt_path = trained
    with pytest.raises(UserError, match="holds a resnet18 model"):
        run_script("export_model", ["--config", overlay, "--model", "efficientnet_b0", "--checkpoint", ckpt_path,
                                    "--output-dir", tmp_path])
