"""The run ends with its slowest tests and why each is slow (tests/slowest.py): a test's own reason, the reason of
an expensive fixture beside the test that built it, and a slow test without one named as such."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT

EXAMPLE = '''
import time
import pytest
from tests.slowest import slow_setup


@pytest.fixture(scope="module")
@slow_setup("trains a model")
def model():
    time.sleep(1.1)  # a fixture under 1 s explains nothing
    return "model"


def test_first_user_builds_the_model(model):
    pass


def test_second_user_reuses_it(model):
    time.sleep(0.3)


@pytest.mark.slow("scores an archive")
def test_marked():
    time.sleep(0.4)


def test_unexplained():
    time.sleep(0.5)
'''


def run_pytest(tmp_path, source: str, *flags: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_example.py").write_text(source)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.slowest", "-p", "no:cacheprovider", *flags,
                           "test_example.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_the_slowest_tests_say_why_and_a_fixture_reason_goes_to_the_test_that_built_it(tmp_path):
    for workers in ("0", "2"):  # in one process, and from xdist workers to the controller
        done = run_pytest(tmp_path, EXAMPLE, "-n", workers, "-o", "explain_slower_than=0.45")
        assert done.returncode == 0, done.stdout + done.stderr
        summary = done.stdout.split("slowest 4 tests, and why")[1].splitlines()[1:9]
        tests = [line.split("::")[1] for line in summary[0::2]]
        whys = dict(zip(tests, (line.split("why: ")[1] for line in summary[1::2])))
        assert tests[0] == "test_first_user_builds_the_model", summary
        built = whys["test_first_user_builds_the_model"]
        assert built.startswith("builds `model` (") and built.endswith(" s): trains a model"), built
        assert whys["test_second_user_reuses_it"] == "-"  # it did not build the fixture, and is under the bar
        assert whys["test_marked"] == "scores an archive"
        assert whys["test_unexplained"].startswith("no reason given")


def test_a_slow_mark_without_its_reason_is_refused(tmp_path):
    refused = run_pytest(tmp_path, "import pytest\n\n@pytest.mark.slow\ndef test_x():\n    pass\n")
    assert refused.returncode != 0 and "@pytest.mark.slow needs its reason" in refused.stdout + refused.stderr
