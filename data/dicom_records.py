"""DICOM files as training data: how many records a file holds and which series it belongs to.

A file of F frames is F records named `scan.dcm#frame=K` (data.images reads each one back with the
window inference uses). The series (SeriesInstanceUID) is the grouping key that keeps one
acquisition's slices on one side of the split; it is read from the header alone (no pixel data).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data.images import ImageReadError, frame_count, frame_name, read_dicom


@dataclass(frozen=True)
class DicomRecords:
    frames: int
    series_uid: str | None

    def record_names(self, rel: str) -> list[str]:
        """Manifest paths of its records: the file itself for one frame, file#frame=K for each of several."""
        return [rel] if self.frames == 1 else [frame_name(rel, k) for k in range(1, self.frames + 1)]


IDENTITY_KEYWORDS = ("PatientBirthDate", "PatientBirthTime")  # besides every person name (VR PN)


def strip_identity(ds):
    """Every person name (VR PN: the patient's, other names, birth and mother's names, physicians') and the birth
    date and time emptied, in the data set and every sequence nested in it (OriginalAttributesSequence ...);
    the patient ID stays, to file results. Returns `ds`."""
    def blank(dataset, element) -> None:
        if element.VR == "PN" or element.keyword in IDENTITY_KEYWORDS:
            element.value = ""

    ds.walk(blank)
    return ds


def read_dicom_header(path: Path):
    """The header without pixel data (a few KB read, whatever the file size)."""
    import pydicom  # only DICOM input needs it
    from pydicom.errors import InvalidDicomError

    try:
        if path.stat().st_size == 0:
            raise ImageReadError(f"{path}: empty file")
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except ImageReadError:
        raise
    except (InvalidDicomError, AttributeError, KeyError, TypeError, ValueError, OSError) as exc:
        raise ImageReadError(f"{path}: not a readable DICOM file ({exc})") from None


def inspect_dicom(path: str | Path, decode: bool = True) -> DicomRecords:
    """Frames and series of one DICOM file; decode=True also decodes every frame (a corrupt one raises
    ImageReadError, as a corrupt JPEG does when the data set is scanned)."""
    path = Path(path)
    header = read_dicom_header(path)
    try:
        frames = frame_count(header)
    except (TypeError, ValueError):
        raise ImageReadError(f"{path}: unreadable NumberOfFrames {header.get('NumberOfFrames')!r}") from None
    if decode:
        frames = len(read_dicom(path))
    series = str(getattr(header, "SeriesInstanceUID", "") or "").strip() or None
    return DicomRecords(frames, series)
