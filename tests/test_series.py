"""The series model and rule (series/): grouping, slice order, the top-k aggregation, key slices, the refer rule,
and series-level evaluation on DICOM series written by the test."""
from __future__ import annotations

import random

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from core.config import load_config
from data.images import ImageReadError, split_frame_name
from data.manifest import prepare_split
from evaluation.series_level import evaluate_series
from series.rule import SeriesRule, SliceCheck, aggregate, read_series
from series.slices import order_slices, read_slices, series_of_files, slices_of
from tests.conftest import write_dicom, write_overlay

CLASSES = ["glioma", "meningioma", "pituitary"]
AXIAL = [1, 0, 0, 0, 1, 0]


def write_stack(folder, n, study, series, z_step=5.0, numbers=None, **attrs):
    """n single-frame slices of one series, InstanceNumber reversed against position unless `numbers`."""
    folder.mkdir(parents=True, exist_ok=True)
    numbers = numbers or list(range(n, 0, -1))
    for k in range(n):
        write_dicom(folder / f"im{k:02d}.dcm", np.full((8, 8), 100 * k, np.uint16), StudyInstanceUID=study,
                    SeriesInstanceUID=series, InstanceNumber=numbers[k], ImagePositionPatient=[0, 0, k * z_step],
                    ImageOrientationPatient=AXIAL, **attrs)
    return sorted(folder.glob("*.dcm"))


def test_files_are_grouped_by_study_and_series_and_ordered_along_the_normal(tmp_path):
    study, other_study = generate_uid(), generate_uid()
    a = write_stack(tmp_path / "a", 5, study, "1.2.3.1")
    b = write_stack(tmp_path / "b", 3, study, "1.2.3.2")
    c = write_stack(tmp_path / "c", 4, other_study, "1.2.3.1")  # same series UID in another study: another series
    files = a + b + c
    random.Random(0).shuffle(files)
    series, bad = series_of_files(files)
    assert bad == []
    by_key = {s.key: s for s in series}
    assert sorted(len(s.slices) for s in series) == [3, 4, 5]
    first = by_key[(study, "1.2.3.1")]
    assert first.ordered_by == "position"
    # InstanceNumber runs the other way: the position along the normal decides
    assert [n.rsplit("/", 1)[-1] for n in first.names] == [f"im{k:02d}.dcm" for k in range(5)]


def test_a_stack_lying_the_other_way_is_ordered_along_its_own_normal(tmp_path):
    files = write_stack(tmp_path / "s", 4, generate_uid(), "1.2.9", z_step=-3.0)
    (series,), _ = series_of_files(files)
    assert [s.position[2] for s in series.slices] == [-9.0, -6.0, -3.0, 0.0]


def test_without_geometry_instance_number_orders_the_slices(tmp_path):
    study = generate_uid()
    files = write_stack(tmp_path / "s", 4, study, "1.2.4", numbers=[3, 1, 4, 2])
    ds = Dataset()  # one slice without a position: position cannot order the series
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.InstanceNumber = study, "1.2.4", "9.9", 5
    slices = [s for f in files for s in read_slices(f)] + slices_of(ds)
    ordered, how = order_slices(slices)
    assert how == "instance number"
    assert [s.instance_number for s in ordered] == [1, 2, 3, 4, 5]


def test_frames_of_a_multi_frame_instance_are_slices_in_position_order(tmp_path):
    frames = np.stack([np.full((8, 8), v, np.uint16) for v in (10, 20, 30)])
    ds = write_dicom(tmp_path / "enhanced.dcm", frames)
    shared, orient = Dataset(), Dataset()
    orient.ImageOrientationPatient = AXIAL
    shared.PlaneOrientationSequence = [orient]
    per_frame = []
    for z in (10.0, -5.0, 2.5):  # acquired out of order
        group, plane = Dataset(), Dataset()
        plane.ImagePositionPatient = [0, 0, z]
        group.PlanePositionSequence = [plane]
        per_frame.append(group)
    ds.SharedFunctionalGroupsSequence, ds.PerFrameFunctionalGroupsSequence = [shared], per_frame
    ds.save_as(tmp_path / "enhanced.dcm", enforce_file_format=True)
    (series,), _ = series_of_files([tmp_path / "enhanced.dcm"], ["scan.dcm"])
    assert series.ordered_by == "position"
    assert series.names == ["scan.dcm#frame=2", "scan.dcm#frame=3", "scan.dcm#frame=1"]
    assert [s.frame for s in series.slices] == [2, 3, 1]


