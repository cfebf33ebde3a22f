"""Torch-free preprocessing for ONNX Runtime inference: the arithmetic of data.preprocess.Preprocessor in numpy.

Kept in its own module so that predicting from an exported model needs numpy, Pillow and
onnxruntime only (importing data.preprocess would pull in torch).
"""
from __future__ import annotations

import numpy as np


def preprocess_numpy(gray: np.ndarray, mean, std) -> np.ndarray:
    """Inference without torch: uint8 (H, W) -> float32 (1, 3, H, W), same arithmetic as Preprocessor."""
    x = gray.astype(np.float32) / np.float32(255.0)
    m = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    return ((x[None] - m) / s)[None].astype(np.float32, copy=False)
