"""An uploaded file -> the model's input, through the CLI's own loader (data.images) and the contract.

The bytes are written to a private folder under a random name (the upload's own name is never part of a
path), decoded by the predictor's `decode` (one model input per frame of a multi-frame DICOM), and
removed. Every failure becomes an UploadError: an HTTP status, a kind for the metrics, and a reason that
names the upload, never a server path.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from data.images import DICOM_EXTENSIONS, ImageReadError, check_inflated, frame_count
from deploy.predictors import ModelInput

log = logging.getLogger("serving.uploads")
MAX_NAME = 255
MAX_REASON = 300


class UploadError(Exception):
    def __init__(self, status: int, kind: str, reason: str):
        super().__init__(reason)
        self.status, self.kind, self.reason = status, kind, reason


@dataclass
class Upload:
    filename: str  # as the client sent it: shown back, stored in the audit log, never used in a path
    data: bytes


@dataclass
class DecodedFile:
    filename: str
    sha256: str
    inputs: list[ModelInput]  # one per image: a single image, or each frame of a multi-frame DICOM
    dicom: dict = field(default_factory=dict)  # study_uid, series_uid, sop_instance_uid when the file has them
    path: Path | None = None  # the private copy, kept only when asked (Grad-CAM)
    pixels_ref: str | None = None  # where a storage hook kept the upload

    @property
    def x(self) -> np.ndarray:
        """(k, 3, S, S) float32: the contract's preprocessing of every image."""
        return np.concatenate([i.x for i in self.inputs])


def display_name(raw: str | None) -> str:
    """The upload's base name without control characters, cut to 255 characters."""
    name = PureWindowsPath(PurePosixPath(raw or "").name).name  # browsers may send C:\\...\\scan.jpg
    name = re.sub(r"[\x00-\x1f\x7f]", "", name)
    return name[:MAX_NAME] or "upload"


def is_dicom_upload(data: bytes, filename: str) -> bool:
    """A Part 10 file ('DICM' after the 128-byte preamble), or a file the client named .dcm/.dicom."""
    return data[128:132] == b"DICM" or Path(filename).suffix.lower() in DICOM_EXTENSIONS


def dicom_facts(path: Path) -> tuple[dict, int]:
    """(the UIDs the audit log keeps, number of frames), read without the pixel data."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        frames = frame_count(ds)
    except Exception:  # the decoder proper reports what is wrong with the file
        return {}, 1
    uids = {"study_uid": getattr(ds, "StudyInstanceUID", None), "series_uid": getattr(ds, "SeriesInstanceUID", None),
            "sop_instance_uid": getattr(ds, "SOPInstanceUID", None)}
    return {k: str(v)[:64] for k, v in uids.items() if v}, frames


def reason_of(exc: Exception, path: Path, filename: str) -> str:
    """The decoder's message with the private path replaced by the upload's name; one line, bounded."""
    text = str(exc).replace(str(path), filename).replace(str(path.parent), "")
    return text.splitlines()[0][:MAX_REASON] if text else type(exc).__name__


def write_private(folder: Path, data: bytes, dicom: bool) -> Path:
    path = folder / f"{uuid.uuid4().hex}{'.dcm' if dicom else '.img'}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path


def decode_upload(upload: Upload, predictor, folder: Path, max_images: int, keep: bool = False,
                  max_bytes: int = 32 * 2**20) -> DecodedFile:
    """Decode one upload with the predictor's contract; raises UploadError (blocking: run it off the loop).
    `max_bytes`: the request body's cap, which a deflated DICOM may not inflate past either."""
    name = display_name(upload.filename)
    if not upload.data:
        raise UploadError(422, "unreadable_image", f"{name}: empty file")
    digest = hashlib.sha256(upload.data).hexdigest()
    dicom = is_dicom_upload(upload.data, name)
    path, done = write_private(folder, upload.data, dicom), False
    try:
        if dicom:
            check_inflated(path, max_bytes)  # a deflated file inflates within the body's own cap
        uids, n_frames = dicom_facts(path) if dicom else ({}, 1)
        if n_frames > max_images:
            raise UploadError(413, "too_many_images", f"{name}: {n_frames} frames, over the limit of {max_images} "
                                                      "images per request")
        decoded = DecodedFile(name, digest, predictor.decode(path), uids, path if keep else None)
        done = True
    except UploadError:
        raise
    except ImageReadError as exc:
        reason = reason_of(exc, path, name).removeprefix(f"{name}: ")
        raise UploadError(422, "unreadable_image", f"{name}: {reason}") from None
    except Exception as exc:  # a decoder failure data.images does not map yet: still the file's fault
        log.warning("decoding an upload raised %s", type(exc).__name__, exc_info=True)
        raise UploadError(422, "unreadable_image", f"{name}: cannot decode ({type(exc).__name__})") from None
    finally:
        if not (keep and done):
            path.unlink(missing_ok=True)
    return decoded
