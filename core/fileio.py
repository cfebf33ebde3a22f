"""Writes that cannot tear or collide: a unique temporary file in the target folder, fsync, rename.

Readers see the old file or the new one, never half of one; two writers of the same path never
share a temporary name; a failed write leaves no temporary file behind. A file that holds decoded
patient pixels is written `private` (owner read/write only); others get the usual umask mode.
A FolderLock keeps a second writer of a whole output folder (a second train.py) out.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; FolderLock then guards nothing
    fcntl = None

from core.errors import UserError


def _read_umask() -> int:
    """The process umask; from /proc where it can be read without changing it (threads may be creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()
PRIVATE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb", newline: str | None = None,
                private: bool = False, sync: bool = True) -> Iterator[IO]:
    """Open a unique temporary file beside `path`; on a clean exit it is synced and renamed onto `path`.

    sync=False skips the per-file fsync for bulk writers that sync once at the end (see sync_all)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
    try:
        if not private and hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~_UMASK)  # what open() would have given it
        with os.fdopen(fd, mode, newline=newline) as fh:
            yield fh
            fh.flush()
            if sync:
                os.fsync(fh.fileno())  # the data is on disk before the rename makes it visible
        os.replace(tmp, path)
        if sync:
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


def sync_all() -> None:
    """Everything written so far on disk (one sync for many files written with sync=False)."""
    if hasattr(os, "sync"):
        os.sync()


def atomic_write(path: str | Path, write: Callable[[IO], object], mode: str = "wb", private: bool = False,
                 sync: bool = True) -> Path:
    """Call write(file) on a temporary file, then put it in place atomically."""
    with atomic_file(path, mode, private=private, sync=sync) as fh:
        write(fh)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda fh: fh.write(text), mode="w")


def write_json_atomic(path: str | Path, obj, indent: int = 2) -> Path:
    """JSON, strict (no NaN), atomically: readers such as run_experiments.py never see half a file."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")


def publish(tmp: str | Path, path: str | Path) -> Path:
    """Put a finished temporary file (written in path's folder) in place: fsync, rename, sync the folder."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _sync_dir(Path(path).parent)
    return Path(path)


def temporary_path(path: str | Path) -> Path:
    """A unique, not yet existing name beside `path`, with its suffix (for writers that want a file name)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def private_dir(path: str | Path) -> Path:
    """A folder for files with patient pixels: created owner-only (an existing folder keeps its mode)."""
    path = Path(path)
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    return path


class FolderBusy(UserError):
    """Another process holds the folder's lock."""


class FolderLock:
    """An exclusive lock on a folder for the life of this object's holder (released on exit, also on kill -9).

    The lock file records who holds it (pid, host, start time, command), so a refused writer can say so."""

    NAME = ".lock"

    def __init__(self, folder: str | Path, what: str):
        self.folder, self.what = Path(folder), what
        self._fh: IO | None = None

    @property
    def path(self) -> Path:
        return self.folder / self.NAME

    def acquire(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return self
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read()
            fh.close()
            raise FolderBusy(f"{self.folder} is in use by {describe_holder(holder)}; wait for it to finish, "
                             f"or write elsewhere (e.g. --set train.output_dir=DIR)") from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"what": self.what, "pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}))
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the file releases the lock
            self._fh = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def describe_holder(text: str) -> str:
    """'train.py (pid 123 on host, started ...)' from a lock file's content."""
    try:
        h = json.loads(text)
        return f"{h['what']} (pid {h['pid']} on {h['host']}, started {h['started']})"
    except (ValueError, KeyError, TypeError):
        return "another process (it has not said who it is yet)"


def process_temp_dir(prefix: str) -> Path:
    """A new private (0700) temporary folder named for this process ("{prefix}{pid}-..."). Those a process of the
    same prefix left behind when it died without cleaning up (kill -9, power loss) are removed first, so that a
    server's model copies and uploads do not pile up in the temp folder. Never another living process's folder,
    never another user's."""
    root = Path(tempfile.gettempdir())
    for old in root.glob(prefix + "*"):
        owner = old.name.removeprefix(prefix).split("-")[0]
        with contextlib.suppress(OSError, KeyError):  # gone meanwhile, or a uid without a name
            if old.is_dir() and old.stat().st_uid == os.getuid() and not (owner.isdigit() and pid_alive(int(owner))):
                shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
