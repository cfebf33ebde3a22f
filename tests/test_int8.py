"""int8 inference: the gate-checked static quantization (export_model.py --format onnx-int8), the contract inside
the int8 file, scoring it with evaluate.py --onnx, and the int8 model through the registry and inference."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from mlflow import MlflowClient

from conftest import run_script
from core.checkpoint import load_checkpoint
from core.contract import Contract
from core.errors import UserError
from deploy.predictors import OnnxPredictor, read_contract
from deploy.quantize import judge_int8
from tests.slowest import slow_setup

EV = SimpleNamespace(bootstrap_samples=500, confidence=0.95, bootstrap_seed=0)


@pytest.fixture(scope="module")
@slow_setup("exports the model to ONNX and quantizes it to int8")
def int8_export(trained, tmp_path_factory):
    """The shared one-epoch checkpoint copied into a folder of its own and exported as int8 there."""
    overlay, _, ckpt_path = trained
    out = tmp_path_factory.mktemp("int8 run") / "resnet18_outputs"
    out.mkdir()
    shutil.copy(ckpt_path, out / "best_model.pth")
    ckpt = out / "best_model.pth"
    code = run_script("export_model", ["--config", overlay, "--model", "resnet18", "--checkpoint", ckpt,
                                       "--format", "onnx-int8", "--output-dir", out / "exported"])
    assert code == 0
    return overlay, out / "best_model.pth", out / "exported" / "resnet18_model_int8.onnx"


def test_int8_file_is_quantized_and_carries_the_contract_and_its_gate(int8_export):
    _, ckpt_path, path = int8_export
    assert sorted(p.name for p in path.parent.iterdir()) == ["resnet18_contract.json", "resnet18_model_int8.onnx"]
    graph = onnx.load(str(path)).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format
    weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(weights) >= 20  # every conv of resnet18 and the classifier hold int8 weights
    per_channel = [n for n in graph.node if n.op_type == "DequantizeLinear"
                   and any(a.name == "axis" for a in n.attribute)]
    assert per_channel  # weights are quantized per output channel

    contract = read_contract(path)
    assert contract == Contract.from_checkpoint(load_checkpoint(ckpt_path))  # the same preprocessing as fp32
    assert contract.extra["precision"] == "int8"
    gate = contract.extra["int8_gate"]
    assert gate["agreement"] >= gate["min_agreement"] == 0.99 and gate["n_test"] > 0
    assert gate["fp32_ci"][0] <= gate["int8_accuracy"] <= gate["fp32_ci"][1]
    assert "training split" in contract.extra["quantization"]["calibration"]

    predictor = OnnxPredictor(path)  # the file alone is enough to predict
    x = np.random.default_rng(0).normal(size=(3, 3, contract.img_size, contract.img_size)).astype(np.float32)
    probs = predictor.predict_array(x)
    assert probs.shape == (3, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_calibration_reads_real_images_and_skips_a_bad_one(tiny_data, tmp_path, capsys):
    from deploy.quantize import calibration_reader, calibration_sample

    good = sorted(tiny_data.rglob("*.jpg"))[:5]
    (tmp_path / "truncated.jpg").write_bytes(good[0].read_bytes()[:200])
    contract = Contract("resnet18", ("a", "b", "c"), 32, (0.2,) * 3, (0.25,) * 3)
    paths = calibration_sample([*good, tmp_path / "truncated.jpg"], 10)
    assert len(paths) == 6 and calibration_sample(good, 3) == calibration_sample(good, 3)  # seeded
    reader = calibration_reader(paths, contract, batch=4)
    batches = list(iter(reader.get_next, None))
    assert [b["input"].shape for b in batches] == [(4, 3, 32, 32), (1, 3, 32, 32)]  # the truncated file is last
    assert reader.used == 5 and "skipped for calibration: " in capsys.readouterr().err


def test_gate_accepts_agreement_and_refuses_a_disagreeing_quantization():
    y = np.repeat(np.arange(3), 100)
    fp32 = y.copy()
    fp32[::10] = (fp32[::10] + 1) % 3  # 90% accurate
    assert judge_int8(y, fp32, fp32, 3, EV).passed
    close = fp32.copy()
    close[5] = (close[5] + 1) % 3  # one answer of 300 differs: 99.7% agreement
    assert judge_int8(y, fp32, close, 3, EV).passed

    far = fp32.copy()
    far[1:300:50] = (far[1:300:50] + 2) % 3  # 6 of 300 answers differ: 98% agreement
    verdict = judge_int8(y, fp32, far, 3, EV)
    assert not verdict.passed and verdict.agreement == pytest.approx(0.98)
    assert "agree with fp32 on 98.0% of 300 test images, 1.0 points short of 99%" in verdict.problems()[0]

    worse = fp32.copy()
    worse[y == 0] = 1  # every glioma now wrong: far below fp32's interval
    verdict = judge_int8(y, fp32, worse, 3, EV)
    assert not verdict.passed
    assert any("points below fp32's 95% CI" in p for p in verdict.problems())


def test_a_refused_int8_export_fails_saying_by_how_much_and_leaves_no_file(trained, tmp_path, monkeypatch, capsys):
    import deploy.quantize

    overlay, _, ckpt_path = trained
    out = tmp_path / "exported"
    out.mkdir()
    (out / "resnet18_model_int8.onnx").write_bytes(b"an int8 file of an earlier model")
    monkeypatch.setattr(deploy.quantize, "INT8_MIN_AGREEMENT", 1.01)  # even full agreement is now too little
    with pytest.raises(UserError, match=r"int8 export refused .*removed.*: its top-1 answers agree with fp32 on "
                                        r"100\.0% of \d+ test images, 1\.0 points short of 101%"):
        run_script("export_model", ["--config", overlay, "--model", "resnet18", "--checkpoint", ckpt_path,
                                    "--format", "onnx-int8", "--output-dir", out])
    assert list(out.iterdir()) == []  # no int8 file, no temporary files, no contract of an artifact not written


def test_evaluate_scores_the_int8_file_in_a_folder_of_its_own(int8_export, capsys):
    overlay, ckpt_path, path = int8_export
    code = run_script("evaluate", ["--config", overlay, "--checkpoint", ckpt_path, "--onnx", path])
    assert code == 0
    assert "Scored artifact: " in capsys.readouterr().out
    folder = ckpt_path.parent / "evaluation_resnet18_model_int8"
    record = json.loads((folder / "evaluation_metrics.json").read_text())
    assert record["artifact"]["path"] == str(path) and record["artifact"]["precision"] == "int8"
    assert record["artifact"]["runtime"].startswith("onnxruntime ")
    assert record["n_test"] == read_contract(path).extra["int8_gate"]["n_test"]
    assert record["accuracy"]["value"] == pytest.approx(read_contract(path).extra["int8_gate"]["int8_accuracy"])
    assert not (ckpt_path.parent / "evaluation_metrics.json").exists()  # the checkpoint's own evidence: untouched


def test_evaluate_refuses_what_it_cannot_score(int8_export, tmp_path):
    overlay, ckpt_path, path = int8_export
    base = ["--config", overlay, "--checkpoint", ckpt_path, "--onnx"]
    with pytest.raises(UserError, match="no such file"):
        run_script("evaluate", [*base, tmp_path / "missing.onnx"])
    (tmp_path / "notes.onnx").write_text("not a model")
    with pytest.raises(UserError, match="notes.onnx: cannot be scored"):
        run_script("evaluate", [*base, tmp_path / "notes.onnx"])
    with pytest.raises(UserError, match="--detailed .*needs the PyTorch model"):
        run_script("evaluate", [*base, path, "--detailed"])
    with pytest.raises(UserError, match="--external scores the checkpoint"):
        run_script("evaluate", [*base, path, "--external", tmp_path])
    other = onnx.load(str(path))
    for prop in other.metadata_props:
        if prop.key == "img_size":
            prop.value = "48"  # a file made for another model
    onnx.save(other, str(tmp_path / "other.onnx"))
    with pytest.raises(UserError, match="was not exported from"):
        run_script("evaluate", [*base, tmp_path / "other.onnx"])


def int8_store(overlay, ckpt_path, tmp) -> tuple[list, str]:
    """A checkpoint folder and an empty sqlite MLflow store of its own: (argv prefix, store URI)."""
    (tmp / "checkpoints" / "resnet18_outputs").mkdir(parents=True)
    shutil.copy(ckpt_path, tmp / "checkpoints" / "resnet18_outputs" / "best_model.pth")
    uri = f"sqlite:///{tmp / 'registry.db'}"
    return ["--config", overlay, "--set", f"monitoring.mlflow.tracking_uri={uri}",
            "--set", f"monitoring.mlflow.artifact_location={tmp / 'mlartifacts'}",
            "--set", f"train.output_dir={tmp / 'checkpoints'}"], uri


@pytest.fixture(scope="module")
@slow_setup("exports and quantizes the model to int8 and registers it")
def int8_registry(trained, tmp_path_factory):
    """brain-cancer-resnet18 1.0.0 @staging registered with --int8 (forced: a one-epoch model fails the gates)."""
    overlay, _, ckpt_path = trained
    store, uri = int8_store(overlay, ckpt_path, tmp_path_factory.mktemp("int8 registry"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = run_script("register_model", store + ["--model", "resnet18", "--version", "1.0.0", "--alias",
                                                     "staging", "--force", "--int8"])
    assert code == 0
    return store, uri, out.getvalue()


def test_register_with_int8_then_load_and_predict_it(int8_registry, registered, tiny_data, tmp_path, capsys):
    """register_model.py --int8 adds brain-cancer-{model}-onnx-int8 beside the PyTorch and ONNX models; the alias
    moves on all three; load_predictor(..., flavor="onnx-int8") and inference_with_mlflow.py --flavor onnx-int8
    run the int8 file."""
    from deploy.registry import connect, load_predictor, resolve_version

    store, uri, printed = int8_registry
    assert "int8 ONNX model registered: brain-cancer-resnet18-onnx-int8 v1" in printed
    assert "int8 ONNX twin brain-cancer-resnet18-onnx-int8 v1 is @staging too" in printed
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    int8_mv = client.get_model_version_by_alias("brain-cancer-resnet18-onnx-int8", "staging")
    torch_mv = client.get_model_version_by_alias("brain-cancer-resnet18", "staging")
    onnx_mv = client.get_model_version_by_alias("brain-cancer-resnet18-onnx", "staging")
    assert torch_mv.tags["onnx_int8_version"] == onnx_mv.tags["onnx_int8_version"] == str(int8_mv.version)
    assert int8_mv.tags["precision"] == "int8" and float(int8_mv.tags["int8_agreement"]) >= 0.99
    assert int8_mv.tags["forced"] == "true"  # the gate policy's tags travel to the int8 version too

    from core.config import load_config

    cfg = load_config(store[1], [f"monitoring.mlflow.tracking_uri={uri}"])
    predictor, used, flavor = load_predictor(connect(cfg.monitoring.mlflow), torch_mv, tmp_path / "dl", "onnx-int8")
    assert flavor == "onnx-int8" and used.name == "brain-cancer-resnet18-onnx-int8"
    assert predictor.contract.extra["precision"] == "int8"

    image = next(tiny_data.rglob("*.jpg"))
    code = run_script("inference_with_mlflow", store + ["--model", "brain-cancer-resnet18", "--alias", "staging",
                                                        "--flavor", "onnx-int8", "--image", image])
    report = capsys.readouterr()
    assert code == 0 and "onnx-int8 flavor brain-cancer-resnet18-onnx-int8 v1 on ONNX Runtime, int8" in report.out
    assert "registered with --force" in report.err  # a forced version says so, whichever flavor runs it
    code = run_script("inference_with_mlflow", store + ["--model", "brain-cancer-resnet18", "--alias", "staging",
                                                        "--flavor", "onnx-int8", "--json", "--image", image])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["flavor"] == "onnx-int8" and doc["contract"]["precision"] == "int8"
    assert doc["predictions"][0]["predicted_class"] in doc["contract"]["class_names"]
    # the int8 model's own name works too, but not for another flavor
    mv = resolve_version(client, "brain-cancer-resnet18-onnx-int8", "staging")
    assert load_predictor(client, mv, tmp_path / "dl2")[2] == "onnx-int8"
    with pytest.raises(UserError, match="is the int8 ONNX model; for the pytorch flavor use brain-cancer-resnet18$"):
        load_predictor(client, mv, tmp_path / "dl3", "pytorch")
    # a release registered without --int8 says so in one line
    with pytest.raises(UserError, match="has no int8 model registered"):
        run_script("inference_with_mlflow", registered + ["--model", "brain-cancer-resnet18", "--alias", "staging",
                                                          "--flavor", "onnx-int8", "--image", image])


def test_serve_runs_the_int8_flavor(int8_registry, tiny_data, tmp_path, capsys):
    """serve.py --flavor onnx-int8 loads the int8 model through the registry and names it in every answer; its
    probabilities are the CLI's for the same bytes."""
    from server_process import ServerProcess

    store, _, _ = int8_registry
    image = next(tiny_data.rglob("*.jpg"))
    assert run_script("inference_with_mlflow", store + ["--model", "brain-cancer-resnet18", "--alias", "staging",
                                                        "--flavor", "onnx-int8", "--json", "--image", image]) == 0
    want = json.loads(capsys.readouterr().out)["predictions"][0]["probabilities"]
    srv = ServerProcess([*store, "--model", "brain-cancer-resnet18", "--alias", "staging", "--flavor", "onnx-int8",
                         "--database", f"sqlite:///{tmp_path / 'audit.db'}", "--poll-seconds", "0"], tmp_path)
    try:
        with srv.wait_ready().client() as c:
            answer = c.post("/v1/predict", files=[("files", (image.name, image.read_bytes(), "image/jpeg"))])
            assert answer.status_code == 200, answer.text
            doc = answer.json()
            assert doc["flavor"] == "onnx-int8" and c.get("/v1/model").json()["contract"]["precision"] == "int8"
            assert doc["forced"] is True and doc["warning"]  # a forced version is served with its warning
            got = doc["predictions"][0]["probabilities"]
            assert max(abs(got[k] - want[k]) for k in want) <= 1e-5
            assert 'flavor="onnx-int8"' in c.get("/metrics").text
    finally:
        srv.stop()


def test_a_refused_int8_model_registers_nothing(trained, tmp_path, monkeypatch):
    """--int8 with a quantization the gate refuses: one line, and no registered model, version or alias at all."""
    import deploy.quantize

    overlay, _, ckpt_path = trained
    store, uri = int8_store(overlay, ckpt_path, tmp_path)
    monkeypatch.setattr(deploy.quantize, "INT8_MIN_AGREEMENT", 1.01)
    with pytest.raises(UserError, match=r"int8 export refused: its top-1 answers agree with fp32 on 100\.0%"):
        run_script("register_model", store + ["--model", "resnet18", "--version", "1.0.0", "--alias", "staging",
                                              "--force", "--int8"])
    assert MlflowClient(tracking_uri=uri, registry_uri=uri).search_registered_models() == []
