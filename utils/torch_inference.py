"""Predict with the PyTorch model of a checkpoint: the same interface as utils/onnx_inference.OnnxPredictor,
plus Grad-CAM overlays (which need the real nn.Module)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data.images import load_gray
from models.loading import model_from_checkpoint
from utils.checkpoint import load_checkpoint
from utils.export import contract_from_checkpoint
from utils.onnx_inference import Predictor


class TorchPredictor(Predictor):
    def __init__(self, checkpoint_path: str | Path, contract: dict | None = None, device: str = "cpu"):
        ckpt = load_checkpoint(checkpoint_path)  # weights_only=True: nothing is unpickled
        self.contract = contract or contract_from_checkpoint(ckpt)
        self.device = torch.device(device)
        self.model = model_from_checkpoint(ckpt, self.device)

    def predict_array(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits = self.model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device))
        return torch.softmax(logits.float(), dim=1).cpu().numpy()

    def gradcam(self, paths: list, predicted: list[int], out_dir) -> list[Path]:
        """One overlay PNG per image (Grad-CAM of its predicted class), named after the image."""
        from data.preprocess import Preprocessor
        from utils.explain import gradcam_gallery

        c = self.contract
        images = [(torch.from_numpy(load_gray(p, int(c["img_size"])))[None], -1) for p in paths]
        pre = Preprocessor(c["mean"], c["std"]).to(self.device).eval()
        files = gradcam_gallery(self.model, c["model_name"], images, pre, list(range(len(images))), predicted,
                                out_dir, self.device)
        return [f.replace(f.with_name(f"{i:03d}_{Path(p).stem}_gradcam.png"))
                for i, (f, p) in enumerate(zip(files, paths))]
