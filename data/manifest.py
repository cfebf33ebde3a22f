"""Scan an ImageFolder tree, make the split manifest once, and check the disk against it later.

Manifest: CSV with columns path (relative to the data root), class, split, sha256; a JSON beside it
records the settings, the files left out (with reasons) and the fingerprint.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from core.errors import UserError
from core.fileio import atomic_file, write_json_atomic
from core.hardware import usable_cpus
from data.dicom_records import inspect_dicom
from data.images import ImageReadError, is_dicom, is_image_file, open_image, split_frame_name
from data.split import SPLITS, assign_splits, group_items

if TYPE_CHECKING:
    from core.config import Config

MANIFEST_COLUMNS = ("path", "class", "split", "sha256")


@dataclass(frozen=True)
class Row:
    path: str
    cls: str
    split: str
    sha256: str


@dataclass
class ScanResult:
    # (record, class folder, sha256 of its file); a record is a relpath, or relpath#frame=K of a multi-frame DICOM
    files: list[tuple[str, str, str]] = field(default_factory=list)
    non_images: list[str] = field(default_factory=list)
    bad_files: list[tuple[str, str]] = field(default_factory=list)  # (relpath, reason)
    series: dict[str, str] = field(default_factory=dict)  # record -> DICOM SeriesInstanceUID


@dataclass
class Split:
    """The split every stage uses: rows of the manifest plus what they mean."""

    root: Path
    manifest_path: Path
    rows: list[Row]
    class_folders: list[str]
    class_names: list[str]
    fingerprint: str
    meta: dict

    def rows_for(self, split: str) -> list[Row]:
        return [r for r in self.rows if r.split == split]

    def samples(self, split: str) -> tuple[list[Path], list[int]]:
        index = {c: i for i, c in enumerate(self.class_folders)}
        rows = self.rows_for(split)
        return [self.root / r.path for r in rows], [index[r.cls] for r in rows]

    def sizes(self) -> dict[str, int]:
        return {s: len(self.rows_for(s)) for s in SPLITS}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def list_classes(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _walk(folder: Path, root: Path, classes: list[str], result: ScanResult) -> list[tuple[str, str]]:
    candidates = []
    for cls in classes:
        cls_dir = folder / cls
        if not cls_dir.is_dir():
            raise UserError(f"class folder missing: {cls_dir} (every data folder needs the same class folders)")
        for dirpath, dirnames, filenames in os.walk(cls_dir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                rel = (Path(dirpath) / name).relative_to(root).as_posix()
                if name.startswith(".") or not (is_image_file(name) or is_dicom(name)):
                    result.non_images.append(rel)
                else:
                    candidates.append((rel, cls))
    return candidates


def scan_folders(root: Path, folders: list[Path], classes: list[str], validate: set[str] | None = None,
                 progress: bool = True) -> ScanResult:
    """Hash every image file; decode those in `validate` (None: all) to catch corrupt ones. A DICOM file gives
    one record per frame, with its series."""
    result = ScanResult()
    candidates = [c for f in folders for c in _walk(f, root, classes, result)]

    def check(item):
        rel, cls = item
        path = root / rel
        decode = validate is None or rel in validate
        try:
            digest = sha256_file(path)
            if is_dicom(path):
                return rel, cls, digest, inspect_dicom(path, decode), None
            if decode:
                open_image(path, size=1)  # a JPEG at its smallest DCT scale: every byte still decoded, ~30% faster
            return rel, cls, digest, None, None
        except (ImageReadError, OSError) as exc:
            return rel, cls, None, None, str(exc).replace(str(path) + ": ", "")

    workers = min(8, usable_cpus())
    with ThreadPoolExecutor(workers) as pool:  # PIL decoding and hashing release the GIL
        it = pool.map(check, candidates)
        for rel, cls, digest, dicom, error in tqdm(it, total=len(candidates), desc="Scanning images",
                                                  disable=not progress, leave=False):
            if error is not None:
                result.bad_files.append((rel, error))
                continue
            for record in dicom.record_names(rel) if dicom else [rel]:
                result.files.append((record, cls, digest))
                if dicom and dicom.series_uid:
                    result.series[record] = dicom.series_uid
    return result


def fingerprint_rows(rows: list[Row]) -> str:
    h = hashlib.sha256()
    for r in sorted(rows, key=lambda r: r.path):
        h.update(f"{r.path}\t{r.cls}\t{r.split}\t{r.sha256}\n".encode())
    return h.hexdigest()[:16]


def write_manifest(path: Path, rows: list[Row], meta: dict) -> None:
    write_json_atomic(path.with_suffix(".json"), meta)
    with atomic_file(path, "w", newline="") as fh:  # the CSV last: a manifest without its JSON is never left
        writer = csv.writer(fh)
        writer.writerow(MANIFEST_COLUMNS)
        for r in rows:
            writer.writerow((r.path, r.cls, r.split, r.sha256))


def read_manifest(path: str | Path) -> tuple[list[Row], dict]:
    path = Path(path)
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            if tuple(reader.fieldnames or ()) != MANIFEST_COLUMNS:
                raise UserError(f"{path} is not a split manifest (columns {reader.fieldnames})")
            rows = [Row(r["path"], r["class"], r["split"], r["sha256"]) for r in reader]
        meta = json.loads(path.with_suffix(".json").read_text())
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise UserError(f"cannot read split manifest {path}: {exc}") from None
    return rows, meta


def split_settings(cfg: Config) -> dict:
    """What identifies one split: data set location, seed, ratios, grouping."""
    ds = cfg.dataset
    return {
        "path": str(Path(ds.path).resolve()),
        "test_path": str(Path(ds.test_path).resolve()) if ds.test_path else None,
        "seed": ds.seed,
        "ratios": [ds.train_split, ds.val_split, ds.test_split],
        "group_pattern": ds.group_pattern,
        # A regenerated demo set with other settings is another data set, not a changed one.
        "demo": ([cfg.demo.n_per_class, cfg.demo.size, cfg.demo.seed]
                 + ([cfg.demo.format] if cfg.demo.format != "jpeg" else [])) if ds.demo else None,
        # only when off: manifests written before the setting existed keep their names
        **({} if ds.group_dicom_series else {"group_dicom_series": False}),
    }


def manifest_path_for(cfg: Config) -> Path:
    key = hashlib.sha256(json.dumps(split_settings(cfg), sort_keys=True).encode()).hexdigest()[:10]
    name = Path(cfg.dataset.path).resolve().name.replace(" ", "_")
    return Path(cfg.dataset.manifest_dir) / f"split_manifest_{name}_seed{cfg.dataset.seed}_{key}.csv"


def _data_folders(cfg: Config) -> tuple[Path, list[Path]]:
    ds = cfg.dataset
    if ds.demo:
        from data.synthetic import ensure_demo_dataset

        ensure_demo_dataset(cfg.demo.root, cfg.demo.n_per_class, cfg.demo.size, cfg.demo.seed, cfg.demo.format)
    folders = [Path(ds.path)] + ([Path(ds.test_path)] if ds.test_path else [])
    for f in folders:
        if not f.is_dir():
            raise UserError(f"data set folder not found: {f} (set dataset.path in the config, or try --demo)")
    root = Path(os.path.commonpath([str(f.resolve()) for f in folders])) if ds.test_path else folders[0].resolve()
    return root, folders


def create_split(cfg: Config, log=print) -> Split:
    root, folders = _data_folders(cfg)
    classes = list_classes(folders[0])
    if not classes:
        raise UserError(f"no class folders in {folders[0]} (expected one folder per class)")
    scan = scan_folders(root, [f.resolve() for f in folders], classes)
    if not scan.files:
        raise UserError(f"no readable images in {folders[0]}")
    ds = cfg.dataset
    rels = [f[0] for f in scan.files]
    hashes = [f[2] for f in scan.files]
    series = [scan.series.get(r) for r in rels] if ds.group_dicom_series else None
    groups = group_items([split_frame_name(r)[0].name for r in rels], hashes, ds.group_pattern, series)
    labels = [f[1] for f in scan.files]
    if ds.test_path:
        # The shipped test folder is the test split; the rest is split into train/val by their ratio.
        test_root = Path(ds.test_path).resolve().relative_to(root).as_posix() + "/"
        is_test = [r.startswith(test_root) for r in rels]
        tv = ds.train_split + ds.val_split
        ratios = (ds.train_split / tv, ds.val_split / tv, 0.0)
        idx = [i for i, t in enumerate(is_test) if not t]
        sub = assign_splits([labels[i] for i in idx], [groups[i] for i in idx], ratios, ds.seed)
        splits = ["test"] * len(rels)
        for i, s in zip(idx, sub):
            splits[i] = s
        straddle = {groups[i] for i in range(len(rels)) if is_test[i]} & {groups[i] for i in idx}
        if straddle:
            log(f"⚠️  {len(straddle)} duplicate group(s) appear in both the shipped test folder and the training folder")
    else:
        splits = assign_splits(labels, groups, (ds.train_split, ds.val_split, ds.test_split), ds.seed)
    rows = [Row(rel, cls, s, h) for rel, cls, s, h in zip(rels, labels, splits, hashes)]
    group_sizes: dict[int, int] = {}
    for g in groups:
        group_sizes[g] = group_sizes.get(g, 0) + 1
    multi = sum(1 for n in group_sizes.values() if n > 1)
    meta = {
        "settings": split_settings(cfg),
        "data_root": str(root),
        "class_folders": classes,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "fingerprint": fingerprint_rows(rows),
        "sizes": {s: splits.count(s) for s in SPLITS},
        "multi_image_groups": multi,
        "dicom_series": len(set(scan.series.values())),
        "non_images": scan.non_images,
        "bad_files": [{"path": p, "reason": r} for p, r in scan.bad_files],
    }
    path = manifest_path_for(cfg)
    write_manifest(path, rows, meta)
    log(f"🗂️  New split manifest: {path}")
    log(f"   {len(rows)} images, {multi} group(s) of duplicate/same-subject images kept within one split"
        + (f" ({meta['dicom_series']} DICOM series{'' if ds.group_dicom_series else ', not grouped'})"
           if scan.series else ""))
    _report_skipped(meta, log, detail=True)
    return _as_split(root, path, rows, meta, cfg)


def _report_skipped(meta: dict, log, detail: bool) -> None:
    if meta["non_images"]:
        log(f"   skipped {len(meta['non_images'])} non-image file(s)")
    if meta["bad_files"]:
        log(f"⚠️  left out {len(meta['bad_files'])} unreadable image(s):")
        for item in meta["bad_files"][: None if detail else 5]:
            log(f"     {item['path']}: {item['reason']}")


def _as_split(root: Path, path: Path, rows: list[Row], meta: dict, cfg: Config) -> Split:
    folders = meta["class_folders"]
    expected = cfg.dataset.num_classes
    if expected is not None and expected != len(folders):
        raise UserError(f"dataset.num_classes is {expected}, but {root} has {len(folders)} class folder(s): "
                        f"{', '.join(folders)}")
    names = [cfg.dataset.class_names.get(c, c) for c in folders]
    return Split(root, path, rows, folders, names, meta["fingerprint"], meta)


def compare_with_disk(root: Path, folders: list[Path], rows: list[Row], meta: dict) -> dict[str, list[str]]:
    """Files added, removed or changed since the manifest was written (left-out files excepted)."""
    known = {split_frame_name(r.path)[0].as_posix(): r.sha256 for r in rows}  # frames of a file: the file
    excluded = set(meta["non_images"]) | {b["path"] for b in meta["bad_files"]}
    # Only files that are new to us are decoded; known ones are checked by hash.
    scan = scan_folders(root, [f.resolve() for f in folders], meta["class_folders"], validate=set(), progress=False)
    on_disk = {split_frame_name(rel)[0].as_posix(): digest for rel, _, digest in scan.files}
    on_disk.update({rel: "" for rel, _ in scan.bad_files})
    added = sorted(p for p in on_disk if p not in known and p not in excluded)
    removed = sorted(p for p in known if p not in on_disk)
    changed = sorted(p for p, h in known.items() if p in on_disk and on_disk[p] != h)
    return {"added": added, "removed": removed, "changed": changed}


def prepare_split(cfg: Config, resplit: bool = False, log=print) -> Split:
    """The split for this config: read and check the manifest, or make it once."""
    path = manifest_path_for(cfg)
    if resplit or not path.exists():
        if resplit and path.exists():
            log(f"Re-splitting as asked: replacing {path}")
        return create_split(cfg, log)
    rows, meta = read_manifest(path)
    root, folders = _data_folders(cfg)
    diff = compare_with_disk(root, folders, rows, meta)
    if any(diff.values()):
        summary = ", ".join(f"{len(v)} {k}" for k, v in diff.items() if v)
        example = next(v[0] for v in diff.values() if v)
        raise UserError(f"data set no longer matches split manifest {path}: {summary} (e.g. {example}); "
                        f"pass --resplit to make a new split")
    log(f"🗂️  Split manifest: {path} (fingerprint {meta['fingerprint']})")
    _report_skipped(meta, log, detail=False)
    return _as_split(root, path, rows, meta, cfg)
