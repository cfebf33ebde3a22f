"""Split: deterministic, stratified, duplicates and subject groups never straddle two splits."""
import shutil
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from core.config import load_config
from core.errors import UserError
from data.manifest import prepare_split, read_manifest
from data.split import assign_splits, group_items


def make_messy_dataset(root, per_class=(30, 20, 12), size=24):
    """Class folders with spaces, duplicates (within and across folders), corrupt files and non-images."""
    rng = np.random.default_rng(0)
    classes = ["brain_glioma", "brain_menin", "brain tumor"]
    for cls, n in zip(classes, per_class):
        d = root / cls
        d.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(d / f"img {i:03d}.png")
        (d / ".DS_Store").write_bytes(b"\0\0")
        (d / "notes.txt").write_text("scanner notes")
    g = root / "brain_glioma"
    for i in range(4):  # four byte-identical copies of one image under other names
        shutil.copy(g / "img 000.png", g / f"copy {i}.png")
    shutil.copy(g / "img 001.png", root / "brain_menin" / "dup of glioma 1.png")
    (g / "empty.jpg").write_bytes(b"")
    (g / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 10)
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(g / "trunc.jpg", quality=95)
    (g / "trunc.jpg").write_bytes((g / "trunc.jpg").read_bytes()[:300])
    return root


def cfg_for(tmp_path, root, *sets):
    return load_config(sets=[f"dataset.path={root}", f"dataset.manifest_dir={tmp_path / 'splits'}", *sets])


def test_targets_are_met_within_one_image_per_class():
    labels = ["a"] * 100 + ["b"] * 37 + ["c"] * 11
    out = assign_splits(labels, list(range(len(labels))), (0.7, 0.15, 0.15), seed=42)
    for cls, n in Counter(labels).items():
        got = Counter(s for s, lab in zip(out, labels) if lab == cls)
        for split, ratio in zip(("train", "val", "test"), (0.7, 0.15, 0.15)):
            assert abs(got[split] - n * ratio) <= 1, (cls, split, got)


def test_split_is_deterministic_and_seed_dependent():
    labels = ["a"] * 50 + ["b"] * 50
    groups = list(range(100))
    one = assign_splits(labels, groups, (0.7, 0.15, 0.15), seed=42)
    assert one == assign_splits(labels, groups, (0.7, 0.15, 0.15), seed=42)
    assert one != assign_splits(labels, groups, (0.7, 0.15, 0.15), seed=7)


def test_group_pattern_keeps_a_patient_together():
    names = [f"patient{p}_slice{s}.jpg" for p in range(10) for s in range(5)]
    hashes = [str(i) for i in range(len(names))]
    groups = group_items(names, hashes, r"patient(\d+)_")
    splits = assign_splits(["a"] * len(names), groups, (0.6, 0.2, 0.2), seed=1)
    for p in range(10):
        assert len({splits[i] for i in range(len(names)) if names[i].startswith(f"patient{p}_")}) == 1


def test_messy_dataset_reports_skips_and_keeps_duplicates_together(tmp_path, capsys):
    root = make_messy_dataset(tmp_path / "raw data" / "Brain Cancer")
    split = prepare_split(cfg_for(tmp_path, root))
    out = capsys.readouterr().out
    assert "skipped 6 non-image file(s)" in out
    assert "left out 3 unreadable image(s)" in out
    for name in ("empty.jpg", "corrupt.png", "trunc.jpg"):
        assert name in out
    assert {r.path.split("/")[-1] for r in split.rows}.isdisjoint({"empty.jpg", "corrupt.png", "trunc.jpg"})
    by_hash = {}
    for r in split.rows:
        by_hash.setdefault(r.sha256, set()).add(r.split)
    assert all(len(s) == 1 for s in by_hash.values())
    assert split.meta["multi_image_groups"] == 2  # the 5 copies of img 000, and img 001 + its cross-class copy
    assert "2 group(s) of duplicate/same-subject images" in out
    assert split.class_folders == ["brain tumor", "brain_glioma", "brain_menin"]
    assert split.class_names == ["brain tumor", "glioma", "meningioma"]


def test_manifest_is_reused_and_detects_changes(tmp_path):
    root = make_messy_dataset(tmp_path / "data")
    cfg = cfg_for(tmp_path, root)
    first = prepare_split(cfg)
    rows, meta = read_manifest(first.manifest_path)
    assert [r.split for r in rows] == [r.split for r in prepare_split(cfg).rows]
    assert meta["settings"]["seed"] == 42
    # add, remove and change one file each
    Image.fromarray(np.zeros((24, 24), np.uint8)).save(root / "brain_menin" / "new.png")
    (root / "brain_menin" / "img 000.png").unlink()
    Image.fromarray(np.ones((24, 24), np.uint8)).save(root / "brain_menin" / "img 001.png")
    with pytest.raises(UserError) as err:
        prepare_split(cfg)
    msg = str(err.value)
    assert "1 added" in msg and "1 removed" in msg and "1 changed" in msg and "--resplit" in msg
    again = prepare_split(cfg, resplit=True)
    assert any(r.path.endswith("new.png") for r in again.rows)


def test_shipped_test_folder(tmp_path):
    train_root = make_messy_dataset(tmp_path / "ds" / "Training")
    test_root = tmp_path / "ds" / "Testing"
    for cls in ("brain_glioma", "brain_menin", "brain tumor"):
        (test_root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((24, 24), 10 * i + len(cls), np.uint8)).save(test_root / cls / f"t{i}.png")
    split = prepare_split(cfg_for(tmp_path, train_root, f"dataset.test_path={test_root}"))
    test_rows = split.rows_for("test")
    assert len(test_rows) == 9 and all(r.path.startswith("Testing/") for r in test_rows)
    assert all(r.path.startswith("Training/") for r in split.rows if r.split != "test")
    assert split.sizes()["val"] > 0
