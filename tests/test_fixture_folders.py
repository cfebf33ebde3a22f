"""A test file's fixture folders are removed when the file is done (tests/fixture_folders.py), not at the end of
the run; a session fixture's stay to the end; after a failure everything stays, to be read."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT

CONFTEST = '''
import pytest


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    return tmp_path_factory.mktemp("shared")
'''
FIRST = '''
import json
import pytest


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    folder = tmp_path_factory.mktemp("registry")
    (folder / "model.onnx").write_bytes(b"0" * 1000)
    return folder


def test_uses_them(registry, shared):
    (shared / "first.json").write_text(json.dumps({"registry": str(registry), "shared": str(shared)}))
    assert OK
'''
SECOND = '''
import json
import os


def test_sees_what_is_left(shared):
    seen = json.loads((shared / "first.json").read_text())
    (shared / "second.json").write_text(json.dumps({k: os.path.isdir(v) for k, v in seen.items()}))
'''


def run_pytest(folder, first_passes: bool) -> dict:
    folder.mkdir()
    (folder / "conftest.py").write_text(CONFTEST)
    (folder / "test_a.py").write_text(f"OK = {first_passes}\n" + FIRST)
    (folder / "test_b.py").write_text(SECOND)
    base = folder / "base"
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.fixture_folders", "-p", "no:cacheprovider",
                           "--basetemp", str(base), "test_a.py", "test_b.py"], cwd=folder,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    second = next(base.glob("shared*/second.json"), None)
    return {"code": done.returncode, "out": done.stdout + done.stderr,
            "second": json.loads(second.read_text()) if second else None}


def test_a_files_fixture_folders_go_when_it_is_done_and_a_sessions_stay(tmp_path):
    passed = run_pytest(tmp_path / "passing", first_passes=True)
    assert passed["code"] == 0, passed["out"]
    assert passed["second"] == {"registry": False, "shared": True}  # test_a.py's registry gone before test_b.py


def test_after_a_failure_the_folders_stay_to_be_read(tmp_path):
    failed = run_pytest(tmp_path / "failing", first_passes=False)
    assert failed["code"] == 1, failed["out"]
    assert failed["second"] == {"registry": True, "shared": True}
