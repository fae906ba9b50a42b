"""A launcher that does not finish in time is given up on within a bound,
also when a process it forked still holds its stderr (the agent's RPC
worker waited for that process's end with an unbounded communicate())."""

import os
import signal
import time
from pathlib import Path

import pytest

from vtpcm_agent.swtpm import process
from vtpcm_common import exception


def test_a_launcher_timeout_does_not_wait_for_a_child_holding_stderr(tmp_path: Path) -> None:
    holder = tmp_path / "holder.pid"
    paths = process.SwtpmPaths(tmp_path / "state", tmp_path / "ctrl", tmp_path / "swtpm.pid",
                               tmp_path / "swtpm.log", None)
    # the "launcher" forks a child that keeps stderr for 60 s, then hangs
    cmd = ["sh", "-c", 'sleep 60 & echo $! > "$0"; sleep 60', str(holder)]
    started = time.monotonic()
    try:
        with pytest.raises(exception.SwtpmError) as err:
            process._launch(cmd, (), paths, time.monotonic() + 1.0)
        assert "did not become ready in time" in str(err.value)
        assert time.monotonic() - started < 30  # not the child's 60 s
    finally:
        if holder.exists():
            try:
                os.kill(int(holder.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
