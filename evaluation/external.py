"""External validation: the checkpoint scored on another site's ImageFolder or DICOM tree.

Folders are mapped to the model's classes by name (case aside) or by a class-map file; a folder that
maps to no class is reported and left out, never guessed. Images whose bytes are in the training
manifest (any split) are flagged and left out: they would not be external. The rows that remain are
written as a manifest of their own (split "external") and read through the same cache and
preprocessing as the internal test split.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from core.errors import UserError
from data.cache import CacheSlot, open_cache
from data.dataset import GrayImageDataset
from data.manifest import Row, fingerprint_rows, list_classes, scan_folders, write_manifest
from evaluation.gates import check_gates
from evaluation.plots import evaluation_figures
from evaluation.record import log_evaluation_files
from evaluation.reports import flat_metrics, write_json, write_predictions, write_report
from evaluation.scoring import score_set

if TYPE_CHECKING:
    from core.config import Config
    from data.manifest import Split

EXTERNAL = "external"


@dataclass
class ExternalSet:
    root: Path
    rows: list[Row]  # path relative to root, cls = the model's class name, split "external"
    class_names: list[str]  # the model's, in its output order
    folders: dict[str, str]  # external folder -> the model's class
    unmapped: dict[str, int] = field(default_factory=dict)  # folder -> files in it, left out
    in_training: list[dict] = field(default_factory=list)  # {"path", "sha256", "training_split"}, left out
    scan_meta: dict = field(default_factory=dict)  # non_images, bad_files

    @property
    def fingerprint(self) -> str:
        return fingerprint_rows(self.rows)

    @property
    def name(self) -> str:
        """A folder-safe name of the external set (its folder's name)."""
        return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in self.root.name) or "external"

    def samples(self) -> tuple[list[Path], list[int]]:
        index = {c: i for i, c in enumerate(self.class_names)}
        return [self.root / r.path for r in self.rows], [index[r.cls] for r in self.rows]

    def meta(self) -> dict:
        return {"kind": EXTERNAL, "data_root": str(self.root), "fingerprint": self.fingerprint,
                "class_folders": sorted(self.folders), "folder_classes": self.folders,
                "sizes": dict(Counter(r.cls for r in self.rows)), "unmapped_folders": self.unmapped,
                "in_training_manifest": self.in_training, **self.scan_meta,
                "created": time.strftime("%Y-%m-%d %H:%M:%S")}


def read_class_map(path: str | Path) -> dict[str, str | None]:
    """A YAML (or JSON) mapping of external folder -> the model's class; null leaves a folder out on purpose."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise UserError(f"cannot read class map {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"class map {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or not all(isinstance(v, (str, type(None))) for v in data.values()):
        raise UserError(f"class map {path} must map folder names to class names (folder: class), e.g. "
                        "'glioma_tumor: glioma'")
    return {str(k): v for k, v in data.items()}


def map_folders(folders: list[str], class_names: list[str], training_folders: list[str],
                class_map: dict[str, str | None] | None) -> tuple[dict[str, str], list[str], list[str]]:
    """(folder -> class, unmapped folders, folders the map leaves out). A name matches a class's name or its
    training folder's, case aside; anything else is unmapped, not guessed."""
    known = {n.lower(): n for n in class_names}
    known.update({f.lower(): n for f, n in zip(training_folders, class_names)})
    mapping, unmapped, ignored = {}, [], []
    for folder in folders:
        target = (class_map or {}).get(folder, folder)
        if target is None:
            ignored.append(folder)
        elif target.lower() in known:
            mapping[folder] = known[target.lower()]
        elif class_map and folder in class_map:
            raise UserError(f"the class map sends folder {folder!r} to {target!r}, which is not a class of the "
                            f"model ({', '.join(class_names)})")
        else:
            unmapped.append(folder)
    return mapping, unmapped, ignored


