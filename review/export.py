"""export-reviews: the reviewed cases as a new training set.

OUT_DIR/<reviewer's class>/<group>_<case id>[_f<frame>]<suffix>, an ImageFolder tree that train.py reads with
`--set dataset.path=OUT_DIR`, and OUT_DIR/verdicts.csv with every verdict ever given (the current one of each
prediction marked, and the file it went to). An image whose verdict is no class (no tumour / normal,
non-diagnostic, other, a confirmed referral) goes to OUT_DIR/.findings/<finding>/, which the data set scanner
skips like every dot-folder: it never lands in a tumour class.
<group> is `study-` and a hash of the DICOM study, else the case id: `--set dataset.group_pattern='^([^_]+)_'`
keeps a study's series (and a case's frames) in one split. Plain images of one upload are grouped by case, not by
upload: an upload often holds unrelated images. `flagged_only`: only the slices flagged with their verdict.

A single image goes as it was uploaded (a DICOM keeps its window and bit depth); a frame of a multi-frame file
goes as an 8-bit PNG of that frame through its window (the pixels the loader would read from it).
"""
from __future__ import annotations

import csv
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from sqlalchemy import Engine, and_, select

from core.errors import UserError
from core.fileio import atomic_file, private_dir, sync_all
from review.cases import CaseFiles, display_frame
from review.schema import cases, flags, items, verdicts, withdrawn
from serving.audit import predictions

GROUP_PATTERN = "^([^_]+)_"
FINDINGS_DIR = ".findings"
COLUMNS = ("file", "current", "verdict_id", "created_at", "reviewer", "agrees", "predicted_class", "reviewer_class",
           "finding", "flagged", "withdrawn", "note", "case_id", "frame", "prediction_id", "source", "uploaded_as",
           "model_name", "model_version", "confidence", "refer", "study_uid", "series_uid", "sop_instance_uid")


@dataclass
class Exported:
    out_dir: Path
    files: dict[str, int] = field(default_factory=dict)  # class -> files written
    findings: dict[str, int] = field(default_factory=dict)  # finding (no class) -> files written
    verdicts: int = 0
    missing: list[str] = field(default_factory=list)      # cases whose kept file is gone


def verdict_rows(engine: Engine) -> list[dict]:
    query = (select(verdicts.c.id.label("verdict_id"), verdicts.c.created_at, verdicts.c.reviewer, verdicts.c.agrees,
                    verdicts.c.predicted_class, verdicts.c.reviewer_class, verdicts.c.finding, verdicts.c.note,
                    verdicts.c.case_id, withdrawn.c.verdict_id.is_not(None).label("withdrawn"),
                    flags.c.verdict_id.is_not(None).label("flagged"),
                    verdicts.c.prediction_id, items.c.frame, items.c.confidence, items.c.refer, cases.c.source,
                    cases.c.filename.label("uploaded_as"), cases.c.file_ref, cases.c.frames, predictions.c.model_name,
                    predictions.c.model_version, predictions.c.study_uid, predictions.c.series_uid,
                    predictions.c.sop_instance_uid)
             .join(items, items.c.prediction_id == verdicts.c.prediction_id)
             .join(cases, cases.c.id == verdicts.c.case_id)
             .join(predictions, predictions.c.id == verdicts.c.prediction_id)
             .outerjoin(withdrawn, withdrawn.c.verdict_id == verdicts.c.id)
             .outerjoin(flags, and_(flags.c.verdict_id == verdicts.c.id,
                                    flags.c.prediction_id == verdicts.c.prediction_id))
             .order_by(verdicts.c.id))
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings().all()]


def file_name(row: dict) -> str:
    """<group>_<case id>[_f<frame>]<suffix>; the group is the DICOM study (hashed) or the case itself."""
    group = ("study-" + hashlib.sha256(row["study_uid"].encode()).hexdigest()[:16]) if row["study_uid"] \
        else row["case_id"]
    whole = row["frames"] == 1 and not row["file_ref"].endswith(".img")
    suffix = Path(row["file_ref"]).suffix if whole else ".png"
    return f"{group}_{row['case_id']}{'' if whole else '_f' + str(row['frame'] or 1)}{suffix}"


def _copy_image(files: CaseFiles, row: dict, target: Path) -> None:
    source = files.path(row["file_ref"])
    with atomic_file(target, private=True, sync=False) as fh:
        if target.suffix == Path(row["file_ref"]).suffix:
            with open(source, "rb") as src:
                shutil.copyfileobj(src, fh)
        else:
            Image.fromarray(display_frame(source, row["frame"])).save(fh, format="PNG")


def _folder(row: dict) -> str:
    """The class folder of a class verdict; .findings/<finding> for a verdict that is no class."""
    if row["finding"]:
        return f"{FINDINGS_DIR}/{row['finding']}"
    if Path(row["reviewer_class"]).name != row["reviewer_class"] or row["reviewer_class"].startswith("."):
        raise UserError(f"class {row['reviewer_class']!r} cannot be a folder name")
    return row["reviewer_class"]


def _safe_cell(value):
    """Text a spreadsheet would run as a formula (=, +, -, @ first) is quoted."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return "" if value is None else value


def export_reviews(engine: Engine, files: CaseFiles, out_dir: str | Path, flagged_only: bool = False) -> Exported:
    """Write the tree and verdicts.csv into a new folder beside OUT_DIR, then rename it into place; with
    `flagged_only`, only the slices flagged with their current verdict go into the tree (verdicts.csv has all)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} exists and is not empty: export into a new folder")
    rows = verdict_rows(engine)
    if not rows:
        raise UserError("no verdicts in the database yet: review some cases first")
    current = {r["prediction_id"]: r["verdict_id"] for r in rows if not r["withdrawn"]}  # in order: the last wins
    result = Exported(out_dir, verdicts=len(rows))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))  # 0700, like the store
    try:
        for r in rows:
            r["current"] = current.get(r["prediction_id"]) == r["verdict_id"]
            r["file"] = ""
            if not r["current"] or (flagged_only and not r["flagged"]):
                continue
            if not r["file_ref"] or not files.path(r["file_ref"]).is_file():
                result.missing.append(r["case_id"])
                continue
            folder, tally = _folder(r), result.findings if r["finding"] else result.files
            r["file"] = f"{folder}/{file_name(r)}"
            _copy_image(files, r, private_dir(staging / folder) / file_name(r))
            key = r["finding"] or r["reviewer_class"]
            tally[key] = tally.get(key, 0) + 1
        with atomic_file(staging / "verdicts.csv", "w", newline="", private=True, sync=False) as fh:
            writer = csv.writer(fh)
            writer.writerow(COLUMNS)
            writer.writerows([[_safe_cell(r[c]) for c in COLUMNS] for r in rows])
        sync_all()
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result
