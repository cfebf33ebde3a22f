"""The one image loader: any file a user may hand us -> 8-bit grayscale, resized.

Every stage (statistics, training, evaluation, inference, the cache) reads pixels through here,
so preprocessing cannot drift between training and deployment.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
DICOM_EXTENSIONS = (".dcm", ".dicom")
# The one resampling filter; antialiased so that 512 px -> 64 px keeps small lesions visible.
RESAMPLE = Image.Resampling.BILINEAR


class ImageReadError(Exception):
    """A file that cannot be decoded as an image (corrupt, truncated, empty, not an image)."""


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def to_grayscale(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit 'L' the same way everywhere."""
    if img.mode == "L":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # >8-bit data (16-bit PNG/TIFF): stretch its own range to 0..255; plain clipping would lose it.
        arr = np.asarray(img, dtype=np.float64)
        return Image.fromarray(stretch_to_uint8(arr))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels become black, the MRI background, not white.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("L")
    if img.mode == "1":
        return img.convert("L")
    return img.convert("RGB").convert("L")  # P, CMYK, YCbCr, RGB ...


def stretch_to_uint8(arr: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Linear map of [low, high] (default: the array's min/max) to 0..255."""
    arr = np.asarray(arr, dtype=np.float64)
    lo = float(np.min(arr)) if low is None else low
    hi = float(np.max(arr)) if high is None else high
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.clip(np.rint((arr - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def open_image(path: str | Path, size: int | None = None) -> Image.Image:
    """Decode fully (so truncation is caught here) and return 8-bit grayscale.

    With `size`, a JPEG is decoded by libjpeg straight to grayscale and, when it is at least twice
    `size` on each side, at 1/2, 1/4 or 1/8 scale (DCT scaling): the entropy data is still read to
    the end, but part of the inverse DCT, the chroma and most of the resize are skipped (512 px ->
    224 px: 1.64 -> 1.23 ms per image, colour-encoded JPEGs 2.14 -> 1.24 ms). The pixels differ from a
    full decode by 1-2 grey levels on average; the DCT scaling is a box-like filter, so sharp edges
    differ by up to ~16 (tests/test_images.py). Every stage reads through here, so they all agree."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageReadError(f"{path}: empty file")
        if path.suffix.lower() in DICOM_EXTENSIONS:
            return Image.fromarray(read_dicom(path))
        with Image.open(path) as img:
            if size is not None and img.format == "JPEG":
                img.draft("L", (size, size))  # a no-op for JPEGs it cannot apply to (e.g. CMYK mode stays)
            img.load()
            return to_grayscale(img)
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(f"{path}: {type(exc).__name__}: {exc}") from None


def read_dicom(path: Path) -> np.ndarray:
    """A DICOM slice as uint8: the file's own window when it has one, else a robust min-max."""
    import pydicom  # only inference on .dcm needs it
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(path))
        arr = ds.pixel_array.astype(np.float64)
    except (InvalidDicomError, AttributeError, KeyError, TypeError) as exc:
        raise ImageReadError(f"{path}: not a readable DICOM image ({exc})") from None
    if arr.ndim == 3:  # multi-frame or colour: take the first frame / plane
        arr = arr[0] if arr.shape[-1] not in (3, 4) else arr.mean(axis=-1)
    arr = arr * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)
    center, width = getattr(ds, "WindowCenter", None), getattr(ds, "WindowWidth", None)
    if center is not None and width is not None:
        center = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        width = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
        return stretch_to_uint8(arr, center - width / 2, center + width / 2)
    low, high = np.percentile(arr, [0.5, 99.5])
    return stretch_to_uint8(arr, float(low), float(high))


def resize_gray(img: Image.Image, size: int) -> np.ndarray:
    """Resize an 'L' image to size x size with the project's one filter; uint8 (H, W)."""
    if img.size != (size, size):
        img = img.resize((size, size), RESAMPLE, reducing_gap=None)
    return np.array(img, dtype=np.uint8)  # a writable copy: torch.from_numpy needs one


def load_gray(path: str | Path, size: int) -> np.ndarray:
    """Decode, convert to grayscale and resize: uint8 array (size, size). Raises ImageReadError."""
    return resize_gray(open_image(path, size), size)