def scan_external(path: str | Path, class_names: list[str], split: Split, class_map_path=None,
                  log=print) -> ExternalSet:
    """The external set: folders mapped, every image hashed and decoded, training images left out."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"external data set folder not found: {root}")
    folders = list_classes(root)
    if not folders:
        raise UserError(f"no class folders in {root} (expected one folder per class, as for training)")
    class_map = read_class_map(class_map_path) if class_map_path else None
    for missing in sorted(set(class_map or {}) - set(folders)):
        log(f"⚠️  the class map names folder {missing!r}, which is not in {root}")
    mapping, unmapped, ignored = map_folders(folders, class_names, split.class_folders, class_map)
    scan = scan_folders(root.resolve(), [root.resolve()], list(mapping))  # unmapped folders are only counted
    trained = {r.sha256: r.split for r in split.rows}
    rows, left_out = [], []
    for rel, folder, digest in scan.files:
        if digest in trained:
            left_out.append({"path": rel, "sha256": digest, "training_split": trained[digest]})
        else:
            rows.append(Row(rel, mapping[folder], EXTERNAL, digest))
    scan_meta = {"non_images": scan.non_images, "ignored_folders": ignored,
                 "bad_files": [{"path": p, "reason": r} for p, r in scan.bad_files]}
    counts = {f: sum(1 for p in (root / f).rglob("*") if p.is_file() and not p.name.startswith(".")) for f in unmapped}
    ext = ExternalSet(root.resolve(), rows, list(class_names), mapping, counts, left_out, scan_meta)
    report_external(ext, log)
    if not rows:
        raise UserError(f"no external images left to score in {root} (mapped folders: "
                        f"{', '.join(mapping) or 'none'}; pass --class-map FILE to map folders to classes)")
    return ext


def report_external(ext: ExternalSet, log=print) -> None:
    """What was mapped, left out and why: a reviewer reads this before any figure."""
    log(f"🌍 External set {ext.root}: {len(ext.rows)} images")
    for folder, cls in ext.folders.items():
        log(f"   {folder} -> {cls}")
    for folder, n in ext.unmapped.items():
        log(f"⚠️  folder {folder!r} ({n} files) matches no class of the model: left out (map it with --class-map)")
    for folder in ext.scan_meta["ignored_folders"]:
        log(f"   folder {folder!r}: left out by the class map")
    missing = [c for c in ext.class_names if c not in {r.cls for r in ext.rows}]
    if missing:
        log(f"⚠️  no external images of {', '.join(missing)}: their sensitivity is undefined here")
    if ext.in_training:
        where = Counter(item["training_split"] for item in ext.in_training)
        log(f"⚠️  {len(ext.in_training)} image(s) are byte-identical to images of the training manifest ("
            + ", ".join(f"{s} {n}" for s, n in sorted(where.items())) + "): flagged and left out")
    if ext.scan_meta["bad_files"]:
        log(f"⚠️  left out {len(ext.scan_meta['bad_files'])} unreadable image(s), e.g. "
            f"{ext.scan_meta['bad_files'][0]['path']}: {ext.scan_meta['bad_files'][0]['reason']}")


def write_external_manifest(ext: ExternalSet, out_dir: Path) -> Path:
    path = out_dir / "external_manifest.csv"
    write_manifest(path, ext.rows, ext.meta())
    return path


def external_dataset(cfg: Config, ext: ExternalSet, img_size: int) -> GrayImageDataset:
    """The external rows through the same cache (when dataset.cache is on) and loader as a split."""
    paths, labels = ext.samples()
    cache = None
    if cfg.dataset.cache:
        slot = CacheSlot(Path(cfg.dataset.cache_dir), ext.fingerprint, EXTERNAL, img_size)
        cache = open_cache(slot, paths, [r.path for r in ext.rows])
    return GrayImageDataset(paths, labels, img_size, cache)


@dataclass
class ExternalRequest:
    """evaluate.py --external PATH [--class-map FILE] and the gate options it shares with the internal run."""
    path: str
    class_map: str | None = None
    medical_validation: bool = False  # the verdict decides the exit code (it is recorded either way)
    strict: bool = False


@dataclass
class ExternalResult:
    record: dict
    validation: dict  # medical_validation.json: the gates on the external figures, recorded as for the test split
    out_dir: Path


def validate_external(cfg: Config, opened, model, device, request: ExternalRequest, tracker=None) -> ExternalResult:
    """Score the external set as the test split is scored (evaluation.scoring.score_set) and write the internal
    evaluation's files, marked external, into {checkpoint folder}/external_{name}/, the gate verdict included; log
    them (metrics prefixed external_) to the evaluation's run."""
    ext = scan_external(request.path, opened.class_names, opened.split, request.class_map)
    out_dir = opened.path.parent / f"external_{ext.name}"
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = write_external_manifest(ext, out_dir)
    dataset = external_dataset(cfg, ext, opened.contract.img_size)
    s = score_set(cfg, opened, model, dataset, device, EXTERNAL)
    record = s.record
    mark_external(record, opened, ext, manifest)
    validation = check_gates(record, cfg.evaluation.gates, request.strict)
    files = [manifest, manifest.with_suffix(".json"), write_json(out_dir / "evaluation_metrics.json", record),
             write_predictions(out_dir / "predictions.csv", [r.path for r in ext.rows], s.y_true, s.y_prob,
                               opened.class_names),
             write_report(out_dir / "evaluation_report.txt", record, validation),
             write_json(out_dir / "medical_validation.json", validation),
             *evaluation_figures(out_dir, record, s.y_true, s.y_prob, s.bins, None)]
    if tracker is not None:
        log_external(tracker, record, validation, files, ext.name)
    return ExternalResult(record, validation, out_dir)


def mark_external(record: dict, opened, ext: ExternalSet, manifest: Path) -> None:
    """An evaluation record made external: its manifest and fingerprint, what was mapped and left out. Class
    imbalance stays the training split's, as the internal gates judge it."""
    record.update(kind=EXTERNAL, split_manifest=str(manifest), data_fingerprint=ext.fingerprint,
                  external={"path": str(ext.root), "folder_classes": ext.folders, "unmapped_folders": ext.unmapped,
                            "left_out_in_training_manifest": len(ext.in_training),
                            "left_out_unreadable": len(ext.scan_meta["bad_files"]),
                            "training_manifest": str(opened.split.manifest_path)})


def log_external(tracker, record: dict, validation: dict, files: list[Path], name: str) -> None:
    tracker.log_metrics(flat_metrics(record, prefix="external_"))
    tracker.set_tags({"external_path": record["external"]["path"], "external_n": record["n_test"],
                      "external_fingerprint": record["data_fingerprint"],
                      "external_deployment_ready": validation["deployment_ready"]})
    log_evaluation_files(tracker, files, f"evaluation/external_{name}")
