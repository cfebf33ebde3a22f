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


FRAME_MARK = "#frame="  # a record of one frame of a multi-frame file: "scan.dcm#frame=3" (frames count from 1)


def frame_name(path: str | Path, frame: int | None) -> str:
    """The record name of one frame: the path itself for a single image, path#frame=K for frame K of several."""
    return str(path) if frame is None else f"{path}{FRAME_MARK}{frame}"


def split_frame_name(name: str | Path) -> tuple[Path, int | None]:
    """(file, frame or None) of a record name; a file whose real name contains the mark is taken as it is."""
    text = str(name)
    head, mark, tail = text.rpartition(FRAME_MARK)
    if mark and tail.isdigit() and not Path(text).exists():
        return Path(head), int(tail)
    return Path(text), None


def is_dicom(path: str | Path) -> bool:
    return Path(path).suffix.lower() in DICOM_EXTENSIONS


def open_image(path: str | Path, size: int | None = None) -> Image.Image:
    """Decode one image file fully (so truncation is caught here) and return 8-bit grayscale.

    With `size`, a JPEG is decoded by libjpeg straight to grayscale and, when it is at least twice
    `size` on each side, at 1/2, 1/4 or 1/8 scale (DCT scaling): the entropy data is still read to
    the end, but part of the inverse DCT, the chroma and most of the resize are skipped (512 px ->
    224 px: 1.64 -> 1.23 ms per image, colour-encoded JPEGs 2.14 -> 1.24 ms). The pixels differ from a
    full decode by 1-2 grey levels on average; the DCT scaling is a box-like filter, so sharp edges
    differ by up to ~16 (tests/test_images.py). Every stage reads through here, so they all agree.
    A DICOM file gives its only frame (a multi-frame file is refused: name a frame, or use load_frames)."""
    path = Path(path)
    if is_dicom(path):
        frames = read_dicom(path)
        if len(frames) != 1:
            raise ImageReadError(f"{path}: {len(frames)} frames; each frame is its own image "
                                 f"({frame_name(path, 1)} ...)")
        return Image.fromarray(frames[0])
    try:
        if path.stat().st_size == 0:
            raise ImageReadError(f"{path}: empty file")
        with Image.open(path) as img:
            if size is not None and img.format == "JPEG":
                img.draft("L", (size, size))  # a no-op for JPEGs it cannot apply to (e.g. CMYK mode stays)
            img.load()
            return to_grayscale(img)
    except ImageReadError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(f"{path}: {type(exc).__name__}: {exc}") from None


def read_dicom(path: Path, frame: int | None = None) -> list[np.ndarray]:
    """A DICOM file's frames as uint8 (H, W) arrays (only `frame`, 1-based, when given): the file's own
    window when it has one, else a robust min-max over the frames decoded."""
    import pydicom  # only DICOM input needs it
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageReadError(f"{path}: empty file")
        ds = pydicom.dcmread(str(path))
        n = int(getattr(ds, "NumberOfFrames", 1) or 1)
        if frame is not None and not 1 <= frame <= n:
            raise ImageReadError(f"{path}: has {n} frame(s), no frame {frame}")
        arr = pydicom.pixels.pixel_array(ds, index=None if frame is None else frame - 1).astype(np.float64)
    except ImageReadError:
        raise
    # NotImplementedError/RuntimeError: a transfer syntax that no installed decoder handles
    except (InvalidDicomError, AttributeError, KeyError, TypeError, ValueError, OSError, NotImplementedError,
            RuntimeError) as exc:
        raise ImageReadError(f"{path}: not a readable DICOM image ({exc})") from None
    if int(getattr(ds, "SamplesPerPixel", 1) or 1) > 1:
        arr = arr[..., :3].mean(axis=-1)  # colour samples (last axis) to grey
    frames = arr[None] if arr.ndim == 2 else arr
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    window = dicom_window(ds)
    return [window_to_uint8(f * slope + intercept, window) for f in frames]


def dicom_window(ds) -> tuple[float, float] | None:
    """(low, high) of the file's first window (center/width), or None."""
    import pydicom

    center, width = getattr(ds, "WindowCenter", None), getattr(ds, "WindowWidth", None)
    if center is None or width is None:
        return None
    center = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
    width = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
    return center - width / 2, center + width / 2


def window_to_uint8(frame: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    """One frame to 8 bits: through the window, else a robust (0.5-99.5 percentile) min-max of the frame."""
    if window is None:
        window = tuple(float(v) for v in np.percentile(frame, [0.5, 99.5]))
    return stretch_to_uint8(frame, *window)


def resize_gray(img: Image.Image, size: int) -> np.ndarray:
    """Resize an 'L' image to size x size with the project's one filter; uint8 (H, W)."""
    if img.size != (size, size):
        img = img.resize((size, size), RESAMPLE, reducing_gap=None)
    return np.array(img, dtype=np.uint8)  # a writable copy: torch.from_numpy needs one


def load_gray(path: str | Path, size: int) -> np.ndarray:
    """Decode, convert to grayscale and resize one image, or the frame a record name points at
    (scan.dcm#frame=3): uint8 array (size, size). Raises ImageReadError."""
    path, frame = split_frame_name(path)
    if frame is None:
        return resize_gray(open_image(path, size), size)
    if not is_dicom(path):
        raise ImageReadError(f"{path}: only DICOM files have frames")
    return resize_gray(Image.fromarray(read_dicom(path, frame)[0]), size)


def load_frames(path: str | Path, size: int) -> list[tuple[str, np.ndarray]]:
    """Every image in a file as (record name, uint8 (size, size)): one for an image, one per frame of a
    multi-frame DICOM (named path#frame=K). Raises ImageReadError."""
    path = Path(path)
    if not is_dicom(path):
        return [(str(path), load_gray(path, size))]
    frames = read_dicom(path)
    if len(frames) == 1:
        return [(str(path), resize_gray(Image.fromarray(frames[0]), size))]
    return [(frame_name(path, k), resize_gray(Image.fromarray(f), size)) for k, f in enumerate(frames, 1)]
