"""Tests for the synthetic demo data set (data/synthetic.py)."""
import json

import numpy as np
import pytest
from PIL import Image

from data.synthetic import (
    CLASS_FOLDERS,
    DEMO_SUBDIR,
    _render,
    ensure_demo_dataset,
    generate_dataset,
    render_slice,
)

N, SIZE = 4, 64


def _files(class_root):
    return sorted(p.relative_to(class_root) for p in class_root.rglob("*") if p.is_file())


def test_layout_and_counts(tmp_path):
    class_root = generate_dataset(tmp_path, n_per_class=N, size=SIZE, seed=0)
    assert class_root == tmp_path / DEMO_SUBDIR
    assert sorted(p.name for p in class_root.iterdir()) == sorted(CLASS_FOLDERS)
    for folder in CLASS_FOLDERS:
        names = sorted(p.name for p in (class_root / folder).iterdir())
        assert len(names) == N and all(n.endswith(".jpg") for n in names)
    assert "glioma_0001.jpg" in {p.name for p in (class_root / "brain_glioma").iterdir()}
    marker = json.loads((tmp_path / ".complete").read_text())
    assert marker["n_per_class"] == N and marker["size"] == SIZE and marker["seed"] == 0


def test_images_are_8bit_grayscale_jpegs(tmp_path):
    class_root = generate_dataset(tmp_path, n_per_class=N, size=SIZE, seed=0)
    for path in class_root.rglob("*.jpg"):
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "L" and im.size == (SIZE, SIZE)
            pixels = np.asarray(im)
        assert pixels.std() > 10  # a real picture, not a blank frame


def test_generation_is_deterministic(tmp_path):
    a = generate_dataset(tmp_path / "a", n_per_class=N, size=SIZE, seed=3)
    b = generate_dataset(tmp_path / "b", n_per_class=N, size=SIZE, seed=3)
    c = generate_dataset(tmp_path / "c", n_per_class=N, size=SIZE, seed=4)
    assert _files(a) == _files(b) == _files(c)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in _files(a))
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in _files(a))


def test_image_does_not_depend_on_count(tmp_path):
    # Per-image seeding: the first images are the same whatever n_per_class is.
    small = generate_dataset(tmp_path / "s", n_per_class=2, size=SIZE, seed=0)
    large = generate_dataset(tmp_path / "l", n_per_class=N, size=SIZE, seed=0)
    for f in _files(small):
        assert (small / f).read_bytes() == (large / f).read_bytes()


def test_regeneration_with_fewer_images_drops_stale_files(tmp_path):
    generate_dataset(tmp_path, n_per_class=N, size=SIZE, seed=0)
    class_root = generate_dataset(tmp_path, n_per_class=2, size=SIZE, seed=0)
    assert len(_files(class_root)) == 2 * len(CLASS_FOLDERS)


def test_ensure_skips_complete_and_regenerates_without_marker(tmp_path, capsys):
    class_root = ensure_demo_dataset(tmp_path, n_per_class=N, size=SIZE, seed=0)
    out = capsys.readouterr().out
    assert out.startswith(f"Generating synthetic demo data set in {tmp_path} ({3 * N} images)")
    mtimes = {f: (class_root / f).stat().st_mtime_ns for f in _files(class_root)}

    assert ensure_demo_dataset(tmp_path, n_per_class=N, size=SIZE, seed=0) == class_root
    assert capsys.readouterr().out == ""
    assert {f: (class_root / f).stat().st_mtime_ns for f in _files(class_root)} == mtimes

    # A missing marker means an interrupted run: regenerate, even over a deleted image.
    (tmp_path / ".complete").unlink()
    victim = class_root / "brain_menin" / "meningioma_0002.jpg"
    victim.unlink()
    ensure_demo_dataset(tmp_path, n_per_class=N, size=SIZE, seed=0)
    assert "Generating" in capsys.readouterr().out
    assert victim.is_file() and (tmp_path / ".complete").is_file()


def test_ensure_regenerates_when_arguments_change(tmp_path, capsys):
    ensure_demo_dataset(tmp_path, n_per_class=N, size=SIZE, seed=0)
    capsys.readouterr()
    class_root = ensure_demo_dataset(tmp_path, n_per_class=N, size=32, seed=0)
    assert "Generating" in capsys.readouterr().out
    with Image.open(next(class_root.rglob("*.jpg"))) as im:
        assert im.size == (32, 32)


