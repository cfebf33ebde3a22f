"""A real Orthanc (Debian's package) for the PACS tests: a temporary configuration on free loopback ports, its
own storage folder, the toolkit's receiver registered as a modality, and a receipt log of every instance it
is sent (a Lua ReceivedInstanceFilter), so a test can tell one arrival from two."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
requires_orthanc = pytest.mark.skipif(
    not Path(ORTHANC).is_file(),
    reason="Orthanc is not installed (Debian package 'orthanc'; .ci/run installs it when run as root)")

RECEIPT_SCRIPT = """
function ReceivedInstanceFilter(dicom, origin, info)
  local f = io.open(%s, "a")
  f:write(dicom.SOPInstanceUID .. " " .. origin["RequestOrigin"] .. " " .. tostring(origin["RemoteAet"]) .. "\\n")
  f:close()
  return true
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """Start, stop and restart one Orthanc; its REST API on 127.0.0.1 only (remote access off)."""

    def __init__(self, root: Path, modalities: dict[str, list]):
        self.root = Path(root)
        self.http_port, self.dicom_port = free_port(), free_port()
        self.receipts = self.root / "received.txt"
        lua = self.root / "receipts.lua"
        lua.write_text(RECEIPT_SCRIPT % json.dumps(str(self.receipts)))
        config = {
            "Name": "toolkit-test", "DicomAet": "ORTHANC", "HttpPort": self.http_port, "DicomPort": self.dicom_port,
            "StorageDirectory": str(self.root / "storage"), "IndexDirectory": str(self.root / "storage"),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [], "LuaScripts": [str(lua)],
            "DicomModalities": modalities, "DicomScuTimeout": 10, "SaveJobs": False, "OverwriteInstances": False,
        }
        self.config = self.root / "orthanc.json"
        self.config.write_text(json.dumps(config, indent=2))
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, wait_s: float = 60) -> Orthanc:
        log = open(self.root / "orthanc.log", "ab")
        self.process = subprocess.Popen([ORTHANC, str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}; see {self.root / 'orthanc.log'}")
            try:
                self.get("/system")
                return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {wait_s} s")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json") -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=120) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def get(self, path: str):
        status, body = self.request("GET", path)
        assert status == 200, (path, status, body[:300])
        return json.loads(body)

    def upload(self, dicom: bytes) -> str:
        status, body = self.request("POST", "/instances", dicom, "application/dicom")
        assert status == 200, body[:300]
        return json.loads(body)["ID"]

    def store(self, modality: str, resource: str, **options) -> tuple[int, dict]:
        """POST /modalities/<modality>/store, synchronous: (HTTP status, Orthanc's JSON answer)."""
        status, body = self.request("POST", f"/modalities/{modality}/store",
                                    json.dumps({"Resources": [resource], "Synchronous": True, **options}).encode())
        return status, json.loads(body or b"{}")

    def study_series(self, study_uid: str) -> list[dict]:
        """Every series of a study (by StudyInstanceUID): Orthanc's series objects, empty when absent."""
        status, body = self.request("POST", "/tools/find", json.dumps(
            {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}).encode())
        ids = json.loads(body) if status == 200 else []
        return self.get(f"/studies/{ids[0]}/series") if ids else []

    def instance_file(self, instance_id: str) -> bytes:
        status, body = self.request("GET", f"/instances/{instance_id}/file")
        assert status == 200
        return body

    def received(self) -> list[tuple[str, str, str]]:
        """(SOP Instance UID, origin, calling AE) of every instance sent to Orthanc, duplicates included."""
        if not self.receipts.exists():
            return []
        return [tuple(line.split(" ", 2)) for line in self.receipts.read_text().splitlines() if line]
