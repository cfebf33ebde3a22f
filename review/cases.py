"""Cases: the files kept for review, and the worklist rows of their predictions.

A case is one file (an upload on the page, an instance from the DICOM receiver) under a random id; each of its
images (a frame of a multi-frame DICOM) is a prediction with its own worklist item and verdicts. The file is
kept owner-only in `review.store_dir` as `<case id><suffix>`: the upload's own name is never part of a path.
"""
from __future__ import annotations

import io
import json
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread
from sqlalchemy import Engine, insert

from core.fileio import atomic_file, private_dir
from data.dicom_records import strip_identity
from data.images import IMAGE_FORMATS
from deploy.refer import Assessment
from review.schema import cases, items
from serving.audit import predictions

SUFFIXES = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "BMP": ".bmp", "TIFF": ".tif"}
REF = re.compile(r"^[0-9a-f]{32}\.(dcm|jpg|png|bmp|tif|img)$")
PREDICTION_ID = re.compile(r"^[0-9a-f]{32}$")


def new_case_id() -> str:
    return uuid.uuid4().hex


def file_suffix(data: bytes, dicom: bool) -> str:
    """The suffix the toolkit's loader and data set scanner read the file by (from its content, not its name)."""
    if dicom:
        return ".dcm"
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
            return SUFFIXES.get(img.format, ".img")
    except Exception:  # the decoder proper said what is wrong; kept as it came
        return ".img"


def without_identity(data: bytes) -> bytes:
    """A DICOM file's bytes with person names and birth dates emptied (data.dicom_records.strip_identity), as kept
    for review and export."""
    buf = io.BytesIO()
    strip_identity(dcmread(io.BytesIO(data))).save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class CaseFiles:
    """<store_dir>/<case id><suffix> (owner-only), and the heat maps drawn for its predictions."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def keep(self, case_id: str, data: bytes, dicom: bool) -> str:
        ref = f"{case_id}{file_suffix(data, dicom)}"
        with atomic_file(private_dir(self.root) / ref, private=True) as fh:
            fh.write(data)
        return ref

    def path(self, ref: str) -> Path:
        if not REF.match(ref or ""):
            raise ValueError(f"not a kept file: {ref!r}")
        return self.root / ref

    def heat_path(self, prediction_id: str) -> Path:
        if not PREDICTION_ID.match(prediction_id):
            raise ValueError(f"not a prediction id: {prediction_id!r}")
        return self.root / "heatmaps" / f"{prediction_id}.png"


@dataclass
class CaseOrigin:
    """Where a case comes from: the door (review, dicom), who sent it (a reviewer, an AE title), the file's own
    name (shown escaped, never a path) and the served model's identity (model, version, alias, flavor)."""
    source: str
    client: str | None
    filename: str
    model: dict
    batch: str | None = None  # the upload it came in: its files without a DICOM series form one series


def case_row(case_id: str, origin: CaseOrigin, ref: str | None, frames: int, study_uid: str | None,
             now: datetime) -> dict:
    return {"id": case_id, "created_at": now, "source": origin.source, "client": origin.client,
            "filename": origin.filename, "file_ref": ref, "frames": frames, "study_uid": study_uid,
            "batch": origin.batch}


def item_rows(case_id: str, records: list[dict], judged: list[Assessment], version: str, now: datetime) -> list[dict]:
    return [{"prediction_id": r["record_id"], "case_id": case_id, "frame": r.get("frame"), "created_at": now,
             "predicted_class": r["predicted_class"], "probabilities_json": json.dumps(a.probabilities),
             "temperature": a.temperature, "confidence": a.confidence, "refer": a.refer,
             "reasons_json": json.dumps(a.explained()),
             "drift_distance": a.distance, "drift_limit": a.limit, "model_version": str(version)}
            for r, a in zip(records, judged)]


def write_case(engine: Engine, case: dict, rows: list[dict], audited: list[dict] = ()) -> None:
    """The case, its worklist items (and the audit rows of predictions made elsewhere) in one transaction."""
    with engine.begin() as conn:
        if audited:
            conn.execute(insert(predictions), list(audited))
        conn.execute(insert(cases), [case])
        conn.execute(insert(items), rows)


def display_frame(path: Path, frame: int | None) -> np.ndarray:
    """The slice as a person should see it: 8-bit at its own size (a DICOM through its window)."""
    from data.images import is_dicom, open_image, read_dicom

    if is_dicom(path):
        return read_dicom(path, frame or 1)[0]
    return np.asarray(open_image(path))
