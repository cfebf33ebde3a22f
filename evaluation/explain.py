"""Grad-CAM overlays (pytorch-grad-cam) for correct and misclassified test images, with an HTML index.

pytorch-grad-cam pulls in OpenCV, so it is imported only where an overlay is drawn.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw

from core.fileio import atomic_file, private_dir, write_text_atomic
from models.loading import unwrap

if TYPE_CHECKING:
    from evaluation.prediction import Scored

TILE = 256  # pixels per panel: small demo images are upscaled so a person can see them


@dataclass
class CamModel:
    """What a Grad-CAM needs: the model, its zoo name (for the target layer), its preprocessing, its device."""
    model: torch.nn.Module
    model_name: str
    preprocess: torch.nn.Module
    device: torch.device


def _tokens_to_grid(tensor: torch.Tensor) -> torch.Tensor:
    """ViT tokens (B, 1 + N, C) -> (B, C, sqrt N, sqrt N), dropping the class token."""
    tokens = tensor[:, 1:, :]
    side = int(math.isqrt(tokens.shape[1]))
    return tokens.reshape(tokens.shape[0], side, side, tokens.shape[2]).permute(0, 3, 1, 2)


def _channels_first(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.permute(0, 3, 1, 2)  # torchvision Swin keeps (B, H, W, C)


def cam_target(model: torch.nn.Module, model_name: str):
    """(target layers, reshape_transform) for Grad-CAM: the last spatial feature map of each family."""
    model = unwrap(model)
    if model_name.startswith("resnet"):
        return [model.layer4[-1]], None
    if model_name.startswith("efficientnet"):
        return [model.features[-1]], None
    if model_name == "medical_cnn":
        return [model.backbone[0][-1]], None  # backbone = Sequential(features, avgpool, flatten)
    if model_name == "xception_medical":
        return [model.backbone.act4], None
    if model_name.startswith("swin"):
        return [model.norm], _channels_first
    if model_name.startswith("vit"):
        return [model.encoder.layers[-1].ln_1], _tokens_to_grid
    raise ValueError(f"no Grad-CAM target layer known for {model_name}")


def feature_grid(cam_model: CamModel, size: int) -> tuple[int, int]:
    """(rows, columns) of the feature map Grad-CAM reads at an S x S input: the map's real resolution (a 2 x 2 grid
    upsampled to the slice marks a quarter of it, not a lesion)."""
    model = unwrap(cam_model.model).eval()
    [layer], reshape = cam_target(model, cam_model.model_name)
    seen = []
    hook = layer.register_forward_hook(lambda _m, _i, out: seen.append(reshape(out) if reshape else out))
    try:
        with torch.no_grad():
            model(cam_model.preprocess(torch.zeros(1, 1, size, size, dtype=torch.uint8, device=cam_model.device)))
    finally:
        hook.remove()
    return int(seen[0].shape[-2]), int(seen[0].shape[-1])


def select_examples(y_true, y_pred, n_correct: int, seed: int = 0) -> list[int]:
    """Every misclassified index, plus a seeded random sample of n_correct correctly classified ones."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    wrong = np.flatnonzero(y_true != y_pred)
    right = np.flatnonzero(y_true == y_pred)
    rng = np.random.default_rng(seed)
    sample = rng.choice(right, size=min(n_correct, len(right)), replace=False) if len(right) else right
    return sorted(wrong.tolist()) + sorted(sample.tolist())


