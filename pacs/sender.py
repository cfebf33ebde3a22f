"""The C-STORE sender (SCU) and the forwarder that empties the spool into the destination, with back-off.

A result leaves the spool only when the destination answered success (or a warning: stored); a refused
object is tried again up to `pacs.retry.max_attempts` times, then kept in the spool's failed/ folder. A
destination that is down is retried forever, waiting initial_s, 2 x initial_s, ... up to max_s between tries.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.status import code_to_category

from core.config import DicomPeer, PacsSection
from pacs.spool import Spool
from pacs.worker import Worker

LOG = logging.getLogger(__name__)
BATCH = 32  # objects per association


@dataclass
class StoreOutcome:
    statuses: dict[str, int] = field(default_factory=dict)  # SOP Instance UID -> C-STORE status
    error: str | None = None  # why the association failed or broke (the objects without a status were not sent)


def stored(status: int) -> bool:
    """Success, or a warning (coercion, elements discarded): the destination has the object."""
    return code_to_category(status) in ("Success", "Warning")


def store_files(files: list[Path], destination: DicomPeer, calling_ae: str, timeout: float) -> StoreOutcome:
    """C-STORE each file over one association."""
    datasets = [dcmread(f) for f in files]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    outcome = StoreOutcome()
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        outcome.error = f"association with {destination} {'rejected' if assoc.is_rejected else 'failed'}"
        return outcome
    try:
        for ds in datasets:
            answer = assoc.send_c_store(ds)
            if "Status" not in answer:
                outcome.error = f"no answer from {destination} (connection lost or timed out)"
                break
            outcome.statuses[str(ds.SOPInstanceUID)] = int(answer.Status)
    finally:
        if assoc.is_established:
            assoc.release()
        else:
            assoc.abort()
    return outcome


@dataclass
class SendReport:
    sent: int = 0
    refused: int = 0
    given_up: int = 0
    remaining: int = 0
    error: str | None = None


class Forwarder(Worker):
    """Sends what the spool holds: as a thread (`start`, `kick` when something was queued, `stop`), or once
    (`send_pending`)."""

    name = "pacs-forwarder"

    def __init__(self, spool: Spool, settings: PacsSection, store=store_files):
        super().__init__()
        self.spool, self.settings, self.store = spool, settings, store
        self.attempts: dict[str, int] = {}
        self.failures = 0  # tries in a row that left something unsent

    def send_pending(self) -> SendReport:
        report = SendReport()
        files = self.spool.pending()
        for start in range(0, len(files), BATCH):
            batch = files[start:start + BATCH]
            outcome = self.store(batch, self.spool.destination, self.settings.ae_title, self.settings.timeout_s)
            for uid, status in outcome.statuses.items():
                self._settle(uid, status, report)
            if outcome.error:
                report.error = outcome.error
                break
        report.remaining = len(self.spool.pending())
        return report

    def _settle(self, uid: str, status: int, report: SendReport) -> None:
        if stored(status):
            self.spool.mark_sent(uid)
            self.attempts.pop(uid, None)
            report.sent += 1
            return
        report.refused += 1
        self.attempts[uid] = self.attempts.get(uid, 0) + 1
        limit = self.settings.retry.max_attempts
        LOG.warning("%s refused %s with status 0x%04X (try %d)", self.spool.destination, uid, status,
                    self.attempts[uid])
        if limit and self.attempts[uid] >= limit:
            kept = self.spool.mark_failed(uid, f"refused with status 0x{status:04X} {self.attempts[uid]} times")
            LOG.error("gave up sending %s to %s; kept in %s", uid, self.spool.destination, kept)
            self.attempts.pop(uid)
            report.given_up += 1

    def start(self) -> Forwarder:
        self.spool.acquire()
        return super().start()

    def stop(self, timeout: float | None = None) -> None:
        super().stop(timeout)
        self.spool.release()

    def step(self) -> float | None:
        try:
            report = self.send_pending()
        except Exception as exc:  # noqa: BLE001 - an unreadable spool file must not stop the sender
            LOG.exception("sending the spool to %s failed", self.spool.destination)
            report = SendReport(remaining=1, error=str(exc))
        if report.sent and self.failures:
            LOG.info("%s reachable again: %d result(s) sent", self.spool.destination, report.sent)
        if not report.remaining:
            self.failures = 0
            return None
        self.failures += 1
        delay = min(self.settings.retry.initial_s * 2 ** (self.failures - 1), self.settings.retry.max_s)
        if report.error:
            LOG.warning("%s; %d result(s) wait in %s, next try in %.1f s", report.error, report.remaining,
                        self.spool.dir, delay)
        return delay
