"""What an archive run scores: the image and DICOM files under roots, or listed in a manifest (CSV)."""
from __future__ import annotations

import csv
import os
from pathlib import Path

from core.errors import UserError
from data.images import image_files, split_frame_name


def manifest_files(manifest: Path, root: Path | None = None) -> list[Path]:
    """The files a CSV lists in its `path` column (a split manifest, or any list): relative paths are taken from
    `root` (default: the CSV's folder); a frame record (scan.dcm#frame=3) stands for its file, scored whole."""
    root = Path(root) if root is not None else manifest.parent
    try:
        with open(manifest, newline="") as fh:
            reader = csv.DictReader(fh)
            if "path" not in (reader.fieldnames or []):
                columns = ", ".join(reader.fieldnames or [])
                raise UserError(f"--manifest {manifest}: no 'path' column (columns: {columns})")
            names = [row["path"] for row in reader if row.get("path")]
    except OSError as exc:
        raise UserError(f"--manifest {manifest}: {exc.strerror or exc}") from None
    return [p if p.is_absolute() else root / p for p in (split_frame_name(n)[0] for n in names)]


def list_inputs(roots: list[str], manifest: str | None = None, manifest_root: str | None = None) -> list[str]:
    """Absolute paths, each once, in the order given (folders sorted); a missing root is a user error."""
    missing = [r for r in roots if not Path(r).exists()]
    if missing:
        raise UserError(f"--root {missing[0]}: no such file or folder")
    paths = image_files(roots)
    if manifest:
        paths += manifest_files(Path(manifest), Path(manifest_root) if manifest_root else None)
    return list(dict.fromkeys(os.path.abspath(p) for p in paths))
