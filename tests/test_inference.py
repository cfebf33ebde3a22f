"""inference_with_mlflow.py: a registered model predicts real files of every kind; bad files don't stop the rest."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import run_script, write_bomb_jpeg, write_dicom
from core.errors import UserError


@pytest.fixture(scope="module")
def images(tiny_data, tmp_path_factory):
    """One input of every kind a user hands us, made from a real (synthetic) slice, plus a corrupt file."""
    folder = tmp_path_factory.mktemp("inputs")
    gray = Image.open(next(tiny_data.rglob("*.jpg"))).convert("L")
    arr = np.asarray(gray)
    gray.resize((97, 131)).convert("RGB").save(folder / "odd size.jpg")
    rgba = gray.convert("RGBA")
    rgba.putalpha(200)
    rgba.save(folder / "rgba.png")
    Image.fromarray(arr.astype(np.uint16) * 257).save(folder / "sixteen.png")
    assert Image.open(folder / "sixteen.png").mode.startswith("I")
    write_dicom(folder / "windowed.dcm", arr.astype(np.uint16) * 16, (2000, 4000))
    write_dicom(folder / "plain.dcm", arr.astype(np.uint16) * 16, None)
    write_dicom(folder / "cine.dcm", np.stack([arr, arr[::-1]]).astype(np.uint16) * 16, (2000, 4000))
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return folder


def test_every_image_kind_is_predicted_and_a_corrupt_file_is_reported(registered, images, capsys):
    paths = [images / n for n in ("odd size.jpg", "rgba.png", "sixteen.png", "windowed.dcm", "plain.dcm", "cine.dcm")]
    code = run_script("inference_with_mlflow",
                      registered + ["--model", "brain-cancer-resnet18", "--alias", "staging",
                                    "--json", "--image", *paths, images / "corrupt.png"])
    out = capsys.readouterr()
    assert code == 1  # one input failed
    doc = json.loads(out.out)
    records = [str(p) for p in paths[:-1]] + [f"{paths[-1]}#frame=1", f"{paths[-1]}#frame=2"]  # a frame each
    assert doc["flavor"] == "onnx" and [p["path"] for p in doc["predictions"]] == records
    for p in doc["predictions"]:
        assert p["predicted_class"] in doc["contract"]["class_names"]
        assert abs(sum(p["probabilities"].values()) - 1) < 1e-5
        assert p["confidence"] == max(p["probabilities"].values())
    assert [e["path"] for e in doc["errors"]] == [str(images / "corrupt.png")]
    assert "corrupt.png" in out.err
    assert "was registered with --force" in out.err and doc["forced"] is True  # announced on every run


def test_onnx_and_pytorch_flavors_agree_and_report_format(registered, images, capsys):
    argv = registered + ["--model", "brain-cancer-resnet18", "--version", "1", "--image", images / "windowed.dcm"]
    assert run_script("inference_with_mlflow", argv) == 0
    report = capsys.readouterr().out
    for line in ("🧠 Brain Cancer MRI Inference with MLflow", "✅ Successfully loaded model: brain-cancer-resnet18",
                 "📸 Loading and preprocessing image:", " PREDICTION RESULTS", " Predicted Class: ", "📈 Confidence: ",
                 "🔢 Class Index: ", "📋 All Class Probabilities:", "🎯 Prediction set (conformal): ",
                 "🧭 Out of distribution: "):
        assert line in report
    onnx_run = run_script("inference_with_mlflow", argv + ["--json"])
    onnx_doc = json.loads(capsys.readouterr().out)
    assert onnx_run == 0 and run_script("inference_with_mlflow", argv + ["--json", "--flavor", "pytorch"]) == 0
    torch_doc = json.loads(capsys.readouterr().out)
    assert torch_doc["flavor"] == "pytorch"
    a, b = onnx_doc["predictions"][0]["probabilities"], torch_doc["predictions"][0]["probabilities"]
    assert max(abs(a[k] - b[k]) for k in a) < 1e-4
    a, b = onnx_doc["predictions"][0], torch_doc["predictions"][0]  # the answer checks agree too
    assert (a["prediction_set"], a["out_of_distribution"]) == (b["prediction_set"], b["out_of_distribution"])
    assert abs(a["ood_distance"] - b["ood_distance"]) <= 1e-3 * b["ood_distance"] + 1e-3


def test_stage_maps_to_alias_and_gradcam_writes_overlays(registered, images, tmp_path, capsys):
    code = run_script("inference_with_mlflow",
                      registered + ["--model", "brain-cancer-resnet18", "--stage", "Staging",
                                    "--image", images, "--gradcam", tmp_path / "cams"])
    assert code == 1  # the folder holds the corrupt file too
    assert "stages are deprecated" in capsys.readouterr().err
    overlays = sorted(p.name for p in (tmp_path / "cams").glob("*_gradcam.png"))
    assert len(overlays) == 7 and Image.open(tmp_path / "cams" / overlays[0]).size[0] > 256  # 5 files, 2 frames


def test_unknown_alias_is_a_user_error(registered, images):
    with pytest.raises(UserError, match=r"has no @candidate version; choose --alias staging \(v1\) or --version 1"):
        run_script("inference_with_mlflow", registered + ["--model", "brain-cancer-resnet18", "--alias", "candidate",
                                                          "--image", images / "rgba.png"])


def test_a_decompression_bomb_in_the_batch_costs_one_line_and_the_rest_is_predicted(registered, images, capsys,
                                                                                     tmp_path):
    bomb = write_bomb_jpeg(tmp_path / "bomb.jpg")
    good = [images / "odd size.jpg", images / "windowed.dcm"]
    code = run_script("inference_with_mlflow", registered + ["--model", "brain-cancer-resnet18", "--alias",
                                                             "staging", "--json", "--image", good[0], bomb, good[1]])
    out = capsys.readouterr()
    assert code == 1
    doc = json.loads(out.out)
    assert [p["path"] for p in doc["predictions"]] == [str(p) for p in good]
    (error,) = doc["errors"]
    assert error["path"] == str(bomb) and "over the limit of 50000000 (images.max_pixels)" in error["error"]
    assert "Traceback" not in out.err


def test_the_pixel_limit_comes_from_the_config(registered, images, capsys):
    code = run_script("inference_with_mlflow", registered + ["--model", "brain-cancer-resnet18", "--version", "1",
                                                             "--json", "--set", "images.max_pixels=10000",
                                                             "--image", images / "odd size.jpg", images / "rgba.png"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 1  # odd size.jpg is 97x131 = 12707 px: over; rgba.png (48x48) is predicted
    assert [p["path"] for p in doc["predictions"]] == [str(images / "rgba.png")]
    assert "12707 pixels, over the limit of 10000 (images.max_pixels)" in doc["errors"][0]["error"]
