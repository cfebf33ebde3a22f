"""CI runs what the README tells a new user to run: its two quick-start commands, as written, in its own .venv."""
from __future__ import annotations

import subprocess

from conftest import ROOT


def test_ci_runs_the_readmes_quick_start_as_written():
    printed = subprocess.run(["bash", str(ROOT / ".ci" / "run"), "--print-quick-start"], capture_output=True,
                             text=True, timeout=60, check=True).stdout.splitlines()
    install_and_train, tests = printed
    # the venv where and how the README makes it, activated for the second command too (one shell)
    assert install_and_train.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install -r "
                                        "requirements.txt && ")
    assert install_and_train.endswith("python train.py --model resnet18 --demo")
    assert tests == "pip install -r requirements-dev.txt && python -m pytest -q"
    for line in printed:  # CI reads them from the README, so the two cannot drift apart
        assert f"\n{line}\n" in (ROOT / "README.md").read_text()
    script = (ROOT / ".ci" / "run").read_text()
    # the first command up to its install (CI_QUICK_START=full: its training too), then the second, in one shell
    assert 'first="${first% && python *}"' in script and 'bash -e -c "$first\n$second"' in script
    assert "CI_VENV" not in script
