"""Series assembly in the spool: the instances of each received series wait here, classified, until the series is
complete, and what was made of them is written down, so that a series gets its results exactly once per model
version and a late instance an amended result, across restarts and `kill -9`.

    series/<key>/               one folder per (StudyInstanceUID, SeriesInstanceUID)
        <SOP UID>.dcm           a received instance (patient identity removed unless kept on purpose)
        <SOP UID>.json          its slice records and their place in the series; written last: the C-STORE is
                                answered after it, and a .dcm without it (never acknowledged) is removed on restart
        released                the association that delivered instances was released (pacs.series_complete:
                                association); its time against the last instance's
        skipped.json            the series is not read, and why (written once: one audit row)
        results/<rev>.json      revision rev of the results (0, then 1, 2 ... for late instances): the instances it
                                read, the model version, the result UIDs; written after the results were queued
        results/<rev>.sr.dcm    its SR, named as the predecessor by the next revision
A series folder is removed `pacs.series_keep_hours` after its last instance.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from core.fileio import atomic_file, private_dir, publish, write_json_atomic, write_text_atomic
from series.slices import SliceRef


def series_key(study_uid: str, series_uid: str) -> str:
    return hashlib.sha256(f"{study_uid}\n{series_uid}".encode()).hexdigest()[:32]


@dataclass
class Arrival:
    """One classified instance of a series: its records (one per frame) and its slices, in the same order."""
    sop_instance_uid: str
    records: list[dict]
    slices: list[SliceRef]
    received: float
    client: str = ""  # AE@address of the sender

    def to_json(self) -> dict:
        return {"sop_instance_uid": self.sop_instance_uid, "records": self.records,
                "slices": [asdict(s) for s in self.slices], "received": self.received, "client": self.client}

    @classmethod
    def from_json(cls, doc: dict) -> Arrival:
        slices = [SliceRef(**{**s, "position": tuple(s["position"]) if s["position"] else None,
                              "normal": tuple(s["normal"]) if s["normal"] else None}) for s in doc["slices"]]
        return cls(doc["sop_instance_uid"], doc["records"], slices, float(doc["received"]), doc.get("client", ""))


@dataclass
class SeriesState:
    """What the store holds of one series."""
    folder: Path
    study_uid: str
    series_uid: str
    arrivals: list[Arrival] = field(default_factory=list)
    released: float | None = None
    skipped: dict | None = None
    results: list[dict] = field(default_factory=list)  # results/<rev>.json, by revision

    @property
    def last_arrival(self) -> float:
        return max((a.received for a in self.arrivals), default=0.0)

    @property
    def instances(self) -> list[str]:
        return sorted(a.sop_instance_uid for a in self.arrivals)

    @property
    def regrown(self) -> bool:
        """Skipped for too few instances, and more have arrived since: to be read again."""
        counted = (self.skipped or {}).get("instances")
        return counted is not None and len(self.arrivals) > counted

    def instance_path(self, sop_uid: str) -> Path:
        return self.folder / f"{sop_uid}.dcm"

    def header(self, sop_uid: str) -> Dataset:
        return dcmread(self.instance_path(sop_uid), stop_before_pixels=True)

    def previous_report(self) -> Dataset | None:
        if not self.results:
            return None
        path = self.folder / "results" / f"{self.results[-1]['revision']}.sr.dcm"
        return dcmread(path) if path.exists() else None


class SeriesStore:
    def __init__(self, root: str | Path):
        self.root = private_dir(Path(root))

    def folder(self, study_uid: str, series_uid: str) -> Path:
        return self.root / series_key(study_uid, series_uid)

    def _open(self, study_uid: str, series_uid: str) -> Path:
        folder = private_dir(self.folder(study_uid, series_uid))
        if not (folder / "series.json").exists():
            write_json_atomic(folder / "series.json", {"study_uid": study_uid, "series_uid": series_uid})
        return folder

    def add(self, path: Path, arrival: Arrival, study_uid: str, series_uid: str) -> None:
        """Keep a classified instance (the file at `path`, moved) in its series; the JSON is the commit point."""
        folder = self._open(study_uid, series_uid)
        publish(path, folder / f"{arrival.sop_instance_uid}.dcm")
        write_json_atomic(folder / f"{arrival.sop_instance_uid}.json", arrival.to_json())

    def update(self, state: SeriesState, arrival: Arrival) -> None:
        """New records for an instance already kept (classified again by another model version)."""
        write_json_atomic(state.folder / f"{arrival.sop_instance_uid}.json", arrival.to_json())

    def skip(self, study_uid: str, series_uid: str, reason: str, instances: int | None = None) -> bool:
        """Mark the series as not read; True the first time (the caller writes its one audit row then).
        `instances`: the series was too small with this many instances, and is read once it has more (the count is
        kept up to date, with no new audit row); None: skipped for good (a localizer, another modality, ...)."""
        folder = self._open(study_uid, series_uid)
        first = not (folder / "skipped.json").exists()
        if first or instances is not None:
            write_json_atomic(folder / "skipped.json", {"reason": reason, "time": time.time(), "instances": instances})
        return first

    def unskip(self, state: SeriesState) -> None:
        """The series grew past the reason it was skipped for and has been read."""
        (state.folder / "skipped.json").unlink(missing_ok=True)
        state.skipped = None

    def release(self, study_uid: str, series_uid: str) -> None:
        folder = self.folder(study_uid, series_uid)
        if folder.is_dir():
            write_text_atomic(folder / "released", str(time.time()))

    def record_results(self, state: SeriesState, doc: dict, report: Dataset) -> None:
        results = private_dir(state.folder / "results")
        with atomic_file(results / f"{doc['revision']}.sr.dcm", private=True) as fh:
            report.save_as(fh, enforce_file_format=True)
        write_json_atomic(results / f"{doc['revision']}.json", doc)  # last: the revision is done

    def folders(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir() if p.is_dir())

    def load(self, folder: Path) -> SeriesState:
        """The series' state; one marked unreadable (left alone this round) when it is being made or damaged."""
        try:
            return self.state(folder)
        except (OSError, ValueError, KeyError) as exc:
            return SeriesState(folder, "", "", skipped={"reason": f"unreadable: {exc}"})

    def states(self) -> list[SeriesState]:
        return [self.load(folder) for folder in self.folders()]

    def state(self, folder: Path) -> SeriesState:
        meta = json.loads((folder / "series.json").read_text())
        state = SeriesState(folder, meta["study_uid"], meta["series_uid"])
        for path in sorted(folder.glob("*.json")):
            if path.name not in ("series.json", "skipped.json"):
                state.arrivals.append(Arrival.from_json(json.loads(path.read_text())))
        if (folder / "released").exists():
            state.released = float((folder / "released").read_text() or 0)
        if (folder / "skipped.json").exists():
            state.skipped = json.loads((folder / "skipped.json").read_text())
        done = sorted(folder.glob("results/*.json"), key=lambda p: int(p.stem))
        state.results = [json.loads(p.read_text()) for p in done]
        return state

    def recover(self) -> None:
        """After a crash: instances never acknowledged (no JSON) and half-written files go."""
        for stale in self.root.glob(".*"):
            stale.unlink(missing_ok=True)
        for folder in (p for p in self.root.iterdir() if p.is_dir()):
            for path in folder.glob("*.dcm"):
                if not path.with_suffix(".json").exists():
                    path.unlink(missing_ok=True)
            for stale in [*folder.glob(".*"), *folder.glob("results/.*")]:
                stale.unlink(missing_ok=True)

    def expire(self, state: SeriesState, keep_s: float, now: float) -> bool:
        """Remove a series whose last instance is older than keep_s; True when removed."""
        last = max(state.last_arrival, (state.skipped or {}).get("time", 0.0))
        if last and now - last > keep_s:
            shutil.rmtree(state.folder, ignore_errors=True)
            return True
        return False
