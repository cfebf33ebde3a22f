"""Grad-CAM heat maps for the secondary capture, from the PyTorch model of a checkpoint (the ONNX model
classifies; Grad-CAM needs the real module's gradients)."""
from __future__ import annotations

from deploy.predictors import TorchPredictor
from pacs.pipeline import HeatMaps


def gradcam_heatmaps(predictor: TorchPredictor) -> HeatMaps:
    """heatmaps(grays, class indices): the Grad-CAM of each 8-bit frame (S x S, as the model saw it) for its
    class, 0..1, at the model's feature-map resolution upsampled to S x S."""
    return predictor.cam_maps
