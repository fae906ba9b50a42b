"""What the agent reads of other processes while it looks for its swtpm:
any local user's process may carry megabytes of arguments (or argv pages
that block the reader), so only the state dir owner's processes have their
argv read, and then only up to a bound (review of the launch-timeout
sweep, MEDIUM 1)."""

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vtpcm_agent.swtpm import process

NOBODY = 65534


@pytest.fixture
def big_argv_process() -> Iterator[int]:
    # 300 kB in all, 100 kB an argument (the kernel's limit is 128 kB);
    # ("; :" keeps the shell itself, with its argv, from exec'ing sleep)
    proc = subprocess.Popen(["/bin/sh", "-c", "sleep 60; :", *["x" * 100_000] * 3],
                            user=NOBODY, group=NOBODY, extra_groups=[],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not process._cmdline(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)  # its argv appears only after the exec
        yield proc.pid
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the shell and its sleep
        proc.wait(timeout=10)


def test_argv_is_read_up_to_a_bound(big_argv_process: int) -> None:
    argv = process._cmdline(big_argv_process)
    assert argv[:3] == ["/bin/sh", "-c", "sleep 60; :"]
    assert sum(len(a) for a in argv) + len(argv) - 1 <= process.CMDLINE_MAX  # NULs between


def test_another_uids_process_has_no_argv_read(big_argv_process: int, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    paths = process.SwtpmPaths(tmp_path, tmp_path / "ctrl", tmp_path / "pid",
                               tmp_path / "log", None)  # owned by root
    read: list[int] = []
    monkeypatch.setattr(process, "_cmdline", lambda pid: read.append(pid) or [])
    assert not process._is_our_swtpm(big_argv_process, paths)
    assert read == []
