"""The one image loader: any file a user may hand us -> 8-bit grayscale, resized.

Every stage (statistics, training, evaluation, inference, the cache) reads pixels through here,
so preprocessing cannot drift between training and deployment.

Every file is bounded before it is decoded (ImageLimits: pixels per image or frame, frames per file,
bytes per file), and every decoder failure (Pillow's decompression-bomb guard, pydicom and its
plugins, a truncated or foreign file) is one ImageReadError naming the file, so a batch, a scan or a
server reports it and goes on. The limits belong to the process and importing this module sets nothing:
every entry point (each script's main, the server's workers, the archive's tasks) calls
configure_limits(cfg) once it has its config, which also turns Pillow's bomb warning into an error.
Pool workers and dataset copies in worker processes carry the limits along (set_limits).
"""
from __future__ import annotations

import contextlib
import re
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
# The only decoders Pillow may use, whatever a file is named: its other plugins (WebP, TGA, PCX, JPEG 2000, EPS
# through Ghostscript ...) are attack surface no MRI slice needs.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "TIFF")  # JPEG includes its multi-picture (MPO) form
DICOM_EXTENSIONS = (".dcm", ".dicom")
# The one resampling filter; antialiased so that 512 px -> 64 px keeps small lesions visible.
RESAMPLE = Image.Resampling.BILINEAR
DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # >8-bit grey
BAND_PIXELS = 1 << 22  # >8-bit images are stretched in bands of ~4 Mpx: float32 copies stay small
DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian: the whole data set is zlib-deflated
INFLATE_CHUNK = 1 << 20
DICOM_CODECS = "uncompressed, deflate, RLE, JPEG (baseline, extended, lossless), JPEG-LS, JPEG 2000, HTJ2K"

class ImageReadError(Exception):
    """A file that cannot be decoded as an image (corrupt, truncated, empty, not an image, over a limit)."""


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on one decoded file; the defaults sit far above any MRI slice (512x512 = 0.26 Mpx)."""
    max_pixels: int = 50_000_000  # per image or frame
    max_frames: int = 2000  # per multi-frame DICOM
    max_bytes: int = 2 * 1024 ** 3  # per file


_limits = ImageLimits()


def set_limits(limits: ImageLimits) -> ImageLimits:
    """Bound every later decode in this process; returns the previous limits."""
    global _limits
    previous, _limits = _limits, limits
    Image.MAX_IMAGE_PIXELS = limits.max_pixels  # Pillow's own guard, before it reads any pixel
    # Pillow warns about a decompression bomb below twice its pixel limit: here that is an error too.
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
    return previous


def current_limits() -> ImageLimits:
    return _limits


def configure_limits(cfg) -> ImageLimits:
    """The config's images: section in force for this process: each entry point calls this once it has its config
    (nothing is set at import). Returns the previous limits."""
    section = cfg.images
    return set_limits(ImageLimits(int(section.max_pixels), int(section.max_frames), int(section.max_bytes)))


@contextlib.contextmanager
def decoding(path: Path) -> Iterator[None]:
    """Any failure while decoding `path` as one ImageReadError naming it."""
    try:
        yield
    except ImageReadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))  # Pillow: "Image size (N pixels) exceeds limit ..."
        size = f"{found.group(1)} pixels" if found else "more pixels"
        raise ImageReadError(f"{path}: {size}, over the limit of {_limits.max_pixels} (images.max_pixels)") from None
    except Exception as exc:  # Pillow, pydicom and its plugins raise many kinds for a bad file; each costs one line
        raise ImageReadError(f"{path}: {type(exc).__name__}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    """The message on one line: its first line, and the next one when the first only introduces it."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return "unreadable"
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return text[:300]


def check_file(path: Path) -> int:
    """The file's size in bytes; refuses an empty file or one over images.max_bytes before any read."""
    size = path.stat().st_size
    if size == 0:
        raise ImageReadError(f"{path}: empty file")
    if size > _limits.max_bytes:
        raise ImageReadError(f"{path}: {size} bytes, over the limit of {_limits.max_bytes} (images.max_bytes)")
    return size


