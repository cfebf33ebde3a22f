"""The DICOM receiver: a pynetdicom Storage SCP beside the HTTP server.

It admits only the configured AE@HOST peers (A-ASSOCIATE-RJ "calling AE title not recognized" otherwise),
takes MR and secondary-capture images within the size caps, answers every other storage SOP class with
0x0122 "SOP class not supported", and hands each accepted instance, patient name and birth date removed
unless `pacs.keep_patient_identity`, to `on_instance(dataset, calling_ae, peer)`. The C-STORE response is
sent after on_instance returns, so an acknowledged image has been classified and its results spooled.
A failure in one instance costs that instance a failure status, never the receiver.
"""
from __future__ import annotations

import contextlib
import io
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from weakref import WeakKeyDictionary

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import (
    EnhancedMRImageStorage,
    MRImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameSingleBitSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
    Verification,
)

from core.config import DicomPeer, PacsSection
from core.errors import UserError
from data.dicom_records import strip_identity
from data.images import ImageReadError, current_limits, frame_count, inflated_size

LOG = logging.getLogger(__name__)

IMAGE_SOP_CLASSES = (
    MRImageStorage, EnhancedMRImageStorage, SecondaryCaptureImageStorage,
    MultiFrameSingleBitSecondaryCaptureImageStorage, MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage, MultiFrameTrueColorSecondaryCaptureImageStorage,
)
UNCOMPRESSED = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2")
COMPRESSED = (
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203", "1.2.840.10008.1.2.5",
)
# C-STORE statuses (PS3.4 B.2.3, PS3.7 C).
SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
# A-ASSOCIATE-RJ: rejected-permanent, by the service user, calling AE title not recognized.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)

OnInstance = Callable[[Dataset, str, str], object]
# on_release(series): the sender released an association that delivered instances of these (study, series) UIDs.
OnRelease = Callable[[list[tuple[str, str]]], object]


def image_transfer_syntaxes() -> list[str]:
    """The transfer syntaxes accepted for images: uncompressed, plus every codec pydicom can decode here."""
    from pydicom.pixels import get_decoder

    decodable = []
    for uid in COMPRESSED:
        try:
            if get_decoder(uid).is_available:
                decodable.append(uid)
        except NotImplementedError:
            continue
    return list(UNCOMPRESSED) + decodable


