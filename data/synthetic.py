"""Synthetic brain MRI phantoms for trying the toolkit without the real data set.

THIS IS SYNTHETIC DATA, NOT MEDICAL DATA. The images are drawn from simple geometric
shapes and noise so that the whole pipeline (scan, split, train, evaluate, export) can be
run end to end on any machine, offline, in seconds. Numbers obtained on it say nothing
about performance on real MRI and must never be reported as such.

The tree mirrors the Mendeley "Brain Cancer - MRI dataset" layout:
``<root>/Brain_Cancer raw MRI data/Brain_Cancer/{brain_glioma,brain_menin,brain_tumor}/*.jpg``
Each axial slice has a head, a skull ring, textured parenchyma and ventricles, with random
pose, contrast, bias field and Rician noise, plus one class-specific lesion:
glioma (irregular intra-axial mass, necrotic core, edema), meningioma (round homogeneous
extra-axial mass on the skull or the falx), pituitary (small round midline sellar lesion).
One image in ten is a hard case with a small, low-contrast lesion.

The DICOM variant (`generate_dicom_dataset`, `--demo dicom`) writes MR series instead: per class folder, one
folder per series of 16-32 slices (12-bit MR Image Storage files, positions along the slice normal, one study per
series). The class's lesion lies in a run of 30-60% of the slices; the slices before and after it have none, as in
a real series, and still carry the series' class. Slices are independent draws of the phantom (the series share
their class, their lesion run and their hardness), so a figure on them says how the series rule reads a run of
lesion slices among empty ones, nothing about anatomy across slices.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from core.fileio import atomic_file, sync_all, write_text_atomic

CLASS_FOLDERS = ("brain_glioma", "brain_menin", "brain_tumor")
DEMO_SUBDIR = Path("Brain_Cancer raw MRI data") / "Brain_Cancer"
FILE_PREFIXES = {"brain_glioma": "glioma", "brain_menin": "meningioma", "brain_tumor": "pituitary"}
# One image in ten is a hard case (a small, low-contrast lesion): enough that accuracy is not trivially
# perfect, few enough that the quick start's model passes the quality gates on the demo test split.
HARD_FRACTION = 0.10
# Lesion contrast gain and radius range (of the brain's half-width) per class: hard cases, easy ones.
HARD_GAIN = (0.45, 0.65)
EASY_GAIN = (0.8, 1.0)
LESION_RADIUS = {  # class folder: (hard range, easy range)
    "brain_glioma": ((0.085, 0.13), (0.17, 0.28)),
    "brain_menin": ((0.07, 0.11), (0.15, 0.25)),
    "brain_tumor": ((0.055, 0.07), (0.08, 0.12)),
}
JPEG_QUALITY = 90
MARKER_NAME = ".complete"
# Bump when the drawing changes so that old trees are regenerated instead of silently reused.
GENERATOR_VERSION = 2  # 2: one hard case in ten (was 22%), clearer hard lesions, no falx mass at the sella


def _smooth_noise(rng: np.random.Generator, u: np.ndarray, v: np.ndarray,
                  n: int, fmin: float, fmax: float) -> np.ndarray:
    """Sum of random plane waves: a cheap band-limited field in roughly [-1, 1]."""
    angles = rng.uniform(0, np.pi, n)
    freqs = rng.uniform(fmin, fmax, n) * np.pi
    phases = rng.uniform(0, 2 * np.pi, n)
    field = np.zeros_like(u)
    for a, f, p in zip(angles, freqs, phases):
        field += np.cos(f * (np.cos(a) * u + np.sin(a) * v) + p)
    return field * np.sqrt(2.0 / n)


def _soft(signed_dist: np.ndarray, px: float) -> np.ndarray:
    """Anti-aliased inside mask from a signed distance (negative inside)."""
    return np.clip(0.5 - signed_dist / px, 0.0, 1.0)


def _ellipse_dist(u, v, cx, cy, a, b):
    """Approximate signed distance to an axis-aligned ellipse (exact for circles)."""
    return (np.hypot((u - cx) / a, (v - cy) / b) - 1.0) * min(a, b)


def _blob_dist(rng, u, v, cx, cy, r0, roughness):
    """Signed distance to a lobulated blob whose radius is perturbed by a few harmonics."""
    du, dv = u - cx, v - cy
    theta = np.arctan2(dv, du)
    radius = np.ones_like(u)
    for k in range(2, 6):
        radius += roughness * rng.uniform(0.3, 1.0) / k * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(du, dv) - r0 * radius


def _paint(img, mask, value):
    """Blend a constant (or field) into the image under a soft mask."""
    return img * (1.0 - mask) + value * mask


def _lesion(cls, rng, u, v, px, brain_a, brain_b, hard):
    """Return (intensity offset field, lesion mask) for the class-specific lesion."""
    # Contrast and size shrink for hard cases so that accuracy is not trivially perfect.
    if cls not in LESION_RADIUS:
        raise ValueError(f"unknown class {cls!r}; expected one of {CLASS_FOLDERS}")
    gain = rng.uniform(*(HARD_GAIN if hard else EASY_GAIN))
    r0 = rng.uniform(*LESION_RADIUS[cls][0 if hard else 1])
    if cls == "brain_glioma":
        ang, rad = rng.uniform(0, 2 * np.pi), rng.uniform(0.15, 0.6)
        cx, cy = rad * brain_a * np.cos(ang), rad * brain_b * np.sin(ang)
        d = _blob_dist(rng, u, v, cx, cy, r0, roughness=0.6)
        mass, edema = _soft(d, px), _soft(d - r0 * rng.uniform(0.4, 0.8), 6 * px)
        core = _soft(d + r0 * rng.uniform(0.35, 0.55), 2 * px)
        # Enhancing rim bright, necrotic core dark, edema a faint halo around the mass.
        offset = gain * (0.12 * edema + 0.3 * mass - 0.7 * core)
        return offset, mass
    if cls == "brain_menin":
        if rng.random() < 0.3:  # falx meningioma: on the midline, in front of the sella (no pituitary look-alike)
            cx, cy = 0.0, rng.uniform(-0.6, 0.1) * brain_b
            cx += rng.choice([-1, 1]) * r0 * 0.7
        else:  # convexity meningioma: centre just inside the inner table of the skull
            ang = rng.uniform(0, 2 * np.pi)
            cx = (brain_a - 0.6 * r0) * np.cos(ang)
            cy = (brain_b - 0.6 * r0) * np.sin(ang)
        mass = _soft(_ellipse_dist(u, v, cx, cy, r0, r0 * rng.uniform(0.85, 1.0)), px)
        return gain * 0.45 * mass, mass
    cx, cy = rng.normal(0, 0.015), rng.uniform(0.3, 0.42) * brain_b  # brain_tumor: pituitary, in the sella
    mass = _soft(_ellipse_dist(u, v, cx, cy, r0 * 1.15, r0), px)
    return gain * 0.4 * mass, mass


def _render(cls: str, rng: np.random.Generator, size: int, hard: bool, lesion: bool = True):
    """Draw one slice as floats in [0, 1] plus its lesion mask; lesion=False leaves it out."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    x, y = (2 * xs + 1) / size - 1, (2 * ys + 1) / size - 1
    # Random pose: shapes are drawn in head coordinates (u, v) and the grid is moved instead.
    theta = rng.uniform(-0.3, 0.3)
    tx, ty = rng.uniform(-0.08, 0.08, 2)
    scale = rng.uniform(0.85, 1.02)
    c, s = np.cos(theta), np.sin(theta)
    u = (c * (x - tx) + s * (y - ty)) / scale
    v = (-s * (x - tx) + c * (y - ty)) / scale
    px = 2.0 / size / scale

    head_a, head_b = rng.uniform(0.7, 0.78), rng.uniform(0.86, 0.94)
    scalp, bone = rng.uniform(0.04, 0.07), rng.uniform(0.04, 0.07)
    brain_a, brain_b = head_a - scalp - bone - 0.02, head_b - scalp - bone - 0.02
    t2 = rng.random() < 0.4  # T2-like: fluid bright; otherwise T1-like: fluid dark
    csf = rng.uniform(0.75, 0.9) if t2 else rng.uniform(0.08, 0.18)
    gray, white = rng.uniform(0.45, 0.55), rng.uniform(0.3, 0.38) if t2 else rng.uniform(0.6, 0.7)

    img = np.zeros((size, size))
    img = _paint(img, _soft(_ellipse_dist(u, v, 0, 0, head_a, head_b), px), rng.uniform(0.55, 0.75))
    skull_rim = rng.uniform(0.8, 0.95) if rng.random() < 0.4 else rng.uniform(0.03, 0.1)
    img = _paint(img, _soft(_ellipse_dist(u, v, 0, 0, head_a - scalp, head_b - scalp), px), skull_rim)
    img = _paint(img, _soft(_ellipse_dist(u, v, 0, 0, brain_a + 0.02, brain_b + 0.02), px), csf)

    # Cortex is a folded ribbon under the surface; white matter fills the rest.
    rho = np.hypot(u / brain_a, v / brain_b)
    folds = _smooth_noise(rng, u, v, 10, 6, 12)
    wm = _soft(rho - 0.8 - 0.07 * folds, 0.04)
    tissue = gray * (1 - wm) + white * wm + 0.03 * _smooth_noise(rng, u, v, 12, 10, 20)
    # Sulci: thin CSF clefts along a level set of a second field, only in the outer cortex.
    sulci = _soft(np.abs(_smooth_noise(rng, u, v, 8, 5, 10)) - 0.06, 0.06) * _soft(0.8 - rho, 0.05)
    tissue = _paint(tissue, 0.7 * sulci, csf)
    brain = _soft(_ellipse_dist(u, v, 0, 0, brain_a, brain_b), px)
    img = _paint(img, brain, tissue)
    # Interhemispheric fissure: a thin CSF line on the midline, interrupted by the ventricles.
    img = _paint(img, brain * _soft(np.abs(u) - 0.006, px) * (np.abs(v) > 0.3 * brain_b), csf)

    # Lateral ventricles: two crescents (ellipse minus offset ellipse) either side of midline.
    va, vb, vgap = rng.uniform(0.06, 0.1), rng.uniform(0.2, 0.28), rng.uniform(0.04, 0.07)
    for side in (-1, 1):
        outer = _soft(_ellipse_dist(u, v, side * (vgap + va), -0.05, va, vb), px)
        inner = _soft(_ellipse_dist(u, v, side * (vgap + 1.6 * va), -0.05, va, vb * 0.8), px)
        img = _paint(img, outer * (1 - inner), csf)

    offset, mask = _lesion(cls, rng, u, v, px, brain_a, brain_b, hard)
    if lesion:
        img = img + offset * brain

    # Smooth multiplicative bias field, as from coil sensitivity.
    img = img * (1.0 + rng.uniform(0.1, 0.3) * _smooth_noise(rng, u, v, 3, 0.3, 1.0))
    # Rician noise: the magnitude of a complex signal with Gaussian noise in both channels.
    sigma = rng.uniform(0.015, 0.05)
    noise = rng.normal(0, sigma, (2, size, size))
    img = np.hypot(img + noise[0], noise[1])
    img = np.clip(img * rng.uniform(0.85, 1.1), 0, 1) ** rng.uniform(0.8, 1.25)
    return img, mask * brain