def test_an_unreadable_file_is_reported_and_the_others_grouped(tmp_path):
    files = write_stack(tmp_path / "s", 3, generate_uid(), "1.2.5")
    (tmp_path / "broken.dcm").write_bytes(b"DICM" + bytes(100))
    series, bad = series_of_files([*files, tmp_path / "broken.dcm"])
    assert len(series) == 1 and len(series[0].slices) == 3
    assert [p for p, _ in bad] == [str(tmp_path / "broken.dcm")]
    with pytest.raises(ImageReadError):
        slices_of(Dataset(), "no-uids.dcm")


def probs_of(*rows):
    return np.array(rows, dtype=np.float64)


def test_the_series_class_is_the_top_k_mean_and_its_key_slices_decide_it():
    # 6 slices: two strong pituitary slices, one strong glioma slice, three empty ones
    p = probs_of([0.34, 0.33, 0.33], [0.1, 0.0, 0.9], [0.2, 0.1, 0.7], [0.95, 0.05, 0.0], [0.4, 0.3, 0.3],
                 [0.3, 0.4, 0.3])
    r = aggregate(p, CLASSES, SeriesRule(top_k=2))
    scores = {"glioma": (0.95 + 0.4) / 2, "meningioma": (0.4 + 0.33) / 2, "pituitary": (0.9 + 0.7) / 2}
    total = sum(scores.values())
    assert r.predicted_class == "pituitary" and r.class_index == 2
    assert r.probabilities == pytest.approx({c: v / total for c, v in scores.items()})
    assert r.key_slices == [1, 2] and r.n_slices == 6
    assert aggregate(p, CLASSES, SeriesRule(top_k=1)).predicted_class == "glioma"  # k = 1: the single highest
    every = aggregate(p, CLASSES, SeriesRule(top_k=50))  # k above the count: the mean of every slice
    assert every.probabilities["glioma"] == pytest.approx(p[:, 0].mean() / p.mean(axis=0).sum())
    assert every.key_slices == list(range(6))


def test_refer_rule_of_a_series():
    rule = SeriesRule(top_k=2, min_slices=4, disagree_above=0.8, unlike_share=0.5)
    clear = probs_of([0.9, 0.05, 0.05], [0.85, 0.1, 0.05], [0.4, 0.3, 0.3], [0.5, 0.3, 0.2])
    assert read_series(clear, CLASSES, rule).refer is False
    assert read_series(clear, CLASSES, rule, [SliceCheck()] * 4).reasons == []
    few = read_series(clear[:3], CLASSES, rule)
    assert few.refer and "too few slices: 3" in few.reasons[0]
    split = probs_of([0.9, 0.05, 0.05], [0.95, 0.0, 0.05], [0.05, 0.05, 0.9], [0.1, 0.05, 0.85])
    disagree = read_series(split, CLASSES, rule)
    assert disagree.refer and any("slices disagree" in r and "pituitary" in r for r in disagree.reasons)
    checks = [SliceCheck(True, ("top probability 40% is under the 60% threshold",)) if i == 1 else SliceCheck()
              for i in range(4)]
    key = read_series(clear, CLASSES, rule, checks)
    assert key.refer and key.reasons == ["key slice 2 of 4 referred: top probability 40% is under the 60% threshold"]
    not_key = [SliceCheck(True, ("low",)) if i == 2 else SliceCheck() for i in range(4)]
    assert read_series(clear, CLASSES, rule, not_key).refer is False  # a referred slice that decides nothing
    unlike = [SliceCheck(unlike=i < 3) for i in range(4)]
    assert any("unlike the training data: 75%" in r for r in read_series(clear, CLASSES, rule, unlike).reasons)
    half = [SliceCheck(unlike=i < 2) for i in range(4)]
    assert read_series(clear, CLASSES, rule, half).refer is False
    with pytest.raises(ValueError):
        read_series(clear, CLASSES, rule, [SliceCheck()])


def test_the_rule_comes_from_the_config():
    cfg = load_config(None, ["series.top_k=5", "series.min_slices=12"])
    rule = SeriesRule.from_config(cfg.series)
    assert (rule.top_k, rule.min_slices) == (5, 12) and "top 5" in rule.name


@pytest.fixture(scope="module")
def phantom_series(tmp_path_factory):
    from data.synthetic import generate_dicom_dataset

    return generate_dicom_dataset(tmp_path_factory.mktemp("dicom demo"), n_per_class=5, size=32, seed=2)


