"""Writes that cannot tear or collide: a unique temporary file in the target folder, fsync, rename.

Readers see the old file or the new one, never half of one; two writers of the same path never
share a temporary name; a failed write leaves no temporary file behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb", newline: str | None = None) -> Iterator[IO]:
    """Open a unique temporary file beside `path`; on a clean exit it is synced and renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, newline=newline) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())  # the data is on disk before the rename makes it visible
        os.replace(tmp, path)
        _sync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _sync_dir(folder: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[IO], object], mode: str = "wb") -> Path:
    """Call write(file) on a temporary file, then put it in place atomically."""
    with atomic_file(path, mode) as fh:
        write(fh)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda fh: fh.write(text), mode="w")


def write_json_atomic(path: str | Path, obj, indent: int = 2) -> Path:
    """JSON, strict (no NaN), atomically: readers such as run_experiments.py never see half a file."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")
