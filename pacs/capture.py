"""The secondary capture: slices with the heat map and the prediction burned in, marked as an AI result.

Per series (the default): one single-frame RGB Secondary Capture Image (highdicom) of the series' key slices side
by side (at most MAX_TILES, each at most TILE_MAX_SIDE pixels a side), with the series' reading above them. Per
instance (`pacs.results: slice`): one per classified frame. Each is in the source's study, in a series of its own.
The text sits in a black band above the image, never over the anatomy; without a heat map the prediction alone
is burned in.
"""
from __future__ import annotations

import math

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset

from pacs.report import (
    DISCLAIMER,
    MANUFACTURER,
    SC_SERIES_NUMBER,
    ModelInfo,
    SeriesOutput,
    result_uid,
    series_description,
    study_header,
)

MIN_WIDTH = 512  # the text needs room: small slices are scaled up by a whole factor
MAX_SIDE = 1024  # larger slices are scaled down: a 7000x7000 frame made a 148 MB capture
HEAT_ALPHA = 0.4
LINE_HEIGHT = 22
# DICOM patient axes (LPS): the letter toward which +x, +y, +z point, and the opposite one.
AXIS_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))


def jet(values: np.ndarray) -> np.ndarray:
    """The jet colour map (blue -> red) of values in 0..1 as float RGB (..., 3) in 0..1."""
    v = np.clip(values, 0, 1)[..., None]
    return np.clip(1.5 - np.abs(4 * v - np.array([3.0, 2.0, 1.0])), 0, 1)


def bounded(frame: np.ndarray) -> np.ndarray:
    """The 8-bit frame with its longer side at most MAX_SIDE (aspect kept): what a capture shows."""
    height, width = frame.shape[:2]
    if max(height, width) <= MAX_SIDE:
        return frame
    scale = MAX_SIDE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(frame).resize(size, Image.BILINEAR, reducing_gap=2.0))


def render(frame: np.ndarray, heat: np.ndarray | None, lines: list[str]) -> np.ndarray:
    """uint8 RGB (H', W', 3): the 8-bit frame (bounded to MAX_SIDE), the heat map (any size, 0..1) blended in,
    the lines above it."""
    img = Image.fromarray(bounded(frame)).convert("RGB")
    if heat is not None:
        cam = np.asarray(Image.fromarray(np.asarray(heat, dtype=np.float32), "F").resize(img.size, Image.BILINEAR))
        blended = np.asarray(img, dtype=np.float32) * (1 - HEAT_ALPHA) + jet(cam) * 255 * HEAT_ALPHA
        img = Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))
    scale = math.ceil(MIN_WIDTH / img.width)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.BILINEAR)
    band = 10 + LINE_HEIGHT * len(lines)
    canvas = Image.new("RGB", (img.width, img.height + band), "black")
    canvas.paste(img, (0, band))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((8, 6 + LINE_HEIGHT * i), line, fill=(255, 220, 0) if i == 0 else "white", font_size=16)
    return np.asarray(canvas)


def caption(record: dict, model: ModelInfo, with_heat: bool) -> list[str]:
    frame = f", frame {record['frame']}" if record["frame"] else ""
    refer = "  REFER to a radiologist" if record["refer"] else ""
    return [DISCLAIMER.upper(),
            f"{record['predicted_class']} {record['confidence']:.1%}{refer}",
            f"{model.name} v{model.version}{frame}; " + ("Grad-CAM of this class" if with_heat else "no heat map")]


def patient_orientation(ds: Dataset) -> tuple[str, str] | None:
    """The row and column directions as patient-axis letters, from Image Orientation (Patient); None if absent."""
    iop = ds.get("ImageOrientationPatient")
    if iop is None and "SharedFunctionalGroupsSequence" in ds:  # enhanced MR keeps it in a functional group
        plane = ds.SharedFunctionalGroupsSequence[0].get("PlaneOrientationSequence")
        iop = plane[0].get("ImageOrientationPatient") if plane else None
    if iop is None or len(iop) != 6:
        return None
    letters = []
    for vector in (np.asarray(iop[:3], dtype=float), np.asarray(iop[3:], dtype=float)):
        axis = int(np.argmax(np.abs(vector)))
        letters.append(AXIS_LETTERS[axis][0 if vector[axis] > 0 else 1])
    return letters[0], letters[1]


def source_reference(record: dict) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = record["sop_class_uid"]
    item.ReferencedSOPInstanceUID = record["sop_instance_uid"]
    if record["frame"]:
        item.ReferencedFrameNumber = record["frame"]
    return item


