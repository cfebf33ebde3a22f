"""An exported ONNX file behind nn.Module's call, so the toolkit's own scoring loop (evaluation.prediction,
evaluation.timing) scores it exactly as it scores the PyTorch model: the int8 export's gate and
`evaluate.py --onnx` use it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from deploy.predictors import OnnxPredictor


class OnnxModule(torch.nn.Module):
    """Logits from an ONNX Runtime session (CPU) for a float batch (N, 3, S, S) on any device."""

    def __init__(self, predictor: OnnxPredictor):
        super().__init__()
        self.predictor = predictor

    @property
    def contract(self):
        return self.predictor.contract

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.predictor.logits(x.detach().float().cpu().numpy())
        return torch.from_numpy(np.asarray(logits, dtype=np.float32)).to(x.device)


def open_onnx(path: str | Path, threads: int | None = None) -> OnnxModule:
    """The file on ONNX Runtime's CPU provider (int8 QDQ kernels are CPU kernels)."""
    return OnnxModule(OnnxPredictor(path, providers=["CPUExecutionProvider"], threads=threads))
