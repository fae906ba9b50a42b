"""No silent skips: every skipped test is listed with its reason at the end
of the run, and a skip whose reason is not one of ``OPTIONAL`` fails the run.

A suite that exits 0 while its PostgreSQL cases or end-to-end tests skipped
(server down, not root) proves nothing about them. The README test command
installs and starts what the suite needs; a part missing is an error, not a
skip. ``OPTIONAL`` lists the reasons README.rst names as optional (none
today: install-deps.sh provides PostgreSQL and MariaDB); add one there and
here together. Loaded by tests/conftest.py.
"""

from __future__ import annotations

import pytest

# Reason prefixes of skips that README.rst documents as optional.
OPTIONAL: tuple[str, ...] = ()

_SKIPS: list[tuple[str, str]] = []


def _reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def unexpected(skips: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The skips whose reason README does not call optional."""
    return [(node, why) for node, why in skips if not why.startswith(OPTIONAL or ("\0",))]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _SKIPS.append((report.nodeid, _reason(report)))


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if unexpected(_SKIPS) and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _SKIPS:
        return
    terminalreporter.section("skipped tests and why")
    for node, why in _SKIPS:
        terminalreporter.write_line("%s: %s" % (node, why))
    bad = unexpected(_SKIPS)
    if bad:
        terminalreporter.write_line(
            "%d skip(s) of a required part: the run FAILS (install and start what is "
            "missing: tools/install-deps.sh; optional skips are listed in "
            "tests/skipguard.py and README.rst)" % len(bad), red=True, bold=True)
