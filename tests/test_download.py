"""download_data.py: archives the test builds, checked and unpacked; Mendeley's API served from 127.0.0.1; offline."""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
import zipfile

import pytest

import data.download
from core.errors import UserError
from data.download import CLASS_FOLDERS, Request, obtain
from data.synthetic import generate_dataset
from tests.conftest import ROOT, run_script

PER_CLASS = 4
NESTED = "Brain_Cancer raw MRI data/Brain_Cancer"  # as the Mendeley archive nests its class folders


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("source"), n_per_class=PER_CLASS, size=32, seed=3)


def make_zip(path, images, extra: dict[str, bytes] | None = None):
    with zipfile.ZipFile(path, "w") as zf:
        for folder in CLASS_FOLDERS:
            for f in sorted((images / folder).glob("*.jpg")):
                zf.write(f, f"{NESTED}/{folder}/{f.name}")
        zf.writestr("__MACOSX/._x", b"resource fork")
        zf.writestr(f"{NESTED}/brain_glioma/.DS_Store", b"finder")
        for name, body in (extra or {}).items():
            zf.writestr(name, body)
    return path


def download(tmp_path, *argv) -> int:
    return run_script("download_data", ["--dest", tmp_path / "data" / "Brain_Cancer", *argv])


def test_a_local_archive_is_checked_and_unpacked_to_the_data_folder(tmp_path, images, capsys):
    archive = make_zip(tmp_path / "mk56jw9rns-1.zip", images)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert download(tmp_path, "--archive", archive, "--sha256", digest, "--expected-files", 3 * PER_CLASS) == 0
    dest = tmp_path / "data" / "Brain_Cancer"
    assert sorted(p.name for p in dest.iterdir()) == sorted(CLASS_FOLDERS)
    assert len(list(dest.rglob("*.jpg"))) == 3 * PER_CLASS
    out = capsys.readouterr().out
    assert f"unpacked to {dest}" in out and "sha256 of mk56jw9rns-1.zip matches the one --sha256 gives" in out
    assert f"{3 * PER_CLASS} images (brain_glioma {PER_CLASS}, brain_menin {PER_CLASS}" in out
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".")]  # no work folders left behind
    # Again: nothing to fetch, nothing overwritten.
    assert download(tmp_path, "--archive", archive, "--expected-files", 3 * PER_CLASS) == 0
    assert "already in" in capsys.readouterr().out


def test_the_default_path_is_the_configs_dataset_path(tmp_path, images, capsys):
    archive = make_zip(tmp_path / "a.zip", images)
    target = tmp_path / "default place" / "Brain_Cancer"
    assert run_script("download_data", ["--set", f"dataset.path={target}", "--archive", archive,
                                        "--expected-files", 3 * PER_CLASS]) == 0
    assert (target / "brain_menin").is_dir()


def test_a_tar_archive_works_too(tmp_path, images):
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(images, arcname="Brain_Cancer")
    assert download(tmp_path, "--archive", archive, "--expected-files", 3 * PER_CLASS) == 0


@pytest.mark.parametrize("extra, argv, message", [
    ({}, [], "expected 6,056 images, found 12"),
    ({}, ["--sha256", "0" * 64], "does not match"),
    ({"../../escaped.jpg": b"x"}, [], "would land outside its folder"),
])
def test_a_wrong_or_hostile_archive_is_refused_and_nothing_lands(tmp_path, images, extra, argv, message):
    archive = make_zip(tmp_path / "bad.zip", images, extra)
    expected = [] if "6,056" in message else ["--expected-files", str(3 * PER_CLASS)]
    with pytest.raises(UserError, match=message):
        download(tmp_path, "--archive", archive, *expected, *argv)
    assert not (tmp_path / "data" / "Brain_Cancer").exists() and not (tmp_path / "escaped.jpg").exists()
    assert [p.name for p in (tmp_path / "data").iterdir()] == []