def _overlay_panel(gray: np.ndarray, cam: np.ndarray, caption: str = "") -> Image.Image:
    """The image and its Grad-CAM overlay side by side, each TILE pixels wide, a caption underneath."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = np.repeat(gray[..., None].astype(np.float32) / 255.0, 3, axis=2)
    overlay = show_cam_on_image(rgb, cam, use_rgb=True, image_weight=0.6)
    left = Image.fromarray(gray).convert("RGB").resize((TILE, TILE), Image.BILINEAR)
    right = Image.fromarray(overlay).resize((TILE, TILE), Image.BILINEAR)
    panel = Image.new("RGB", (2 * TILE + 8, TILE + 28), "white")
    panel.paste(left, (0, 0))
    panel.paste(right, (TILE + 8, 0))
    ImageDraw.Draw(panel).text((6, TILE + 6), caption, fill="black", font_size=16)
    return panel


def gradcam_maps(cam_model: CamModel, images: torch.Tensor, targets: list[int], batch_size: int = 16) -> np.ndarray:
    """Grad-CAM maps (N, S, S), 0..1, of uint8 images (N, 1, S, S), each for its target class index."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = unwrap(cam_model.model).eval()
    model.requires_grad_(True)  # frozen backbones (medical_cnn) need gradients at the target layer
    layers, reshape = cam_target(model, cam_model.model_name)
    maps = []
    with GradCAM(model=model, target_layers=layers, reshape_transform=reshape) as cam:
        for start in range(0, len(images), batch_size):
            with torch.no_grad():
                x = cam_model.preprocess(images[start:start + batch_size].to(cam_model.device))
            chunk = targets[start:start + batch_size]
            maps.append(cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in chunk]))
    return np.concatenate(maps) if maps else np.zeros((0,) + tuple(images.shape[-2:]), dtype=np.float32)


def gradcam_gallery(cam_model: CamModel, dataset, indices: list[int], y_pred, out_dir,
                    captions: list[str] | None = None, batch_size: int = 16) -> list[Path]:
    """One PNG per index (Grad-CAM of the predicted class); returns the file paths in order."""
    out_dir = private_dir(out_dir)  # overlays are patient pixels: owner-only folder and files
    for old in out_dir.glob("gradcam_*.png"):  # overlays of an earlier evaluation would mix with these
        old.unlink()
    if not indices:
        return []
    images = torch.stack([dataset[i][0] for i in indices])
    maps = gradcam_maps(cam_model, images, [int(y_pred[i]) for i in indices], batch_size)
    files = []
    for j, (i, gray, m) in enumerate(zip(indices, images[:, 0].numpy(), maps)):
        path = out_dir / f"gradcam_{i:05d}.png"
        with atomic_file(path, private=True) as fh:
            _overlay_panel(gray, m, captions[j] if captions else "").save(fh, format="PNG")
        files.append(path)
    return files


def write_gradcam_index(entries: list[dict], out_dir, model_name: str) -> Path:
    """gradcam/index.html: each overlay beside its path, true class, predicted class and confidence (a template,
    autoescaped: a file name is only ever text on the page)."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    pages = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                        autoescape=select_autoescape(["html"]))
    wrong = sum(e["true"] != e["predicted"] for e in entries)
    page = pages.get_template("gradcam_index.html").render(entries=entries, wrong=wrong, model_name=model_name)
    return write_text_atomic(Path(out_dir) / "index.html", page)


def explain_test_set(cam_model: CamModel, test: Scored, class_names: list[str], out_dir, n_correct: int,
                     seed: int = 0) -> Path:
    """Grad-CAM for every misclassified and n_correct correctly classified test images; returns index.html."""
    y_true, y_prob, rel_paths = test.y_true, np.asarray(test.y_prob), test.paths
    y_pred = y_prob.argmax(axis=1)
    indices = select_examples(y_true, y_pred, n_correct, seed)
    captions = [f"true: {class_names[int(y_true[i])]} | predicted: {class_names[int(y_pred[i])]} "
                f"({y_prob[i].max():.1%})" for i in indices]
    files = gradcam_gallery(cam_model, test.dataset, indices, y_pred, out_dir, captions)
    entries = [{"file": f.name, "path": rel_paths[i], "true": class_names[int(y_true[i])],
                "predicted": class_names[int(y_pred[i])], "confidence": float(y_prob[i].max())}
               for i, f in zip(indices, files)]
    return write_gradcam_index(entries, out_dir, cam_model.model_name)
