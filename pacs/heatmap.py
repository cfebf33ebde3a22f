"""Grad-CAM heat maps for the secondary capture, from the PyTorch model of a checkpoint (the ONNX model
classifies; Grad-CAM needs the real module's gradients)."""
from __future__ import annotations

import numpy as np

from deploy.predictors import TorchPredictor
from pacs.pipeline import HeatMaps


def gradcam_heatmaps(predictor: TorchPredictor) -> HeatMaps:
    """heatmaps(grays, class indices): the Grad-CAM of each 8-bit frame (S x S, as the model saw it) for its
    class, 0..1, at the model's feature-map resolution upsampled to S x S."""
    import torch

    from data.preprocess import Preprocessor
    from evaluation.explain import CamModel, gradcam_maps

    c = predictor.contract
    cam = CamModel(predictor.model, c.model_name, Preprocessor(c.mean, c.std).to(predictor.device).eval(),
                   predictor.device)

    def heatmaps(grays: list[np.ndarray], classes: list[int]) -> list[np.ndarray]:
        images = torch.from_numpy(np.stack(grays))[:, None]
        return list(gradcam_maps(cam, images, classes))

    return heatmaps