def test_render_slice_contract():
    a = render_slice("brain_tumor", np.random.default_rng(5), size=48)
    b = render_slice("brain_tumor", np.random.default_rng(5), size=48)
    assert a.dtype == np.uint8 and a.shape == (48, 48)
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="unknown class"):
        render_slice("brain_cat", np.random.default_rng(0))


def test_pituitary_class_is_bright_in_sellar_region():
    # Pose jitter is small, so the class means differ where the sellar lesion sits.
    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    x, y = (2 * xs + 1) / SIZE - 1, (2 * ys + 1) / SIZE - 1
    sella = (np.abs(x) < 0.08) & (y > 0.2) & (y < 0.4)
    central = (np.abs(x) < 0.5) & (np.abs(y) < 0.5)
    score = {}
    for ci, cls in enumerate(CLASS_FOLDERS):
        imgs = [render_slice(cls, np.random.default_rng([9, ci, i]), SIZE).astype(float) for i in range(16)]
        score[cls] = np.mean([im[sella].mean() - im[central].mean() for im in imgs])
    assert score["brain_tumor"] > max(score["brain_glioma"], score["brain_menin"]) + 12


@pytest.mark.parametrize("cls", CLASS_FOLDERS)
def test_hard_cases_have_weaker_lesions(cls):
    # Same seed with and without the lesion: the difference is the lesion's own signal.
    def lesion_signal(hard, seed):
        with_lesion, mask = _render(cls, np.random.default_rng(seed), SIZE, hard)
        without, _ = _render(cls, np.random.default_rng(seed), SIZE, hard, lesion=False)
        assert mask.sum() > 0
        return np.abs(with_lesion - without).sum()

    easy = np.mean([lesion_signal(False, s) for s in range(8)])
    hard = np.mean([lesion_signal(True, s) for s in range(8)])
    assert 0 < hard < 0.3 * easy


def test_dicom_variant_writes_mr_series_with_a_lesion_run(tmp_path):
    """--demo dicom: per class folder, series of 16-32 MR slices whose lesion lies in one run, with slices
    without it on both sides; the same arguments give the same bytes."""
    import pydicom

    from data.images import load_frames
    from data.synthetic import SERIES_SLICES, generate_dicom_dataset

    root = generate_dicom_dataset(tmp_path / "a", n_per_class=2, size=32, seed=0)
    again = generate_dicom_dataset(tmp_path / "b", n_per_class=2, size=32, seed=0)
    folders = sorted(p for p in root.glob("*/*") if p.is_dir())
    assert len(folders) == 2 * len(CLASS_FOLDERS)
    series_uids = set()
    for folder in folders:
        slices = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
        assert SERIES_SLICES[0] <= len(slices) <= SERIES_SLICES[1]
        assert {(s.StudyInstanceUID, s.SeriesInstanceUID, s.Modality) for s in slices} == {
            (slices[0].StudyInstanceUID, slices[0].SeriesInstanceUID, "MR")}
        series_uids.add(slices[0].SeriesInstanceUID)
        lesion = [s.ImageComments.endswith(", lesion") for s in slices]
        run = [i for i, on in enumerate(lesion) if on]
        assert run == list(range(run[0], run[-1] + 1)) and not lesion[0] and not lesion[-1]
        assert [float(s.ImagePositionPatient[2]) for s in slices] == sorted(float(s.ImagePositionPatient[2])
                                                                            for s in slices)
        (_, gray), = load_frames(folder / "slice_001.dcm", 32)
        assert gray.std() > 10
    assert len(series_uids) == len(folders)
    files = sorted(p.relative_to(root) for p in root.rglob("*.dcm"))
    assert files == sorted(p.relative_to(again) for p in again.rglob("*.dcm"))
    assert all((root / f).read_bytes() == (again / f).read_bytes() for f in files)


def test_demo_dicom_selects_the_dicom_variant():
    from core.config import load_config

    cfg = load_config(None, demo="dicom")
    assert cfg.demo.format == "dicom" and cfg.dataset.demo
    assert "demo-dicom" in cfg.dataset.path and "demo-dicom" in cfg.dataset.manifest_dir
    assert load_config(None, demo=True).demo.format == "jpeg"
