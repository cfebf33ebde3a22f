"""An exported ONNX file behind nn.Module's call, so the toolkit's own scoring loop (evaluation.prediction,
evaluation.timing) scores it exactly as it scores the PyTorch model: the int8 export's gate and
`evaluate.py --onnx` use it."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from core.errors import UserError
from deploy.predictors import OnnxPredictor

if TYPE_CHECKING:
    from evaluation.source import OpenedCheckpoint


class OnnxModule(torch.nn.Module):
    """Logits from an ONNX Runtime session (CPU) for a float batch (N, 3, S, S) on any device; (logits,
    ood_distance) when the file has the feature-space distance output, as the PyTorch model it came from."""

    def __init__(self, predictor: OnnxPredictor):
        super().__init__()
        self.predictor = predictor

    @property
    def contract(self):
        return self.predictor.contract

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        logits, distance = self.predictor.outputs(x.detach().float().cpu().numpy())
        logits = torch.from_numpy(np.asarray(logits, dtype=np.float32)).to(x.device)
        if distance is None:
            return logits
        return logits, torch.from_numpy(np.asarray(distance, dtype=np.float32)).to(x.device)


def open_onnx(path: str | Path, threads: int | None = None) -> OnnxModule:
    """The file on ONNX Runtime's CPU provider (int8 QDQ kernels are CPU kernels)."""
    return OnnxModule(OnnxPredictor(path, providers=["CPUExecutionProvider"], threads=threads))


def open_exported(path: str | Path, opened: OpenedCheckpoint) -> tuple[OnnxModule, dict]:
    """(the file in ONNX Runtime, its artifact record) for `evaluate.py --onnx`: it must be an ONNX file exported
    from this very checkpoint (the same preprocessing contract), fp32 or int8."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--onnx {path}: no such file")
    try:
        module = open_onnx(path)
    except Exception as exc:  # not ONNX, no contract, an operator ONNX Runtime lacks: one line, whichever it is
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"--onnx {path}: cannot be scored ({first})") from None
    if module.contract != opened.contract:
        raise UserError(f"--onnx {path} was not exported from {opened.path} (its preprocessing contract differs); "
                        "pass the checkpoint it came from with --checkpoint")
    import onnxruntime

    return module, {"path": str(path), "runtime": f"onnxruntime {onnxruntime.__version__}",
                    "precision": module.contract.extra.get("precision", "fp32")}
