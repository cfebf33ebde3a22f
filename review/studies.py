"""The study worklist: one row per study (DICOM) or per upload batch (plain images), each with its series, their
class and refer flag by the series rule, their status and reviewers, and the study's facts from the DICOM header
(patient ID or a short hash of it, accession number, study date, modality, descriptions). Patient name and birth
date are shown only when pacs.keep_patient_identity keeps them in the stored files.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from sqlalchemy import Engine, true

from data.dicom_records import read_dicom_header
from data.images import ImageReadError
from review.viewer import series_reading
from review.worklist import items_where
from series.rule import SeriesRule

STUDY_FILTERS = ("pending", "reviewed", "referred", "all")
HEADER = ("PatientID", "PatientName", "PatientBirthDate", "AccessionNumber", "StudyDate", "Modality",
          "StudyDescription", "SeriesDescription", "SeriesNumber")
MAX_ITEMS = 20_000  # the study list reads at most this many worklist items (newest first)
PAGE = 50  # studies a page of the study list shows


@dataclass
class SeriesRow:
    key: str
    description: str
    number: str
    slices: int
    predicted_class: str
    confidence: float
    refer: bool
    status: str                      # pending | reviewed | partly reviewed
    reviewers: list[str]
    open_case: str                   # the case the viewer opens on (the series' first key slice)
    open_frame: int | None


@dataclass
class StudyRow:
    key: str
    patient: str
    patient_name: str
    birth_date: str
    accession: str
    date: str
    modality: str
    description: str
    source: str
    arrived: object
    series: list[SeriesRow] = field(default_factory=list)

    @property
    def slices(self) -> int:
        return sum(s.slices for s in self.series)

    @property
    def refer(self) -> bool:
        return any(s.refer for s in self.series)

    @property
    def status(self) -> str:
        states = {s.status for s in self.series}
        return states.pop() if len(states) == 1 else "partly reviewed"

    @property
    def confidence(self) -> float:
        return min(s.confidence for s in self.series)

    @property
    def reviewers(self) -> list[str]:
        return sorted({r for s in self.series for r in s.reviewers})


@lru_cache(maxsize=4096)
def header_facts(path: Path) -> dict[str, str]:
    """The study and series text of a stored DICOM file ({} for any other file or an unreadable header)."""
    try:
        ds = read_dicom_header(path)
    except ImageReadError:  # a plain image, or a header that cannot be read: the row shows what the worklist knows
        return {}
    return {k: str(ds.get(k, "") or "").strip() for k in HEADER}


def patient_shown(patient_id: str, how: str) -> str:
    """The patient ID as configured: itself, or a short one-way hash of it (review.patient_id: hash)."""
    if not patient_id or how != "hash":
        return patient_id
    return "#" + hashlib.sha256(patient_id.encode()).hexdigest()[:10]


def shown_facts(path: Path, patient_id: str = "show", keep_identity: bool = False) -> dict[str, str]:
    """What the viewer says of the series' study: its header text, the patient as configured."""
    facts = dict(header_facts(path))
    if not facts:
        return {}
    facts["PatientID"] = patient_shown(facts["PatientID"], patient_id)
    if not keep_identity:
        facts.pop("PatientName"), facts.pop("PatientBirthDate")
    return facts


def _series_key(e: dict) -> str:
    return f"{e['study_uid'] or ''}|{e['series_uid']}" if e["series_uid"] else f"batch|{e['batch'] or e['case_id']}"


def _study_key(e: dict) -> str:
    return e["study_uid"] or f"batch|{e['batch'] or e['case_id']}"


def _status(entries: list[dict]) -> str:
    pending = sum(e["status"] == "pending" for e in entries)
    return "pending" if pending == len(entries) else "reviewed" if not pending else "partly reviewed"


def study_rows(engine: Engine, path_of, rule: SeriesRule, status: str = "pending", patient_id: str = "show",
               keep_identity: bool = False, predicted: str | None = None) -> list[StudyRow]:
    """The studies on the worklist, referred first, then the least certain; `status` filters them, and `predicted`
    keeps the studies with a series of that class."""
    groups: dict[str, dict[str, list[dict]]] = {}
    for e in items_where(engine, true(), limit=MAX_ITEMS):
        groups.setdefault(_study_key(e), {}).setdefault(_series_key(e), []).append(e)
    out = []
    for key, series in groups.items():
        first = next(iter(series.values()))[0]
        facts = header_facts(path_of(first["file_ref"])) if first["sop_instance_uid"] and first["file_ref"] else {}
        study = StudyRow(key, patient_shown(facts.get("PatientID", ""), patient_id),
                         facts.get("PatientName", "") if keep_identity else "",
                         facts.get("PatientBirthDate", "") if keep_identity else "", facts.get("AccessionNumber", ""),
                         facts.get("StudyDate", ""), facts.get("Modality", ""), facts.get("StudyDescription", ""),
                         first["source"], min(e["created_at"] for s in series.values() for e in s))
        for skey, entries in series.items():
            reading = series_reading(entries, rule)
            opened = entries[reading.key_slices[0]]
            own = header_facts(path_of(entries[0]["file_ref"])) if entries[0]["sop_instance_uid"] else {}
            study.series.append(SeriesRow(
                skey, own.get("SeriesDescription", "") or ("upload" if not entries[0]["series_uid"] else ""),
                own.get("SeriesNumber", ""), len(entries), reading.predicted_class, reading.confidence,
                reading.refer, _status(entries), sorted({e["reviewer"] for e in entries if e["reviewer"]}),
                opened["case_id"], opened["frame"]))
        study.series.sort(key=lambda s: (s.number.isdigit() and int(s.number) or 0, s.description))
        out.append(study)
    if status in ("pending", "reviewed"):
        out = [s for s in out if (s.status != "reviewed") == (status == "pending")]
    elif status == "referred":
        out = [s for s in out if s.refer]
    if predicted:
        out = [s for s in out if any(se.predicted_class == predicted for se in s.series)]
    return sorted(out, key=lambda s: (s.status == "reviewed", not s.refer, s.confidence))
