"""The pictures of the case view: the slice as a person reads it, and its Grad-CAM as a separate transparent
layer (the page lays it over the slice with an opacity slider and a toggle)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

SIMILAR = 0.08  # mean absolute difference (0..1 maps, at the feature map's resolution) under which maps "barely differ"
COMPARED = 50   # the most recent maps of the same version a map is compared with
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


def heat_facts(cam: np.ndarray, grid: tuple[int, int], img_size: int, facts: dict) -> dict:
    """What is kept beside a heat map: the model version, the feature map's resolution and the map at it."""
    rows, cols = grid
    cells = Image.fromarray(np.clip(cam, 0, 1).astype(np.float32)).resize((cols, rows), Image.Resampling.BOX)
    return {"model": facts["model"], "version": str(facts["version"]), "grid": [rows, cols], "input": img_size,
            "cells": np.round(np.asarray(cells, dtype=np.float64), 4).tolist()}


def compare_heatmaps(png_path: Path) -> dict:
    """A map's facts plus how far it lies, on average, from the other maps its version drew (the latest
    COMPARED): near zero, the map is much the same whatever the image, and says little about this one."""
    own = json.loads(png_path.with_suffix(".json").read_text())
    mine = np.asarray(own.pop("cells"))
    others = sorted((p for p in png_path.parent.glob("*.json") if p.stem != png_path.stem),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    gaps = []
    for path in others[:COMPARED * 4]:
        try:
            other = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if (other.get("model"), other.get("version")) == (own["model"], own["version"]) and \
                np.shape(other.get("cells")) == mine.shape:
            gaps.append(float(np.abs(np.asarray(other["cells"]) - mine).mean()))
        if len(gaps) == COMPARED:
            break
    gap = float(np.mean(gaps)) if gaps else None
    return {**own, "compared": len(gaps), "mean_difference": gap,
            "barely_differs": gap is not None and gap < SIMILAR}
