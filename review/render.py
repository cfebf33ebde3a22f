"""The pictures of the case view: the slice as a person reads it, and its Grad-CAM as a separate transparent
layer (the page lays it over the slice with an opacity slider and a toggle)."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

MAX_SIDE = 1024  # a larger slice is shown scaled down (the page shows it in a box of about 512 px anyway)


def display_size(width: int, height: int) -> tuple[int, int]:
    scale = min(1.0, MAX_SIDE / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def slice_png(gray: np.ndarray) -> bytes:
    img = Image.fromarray(np.asarray(gray, dtype=np.uint8))
    return png(img.resize(display_size(*img.size), Image.Resampling.BILINEAR) if max(img.size) > MAX_SIDE else img)


def heatmap_png(cam: np.ndarray, size: tuple[int, int]) -> bytes:
    """A jet-coloured RGBA layer of a 0..1 map at the displayed slice's size; cold regions are transparent, so
    the slice shows through them whatever the opacity."""
    import matplotlib

    w, h = display_size(*size)
    layer = Image.fromarray(np.clip(cam, 0, 1).astype(np.float32))
    values = np.asarray(layer.resize((w, h), Image.Resampling.BILINEAR))
    rgba = matplotlib.colormaps["jet"](values)
    rgba[..., 3] = np.clip(values, 0, 1) ** 0.7  # the model's attention shows as colour; the rest stays clear
    return png(Image.fromarray((rgba * 255).astype(np.uint8), "RGBA"))