def render_slice(cls: str, rng: np.random.Generator, size: int = 128, hard: bool = False) -> np.ndarray:
    """Render one synthetic axial slice of class folder ``cls`` as a uint8 (size, size) array."""
    img, _ = _render(cls, rng, size, hard)
    return np.round(img * 255).astype(np.uint8)


def _marker_args(n_per_class: int, size: int, seed: int, fmt: str = "jpeg") -> dict:
    args = {"n_per_class": n_per_class, "size": size, "seed": seed, "version": GENERATOR_VERSION}
    return args if fmt == "jpeg" else {**args, "format": fmt, "dicom_version": DICOM_VERSION}


def _is_complete(root: Path, args: dict) -> bool:
    try:
        return json.loads((root / MARKER_NAME).read_text()) == args
    except (OSError, ValueError):
        return False


def generate_dataset(root: str | Path, n_per_class: int = 60, size: int = 128, seed: int = 0) -> Path:
    """Write the synthetic tree under ``root`` and return the class root (root / DEMO_SUBDIR).

    Same arguments give byte-identical files. The marker ``root/.complete`` is written last,
    so an interrupted run is regenerated rather than mistaken for a complete one.
    """
    root = Path(root)
    class_root = root / DEMO_SUBDIR
    args = _marker_args(n_per_class, size, seed)
    if _is_complete(root, args):
        return class_root
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER_NAME).unlink(missing_ok=True)
    for class_index, folder in enumerate(CLASS_FOLDERS):
        out_dir = class_root / folder
        out_dir.mkdir(parents=True, exist_ok=True)
        prefix = FILE_PREFIXES[folder]
        wanted = set()
        for i in range(n_per_class):
            # One generator per image: output does not depend on order or on n_per_class.
            rng = np.random.default_rng([seed, class_index, i])
            hard = bool(rng.random() < HARD_FRACTION)
            pixels = render_slice(folder, rng, size, hard)
            name = f"{prefix}_{i + 1:04d}.jpg"
            wanted.add(name)
            with atomic_file(out_dir / name, sync=False) as fh:  # one sync for all, before the marker
                Image.fromarray(pixels, mode="L").save(fh, format="JPEG", quality=JPEG_QUALITY)
        # Drop images left by an earlier, larger generation so counts match the arguments.
        for stale in out_dir.glob(f"{prefix}_*.jpg"):
            if stale.name not in wanted:
                stale.unlink()
    sync_all()
    write_text_atomic(root / MARKER_NAME, json.dumps(args, sort_keys=True))
    return class_root


