"""DICOM folders as training data: one record per frame, series kept within one split, inference's windowing."""
from __future__ import annotations

import csv
import json
from collections import defaultdict

import numpy as np
import pytest

from core.config import load_config
from data.cache import split_cache
from data.images import load_frames, split_frame_name
from data.manifest import prepare_split
from data.synthetic import CLASS_FOLDERS, render_slice
from tests.conftest import run_script, write_dicom, write_overlay

SERIES_PER_CLASS, FILES_PER_SERIES, FRAMES = 4, 2, 3


def phantom(folder: str, seed: int, size: int = 48) -> np.ndarray:
    """A synthetic slice of the class as 12-bit scanner values (0..4080)."""
    return render_slice(folder, np.random.default_rng([seed, CLASS_FOLDERS.index(folder)]), size).astype(np.uint16) * 16


@pytest.fixture(scope="module")
def dicom_tree(tmp_path_factory):
    """Per class: 4 series of 2 single-frame files (windowed), one 3-frame file (no window); a corrupt file."""
    from pydicom.uid import generate_uid

    root = tmp_path_factory.mktemp("dicom data") / "MR exports"
    for folder in CLASS_FOLDERS:
        (root / folder).mkdir(parents=True)
        for s in range(SERIES_PER_CLASS):
            uid = generate_uid()
            for k in range(FILES_PER_SERIES):
                write_dicom(root / folder / f"series{s}_im{k}.dcm", phantom(folder, 10 * s + k),
                            window=(2000, 4000), SeriesInstanceUID=uid)
        stack = np.stack([phantom(folder, 100 + f) for f in range(FRAMES)])
        write_dicom(root / folder / "cine.dcm", stack)
    (root / CLASS_FOLDERS[0] / "broken.dcm").write_bytes(b"DICM" + bytes(300))
    (root / CLASS_FOLDERS[0] / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def dicom_overlay(tmp_path, dicom_tree):
    return write_overlay(tmp_path, dicom_tree)


def test_every_frame_is_a_record_and_series_never_straddle_splits(dicom_overlay, capsys):
    split = prepare_split(load_config(dicom_overlay))
    per_class = SERIES_PER_CLASS * FILES_PER_SERIES + FRAMES
    assert len(split.rows) == 3 * per_class
    frames = [r.path for r in split.rows if "#frame=" in r.path]
    assert sorted(frames)[:3] == [f"{CLASS_FOLDERS[0]}/cine.dcm#frame={k}" for k in (1, 2, 3)]
    by_group = defaultdict(set)
    for r in split.rows:
        file, _ = split_frame_name(r.path)
        key = file.as_posix() if file.name == "cine.dcm" else file.as_posix().split("_im")[0]
        by_group[key].add(r.split)
    assert all(len(splits) == 1 for splits in by_group.values()), by_group
    assert len(by_group) == 3 * (SERIES_PER_CLASS + 1)
    assert {r.split for r in split.rows} == {"train", "val", "test"}
    assert [b["path"] for b in split.meta["bad_files"]] == [f"{CLASS_FOLDERS[0]}/broken.dcm"]
    assert split.meta["dicom_series"] == 3 * (SERIES_PER_CLASS + 1)
    out = capsys.readouterr().out
    assert "DICOM series" in out and "broken.dcm" in out
    # The next script reuses the manifest: a multi-frame file on disk is the same records, not an added file.
    again = prepare_split(load_config(dicom_overlay))
    assert again.manifest_path == split.manifest_path and again.fingerprint == split.fingerprint


def test_series_grouping_can_be_turned_off(dicom_overlay):
    on = prepare_split(load_config(dicom_overlay))
    off = prepare_split(load_config(dicom_overlay, ["dataset.group_dicom_series=false"]))
    assert off.manifest_path != on.manifest_path
    assert off.meta["settings"]["group_dicom_series"] is False


def test_cached_pixels_are_what_inference_reads(dicom_overlay):
    """The training cache holds each frame windowed exactly as inference windows it (data.images.load_frames)."""
    cfg = load_config(dicom_overlay)
    split = prepare_split(cfg)
    cache = split_cache(cfg, split, "train", 32)
    paths, _ = split.samples("train")
    inference = {}
    for file in {split_frame_name(p)[0] for p in paths}:
        inference.update(load_frames(file, 32))
    for i, path in enumerate(paths):
        assert np.array_equal(cache[i], inference[str(path)]), path


def test_a_multi_frame_file_is_read_once_for_all_its_frames_in_the_cache(dicom_overlay, tmp_path, monkeypatch):
    import data.images as images

    cfg = load_config(dicom_overlay, sets=[f"dataset.cache_dir={tmp_path / 'cache'}"])
    split = prepare_split(cfg)
    opened = defaultdict(int)

    class Counted(images.DicomFile):
        def __init__(self, path):
            opened[str(path)] += 1
            super().__init__(path)

    monkeypatch.setattr(images, "DicomFile", Counted)
    for name in ("train", "val", "test"):
        split_cache(cfg, split, name, 32)
    cines = [f for f in opened if f.endswith("cine.dcm")]
    assert len(cines) == len(CLASS_FOLDERS) and all(n == 1 for n in opened.values()), dict(opened)


def test_train_and_evaluate_on_dicom_folders(tmp_path, dicom_tree):
    overlay = write_overlay(tmp_path, dicom_tree, **{"train.epochs": 1})
    assert run_script("train", ["--config", overlay, "--model", "resnet18"]) == 0
    assert run_script("evaluate", ["--config", overlay, "--model", "resnet18"]) == 0
    out = tmp_path / "checkpoints" / "resnet18_outputs"
    with open(out / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    manifest = next((tmp_path / "splits").glob("*.csv"))
    with open(manifest) as fh:
        test_rows = [r["path"] for r in csv.DictReader(fh) if r["split"] == "test"]
    assert [r["path"] for r in rows] == test_rows
    assert json.loads((out / "evaluation_metrics.json").read_text())["n_test"] == len(test_rows)
    assert any((tmp_path / "cache").glob("*_train_32px.npy")) and any((tmp_path / "cache").glob("*_test_32px.npy"))