def test_a_folder_with_other_content_is_never_overwritten(tmp_path, images):
    dest = tmp_path / "data" / "Brain_Cancer"
    dest.mkdir(parents=True)
    (dest / "my_notes.txt").write_text("mine")
    with pytest.raises(UserError, match="never overwritten"):
        download(tmp_path, "--archive", make_zip(tmp_path / "a.zip", images), "--expected-files", 3 * PER_CLASS)
    assert (dest / "my_notes.txt").read_text() == "mine"


@pytest.fixture
def mendeley(tmp_path, images, monkeypatch):
    """Mendeley's public API and file store, served from 127.0.0.1: the dataset document, then the archive."""
    archive = make_zip(tmp_path / "served.zip", images)
    body = archive.read_bytes()
    state = {"sha256": hashlib.sha256(body).hexdigest()}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/public-api/"):
                files = [{"filename": "Brain_Cancer raw MRI data.zip", "size": len(body),
                          "content_details": {"size": len(body), "sha256_hash": state["sha256"],
                                              "download_url": f"http://127.0.0.1:{port}/files/archive"}},
                         {"filename": "README.txt", "content_details": {"download_url": "http://127.0.0.1:1/x"}}]
                payload = json.dumps({"id": "mk56jw9rns", "version": 1, "files": files}).encode()
            else:
                payload = body
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(data.download, "MENDELEY_API", f"http://127.0.0.1:{port}/public-api/datasets/mk56jw9rns")
    yield state
    server.shutdown()
    server.server_close()


def test_mendeley_archive_is_downloaded_and_its_listed_checksum_checked(tmp_path, mendeley, capsys):
    dest = tmp_path / "data" / "Brain_Cancer"
    report = obtain(Request(dest, "mendeley", expected_files=3 * PER_CLASS))
    assert report["source"] == "Mendeley Data" and report["sha256"] == mendeley["sha256"]
    assert any("matches the one Mendeley gives" in line for line in report["checks"])
    assert len(list(dest.rglob("*.jpg"))) == 3 * PER_CLASS
    mendeley["sha256"] = "f" * 64  # the listing now disagrees with the bytes served
    with pytest.raises(UserError, match="does not match .* given by Mendeley"):
        obtain(Request(tmp_path / "elsewhere", "mendeley", expected_files=3 * PER_CLASS))
    assert not (tmp_path / "elsewhere").exists()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when this returns: connections to it are refused


def offline_env(tmp_path, **extra) -> dict:
    """No network: every request goes to a proxy on a closed local port; no Kaggle credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAGGLE_", "http_", "https_", "HTTP", "no_"))}
    proxy = f"http://127.0.0.1:{closed_port()}"
    env.update(https_proxy=proxy, http_proxy=proxy, HOME=str(tmp_path / "home"), **extra)
    return env


def test_offline_it_says_so_in_one_line_with_the_manual_steps(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "download_data.py"), "--dest", str(tmp_path / "d")], cwd=tmp_path,
                          env=offline_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no network: cannot reach data.mendeley.com")
    assert "https://data.mendeley.com/datasets/mk56jw9rns/1" in lines[0] and "--archive PATH" in lines[0]
    assert "Kaggle mirror: skipped (no Kaggle credentials" in proc.stdout
    assert not (tmp_path / "d").exists()


def test_kaggle_credentials_are_detected_and_kagglehub_is_named_when_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for key in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_CONFIG_DIR"):
        monkeypatch.delenv(key, raising=False)
    assert not data.download.kaggle_credentials()
    (tmp_path / ".kaggle").mkdir()
    (tmp_path / ".kaggle" / "kaggle.json").write_text('{"username": "u", "key": "k"}')
    assert data.download.kaggle_credentials()
    monkeypatch.setitem(sys.modules, "kagglehub", None)  # as on a machine without it: import fails
    with pytest.raises(UserError, match="pip install kagglehub"):
        data.download.fetch_kaggle()
