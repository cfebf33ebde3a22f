"""The series viewer's data: the slices of the series a case belongs to, in order, the series' reading, and each
slice's pixels as modality values that the browser windows itself (window/level on the stored values, not on an
8-bit picture of them).

A series is the DICOM series (StudyInstanceUID + SeriesInstanceUID) of the case's images; images without one
(JPEG, PNG, ...) form a series with the other files of the upload they came in; a case with neither is a series
of its own.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import Engine, and_, select

from data.images import DicomFile, ImageReadError, dicom_window, is_dicom, open_image
from review.render import MAX_SIDE, display_size
from review.schema import cases, items
from review.urls import PREFIX
from review.worklist import Reading, items_where
from series.rule import SeriesResult, SeriesRule, SliceCheck, read_series
from series.slices import SliceRef, order_slices, read_slices
from serving.audit import predictions


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


def slice_order(entries: list[dict], path_of) -> list[dict]:
    """DICOM slices in the series' reading order (series.slices: position along the slice normal, else
    InstanceNumber), then the other images by file name, naturally (IMG2 before IMG10)."""
    refs: dict[tuple[str, int], SliceRef] = {}
    for ref in {e["file_ref"] for e in entries if e["file_ref"] and e["sop_instance_uid"]}:
        try:
            refs.update({(ref, s.frame or 1): s for s in read_slices(path_of(ref), ref)})
        except (ImageReadError, OSError):  # an unreadable header: placed after the ordered slices, still shown
            pass
    entry_of = {refs[k]: e for e in entries if (k := (e["file_ref"], e["frame"] or 1)) in refs}
    rest = [e for e in entries if (e["file_ref"], e["frame"] or 1) not in refs]
    return [entry_of[s] for s in order_slices(list(entry_of))[0]] + \
        sorted(rest, key=lambda e: (_natural(e["filename"]), e["frame"] or 1))


def series_reading(slices: list[dict], rule: SeriesRule) -> SeriesResult:
    """The series rule (series.rule) on the ordered slices' probabilities and their own refer flags."""
    names = list(slices[0]["probabilities"])
    probs = np.asarray([[s["probabilities"][n] for n in names] for s in slices], dtype=np.float64)
    checks = [SliceCheck(bool(s["refer"]), tuple(s["reasons"])) for s in slices]
    return read_series(probs, names, rule, checks)


def viewer_data(engine: Engine, case_id: str, path_of, rule: SeriesRule) -> dict | None:
    """What the viewer loads: the ordered slices (their reading, pictures and status) and the series' reading."""
    where = series_where(engine, case_id)
    if where is None:
        return None
    entries = slice_order(items_where(engine, where), path_of)
    if not entries:
        return None
    reading = series_reading(entries, rule)
    slices = [{"index": i, "prediction_id": e["prediction_id"], "case_id": e["case_id"], "frame": e["frame"],
               "filename": e["filename"], "predicted_class": e["predicted_class"], "confidence": e["confidence"],
               "probabilities": e["probabilities"], "refer": bool(e["refer"]), "reasons": e["reasons"],
               "status": e["status"], "key": i in reading.key_slices,
               "pixels": f"{PREFIX}/case/{e['case_id']}/pixels" + (f"?frame={e['frame']}" if e["frame"] else ""),
               "heatmap": f"{PREFIX}/heatmap/{e['prediction_id']}.png"} for i, e in enumerate(entries)]
    return {"case_id": case_id, "slices": slices,
            "series": {**reading.as_dict(), "n": len(slices)}}


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


def series_judged(engine: Engine, case_id: str, path_of, rule: SeriesRule) -> Reading | None:
    """The series reading a series verdict judges (None: no such case)."""
    data = viewer_data(engine, case_id, path_of, rule)
    if data is None:
        return None
    series = data["series"]
    return Reading(series["predicted_class"], tuple(series["probabilities"]), series["refer"],
                   tuple(s["prediction_id"] for s in data["slices"]))
