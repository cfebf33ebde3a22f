"""The series viewer's data: the slices of the series a case belongs to, in order, the series' reading, and each
slice's pixels as modality values that the browser windows itself (window/level on the stored values, not on an
8-bit picture of them).

A series is the DICOM series (StudyInstanceUID + SeriesInstanceUID) of the case's images; images without one
(JPEG, PNG, ...) form a series with the other files of the upload they came in; a case with neither is a series
of its own.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import Engine, and_, select

from data.images import DicomFile, dicom_window, is_dicom, open_image
from review.render import MAX_SIDE, display_size
from review.schema import cases, items
from review.worklist import Reading, items_where
from serving.audit import predictions

KEY_FRACTION = 0.25  # the key slices: the top quarter of a series' slices for its class (at least one)


def series_where(engine: Engine, case_id: str):
    """The condition that selects the worklist items of the series the case belongs to (None: no such case)."""
    with engine.connect() as conn:
        case = conn.execute(select(cases.c.batch).where(cases.c.id == case_id)).first()
        if case is None:
            return None
        uids = conn.execute(select(predictions.c.study_uid, predictions.c.series_uid).distinct()
                            .join(items, items.c.prediction_id == predictions.c.id)
                            .where(items.c.case_id == case_id)).all()
    if len(uids) == 1 and uids[0].series_uid:
        study, series = uids[0]
        return and_(predictions.c.series_uid == series,
                    predictions.c.study_uid.is_(None) if study is None else predictions.c.study_uid == study)
    if case.batch:  # the upload's files that no DICOM series claims
        return and_(cases.c.batch == case.batch, predictions.c.series_uid.is_(None))
    return items.c.case_id == case_id


def _natural(text: str) -> list:
    """IMG2 before IMG10: digits compared as numbers."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text or "")]


def _dicom_position(path: Path) -> tuple[float, float]:
    """(position along the slice normal, InstanceNumber) from the header; inf where the file does not say."""
    import pydicom

    ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    number = float(getattr(ds, "InstanceNumber", None) or math.inf)
    orientation, position = getattr(ds, "ImageOrientationPatient", None), getattr(ds, "ImagePositionPatient", None)
    if orientation is None or position is None or len(orientation) != 6 or len(position) != 3:
        return math.inf, number
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    return float(np.dot(np.cross(row, col), np.asarray(position, float))), number


def slice_order(entries: list[dict], path_of) -> list[dict]:
    """DICOM images by their position along the slice normal (else InstanceNumber), then frame; other images by
    their file name, naturally (IMG2 before IMG10)."""
    positions: dict[str, tuple[float, float]] = {}

    def key(e: dict):
        ref = e["file_ref"]
        if ref.endswith(".dcm"):
            if ref not in positions:
                try:
                    positions[ref] = _dicom_position(path_of(ref))
                except Exception:  # an unreadable header: placed last, still shown
                    positions[ref] = (math.inf, math.inf)
            return (0, *positions[ref], e["frame"] or 1, [])
        return (1, 0.0, 0.0, e["frame"] or 1, _natural(e["filename"]))

    return sorted(entries, key=key)


@dataclass
class SeriesReading:
    """The series' class and probabilities (per class, the mean of its top-k slices), its key slices (the top k
    for that class) and whether it is referred (a key slice is)."""
    predicted_class: str
    probabilities: dict[str, float]
    key: list[int]                      # indices into the ordered slices
    refer: bool
    reasons: list[str] = field(default_factory=list)


def series_reading(slices: list[dict]) -> SeriesReading:
    names = list(slices[0]["probabilities"])
    p = np.asarray([[s["probabilities"][n] for n in names] for s in slices], dtype=np.float64)
    k = max(1, math.ceil(KEY_FRACTION * len(slices)))
    top = -np.sort(-p, axis=0)[:k].mean(axis=0)
    best = int(np.argmax(top))
    key = sorted(int(i) for i in np.argsort(-p[:, best], kind="stable")[:k])
    reasons = [f"key slice {i + 1}: {r}" for i in key for r in slices[i]["reasons"]]
    return SeriesReading(names[best], {n: float(v) for n, v in zip(names, top / top.sum())}, key, bool(reasons),
                         reasons)


def viewer_data(engine: Engine, case_id: str, path_of) -> dict | None:
    """What the viewer loads: the ordered slices (their reading, pictures and status) and the series' reading."""
    where = series_where(engine, case_id)
    if where is None:
        return None
    entries = slice_order(items_where(engine, where), path_of)
    if not entries:
        return None
    reading = series_reading(entries)
    slices = [{"index": i, "prediction_id": e["prediction_id"], "case_id": e["case_id"], "frame": e["frame"],
               "filename": e["filename"], "predicted_class": e["predicted_class"], "confidence": e["confidence"],
               "probabilities": e["probabilities"], "refer": bool(e["refer"]), "reasons": e["reasons"],
               "status": e["status"], "key": i in reading.key,
               "pixels": f"/review/case/{e['case_id']}/pixels" + (f"?frame={e['frame']}" if e["frame"] else ""),
               "heatmap": f"/review/heatmap/{e['prediction_id']}.png"} for i, e in enumerate(entries)]
    return {"case_id": case_id, "slices": slices,
            "series": {"predicted_class": reading.predicted_class, "probabilities": reading.probabilities,
                       "key": reading.key, "refer": reading.refer, "reasons": reading.reasons, "n": len(slices)}}


@dataclass
class Pixels:
    """One slice for the viewer: modality values (float32, row-major, at the displayed size), the window the
    file asks for, and whether low values are white."""
    values: np.ndarray
    window: tuple[float, float]
    inverted: bool

    def headers(self) -> dict[str, str]:
        h, w = self.values.shape
        low, high = float(self.values.min()), float(self.values.max())
        return {"X-Width": str(w), "X-Height": str(h), "X-Window": f"{self.window[0]:g} {self.window[1]:g}",
                "X-Range": f"{low:g} {high:g}", "X-Inverted": "1" if self.inverted else "0"}


def slice_pixels(path: Path, frame: int | None) -> Pixels:
    """The slice's values as the file stores them (a DICOM through its rescale; an image's grey levels), scaled
    down above MAX_SIDE like the slice picture."""
    if is_dicom(path):
        dicom = DicomFile(path)
        values = dicom.values(frame or 1)
        window = dicom_window(dicom.ds) or tuple(float(v) for v in np.percentile(values, [0.5, 99.5]))
        inverted = dicom.inverted
    else:
        values, window, inverted = np.asarray(open_image(path), dtype=np.float32), (0.0, 255.0), False
    if max(values.shape) > MAX_SIDE:
        size = display_size(values.shape[1], values.shape[0])
        values = np.asarray(Image.fromarray(values, "F").resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    return Pixels(np.ascontiguousarray(values, dtype="<f4"), window, inverted)


def series_judged(engine: Engine, case_id: str, path_of) -> Reading | None:
    """The series reading a series verdict judges (None: no such case)."""
    data = viewer_data(engine, case_id, path_of)
    if data is None:
        return None
    series = data["series"]
    return Reading(series["predicted_class"], tuple(series["probabilities"]), series["refer"],
                   tuple(s["prediction_id"] for s in data["slices"]))