def inflated_size(stream, limit: int) -> int:
    """The bytes a raw deflate stream inflates to, counted a MiB at a time and never kept; stops once past `limit`
    (a 0.5 MB Deflated DICOM can hold 512 MB of zeros, which pydicom and pynetdicom would inflate whole)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    while chunk := stream.read(INFLATE_CHUNK):
        while True:
            out = inflater.decompress(chunk, INFLATE_CHUNK)
            total += len(out)
            if total > limit:
                return total
            chunk = inflater.unconsumed_tail
            if not chunk and len(out) < INFLATE_CHUNK:
                break
    return total


def check_inflated(path: Path, limit: int | None = None) -> None:
    """Refuses a Deflated DICOM file whose data set inflates past `limit` bytes (default images.max_bytes) before
    anything inflates it; other files pass untouched (the decoder judges them)."""
    from pydicom.filereader import read_file_meta_info

    limit = _limits.max_bytes if limit is None else limit
    try:
        meta = read_file_meta_info(path)
    except Exception:  # noqa: BLE001 - not a Part 10 file: nothing is inflated for it here
        return
    if str(meta.get("TransferSyntaxUID", "")) != DEFLATED:
        return
    if "FileMetaInformationGroupLength" not in meta:
        raise ImageReadError(f"{path}: a deflated data set without File Meta Information Group Length")
    with open(path, "rb") as fh:
        fh.seek(128 + 4 + 12 + int(meta.FileMetaInformationGroupLength))  # preamble, DICM, (0002,0000), group 2
        if inflated_size(fh, limit) > limit:
            raise ImageReadError(f"{path}: a deflated data set that inflates past {limit} bytes")


def check_pixels(path: Path, width: int, height: int, what: str = "image") -> None:
    if width * height > _limits.max_pixels:
        raise ImageReadError(f"{path}: {what} of {width}x{height} pixels, over the limit of {_limits.max_pixels} "
                             "(images.max_pixels)")


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def to_grayscale(img: Image.Image, size: int | None = None) -> Image.Image:
    """Convert any PIL mode to 8-bit 'L' the same way everywhere (>8-bit data reduced to `size` first)."""
    if img.mode == "L":
        return img
    if img.mode in DEEP_MODES:
        return deep_to_gray(img, size)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels become black, the MRI background, not white.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("L")
    if img.mode == "1":
        return img.convert("L")
    return img.convert("RGB").convert("L")  # P, CMYK, YCbCr, RGB ...


def deep_to_gray(img: Image.Image, size: int | None = None) -> Image.Image:
    """>8-bit data (16-bit PNG/TIFF): its own full range stretched to 0..255 (plain clipping would lose it).

    The range is read in place, the image is resized to `size` in its own bit depth, and only then
    stretched, in float32 bands: memory stays near the decoded image (a 13000x13000 16-bit PNG: ~0.4 GB,
    where a float64 stretch at full size took 4 GB)."""
    if img.mode not in ("I;16", "I", "F"):
        img = img.convert("I")  # big-endian and explicit-endian 16-bit: the modes Pillow resizes natively
    low, high = (float(v) for v in img.getextrema())
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), RESAMPLE, reducing_gap=None)
    width, height = img.size
    out = np.empty((height, width), dtype=np.uint8)
    band = max(1, BAND_PIXELS // max(width, 1))
    for top in range(0, height, band):
        rows = np.array(img.crop((0, top, width, min(height, top + band))), dtype=np.float32)
        out[top:top + len(rows)] = _stretch_inplace(rows, low, high)
    return Image.fromarray(out)


def _stretch_inplace(arr: np.ndarray, low: float | None, high: float | None) -> np.ndarray:
    """Linear map of [low, high] (default: the array's min/max) to 0..255 uint8, on a float32 array of our own
    (overwritten: no second full-size copy)."""
    lo = float(np.min(arr)) if low is None else float(low)
    hi = float(np.max(arr)) if high is None else float(high)
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    arr -= lo
    arr *= 255.0 / (hi - lo)
    np.rint(arr, out=arr)
    np.clip(arr, 0, 255, out=arr)
    return arr.astype(np.uint8)


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


def image_files(items) -> list[Path]:
    """Folders become their image and DICOM files (sorted, hidden files left out); files are kept as given, even
    with odd suffixes (the decoder judges them)."""
    paths = []
    for item in map(Path, items):
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.is_file() and not p.name.startswith(".")
                            and p.suffix.lower() in IMAGE_EXTENSIONS + DICOM_EXTENSIONS)
        else:
            paths.append(item)
    return paths


def frame_count(ds) -> int:
    """The frames a DICOM data set holds, read from its NumberOfFrames the one way every stage reads it:
    absent, empty or 0 is one frame; a value that is not a whole number raises ValueError or TypeError
    (each caller reports it in its own terms). Bounding the count is the caller's job (images.max_frames)."""
    return int(ds.get("NumberOfFrames", 1) or 1)


def is_dicom(path: str | Path) -> bool:
    return Path(path).suffix.lower() in DICOM_EXTENSIONS


def open_image(path: str | Path, size: int | None = None) -> Image.Image:
    """Decode one image file fully (so truncation is caught here) and return 8-bit grayscale.

    With `size`, a JPEG is decoded by libjpeg straight to grayscale and, when it is at least twice
    `size` on each side, at 1/2, 1/4 or 1/8 scale (DCT scaling): the entropy data is still read to
    the end, but part of the inverse DCT, the chroma and most of the resize are skipped (512 px ->
    224 px: 1.64 -> 1.23 ms per image, colour-encoded JPEGs 2.14 -> 1.24 ms). The pixels differ from a
    full decode by 1-2 grey levels on average; the DCT scaling is a box-like filter, so sharp edges
    differ by up to ~16 (tests/test_images.py). A >8-bit image comes back already at `size`.
    Every stage reads through here, so they all agree.
    A DICOM file gives its only frame (a multi-frame file is refused: name a frame, or use load_frames)."""
    path = Path(path)
    if is_dicom(path):
        dicom = DicomFile(path)
        if dicom.frames != 1:
            raise ImageReadError(f"{path}: {dicom.frames} frames; each frame is its own image "
                                 f"({frame_name(path, 1)} ...)")
        return Image.fromarray(dicom.frame(1))
    with decoding(path):
        check_file(path)
        try:
            opened = Image.open(path, formats=IMAGE_FORMATS)
        except Image.UnidentifiedImageError:
            raise ImageReadError(f"{path}: not a JPEG, PNG, BMP or TIFF image (the formats read)") from None
        with opened as img:
            check_pixels(path, *img.size)  # the header only: nothing is decoded yet
            if size is not None and img.format == "JPEG":
                img.draft("L", (size, size))  # a no-op for JPEGs it cannot apply to (e.g. CMYK mode stays)
            img.load()
            return to_grayscale(img, size)


class DicomFile:
    """One DICOM file, its header read and checked (bytes, pixels per frame, frames, a decoder for its
    transfer syntax); frames are decoded one at a time, so a long series never sits in memory at once."""

    def __init__(self, path: str | Path):
        import pydicom  # only DICOM input needs it

        self.path = Path(path)
        with decoding(self.path):
            check_file(self.path)
            check_inflated(self.path)
            self.ds = pydicom.dcmread(str(self.path))
            if "PixelData" not in self.ds:
                raise ImageReadError(f"{self.path}: a DICOM file without pixel data")
            self.frames = frame_count(self.ds)
            check_pixels(self.path, int(self.ds.Columns), int(self.ds.Rows), "frame")
            if self.frames > _limits.max_frames:
                raise ImageReadError(f"{self.path}: {self.frames} frames, over the limit of {_limits.max_frames} "
                                     "(images.max_frames)")
            self._check_transfer_syntax()
        self.window = dicom_window(self.ds)

    def _check_transfer_syntax(self) -> None:
        from pydicom.pixels import get_decoder

        syntax = getattr(getattr(self.ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is None:
            return  # no file meta: pydicom infers the encoding itself
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError:
            raise ImageReadError(f"{self.path}: transfer syntax {syntax.name} ({syntax}) is not supported "
                                 f"(supported: {DICOM_CODECS})") from None
        if not decoder.is_available:
            raise ImageReadError(f"{self.path}: no decoder installed for {syntax.name} ({syntax}); "
                                 "install the DICOM plugins: pip install -r requirements.txt")

    def values(self, k: int) -> np.ndarray:
        """Frame k (1-based) as float32 modality values (H, W): stored values through RescaleSlope/Intercept,
        colour samples averaged to grey (a viewer windows these itself)."""
        import pydicom

        if not 1 <= k <= self.frames:
            raise ImageReadError(f"{self.path}: has {self.frames} frame(s), no frame {k}")
        ds = self.ds
        with decoding(self.path):
            arr = pydicom.pixels.pixel_array(ds, index=k - 1)
            if int(getattr(ds, "SamplesPerPixel", 1) or 1) > 1:
                values = arr[..., :3].mean(axis=-1, dtype=np.float32)  # colour samples (last axis) to grey
            else:
                values = arr.astype(np.float32)
            slope = float(getattr(ds, "RescaleSlope", 1) or 1)
            intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
            if slope != 1:
                values *= slope
            if intercept:
                values += intercept
        return values

    @property
    def inverted(self) -> bool:
        """MONOCHROME1: the lowest value is white."""
        return str(getattr(self.ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1"

    def frame(self, k: int) -> np.ndarray:
        """Frame k (1-based) as uint8 (H, W): the file's own window when it has one, else a robust min-max."""
        values = self.values(k)
        with decoding(self.path):
            out = window_to_uint8(values, self.window)
        if self.inverted:
            np.subtract(255, out, out=out)
        return out


def read_dicom(path: Path, frame: int | None = None) -> list[np.ndarray]:
    """A DICOM file's frames as uint8 (H, W) arrays (only `frame`, 1-based, when given)."""
    dicom = DicomFile(path)
    return [dicom.frame(k) for k in ([frame] if frame is not None else range(1, dicom.frames + 1))]


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
    """One float32 frame (overwritten) to 8 bits: through the window, else a robust (0.5-99.5 percentile)
    min-max of the frame."""
    if window is None:
        window = tuple(float(v) for v in np.percentile(frame, [0.5, 99.5]))
    return _stretch_inplace(frame, *window)


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
    return resize_gray(Image.fromarray(DicomFile(path).frame(frame)), size)


def read_frames(path: str | Path, size: int, frames: list[int] | None = None) -> list[tuple[int | None, np.ndarray]]:
    """Every image in a file as (frame, uint8 (size, size)): (None, image) for an image or a single-frame DICOM,
    (K, frame K) for each frame of a multi-frame DICOM (1-based); `frames`: only those, the file read once.
    Raises ImageReadError."""
    path = Path(path)
    if not is_dicom(path):
        return [(None, load_gray(path, size))]
    dicom = DicomFile(path)
    if dicom.frames == 1 and not frames:
        return [(None, resize_gray(Image.fromarray(dicom.frame(1)), size))]
    return [(k, resize_gray(Image.fromarray(dicom.frame(k)), size)) for k in frames or range(1, dicom.frames + 1)]


def load_frames(path: str | Path, size: int) -> list[tuple[str, np.ndarray]]:
    """Every image in a file as (record name, uint8 (size, size)): one for an image, one per frame of a
    multi-frame DICOM (named path#frame=K). Raises ImageReadError."""
    return [(frame_name(path, k), gray) for k, gray in read_frames(path, size)]
