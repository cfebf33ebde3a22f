"""The batched augmentation of Preprocessor draws from the same distributions as the per-sample
torchvision pipeline it replaces (RandomHorizontalFlip, RandomRotation(10), ColorJitter(0.2, 0.2)).

Seeds are fixed, so each comparison is deterministic; the KS thresholds leave room for sampling noise
(n = 400 per side) while catching a different interpolation, ordering or parameter range.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp
from torchvision.transforms import v2

from data.preprocess import Preprocessor
from data.synthetic import CLASS_FOLDERS, render_slice

N = 400
SIZE = 48


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """N uint8 (1, S, S) phantoms with a raised background, so that only rotation makes zero pixels."""
    base = [render_slice(CLASS_FOLDERS[i % 3], np.random.default_rng(i), SIZE) for i in range(8)]
    base = [np.clip(40 + b.astype(np.int16) * 215 // 255, 1, 255).astype(np.uint8) for b in base]
    return torch.from_numpy(np.stack([base[i % 8] for i in range(N)])).unsqueeze(1)


def ours(images: torch.Tensor, seed: int = 0, **kw) -> torch.Tensor:
    """Preprocessor's augmentation, identity normalization: float (N, S, S) in [0, 1]."""
    torch.manual_seed(seed)
    pre = Preprocessor([0.0] * 3, [1.0] * 3, augment=True, **kw).train()
    return pre(images)[:, 0]


def reference(images: torch.Tensor, seed: int = 1, hflip=0.5, rotation=10.0, brightness=0.2,
              contrast=0.2) -> torch.Tensor:
    """The per-sample torchvision pipeline on the same uint8 images: float (N, S, S) in [0, 1]."""
    steps = []
    if hflip:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if rotation:
        steps.append(v2.RandomRotation(rotation))
    if brightness or contrast:
        steps.append(v2.ColorJitter(brightness=brightness or None, contrast=contrast or None))
    pipeline = v2.Compose(steps)
    torch.manual_seed(seed)
    return torch.stack([pipeline(img) for img in images]).float().div(255)[:, 0]


def assert_same_distribution(a: torch.Tensor, b: torch.Tensor, what: str, p_min: float = 0.01):
    p = ks_2samp(a.numpy().ravel(), b.numpy().ravel()).pvalue
    assert p > p_min, (f"{what}: KS p={p:.2g}, ours {a.mean():.4f}±{a.std():.4f} vs torchvision "
                       f"{b.mean():.4f}±{b.std():.4f}")


@pytest.mark.parametrize("rotation", [0, 1e-6])  # 1e-6: the flip goes through the rotation's resampling
def test_flip_fraction_and_identity_elsewhere(images, rotation):
    out = ours(images, hflip=0.5, rotation=rotation, brightness=0, contrast=0)
    x = images[:, 0].float() / 255
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    unchanged = (out == x).flatten(1).all(1)
    assert bool((flipped | unchanged).all()), "a sample was changed by something other than a flip"
    ref = reference(images, hflip=0.5, rotation=0, brightness=0, contrast=0)
    ref_flipped = (ref == x.flip(-1)).flatten(1).all(1).float().mean()
    # Binomial(400, 0.5): sd 0.025; both within 4 sd of 0.5.
    assert abs(flipped.float().mean() - 0.5) < 0.1 and abs(ref_flipped - 0.5) < 0.1


def test_rotation_zero_pixels_match(images):
    """The corners that rotation leaves empty: same per-image count distribution as RandomRotation(10)."""
    zeros_ours = (ours(images, hflip=0, rotation=10, brightness=0, contrast=0) == 0).flatten(1).sum(1).float()
    zeros_ref = (reference(images, hflip=0, rotation=10, brightness=0, contrast=0) == 0).flatten(1).sum(1).float()
    assert zeros_ref.max() > 0 and zeros_ours.max() > 0
    assert_same_distribution(zeros_ours, zeros_ref, "rotation-induced zero pixels per image")


def test_color_jitter_matches(images):
    a = ours(images, hflip=0, rotation=0, brightness=0.2, contrast=0.2)
    b = reference(images, hflip=0, rotation=0, brightness=0.2, contrast=0.2)
    assert_same_distribution(a.mean((1, 2)), b.mean((1, 2)), "per-image mean brightness")
    assert_same_distribution(a.std((1, 2)), b.std((1, 2)), "per-image contrast (std)")
    assert_same_distribution((a == 1).flatten(1).float().mean(1), (b == 1).flatten(1).float().mean(1),
                             "fraction of saturated pixels")


def test_full_pipeline_matches(images):
    a, b = ours(images), reference(images)
    assert abs(a.mean() - b.mean()) < 0.01 and abs(a.std() - b.std()) < 0.01
    assert_same_distribution(a.mean((1, 2)), b.mean((1, 2)), "per-image mean brightness")
    assert_same_distribution(a.std((1, 2)), b.std((1, 2)), "per-image std")
    assert_same_distribution((a == 0).flatten(1).sum(1).float(), (b == 0).flatten(1).sum(1).float(),
                             "zero pixels per image")


def test_eval_mode_does_not_augment(images):
    pre = Preprocessor([0.5] * 3, [0.25] * 3, augment=True).eval()
    out = pre(images[:4])
    expected = (images[:4].float() / 255 - 0.5) / 0.25
    assert out.shape == (4, 3, SIZE, SIZE)
    torch.testing.assert_close(out, expected.expand(-1, 3, -1, -1))
