"""The output table: its columns, the folder of Parquet part files it lives in, and what it already holds.

`--out preds.parquet` is a folder of part files (pandas, pyarrow, DuckDB and Spark read it as one table). A run
writes into a staging folder inside it and moves each finished part file in with a rename, so a killed run leaves
only whole files; the next run adopts the whole files a killed run staged (a Parquet file is whole when its footer
reads) and removes the rest.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from core.errors import UserError
from core.fileio import FolderLock, private_dir

# One row per image or DICOM frame (kind "image"), and one per DICOM series (kind "series") when the model has a
# series rule. A file that cannot be read is a row with its error and no prediction.
OUTPUT = pa.schema([
    ("kind", pa.string()),
    ("path", pa.string()),               # the file (absolute), as the scoring machines see it
    ("frame", pa.int32()),               # 1-based frame of a multi-frame DICOM; null for one image
    ("study_uid", pa.string()),
    ("series_uid", pa.string()),
    ("sop_instance_uid", pa.string()),
    ("sha256", pa.string()),
    ("model_name", pa.string()),
    ("model_version", pa.string()),
    ("flavor", pa.string()),             # onnx | onnx-int8
    ("predicted_class", pa.string()),
    ("class_index", pa.int32()),
    ("confidence", pa.float64()),
    ("probabilities", pa.string()),      # JSON {class: probability}, the model's own (uncalibrated)
    ("refer", pa.bool_()),               # the version's refer rule (deploy.refer), as every door of the server
    ("refer_reasons", pa.string()),
    ("ood_distance", pa.float64()),      # the feature-space distance; null for a model without the check
    ("out_of_distribution", pa.bool_()),  # past the model's limit (fitted on its validation split)
    ("prediction_set", pa.string()),     # JSON list: the conformal prediction set; null without fitted sets
    ("error", pa.string()),              # why the file gave no prediction
    ("run_id", pa.string()),
    ("scored_at", pa.timestamp("us", tz="UTC")),
])
MODEL_KEY = ("model_name", "model_version", "flavor")
STAGING_PREFIX = ".staging-"


def part_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("*.parquet"))


def read_output(folder: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Every part file of an output folder as one table (empty, with the columns, when there is none)."""
    files = part_files(Path(folder))
    if not files:
        return OUTPUT.empty_table().select(columns or OUTPUT.names)
    return pads.dataset([str(f) for f in files], schema=OUTPUT, format="parquet").to_table(columns=columns)


def is_whole(path: Path) -> bool:
    try:
        pq.read_metadata(path)
        return True
    except Exception:  # truncated, empty, not Parquet: whatever a kill left
        return False


class ArchiveOutput:
    """An output folder held by one run at a time (a lock file), readable by its owner only: the rows name
    patients' files and DICOM UIDs."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(f"--out {self.folder} is a file; the output is a folder of Parquet part files "
                            "(choose a new name, e.g. preds.parquet)")
        self.lock = FolderLock(self.folder, "score_archive.py")

    def __enter__(self) -> ArchiveOutput:
        private_dir(self.folder)
        self.lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()

    def adopt_staged(self) -> int:
        """Part files a killed run finished: moved in. Half-written ones: removed. Returns the files moved."""
        moved = 0
        for staging in sorted(self.folder.glob(f"{STAGING_PREFIX}*")):
            moved += len(self.publish(staging))
        return moved

    def staging(self, run_id: str) -> Path:
        return private_dir(self.folder / f"{STAGING_PREFIX}{run_id}")

    def publish(self, staging: Path) -> list[Path]:
        """Move every whole part file of a staging folder into the output (rename: atomic), then drop the folder."""
        moved = []
        for part in sorted(staging.rglob("*.parquet")):
            if is_whole(part):
                target = self.folder / f"part-{staging.name.removeprefix(STAGING_PREFIX)}-{part.name}"
                os.replace(part, target)
                moved.append(target)
        shutil.rmtree(staging, ignore_errors=True)
        if moved:
            fd = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(fd)  # the renames survive a power cut
            finally:
                os.close(fd)
        return moved

    def done(self, identity: dict) -> frozenset[tuple[str, str]]:
        """(path, sha256) of every file this model version (and flavor) already scored: a rerun skips them."""
        table = read_output(self.folder, ["path", "sha256", *MODEL_KEY])
        keys = set()
        for row in table.to_pylist():
            if row["sha256"] and all(row[k] == identity[k] for k in MODEL_KEY):
                keys.add((row["path"], row["sha256"]))
        return frozenset(keys)

    def digest(self) -> str:
        """sha256 over the part files (names and bytes, in name order): the audit record's hash of the output."""
        h = hashlib.sha256()
        for part in part_files(self.folder):
            h.update(part.name.encode() + b"\0")
            with open(part, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        return h.hexdigest()
