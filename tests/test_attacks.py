"""Attacks from the hospital network, each fed to the real component: serve.py under uvicorn on 127.0.0.1, the
DICOM receiver (pynetdicom) on a loopback port, the scripts on real files. Each test fails without its defence.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import sqlite3
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, RLELossless
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage, Verification

from conftest import ROOT, write_dicom
from core.config import load_config
from data.images import ImageReadError, load_gray
from pacs.receiver import start_receiver
from review.auth import read_password
from serving.guard import read_token
from tests.server_process import ServerProcess
from tests.slowest import slow_setup

MODEL = "brain-cancer-resnet18"
PASSWORD = "correct horse battery"
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
@slow_setup("starts serve.py --review with its model loaded")
def server(registered, tmp_path_factory):
    """serve.py --review without a token, on loopback, with a 1 MB body cap, 4 queue places; reviewer alice."""
    tmp = tmp_path_factory.mktemp("attacked server")
    db = f"sqlite:///{tmp / 'audit.db'}"
    (tmp / "alice.pw").write_text(PASSWORD + "\n")
    (tmp / "alice.pw").chmod(0o600)
    added = subprocess.run([sys.executable, str(ROOT / "serve.py"), "add-reviewer", "alice", "--password-file",
                            str(tmp / "alice.pw"), "--database", db], capture_output=True, text=True, cwd=tmp)
    assert added.returncode == 0, added.stderr
    srv = ServerProcess([*registered, "--model", MODEL, "--alias", "staging", "--review", "--database", db,
                         "--poll-seconds", "0", "--set", "serving.max_upload_mb=1", "--set", "serving.queue_size=4",
                         "--set", f"review.store_dir={tmp / 'store'}", "--set", "serving.request_timeout_s=5"], tmp)
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


# ---- 3. association slots held by connections that never ask --------------------------------------------------

def test_connections_that_never_send_an_association_request_are_closed_after_the_request_timeout(tmp_path):
    """An allowed address opens connections and sends nothing, or a PDU header a byte at a time: each is closed
    after pacs.request_timeout_s, not timeout_s, and a real association then gets in."""
    import socket
    import time

    settings = load_config(sets=["pacs.port=0", f"pacs.spool_dir={tmp_path / 'spool'}", "pacs.timeout_s=60",
                                 "pacs.request_timeout_s=1", "pacs.max_associations=4",
                                 "pacs.allow=[ORTHANC@127.0.0.1]"]).pacs
    handle = start_receiver(settings, lambda ds, calling, peer: None)
    try:
        idle = [socket.create_connection(("127.0.0.1", handle.port)) for _ in range(3)]
        started = time.monotonic()
        dribbler = idle[0]
        for byte in b"\x01\x00\x00\x00":  # the start of an A-ASSOCIATE-RQ, never finished
            dribbler.sendall(bytes([byte]))
            time.sleep(0.2)
        for sock in idle:  # read until the receiver closes it (an A-ABORT may come first); 10 s would fail
            sock.settimeout(10)
            try:
                while sock.recv(1024):
                    pass
            except ConnectionResetError:
                pass
            sock.close()
        assert time.monotonic() - started < 8  # the request timeout, far under timeout_s (60 s)
        ae = AE(ae_title="ORTHANC")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", handle.port, ae_title="MRI_AI")
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        assoc.release()
    finally:
        handle.stop()


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


def test_a_configured_proxy_is_believed_and_names_the_client(registered, tmp_path):
    """Behind a reverse proxy listed in serving.trusted_proxies, the audit trail records the client the proxy
    names, not the proxy's own address."""
    client_address = "198.51.100.7"
    jpeg = io.BytesIO()
    Image.fromarray((slice_pixels() // 16).astype(np.uint8)).save(jpeg, format="JPEG")
    srv = ServerProcess([*registered, "--model", MODEL, "--alias", "staging", "--database",
                         f"sqlite:///{tmp_path / 'audit.db'}", "--poll-seconds", "0",
                         "--set", "serving.trusted_proxies=[127.0.0.1]"], tmp_path)
    try:
        with srv.wait_ready().client() as client:
            answer = client.post("/v1/predict", files={"files": ("proxied.jpg", jpeg.getvalue())},
                                 headers={"X-Forwarded-For": client_address})
        assert answer.status_code == 200, answer.text
    finally:
        srv.stop()
    rows = audit_rows(tmp_path / "audit.db", "SELECT client FROM predictions WHERE filename = 'proxied.jpg'")
    assert rows == [(client_address,)]


# ---- 13. secrets on the command line and in readable files -------------------------------------------------

SCRIPTS = sorted(p.stem for p in ROOT.glob("*.py") if "def get_args_parser" in p.read_text())


def parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from parsers(sub)


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_script_takes_an_abbreviated_option(script):
    for parser in parsers(importlib.import_module(script).get_args_parser()):
        with pytest.raises(SystemExit):  # --conf for --config: a prefix is never an option
            parser.parse_args(["--conf", "x.yaml"])


def test_a_password_or_token_on_the_command_line_is_refused_without_echoing_it(tmp_path):
    secret = "s3cret-Carol-2026"
    for argv in (["add-reviewer", "carol", "--password", secret, "--database", f"sqlite:///{tmp_path / 'a.db'}"],
                 ["--model", MODEL, "--token", secret]):
        result = subprocess.run([sys.executable, str(ROOT / "serve.py"), *argv], capture_output=True, text=True,
                                timeout=120, cwd=tmp_path)
        assert result.returncode == 2 and "not taken on the command line" in result.stderr
        assert secret not in result.stdout + result.stderr
    assert not (tmp_path / "a.db").exists()  # nothing was done with it


def test_secret_files_readable_by_others_are_warned_about(tmp_path, capsys):
    token, password = tmp_path / "token", tmp_path / "password"
    token.write_text("a-token-of-32-characters-0123456\n")
    password.write_text("a long password\n")
    for path in (token, password):
        path.chmod(0o644)
    assert read_token(str(token)) and read_password(str(password))
    err = capsys.readouterr().err
    assert f"the token file {token} is readable by others (mode 644)" in err
    assert f"the password file {password} is readable by others" in err
    for path in (token, password):
        path.chmod(0o600)
    assert read_token(str(token)) and read_password(str(password))
    assert capsys.readouterr().err == ""


# ---- 14. out-of-range numbers in page addresses --------------------------------------------------------------

def review_session(url: str) -> tuple[httpx.Client, str]:
    """A client logged in as alice, and the page's CSRF token."""
    client = httpx.Client(base_url=url, timeout=120)
    csrf = re.search(r'name="csrf" value="([^"]+)"', client.get("/review/login").text).group(1)
    assert client.post("/review/login", data={"csrf": csrf, "name": "alice", "password": PASSWORD,
                                              "next": "/review/"}).status_code == 303
    return client, re.search(r'name="csrf" value="([^"]+)"', client.get("/review/").text).group(1)


def test_huge_page_numbers_and_negative_frames_are_4xx_not_tracebacks(server, tmp_path):
    client, csrf = review_session(server.url)
    with contextlib.closing(client):
        dicom = write_deflated(tmp_path / "case.dcm").read_bytes()
        made = client.post("/review/upload", data={"csrf": csrf}, files={"files": ("case.dcm", dicom)})
        assert made.status_code == 303, made.text
        case = made.headers["location"].rsplit("/", 1)[-1]
        assert client.get(f"/review/case/{case}/slice.png").status_code == 200
        for address in ("/review/?page_no=99999999999999999999", "/review/?page_no=-1",
                        f"/review/case/{case}/slice.png?frame=-1", f"/review/case/{case}/slice.png?frame=7",
                        f"/review/case/{case}/pixels?frame=0", f"/review/case/{case}/pixels?frame=7"):
            answer = client.get(address)
            assert 400 <= answer.status_code < 500, (address, answer.status_code)
            assert "Traceback" not in answer.text
    assert "Traceback" not in server.log()


# ---- 15. dependency floors -----------------------------------------------------------------------------------

KNOWN_VULNERABLE = {  # the last release with the hole: the floor in the requirements files must exclude it
    "torch": "2.5.1",             # torch.load(weights_only=True) bypass, CVE-2025-32434
    "pillow": "10.2.0",           # libwebp CVE-2023-4863 (<10.0.1), ImageCms CVE-2024-28219 (<10.3)
    "starlette": "0.49.0",        # multipart and Range-header denial of service (<0.40, <0.47.2, <0.49.1)
    "python-multipart": "0.0.17",  # CVE-2024-53981
    "h11": "0.15.0",              # request smuggling, CVE-2025-43859
}


def test_requirements_exclude_releases_with_known_holes_and_the_environment_meets_them():
    from importlib.metadata import version

    from packaging.requirements import Requirement

    pins = {}
    files = ("requirements-serve.txt", "requirements-train.txt")  # what requirements.txt includes
    lines = [line for f in files for line in (ROOT / f).read_text().splitlines()]
    for line in lines:
        text = line.split("#")[0].strip()
        if text and not text.startswith("-"):
            requirement = Requirement(text)
            pins[requirement.name.lower()] = requirement.specifier
    for name, last_bad in KNOWN_VULNERABLE.items():
        assert name in pins, f"{name} is not pinned in the requirements files"
        assert not pins[name].contains(last_bad, prereleases=True), f"{name} {last_bad} is still admitted"
        assert pins[name].contains(version(name).split("+")[0], prereleases=True), f"installed {name} is below"


# ---- 7. DNS rebinding and cross-site posts to the token-less loopback server -------------------------------

def test_a_rebound_host_name_and_a_cross_site_post_are_refused(server, tmp_path):
    jpeg = io.BytesIO()
    Image.fromarray((slice_pixels() // 16).astype(np.uint8)).save(jpeg, format="JPEG")
    with server.client() as client:
        for path in ("/v1/model", "/metrics", "/v1/predictions?study_uid=1.2.3"):
            assert client.get(path, headers={"Host": "rebind.evil.example"}).status_code == 400
            assert client.get(path, headers={"Host": f"localhost:{server.port}"}).status_code == 200
        before = len(audit_rows(server.workdir / "audit.db", "SELECT 1 FROM predictions"))
        for origin in ("http://evil.example", "null", "http://127.0.0.1.evil.example"):
            answer = client.post("/v1/predict", files={"files": ("x.jpg", jpeg.getvalue())}, headers={"Origin": origin})
            assert answer.status_code == 403
        assert len(audit_rows(server.workdir / "audit.db", "SELECT 1 FROM predictions")) == before
        same_site = client.post("/v1/predict", files={"files": ("x.jpg", jpeg.getvalue())},
                                headers={"Origin": server.url})
        assert same_site.status_code == 200


# ---- 12. nothing loaded from a CDN on the review page's origin ----------------------------------------------

def test_no_page_of_the_server_loads_scripts_from_elsewhere(server):
    with server.client() as client:
        assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
        assert client.get("/openapi.json").status_code == 200
        for path in ("/review/login", "/review/static/review.js"):
            page = client.get(path)
            assert page.status_code == 200 and not re.search(r"https?://", re.sub(r'xmlns="[^"]+"', "", page.text))


def test_api_docs_when_turned_on_are_served_whole_from_the_server_itself(registered, tmp_path):
    """serving.api_docs: true gives /docs (Swagger UI) and /redoc with every script and style they name served by
    this server (the fastapi-offline assets): the pages work in an air-gapped network and load nothing from a CDN."""
    srv = ServerProcess([*registered, "--model", MODEL, "--alias", "staging", "--database",
                         f"sqlite:///{tmp_path / 'audit.db'}", "--poll-seconds", "0",
                         "--set", "serving.api_docs=true"], tmp_path)
    try:
        with srv.wait_ready().client() as client:
            for path in ("/docs", "/redoc"):
                page = client.get(path)
                assert page.status_code == 200 and "<html" in page.text.lower()
                assets = re.findall(r'(?:src|href)=["\']([^"\']+\.(?:js|css))', page.text)
                assets += re.findall(r'url: ["\']([^"\']+)["\']', page.text)  # Swagger UI's schema URL
                assert assets, page.text[:500]
                for asset in assets:
                    assert not re.match(r"(https?:)?//", asset) or "127.0.0.1" in asset, asset
                    assert client.get(asset).status_code == 200, asset
    finally:
        srv.stop()


# ---- 11. DICOM log injection ------------------------------------------------------------------------------------

def test_a_command_uid_with_a_forged_log_line_is_refused_and_logged_as_one_line(receiver, tmp_path, caplog,
                                                                               monkeypatch):
    from pynetdicom import _config

    forged = "1.2.3\nC-STORE 1.2.3 from ORTHANC@127.0.0.1: status 0x0000"
    path = tmp_path / "forged.dcm"
    ds = write_dicom(path, slice_pixels(), (1000, 2000))
    ds.preamble = bytes(128)
    ds.file_meta.MediaStorageSOPInstanceUID = forged  # the command's Affected SOP Instance UID, when sent from file
    ds.save_as(str(path), enforce_file_format=False)
    other = tmp_path / "other.dcm"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"  # a valid UID, not the data set's
    ds.save_as(str(other), enforce_file_format=False)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # the command UID comes from the file meta
    caplog.set_level("INFO", logger="pacs.receiver")
    caplog.set_level("DEBUG", logger="pynetdicom")
    assoc = associate(receiver.port, [ExplicitVRLittleEndian])  # sent as stored, so in the file's own syntax
    try:
        assert assoc.send_c_store(path).Status == 0xC000
        assert assoc.send_c_store(other).Status == 0xC000
    finally:
        assoc.release()
    assert not receiver.received
    stores = [r.getMessage() for r in caplog.records if r.name == "pacs.receiver" and "C-STORE" in r.getMessage()]
    assert len(stores) == 2 and all("\n" not in message for message in stores)
    # pynetdicom's own log lines name the UID too: each stays one line, the forged one escaped
    library = [r.getMessage() for r in caplog.records if r.name.startswith("pynetdicom")]
    assert any("1.2.3\\nC-STORE" in message for message in library)
    assert not any(set(message) & {"\n", "\r", "\x1b"} for message in library)


# ---- 2. memory amplification in the result worker ---------------------------------------------------------------

def test_an_instance_that_decodes_past_the_cap_is_refused_and_captures_have_a_bounded_size(tmp_path):
    from pacs.capture import MAX_SIDE
    from pacs.pipeline import ResultWorker
    from pacs.receiver import header_problem
    from pacs.spool import Spool

    settings = load_config(sets=[f"pacs.spool_dir={tmp_path / 'spool'}", "pacs.max_decoded_mb=8",
                                 "pacs.destination=ORTHANC@127.0.0.1:104"]).pacs
    big = write_dicom(tmp_path / "big.dcm", np.zeros((3, 1000, 2000), dtype=np.uint16))  # 12 MB of pixels
    big.compress(RLELossless)
    assert len(big.PixelData) < 2**20 // 4 and header_problem(big, settings) == (
        0xA700, "11 MB of pixels decoded, over pacs.max_decoded_mb")  # 11.4 MiB
    wide = tmp_path / "wide.dcm"
    ds = write_dicom(wide, (np.add.outer(np.arange(1200), np.arange(2600)) % 4096).astype(np.uint16), (2000, 4000))
    assert header_problem(ds, settings) is None
    spool = Spool(settings.spool_dir, settings.destination_peer)
    record = {"frame": None, "sop_class_uid": ds.SOPClassUID, "sop_instance_uid": ds.SOPInstanceUID,
              "study_instance_uid": ds.StudyInstanceUID, "series_instance_uid": ds.SeriesInstanceUID,
              "predicted_class": "glioma", "class_index": 0, "confidence": 0.9, "refer": False,
              "probabilities": {"glioma": 0.9, "meningioma": 0.05, "pituitary": 0.05}, "model": MODEL, "version": "1"}
    spool.add_job(wide, [record])
    ResultWorker(spool, 32).step()
    captures = [dcmread(p) for p in spool.pending() if dcmread(p).Modality != "SR"]
    assert len(captures) == 1 and max(captures[0].Rows, captures[0].Columns) <= MAX_SIDE + 200  # + the text band
    assert captures[0].Columns == MAX_SIDE


# ---- 3. association slots --------------------------------------------------------------------------------------

def test_idle_connections_from_strangers_do_not_take_the_association_slots(receiver, tmp_path):
    import socket
    import time

    idle = []
    try:
        for _ in range(8):  # twice pacs.max_associations, from an address no allowed peer has, sending nothing
            conn = socket.socket()
            conn.settimeout(3)
            conn.bind(("127.0.0.2", 0))
            conn.connect(("127.0.0.1", receiver.port))
            idle.append(conn)
        time.sleep(0.5)
        assert all(conn.recv(1) == b"" for conn in idle)  # closed at accept
        started = time.monotonic()
        assoc = associate(receiver.port)  # the allowed PACS gets in at once
        assert assoc.is_established and time.monotonic() - started < 5
        assoc.release()
    finally:
        for conn in idle:
            conn.close()


# ---- 10. patient identity at every door --------------------------------------------------------------------------

def identified(path):
    """An MR with the patient's name and birth date, also nested in OriginalAttributesSequence."""
    from pydicom.dataset import Dataset

    ds = write_dicom(path, slice_pixels(), (1000, 2000), PatientBirthDate="19700101", ReferringPhysicianName="Dr^Who")
    original, modified = Dataset(), Dataset()
    modified.PatientName, modified.PatientBirthDate = "Doe^Jane", "19700101"
    original.ModifiedAttributesSequence = [modified]
    original.AttributeModificationDateTime, original.ModifyingSystem, original.ReasonForTheAttributeModification = (
        "20260101120000", "RIS", "CORRECT")
    ds.OriginalAttributesSequence = [original]
    ds.save_as(str(path), enforce_file_format=True)
    return ds


def test_names_and_birth_dates_are_stripped_in_nested_sequences_at_the_receiver(receiver, tmp_path):
    ds = identified(tmp_path / "named.dcm")
    assoc = associate(receiver.port)
    try:
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
    text = str(receiver.received[0])
    assert "Doe^Jane" not in text and "Test^Phantom" not in text and "19700101" not in text and "Dr^Who" not in text
    assert receiver.received[0].PatientID == "TEST0001"


def test_a_review_upload_is_kept_without_names_and_birth_dates(server, tmp_path):
    identified(tmp_path / "named.dcm")
    client, csrf = review_session(server.url)
    with contextlib.closing(client):
        made = client.post("/review/upload", data={"csrf": csrf},
                           files={"files": ("named.dcm", (tmp_path / "named.dcm").read_bytes())})
        assert made.status_code == 303, made.text
    kept = [dcmread(p) for p in (server.workdir / "store").glob("*.dcm")]
    assert kept and all("Doe^Jane" not in str(ds) and "19700101" not in str(ds) and "Test^Phantom" not in str(ds)
                        for ds in kept)


# ---- 8. slow uploads ----------------------------------------------------------------------------------------------

def slow_upload(port: int):
    """A POST /v1/predict that sends its head and 10 bytes of a 100 kB body, then nothing."""
    import socket

    conn = socket.create_connection(("127.0.0.1", port))
    conn.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                 b"Content-Length: 100000\r\n\r\n--b\r\nConte")
    conn.settimeout(10)
    return conn


def test_slow_uploads_hold_no_queue_place_and_one_address_is_capped(server):
    from serving.guard import MAX_UPLOADS_PER_CLIENT

    jpeg = io.BytesIO()
    Image.fromarray((slice_pixels() // 16).astype(np.uint8)).save(jpeg, format="JPEG")
    slow = [slow_upload(server.port) for _ in range(6)]  # more than serving.queue_size=4
    try:
        time.sleep(0.5)
        with server.client() as client:
            answer = client.post("/v1/predict", files={"files": ("a.jpg", jpeg.getvalue())})
            assert answer.status_code == 200, answer.text
        slow += [slow_upload(server.port) for _ in range(MAX_UPLOADS_PER_CLIENT - 6)]
        time.sleep(0.5)
        one_more = slow_upload(server.port)
        slow.append(one_more)
        assert one_more.recv(200).startswith(b"HTTP/1.1 429")
    finally:
        for conn in slow:
            conn.close()


# ---- 6. password guessing on the review page (last: it throttles this address) ---------------------------

def test_password_guessing_backs_off_and_every_failure_is_in_the_audit_database(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        form = {"text": client.get("/review/login").text}

        def attempt(password: str) -> httpx.Response:
            csrf = re.search(r'name="csrf" value="([^"]+)"', form["text"]).group(1)  # each refusal sends a new form
            answer = client.post("/review/login", data={"csrf": csrf, "name": "alice", "password": password,
                                                        "next": "/review/"})
            form["text"] = answer.text
            return answer

        statuses = [attempt(f"guess number {i}").status_code for i in range(8)]
        assert statuses[:5] == [401] * 5 and 429 in statuses[5:]
        right = attempt(PASSWORD)  # the right password, straight after the guesses: not let in yet
        assert right.status_code == 429 and int(right.headers["retry-after"]) >= 1
        assert "review_session" not in right.headers.get("set-cookie", "")
    failures = audit_rows(server.workdir / "audit.db", "SELECT name, client FROM review_login_failures")
    assert len(failures) == 9 and set(failures) == {("alice", "127.0.0.1")}
