"""compute_normalization.py: exact pooled statistics of the training rows; save / display / verify."""
import json

import numpy as np
import pytest
from PIL import Image

from core.config import load_config
from core.errors import UserError
from data.manifest import read_manifest
from tests.conftest import run_script


def independent_stats(manifest_path, root, size):
    rows, _ = read_manifest(manifest_path)
    pixels = []
    for r in rows:
        if r.split == "train":
            img = Image.open(root / r.path).convert("L").resize((size, size), Image.Resampling.BILINEAR)
            pixels.append(np.asarray(img, dtype=np.float64).ravel() / 255.0)
    allpix = np.concatenate(pixels)
    return allpix.mean(), allpix.std()


def test_save_then_verify_matches_independent_numpy(overlay, tiny_data, tmp_path, capsys):
    assert run_script("compute_normalization", ["--config", overlay, "--mode", "save"]) == 0
    stats = json.loads((tmp_path / "normalization_stats.json").read_text())
    mean, std = independent_stats(stats["split_manifest"], tiny_data, stats["img_size"])
    assert stats["mean"] == pytest.approx([mean] * 3, abs=1e-6)
    assert stats["std"] == pytest.approx([std] * 3, abs=1e-6)
    assert stats["split_sizes"]["train"] == 18 and stats["img_size"] == 32 and stats["seed"] == 42
    constants = (tmp_path / "normalization_constants.py").read_text()
    assert "NORMALIZATION_MEAN" in constants
    assert run_script("compute_normalization", ["--config", overlay, "--mode", "verify"]) == 0
    assert "Statistics match" in capsys.readouterr().out


def test_verify_fails_on_tampered_or_stale_stats(overlay, tmp_path):
    run_script("compute_normalization", ["--config", overlay, "--mode", "save"])
    path = tmp_path / "normalization_stats.json"
    stats = json.loads(path.read_text())
    stats["mean"] = [0.9, 0.9, 0.9]
    path.write_text(json.dumps(stats))
    with pytest.raises(UserError, match="mean: saved"):
        run_script("compute_normalization", ["--config", overlay, "--mode", "verify"])
    with pytest.raises(UserError, match="img_size"):
        run_script("compute_normalization", ["--config", overlay, "--mode", "verify", "--img-size", "40"])


def test_training_reuses_matching_stats_and_recomputes_otherwise(overlay, tmp_path):
    from data.manifest import prepare_split
    from data.normalization import resolve_normalization

    run_script("compute_normalization", ["--config", overlay, "--mode", "save"])
    cfg = load_config(overlay)
    split = prepare_split(cfg)
    lines = []
    _, _, source = resolve_normalization(cfg, split, 32, log=lines.append)
    assert source == "precomputed"
    _, _, source = resolve_normalization(cfg, split, 48, log=lines.append)
    assert source == "computed" and any("another split or image size" in line for line in lines)
    assert "Nothing to do: they go into the checkpoint" in lines[-2]  # the user is told whether to act
    cfg = load_config(overlay, ["dataset.normalization=imagenet"])
    mean, _, source = resolve_normalization(cfg, split, 32, log=lines.append)
    assert source == "imagenet" and mean[0] == 0.485
