"""evaluate.py --external: another site's tree, classes mapped by name or map file, training images left out."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import yaml

from core.errors import UserError
from data.synthetic import generate_dataset, render_slice
from tests.conftest import run_script, write_dicom


@pytest.fixture
def other_site(tmp_path, tiny_data):
    """Folders named like a class (case aside), like a training folder, and two the model has no class for;
    one image copied from the training data, one corrupt image, one multi-frame DICOM."""
    src = generate_dataset(tmp_path / "generated", n_per_class=5, size=48, seed=7)
    root = tmp_path / "Site B"
    shutil.copytree(src / "brain_glioma", root / "GLIOMA")
    shutil.copytree(src / "brain_menin", root / "brain_menin")
    shutil.copytree(src / "brain_tumor", root / "pituitary_tumor")
    (root / "no_tumor").mkdir()
    (root / "no_tumor" / "x.jpg").write_bytes((src / "brain_glioma" / "glioma_0001.jpg").read_bytes())
    shutil.copy(next((tiny_data / "brain_glioma").glob("*.jpg")), root / "GLIOMA" / "seen_in_training.jpg")
    (root / "GLIOMA" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
    stack = np.stack([render_slice("brain_menin", np.random.default_rng(k), 48) for k in range(2)]).astype(np.uint16)
    write_dicom(root / "brain_menin" / "cine.dcm", stack * 16)
    return root


def evaluate(overlay, *extra) -> int:
    return run_script("evaluate", ["--config", overlay, "--model", "resnet18", *extra])


def test_external_set_by_folder_names(trained, other_site, capsys):
    overlay, tmp, best = trained
    assert evaluate(overlay, "--external", other_site) == 0
    printed = capsys.readouterr().out
    out = best.parent / "external_Site_B"
    record = json.loads((out / "evaluation_metrics.json").read_text())
    assert record["kind"] == "external"
    assert record["external"]["folder_classes"] == {"GLIOMA": "glioma", "brain_menin": "meningioma"}
    assert record["external"]["unmapped_folders"] == {"no_tumor": 1, "pituitary_tumor": 5}
    assert record["external"]["left_out_in_training_manifest"] == 1
    assert record["external"]["left_out_unreadable"] == 1
    with open(out / "predictions.csv") as fh:
        paths = [r["path"] for r in csv.DictReader(fh)]
    assert len(paths) == record["n_test"] == 5 + 5 + 2
    assert "brain_menin/cine.dcm#frame=2" in paths and "GLIOMA/seen_in_training.jpg" not in paths
    # the verdict is recorded without --medical-validation, as evaluate.py records the test split's
    verdict = json.loads((out / "medical_validation.json").read_text())
    assert {g["name"] for g in verdict["gates"]} >= {"accuracy"} and isinstance(verdict["deployment_ready"], bool)
    assert record["hardware"]["samples"] >= 1
    for name in ("evaluation_report.txt", "confusion_matrix.png", "per_class_metrics.png", "roc_curves.png",
                 "reliability_diagram.png", "external_manifest.csv"):
        assert (out / name).is_file(), name
    assert (out / "evaluation_report.txt").read_text().startswith("EXTERNAL VALIDATION on ")
    assert "folder 'pituitary_tumor' (5 files) matches no class of the model" in printed
    assert "1 image(s) are byte-identical to images of the training manifest (" in printed
    assert "Internal vs external" in printed and "no external images of pituitary" in printed
    # the internal evaluation is still there, beside it, and both are in the same MLflow run
    internal = json.loads((best.parent / "evaluation_metrics.json").read_text())
    assert "kind" not in internal and internal["hardware"]["samples"] >= 1
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("brain-cancer-mri-evaluation-resnet18")
    run = client.search_runs([exp.experiment_id], order_by=["start_time DESC"])[0]
    assert run.data.metrics["external_accuracy"] == pytest.approx(record["accuracy"]["value"])
    assert run.data.metrics["test_accuracy"] == pytest.approx(internal["accuracy"]["value"])
    assert run.data.tags["external_path"] == str(other_site.resolve())
    assert run.data.tags["external_deployment_ready"] == str(verdict["deployment_ready"])
    logged = [a.path for a in client.list_artifacts(run.info.run_id, "evaluation/external_Site_B")]
    assert "evaluation/external_Site_B/evaluation_metrics.json" in logged


def test_class_map_file_maps_and_leaves_out_folders(trained, other_site, tmp_path, capsys):
    overlay, _, best = trained
    class_map = tmp_path / "map.yaml"
    class_map.write_text(yaml.safe_dump({"pituitary_tumor": "pituitary", "no_tumor": None}))
    assert evaluate(overlay, "--external", other_site, "--class-map", class_map, "--medical-validation") in (0, 3)
    record = json.loads((best.parent / "external_Site_B" / "evaluation_metrics.json").read_text())
    assert record["external"]["folder_classes"]["pituitary_tumor"] == "pituitary"
    assert record["external"]["unmapped_folders"] == {}
    assert record["per_class"]["pituitary"]["support"] == 5
    assert (best.parent / "external_Site_B" / "medical_validation.json").is_file()
    assert "left out by the class map" in capsys.readouterr().out


@pytest.mark.parametrize("mapping, message", [
    ({"GLIOMA": "astrocytoma"}, "not a class of the model"),
    (["GLIOMA", "glioma"], "must map folder names to class names"),
])
def test_a_class_map_that_cannot_mean_anything_is_refused(trained, other_site, tmp_path, mapping, message):
    overlay, _, _ = trained
    class_map = tmp_path / "map.yaml"
    class_map.write_text(yaml.safe_dump(mapping))
    with pytest.raises(UserError, match=message):
        evaluate(overlay, "--external", other_site, "--class-map", class_map)


def test_an_external_folder_with_nothing_to_score_is_a_user_error(trained, tmp_path):
    overlay, _, _ = trained
    (tmp_path / "elsewhere" / "no_tumor").mkdir(parents=True)
    with pytest.raises(UserError, match="no external images left to score"):
        evaluate(overlay, "--external", tmp_path / "elsewhere")
    with pytest.raises(UserError, match="external data set folder not found"):
        evaluate(overlay, "--external", tmp_path / "missing")
