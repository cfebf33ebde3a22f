"""A pytest plugin: the run ends with its slowest tests and why each is slow.

A test gives its reason with `@pytest.mark.slow("trains eight architectures")` (or a module's `pytestmark`); an
expensive fixture gives its own with `@slow_setup("...")` under its `@pytest.fixture`, and the reason goes to the
test whose setup built it (a module or session fixture is built once, in its first test), with the seconds it took.
A slow test without a reason is named as such, so that it gets one or gets faster."""
from __future__ import annotations

import time
from collections import defaultdict

import pytest

SHOWN = 12  # lines in the summary
WHY = "slow_because"
_running: list = []  # the test being set up in this process (a fixture's reason goes to it)
_times: dict[str, float] = defaultdict(float)  # seconds per test, all phases
_reasons: dict[str, list[str]] = defaultdict(list)


def slow_setup(reason: str):
    """Under @pytest.fixture: what makes this fixture expensive to build, said beside the test that builds it."""
    def mark(fixture):
        fixture.slow_because = reason
        return fixture
    return mark


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow(reason): why this test takes long (shown in the run's slowest tests)")


def pytest_addoption(parser) -> None:
    parser.addini("explain_slower_than", "seconds: a test this long says why it is slow", default="20")


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        for marker in item.iter_markers("slow"):
            if len(marker.args) != 1 or not str(marker.args[0]).strip():
                raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.slow needs its reason, e.g. "
                                        '@pytest.mark.slow("trains a model")')


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    _running[:] = [item]
    item.user_properties.extend((WHY, m.args[0]) for m in item.iter_markers("slow"))


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    start = time.perf_counter()
    try:
        return (yield)
    finally:
        reason = getattr(fixturedef.func, "slow_because", None)
        seconds = time.perf_counter() - start
        if reason and _running and seconds >= 1:  # a fixture that was quick this time explains nothing
            _running[0].user_properties.append((WHY, f"builds `{fixturedef.argname}` ({seconds:.0f} s): {reason}"))


def pytest_runtest_logreport(report) -> None:
    """In the process that reports (the xdist controller, or the only one): each phase's time and reasons."""
    _times[report.nodeid] += report.duration
    reasons = _reasons[report.nodeid]
    reasons.extend(r for key, r in report.user_properties if key == WHY and r not in reasons)


def pytest_terminal_summary(terminalreporter, config) -> None:
    slowest = sorted(_times, key=_times.get, reverse=True)[:SHOWN]
    if hasattr(config, "workerinput") or not slowest:
        return
    terminalreporter.write_sep("-", f"slowest {len(slowest)} tests, and why")
    for nodeid in slowest:
        unexplained = not _reasons[nodeid] and _times[nodeid] >= float(config.getini("explain_slower_than"))
        why = "; ".join(_reasons[nodeid]) or ("no reason given: @pytest.mark.slow(reason) or faster" if unexplained
                                              else "-")
        terminalreporter.write_line(f"{_times[nodeid]:7.1f} s  {nodeid}", yellow=unexplained)
        terminalreporter.write_line(f"           why: {why}", yellow=unexplained)
