"""The spool: results wait on disk until the destination has acknowledged them.

One folder per destination:
    incoming/<job>.dcm  a received instance, classified, whose results are not made yet; <job>.json (its
                        prediction records) is written last: the sender's C-STORE is answered after it, and
                        a .dcm without it (never acknowledged) is removed on restart
    pending/<uid>.dcm   a result, by SOP Instance UID, written atomically before anything is sent
    sent/<uid>          an empty marker written once the destination answered success; a result whose UID
                        is known here (pending, sent or failed) is never queued again: nothing is sent twice
    failed/<name>.dcm   a result the destination kept refusing, or a job whose results could not be made,
                        with <name>.reason.json saying why (kept for a person; move it back to retry)
Everything survives a crash or `kill -9`. One process sends from a spool at a time (a lock on the folder).
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import UID

from core.config import DicomPeer
from core.errors import UserError
from core.fileio import atomic_file, private_dir, publish, write_json_atomic, write_text_atomic


def destination_key(destination: DicomPeer) -> str:
    """A folder name for a destination: results for one PACS never leave for another."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{destination.ae_title}@{destination.host}_{destination.port}")


def checked_uid(value) -> str:
    uid = str(value)
    if not UID(uid).is_valid:
        raise ValueError(f"not a valid SOP Instance UID: {uid[:70]!r}")
    return uid


class Spool:
    def __init__(self, root: str | Path, destination: DicomPeer):
        self.destination = destination
        self.dir = Path(root) / destination_key(destination)
        self.incoming_dir, self.pending_dir, self.sent_dir, self.failed_dir = (
            self.dir / n for n in ("incoming", "pending", "sent", "failed"))
        for folder in (self.incoming_dir, self.pending_dir, self.sent_dir, self.failed_dir):
            private_dir(folder)  # instances and results hold patient pixels
        self._lock = threading.Lock()
        self._lock_fd: int | None = None

    def acquire(self) -> Spool:
        """Take the folder for this process (a second sender on the same spool would send twice), then clean up
        after a crash: only under the lock, so that another running process never loses a file in progress."""
        import fcntl

        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"the spool {self.dir} is in use by another process (a running receiver sends "
                            "from it)") from None
        self._lock_fd = fd
        self.recover()
        return self

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the lock
            self._lock_fd = None

    def recover(self) -> None:
        """After a crash: drop pending copies of results already marked sent, instances that were never
        acknowledged, and half-written files."""
        for path in self.pending_dir.glob("*.dcm"):
            if (self.sent_dir / path.stem).exists():
                path.unlink(missing_ok=True)
        for path in self.incoming_dir.glob("*.dcm"):
            if not path.with_suffix(".json").exists():
                path.unlink(missing_ok=True)
        for folder in (self.incoming_dir, self.pending_dir):
            for stale in folder.glob(".*"):
                stale.unlink(missing_ok=True)

    def add_job(self, path: Path, records: list[dict]) -> str:
        """Keep a classified instance (the file at `path`, in incoming/, is moved) until its results are made."""
        name = f"job-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"  # arrival order, never a sender's name
        publish(path, self.incoming_dir / f"{name}.dcm")
        write_json_atomic(self.incoming_dir / f"{name}.json", records)  # the commit point
        return name

    def jobs(self) -> list[str]:
        return sorted(p.stem for p in self.incoming_dir.glob("job-*.json"))

    def job(self, name: str) -> tuple[Path, list[dict]]:
        return self.incoming_dir / f"{name}.dcm", json.loads((self.incoming_dir / f"{name}.json").read_text())

    def finish_job(self, name: str) -> None:
        (self.incoming_dir / f"{name}.json").unlink(missing_ok=True)  # first: a lone .dcm is removed on restart
        (self.incoming_dir / f"{name}.dcm").unlink(missing_ok=True)

    def fail_job(self, name: str, reason: str) -> Path:
        os.replace(self.incoming_dir / f"{name}.json", self.failed_dir / f"{name}.json")
        return self._set_aside(self.incoming_dir / f"{name}.dcm", name, reason)

    def known(self, uid: str) -> bool:
        """Pending, sent, or given up on (a person decides about failed/: move a file to pending/ to retry)."""
        return any(p.exists() for p in (self.sent_dir / uid, self.pending_dir / f"{uid}.dcm",
                                        self.failed_dir / f"{uid}.dcm"))

    def put(self, ds: Dataset) -> bool:
        """Queue a result; False when its SOP Instance UID is already known to this spool."""
        uid = checked_uid(ds.SOPInstanceUID)
        with self._lock:
            if self.known(uid):
                return False
            with atomic_file(self.pending_dir / f"{uid}.dcm", private=True) as fh:
                ds.save_as(fh, enforce_file_format=True)
        return True

    def pending(self) -> list[Path]:
        """Pending results, oldest first."""
        files = [p for p in self.pending_dir.glob("*.dcm") if not (self.sent_dir / p.stem).exists()]
        return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))

    def mark_sent(self, uid: str) -> None:
        write_text_atomic(self.sent_dir / uid, "")  # the marker first: a crash now cannot cause a resend
        (self.pending_dir / f"{uid}.dcm").unlink(missing_ok=True)

    def mark_failed(self, uid: str, reason: str) -> Path:
        return self._set_aside(self.pending_dir / f"{uid}.dcm", uid, reason)

    def _set_aside(self, path: Path, name: str, reason: str) -> Path:
        write_json_atomic(self.failed_dir / f"{name}.reason.json",
                          {"name": name, "reason": reason, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        target = self.failed_dir / f"{name}.dcm"
        os.replace(path, target)
        return target

    def failure_reason(self, name: str) -> str | None:
        path = self.failed_dir / f"{name}.reason.json"
        return json.loads(path.read_text())["reason"] if path.exists() else None
