"""The decoding stage (parallel Ray tasks): each file's sha256, then its frames through the one image loader, as
uint8 slices at the model's size. A file this model version already scored (same path, same bytes) gives no row;
a file that cannot be read gives one row with its error."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from data.dicom_records import read_dicom_header
from data.images import ImageLimits, ImageReadError, is_dicom, load_frames, set_limits
from data.manifest import sha256_file

DECODED = pa.schema([
    ("path", pa.string()), ("frame", pa.int32()), ("sha256", pa.string()),
    ("study_uid", pa.string()), ("series_uid", pa.string()), ("sop_instance_uid", pa.string()),
    ("pixels", pa.binary()),   # uint8 (S, S), row-major; null when the file could not be read
    ("error", pa.string()),
])
UIDS = {"study_uid": "StudyInstanceUID", "series_uid": "SeriesInstanceUID", "sop_instance_uid": "SOPInstanceUID"}


def dicom_uids(path: str) -> dict:
    header = read_dicom_header(Path(path))
    return {key: str(getattr(header, tag, "") or "").strip() or None for key, tag in UIDS.items()}


def decode_file(path: str, img_size: int, done: frozenset) -> list[dict]:
    """The rows of one file: one per image or frame, none when already scored, one with the error when unreadable."""
    base = dict.fromkeys(DECODED.names) | {"path": path}
    try:
        base["sha256"] = sha256_file(Path(path))
    except OSError as exc:
        return [base | {"error": f"cannot read the file ({exc.strerror or type(exc).__name__})"}]
    if (path, base["sha256"]) in done:
        return []
    try:
        frames = load_frames(path, img_size)
        uids = dicom_uids(path) if is_dicom(path) else {}
    except ImageReadError as exc:
        return [base | {"error": str(exc).replace(f"{path}: ", "", 1)}]
    several = len(frames) > 1
    return [base | uids | {"frame": k if several else None, "pixels": gray.tobytes()}
            for k, (_, gray) in enumerate(frames, start=1)]


def decode_files(batch: pa.Table, img_size: int, limits: ImageLimits, done: frozenset) -> pa.Table:
    """A batch of file paths -> their decoded rows (DECODED). `limits`: the run's images: bounds (a Ray worker is
    another process: the driver's config does not reach it). `done`: (path, sha256) pairs to skip."""
    set_limits(limits)
    rows = [row for path in batch.column("path").to_pylist() for row in decode_file(path, img_size, done)]
    return pa.Table.from_pylist(rows, schema=DECODED)