class OneLine(logging.Filter):
    """Escapes what a peer could use to forge log lines (newlines, escape sequences, other control characters) in a
    record's message: pynetdicom logs the UIDs a peer sends as they came."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.isprintable():
            record.msg = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in message)
            record.args = ()
        return True


def keep_library_logs_one_line() -> None:
    """OneLine on every pynetdicom logger (a filter on a logger does not reach its children's records)."""
    names = [n for n in logging.Logger.manager.loggerDict if n == "pynetdicom" or n.startswith("pynetdicom.")]
    for logger in map(logging.getLogger, ["pynetdicom", *names]):
        if not any(isinstance(f, OneLine) for f in logger.filters):
            logger.addFilter(OneLine())


def _ip(text: str) -> str:
    """An address in one spelling: IPv4-mapped IPv6 (::ffff:10.0.0.5) becomes 10.0.0.5."""
    try:
        address = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return text
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


class AllowList:
    """Calling AE title + source address pairs. Host names are resolved when the receiver starts, and again when an
    address it does not know calls (at most every `refresh_s`): a peer that started later (a container whose name
    did not resolve yet) or that came back at another address is admitted without a restart."""

    def __init__(self, peers: list[DicomPeer], refresh_s: float = 30.0):
        self.peers, self.refresh_s = peers, refresh_s
        self.pairs: set[tuple[str, str]] = set()
        self._resolved_at = -float("inf")
        self._lock = threading.Lock()
        self.resolve()

    def resolve(self) -> None:
        pairs = set()
        for peer in self.peers:
            try:
                infos = socket.getaddrinfo(peer.host, None)
            except OSError as exc:
                LOG.warning("DICOM allow list: cannot resolve %s (%s); it admits no one until it resolves", peer, exc)
                continue
            pairs.update((peer.ae_title, _ip(info[4][0])) for info in infos)
        self.pairs, self._resolved_at = pairs, time.monotonic()

    def knows(self, address: str) -> bool:
        """Whether an allowed peer has this address (names resolved again, at most every refresh_s, if not)."""
        address = _ip(address)
        if any(a == address for _, a in self.pairs):
            return True
        with self._lock:
            if time.monotonic() - self._resolved_at >= self.refresh_s:
                self.resolve()
        return any(a == address for _, a in self.pairs)

    def admits(self, ae_title: str, address: str) -> bool:
        return self.knows(address) and (ae_title.strip(), _ip(address)) in self.pairs


def header_problem(ds: Dataset, settings: PacsSection) -> tuple[int, str] | None:
    """(status, reason) when the header alone says the instance cannot be taken; decoding comes later."""
    if "PixelData" not in ds:
        return CANNOT_UNDERSTAND, "no pixel data"
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if not UID(str(ds.get(keyword, ""))).is_valid:  # results are filed under these: they must be UIDs
            return CANNOT_UNDERSTAND, f"no valid {keyword}"
    try:
        frames = frame_count(ds)
        rows, columns = int(ds.Rows), int(ds.Columns)
        sample_bytes = int(ds.get("SamplesPerPixel", 1) or 1) * -(-int(ds.get("BitsAllocated", 16) or 16) // 8)
    except (AttributeError, TypeError, ValueError):
        return CANNOT_UNDERSTAND, "no valid Rows, Columns, NumberOfFrames or pixel format"
    limits = current_limits()  # the images: bounds every decoder of this process keeps
    if frames > limits.max_frames:
        return OUT_OF_RESOURCES, f"{frames} frames, more than {limits.max_frames} (images.max_frames)"
    if rows * columns > limits.max_pixels:
        return OUT_OF_RESOURCES, f"{rows}x{columns} pixels a frame, more than {limits.max_pixels} (images.max_pixels)"
    decoded = rows * columns * frames * sample_bytes
    if decoded > settings.max_decoded_mb * 2**20:
        return OUT_OF_RESOURCES, f"{decoded / 2**20:.0f} MB of pixels decoded, over pacs.max_decoded_mb"
    return None


def failure(status: int, reason: str) -> Dataset:
    answer = Dataset()
    answer.Status = status
    answer.ErrorComment = reason[:64]  # LO
    return answer


class Receiver:
    """A Storage SCP on (settings.host, settings.port); `start()` binds, `stop()` closes every association."""

    def __init__(self, settings: PacsSection, on_instance: OnInstance, on_release: OnRelease | None = None):
        self.settings = settings
        self.on_instance, self.on_release = on_instance, on_release
        self._delivered: WeakKeyDictionary = WeakKeyDictionary()  # association -> series it delivered
        self.max_bytes = int(settings.max_instance_mb * 2**20)
        self.allow = AllowList(settings.allowed_peers)
        self._received: WeakKeyDictionary = WeakKeyDictionary()  # association -> bytes since its last C-STORE
        self._lock = threading.Lock()
        self.server = None

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def build_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.require_called_aet = True  # a peer must call us by our own AE title
        ae.maximum_associations = s.max_associations
        ae.dimse_timeout = ae.network_timeout = s.timeout_s
        # an accepted connection waits this long for its A-ASSOCIATE-RQ (and a release for its reply): an idle or
        # dribbling peer gives its slot back after seconds, not after timeout_s
        ae.acse_timeout = s.request_timeout_s
        ae.add_supported_context(Verification)
        images = image_transfer_syntaxes()
        for uid in IMAGE_SOP_CLASSES:
            ae.add_supported_context(uid, images)
        for context in StoragePresentationContexts:  # taken only to answer 0x0122 with a reason
            if context.abstract_syntax not in IMAGE_SOP_CLASSES:
                ae.add_supported_context(context.abstract_syntax, list(UNCOMPRESSED))
        return ae

    def start(self) -> Receiver:
        handlers = [(evt.EVT_CONN_OPEN, self._on_connected), (evt.EVT_REQUESTED, self._on_requested),
                    (evt.EVT_C_STORE, self._on_store),
                    (evt.EVT_DATA_RECV, self._on_data), (evt.EVT_RELEASED, self._on_released)]
        address = (self.settings.host, self.settings.port)
        try:
            self.server = self.build_ae().start_server(address, block=False, evt_handlers=handlers)
        except OSError as exc:
            raise UserError(f"cannot listen for DICOM on {address[0]}:{address[1]}: {exc.strerror or exc}") from None
        self.server.verify_request = self._admits_connection  # before the connection takes an association slot
        keep_library_logs_one_line()
        LOG.info("DICOM receiver %s listening on %s:%d", self.settings.ae_title, self.settings.host, self.port)
        return self

    def _admits_connection(self, request, client_address) -> bool:
        """A TCP connection from an address no allowed peer has is closed at accept (four idle ones took every
        slot for timeout_s); one address holds at most all slots but one, so another peer always gets in."""
        address = _ip(str(client_address[0]))
        if not self.allow.knows(address):
            LOG.warning("DICOM connection from %s closed: no allowed peer has this address", address)
            return False
        held = sum(1 for assoc in self.server.active_associations if _ip(assoc.requestor.address) == address)
        if held >= max(1, self.settings.max_associations - 1):
            LOG.warning("DICOM connection from %s closed: it holds %d associations already", address, held)
            return False
        return True

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def _on_connected(self, event) -> None:
        """A connection must have its association within request_timeout_s: pynetdicom's own ACSE timeout closes
        an idle one, but a peer that sends an A-ASSOCIATE-RQ a byte at a time keeps its reader waiting for
        timeout_s per byte; its socket is shut at the deadline."""
        assoc = event.assoc

        def deadline() -> None:
            if not (assoc.is_established or assoc.is_released or assoc.is_aborted or assoc.is_rejected):
                LOG.warning("DICOM connection from %s closed: no association request within %g s",
                            assoc.requestor.address, self.settings.request_timeout_s)
                with contextlib.suppress(OSError, AttributeError):
                    assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)

        timer = threading.Timer(self.settings.request_timeout_s, deadline)
        timer.daemon = True
        timer.start()

    def _on_requested(self, event) -> None:
        calling = event.assoc.requestor.primitive.calling_ae_title.strip()
        address = event.assoc.requestor.address
        if not self.allow.admits(calling, address):
            LOG.warning("DICOM association refused: %r@%s is not in the allow list", calling, address)
            event.assoc.acse.send_reject(*REJECT_CALLING_AE)
            time.sleep(0.1)  # let the peer read the rejection before the socket closes

    def _on_released(self, event) -> None:
        """A release (not an abort) by the sender: the series it delivered are complete as far as it knows."""
        with self._lock:
            delivered = self._delivered.pop(event.assoc, None)
        if delivered and self.on_release is not None:
            try:
                self.on_release(sorted(delivered))
            except Exception:  # noqa: BLE001 - the receiver stays up; the quiet period still completes the series
                LOG.exception("marking released series failed")

    def _on_data(self, event) -> None:
        """Counts the bytes of the C-STORE in progress; aborts the association past the size cap, so an
        oversized stream is never buffered whole."""
        with self._lock:
            total = self._received.get(event.assoc, 0)
            if total < 0:  # already being aborted
                return
            total += len(event.data)
            over = total > self.max_bytes + 2**20  # the margin covers the command set and PDU headers
            self._received[event.assoc] = -1 if over else total
        if over:
            LOG.warning("DICOM association aborted: an instance over %g MB", self.settings.max_instance_mb)
            threading.Thread(target=event.assoc.abort, daemon=True).start()  # abort() waits for this reader thread

    def _on_store(self, event):
        with self._lock:
            self._received[event.assoc] = 0
        calling = event.assoc.requestor.ae_title.strip()
        peer = _ip(event.assoc.requestor.address)
        status = self._check_and_handle(event, calling, peer)
        code = status if isinstance(status, int) else int(status.Status)
        LOG.info("C-STORE %r from %r@%s: status 0x%04X", str(event.request.AffectedSOPInstanceUID)[:64], calling,
                 peer, code)  # %r: a peer's text never starts a log line of its own
        return status

    def _inflates_too_far(self, event) -> bool:
        """A deflated data set is measured in bounded pieces before pynetdicom inflates it whole."""
        if not UID(str(event.context.transfer_syntax)).is_deflated:
            return False
        return inflated_size(io.BytesIO(event.request.DataSet.getvalue()), self.max_bytes) > self.max_bytes

    def _check_and_handle(self, event, calling: str, peer: str):
        sop_class = str(event.request.AffectedSOPClassUID)
        if sop_class not in IMAGE_SOP_CLASSES:
            return failure(SOP_CLASS_NOT_SUPPORTED, "only MR and secondary capture images are taken")
        if len(event.request.DataSet.getvalue()) > self.max_bytes or self._inflates_too_far(event):
            return failure(OUT_OF_RESOURCES, f"instance over {self.settings.max_instance_mb:g} MB")
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            declared = str(ds.SOPClassUID)
        except Exception as exc:  # noqa: BLE001 - any malformed encoding is the sender's error
            return failure(CANNOT_UNDERSTAND, f"unreadable data set: {type(exc).__name__}")
        if declared != sop_class:
            return failure(DOES_NOT_MATCH_SOP_CLASS, "SOP Class UID differs from the request's")
        command_uid = str(event.request.AffectedSOPInstanceUID)
        if not UID(command_uid).is_valid or command_uid != str(ds.get("SOPInstanceUID", "")):
            return failure(CANNOT_UNDERSTAND, "Affected SOP Instance UID is not the data set's")
        problem = header_problem(ds, self.settings)
        if problem:
            return failure(*problem)
        if not self.settings.keep_patient_identity:
            strip_identity(ds)
        try:
            self.on_instance(ds, calling, peer)
            with self._lock:
                self._delivered.setdefault(event.assoc, set()).add((str(ds.StudyInstanceUID),
                                                                    str(ds.SeriesInstanceUID)))
        except ImageReadError as exc:
            return failure(CANNOT_UNDERSTAND, str(exc) or "pixel data not decodable")
        except Exception:  # noqa: BLE001 - one instance's failure must not take the receiver down
            LOG.exception("DICOM instance %s could not be processed", ds.get("SOPInstanceUID", "?"))
            return failure(PROCESSING_FAILURE, "processing failed; see the server log")
        return SUCCESS


def start_receiver(settings: PacsSection, on_instance: OnInstance, on_release: OnRelease | None = None) -> Receiver:
    """Start the Storage SCP in background threads; call `.stop()` on the handle to close it."""
    return Receiver(settings, on_instance, on_release).start()
