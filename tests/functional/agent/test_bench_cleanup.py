"""The benchmarks' clean-up of vTPCM swtpm processes a failed run leaves
behind (``benchlib.stop_left_swtpms``), with real swtpm processes: it stops
the swtpm its pid file under the run's work directory names, and nothing
else (another run's swtpm, a process that is no swtpm)."""

from __future__ import annotations

import os
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path

from vtpcm_agent.swtpm import process

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))

import benchlib  # noqa: E402


def _paths(base: Path, run: str, name: str) -> process.SwtpmPaths:
    (base / run).mkdir(parents=True, exist_ok=True)
    state = base / "state" / name
    state.mkdir(parents=True)
    return process.SwtpmPaths(state, base / run / (name + ".ctrl"), base / run / (name + ".pid"),
                              base / (name + ".log"))


def _gone(pid: int, paths: process.SwtpmPaths, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while process.owns(pid, paths):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_stops_the_runs_swtpm_by_its_pid_file_and_nothing_else(
        short_dir: Path, swtpm_factory: Callable[..., int]) -> None:
    work, elsewhere = short_dir / "work", short_dir / "other"
    key, migration_key = secrets.token_bytes(32), secrets.token_bytes(32)
    left = _paths(work, "run-a", "left")
    left_pid = swtpm_factory(left, key, migration_key)
    other = _paths(elsewhere, "run-a", "other")
    other_pid = swtpm_factory(other, key, migration_key)
    # a pid file under the run naming another run's swtpm, one naming a
    # process that is no swtpm (this test), one that is garbage
    (work / "run-b").mkdir()
    (work / "run-b" / "foreign.pid").write_text(str(other_pid))
    (work / "run-b" / "me.pid").write_text(str(os.getpid()))
    (work / "run-b" / "bad.pid").write_text("not a pid")

    stopped = benchlib.stop_left_swtpms(work)

    assert stopped == [left_pid]
    assert _gone(left_pid, left)
    assert process.is_alive(other_pid, other)
