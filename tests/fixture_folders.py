"""A pytest plugin: the folders a module's fixtures made with tmp_path_factory are removed when those fixtures are
torn down (their test file is done), not when the run ends. Kept to the end, one registry and one server store per
test file added up to gigabytes of temp space. Nothing is removed once a test of the process has failed: a
failing run keeps what it needs to be read (tests/conftest.py then strips the large files)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

_made: dict[int, list[Path]] = {}  # id(fixturedef) -> the folders its setup made
_failed: list[str] = []


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    factory = getattr(request.config, "_tmp_path_factory", None)
    if fixturedef.scope == "session" or fixturedef.argname in ("tmp_path", "tmpdir") or factory is None:
        return (yield)  # a session's folders live to the end; pytest keeps or removes a test's own tmp_path
    basetemp = factory.getbasetemp()
    before = set(basetemp.iterdir())
    try:
        return (yield)
    finally:
        made = set(basetemp.iterdir()) - before
        if made:
            _made.setdefault(id(fixturedef), []).extend(made)


def pytest_fixture_post_finalizer(fixturedef, request) -> None:
    for folder in _made.pop(id(fixturedef), []):
        if not _failed:
            shutil.rmtree(folder, ignore_errors=True)


def pytest_runtest_logreport(report) -> None:
    if report.failed:
        _failed.append(report.nodeid)
