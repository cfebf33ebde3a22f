"""The manual route: results of `inference_with_mlflow.py --json` on DICOM files, made into SR and secondary
captures and queued for a PACS.

A result folder holds `predictions.json` (the JSON document `inference_with_mlflow.py --json` prints) and
the DICOM files it names; a record's path is looked up as written, then relative to the folder, then by
its file name in the folder. Non-DICOM records are skipped; a DICOM file whose frames are not all predicted,
or that is missing or not an MR / secondary-capture image, is reported and skipped.
"""
from __future__ import annotations

import json
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from core.config import PacsSection
from core.errors import UserError
from data.images import frame_count, frame_name, is_dicom, read_dicom, split_frame_name
from pacs.classify import instance_uids
from pacs.pipeline import make_results
from pacs.receiver import IMAGE_SOP_CLASSES, strip_identity
from pacs.report import ModelInfo
from pacs.spool import Spool

PREDICTIONS_FILE = "predictions.json"


def read_predictions(result_dir: Path) -> dict:
    path = result_dir / PREDICTIONS_FILE
    if not path.is_file():
        raise UserError(f"{path} not found: write it with inference_with_mlflow.py ... --json > {path}")
    try:
        doc = json.loads(path.read_text())
        _ = doc["model"], doc["version"], list(doc["predictions"])
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not the JSON of inference_with_mlflow.py --json ({exc})") from None
    return doc


def locate(name: str, result_dir: Path) -> Path | None:
    for candidate in (Path(name), result_dir / name, result_dir / Path(name).name):
        if candidate.is_file():
            return candidate
    return None


def records_by_file(predictions: list[dict]) -> dict[str, list[tuple[int | None, dict]]]:
    """DICOM records grouped by their file, in the order inference wrote them: {file: [(frame, record)]}."""
    files: dict[str, list[tuple[int | None, dict]]] = {}
    for record in predictions:
        path, frame = split_frame_name(record["path"])
        if is_dicom(path):
            files.setdefault(str(path), []).append((frame, record))
    return files


def file_results(path: Path, frames: list[tuple[int | None, dict]], model: ModelInfo, settings: PacsSection):
    """The SR and secondary captures of one source file; raises ValueError saying why it cannot have them."""
    try:
        ds = dcmread(path)
    except (InvalidDicomError, OSError) as exc:
        raise ValueError(f"not readable as DICOM ({exc})") from None
    if str(ds.get("SOPClassUID", "")) not in IMAGE_SOP_CLASSES:
        raise ValueError("not an MR or secondary-capture image")
    n = frame_count(ds)
    frames = sorted(frames, key=lambda item: item[0] or 1)
    if [f or 1 for f, _ in frames] != list(range(1, n + 1)):
        raise ValueError(f"the predictions cover {len(frames)} of its {n} frame(s)")
    if not settings.keep_patient_identity:
        strip_identity(ds)
    uids = instance_uids(ds)
    records = [{**r, **uids, "path": frame_name(uids["sop_instance_uid"], f), "frame": f,
                "refer": bool(r.get("refer", r["confidence"] < settings.refer_below)),
                "model": model.name, "version": model.version} for f, r in frames]
    return make_results(ds, read_dicom(path), records, model)


def queue_results(result_dir: Path, spool: Spool, settings: PacsSection) -> tuple[int, list[str]]:
    """(results newly queued, one line per source that was skipped)."""
    doc = read_predictions(result_dir)
    model = ModelInfo(str(doc["model"]), str(doc["version"]))
    queued, problems = 0, []
    for name, frames in records_by_file(doc["predictions"]).items():
        path = locate(name, result_dir)
        if path is None:
            problems.append(f"{name}: file not found (as written, or in {result_dir})")
            continue
        try:
            results = file_results(path, frames, model, settings)
        except ValueError as exc:
            problems.append(f"{path}: {exc}")
            continue
        queued += sum(spool.put(ds) for ds in results)
    return queued, problems