def test_series_level_figures_of_a_split_of_series(tmp_path, phantom_series):
    """Slices without the lesion are noise to a slice model; the series rule reads the lesion run and is right
    where the slice level is not."""
    import pydicom

    cfg = load_config(write_overlay(tmp_path, phantom_series), ["evaluation.bootstrap_samples=100"])
    split = prepare_split(cfg, log=lambda *a: None)
    rows = split.rows_for("test")
    index = {c: k for k, c in enumerate(split.class_folders)}
    rng = np.random.default_rng(0)
    y_prob = np.empty((len(rows), 3))
    for i, r in enumerate(rows):  # an ideal lesion reader: sure on lesion slices, guessing on the others
        lesion = pydicom.dcmread(split.root / split_frame_name(r.path)[0]).ImageComments.endswith(", lesion")
        y_prob[i] = np.eye(3)[index[r.cls]] * 0.9 + 0.05 if lesion else rng.dirichlet([1, 1, 1])
    ev = evaluate_series(cfg, split, "test", y_prob, split.class_names)
    assert ev is not None
    n_series = len({split_frame_name(r.path)[0].parent for r in rows})
    assert ev.record["n_series"] == n_series and ev.record["top_k"] == 3
    assert ev.record["accuracy"]["value"] == 1.0
    slice_accuracy = float(np.mean(y_prob.argmax(1) == [index[r.cls] for r in rows]))
    assert slice_accuracy < 0.9
    assert ev.record["accuracy"]["ci_low"] <= ev.record["accuracy"]["value"] <= ev.record["accuracy"]["ci_high"]
    for result, members in zip(ev.results, ev.grouped.rows):  # key slices are lesion slices
        assert all(y_prob[members[k]].max() == pytest.approx(0.95) for k in result.key_slices)


def test_an_image_file_split_has_no_series_level(overlay):
    cfg = load_config(overlay)
    split = prepare_split(cfg, log=lambda *a: None)
    assert evaluate_series(cfg, split, "test", np.zeros((len(split.rows_for("test")), 3)), split.class_names) is None


def test_evaluate_reports_series_beside_slices_and_gates_on_either_level(tmp_path, phantom_series, capsys):
    import csv
    import json

    from evaluation.reports import flat_metrics
    from tests.conftest import run_script

    overlay = write_overlay(tmp_path, phantom_series, **{"registry.auto_register": False})
    assert run_script("train", ["--config", overlay, "--model", "resnet18"]) == 0
    capsys.readouterr()
    code = run_script("evaluate", ["--config", overlay, "--model", "resnet18", "--medical-validation",
                                   "--set", "evaluation.gates.level=series"])
    out = capsys.readouterr().out
    assert code in (0, 3)
    assert "Series level: " in out and "mean of the top 3 slice probabilities per class" in out
    assert "Medical validation (series level, judged on the point estimate)" in out and "series_accuracy" in out
    folder = tmp_path / "checkpoints" / "resnet18_outputs"
    record = json.loads((folder / "evaluation_metrics.json").read_text())
    series = record["series"]
    assert series["n_series"] >= 3 and series["accuracy"]["ci_low"] <= series["accuracy"]["value"]
    assert {"series_accuracy", "series_accuracy_ci_low", "test_accuracy"} <= set(flat_metrics(record))
    validation = json.loads((folder / "medical_validation.json").read_text())
    assert validation["level"] == "series"
    assert validation["gates"][0] == {**validation["gates"][0], "name": "series_accuracy",
                                      "value": series["accuracy"]["value"]}
    with open(folder / "series_predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == series["n_series"] and all(len(r["key_slices"].split(";")) == 3 for r in rows)
    # registration judges the same level and records both levels' accuracy
    from deploy.policy import judge, version_tags

    gates = load_config(overlay, ["evaluation.gates.level=series"]).evaluation.gates
    evidence = judge(record, gates)
    assert [g["name"] for g in evidence.validation["gates"]][:2] == ["series_accuracy", "series_sensitivity_glioma"]
    tags = version_tags(evidence, False, gates)
    assert tags["series_accuracy"] == f"{series['accuracy']['value']:.4f}" and tags["accuracy"]
    assert tags["gates"].startswith("series accuracy>=")


def test_series_gates_on_image_files_are_a_user_error(trained):
    from core.errors import UserError
    from tests.conftest import run_script

    overlay, _, _ = trained
    with pytest.raises(UserError, match="no series-level figures"):
        run_script("evaluate", ["--config", overlay, "--model", "resnet18", "--set", "evaluation.gates.level=series"])
