"""Every test process runs native threads only, as the daemons do; no test
skips silently (tests/skipguard.py); a thread a test left running is named
at the end of the test command's runs (tests/threadguard.py); and Ctrl-C stops a run started with
SIGINT ignored, through pytest's own teardown."""

import os
import signal

import pytest

from tests import threadguard
from tests.skipguard import (  # noqa: F401  (pytest hooks)
    pytest_runtest_logreport,
    pytest_sessionfinish,
    pytest_terminal_summary,
)
from vtpcm_common import concurrency

concurrency.use_native_threads()

# A run started with SIGINT ignored (``nohup ... &``; bash also starts a
# simple background command so) would keep it ignored in Python: Ctrl-C
# would not stop it, and what its tests started (swtpm, agents, QEMU) would
# outlive an interrupted run. KeyboardInterrupt runs every fixture's
# teardown, which stops them by pid.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_configure(config: pytest.Config) -> None:
    # only in the test command's own runs (tools/run-tests.sh): its os._exit
    # would also end a process that runs pytest inside itself (mutmut)
    if os.environ.get("VTPCM_THREADGUARD") == "1":
        config.pluginmanager.register(threadguard, "vtpcm-threadguard")
