"""POST /v1/series: the files of one DICOM series (several parts, or one zip) -> the series result and its slices.

Every slice is predicted and audited as /v1/predict does; the slices are ordered by series.slices (position along the
slice normal, else InstanceNumber) and read by the series rule (series.rule, the config's `series:` section), whose
result gets its own row in series_results, committed before the answer. A slice is referred by the slice rule's
threshold (`review.refer_below`); the review station and the DICOM node add the drift check of their refer rule.
"""
from __future__ import annotations

import hashlib
import io
import uuid
import zipfile

import numpy as np
import pydicom

from data.images import frame_name
from series.rule import SeriesRule, SliceCheck, read_series
from series.slices import group_series, slices_of
from serving.audit import series_row
from serving.uploads import Upload, UploadError, is_dicom_upload


def unzip(uploads: list[Upload], max_files: int, max_bytes: int) -> list[Upload]:
    """The parts as they are, or the members of one zip; bounded in count and in uncompressed bytes (a zip bomb
    is refused before it is inflated)."""
    if len(uploads) != 1 or not zipfile.is_zipfile(io.BytesIO(uploads[0].data)):
        return uploads
    with zipfile.ZipFile(io.BytesIO(uploads[0].data)) as archive:
        members = [m for m in archive.infolist() if not m.is_dir() and not m.filename.startswith("__MACOSX/")]
        if len(members) > max_files:
            raise UploadError(413, "too_many_files", f"{len(members)} files in the zip, over the limit of {max_files}")
        if sum(m.file_size for m in members) > max_bytes:
            raise UploadError(413, "too_large", f"the zip holds over {max_bytes // 2**20} MB uncompressed")
        return [Upload(m.filename.rsplit("/", 1)[-1], archive.read(m)) for m in members]


def series_of(uploads: list[Upload]):
    """(the one series the DICOM parts belong to (series.slices.Series; slices named SOP UID[#frame=K]), each part's
    SOP Instance UID by the sha256 of its bytes). Raises UploadError (422) when a part is not DICOM or the parts hold
    several series."""
    refs, sop_of = [], {}
    for upload in uploads:
        if not is_dicom_upload(upload.data, upload.filename):
            raise UploadError(422, "not_dicom", f"{upload.filename}: not a DICOM file (a series is sent as DICOM)")
        try:
            found = slices_of(pydicom.dcmread(io.BytesIO(upload.data), stop_before_pixels=True))
        except Exception as exc:  # noqa: BLE001 - any unreadable header is the sender's error
            raise UploadError(422, "bad_dicom", f"{upload.filename}: unreadable DICOM header "
                                                f"({type(exc).__name__})") from None
        refs += found
        sop_of[hashlib.sha256(upload.data).hexdigest()] = found[0].sop_instance_uid
    grouped = group_series(refs)
    if len(grouped) != 1:
        raise UploadError(422, "several_series", f"the files hold {len(grouped)} series; send one series per request")
    return grouped[0], sop_of


def read_answer(answer_body: dict, series, sop_of: dict[str, str], rule: SeriesRule) -> tuple[dict, list[dict]]:
    """(the series part of the answer, its slice records in reading order with `slice_index` and the instance's
    UIDs) from a /v1/predict answer over the same files; each record's `refer` and `refer_reasons` (the version's
    refer rule) are the slice checks the DICOM node hands the series rule too."""
    by_slice = {}
    for record in answer_body["predictions"]:
        sop = sop_of[record["sha256"]]
        by_slice[frame_name(sop, record["frame"])] = {**record, "study_uid": series.study_uid,
                                                      "series_uid": series.series_uid, "sop_instance_uid": sop}
    missing = [ref.name for ref in series.slices if ref.name not in by_slice]
    if missing:
        raise UploadError(422, "bad_image", f"{len(missing)} slice(s) could not be read; the series is incomplete")
    ordered = [{**by_slice[ref.name], "slice_index": i} for i, ref in enumerate(series.slices)]
    names = list(ordered[0]["probabilities"])
    probs = np.array([[r["probabilities"][c] for c in names] for r in ordered])
    checks = [SliceCheck(refer=bool(r["refer"]), reasons=tuple(r["refer_reasons"])) for r in ordered]
    result = read_series(probs, names, rule, checks)
    part = {"study_uid": series.study_uid, "series_uid": series.series_uid, "ordered_by": series.ordered_by,
            **result.as_dict(), "key_slice_refs": [(ordered[i]["sop_instance_uid"], ordered[i]["frame"])
                                                   for i in result.key_slices]}
    return part, ordered


def series_audit_row(part: dict, body: dict, client: str | None) -> dict:
    event = {"outcome": "read", "study_uid": part["study_uid"], "series_uid": part["series_uid"], "client": client,
             "revision": None, "n_slices": part["n_slices"], "model": body["model"], "version": str(body["version"]),
             "reason": "; ".join(part["reasons"]), "result": part}
    return series_row(event, uuid.uuid4().hex, "api")