def make_capture(ds: Dataset, record: dict, frame: np.ndarray, heat: np.ndarray | None, model: ModelInfo) -> Dataset:
    """The Secondary Capture of one classified frame (`record` with its `refer` flag; `frame` the 8-bit slice)."""
    orientation = patient_orientation(ds)
    sc = hd.sc.SCImage.from_ref_dataset(
        study_header(ds), render(frame, heat, caption(record, model, heat is not None)), "RGB", 8, "PATIENT",
        series_instance_uid=result_uid(ds.StudyInstanceUID, ds.SeriesInstanceUID, model.name, model.version, "SC"),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=result_uid(ds.SOPInstanceUID, record["frame"], model.name, model.version, "SC"),
        instance_number=record["frame"] or int(ds.get("InstanceNumber", 1) or 1), manufacturer=MANUFACTURER,
        patient_orientation=orientation or ("L", "P"))
    if orientation is None:
        sc.PatientOrientation = None  # unknown: left empty (type 2C) rather than guessed
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = DISCLAIMER
    sc.SeriesDescription = series_description("SC", model)
    sc.DerivationDescription = f"{model.name} v{model.version} prediction" + (" and Grad-CAM" if heat is not None
                                                                              else "") + " burned in"
    sc.SourceImageSequence = [source_reference(record)]
    return sc


# ---- one capture per series: the key slices side by side ----

MAX_TILES = 4          # key slices shown in a series' capture, strongest first: the capture stays bounded
TILE_MAX_SIDE = 512    # each key slice at most this many pixels a side


def tile(frame: np.ndarray, heat: np.ndarray | None) -> Image.Image:
    """One key slice (8-bit) with its heat map, at most TILE_MAX_SIDE a side."""
    img = Image.fromarray(render(frame, heat, []))
    scale = TILE_MAX_SIDE / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    return img


def series_caption(result: dict, model: ModelInfo, labels: list[str], with_heat: bool) -> list[str]:
    refer = "  REFER to a radiologist" if result["refer"] else ""
    return [DISCLAIMER.upper(),
            f"Series: {result['predicted_class']} {result['confidence']:.1%}{refer}",
            f"{model.name} v{model.version}; key slices: {', '.join(labels)}"
            + ("; Grad-CAM of this class" if with_heat else "")]


def montage(frames: list[np.ndarray], heats: list[np.ndarray | None], lines: list[str]) -> np.ndarray:
    """uint8 RGB: the tiles side by side under a caption band (at most MAX_TILES tiles of TILE_MAX_SIDE)."""
    tiles = [tile(f, h) for f, h in zip(frames[:MAX_TILES], heats[:MAX_TILES])]
    width = max(MIN_WIDTH, sum(t.width for t in tiles))
    band = 10 + LINE_HEIGHT * len(lines)
    canvas = Image.new("RGB", (width, band + max(t.height for t in tiles)), "black")
    x = 0
    for t in tiles:
        canvas.paste(t, (x, band))
        x += t.width
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((8, 6 + LINE_HEIGHT * i), line, fill=(255, 220, 0) if i == 0 else "white", font_size=16)
    return np.asarray(canvas)


def make_series_capture(header: Dataset, key_records: list[dict], frames: list[np.ndarray],
                        heats: list[np.ndarray | None] | None, result: dict, model: ModelInfo,
                        output: SeriesOutput) -> Dataset:
    """One Secondary Capture of a series: its key slices (strongest first, at most MAX_TILES) with their heat maps
    and the series' reading burned in; `frames`: the key slices as 8-bit frames at their own size."""
    heats = heats or [None] * len(frames)
    labels = [f"#{r['slice_index'] + 1}" + (f" (frame {r['frame']})" if r["frame"] else "")
              for r in key_records[:MAX_TILES]]
    pixels = montage(frames, heats, series_caption(result, model, labels, any(h is not None for h in heats)))
    orientation = patient_orientation(header)
    sc = hd.sc.SCImage.from_ref_dataset(
        study_header(header), pixels, "RGB", 8, "PATIENT", series_instance_uid=output.uid("SC", "series"),
        series_number=SC_SERIES_NUMBER, sop_instance_uid=output.uid("SC"), instance_number=output.revision + 1,
        manufacturer=MANUFACTURER, patient_orientation=orientation or ("L", "P"))
    if orientation is None:
        sc.PatientOrientation = None
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = DISCLAIMER
    sc.SeriesDescription = series_description("SC", model)
    sc.DerivationDescription = f"{model.name} v{model.version} series reading and key slices burned in"
    sc.SourceImageSequence = [source_reference(r) for r in key_records[:MAX_TILES]]
    return sc