def ensure_demo_dataset(root: str | Path, n_per_class: int = 60, size: int = 128, seed: int = 0,
                        fmt: str = "jpeg") -> Path:
    """Return the class root of the demo data set (fmt "dicom": its series variant, n_per_class series per class),
    generating it first if it is not complete."""
    root = Path(root)
    if _is_complete(root, _marker_args(n_per_class, size, seed, fmt)):
        return root / DEMO_SUBDIR
    if fmt == "dicom":
        print(f"Generating synthetic DICOM demo data set in {root} ({n_per_class * len(CLASS_FOLDERS)} series of "
              f"{SERIES_SLICES[0]}-{SERIES_SLICES[1]} slices)...")
        return generate_dicom_dataset(root, n_per_class, size, seed)
    print(f"Generating synthetic demo data set in {root} ({n_per_class * len(CLASS_FOLDERS)} images)...")
    return generate_dataset(root, n_per_class, size, seed)


# ---- the DICOM variant: MR series ----

DICOM_VERSION = 1
SERIES_SLICES = (16, 32)          # slices per series, inclusive
LESION_RUN = (0.3, 0.6)           # share of a series' slices that show the lesion, one contiguous run
SLICE_MM, FIELD_OF_VIEW_MM = 5.0, 240.0
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
DEMO_MANUFACTURER = "Brain Cancer MRI toolkit (synthetic phantom)"


