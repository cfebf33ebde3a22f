"""One received instance -> one prediction per frame, each named by the instance's UIDs and its frame number.

The pixels go through the predictor's decode (data.images.read_frames), the loader every other stage uses (the
same window, the same resize, every frame its own record), from a temporary file that is removed as soon as the
instance is done.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from core.fileio import temporary_path
from data.images import ImageReadError, frame_name
from deploy.predictors import Predictor


@contextlib.contextmanager
def instance_file(ds: Dataset, work_dir: str | Path) -> Iterator[Path]:
    """The data set as a hidden .dcm file in work_dir (a name of our own, never the sender's), removed
    afterwards unless it was moved away meanwhile."""
    path = temporary_path(Path(work_dir) / "instance.dcm")  # owner-only, hidden: a crash leaves it to recover()
    try:
        try:
            ds.save_as(path, enforce_file_format=True)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ImageReadError(f"cannot be written as a DICOM file ({exc})") from None
        yield path
    finally:
        path.unlink(missing_ok=True)


def instance_uids(ds: Dataset) -> dict:
    return {"study_instance_uid": str(ds.StudyInstanceUID), "series_instance_uid": str(ds.SeriesInstanceUID),
            "sop_instance_uid": str(ds.SOPInstanceUID), "sop_class_uid": str(ds.SOPClassUID)}


def classify_instance(predictor: Predictor, path: Path, ds: Dataset) -> tuple[list[dict], list[np.ndarray]]:
    """(records, grays): one prediction record per frame, named SOPInstanceUID or SOPInstanceUID#frame=K and
    carrying the study/series/SOP instance UIDs and `frame` (None for a single-frame image), plus the 8-bit
    frames at the model's size. Raises ImageReadError, its message free of the temporary path."""
    try:
        inputs = predictor.decode(path)
    except ImageReadError as exc:
        raise ImageReadError(str(exc).replace(f"{path}: ", "").replace(str(path), "instance")) from None
    out = predictor.infer(np.concatenate([i.x for i in inputs]))
    uids = instance_uids(ds)
    records = [{**predictor.record(frame_name(uids["sop_instance_uid"], i.frame), out, k), **uids, "frame": i.frame}
               for k, i in enumerate(inputs)]
    return records, [i.gray for i in inputs]
