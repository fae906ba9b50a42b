"""Every test process runs native threads only, as the daemons do; no test
skips silently (tests/skipguard.py); and Ctrl-C stops a run started in the
background, as tools/run-tests.sh starts its groups, through pytest's own
teardown."""

import signal

from tests.skipguard import (  # noqa: F401  (pytest hooks)
    pytest_runtest_logreport,
    pytest_sessionfinish,
    pytest_terminal_summary,
)
from vtpcm_common import concurrency

concurrency.use_native_threads()

# A shell starts a background job with SIGINT ignored, and Python then leaves
# it ignored: Ctrl-C would stop run-tests.sh but not its groups, whose
# processes (swtpm, agents, QEMU) would outlive it. KeyboardInterrupt runs
# every fixture's teardown, which stops them by pid.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
