"""Which series a slice belongs to and where it lies in it: read from DICOM headers alone (no pixel data).

A slice is one frame of one instance. Its place in the series is its position along the slice normal
(ImagePositionPatient projected on ImageOrientationPatient's row x column direction; per frame from the
functional groups of an enhanced multi-frame instance), else its InstanceNumber, else its frame number.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data.dicom_records import read_dicom_header
from data.images import ImageReadError, frame_count, frame_name

# Slices whose normals differ by more than this (cosine) are not one stack: position cannot order them.
PARALLEL = 0.99


@dataclass(frozen=True)
class SliceRef:
    """One slice: its series, its instance and frame, and what orders it."""
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    frame: int | None                      # 1-based frame of a multi-frame instance; None for a single frame
    name: str                              # its record name: file (or SOP Instance UID), #frame=K for a frame
    position: tuple[float, ...] | None = None  # ImagePositionPatient (mm)
    normal: tuple[float, ...] | None = None    # unit normal of the slice plane
    instance_number: int | None = None

    @property
    def series_key(self) -> tuple[str, str]:
        return self.study_uid, self.series_uid


@dataclass
class Series:
    """The slices of one series, in order."""
    study_uid: str
    series_uid: str
    slices: list[SliceRef] = field(default_factory=list)
    ordered_by: str = "instance number"    # "position" | "instance number"

    @property
    def key(self) -> tuple[str, str]:
        return self.study_uid, self.series_uid

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.slices]


def _floats(value, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _normal(orientation) -> tuple[float, ...] | None:
    cosines = _floats(orientation, 6)
    if cosines is None:
        return None
    n = np.cross(cosines[:3], cosines[3:])
    norm = float(np.linalg.norm(n))
    return None if norm < 1e-6 else tuple(float(v) for v in n / norm)


def _first(sequence, keyword: str):
    """sequence[0].keyword of a functional-group sequence, or None."""
    items = sequence if sequence is not None else []
    return getattr(items[0], keyword, None) if len(items) else None


def _frame_geometry(ds, frames: int) -> list[tuple]:
    """(position, normal) of each frame: per-frame functional groups, shared ones, else the top-level tags."""
    shared = _first(getattr(ds, "SharedFunctionalGroupsSequence", None), "PlaneOrientationSequence")
    shared_orientation = _first(shared, "ImageOrientationPatient")
    per_frame = getattr(ds, "PerFrameFunctionalGroupsSequence", None) or []
    out = []
    for k in range(frames):
        group = per_frame[k] if k < len(per_frame) else None
        position = _first(getattr(group, "PlanePositionSequence", None), "ImagePositionPatient")
        orientation = _first(getattr(group, "PlaneOrientationSequence", None), "ImageOrientationPatient")
        if frames == 1 and position is None:
            position = getattr(ds, "ImagePositionPatient", None)
        orientation = orientation or shared_orientation or getattr(ds, "ImageOrientationPatient", None)
        out.append((_floats(position, 3) if position is not None else None, _normal(orientation)))
    return out


def slices_of(ds, name: str | Path | None = None) -> list[SliceRef]:
    """The slices of one instance (a pydicom data set, its header is enough); `name`: the record name of the file
    (default: its SOP Instance UID), frames named name#frame=K. Raises ImageReadError for an instance without
    the UIDs that place it."""
    uids = [str(getattr(ds, key, "") or "").strip() for key in
            ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
    if not all(uids):
        raise ImageReadError(f"{name or 'instance'}: no Study/Series/SOP Instance UID")
    try:
        frames = frame_count(ds)
        number = getattr(ds, "InstanceNumber", None)
        number = int(number) if number not in (None, "") else None
    except (TypeError, ValueError):
        raise ImageReadError(f"{name or uids[2]}: unreadable NumberOfFrames or InstanceNumber") from None
    base = str(name) if name is not None else uids[2]
    return [SliceRef(uids[0], uids[1], uids[2], None if frames == 1 else k, frame_name(base, None if frames == 1
                     else k), position, normal, number)
            for k, (position, normal) in enumerate(_frame_geometry(ds, frames), start=1)]


def read_slices(path: str | Path, name: str | None = None) -> list[SliceRef]:
    """The slices of one DICOM file, from its header. Raises ImageReadError."""
    return slices_of(read_dicom_header(Path(path)), name if name is not None else str(path))


def _stack_normal(slices: list[SliceRef]) -> np.ndarray | None:
    """The series' common slice normal, or None when a slice lacks geometry or the slices are not parallel."""
    if not slices or any(s.position is None or s.normal is None for s in slices):
        return None
    first = np.asarray(slices[0].normal)
    if any(abs(float(np.dot(first, s.normal))) < PARALLEL for s in slices):
        return None
    return first


def order_slices(slices: list[SliceRef]) -> tuple[list[SliceRef], str]:
    """The slices in reading order and what ordered them: position along the normal when every slice has its
    geometry on one stack, else InstanceNumber (then frame number, then SOP Instance UID)."""
    def fallback(s: SliceRef):
        return (s.instance_number is None, s.instance_number or 0, s.frame or 0, s.sop_instance_uid)

    normal = _stack_normal(slices)
    if normal is None:
        return sorted(slices, key=fallback), "instance number"
    return sorted(slices, key=lambda s: (round(float(np.dot(s.position, normal)), 4), fallback(s))), "position"


def group_series(slices: Iterable[SliceRef]) -> list[Series]:
    """Slices grouped by (StudyInstanceUID, SeriesInstanceUID), each series in reading order; series in the order
    their first slice came."""
    groups: dict[tuple[str, str], list[SliceRef]] = {}
    for s in slices:
        groups.setdefault(s.series_key, []).append(s)
    out = []
    for (study, series), members in groups.items():
        ordered, how = order_slices(members)
        out.append(Series(study, series, ordered, how))
    return out


def series_of_files(paths: Iterable[str | Path], names: Iterable[str] | None = None
                    ) -> tuple[list[Series], list[tuple[str, str]]]:
    """The series of DICOM files read by header: (series, [(path, reason)] for files that could not be read).
    `names`: each file's record name (default: its path)."""
    paths = [Path(p) for p in paths]
    names = list(names) if names is not None else [str(p) for p in paths]
    found, bad = [], []
    for path, name in zip(paths, names):
        try:
            found.extend(read_slices(path, name))
        except (ImageReadError, OSError) as exc:
            bad.append((str(path), str(exc).replace(f"{path}: ", "")))
    return group_series(found), bad