@dataclass(frozen=True)
class PhantomSeries:
    """One series' plan: how many slices, which of them show the lesion, whether the lesion is a hard one."""
    n_slices: int
    lesion: range
    hard: bool


def plan_series(rng: np.random.Generator) -> PhantomSeries:
    n = int(rng.integers(SERIES_SLICES[0], SERIES_SLICES[1] + 1))
    run = max(1, round(n * rng.uniform(*LESION_RUN)))
    start = int(rng.integers(1, n - run))  # at least one slice without the lesion on each side
    return PhantomSeries(n, range(start, start + run), bool(rng.random() < HARD_FRACTION))


def _uid(*parts) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=["brain-cancer-mri demo", *map(str, parts)])  # the same on every run


def phantom_slice_dataset(pixels: np.ndarray, series: dict, k: int, lesion: bool):
    """One 12-bit MR slice (k: 0-based, along the normal) of the series described by `series` (its UIDs, ids)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    size = pixels.shape[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = _uid(series["SeriesInstanceUID"], k)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE_STORAGE, ds.file_meta.MediaStorageSOPInstanceUID
    for key, value in series.items():
        setattr(ds, key, value)
    ds.Modality, ds.ImageType, ds.Manufacturer = "MR", ["ORIGINAL", "PRIMARY", "AXIAL"], DEMO_MANUFACTURER
    ds.InstanceNumber = k + 1
    spacing = FIELD_OF_VIEW_MM / size
    ds.ImagePositionPatient = [-FIELD_OF_VIEW_MM / 2, -FIELD_OF_VIEW_MM / 2, k * SLICE_MM]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [spacing, spacing], SLICE_MM
    ds.ImageComments = f"synthetic phantom, {'lesion' if lesion else 'no lesion'}"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    return ds


def write_phantom_series(out_dir: Path, folder: str, rng: np.random.Generator, ids: tuple, size: int) -> None:
    """The slices of one phantom series as out_dir/slice_KKK.dcm."""
    plan = plan_series(rng)
    series_uid = _uid(*ids, "series")
    series = {"StudyInstanceUID": _uid(*ids, "study"), "SeriesInstanceUID": series_uid,
              "FrameOfReferenceUID": _uid(*ids, "frame of reference"), "SeriesNumber": 1,
              "SeriesDescription": "AX T1 phantom", "PatientID": f"PHANTOM-{'-'.join(map(str, ids))}",
              "PatientName": "Phantom^Synthetic", "StudyID": "1", "AccessionNumber": ""}
    out_dir.mkdir(parents=True, exist_ok=True)
    for k in range(plan.n_slices):
        img, _ = _render(folder, np.random.default_rng([*ids[1:], k]), size, plan.hard, lesion=k in plan.lesion)
        ds = phantom_slice_dataset(np.round(img * 4095), series, k, k in plan.lesion)
        with atomic_file(out_dir / f"slice_{k + 1:03d}.dcm", sync=False) as fh:
            ds.save_as(fh, enforce_file_format=True)


def generate_dicom_dataset(root: str | Path, n_per_class: int = 40, size: int = 64, seed: int = 0) -> Path:
    """Write `n_per_class` phantom MR series per class folder under ``root`` (class root returned), each in its own
    folder {prefix}_series_NNNN/. Same arguments give byte-identical files; the marker is written last."""
    root = Path(root)
    class_root = root / DEMO_SUBDIR
    args = _marker_args(n_per_class, size, seed, "dicom")
    if _is_complete(root, args):
        return class_root
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER_NAME).unlink(missing_ok=True)
    for class_index, folder in enumerate(CLASS_FOLDERS):
        wanted = set()
        for i in range(n_per_class):
            name = f"{FILE_PREFIXES[folder]}_series_{i + 1:04d}"
            wanted.add(name)
            target = class_root / folder / name
            if target.exists():
                shutil.rmtree(target)  # a series is written whole: no slice of an earlier plan stays
            ids = ("dicom", seed, class_index, i)
            write_phantom_series(target, folder, np.random.default_rng([seed, class_index, i, 1]), ids, size)
        for stale in (class_root / folder).iterdir():
            if stale.name not in wanted:
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    sync_all()
    write_text_atomic(root / MARKER_NAME, json.dumps(args, sort_keys=True))
    return class_root
