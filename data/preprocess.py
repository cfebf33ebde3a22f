"""The one preprocessing definition, shared by training, evaluation, export and inference.

Pixels arrive as uint8 grayscale already resized to img_size (data/images.py). Here, on whatever
device the model runs on: optional augmentation (training), scaling to [0, 1], normalization,
and replication to the 3 channels ImageNet-style backbones expect.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from data.preprocess_numpy import preprocess_numpy  # noqa: F401  (re-exported: the torch-free path)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Preprocessor(nn.Module):
    """uint8 (B, 1, H, W) -> normalized float (B, 3, H, W); augments per sample when training."""

    def __init__(self, mean, std, augment: bool = False, hflip: float = 0.5, rotation: float = 10.0,
                 brightness: float = 0.2, contrast: float = 0.2):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.augment, self.hflip, self.rotation = augment, hflip, rotation
        self.brightness, self.contrast = brightness, contrast

    @classmethod
    def from_config(cls, cfg, mean, std, train: bool) -> "Preprocessor":
        t = cfg.transform
        return cls(mean, std, augment=train and t.augmentation, hflip=t.hflip, rotation=t.rotation,
                   brightness=t.brightness, contrast=t.contrast)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255.0)
        if self.augment and self.training:
            x = self._augment(x)
        # Normalize per output channel; the 3 channels are copies of the one grayscale plane.
        return (x.expand(-1, 3, -1, -1) - self.mean) / self.std

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        # Per-sample random parameters, drawn with torch's RNG so --seed makes runs repeatable.
        # Each step follows its torchvision counterpart (RandomHorizontalFlip, RandomRotation,
        # ColorJitter); tests/test_augmentation.py checks that the distributions match.
        b = x.shape[0]
        dev = x.device
        flip = torch.rand(b, device=dev) < self.hflip
        x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
        if self.rotation > 0:
            angle = (torch.rand(b, device=dev) * 2 - 1) * math.radians(self.rotation)
            cos, sin = torch.cos(angle), torch.sin(angle)
            zero = torch.zeros_like(cos)
            theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            # Nearest, as RandomRotation's default: bilinear would blur and shrink the empty corners.
            x = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        if self.brightness > 0 or self.contrast > 0:
            x = self._color_jitter(x)
        return x

    def _color_jitter(self, x: torch.Tensor) -> torch.Tensor:
        # ColorJitter applies brightness and contrast in a random order per sample; clamping makes it matter.
        b, dev = x.shape[0], x.device
        fb = 1 + (torch.rand(b, 1, 1, 1, device=dev) * 2 - 1) * self.brightness
        fc = 1 + (torch.rand(b, 1, 1, 1, device=dev) * 2 - 1) * self.contrast
        brightness_first = torch.rand(b, 1, 1, 1, device=dev) < 0.5

        def brightness(t):
            return (t * fb).clamp_(0, 1)

        def contrast(t):  # as adjust_contrast: blend with the image's mean gray level
            mean = t.mean(dim=(1, 2, 3), keepdim=True)
            return (mean + fc * (t - mean)).clamp_(0, 1)

        first = torch.where(brightness_first, brightness(x), contrast(x))
        return torch.where(brightness_first, contrast(first), brightness(first))
