"""Attacks from the hospital network, each fed to the real component: serve.py under uvicorn on 127.0.0.1, the
DICOM receiver (pynetdicom) on a loopback port, the scripts on real files. Each test fails without its defence.
"""
from __future__ import annotations

import contextlib
import io
import sqlite3

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage

from conftest import write_dicom
from core.config import load_config
from data.images import ImageReadError, load_gray
from pacs.receiver import start_receiver
from tests.server_process import ServerProcess

MODEL = "brain-cancer-resnet18"
BOMB_MB = 64  # inflated size of the bomb's zeros; it deflates to ~64 KB, far under every cap below


def slice_pixels() -> np.ndarray:
    return (np.add.outer(np.arange(48), np.arange(48)) * 40).astype(np.uint16)


def write_deflated(path, bomb_mb: int = 0):
    """A small MR in Deflated Explicit VR Little Endian; with `bomb_mb`, a private element of that many MB of zeros
    rides along (a deflate bomb: the file stays tiny)."""
    ds = write_dicom(path, slice_pixels(), (1000, 2000))
    if bomb_mb:
        ds.add_new(0x00091010, "OB", bytes(bomb_mb * 2**20))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(str(path), enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def server(registered, tmp_path_factory):
    """serve.py without a token, on loopback, with a 1 MB body cap."""
    tmp = tmp_path_factory.mktemp("attacked server")
    srv = ServerProcess([*registered, "--model", MODEL, "--alias", "staging", "--database",
                         f"sqlite:///{tmp / 'audit.db'}", "--poll-seconds", "0", "--set", "serving.max_upload_mb=1",
                         "--set", "serving.request_timeout_s=5"], tmp)
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


@pytest.fixture
def receiver(tmp_path):
    """The Storage SCP alone on a free loopback port (1 MB instance cap); `received` lists what it passed on."""
    received = []
    settings = load_config(sets=["pacs.port=0", f"pacs.spool_dir={tmp_path / 'spool'}", "pacs.timeout_s=5",
                                 "pacs.max_instance_mb=1", "pacs.allow=[ORTHANC@127.0.0.1]"]).pacs
    handle = start_receiver(settings, lambda ds, calling, peer: received.append(ds))
    handle.received = received
    try:
        yield handle
    finally:
        handle.stop()


def audit_rows(db, sql: str) -> list:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql).fetchall()


def associate(port: int, syntaxes=None, calling: str = "ORTHANC"):
    ae = AE(ae_title=calling)
    ae.add_requested_context(MRImageStorage, syntaxes) if syntaxes else ae.add_requested_context(MRImageStorage)
    return ae.associate("127.0.0.1", port, ae_title="MRI_AI")


# ---- 1. deflate bombs ---------------------------------------------------------------------------------------

def test_a_deflate_bomb_is_refused_over_c_store_while_a_plain_deflated_image_is_taken(receiver, tmp_path):
    good = dcmread(write_deflated(tmp_path / "good.dcm"))
    bomb = dcmread(write_deflated(tmp_path / "bomb.dcm", BOMB_MB))
    assert (tmp_path / "bomb.dcm").stat().st_size < 2**20 // 4
    assoc = associate(receiver.port, [DeflatedExplicitVRLittleEndian])
    try:
        assert assoc.send_c_store(bomb).Status == 0xA700  # out of resources: over pacs.max_instance_mb inflated
        assert not receiver.received
        assert assoc.send_c_store(good).Status == 0x0000
        assert len(receiver.received) == 1
    finally:
        assoc.release()


def test_a_deflate_bomb_upload_is_refused_with_a_reason(server, tmp_path):
    bomb = write_deflated(tmp_path / "bomb.dcm", BOMB_MB).read_bytes()
    good = write_deflated(tmp_path / "good.dcm").read_bytes()
    with server.client() as client:
        answer = client.post("/v1/predict", files={"files": ("bomb.dcm", bomb)})
        assert answer.status_code == 422 and "inflates past" in answer.json()["detail"]
        assert "bomb.dcm" in answer.json()["detail"] and str(server.workdir) not in answer.text
        assert client.post("/v1/predict", files={"files": ("good.dcm", good)}).status_code == 200


# ---- 5. only the documented image formats are decoded -------------------------------------------------------

FOREIGN_FORMATS = ("WEBP", "TGA", "ICO", "PCX", "SGI", "PPM", "GIF", "IM", "JPEG2000")
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"


def foreign_image(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((slice_pixels() // 16).astype(np.uint8)).convert("RGB").save(buf, format=fmt)
    return buf.getvalue()


def test_only_jpeg_png_bmp_and_tiff_are_decoded_whatever_the_name(tmp_path):
    for fmt in (*FOREIGN_FORMATS, "EPS"):
        path = tmp_path / fmt / "scan.jpg"  # named like a JPEG
        path.parent.mkdir()
        path.write_bytes(EPS if fmt == "EPS" else foreign_image(fmt))
        with pytest.raises(ImageReadError, match="not a JPEG, PNG, BMP or TIFF image"):
            load_gray(path, 32)
    for fmt in ("JPEG", "PNG", "BMP", "TIFF"):
        path = tmp_path / f"scan.{fmt.lower()}"
        path.write_bytes(foreign_image(fmt))
        assert load_gray(path, 32).shape == (32, 32)


def test_a_webp_named_jpg_gets_a_4xx_from_the_server(server):
    with server.client() as client:
        answer = client.post("/v1/predict", files={"files": ("scan.jpg", foreign_image("WEBP"))})
    assert answer.status_code == 422 and "not a JPEG, PNG, BMP or TIFF image" in answer.json()["detail"]


# ---- 9. the audit trail's client address ----------------------------------------------------------------------

def test_a_forged_x_forwarded_for_does_not_reach_the_audit_trail(server, tmp_path):
    forged = "203.0.113.66"
    jpeg = io.BytesIO()
    Image.fromarray((slice_pixels() // 16).astype(np.uint8)).save(jpeg, format="JPEG")
    with server.client() as client:
        answer = client.post("/v1/predict", files={"files": ("xff.jpg", jpeg.getvalue())},
                             headers={"X-Forwarded-For": forged, "Forwarded": f"for={forged}"})
    assert answer.status_code == 200
    rows = audit_rows(server.workdir / "audit.db", "SELECT client FROM predictions WHERE filename = 'xff.jpg'")
    assert rows == [("127.0.0.1",)]
