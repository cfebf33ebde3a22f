"""The one preprocessing definition, shared by training, evaluation, export and inference.

Pixels arrive as uint8 grayscale already resized to img_size (data/images.py). Here, on whatever
device the model runs on: optional augmentation (training), scaling to [0, 1], normalization,
and replication to the 3 channels ImageNet-style backbones expect.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from core.config import Config

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
    def from_config(cls, cfg: Config, mean, std, train: bool) -> Preprocessor:
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
        # Each step follows its torchvision counterpart (RandomHorizontalFlip, RandomRotation,
        # ColorJitter); tests/test_augmentation.py checks that the distributions match.
        # On a GPU the training step is nearly launch-bound, so the per-sample parameters are drawn
        # on the CPU (torch's seeded RNG) and sent in one copy, and the image sees few kernels.
        p = self._draw_params(x.shape[0], pin=x.is_cuda).to(x.device, non_blocking=True)
        if self.rotation > 0:
            x = self._flip_rotate(x, p[:, :6].view(-1, 2, 3))
        else:
            x = torch.where(p[:, 0].view(-1, 1, 1, 1) < 0, x.flip(-1), x)
        if self.brightness > 0 or self.contrast > 0:
            for a, k in ((p[:, 6], p[:, 7]), (p[:, 8], p[:, 9])):
                # y = clamp(a * x + k * mean(x)): brightness has k = 0, contrast k = 1 - factor
                shift = x.mean(dim=(1, 2, 3), keepdim=True).mul_(k.view(-1, 1, 1, 1))
                x = torch.addcmul(shift, x, a.view(-1, 1, 1, 1)).clamp_(0, 1)
        return x

    def _draw_params(self, b: int, pin: bool = False) -> torch.Tensor:
        """(b, 10) float32: the rotation+flip matrix (6), then two (factor, mean weight) jitter steps."""
        u = torch.rand(b, 5)
        sign = torch.where(u[:, 0] < self.hflip, -1.0, 1.0)  # a flip negates the sampled x coordinate
        angle = (u[:, 1] * 2 - 1) * math.radians(self.rotation)
        cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros(b)
        fb = 1 + (u[:, 2] * 2 - 1) * self.brightness
        fc = 1 + (u[:, 3] * 2 - 1) * self.contrast
        # ColorJitter applies brightness and contrast in a random order per sample (clamping makes it matter).
        contrast_first = u[:, 4] < 0.5
        brightness_step, contrast_step = (fb, zero), (fc, 1 - fc)
        first = [torch.where(contrast_first, c, b_) for c, b_ in zip(contrast_step, brightness_step)]
        second = [torch.where(contrast_first, b_, c) for c, b_ in zip(contrast_step, brightness_step)]
        params = torch.stack([sign * cos, -sign * sin, zero, sin, cos, zero, *first, *second], 1)
        return params.pin_memory() if pin else params  # pinned: the copy to the GPU stays asynchronous

    @staticmethod
    def _flip_rotate(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """Flip then rotate in one resampling."""
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        # Nearest, as RandomRotation's default: bilinear would blur and shrink the empty corners.
        return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
